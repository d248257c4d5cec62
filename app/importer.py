"""`streamfold import`: events written elsewhere brought into the event store, each
framed with its own schema version's id and carrying the metadata readers require.

The whole input is checked before anything is written, then written in one Kafka
transaction: an import lands whole or not at all. Lines already in the store (the
same event id at the same version) are skipped, so a file can be imported again.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import KafkaException, Producer

from app.adapters import mapper
from app.adapters.catalog import UnknownRecord
from app.adapters.codec import Codec, DecodeError, EncodeError, Headers, headers
from app.adapters.eventlog import metadata_record, partition_for
from app.adapters.topics import init_transactions
from app.application.commands import Aggregate, Metadata
from app.audit import new_codec, read_topic
from app.domain.errors import MAX_ID_LENGTH, MAX_REFERENCE_LENGTH, id_problem
from app.settings import Settings

REQUIRED = (
    "event_type",
    "event_version",
    "aggregate_id",
    "stream_version",
    "timestamp",
)
OPTIONAL = (
    "event_id",
    "user_id",
    "correlation_id",
    "causation_id",
    "command_id",
)
FIELDS = (*REQUIRED, *OPTIONAL, "data")
_EVENT_IDS = uuid.uuid5(uuid.NAMESPACE_URL, "https://streamfold/import")


class ImportRefused(ValueError):
    """The input has problems; nothing was written. ``problems`` names each line's."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Imported:
    written: int
    # Lines whose event the store already holds (an earlier run of the same input).
    skipped: int


@dataclass(frozen=True, slots=True)
class _Event:
    line: int
    topic: str
    key: bytes
    stream_version: int
    event_id: str
    value: bytes
    headers: Headers
    timestamp_ms: int


def import_events(settings: Settings, lines: Iterable[str]) -> Imported:
    """Check every line, then append the new ones to the events topics in one
    transaction. Raises ``ImportRefused`` (listing every problem) before writing
    anything when a line is wrong."""
    codec = new_codec(settings)
    problems: list[str] = []
    events: list[_Event] = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            events.append(_event(settings, codec, number, text))
        except ValueError as error:
            problems.append(f"line {number}: {error}")
    new, skipped = _against_the_store(settings, codec, events, problems)
    if problems:
        raise ImportRefused(problems)
    _write(settings, new)
    return Imported(written=len(new), skipped=skipped)


def _event(settings: Settings, codec: Codec, number: int, text: str) -> _Event:
    try:
        line = json.loads(text)
    except ValueError as error:
        raise ValueError(f"not JSON ({error})") from None
    if not isinstance(line, dict):
        raise ValueError("must be a JSON object")
    unknown = sorted(set(line) - set(FIELDS))
    missing = [name for name in (*REQUIRED, "data") if name not in line]
    if unknown or missing:
        raise ValueError(
            "; ".join(
                part
                for part in (
                    f"unknown field(s) {', '.join(unknown)}" if unknown else "",
                    f"missing {', '.join(missing)}" if missing else "",
                )
                if part
            )
            + f" (fields: {', '.join(FIELDS)})"
        )
    catalog = codec.catalog
    try:
        cls = catalog.event_class(str(line["event_type"]))
    except UnknownRecord as error:
        raise ValueError(f"event_type: {error}") from None
    full = catalog.record_name(cls)
    version = _integer(line, "event_version")
    if version not in catalog.versions(full):
        raise ValueError(
            f"event_version: {cls.__name__} has no version {version} "
            f"(has {', '.join(f'v{v}' for v in catalog.versions(full))})"
        )
    stream_version = _integer(line, "stream_version")
    aggregate_id = _text(line, "aggregate_id", most=MAX_ID_LENGTH)
    area = full.split(".")[1]
    aggregate = _aggregate(area)
    aggregate_type = aggregate.type
    event_id = _text(
        line,
        "event_id",
        str(
            uuid.uuid5(_EVENT_IDS, f"{aggregate_type}/{aggregate_id}/{stream_version}")
        ),
    )
    correlation_id = _text(line, "correlation_id", event_id)
    meta = Metadata(
        event_id=event_id,
        event_type=cls.__name__,
        aggregate_type=aggregate_type,
        aggregate_id=aggregate_id,
        stream_version=stream_version,
        timestamp=_timestamp(line),
        user_id=_optional_text(line, "user_id"),
        correlation_id=correlation_id,
        causation_id=_text(line, "causation_id", correlation_id),
        command_id=_text(line, "command_id", f"import-{event_id}"),
    )
    record = {"metadata": metadata_record(meta, version)}
    data = line["data"]
    if not isinstance(data, dict) or "metadata" in data:
        raise ValueError("data must be an object of the event's fields, no metadata")
    topic = settings.topics.events(area)
    record.update(data)
    try:
        value = codec.encode(topic, full, record, version=version)
        # Read back as every reader will: upcast to the newest version, then mapped.
        upcast = codec.decode(value).data
        _, payload = mapper.split_event(upcast)
        mapper.from_dict(cls, payload)
    except (EncodeError, DecodeError, mapper.MappingError) as error:
        raise ValueError(f"{cls.__name__} v{version}: {error}") from None
    own_id = payload.get(aggregate.id_field)
    if own_id not in (None, aggregate_id):
        raise ValueError(
            f"data.{aggregate.id_field} is {own_id!r}, but aggregate_id is "
            f"{aggregate_id!r}"
        )
    return _Event(
        line=number,
        topic=topic,
        key=aggregate_id.encode(),
        stream_version=stream_version,
        event_id=event_id,
        value=value,
        headers=headers(full, record),
        timestamp_ms=int(meta.timestamp.timestamp() * 1000),
    )


