"""The worker's runtime: decodes a command message, hands it to the application
service, and answers — turning every failure into a rejection or a dead letter.

Agents call ``CommandProcessor.process``; nothing here raises for bad input, and
infrastructure failures are retried in place (never skipped, never reordered).

The processor keeps its own position in each command partition (in the aggregate
table, beside the states it covers) rather than trusting Faust's committed offsets:
when a rebalance interrupts Faust's fetcher, the record being handed to the stream
is dropped while Faust's read offset moves past it, and its offset-gap bookkeeping
(``faust/transport/consumer.py``, ``_drain_messages`` and ``_add_gap``, 0.15.x)
later commits past it. A message beyond the position therefore means some were
skipped: they are read back from the topic and processed first. A partition whose
tail was skipped gets no later message to show it; ``probe_stalled`` sends one.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC
from types import SimpleNamespace
from typing import Any, TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from confluent_kafka import KafkaException
from faust.streams import _current_event

from app.adapters import mapper
from app.adapters.catalog import SchemaCatalog
from app.adapters.codec import Codec, DecodeError
from app.adapters.eventlog import (
    AppendFailed,
    KafkaEventLog,
    KafkaResults,
    committed_offset,
    partition_for,
    read_partition,
    read_records,
)
from app.application.commands import (
    Aggregate,
    CommandService,
    Decision,
    Envelope,
    Position,
    Record,
    Result,
)
from app.domain import accounts, orders
from app.settings import Settings

log = logging.getLogger("streamfold.worker")
T = TypeVar("T")

ORDERS = Aggregate(type=orders.AGGREGATE_TYPE, decider=orders, id_field="order_id")
ACCOUNTS = Aggregate(
    type=accounts.AGGREGATE_TYPE, decider=accounts, id_field="account_id"
)
AGGREGATES = {"orders": ORDERS, "accounts": ACCOUNTS}
TRANSIENT = (
    KafkaError,
    KafkaException,
    AppendFailed,
    ConnectionError,
    TimeoutError,
    OSError,
)
POSITION_KEY = "\x00position/{partition}"
COMMANDS_KEY = "\x00commands/{partition}"
ANSWER_KEY = "\x00answer/{command_id}"
# A record with this header only reveals skipped records before it (see above).
PROBE_HEADER = "streamfold-probe"
# On a command sent on from the partition it was produced to: "<partition>@<offset>".
REROUTED_HEADER = "streamfold-rerouted-from"


@dataclass(frozen=True, slots=True)
class Incoming:
    """The parts of a Kafka message the processor needs; keeps Faust out of tests."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


class _PartitionEvent:
    """What Faust's table and RocksDB store read from the current event: the
    partition a key lives in (its changelog partition and local database) and the
    source topic. Faust sets the current event while an agent iterates one event at
    a time; the command agent takes a batch across partitions and saves once the
    batch is durable, so it names each write's partition itself."""

    __slots__ = ("__weakref__", "message")

    def __init__(self, topic: str, partition: int) -> None:
        self.message = SimpleNamespace(topic=topic, partition=partition)


@contextmanager
def as_current(event: Any) -> Iterator[None]:
    """Make ``event`` Faust's current event: a table reads and writes a key in the
    partition (local store and changelog partition) of the current event, which
    Faust sets only while an agent takes one event at a time. Agents that take
    batches name each key's event with this."""
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


