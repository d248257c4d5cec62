"""The order payment saga in the worker; its rules are ``app.application.saga``.

- The feed (``app.adapters.saga_io.SagaFeed``, consumer group ``<app_id>.saga``)
  routes order events, the saga's own account movements and the rejections of its
  commands into ``<app_id>-saga-inbox``, keyed by order id.
- One agent on the inbox owns the ``sagas`` table (state and step history) and the
  ``saga-deadlines`` table (pending deadlines only). Per message it decides with
  ``react``, sends the commands and waits for the broker, then records the state.
- A timer sends ``TimedOut`` into the inbox for locally owned deadlines that passed;
  the agent decides, so a timeout fires once however often it is sent.

Seeing a saga: ``GET /sagas/{order_id}`` on any worker (routed to the key's owner).
The saga's commands carry the order's correlation id, so ``streamfold history
--correlation <id>`` (and ``/query/correlation/{id}``) show the whole flow across
aggregates: OrderCreated, MoneyWithdrawn, PaymentProcessed or OrderCancelled, and a
refund's MoneyDeposited, the saga's issued by user ``saga:order-payment``. Each
command's causation id is the event, result or timeout that triggered it (listed in
the history of ``/sagas/{order_id}``).

Settings (``app.settings``): ``STREAMFOLD_SAGA=on|off`` (off registers nothing: use it
for replays; the feed's group keeps its position and resumes there when switched back
on) and ``STREAMFOLD_SAGA_TIMEOUT`` (seconds to wait for the account, default 30).
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import faust
from aiokafka.errors import KafkaError
from faust.exceptions import SameNode

from app.adapters.codec import Codec, RegistryUnavailable
from app.adapters.eventlog import partition_for
from app.adapters.saga_io import (
    FeedUnavailable,
    SagaFeed,
    encode_message,
    frame_command,
    inbox_topic,
    read_range,
)
from app.adapters.topics import FOREVER, TopicSpec, ensure_topics
from app.application import saga
from app.runtime import settle_commits
from app.settings import Settings

log = logging.getLogger("streamfold.saga")

TRANSIENT = (KafkaError, RegistryUnavailable, OSError, TimeoutError)
# The saga's own position in each inbox partition, kept in its table.
POSITION = "\x00position/{partition}"
PROBE = b'{"type":"Probe"}'


def register(app: faust.App, settings: Settings, codec: Codec) -> None:
    if not settings.saga:
        log.info("order payment saga is off (STREAMFOLD_SAGA=off)")
        return
    name = inbox_topic(settings)
    ensure_topics(
        settings,
        [
            TopicSpec(name, settings.partitions),
            TopicSpec(f"{name}.dlq", 1, dict(FOREVER), tuple(FOREVER)),
        ],
    )
    # Raw keys (bytes): Faust serialises str keys as JSON, and its router would then
    # hash '"o-1"' rather than the order id the inbox is partitioned by.
    sagas = app.Table("sagas", key_type=bytes, partitions=settings.partitions)
    deadlines = app.Table(
        "saga-deadlines", key_type=bytes, partitions=settings.partitions
    )
    inbox = app.topic(
        name,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.partitions,
    )
    timeout = timedelta(seconds=settings.saga_timeout_s)
    runner = SagaRunner(app, settings, codec, sagas, deadlines, timeout)
    feed = SagaFeed(settings, codec)

    @app.agent(inbox, name="order-payment-saga")
    async def order_payment_saga(stream: faust.StreamT) -> None:
        async for event in stream.events():
            await runner.handle(event.message)

    @app.timer(interval=min(1.0, max(0.05, settings.saga_timeout_s / 4)))
    async def saga_timer() -> None:
        await runner.tick()

    @app.task
    async def start_saga_feed() -> None:
        feed.start()

    @app.on_before_shutdown.connect
    async def stop_saga_feed(sender: Any, **kwargs: Any) -> None:
        await asyncio.to_thread(feed.stop)

    @app.page("/sagas/{order_id}")
    async def get_saga(view: Any, request: Any, order_id: str) -> Any:
        # Faust's router hashes keys with its producer's metadata, which knows only
        # topics the producer has written to (and fails on the others) until fetched.
        await app.producer._ensure_producer().partitions_for(
            sagas.changelog_topic.get_topic_name()
        )
        try:  # to the worker that owns the order's partition (what table_route does)
            return await app.router.route_req(sagas.name, order_id, view.web, request)
        except SameNode:
            pass
        raw = sagas.get(order_id.encode())
        if raw is None:
            return view.json({"error": f"no saga for order {order_id}"}, status=404)
        return view.json({**raw, "settled": saga.state_from_json(raw).settled})


class SagaRunner:
    """Decide, send, record: one inbox message at a time, inside the agent.

    The saga keeps its own position in the inbox (per partition, in its table, next
    to the states it covers) instead of trusting Faust's committed offsets: Faust's
    offset-gap bookkeeping can commit past messages it never delivered when a worker
    is killed around a rebalance. A message beyond the position means some were
    skipped, and they are read back from the log first; one before it was already
    acted on.
    """

    def __init__(
        self,
        app: faust.App,
        settings: Settings,
        codec: Codec,
        sagas: Any,
        deadlines: Any,
        timeout: timedelta,
    ) -> None:
        self.app, self.settings, self.codec = app, settings, codec
        self.sagas, self.deadlines, self.timeout = sagas, deadlines, timeout
        self.inbox = inbox_topic(settings)
        # Deadlines already reported by this process (a restart reports them again).
        self._reported: dict[str, str] = {}
        # Positions seen by the previous tick, to notice a partition that stalls.
        self._positions: dict[int, int] = {}

    def position(self, partition: int) -> int:
        """The next inbox offset the saga has not acted on."""
        stored = self.sagas.get(POSITION.format(partition=partition).encode())
        return 0 if stored is None else int(stored)

    async def handle(self, message: Any) -> None:
        expected = self.position(message.partition)
        if message.offset < expected:
            return  # acted on already: Faust redelivers from its own, older commit
        if message.offset > expected:
            missed = await self._read_back(message.partition, expected, message.offset)
            log.warning(
                "saga inbox partition %d: %d message(s) from offset %d were skipped "
                "by the consumer; acting on them from the log",
                message.partition,
                len(missed),
                expected,
            )
            for offset, value in missed:
                await self._act(message.partition, offset, value)
        await self._act(message.partition, message.offset, message.value)

    async def _act(self, partition: int, offset: int, value: bytes | None) -> None:
        position = POSITION.format(partition=partition).encode()
        if value == PROBE:
            self.sagas[position] = offset + 1
            return
        try:
            incoming = saga.message_from_json(json.loads(value or b""))
            order_id = incoming.order_id
            if partition_for(order_id.encode(), self.settings.partitions) != partition:
                raise ValueError(f"order {order_id!r} on the wrong inbox partition")
            key = order_id.encode()
            raw = self.sagas.get(key)
            state = None if raw is None else saga.state_from_json(raw)
            reaction = saga.react(state, incoming, timeout=self.timeout)
        except Exception as error:  # noqa: BLE001 - dead-letter, never skip silently
            await self._dead_letter(
                partition, offset, value, f"{type(error).__name__}: {error}"
            )
            self.sagas[position] = offset + 1
            return
        await self._send(reaction.commands)
        # Recorded only after the commands are durable: a crash in between repeats
        # the message, and the repeat sends the same command ids (answered once).
        if reaction.state is not None and reaction.state != state:
            self.sagas[key] = saga.state_to_json(reaction.state)
        self._index_deadline(key, reaction.state)
        self.sagas[position] = offset + 1

    async def _read_back(
        self, partition: int, start: int, end: int
    ) -> list[tuple[int, bytes | None]]:
        delay = 0.5
        while True:
            try:
                return await asyncio.to_thread(
                    read_range, self.settings, self.inbox, partition, start, end
                )
            except FeedUnavailable as error:
                log.warning("saga inbox read-back failed, retrying: %s", error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _index_deadline(self, key: bytes, state: saga.SagaState | None) -> None:
        # Checked on every message, so the index heals if its write was lost.
        wanted = None if state is None or state.deadline is None else state.deadline
        current = self.deadlines.get(key)
        if wanted is not None and current != wanted.isoformat():
            self.deadlines[key] = wanted.isoformat()
        elif wanted is None and current is not None:
            del self.deadlines[key]

    async def _send(self, commands: tuple[saga.Outgoing, ...]) -> None:
        delay = 0.2
        while True:
            try:
                sent = []
                for out in commands:
                    framed = frame_command(
                        self.settings,
                        self.codec,
                        out.command,
                        {
                            "command_id": out.command_id,
                            "correlation_id": out.correlation_id,
                            "causation_id": out.causation_id,
                            "user_id": saga.ACTOR,
                            "issued_at": out.issued_at,
                            "expected_version": None,
                        },
                    )
                    sent.append(
                        await self.app.producer.send(
                            framed.topic,
                            key=framed.key,
                            value=framed.value,
                            partition=framed.partition,
                            timestamp=None,
                            headers=framed.headers,
                        )
                    )
                await asyncio.gather(*sent)
                return
            except TRANSIENT as error:
                # Retry in place: the saga's next message must not overtake this one.
                log.warning("saga send failed, retrying in %.1fs: %r", delay, error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def tick(self) -> None:
        """The timer's work: report passed deadlines, and probe stalled partitions."""
        now = datetime.now(UTC)
        sends: list[tuple[bytes | None, bytes, int]] = []
        due = []
        for key, raw in list(self.deadlines.items()):
            order_id = key.decode()
            if self._reported.get(order_id) == raw:
                continue
            deadline = datetime.fromisoformat(raw)
            if deadline <= now:
                due.append(order_id)
                self._reported[order_id] = raw
                message = saga.TimedOut(order_id=order_id, deadline=deadline, at=now)
                key, value = encode_message(message)
                sends.append((key, value, partition_for(key, self.settings.partitions)))
        if len(self._reported) > 10_000:
            self._reported = {
                k: v for k, v in self._reported.items() if k.encode() in self.deadlines
            }
        # A partition whose tail Faust skipped gets no further message to reveal the
        # gap; a probe is one.
        for tp in self.app.consumer.assignment():
            if tp.topic != self.inbox:
                continue
            position = self.position(tp.partition)
            high = self.app.consumer.highwater(tp)
            stalled = self._positions.get(tp.partition) == position
            if high is not None and high > position and stalled:
                sends.append((None, PROBE, tp.partition))
            self._positions[tp.partition] = position
            await settle_commits(self.app.consumer, tp, position)
        try:
            pending = [
                await self.app.producer.send(
                    self.inbox, key, value, partition, None, None
                )
                for key, value, partition in sends
            ]
            await asyncio.gather(*pending)
        except TRANSIENT as error:
            log.warning("saga timer could not send, retrying: %r", error)
            for order_id in due:
                self._reported.pop(order_id, None)

    async def _dead_letter(
        self, partition: int, offset: int, value: bytes | None, reason: str
    ) -> None:
        log.error(
            "saga dead-lettering %s[%d]@%d: %s", self.inbox, partition, offset, reason
        )
        headers = [
            ("dlq-source-topic", self.inbox.encode()),
            ("dlq-source-partition", str(partition).encode()),
            ("dlq-source-offset", str(offset).encode()),
            ("dlq-reason", reason.encode()[:4000]),
        ]
        while True:
            try:
                pending = await self.app.producer.send(
                    f"{self.inbox}.dlq", None, value, None, None, headers
                )
                await pending
                return
            except TRANSIENT as error:
                log.warning("saga dead letter failed, retrying: %r", error)
                await asyncio.sleep(1.0)
