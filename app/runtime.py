"""One aggregate type's command handling on the transactional processor: decode a
command, decide it on the aggregate's state, and add its events and result to the
batch's transaction, turning every failure into a rejection or a dead letter.

The state is derived from the event log: ``AggregateCache`` holds each aggregate's
state and version and the answer each command got, folded from the events and results topics
(``LogTail``) and cached in RocksDB with the offsets it reflects. A batch's decisions
stay provisional until its transaction commits; an abort drops them, and the
partitions are caught up from the log again before the next decision.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import time
import typing
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, Message

from app.adapters import mapper
from app.adapters.codec import COMMAND_ID_HEADER, Codec, DecodeError, Headers
from app.adapters.eventlog import (
    AGGREGATE_TYPE_HEADER,
    COMMAND_AT_HEADER,
    FINGERPRINT_HEADER,
    CommandAt,
    answered_at,
    encode_event,
    encode_result,
    fingerprint_in,
    format_at,
    kept_answer,
    metadata_from_record,
    parse_at,
    partition_for,
    result_headers,
    sent_answer,
)
from app.adapters.logtail import LogTail, StateCache
from app.adapters.processor import TRANSIENT, Batch, Ownership, Sent
from app.adapters.topics import (
    TP,
    headers_of,
    inbox_topic,
    read_range,
    reader,
    source_of,
    state_topic,
    topic_ids,
    watermarks,
)
from app.application.commands import (
    Aggregate,
    CommandService,
    Decision,
    Envelope,
    GapError,
    Position,
    Result,
    VersionedState,
    fold,
)
from app.deadletters import dead_letter_headers
from app.domain import accounts, orders
from app.settings import Settings

log = logging.getLogger("streamfold.worker")

ORDERS = Aggregate(type=orders.AGGREGATE_TYPE, decider=orders, id_field="order_id")
ACCOUNTS = Aggregate(
    type=accounts.AGGREGATE_TYPE, decider=accounts, id_field="account_id"
)
AGGREGATES = {"orders": ORDERS, "accounts": ACCOUNTS}
# On a command sent on from the partition it was produced to: "<partition>@<offset>".
REROUTED_HEADER = "streamfold-rerouted-from"
# States kept decoded in memory; the rest are read from RocksDB when needed.
MEMORY_STATES = 50_000
# Folded states and answers written to RocksDB at a time while a long log is
# caught up (bounds the memory a rebuild takes).
FOLD_CHUNK = 10_000
# States a snapshot writes per batch.
SNAPSHOT_CHUNK = 2_000
# A snapshot partition's record of the events offset its states reflect.
SNAPSHOT_MARKER = b"\x00snapshot-marker"
# The shape of the states a snapshot record holds (``state_format``).
FORMAT_HEADER = "streamfold-state-format"


# Beside a write process's cache: the ids of the topics it was filled from.
TOPICS_MARKER = "topics"


class TopicsChanged(RuntimeError):
    """A topic the cache was filled from was deleted and created again meanwhile."""


def cached_topics(settings: Settings) -> list[str]:
    """The topics a write process's cache folds: its states, answers, offsets."""
    names = [settings.topics.results]
    for area in AGGREGATES:
        names += [settings.topics.commands(area), settings.topics.events(area)]
    if settings.saga:
        names += [inbox_topic(settings), state_topic(settings)]
    return names


def cache_topic_ids(cache_dir: Path) -> dict[str, str]:
    """The topic ids noted beside a cache (none for a cache without the note)."""
    try:
        return dict(orjson.loads((cache_dir / TOPICS_MARKER).read_bytes()))
    except (OSError, orjson.JSONDecodeError, TypeError, ValueError):
        return {}