class TableStore:
    """The aggregate store over a Faust table (or any mutable mapping), in JSON:
    records by aggregate id, the answer to every command decided by command id, and
    the partition's position marks. Reads and writes happen inside ``partition(p)``:
    a Faust table keeps each key in the partition of the commands that own it.

    One table, so one changelog partition holds all of a partition's writes in the
    order they were made: a crash can lose a tail of them, never one from between.
    That order is the answer, then the record, then the marks (see
    ``CommandService.complete``): a record found after a restart has its answer."""

    def __init__(self, table: Any, aggregate: Aggregate, topic: str = "") -> None:
        self.table = table
        self.topic = topic
        self.state_type = type(aggregate.initial_state())
        self._events: dict[int, _PartitionEvent] = {}
        self._unacknowledged: list[Awaitable[Any]] = []
        if hasattr(table, "send_changelog"):
            table.send_changelog = self._keeping(table.send_changelog)

    def _keeping(self, send: Callable[..., Any]) -> Callable[..., Any]:
        # A Faust table buffers each change for its changelog and drops the future
        # that says the broker has it; this keeps them for ``durable``.
        def send_changelog(*args: Any, **kwargs: Any) -> Any:
            future = send(*args, **kwargs)
            self._unacknowledged.append(future)
            return future

        return send_changelog

    async def durable(self) -> None:
        """Wait until the broker holds every change made so far (Faust sends them
        from a buffer, in the background). A failed send raises; its change stays
        in the local store, but a changelog restore would miss it."""
        pending = list(self._unacknowledged)
        if not pending:
            return
        # Not gather: cancelling this wait must not cancel Faust's futures.
        await asyncio.wait(pending)
        del self._unacknowledged[: len(pending)]
        for future in pending:
            future.result()

    @contextmanager
    def partition(self, partition: int) -> Iterator[None]:
        event = self._events.get(partition)
        if event is None:
            event = self._events[partition] = _PartitionEvent(self.topic, partition)
        with as_current(event):
            yield

    def load(self, aggregate_id: str) -> Record | None:
        raw = self.table.get(aggregate_id)
        if raw is None:
            return None
        if "recent" in raw:
            raw = self._migrate(aggregate_id, raw)
        return record_from_json(raw, self.state_type)

    def _migrate(self, aggregate_id: str, raw: dict[str, Any]) -> dict[str, Any]:
        """A record written before answers had keys of their own kept its last
        answers: they get their keys, then the record is saved without them (in
        that order, as ``complete`` writes), so this happens once per record."""
        for kept in raw["recent"]:
            key = ANSWER_KEY.format(command_id=kept["command_id"])
            if self.table.get(key) is None:
                self.table[key] = kept
        raw = {name: value for name, value in raw.items() if name != "recent"}
        self.table[aggregate_id] = raw
        return raw

    def save(self, aggregate_id: str, record: Record) -> None:
        self.table[aggregate_id] = record_to_json(record)

    def answer(self, command_id: str) -> Result | None:
        raw = self.table.get(ANSWER_KEY.format(command_id=command_id))
        return None if raw is None else result_from_json(raw)

    def remember(self, result: Result) -> None:
        self.table[ANSWER_KEY.format(command_id=result.command_id)] = result_to_json(
            result
        )

    def next_offset(self, partition: int) -> int:
        return self._mark(POSITION_KEY, partition) or 0

    def set_next_offset(self, partition: int, offset: int) -> None:
        # Only forward: a repeated command answers with an old position.
        self._advance(POSITION_KEY, partition, offset)

    def next_command(self, partition: int) -> int | None:
        """The next command offset not yet processed; None before the first."""
        return self._mark(COMMANDS_KEY, partition)

    def set_next_command(self, partition: int, offset: int) -> None:
        self._advance(COMMANDS_KEY, partition, offset)

    def _mark(self, key: str, partition: int) -> int | None:
        with self.partition(partition):
            raw = self.table.get(key.format(partition=partition))
        return None if raw is None else int(raw)

    def _advance(self, key: str, partition: int, offset: int) -> None:
        name = key.format(partition=partition)
        with self.partition(partition):
            current = self.table.get(name)
            if current is None or offset > int(current):
                self.table[name] = offset


def record_to_json(record: Record) -> dict[str, Any]:
    return {"state": mapper.to_dict(record.state), "version": record.version}


def record_from_json(raw: dict[str, Any], state_type: type) -> Record:
    return Record(
        state=mapper.from_dict(state_type, raw["state"]), version=raw["version"]
    )


def result_to_json(result: Result) -> dict[str, Any]:
    data = {
        "command_id": result.command_id,
        "aggregate_type": result.aggregate_type,
        "aggregate_id": result.aggregate_id,
        "accepted": result.accepted,
        "correlation_id": result.correlation_id,
        "version": result.version,
        "event_ids": list(result.event_ids),
        "code": result.code,
        "message": result.message,
        "field": result.field,
    }
    if result.position is not None:
        data["position"] = [result.position.partition, result.position.offset]
    return data


