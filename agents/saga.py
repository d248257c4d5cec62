"""The order payment saga on the transactional processor; its rules are
``app.application.saga``.

- The feed (``FeedHandler``, consumer group ``<app_id>.saga``) routes order events,
  the saga's own account movements and the rejections of its commands into
  ``<app_id>-saga-inbox``, keyed by order id, in transactions of its own; what it
  cannot read goes to the inbox's dead-letter topic, as read.
- ``SagaHandler`` owns the inbox's partitions (in the command processor's group).
  Per message it reacts, and in one transaction sends the commands, writes the new
  state to the compacted ``<app_id>-saga-state`` topic (the saga's log, which its
  state is derived from) and commits the inbox offset. Deadlines fire from the same
  loop (``tick``), also inside a transaction, so a timeout acts once, and only once
  the inbox is read as far as it reached when it came due (an answer there first),
  and only for the orders of the partitions owned here.
- A Faust agent folds ``<app_id>-saga-state`` into the ``sagas`` table behind
  ``GET /sagas/{order_id}`` (routed to the key's owner).

The saga's commands carry the order's correlation id, so ``streamfold history
--correlation <id>`` (and ``/query/correlation/{id}``) show the whole flow across
aggregates. Each command's causation id is the event, result or timeout that
triggered it (listed in the history of ``/sagas/{order_id}``).

Settings (``app.settings``): ``STREAMFOLD_SAGA=on|off`` (off runs nothing: use it for
replays; the feed's group keeps its position and resumes there when switched back
on) and ``STREAMFOLD_SAGA_TIMEOUT`` (seconds to wait for the account, default 30).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confluent_kafka import Message

from app.adapters import mapper
from app.adapters.codec import Codec, DecodeError
from app.adapters.eventlog import partition_for
from app.adapters.logtail import LogTail, StateCache
from app.adapters.processor import TRANSIENT, Batch, Ownership, Reading
from app.adapters.saga_io import route
from app.adapters.topics import (
    TP,
    headers_of,
    inbox_topic,
    source_of,
    state_topic,
)
from app.application import saga
from app.client import frame_command, new_envelope
from app.deadletters import dead_letter_headers
from app.runtime import state_format
from app.settings import Settings

if TYPE_CHECKING:  # the write processes run the saga without importing Faust
    import faust

log = logging.getLogger("streamfold.saga")
# After the broker did not say where an inbox partition ends, how long its due
# deadlines wait before it is asked again.
END_RETRY_S = 5.0


class SagaFailed(RuntimeError):
    """The saga could not act on a message (a bug or an unreadable state): the
    message is dead-lettered, a deadline dropped; the processor goes on."""


class FeedHandler:
    """Routes what the saga follows into its inbox; stateless."""

    def __init__(self, settings: Settings, codec: Codec) -> None:
        self.settings, self.codec = settings, codec
        self.inbox = inbox_topic(settings)

    @property
    def topics(self) -> tuple[str, ...]:
        topics = self.settings.topics
        return (topics.events("orders"), topics.events("accounts"), topics.results)

    def handle(self, message: Message, batch: Batch) -> None:
        try:
            routed = route(self.codec, self.settings, message)
        except (DecodeError, mapper.MappingError, LookupError, TypeError) as error:
            # What the saga may have to act on is never skipped silently: an
            # operator re-drives it to where it was read, and the feed reads it
            # again (once its cause is fixed), or discards it.
            self.dead_letter(message, f"{type(error).__name__}: {error}", batch)
            return
        if routed is not None:
            key, value = routed
            batch.send(
                self.inbox,
                value,
                key=key,
                partition=partition_for(key, self.settings.partitions),
            )

    def dead_letter(self, message: Message, reason: str, batch: Batch) -> None:
        """``message`` as it was read, on the saga inbox's dead-letter topic, with
        where it was read: a re-drive puts the same record back there."""
        dead_letter(batch, f"{self.inbox}.dlq", message, reason)

    def prepare(self, partitions: set[TP]) -> None:
        return None

    def assigned(self, partitions: Sequence[TP]) -> None:
        return None

    def revoked(self, partitions: Sequence[TP]) -> None:
        return None

    def tick(self, batch: Batch) -> None:
        return None

    def committed(self) -> None:
        return None

    def aborted(self) -> None:
        return None


class SagaHandler:
    """Reacts to the inbox and to passed deadlines, one order at a time."""

    def __init__(self, settings: Settings, codec: Codec, cache_dir: Path) -> None:
        self.settings, self.codec = settings, codec
        self.inbox = inbox_topic(settings)
        self.log_topic = state_topic(settings)
        self.timeout = timedelta(seconds=settings.saga_timeout_s)
        # Tagged with the shape of SagaState: a cache written in another (by an
        # older release) is dropped and folded again from the log, not misread.
        self.cache = StateCache(cache_dir / "saga", state_format(saga.SagaState))
        self.tail = LogTail(settings, self._fold, name="saga-state")
        self.partitions = Ownership()
        # Partitions taken over whose deadlines are not indexed yet (an abort
        # leaves committed states, so their index, as they were).
        self._unindexed: set[int] = set()
        # Per owned order with a deadline: the deadline (from committed states).
        self.deadlines: dict[str, datetime] = {}
        self.pending: dict[str, saga.SagaState] = {}
        self._folded: dict[str, bytes] = {}
        # Per order whose deadline is due: where its inbox partition ended when
        # the deadline was found due (it fires once the inbox is read that far).
        self._due_ends: dict[str, int] = {}
        # Inbox partitions whose end the broker did not say, until when not to ask
        # again (the question blocks the processor's thread).
        self._end_unknown: dict[int, float] = {}

    @property
    def topics(self) -> tuple[str, ...]:
        return (self.inbox,)

    def assigned(self, partitions: Sequence[TP]) -> None:
        self._unindexed.update(self.partitions.take(partitions))

    def revoked(self, partitions: Sequence[TP]) -> None:
        for partition in self.partitions.give_up(partitions):
            self._unindexed.discard(partition)
            self.tail.drop([(self.log_topic, partition)])
        # States folded by a catch-up that failed are the next owner's now: left
        # here, the next catch-up would index their deadlines and fire them.
        self._folded = {o: raw for o, raw in self._folded.items() if self._owns(o)}
        self.deadlines = {o: due for o, due in self.deadlines.items() if self._owns(o)}

    def prepare(self, partitions: set[TP]) -> None:
        self._catch_up_stale()

    def handle(self, message: Message, batch: Batch) -> None:
        partition = message.partition() or 0
        try:
            incoming = saga.message_from_json(json.loads(message.value() or b""))
            if self._partition(incoming.order_id) != partition:
                raise ValueError(
                    f"order {incoming.order_id!r} on the wrong inbox partition"
                )
        except Exception as error:  # noqa: BLE001 - dead-lettered, never skipped silently
            self._dead_letter(message, f"{type(error).__name__}: {error}", batch)
            return
        try:
            self._react(incoming, batch)
        except SagaFailed as error:
            self._dead_letter(message, str(error), batch)

    def tick(self, batch: Batch) -> None:
        """Fire the deadlines that passed on the partitions owned here, each once
        its inbox partition is read as far as it reached when the deadline was
        found due: an answer that came before the deadline is acted on first (after
        an assignment or a rewind too, when the inbox may hold a backlog)."""
        now = datetime.now(UTC)
        due = self._due(now)
        self._due_ends = {o: end for o, end in self._due_ends.items() if o in due}
        ends: dict[int, int | None] = {}  # asked once a tick per partition
        for order_id, deadline in due.items():
            if not self._read_to_due_end(order_id, batch.reading, ends):
                continue
            with contextlib.suppress(SagaFailed):  # logged; its deadline dropped
                self._react(
                    saga.TimedOut(order_id=order_id, deadline=deadline, at=now), batch
                )

    def committed(self) -> None:
        if not self.pending:
            return
        self.cache.write(
            {},
            {
                order_id: json.dumps(saga.state_to_json(state)).encode()
                for order_id, state in self.pending.items()
            },
            {},
        )
        for order_id, state in self.pending.items():
            self._index(order_id, state)
        self.pending.clear()

    def aborted(self) -> None:
        self.pending.clear()
        self.partitions.doubt()

    def close(self) -> None:
        self.tail.close()
        self.cache.close()

    def _react(self, message: saga.Message, batch: Batch) -> None:
        order_id = message.order_id
        try:
            state = self._state(order_id)
            reaction = saga.react(state, message, timeout=self.timeout)
            framed = [
                frame_command(
                    self.settings,
                    self.codec,
                    out.command,
                    new_envelope(
                        command_id=out.command_id,
                        correlation_id=out.correlation_id,
                        causation_id=out.causation_id,
                        user_id=saga.ACTOR,
                        issued_at=out.issued_at,
                    ),
                )
                for out in reaction.commands
            ]
        except TRANSIENT:
            raise  # the batch is aborted and taken again
        except Exception as error:
            log.exception("saga of order %s cannot act on %r", order_id, message)
            self.deadlines.pop(order_id, None)
            raise SagaFailed(f"{type(error).__name__}: {error}") from error
        for command in framed:
            command.send_with(batch.send)
        if reaction.state is not None and reaction.state != state:
            self.pending[order_id] = reaction.state
            batch.send(
                self.log_topic,
                json.dumps(saga.state_to_json(reaction.state)).encode(),
                key=order_id.encode(),
                partition=self._partition(order_id),
            )
        elif isinstance(message, saga.TimedOut):
            # Nothing to do at this deadline (the state moved on): forget it.
            self.deadlines.pop(order_id, None)

    def _state(self, order_id: str) -> saga.SagaState | None:
        found = self.pending.get(order_id)
        if found is not None:
            return found
        raw = self._folded.get(order_id) or self.cache.get_raw(order_id)
        return None if raw is None else saga.state_from_json(json.loads(raw))

    def _index(self, order_id: str, state: saga.SagaState) -> None:
        # Only an owner fires a deadline: another process acts on the others.
        if state.deadline is None or state.settled or not self._owns(order_id):
            self.deadlines.pop(order_id, None)
        else:
            self.deadlines[order_id] = state.deadline

    def _due(self, now: datetime) -> dict[str, datetime]:
        """The passed deadlines of orders owned here and not acted on in this
        batch."""
        return {
            order_id: deadline
            for order_id, deadline in self.deadlines.items()
            if deadline <= now and order_id not in self.pending and self._owns(order_id)
        }

    def _read_to_due_end(
        self, order_id: str, reading: Reading, ends: dict[int, int | None]
    ) -> bool:
        """Whether the order's inbox partition is read up to where it ended when
        its deadline was found due (noted then; ``ends``: those asked this tick).
        A fixed offset: full batches hold a deadline back only as long as the
        backlog of that moment takes."""
        partition = self._partition(order_id)
        tp = (self.inbox, partition)
        position = reading.position(tp)
        if position is None:
            return False  # just assigned or rewound: nothing fetched yet
        if order_id not in self._due_ends:
            if time.monotonic() < self._end_unknown.get(partition, 0.0):
                return False
            if partition not in ends:
                ends[partition] = reading.end(tp)
            end = ends[partition]
            if end is None:
                self._end_unknown[partition] = time.monotonic() + END_RETRY_S
                return False
            self._due_ends[order_id] = end
        return position >= self._due_ends[order_id]

    def _partition(self, order_id: str) -> int:
        return partition_for(order_id.encode(), self.settings.partitions)

    def _owns(self, order_id: str) -> bool:
        return self._partition(order_id) in self.partitions.owned

    def _catch_up_stale(self) -> None:
        """Fold the log of partitions taken over (or after an abort) to its end. Only
        this handler writes the log, so it is read only then (and paused between):
        read back in order, its newest record for an order is the state."""
        stale = self.partitions.stale
        if not stale:
            return
        starts = {
            (self.log_topic, p): self.cache.offset((self.log_topic, p)) for p in stale
        }
        self.tail.follow(starts)
        self.tail.pause(starts)
        self._save_folded()
        if self._unindexed:
            # Deadlines of the partitions just taken over come from their states.
            for order_id, raw in self.cache.items():
                if (
                    not order_id.startswith("\x00")
                    and self._partition(order_id) in self._unindexed
                ):
                    self._index(order_id, saga.state_from_json(json.loads(raw)))
            self._unindexed.clear()
        stale.clear()

    def _fold(self, message: Message) -> None:
        key = message.key()
        if key is not None and message.value() is not None:
            order_id, raw = key.decode(), bytes(message.value() or b"")
            # Never backwards: a state with a shorter history is an older one.
            known = self._folded.get(order_id) or self.cache.get_raw(order_id)
            if known is not None and len(json.loads(known)["history"]) > len(
                json.loads(raw)["history"]
            ):
                return
            self._folded[order_id] = raw

    def _save_folded(self) -> None:
        offsets = dict(self.tail.offsets)
        if not self._folded:
            return
        self.cache.write({}, dict(self._folded), offsets)
        for order_id, raw in self._folded.items():
            self._index(order_id, saga.state_from_json(json.loads(raw)))
        self._folded.clear()

    def _dead_letter(self, message: Message, reason: str, batch: Batch) -> None:
        # The key is the order id: the console shows it, and re-drives an order's
        # messages together.
        dead_letter(batch, f"{self.inbox}.dlq", message, reason)


def dead_letter(batch: Batch, topic: str, message: Message, reason: str) -> None:
    """``message`` (key, value, headers) to dead-letter ``topic`` in ``batch``, with
    the headers that name its source and the reason (``app.deadletters``): a
    re-drive puts the record back where it was read, headers and all."""
    log.error(
        "saga dead-lettering %s[%d]@%d: %s",
        message.topic(),
        message.partition(),
        message.offset(),
        reason,
    )
    batch.send(
        topic,
        message.value(),
        key=message.key(),
        headers=dead_letter_headers(headers_of(message), source_of(message), reason),
    )


# Kept with each state in the saga view: the offset of the record it was folded
# from (not shown).
AT = "_offset"


def after_an_abort(shown: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """Whether ``new`` shows that ``shown`` came from a transaction that aborted:
    each committed state of an order's saga has a longer history than the one
    before it, so a new state no longer than the shown one, and not the same, was
    written after something that never committed (a fenced zombie's step)."""
    if shown is None or len(new["history"]) > len(shown["history"]):
        return False
    return new != {k: v for k, v in shown.items() if k != AT}


def register_view(app: faust.App, settings: Settings) -> Any:
    """The ``sagas`` table (folded from the saga's log) behind ``/sagas/{order_id}``;
    returns the table."""
    # Faust: in the worker's process only
    from agents.views import committed_values, raw_topic, routed

    sagas = app.Table("sagas", key_type=bytes, partitions=settings.partitions)
    source = raw_topic(app, state_topic(settings), settings.partitions)

    @app.agent(source, name="saga-views")
    async def saga_views(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            key, value, at = event.key, event.value, event.message.offset
            shown = sagas.get(key) if key is not None else None
            if key is None or value is None or at <= (shown or {}).get(AT, -1):
                continue  # read again after a restart: folded already
            state = json.loads(value)
            if after_an_abort(shown, state):
                state = await committed_state(event.message, key)
            if state is None:
                sagas.pop(key, None)
            else:
                sagas[key] = {**state, AT: at}

    async def committed_state(message: Any, key: bytes) -> Any:
        """The key's state as its last committed record up to ``message`` has it
        (Faust's consumer reads uncommitted records too)."""
        where = (message.topic, message.partition, message.offset)
        values = await committed_values(settings, where, key)
        log.warning(
            "saga view of %s rebuilt from %d committed records of %s[%d]",
            key.decode(errors="replace"),
            len(values),
            message.topic,
            message.partition,
        )
        return json.loads(values[-1]) if values else None

    @app.page("/sagas/{order_id}")
    @routed(app, sagas, "order_id")
    async def get_saga(web: Any, request: Any, order_id: str) -> Any:
        held = sagas.get(order_id.encode())
        if held is None:
            return web.json({"error": f"no saga for order {order_id}"}, status=404)
        raw = {k: v for k, v in held.items() if k != AT}
        return web.json({**raw, "settled": saga.state_from_json(raw).settled})

    return sagas
