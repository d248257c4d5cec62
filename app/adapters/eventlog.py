"""The Kafka event log's records: events and command results as they go on the
wire (the transactional processor produces them), and the partition a key goes to.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aiokafka.partitioner import murmur2

from app.adapters import mapper
from app.adapters.codec import COMMAND_ID_HEADER, Codec, Headers, headers
from app.application.commands import Metadata, NewEvent, Result


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's Java client (and librdkafka's ``murmur2_random``, and
    aiokafka's default partitioner, so Faust's) picks for ``key``."""
    hashed: int = murmur2(key)  # untyped: aiokafka has no type information
    return (hashed & 0x7FFFFFFF) % partitions


def metadata_record(meta: Metadata, event_version: int) -> dict[str, Any]:
    return {
        "event_id": meta.event_id,
        "event_type": meta.event_type,
        "event_version": event_version,
        "aggregate_type": meta.aggregate_type,
        "aggregate_id": meta.aggregate_id,
        "stream_version": meta.stream_version,
        "timestamp": meta.timestamp,
        "user_id": meta.user_id,
        "correlation_id": meta.correlation_id,
        "causation_id": meta.causation_id,
        "command_id": meta.command_id,
    }


def metadata_from_record(record: dict[str, Any]) -> Metadata:
    timestamp = record["timestamp"]
    if timestamp.tzinfo is None:
        timestamp = timestamp.replace(tzinfo=UTC)
    return Metadata(
        event_id=record["event_id"],
        event_type=record["event_type"],
        aggregate_type=record["aggregate_type"],
        aggregate_id=record["aggregate_id"],
        stream_version=record["stream_version"],
        timestamp=timestamp,
        user_id=record["user_id"],
        correlation_id=record["correlation_id"],
        causation_id=record["causation_id"],
        command_id=record["command_id"],
    )


def encode_event(codec: Codec, topic: str, new: NewEvent) -> tuple[bytes, Headers, int]:
    """An event's value (its record at the newest version of its schema), its
    routing headers and its timestamp in milliseconds."""
    catalog = codec.catalog
    name = catalog.record_name(type(new.event))
    version = catalog.latest_version(name)
    meta = new.metadata
    record = mapper.event_record(new.event, metadata_record(meta, version))
    found = headers.for_event(
        event_type=meta.event_type,
        event_version=version,
        stream_version=meta.stream_version,
        aggregate_id=meta.aggregate_id,
        correlation_id=meta.correlation_id,
        event_id=meta.event_id,
        command_id=meta.command_id,
    )
    return (
        codec.encode(topic, name, record),
        found,
        int(meta.timestamp.timestamp() * 1000),
    )


def result_record(result: Result, processed_at: datetime) -> dict[str, Any]:
    return {
        "command_id": result.command_id,
        "aggregate_type": result.aggregate_type,
        "aggregate_id": result.aggregate_id,
        "status": "ACCEPTED" if result.accepted else "REJECTED",
        "version": result.version,
        "event_ids": list(result.event_ids),
        "partition": result.position.partition if result.position else None,
        "offset": result.position.offset if result.position else None,
        "code": result.code,
        "message": result.message,
        "field": result.field,
        "correlation_id": result.correlation_id,
        "processed_at": processed_at,
    }


RESULT_RECORD = "streamfold.CommandResult"
AGGREGATE_TYPE_HEADER = "aggregate-type"


def encode_result(codec: Codec, topic: str, result: Result) -> bytes:
    return codec.encode(topic, RESULT_RECORD, result_record(result, datetime.now(UTC)))


def result_headers(result: Result) -> Headers:
    """What lets a reader route a result without decoding it."""
    return [
        (COMMAND_ID_HEADER, result.command_id.encode()),
        (AGGREGATE_TYPE_HEADER, result.aggregate_type.encode()),
        ("status", b"ACCEPTED" if result.accepted else b"REJECTED"),
    ]
