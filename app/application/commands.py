"""Command handling: load → check → decide → append, with no broker or SQL in sight.

The single writer for a partition calls ``CommandService.execute`` once per command,
in order. Optimistic concurrency and idempotency live here because Kafka offers
neither: the service knows each aggregate's version and the commands it has answered.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from types import ModuleType
from typing import Any, Protocol

from app.domain.errors import DomainError

# Commands remembered per aggregate for de-duplication beyond what the event log
# records (rejections). Accepted commands are always recoverable from the log itself.
RECENT_COMMANDS = 64
EVENT_ID_NAMESPACE = uuid.UUID("5f0ad1c0-57e4-4e6f-9a0b-2f4c8d1b7e10")
CONCURRENCY_CONFLICT = "ConcurrencyConflict"


@dataclass(frozen=True, slots=True, kw_only=True)
class Envelope:
    """What travels with every command besides its payload."""

    command_id: str
    correlation_id: str
    causation_id: str
    user_id: str | None
    issued_at: datetime
    expected_version: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Aggregate:
    """One aggregate type: its name, its decider, and how to find a command's target."""

    type: str
    decider: ModuleType
    id_field: str

    def initial_state(self) -> Any:
        return self.decider.initial_state()

    def decide(self, state: Any, command: Any) -> tuple[Any, ...]:
        return tuple(self.decider.decide(state, command))

    def evolve(self, state: Any, event: Any) -> Any:
        return self.decider.evolve(state, event)

    def aggregate_id(self, command: Any) -> str:
        return str(getattr(command, self.id_field))


@dataclass(frozen=True, slots=True, kw_only=True)
class Metadata:
    event_id: str
    event_type: str
    aggregate_type: str
    aggregate_id: str
    stream_version: int
    timestamp: datetime
    user_id: str | None
    correlation_id: str
    causation_id: str
    command_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class NewEvent:
    metadata: Metadata
    event: Any


