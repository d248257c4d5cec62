"""Dead letters as an operator sees them: what a dead-letter record says about its
source, what re-driving it produces, and the operators' actions folded into each
record's standing. Pure: the Kafka side is ``app.adapters.deadletters``."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

Kind = Literal["command", "projection", "saga", "event"]
Verb = Literal["redrive", "discard", "replay"]
Standing = Literal["open", "redriven", "discarded"]

# Headers the dead-lettering adds (``dead_letter_headers``, for the write side, the
# projections and the saga); a re-driven record leaves them behind.
DLQ_PREFIX = "dlq-"
REDRIVEN_FROM = "streamfold-redriven-from"
REDRIVE_ACTION = "streamfold-redrive-action"
MAX_REASON = 1000


def dead_letter_headers(
    headers: Iterable[tuple[str, bytes | None]],
    source: tuple[str, int, int],
    reason: str,
    *more: tuple[str, bytes],
) -> list[tuple[str, str | bytes | None]]:
    """A dead letter's headers: the record's own ``headers``, then where it was read
    (``source``: topic, partition, offset), ``more`` and why, as ``DeadLetter``
    reads them back."""
    topic, partition, offset = source
    return [
        *headers,
        ("dlq-source-topic", topic.encode()),
        ("dlq-source-partition", str(partition).encode()),
        ("dlq-source-offset", str(offset).encode()),
        *more,
        ("dlq-reason", reason.encode()[:4000]),
    ]


class ActionRefused(Exception):
    """An action that cannot be taken on a record as it stands: ``status`` is the
    HTTP status that says so (404 unknown, 409 no longer open, 400 bad input)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record of a dead-letter topic, and the source it names."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    timestamp_ms: int

    @property
    def id(self) -> str:
        return record_id(self.topic, self.partition, self.offset)

    def header(self, name: str) -> str | None:
        found = None
        for n, v in self.headers:
            if n == name and v is not None:
                found = v.decode(errors="replace")
        return found

    @property
    def source_topic(self) -> str:
        return self.header("dlq-source-topic") or ""

    @property
    def source_partition(self) -> int:
        return _int(self.header("dlq-source-partition"))

    @property
    def source_offset(self) -> int:
        return _int(self.header("dlq-source-offset"))

    @property
    def reason(self) -> str:
        return self.header("dlq-reason") or ""

    @property
    def projection(self) -> str | None:
        return self.header("dlq-projection")

    @property
    def kind(self) -> Kind:
        if self.projection is not None:
            return "projection"
        if self.source_topic.endswith(".commands"):
            return "command"
        # The saga's, or its feed's (read from an events topic or command-results).
        if self.topic.endswith("-saga-inbox.dlq") or self.source_topic.endswith(
            "-saga-inbox"
        ):
            return "saga"
        return "event"

    @property
    def aggregate_id(self) -> str | None:
        """The key (commands and events are keyed by aggregate id, the saga's inbox
        messages by order id), else the ``aggregate-id`` header, else None."""
        if self.key:
            return self.key.decode(errors="replace")
        return self.header("aggregate-id")


def record_id(topic: str, partition: int, offset: int) -> str:
    """How a dead-letter record is named in actions, the CLI and the console."""
    return f"{topic}:{partition}:{offset}"


# ASCII digits ("²".isdigit() is true, and int() refuses it), few enough for int().
_DIGITS = re.compile(r"[0-9]{1,19}")


def parse_record_id(text: str) -> tuple[str, int, int]:
    topic, _, rest = text.rpartition(":")
    topic, _, partition = topic.rpartition(":")
    if not topic or not _DIGITS.fullmatch(partition) or not _DIGITS.fullmatch(rest):
        raise ActionRefused(400, f"expected topic:partition:offset, got {text!r}")
    return topic, int(partition), int(rest)


@dataclass(frozen=True, slots=True)
class Redrive:
    """What re-driving a dead letter produces: a new record on its source."""

    topic: str
    partition: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]