def _against_the_store(
    settings: Settings, codec: Codec, events: list[_Event], problems: list[str]
) -> tuple[list[_Event], int]:
    """The events the store lacks; each aggregate's must continue its stream
    without a gap. Problems are added to ``problems``."""
    stored = _stored_event_ids(settings, codec, {e.topic for e in events})
    new: list[_Event] = []
    skipped = 0
    for event in events:
        stream = stored.setdefault((event.topic, event.key), {})
        held = stream.get(event.stream_version)
        if held == event.event_id:
            skipped += 1
            continue
        aggregate = event.key.decode()
        if held is not None:
            problems.append(
                f"line {event.line}: {aggregate} already has event {held} at "
                f"stream_version {event.stream_version}"
            )
            continue
        expected = max(stream, default=0) + 1
        if event.stream_version != expected:
            problems.append(
                f"line {event.line}: stream_version {event.stream_version} of "
                f"{aggregate} leaves a gap; the next version is {expected}"
            )
            continue
        stream[event.stream_version] = event.event_id
        new.append(event)
    return new, skipped


def _stored_event_ids(
    settings: Settings, codec: Codec, topics: set[str]
) -> dict[tuple[str, bytes], dict[int, str]]:
    """(topic, aggregate id) → stream version → event id of what the store holds."""
    stored: dict[tuple[str, bytes], dict[int, str]] = {}
    for topic in sorted(topics):
        for record in read_topic(settings, topic):
            # The headers say it without decoding; a producer may have left them out.
            held = record.headers
            meta = {
                "aggregate_id": (held.get("aggregate-id") or b"").decode(),
                "stream_version": (held.get("stream-version") or b"").decode(),
                "event_id": (held.get("event-id") or b"").decode(),
            }
            if not all(meta.values()):
                meta = codec.decode(record.value or b"").data["metadata"]
            stream = stored.setdefault((topic, str(meta["aggregate_id"]).encode()), {})
            stream[int(meta["stream_version"])] = str(meta["event_id"])
    return stored


def _write(settings: Settings, events: list[_Event]) -> None:
    if not events:
        return
    producer = Producer(
        {
            **settings.producer_config(),
            "transactional.id": f"{settings.app_id}-import-{uuid.uuid4().hex}",
        }
    )
    try:
        init_transactions(producer, events[0].topic, 30)
        producer.begin_transaction()
        for event in events:
            producer.produce(
                event.topic,
                event.value,
                key=event.key,
                partition=partition_for(event.key, settings.partitions),
                headers=event.headers,
                timestamp=event.timestamp_ms,
            )
        producer.commit_transaction(120)
    except KafkaException as error:
        # Should the abort fail too, the broker times the transaction out; either
        # way nothing of it is committed.
        with contextlib.suppress(KafkaException):
            producer.abort_transaction(30)
        raise ImportRefused(
            [f"writing to Kafka failed, nothing imported: {error}"]
        ) from None


def _integer(line: dict[str, Any], name: str) -> int:
    value = line[name]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a whole number from 1, not {value!r}")
    return value


def _text(
    line: dict[str, Any],
    name: str,
    default: str | None = None,
    most: int = MAX_REFERENCE_LENGTH,
) -> str:
    """An id of the line's, held to the rule the write side holds commands to (the
    saga sends commands under an imported order's correlation id)."""
    value = line.get(name, default)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, not {value!r}")
    problem = id_problem(value, most)
    if problem is not None:
        raise ValueError(f"{name} {problem}")
    return value


def _optional_text(line: dict[str, Any], name: str) -> str | None:
    if line.get(name) is None:
        return None
    return _text(line, name)


def _timestamp(line: dict[str, Any]) -> datetime:
    raw = line["timestamp"]
    try:
        when = datetime.fromisoformat(str(raw))
    except ValueError:
        raise ValueError(f"timestamp {raw!r} is not ISO 8601") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _aggregate(area: str) -> Aggregate:
    # Imported here: the runtime module brings the write side's machinery along.
    from app.runtime import AGGREGATES

    return AGGREGATES[area]