@dataclass(frozen=True, slots=True, kw_only=True)
class Position:
    partition: int
    offset: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    """The one answer a command gets on ``command-results``."""

    command_id: str
    aggregate_type: str
    aggregate_id: str
    accepted: bool
    correlation_id: str
    version: int | None = None
    event_ids: tuple[str, ...] = ()
    position: Position | None = None
    code: str | None = None
    message: str | None = None
    field: str | None = None

    @classmethod
    def rejected(
        cls,
        envelope: Envelope,
        aggregate: Aggregate,
        aggregate_id: str,
        code: str,
        message: str,
        field: str | None = None,
    ) -> Result:
        return cls(
            command_id=envelope.command_id,
            aggregate_type=aggregate.type,
            aggregate_id=aggregate_id,
            accepted=False,
            correlation_id=envelope.correlation_id,
            code=code,
            message=message,
            field=field,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Record:
    """What the single writer keeps per aggregate: state, version, recent answers."""

    state: Any
    version: int = 0
    recent: Mapping[str, Result] = field(default_factory=dict)

    def remember(self, result: Result) -> Record:
        recent = dict(self.recent)
        recent[result.command_id] = result
        while len(recent) > RECENT_COMMANDS:
            recent.pop(next(iter(recent)))
        return replace(self, recent=recent)


class AggregateStore(Protocol):
    """Where the writer keeps its records (a Faust table in the worker)."""

    def load(self, aggregate_id: str) -> Record | None: ...
    def save(self, aggregate_id: str, record: Record) -> None: ...


class EventLog(Protocol):
    """The event store: appends are acknowledged by the broker before they return."""

    async def append(
        self, partition: int, aggregate_id: str, events: Sequence[NewEvent]
    ) -> list[Position]: ...


def event_id(
    aggregate_type: str, aggregate_id: str, stream_version: int, command_id: str
) -> str:
    """Deterministic, so an event re-emitted after a crash is recognisably the same."""
    name = f"{aggregate_type}/{aggregate_id}/{stream_version}/{command_id}"
    return str(uuid.uuid5(EVENT_ID_NAMESPACE, name))


def fold(
    aggregate: Aggregate, record: Record, metadata: Metadata, event: Any
) -> Record:
    """Apply one stored event; a repeat of a version already applied changes nothing."""
    if metadata.stream_version <= record.version:
        return record
    if metadata.stream_version != record.version + 1:
        raise GapError(
            f"{aggregate.type} {metadata.aggregate_id}: event at version "
            f"{metadata.stream_version} follows version {record.version}"
        )
    return replace(
        record,
        state=aggregate.evolve(record.state, event),
        version=metadata.stream_version,
    )


class GapError(RuntimeError):
    """The event log skips a version: a broken promise, never silently folded over."""


@dataclass(slots=True)
class CommandService:
    aggregate: Aggregate
    store: AggregateStore
    log: EventLog

    def record(self, aggregate_id: str) -> Record:
        found = self.store.load(aggregate_id)
        return (
            found if found is not None else Record(state=self.aggregate.initial_state())
        )

    async def execute(self, partition: int, envelope: Envelope, command: Any) -> Result:
        aggregate = self.aggregate
        aggregate_id = aggregate.aggregate_id(command)
        record = self.record(aggregate_id)
        previous = record.recent.get(envelope.command_id)
        if previous is not None:
            return previous
        expected = envelope.expected_version
        if expected is not None and expected != record.version:
            result = Result.rejected(
                envelope,
                aggregate,
                aggregate_id,
                CONCURRENCY_CONFLICT,
                f"expected version {expected}, but {aggregate.type} {aggregate_id} "
                f"is at version {record.version}",
                "expected_version",
            )
            self.store.save(aggregate_id, record.remember(result))
            return result
        try:
            events = aggregate.decide(record.state, command)
        except DomainError as error:
            result = Result.rejected(
                envelope,
                aggregate,
                aggregate_id,
                error.code,
                error.message,
                error.field,
            )
            self.store.save(aggregate_id, record.remember(result))
            return result
        stamped = [
            NewEvent(
                metadata=self._metadata(
                    envelope, aggregate_id, record.version + index, event
                ),
                event=event,
            )
            for index, event in enumerate(events, start=1)
        ]
        # The append is acknowledged before the state moves: the state may lag the
        # log after a crash (and catches up from it), but it never runs ahead of it.
        positions = await self.log.append(partition, aggregate_id, stamped)
        for new in stamped:
            record = fold(aggregate, record, new.metadata, new.event)
        result = Result(
            command_id=envelope.command_id,
            aggregate_type=aggregate.type,
            aggregate_id=aggregate_id,
            accepted=True,
            correlation_id=envelope.correlation_id,
            version=record.version,
            event_ids=tuple(new.metadata.event_id for new in stamped),
            position=positions[-1] if positions else None,
        )
        self.store.save(aggregate_id, record.remember(result))
        return result

    def _metadata(
        self, envelope: Envelope, aggregate_id: str, version: int, event: Any
    ) -> Metadata:
        return Metadata(
            event_id=event_id(
                self.aggregate.type, aggregate_id, version, envelope.command_id
            ),
            event_type=type(event).__name__,
            aggregate_type=self.aggregate.type,
            aggregate_id=aggregate_id,
            stream_version=version,
            timestamp=envelope.issued_at,
            user_id=envelope.user_id,
            correlation_id=envelope.correlation_id,
            causation_id=envelope.command_id,
            command_id=envelope.command_id,
        )

    def replay(self, metadata: Metadata, event: Any, position: Position) -> None:
        """Fold one event read back from the log into the store (recovery)."""
        record = self.record(metadata.aggregate_id)
        folded = fold(self.aggregate, record, metadata, event)
        if folded is record:
            return
        # An accepted command is recognisable from its last event, so a command
        # re-sent after a crash is answered from the log instead of decided again.
        previous = folded.recent.get(metadata.command_id)
        event_ids = previous.event_ids if previous and previous.accepted else ()
        result = Result(
            command_id=metadata.command_id,
            aggregate_type=self.aggregate.type,
            aggregate_id=metadata.aggregate_id,
            accepted=True,
            correlation_id=metadata.correlation_id,
            version=folded.version,
            event_ids=(*event_ids, metadata.event_id),
            position=position,
        )
        self.store.save(metadata.aggregate_id, folded.remember(result))