def result_from_json(data: dict[str, Any]) -> Result:
    position = data.get("position")
    return Result(
        command_id=data["command_id"],
        aggregate_type=data["aggregate_type"],
        aggregate_id=data["aggregate_id"],
        accepted=data["accepted"],
        correlation_id=data["correlation_id"],
        version=data["version"],
        event_ids=tuple(data["event_ids"]),
        code=data["code"],
        message=data["message"],
        field=data["field"],
        position=Position(partition=position[0], offset=position[1])
        if position
        else None,
    )


def envelope_from_record(record: dict[str, Any]) -> Envelope:
    issued_at = record["issued_at"]
    if issued_at.tzinfo is None:
        issued_at = issued_at.replace(tzinfo=UTC)
    return Envelope(
        command_id=record["command_id"],
        correlation_id=record["correlation_id"],
        causation_id=record["causation_id"],
        user_id=record["user_id"],
        issued_at=issued_at,
        expected_version=record["expected_version"],
    )


# A decoded command: its envelope and the command.
Parsed = tuple[Envelope, Any]


@dataclass(slots=True)
class _Batch:
    """Commands taken but not yet durable. Their events, dead letters and re-routed
    copies are on the way to the broker; nothing of them is saved, answered or marked
    processed until the broker has acknowledged every one (``CommandProcessor._flush``).
    At most one command per aggregate and per command id is decided before a flush:
    a later one is deferred to the next wave, so it decides on a durable state (or
    finds the answer), and an aggregate's appends are never in flight together. A
    wave is the deferred commands in their order; a batch of order lifecycles
    (create, pay, ship, deliver of each order, one after another) is four waves, not
    a flush per command."""

    decided: list[tuple[int, Decision, Awaitable[list[Position]] | None]] = field(
        default_factory=list
    )
    # ("aggregate", id) and ("command", id) of the commands decided.
    keys: set[tuple[str, str]] = field(default_factory=set)
    answers: list[Result] = field(default_factory=list)
    # Messages sent elsewhere: dead letters and re-routed commands.
    forwarded: list[Awaitable[Any]] = field(default_factory=list)
    # Per partition, the offset after the last message taken.
    marks: dict[int, int] = field(default_factory=dict)
    # Commands whose aggregate or command id was already decided in this wave, and
    # per partition the first of them: no mark passes it until it is decided.
    deferred: list[tuple[Incoming, Parsed]] = field(default_factory=list)
    deferred_keys: set[tuple[str, str]] = field(default_factory=set)
    held: dict[int, int] = field(default_factory=dict)

    def pending(self) -> list[Awaitable[Any]]:
        return [d for _, _, d in self.decided if d is not None] + self.forwarded