def drop_cache_of_other_topics(settings: Settings, cache_dir: Path) -> None:
    """Drop the cache unless the topics it was filled from are the ones there now
    (not deleted since, even if others were created under their names: a Kafka
    reset under a kept ``~/.streamfold``): their offsets start over, and its
    states, answers and offsets would be another log's. A cache without the note
    is dropped too (written before it, or by a drop cut short). It is rebuilt from
    the snapshots and the log."""
    ids = topic_ids(settings, cached_topics(settings))
    if cache_topic_ids(cache_dir) != ids and cache_dir.exists():
        if any(cache_dir.iterdir()):
            log.warning(
                "%s: not filled from the topics there now; rebuilding it", cache_dir
            )
        # Out of the way at once, then deleted: a process killed meanwhile leaves
        # no half-deleted cache under the cache's name.
        doomed = cache_dir.with_name(cache_dir.name + ".dropped")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(cache_dir, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    written = cache_dir / (TOPICS_MARKER + ".new")
    written.write_bytes(orjson.dumps(ids))
    os.replace(written, cache_dir / TOPICS_MARKER)


def state_format(cls: type) -> str:
    """A short name for the shape of a state dataclass (field names and types, all
    the way down): cached or snapshot states of another shape are not read."""

    def shape(kind: Any) -> Any:
        if dataclasses.is_dataclass(kind) and isinstance(kind, type):
            hints = typing.get_type_hints(kind)
            return [(f.name, shape(hints[f.name])) for f in dataclasses.fields(kind)]
        arguments = typing.get_args(kind)
        if arguments:
            return [repr(typing.get_origin(kind)), [shape(a) for a in arguments]]
        return repr(kind)

    return hashlib.sha256(orjson.dumps(shape(cls))).hexdigest()[:16]


class AggregateCache:
    """Versioned states by aggregate id and answers (the result as sent) by command
    id: the committed ones in memory and RocksDB, a batch's in ``pending`` until it
    commits."""

    def __init__(
        self, cache: StateCache, aggregate: Aggregate, partitions: int
    ) -> None:
        self.cache = cache
        self.partitions = partitions
        self.state_type = type(aggregate.initial_state())
        self.memory: OrderedDict[str, VersionedState] = OrderedDict()
        self.pending: dict[str, VersionedState] = {}
        self.pending_answers: dict[str, bytes] = {}

    # The port CommandService uses.
    def load(self, aggregate_id: str) -> VersionedState | None:
        found = self.pending.get(aggregate_id)
        return found if found is not None else self.committed(aggregate_id)

    def save(self, aggregate_id: str, versioned: VersionedState) -> None:
        self.pending[aggregate_id] = versioned

    def answered(self, command_id: str) -> bytes | None:
        found = self.pending_answers.get(command_id)
        return found if found is not None else self.cache.get_raw(_answer(command_id))

    # The processor's side.
    def committed(self, aggregate_id: str) -> VersionedState | None:
        found = self.memory.get(aggregate_id)
        if found is not None:
            self.memory.move_to_end(aggregate_id)
            return found
        raw = self.cache.get(_state_key(aggregate_id))
        if not isinstance(raw, dict):
            return None
        found = VersionedState(
            state=mapper.from_dict(self.state_type, raw["state"]),
            version=raw["version"],
        )
        self._remember(aggregate_id, found)
        return found

    def remember_answer(self, command_id: str, value: bytes) -> None:
        self.pending_answers[command_id] = value

    def commit(
        self, snapshotted: Iterable[str] = (), taken: dict[TP, int] | None = None
    ) -> None:
        """Make the pending states and answers committed (the batch's transaction
        did), the states ``snapshotted`` clean, and note the input offsets ``taken``
        (the next one of each partition)."""
        self.write(self.pending, self.pending_answers, taken or {}, snapshotted)
        self.drop()

    def write(
        self,
        states: dict[str, VersionedState],
        answers: dict[str, bytes],
        offsets: dict[TP, int],
        snapshotted: Iterable[str] = (),
    ) -> None:
        """Write states and answers as committed, with the log offsets they now
        reflect, in one RocksDB batch. Each state written is marked dirty (to be
        snapshotted) under its partition; the ``snapshotted`` marks go first."""
        clean = list(snapshotted)
        if not states and not answers and not offsets and not clean:
            return
        dirty = {self.dirty_key(aggregate_id): b"" for aggregate_id in states}
        self.cache.write(
            {
                _state_key(aggregate_id): {
                    "state": mapper.to_dict(versioned.state),
                    "version": versioned.version,
                }
                for aggregate_id, versioned in states.items()
            },
            {**{_answer(c): value for c, value in answers.items()}, **dirty},
            offsets,
            clean,
        )
        for aggregate_id, versioned in states.items():
            self._remember(aggregate_id, versioned)

    def drop(self) -> None:
        self.pending.clear()
        self.pending_answers.clear()

    def dirty_key(self, aggregate_id: str) -> str:
        return f"{dirty_prefix(partition_for(aggregate_id.encode(), self.partitions))}{aggregate_id}"

    def dirty(self, partition: int, limit: int) -> list[str]:
        """Up to ``limit`` marks of the partition's states changed since they were
        last snapshotted."""
        return self.cache.keys(dirty_prefix(partition), limit)

    def restore(self, states: dict[str, bytes]) -> None:
        """States as a snapshot holds them (the cache's own encoding): committed,
        and clean."""
        self.cache.write({}, {_state_key(a): raw for a, raw in states.items()}, {})
        for aggregate_id in states:
            self.memory.pop(aggregate_id, None)

    def _remember(self, aggregate_id: str, versioned: VersionedState) -> None:
        self.memory[aggregate_id] = versioned
        self.memory.move_to_end(aggregate_id)
        while len(self.memory) > MEMORY_STATES:
            self.memory.popitem(last=False)


def _state_key(aggregate_id: str) -> str:
    return f"r/{aggregate_id}"


def _answer(command_id: str) -> str:
    return f"a/{command_id}"


def dirty_prefix(partition: int) -> str:
    return f"d/{partition}/"


def envelope_from_record(record: dict[str, Any]) -> Envelope:
    return mapper.from_dict(
        Envelope, {**record, "issued_at": mapper.utc(record["issued_at"])}
    )


@dataclass(frozen=True, slots=True)
class Parsed:
    """A decoded command: its envelope and the command."""

    envelope: Envelope
    command: Any


class CommandHandler:
    """The single writer of one aggregate type's partitions while it owns them."""

    def __init__(
        self, settings: Settings, area: str, codec: Codec, cache_dir: Path
    ) -> None:
        self.settings = settings
        self.aggregate = AGGREGATES[area]
        self.codec = codec
        self.commands_topic = settings.topics.commands(area)
        self.events_topic = settings.topics.events(area)
        self.results_topic = settings.topics.results
        self.snapshots_topic = settings.topics.snapshots(area)
        self.format = state_format(type(self.aggregate.initial_state()))
        self.store = AggregateCache(
            StateCache(cache_dir / area, self.format),
            self.aggregate,
            settings.partitions,
        )
        self.service = CommandService(aggregate=self.aggregate, store=self.store)
        self.tail = LogTail(settings, self._fold, name=f"{area}-state")
        self.partitions = Ownership()
        # Command ids decided in this batch whose answers wait for their events.
        self._deciding: set[str] = set()
        # Per command partition, the offset after the last record taken (decided,
        # answered again, dead-lettered or sent on) in a committed batch: records
        # before it are taken again only when the group's offsets went back, and
        # write nothing. ``_taking``: this batch's. ``_checked``: partitions whose
        # topic was seen to be the one the cache was filled from, since assigned.
        self._through: dict[int, int] = {}
        self._taking: dict[int, int] = {}
        self._checked: set[int] = set()
        # The commands topic's id as noted beside the cache when the process started
        # (``drop_cache_of_other_topics``); None: no note, the mark is not trusted.
        self._noted_id = cache_topic_ids(cache_dir).get(self.commands_topic)
        # What the tail folded and is not written yet.
        self._folded: set[TP] = set()
        self._folded_states: dict[str, VersionedState] = {}
        self._folded_answers: dict[str, bytes] = {}
        # Snapshots: per partition in a round, the events offset its states
        # reflect; what this batch writes of them.
        self._next_snapshot = time.monotonic() + settings.snapshot_interval_s
        self._rounds: dict[int, int] = {}
        self._snapshotted: list[str] = []
        self._completed: set[int] = set()
        self.stats = {
            "snapshot_states": 0,
            "snapshots": 0,
            "restored_states": 0,
            "taken_again": 0,
            "answered_before": 0,
        }

    @property
    def topics(self) -> tuple[str, ...]:
        return (self.commands_topic,)

    # Rebalances.
    def assigned(self, partitions: Sequence[TP]) -> None:
        self.partitions.take(partitions)
        for _, partition in partitions:
            self._pass(partition, self.store.cache.offset(self._input(partition)))
            self._checked.discard(partition)

    def revoked(self, partitions: Sequence[TP]) -> None:
        for partition in self.partitions.give_up(partitions):
            self.tail.drop(self._logs(partition))

    # Batches.
    def prepare(self, partitions: set[TP]) -> None:
        """Before a batch: fold what others appended, and catch up the partitions
        taken over (or left uncertain by an abort)."""
        self._fold_tail()
        # Every partition in doubt, once one in the batch is: their reads to the end
        # overlap, instead of one catch-up per batch as the partitions' first
        # commands trickle in.
        held = {p for _, p in partitions}
        stale = sorted(self.partitions.stale) if held & self.partitions.stale else []
        unknown = [p for p in stale if not self.store.cache.known(self._logs(p)[0])]
        if unknown:
            self._restore(unknown)
        if stale:
            self._catch_up(stale)

    def handle(self, message: Message, batch: Batch) -> None:
        partition, offset = message.partition() or 0, message.offset() or 0
        if offset < self._through.get(partition, 0) and self._same_topic(partition):
            self.stats["taken_again"] += 1
            return
        self._taking[partition] = offset + 1
        try:
            parsed = self._parse(message, batch)
            if parsed is not None:
                self._decide(message, parsed, batch)
        except TRANSIENT:
            raise  # the batch is aborted and taken again
        except Exception as error:
            log.exception("dead-lettering %s", _where(message))
            self.dead_letter(
                message, f"internal error: {type(error).__name__}: {error}", batch
            )

    def tick(self, batch: Batch) -> None:
        """Snapshot what changed, a chunk per batch: every ``snapshot_interval_s`` a
        round starts on each partition owned, noting the events offset the states
        already reflect; it writes the state of every aggregate changed since its
        last snapshot, then that offset (the marker). A store rebuilt from the
        snapshot topic folds the events from the latest marker on."""
        interval = self.settings.snapshot_interval_s
        if interval <= 0:
            return
        current = self.partitions.owned - self.partitions.stale
        if not self._rounds and time.monotonic() >= self._next_snapshot:
            self._next_snapshot = time.monotonic() + interval
            for partition in current:
                tp = (self.events_topic, partition)
                if tp in self.tail.offsets:
                    self._rounds[partition] = self.tail.offsets[tp]
        for partition, offset in list(self._rounds.items()):
            if partition not in current:
                del self._rounds[partition]  # another writer took it
                continue
            marks = self.store.dirty(partition, SNAPSHOT_CHUNK)
            prefix = len(dirty_prefix(partition))
            for mark in marks:
                aggregate_id = mark[prefix:]
                value = self.store.cache.get_raw(_state_key(aggregate_id))
                if value is not None:
                    self._snapshot(batch, aggregate_id.encode(), value, partition)
                self._snapshotted.append(mark)
            if len(marks) < SNAPSHOT_CHUNK:
                marker = orjson.dumps({"events_offset": offset})
                self._snapshot(batch, SNAPSHOT_MARKER, marker, partition)
                self._completed.add(partition)
            return  # one partition's chunk per batch

    def _snapshot(self, batch: Batch, key: bytes, value: bytes, partition: int) -> None:
        batch.send(
            self.snapshots_topic,
            value,
            key=key,
            partition=partition,
            headers=[(FORMAT_HEADER, self.format.encode())],
        )

    def committed(self) -> None:
        taken = {self._input(p): offset for p, offset in self._taking.items()}
        self.store.commit(self._snapshotted, taken)
        for partition, offset in self._taking.items():
            self._pass(partition, offset)
        self._taking.clear()
        self.stats["snapshot_states"] += len(self._snapshotted)
        self.stats["snapshots"] += len(self._completed)
        for partition in self._completed:
            self._rounds.pop(partition, None)
        self._snapshotted.clear()
        self._completed.clear()
        self._deciding.clear()

    def aborted(self) -> None:
        self.store.drop()
        self._taking.clear()
        self._snapshotted.clear()
        self._completed.clear()
        self._deciding.clear()
        self.partitions.doubt()

    def close(self) -> None:
        self.tail.close()
        self.store.cache.close()

    # The log.
    def _input(self, partition: int) -> TP:
        return (self.commands_topic, partition)

    def _same_topic(self, partition: int) -> bool:
        """Whether the commands topic is still the one whose offsets the cache
        noted, checked once a partition's records are first taken for taken
        before since it was assigned: a topic deleted and created again under its
        name while the process ran starts its offsets over, and the process ends
        (``TopicsChanged``), to start again on a cache dropped for it
        (``writer``)."""
        if partition in self._checked:
            return True
        if self._noted_id is None:
            return False
        now = topic_ids(self.settings, [self.commands_topic], timeout=30.0)
        if now.get(self.commands_topic) != self._noted_id:
            raise TopicsChanged(
                f"{self.commands_topic} was deleted and created again "
                f"(topic id {self._noted_id}, now {now.get(self.commands_topic)})"
            )
        self._checked.add(partition)
        return True

    def _pass(self, partition: int, offset: int) -> None:
        """Records of ``partition`` before ``offset`` were taken (in order)."""
        if offset > self._through.get(partition, 0):
            self._through[partition] = offset

    def _logs(self, partition: int) -> list[TP]:
        return [(self.events_topic, partition), (self.results_topic, partition)]

    def _catch_up(self, partitions: list[int]) -> None:
        """Fold the partitions' logs to their ends, all at once: their waits for
        the end (and for a transaction the broker is still aborting) overlap."""
        began = time.monotonic()
        logs = [tp for partition in partitions for tp in self._logs(partition)]
        self.tail.follow({tp: self.store.cache.offset(tp) for tp in logs})
        log.info(
            "%s%s: caught up with the log in %.2fs",
            self.events_topic,
            partitions,
            time.monotonic() - began,
        )
        # Known from now on, also when the logs were empty.
        self._folded.update(logs)
        # Only this writer answers its partition's commands while it owns it: the
        # results are read again at the next catch-up, events (which others may
        # append) before every batch.
        self.tail.pause([(self.results_topic, partition) for partition in partitions])
        self._save_folded()
        self.partitions.stale.difference_update(partitions)

    def _restore(self, partitions: list[int]) -> None:
        """Fill a store that never held ``partitions`` from their snapshots: the
        latest state of each aggregate there, and the events offset of each one's
        latest marker (the catch-up folds the events from there). States of another
        shape are left out (folded from the log instead). One reader serves them
        all: setting one up costs more than reading a short partition."""
        consumer = reader(self.settings, "snapshot-restore")
        try:
            for partition in partitions:
                self._restore_partition(consumer, partition)
        finally:
            consumer.close()

    def _restore_partition(self, consumer: Consumer, partition: int) -> None:
        low, high = watermarks(consumer, self.snapshots_topic, partition)
        marker = None
        chunk: dict[str, bytes] = {}
        restored = 0
        for message in read_range(consumer, self.snapshots_topic, partition, low, high):
            found = dict(headers_of(message))
            if found.get(FORMAT_HEADER) != self.format.encode():
                continue
            key, value = message.key() or b"", message.value() or b""
            if key == SNAPSHOT_MARKER:
                marker = int(orjson.loads(value)["events_offset"])
                continue
            chunk[key.decode()] = value
            if len(chunk) >= FOLD_CHUNK:
                restored += len(chunk)
                self.store.restore(chunk)
                chunk = {}
        restored += len(chunk)
        self.store.restore(chunk)
        if marker is not None:
            self.store.cache.write({}, {}, {self._logs(partition)[0]: marker})
        self.stats["restored_states"] += restored
        log.info(
            "%s[%d]: %d states restored from snapshots; events folded from %s",
            self.snapshots_topic,
            partition,
            restored,
            marker or 0,
        )

    def _fold_tail(self) -> None:
        if self.tail.poll():
            self._save_folded()

    def _save_folded(self) -> None:
        offsets = {tp: self.tail.offsets[tp] for tp in self._folded}
        self.store.write(self._folded_states, self._folded_answers, offsets)
        self._folded.clear()
        self._folded_states.clear()
        self._folded_answers.clear()

    def _fold(self, message: Message) -> None:
        """Fold one record of the log into the committed state: an event someone
        appended (or this writer's own, already reflected: skipped undecoded), or
        a result, whose answer a repeated command id gets again."""
        topic = message.topic() or ""
        tp = (topic, message.partition() or 0)
        self._folded.add(tp)
        found = dict(headers_of(message))
        if topic == self.results_topic:
            kind = found.get(AGGREGATE_TYPE_HEADER)
            command_id = message.key()
            if kind in (None, self.aggregate.type.encode()) and command_id:
                key = command_id.decode()
                at = parse_at(found.get(COMMAND_AT_HEADER))
                kept = self._folded_answers.get(key) or self.store.answered(key)
                if kept is None or (at is not None and _later(at, kept)):
                    self._folded_answers[key] = kept_answer(
                        message.value() or b"", fingerprint_in(found), at
                    )
                    if len(self._folded_answers) >= FOLD_CHUNK:
                        self._save_folded()
            return
        aggregate_id = found.get("aggregate-id")
        version = found.get("stream-version")
        if aggregate_id is not None and version is not None:
            known = self._folded_state(aggregate_id.decode())
            if known is not None and known.version >= int(version):
                return
        try:
            decoded = self.codec.decode(message.value() or b"")
            meta, payload = mapper.split_event(decoded.data)
            metadata = metadata_from_record(meta)
            event: object = mapper.from_dict(
                self.codec.catalog.class_for(decoded.record_name), payload
            )
            versioned = self._folded_state(metadata.aggregate_id) or VersionedState(
                state=self.aggregate.initial_state()
            )
            self._folded_states[metadata.aggregate_id] = fold(
                self.aggregate, versioned, metadata, event
            )
        except (DecodeError, mapper.MappingError, LookupError, GapError) as error:
            # Readers dead-letter such an event; the writer cannot fold it either.
            log.error("%s: event not folded: %s", _where(message), error)
        if len(self._folded_states) >= FOLD_CHUNK:
            # The offsets saved stop before this record: folded again after a
            # crash, it is skipped (its version is in the state saved).
            self._save_folded()

    def _folded_state(self, aggregate_id: str) -> VersionedState | None:
        found = self._folded_states.get(aggregate_id)
        return found if found is not None else self.store.committed(aggregate_id)

    # Deciding.
    def _parse(self, message: Message, batch: Batch) -> Parsed | None:
        """The command and its envelope, or None once ``message`` is dead-lettered
        or rejected as invalid."""
        value = message.value()
        if value is None:
            self.dead_letter(message, "empty message (no value)", batch)
            return None
        if len(value) > self.settings.max_message_bytes:
            self.dead_letter(
                message,
                f"message of {len(value)} bytes exceeds the limit of "
                f"{self.settings.max_message_bytes} (STREAMFOLD_MAX_MESSAGE_BYTES)",
                batch,
            )
            return None
        try:
            decoded = self.codec.decode(value)
        except DecodeError as error:
            self.dead_letter(message, f"undecodable command: {error.reason}", batch)
            return None
        try:
            cls = self.codec.catalog.class_for(decoded.record_name)
            envelope_data, payload = mapper.split_command(decoded.data)
            envelope = envelope_from_record(envelope_data)
        except (LookupError, mapper.MappingError) as error:
            self.dead_letter(
                message,
                f"{decoded.record_name} is not a command of {self.aggregate.type}: "
                f"{error}",
                batch,
            )
            return None
        if cls not in self.aggregate.decider.COMMANDS:
            self.dead_letter(
                message,
                f"{decoded.record_name} is not a {self.aggregate.type} command",
                batch,
            )
            return None
        try:
            command: object = mapper.from_dict(cls, payload)
        except mapper.MappingError as error:
            refused = self.service.refuse(
                envelope, _key(message), "Validation", str(error), error.path
            )
            self._emit(
                refused,
                envelope.command_id,
                message.partition() or 0,
                command_at(message),
                batch,
            )
            return None
        return Parsed(envelope, command)

    def _decide(self, message: Message, parsed: Parsed, batch: Batch) -> None:
        aggregate_id = self.aggregate.aggregate_id(parsed.command)
        home = partition_for(aggregate_id.encode(), self.settings.partitions)
        if home != message.partition():
            self.reroute(message, aggregate_id, home, batch)
            return
        command_id = parsed.envelope.command_id
        at = command_at(message)
        if command_id in self._deciding:
            # Decided earlier in this batch; its answer exists once its events are
            # acknowledged.
            batch.later(
                lambda: self._resend(
                    self.store.answered(command_id), command_id, home, at, batch
                )
            )
            return
        decision = self.service.decide(
            parsed.envelope, parsed.command, mapper.fingerprint(parsed.command)
        )
        self._emit(decision, command_id, home, at, batch)

    def _emit(
        self,
        decision: Decision,
        command_id: str,
        partition: int,
        at: CommandAt,
        batch: Batch,
    ) -> None:
        """A decision's outputs: the answer given before, a rejection, or the
        events and then (once they are acknowledged) the result naming them.
        ``at`` is the command record decided on."""
        result = decision.result
        if result is None:
            self._resend(decision.repeat, command_id, partition, at, batch)
            return
        if not decision.events:
            self._answer(result, partition, at, batch)
            return
        encoded = [
            encode_event(self.codec, self.events_topic, new) for new in decision.events
        ]
        # Only once every event is encoded: the state must not hold events that
        # could not be written.
        self.service.apply(decision)
        self._deciding.add(command_id)
        sent = self._append(decision.aggregate_id, encoded, partition, batch)

        def answer() -> None:
            last = sent[-1]
            position = Position(partition=last.partition, offset=last.offset)
            self._answer(replace(result, position=position), partition, at, batch)

        batch.later(answer)

    def _resend(
        self,
        answer: bytes | None,
        command_id: str,
        partition: int,
        at: CommandAt,
        batch: Batch,
    ) -> None:
        """The same answer again, for a command id sent again; nothing for a command
        record answered already, taken again because the group's offsets went back
        (an operator's reset, or offsets a hanging transaction held, see
        ``Processor``) past what ``_through`` knows (a store rebuilt from the log,
        or another process's): records of a partition are decided in order, so one
        at or before the last record answered has its answer."""
        assert answer is not None, f"no answer kept for command {command_id!r}"
        if not _later(at, answer):
            self.stats["answered_before"] += 1
            return
        value, fingerprint = sent_answer(answer)
        self.store.remember_answer(command_id, kept_answer(value, fingerprint, at))
        headers: Headers = [
            (COMMAND_ID_HEADER, command_id.encode()),
            (AGGREGATE_TYPE_HEADER, self.aggregate.type.encode()),
            (COMMAND_AT_HEADER, format_at(at)),
        ]
        if fingerprint is not None:
            headers.append((FINGERPRINT_HEADER, fingerprint.encode()))
        batch.send(
            self.results_topic,
            value,
            key=command_id.encode(),
            partition=partition,
            headers=headers,
        )

    def _append(
        self,
        aggregate_id: str,
        encoded: list[tuple[bytes, Headers, int]],
        partition: int,
        batch: Batch,
    ) -> list[Sent]:
        key = aggregate_id.encode()
        sent = []
        for value, found, timestamp_ms in encoded:
            tracked = batch.send(
                self.events_topic,
                value,
                key=key,
                partition=partition,
                headers=found,
                timestamp_ms=timestamp_ms,
                track=True,
            )
            assert tracked is not None
            sent.append(tracked)
        return sent

    def _answer(
        self, result: Result, partition: int, at: CommandAt, batch: Batch
    ) -> None:
        value = encode_result(self.codec, self.results_topic, result)
        self.store.remember_answer(
            result.command_id, kept_answer(value, result.fingerprint, at)
        )
        batch.send(
            self.results_topic,
            value,
            key=result.command_id.encode(),
            partition=partition,
            headers=[*result_headers(result), (COMMAND_AT_HEADER, format_at(at))],
        )

    def reroute(
        self, message: Message, aggregate_id: str, home: int, batch: Batch
    ) -> None:
        """A command on another partition than its aggregate's (its producer did not
        hash the aggregate id with murmur2) would be decided against a state that is
        not its aggregate's: it is sent on, unchanged, to the partition that owns the
        aggregate, keyed by the aggregate id and saying where it came from, in the
        same transaction. An aggregate's commands keep their order when its producer
        keys them by aggregate id."""
        headers = [
            *(message.headers() or []),
            (REROUTED_HEADER, f"{message.partition()}@{message.offset()}".encode()),
        ]
        batch.send(
            self.commands_topic,
            message.value(),
            key=aggregate_id.encode(),
            partition=home,
            headers=headers,
        )
        log.info(
            "re-routing %s to partition %d, which owns %s %s",
            _where(message),
            home,
            self.aggregate.type,
            aggregate_id,
        )

    def dead_letter(self, message: Message, reason: str, batch: Batch) -> None:
        """Keep the original bytes and say where they came from and why."""
        topic = message.topic() or ""
        batch.send(
            self.settings.topics.dead_letter(topic),
            message.value(),
            key=message.key(),
            headers=dead_letter_headers(
                headers_of(message), source_of(message), reason
            ),
        )
        log.warning("dead-lettering %s: %s", _where(message), reason)


def command_at(message: Message) -> CommandAt:
    """The command record ``message`` is: where it was produced (where it came from,
    for one the writer sent on from another partition)."""
    here = message.partition() or 0
    for name, value in headers_of(message):
        if name == REROUTED_HEADER:
            found = parse_at(value)
            # Only the writer sends a record on, and only to another partition.
            if found is not None and found[0] != here:
                return found
    return here, message.offset() or 0


def _later(at: CommandAt, kept: bytes) -> bool:
    """Whether the command record ``at`` comes after the last one the kept answer
    answered (a kept answer that names none, or one on another partition: yes)."""
    last = answered_at(kept)
    return last is None or last[0] != at[0] or at[1] > last[1]


def _key(message: Message) -> str:
    return (message.key() or b"").decode(errors="replace")


def _where(message: Message) -> str:
    return f"{message.topic()}[{message.partition()}]@{message.offset()}"
