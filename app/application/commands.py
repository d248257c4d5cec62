"""Command handling: load → check → decide, then save once the events are durable,
with no broker or SQL in sight.

The single writer for a partition calls ``CommandService.decide`` once per command,
in order, then ``apply`` for a decision with events, and appends them; its store
makes the change its own only once they are durable. Optimistic concurrency and idempotency live here because Kafka
offers neither: the service knows each aggregate's version and the commands it has
answered.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import datetime
from types import ModuleType
from typing import Any, Protocol

from app.domain.errors import MAX_REFERENCE_LENGTH, DomainError, require_id

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

    def check(self) -> None:
        """``DomainError`` (VALIDATION) naming the first of its ids that is not
        one (see ``require_id``; up to ``MAX_REFERENCE_LENGTH`` characters): they
        go into every event's metadata."""
        ids = {
            "command_id": self.command_id,
            "correlation_id": self.correlation_id,
            "causation_id": self.causation_id,
        }
        if self.user_id is not None:
            ids["user_id"] = self.user_id
        for field, value in ids.items():
            require_id(value, field, MAX_REFERENCE_LENGTH)


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
    # A digest of the command answered (its payload, not its envelope), when known:
    # what tells its id sent again with another payload apart.
    fingerprint: str | None = None

    @classmethod
    def rejected(
        cls,
        envelope: Envelope,
        aggregate: Aggregate,
        aggregate_id: str,
        code: str,
        message: str,
        field: str | None = None,
        fingerprint: str | None = None,
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
            fingerprint=fingerprint,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class VersionedState:
    """What the single writer keeps per aggregate: its state, and its version (that
    of the last event folded into it)."""

    state: Any
    version: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """What one command does: the events to append (none for a rejection) and the
    answer. ``current`` is the state decided on; ``repeat`` is the answer a command
    with this id already got (then nothing else is set: it is sent again as it
    was)."""

    aggregate_id: str
    current: VersionedState | None
    result: Result | None
    events: tuple[NewEvent, ...] = ()
    repeat: bytes | None = None


class AggregateStore(Protocol):
    """Where the writer keeps each aggregate's versioned state, and the answer every
    command it decided got (as sent), by command id."""

    def load(self, aggregate_id: str) -> VersionedState | None: ...
    def save(self, aggregate_id: str, versioned: VersionedState) -> None: ...
    def answered(self, command_id: str) -> bytes | None: ...


def event_id(
    aggregate_type: str, aggregate_id: str, stream_version: int, command_id: str
) -> str:
    """Deterministic, so an event re-emitted after a crash is recognisably the same."""
    name = f"{aggregate_type}/{aggregate_id}/{stream_version}/{command_id}"
    return str(uuid.uuid5(EVENT_ID_NAMESPACE, name))


def fold(
    aggregate: Aggregate, versioned: VersionedState, metadata: Metadata, event: Any
) -> VersionedState:
    """Apply one stored event; a repeat of a version already applied changes nothing."""
    if metadata.stream_version <= versioned.version:
        return versioned
    if metadata.stream_version != versioned.version + 1:
        raise GapError(
            f"{aggregate.type} {metadata.aggregate_id}: event at version "
            f"{metadata.stream_version} follows version {versioned.version}"
        )
    return replace(
        versioned,
        state=aggregate.evolve(versioned.state, event),
        version=metadata.stream_version,
    )


class GapError(RuntimeError):
    """The event log skips a version: a broken promise, never silently folded over."""


@dataclass(slots=True)
class CommandService:
    aggregate: Aggregate
    store: AggregateStore

    def current(self, aggregate_id: str) -> VersionedState:
        """The aggregate's state as stored (its initial state, at version 0, if it
        has none)."""
        found = self.store.load(aggregate_id)
        return (
            found
            if found is not None
            else VersionedState(state=self.aggregate.initial_state())
        )

    def decide(
        self, envelope: Envelope, command: Any, fingerprint: str | None = None
    ) -> Decision:
        """Check and decide one command against the stored state. A decision with
        events changes nothing until ``apply``. ``fingerprint`` (the command's
        digest) goes into its result."""
        aggregate = self.aggregate
        aggregate_id = aggregate.aggregate_id(command)
        previous = self.store.answered(envelope.command_id)
        if previous is not None:
            return Decision(
                aggregate_id=aggregate_id, current=None, result=None, repeat=previous
            )
        current = self.current(aggregate_id)
        expected = envelope.expected_version
        if expected is not None and expected != current.version:
            return self._rejected(
                current,
                envelope,
                aggregate_id,
                CONCURRENCY_CONFLICT,
                f"expected version {expected}, but {aggregate.type} {aggregate_id} "
                f"is at version {current.version}",
                "expected_version",
                fingerprint,
            )
        try:
            envelope.check()
            events = aggregate.decide(current.state, command)
        except DomainError as error:
            return self._rejected(
                current,
                envelope,
                aggregate_id,
                error.code,
                error.message,
                error.field,
                fingerprint,
            )
        stamped = tuple(
            NewEvent(
                metadata=self._metadata(
                    envelope, aggregate_id, current.version + index, event
                ),
                event=event,
            )
            for index, event in enumerate(events, start=1)
        )
        result = Result(
            command_id=envelope.command_id,
            aggregate_type=aggregate.type,
            aggregate_id=aggregate_id,
            accepted=True,
            correlation_id=envelope.correlation_id,
            version=current.version + len(stamped),
            event_ids=tuple(new.metadata.event_id for new in stamped),
            fingerprint=fingerprint,
        )
        return Decision(
            aggregate_id=aggregate_id, current=current, result=result, events=stamped
        )

    def refuse(
        self,
        envelope: Envelope,
        aggregate_id: str,
        code: str,
        message: str,
        field: str | None = None,
    ) -> Decision:
        """A command refused before it reaches the decider (it does not validate):
        a rejection, unless its command id was answered before (that answer)."""
        previous = self.store.answered(envelope.command_id)
        if previous is not None:
            return Decision(
                aggregate_id=aggregate_id, current=None, result=None, repeat=previous
            )
        result = Result.rejected(
            envelope, self.aggregate, aggregate_id, code, message, field
        )
        return Decision(aggregate_id=aggregate_id, current=None, result=result)

    def apply(self, decision: Decision) -> None:
        """Save the state a decision's events lead to, so the next command on the
        aggregate decides on it. The store keeps it provisional until the events
        are durable (the writer's transaction commits)."""
        versioned = decision.current
        if versioned is None or not decision.events:
            return
        for new in decision.events:
            versioned = fold(self.aggregate, versioned, new.metadata, new.event)
        self.store.save(decision.aggregate_id, versioned)

    def _rejected(
        self,
        current: VersionedState,
        envelope: Envelope,
        aggregate_id: str,
        code: str,
        message: str,
        field: str | None,
        fingerprint: str | None,
    ) -> Decision:
        result = Result.rejected(
            envelope, self.aggregate, aggregate_id, code, message, field, fingerprint
        )
        return Decision(aggregate_id=aggregate_id, current=current, result=result)

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