@dataclass(slots=True)
class CommandProcessor:
    """One aggregate type's command pipeline inside the worker."""

    settings: Settings
    aggregate: Aggregate
    store: TableStore
    codec: Codec
    catalog: SchemaCatalog
    producer: AIOKafkaProducer
    events_topic: str
    service: CommandService = field(init=False)
    log: KafkaEventLog = field(init=False)
    results: KafkaResults = field(init=False)
    caught_up: set[int] = field(default_factory=set)
    # Per partition: the position last seen by ``probe_stalled``, and the one probed.
    _seen: dict[int, int] = field(default_factory=dict)
    _probed: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.service = CommandService(aggregate=self.aggregate, store=self.store)
        self.log = KafkaEventLog(
            self.producer, self.codec, self.catalog, self.events_topic
        )
        self.results = KafkaResults(
            self.producer, self.codec, self.settings.topics.results
        )

    def forget_partitions(self) -> None:
        """After a rebalance, re-read the log tail before trusting the table again."""
        self.caught_up.clear()

    async def process(self, message: Incoming) -> None:
        await self.process_batch([message])

    async def process_batch(self, messages: Sequence[Incoming]) -> None:
        """Handle messages in order, first any skipped before them (see the module
        doc). Their events are appended together and awaited once; a transient
        failure waits for every append in flight, then takes the messages again
        from the log's truth (those already done are passed over)."""
        delay = 0.2
        while True:
            batch = _Batch()
            try:
                for message in messages:
                    await self._take(message, batch)
                while batch.deferred:
                    await self._flush(batch)
                    wave, batch.deferred = batch.deferred, []
                    batch.deferred_keys.clear()
                    batch.held.clear()
                    for message, parsed in wave:
                        await self._take_one(message, batch, parsed)
                await self._flush(batch)
                return
            except TRANSIENT as error:
                # Retry in place: skipping would lose a command, reordering would
                # break an aggregate's order.
                await asyncio.gather(*batch.pending(), return_exceptions=True)
                log.warning(
                    "transient failure on %d command(s) from %s[%d]@%d, retrying "
                    "in %.1fs: %s",
                    len(messages),
                    messages[0].topic,
                    messages[0].partition,
                    messages[0].offset,
                    delay,
                    error,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                # Events of the failed batch may have landed: fold them first.
                self.forget_partitions()

    async def _take(self, message: Incoming, batch: _Batch) -> None:
        expected = batch.marks.get(message.partition)
        if expected is None:
            expected = self.store.next_command(message.partition)
        if expected is None:
            # Nothing processed here yet, or the table was lost: the group's
            # committed offset is where this partition's work starts.
            expected = await self._committed(message.topic, message.partition)
        if message.offset < expected:
            return  # done before a retried batch failed
        if message.offset > expected:
            missed = await self._read_back(message, expected)
            log.warning(
                "%s[%d]: %d message(s) from offset %d not marked processed here "
                "(skipped by the consumer, or their mark was lost); processing them "
                "from the log",
                message.topic,
                message.partition,
                len(missed),
                expected,
            )
            for skipped in missed:
                await self._take_one(skipped, batch)
        await self._take_one(message, batch)
        batch.marks[message.partition] = message.offset + 1

    async def _take_one(
        self, message: Incoming, batch: _Batch, parsed: Parsed | None = None
    ) -> None:
        """Decide ``message``; a deferred one comes back with what ``_parse`` made of
        it, so each command is decoded once however many waves it waits."""
        if not any(name == PROBE_HEADER for name, _ in message.headers):
            try:
                if message.partition not in self.caught_up:
                    await self.catch_up(message.partition)
                parsed = parsed or await self._parse(message, batch)
                if parsed is not None:
                    await self._decide(message, parsed, batch)
            except TRANSIENT:
                raise
            except Exception as error:
                log.exception(
                    "dead-lettering %s[%d]@%d",
                    message.topic,
                    message.partition,
                    message.offset,
                )
                await self.dead_letter(
                    message, f"internal error: {type(error).__name__}: {error}", batch
                )

    async def _committed(self, topic: str, partition: int) -> int:
        return await _in_thread_retrying(
            "committed offset lookup",
            lambda: committed_offset(
                self.settings, self.settings.app_id, topic, partition
            ),
        )

    async def _read_back(self, message: Incoming, start: int) -> list[Incoming]:
        records = await _in_thread_retrying(
            "read-back",
            lambda: list(
                read_records(
                    self.settings,
                    message.topic,
                    message.partition,
                    start,
                    message.offset,
                )
            ),
        )
        return [
            Incoming(
                message.topic, message.partition, r.offset, r.key, r.value, r.headers
            )
            for r in records
        ]

    async def probe_stalled(self, topic: str, highwaters: dict[int, int]) -> None:
        """Send a probe to each partition of ``topic`` (partition -> high watermark,
        owned here) whose position is behind its end and has not moved since the
        last call: only a later message shows the processor what it missed."""
        for partition, high in highwaters.items():
            # A partition never processed here counts as stalled at 0: Faust may
            # have dropped all it fetched (``process`` then starts at the commit).
            position = self.store.next_command(partition) or 0
            stalled = self._seen.get(partition) == position
            self._seen[partition] = position
            if stalled and high > position and self._probed.get(partition) != position:
                self._probed[partition] = position
                log.warning(
                    "%s[%d] stalled at %d of %d; probing",
                    topic,
                    partition,
                    position,
                    high,
                )
                future = await self.producer.send(
                    topic,
                    b"",
                    key=None,
                    partition=partition,
                    headers=[(PROBE_HEADER, b"1")],
                )
                await future

    async def _parse(self, message: Incoming, batch: _Batch) -> Parsed | None:
        """The command and its envelope, or None once ``message`` is dead-lettered
        or rejected as invalid."""
        value = message.value
        if value is None:
            await self.dead_letter(message, "empty message (no value)", batch)
            return None
        if len(value) > self.settings.max_message_bytes:
            await self.dead_letter(
                message,
                f"message of {len(value)} bytes exceeds the limit of "
                f"{self.settings.max_message_bytes} (STREAMFOLD_MAX_MESSAGE_BYTES)",
                batch,
            )
            return None
        try:
            decoded = self.codec.decode(value)
        except DecodeError as error:
            await self.dead_letter(
                message, f"undecodable command: {error.reason}", batch
            )
            return None
        try:
            cls = self.catalog.class_for(decoded.record_name)
            envelope_data, payload = mapper.split_command(decoded.data)
            envelope = envelope_from_record(envelope_data)
        except (KeyError, LookupError) as error:
            await self.dead_letter(
                message,
                f"{decoded.record_name} is not a command of {self.aggregate.type}: "
                f"{error}",
                batch,
            )
            return None
        if cls not in self.aggregate.decider.COMMANDS:
            await self.dead_letter(
                message,
                f"{decoded.record_name} is not a {self.aggregate.type} command",
                batch,
            )
            return None
        try:
            command = mapper.from_dict(cls, payload)
        except mapper.MappingError as error:
            batch.answers.append(
                Result.rejected(
                    envelope,
                    self.aggregate,
                    _key(message),
                    "Validation",
                    str(error),
                    error.path,
                )
            )
            return None
        return envelope, command

    async def _decide(self, message: Incoming, parsed: Parsed, batch: _Batch) -> None:
        envelope, command = parsed
        aggregate_id = self.aggregate.aggregate_id(command)
        home = partition_for(aggregate_id.encode(), self.settings.partitions)
        if home != message.partition:
            await self.reroute(message, aggregate_id, home, batch)
            return
        keys = {("aggregate", aggregate_id), ("command", envelope.command_id)}
        if keys & (batch.keys | batch.deferred_keys):
            # Also behind a deferred command sharing its aggregate or command id.
            batch.deferred.append((message, parsed))
            batch.deferred_keys |= keys
            batch.held.setdefault(message.partition, message.offset)
            return
        with self.store.partition(message.partition):
            decision = self.service.decide(envelope, command)
        delivery = None
        if decision.events:
            delivery = await self.log.send(
                message.partition, decision.aggregate_id, decision.events
            )
        batch.decided.append((message.partition, decision, delivery))
        batch.keys |= keys

    async def _flush(self, batch: _Batch) -> None:
        """Once every append and dead letter of ``batch`` is acknowledged: save the
        aggregates, answer, and mark the messages processed, in that order."""
        decided = [
            (partition, decision, await delivery if delivery is not None else [])
            for partition, decision, delivery in batch.decided
        ]
        await asyncio.gather(*batch.forwarded)
        answers = []
        events_end: dict[int, int] = {}
        for partition, decision, positions in decided:
            with self.store.partition(partition):
                answers.append(self.service.complete(decision, positions))
            if positions:
                events_end[partition] = positions[-1].offset + 1
        for partition, offset in events_end.items():
            self.store.set_next_offset(partition, offset)
        sent = [await self.results.send(r) for r in answers + batch.answers]
        await asyncio.gather(*sent)
        for partition, offset in batch.marks.items():
            self.store.set_next_command(
                partition, min(offset, batch.held.get(partition, offset))
            )
        # A rejection lives only in the table. Were it lost while a later
        # command's events reached the log (SIGKILL), the command would be decided
        # again on a later state: so nothing more is decided until it is durable.
        await self.store.durable()
        batch.decided.clear()
        batch.keys.clear()
        batch.answers.clear()
        batch.forwarded.clear()

    async def catch_up(self, partition: int) -> None:
        """Fold whatever the log holds beyond what the table reflects (after a crash,
        a lost changelog write, or a deleted local store)."""
        start = self.store.next_offset(partition)
        stored = await asyncio.to_thread(
            lambda: list(
                read_partition(
                    self.settings,
                    self.codec,
                    self.catalog,
                    self.events_topic,
                    partition,
                    start,
                )
            )
        )
        with self.store.partition(partition):
            for item in stored:
                self.service.replay(
                    item.metadata,
                    item.event,
                    Position(partition=partition, offset=item.offset),
                )
        if stored:
            self.store.set_next_offset(partition, stored[-1].offset + 1)
            log.info(
                "caught up %s partition %d: %d events from offset %d",
                self.events_topic,
                partition,
                len(stored),
                start,
            )
        self.caught_up.add(partition)

    async def reroute(
        self, message: Incoming, aggregate_id: str, home: int, batch: _Batch
    ) -> None:
        """A command on another partition than its aggregate's (its producer did not
        hash the aggregate id with murmur2) would be decided against a state that is
        not its aggregate's: it is sent on, unchanged, to the partition that owns the
        aggregate, keyed by the aggregate id and saying where it came from. An
        aggregate's commands keep their order when its producer keys them by
        aggregate id; the batch is done only once the broker has the copy."""
        headers = [
            *message.headers,
            (REROUTED_HEADER, f"{message.partition}@{message.offset}".encode()),
        ]
        batch.forwarded.append(
            await self.producer.send(
                message.topic,
                message.value,
                key=aggregate_id.encode(),
                partition=home,
                headers=headers,
            )
        )
        log.info(
            "re-routing %s[%d]@%d to partition %d, which owns %s %s",
            message.topic,
            message.partition,
            message.offset,
            home,
            self.aggregate.type,
            aggregate_id,
        )

    async def dead_letter(self, message: Incoming, reason: str, batch: _Batch) -> None:
        """Keep the original bytes and say where they came from and why; ``batch``
        awaits the broker's acknowledgement before the message counts as done."""
        topic = self.settings.topics.dead_letter(message.topic)
        headers = [
            *message.headers,
            ("dlq-source-topic", message.topic.encode()),
            ("dlq-source-partition", str(message.partition).encode()),
            ("dlq-source-offset", str(message.offset).encode()),
            ("dlq-reason", reason.encode()[:4000]),
        ]
        batch.forwarded.append(
            await self.producer.send(
                topic, message.value, key=message.key, headers=headers
            )
        )
        log.warning(
            "dead-lettering %s[%d]@%d: %s",
            message.topic,
            message.partition,
            message.offset,
            reason,
        )


async def _in_thread_retrying(what: str, call: Callable[[], T]) -> T:
    """Run a blocking Kafka read in a thread until it succeeds: a transient failure
    is retried with backoff, never skipped."""
    delay = 0.5
    while True:
        try:
            return await asyncio.to_thread(call)
        except TRANSIENT as error:
            log.warning("%s failed, retrying in %.1fs: %s", what, delay, error)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


def _key(message: Incoming) -> str:
    return (message.key or b"").decode(errors="replace")


async def settle_commits(consumer: Any, tp: Any, next_offset: int | None) -> None:
    """Fill the hole Faust's commit waits at, once the processor (whose position is
    ``next_offset``) has handled it.

    Faust commits the run of acked offsets that starts next to its last commit; a
    record it dropped leaves a hole before that run, and the commit stops there for
    good while its acked list grows. The processor read such records back, so the
    hole is done: it is handed to Faust's ``_add_gap``, the hook Faust uses itself
    for offsets with no message. Only the hole, so nothing is marked twice."""
    committed = consumer._committed_offset.get(tp)
    acked = consumer._acked.get(tp)
    if not next_offset or committed is None or not acked:
        return
    first = min(acked)
    if first - committed > 1 and next_offset >= first:
        await consumer._add_gap(tp, committed + 1, first - 1)