def redrive_of(letter: DeadLetter, action_id: str) -> Redrive:
    """The original bytes and key to the source topic and partition they were read
    from, with the original headers but the dead-lettering's, and two that say
    where the record was re-driven from and by which action."""
    if not letter.source_topic or letter.source_partition < 0:
        raise ActionRefused(
            409, f"{letter.id} does not say where it came from (no dlq-source-*)"
        )
    if letter.value is None:
        raise ActionRefused(409, f"{letter.id} has no value: nothing to re-drive")
    kept = tuple(
        (n, v)
        for n, v in letter.headers
        if v is not None
        and not n.startswith(DLQ_PREFIX)
        and n not in (REDRIVEN_FROM, REDRIVE_ACTION)
    )
    return Redrive(
        letter.source_topic,
        letter.source_partition,
        letter.key,
        letter.value,
        (
            *kept,
            (REDRIVEN_FROM, letter.id.encode()),
            (REDRIVE_ACTION, action_id.encode()),
        ),
    )


@dataclass(frozen=True, slots=True)
class Action:
    """An operator's action, as kept for ever: on one dead-letter record, or a
    replay (``record`` is then ``projection:<name>``)."""

    action_id: str
    at: datetime
    operator: str
    verb: Verb
    record: str
    reason: str
    # Where a re-drive's new record landed, "topic:partition:offset".
    produced: str | None = None

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "action_id": self.action_id,
                "at": self.at.isoformat(),
                "operator": self.operator,
                "verb": self.verb,
                "record": self.record,
                "reason": self.reason,
                "produced": self.produced,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Action:
        data = json.loads(raw)
        verb = data["verb"]
        if verb not in ("redrive", "discard", "replay"):
            raise ValueError(f"unknown verb {verb!r}")
        return cls(
            action_id=str(data["action_id"]),
            at=datetime.fromisoformat(data["at"]),
            operator=str(data["operator"]),
            verb=verb,
            record=str(data["record"]),
            reason=str(data["reason"]),
            produced=data.get("produced"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {**json.loads(self.to_json()), "at": self.at.isoformat()}


@dataclass(frozen=True, slots=True)
class Overview:
    """What an operator looks at: the dead-letter topics that exist, every record
    in them, and every action taken (oldest first)."""

    topics: list[str]
    letters: list[DeadLetter]
    actions: list[Action]

    def decided(self) -> dict[str, Action]:
        """Each record's deciding action (``standings``)."""
        return standings(self.actions)


def standings(actions: Iterable[Action]) -> dict[str, Action]:
    """Each record's deciding action: its first. A record is acted on once; a
    re-drive that fails again comes back as a new dead letter, open."""
    decided: dict[str, Action] = {}
    for action in actions:
        if action.verb != "replay":
            decided.setdefault(action.record, action)
    return decided


def standing(letter: DeadLetter, decided: dict[str, Action]) -> Standing:
    action = decided.get(letter.id)
    if action is None:
        return "open"
    return "redriven" if action.verb == "redrive" else "discarded"


def chosen(
    letters: Sequence[DeadLetter],
    decided: dict[str, Action],
    *,
    record: str | None = None,
    topic: str | None = None,
    aggregate_id: str | None = None,
) -> list[DeadLetter]:
    """The open records an action takes: the one named ``record``, or every open
    record of ``aggregate_id`` in dead-letter ``topic``, in the order they were
    dead-lettered (the dead-letter topics have one partition, so offset order).
    Refuses a record that is unknown or no longer open, and an aggregate with no
    open records."""
    if record is not None:
        found = [letter for letter in letters if letter.id == record]
        if not found:
            raise ActionRefused(404, f"no dead letter {record}")
        [letter] = found
        if standing(letter, decided) != "open":
            action = decided[letter.id]
            raise ActionRefused(
                409,
                f"{record} was {standing(letter, decided)} by {action.operator} "
                f"at {action.at.isoformat()}",
            )
        return found
    if topic is None or not aggregate_id:
        raise ActionRefused(400, "name a record, or a topic and an aggregate id")
    found = sorted(
        (
            letter
            for letter in letters
            if letter.topic == topic
            and letter.aggregate_id == aggregate_id
            and standing(letter, decided) == "open"
        ),
        key=lambda letter: (letter.partition, letter.offset),
    )
    if not found:
        raise ActionRefused(404, f"no open dead letters of {aggregate_id!r} in {topic}")
    return found


def checked_reason(reason: object, *, required: bool) -> str:
    if not isinstance(reason, str):
        raise ActionRefused(400, "reason: expected a string")
    reason = reason.strip()
    if required and not reason:
        raise ActionRefused(400, "reason: say why (it is kept with the action)")
    if len(reason) > MAX_REASON:
        raise ActionRefused(400, f"reason: at most {MAX_REASON} characters")
    return reason


def _int(text: str | None) -> int:
    try:
        return int(text) if text is not None else -1
    except ValueError:
        return -1
