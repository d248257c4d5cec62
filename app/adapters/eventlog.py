"""The Kafka event log's records: events and command results as they go on the
wire (the transactional processor produces them), and the partition a key goes to.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from app.adapters import mapper
from app.adapters.codec import COMMAND_ID_HEADER, Codec, Headers, headers
from app.application.commands import Metadata, NewEvent, Result


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's Java client (and librdkafka's ``murmur2_random``, and
    aiokafka's default partitioner, so Faust's) picks for ``key``."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 of ``data`` (``Utils.murmur2`` in its Java client), as an
    unsigned 32-bit value. Our own, so that a write process need not import
    aiokafka (about 40 ms, a seventh of its imports) for one function."""
    m, mask = 0x5BD1E995, 0xFFFFFFFF
    length = len(data)
    h = (0x9747B28C ^ length) & mask
    whole = length - length % 4
    for (k,) in struct.iter_unpack("<I", data[:whole]):
        k = (k * m) & mask
        k ^= k >> 24
        h = ((h * m) & mask) ^ ((k * m) & mask)
    tail = data[whole:]
    if tail:
        h ^= int.from_bytes(tail, "little")
        h = (h * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    return h ^ (h >> 15)


def metadata_record(meta: Metadata, event_version: int) -> dict[str, Any]:
    """The ``metadata`` record of an event written with schema ``event_version``."""
    return {**mapper.to_dict(meta), "event_version": event_version}


def metadata_from_record(record: dict[str, Any]) -> Metadata:
    """An event record's metadata; its ``event_version`` tells how the payload was
    written, and is no part of ``Metadata``."""
    fields = {k: v for k, v in record.items() if k != "event_version"}
    return mapper.from_dict(
        Metadata, {**fields, "timestamp": mapper.utc(record["timestamp"])}
    )


def encode_event(codec: Codec, topic: str, new: NewEvent) -> tuple[bytes, Headers, int]:
    """An event's value (its record at the newest version of its schema), its
    routing headers and its timestamp in milliseconds."""
    catalog = codec.catalog
    name = catalog.record_name(type(new.event))
    version = catalog.latest_version(name)
    meta = new.metadata
    record = mapper.event_record(new.event, metadata_record(meta, version))
    return (
        codec.encode(topic, name, record),
        headers(name, record),
        int(meta.timestamp.timestamp() * 1000),
    )


@dataclass(frozen=True, slots=True)
class CommandResult:
    command_id: str
    accepted: bool
    aggregate_type: str
    aggregate_id: str
    version: int | None
    event_ids: tuple[str, ...]
    partition: int | None
    offset: int | None
    code: str | None
    message: str | None
    field: str | None
    correlation_id: str
    # The digest of the command answered (``mapper.fingerprint``), from the
    # result's headers; None when they carry none.
    fingerprint: str | None = None

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> CommandResult:
        # The record's other fields have the same names; when it was processed is
        # no part of the result.
        fields = {k: v for k, v in data.items() if k not in ("status", "processed_at")}
        return mapper.from_dict(
            cls, {**fields, "accepted": data["status"] == "ACCEPTED"}
        )


def result_fields(
    result: Result | CommandResult, partition: int | None, offset: int | None
) -> dict[str, Any]:
    """The fields of the Avro ``CommandResult`` record but ``processed_at``, of a
    result decided here (``Result``) or read back (``CommandResult``):
    what ``result_record`` writes and the HTTP API answers with."""
    return {
        "command_id": result.command_id,
        "aggregate_type": result.aggregate_type,
        "aggregate_id": result.aggregate_id,
        "status": "ACCEPTED" if result.accepted else "REJECTED",
        "version": result.version,
        "event_ids": list(result.event_ids),
        "partition": partition,
        "offset": offset,
        "code": result.code,
        "message": result.message,
        "field": result.field,
        "correlation_id": result.correlation_id,
    }


def result_record(result: Result, processed_at: datetime) -> dict[str, Any]:
    at = result.position
    partition, offset = (at.partition, at.offset) if at else (None, None)
    record = result_fields(result, partition, offset)
    record["processed_at"] = processed_at  # once per command: no second dict
    return record


RESULT_RECORD = "streamfold.CommandResult"
AGGREGATE_TYPE_HEADER = "aggregate-type"
# On a result: the fingerprint (``mapper.fingerprint``) of the command it answers.
FINGERPRINT_HEADER = "command-fingerprint"
# On a result: the command record it answers, "<partition>@<offset>" of the commands
# topic (where the command was produced, for one sent on by the writer).
COMMAND_AT_HEADER = "command-at"
# The first byte of an answer kept with its fingerprint (``kept_answer``), and of
# one kept with the command record it last answered.
_FINGERPRINTED = b"\x01"
_ANSWERED_AT = b"\x02"
_AT = struct.Struct(">iq")


def encode_result(codec: Codec, topic: str, result: Result) -> bytes:
    return codec.encode(topic, RESULT_RECORD, result_record(result, datetime.now(UTC)))


def result_headers(result: Result) -> Headers:
    """What lets a reader route a result without decoding it, and tell which
    command it answers."""
    found: Headers = [
        (COMMAND_ID_HEADER, result.command_id.encode()),
        (AGGREGATE_TYPE_HEADER, result.aggregate_type.encode()),
        ("status", b"ACCEPTED" if result.accepted else b"REJECTED"),
    ]
    if result.fingerprint is not None:
        found.append((FINGERPRINT_HEADER, result.fingerprint.encode()))
    return found


def fingerprint_in(headers: Mapping[str, bytes | None]) -> str | None:
    """The fingerprint a result was sent with (None: none, as from a writer that
    kept none)."""
    raw = headers.get(FINGERPRINT_HEADER)
    return None if raw is None else raw.decode(errors="replace")


# The writer keeps, by command id, the answer it sent (``AggregateStore.answered``)
# and sends it again for the same id sent again: the result's value, its fingerprint
# and the command record it last answered, kept as one value: _ANSWERED_AT and the
# record's partition and offset (``_AT``), then _FINGERPRINTED and the digest's 32
# bytes, then the result's value. A result's value is a framed record (its first
# byte, the magic byte, is 0), so an answer kept before either was added reads as a
# value without it.
CommandAt = tuple[int, int]


def kept_answer(
    value: bytes, fingerprint: str | None, at: CommandAt | None = None
) -> bytes:
    try:
        digest = bytes.fromhex(fingerprint or "")
    except ValueError:  # not one of ours (another writer's header): none kept
        digest = b""
    kept = _FINGERPRINTED + digest + value if len(digest) == 32 else value
    return kept if at is None else _ANSWERED_AT + _AT.pack(*at) + kept


def sent_answer(kept: bytes) -> tuple[bytes, str | None]:
    """The value and the fingerprint of an answer as ``kept_answer`` keeps it."""
    if kept[:1] == _ANSWERED_AT:
        kept = kept[1 + _AT.size :]
    if kept[:1] != _FINGERPRINTED:
        return kept, None
    return kept[33:], kept[1:33].hex()


def answered_at(kept: bytes) -> CommandAt | None:
    """The command record an answer as ``kept_answer`` keeps it last answered."""
    if kept[:1] != _ANSWERED_AT:
        return None
    partition, offset = _AT.unpack_from(kept, 1)
    return partition, offset


def format_at(at: CommandAt) -> bytes:
    return f"{at[0]}@{at[1]}".encode()


def parse_at(raw: bytes | None) -> CommandAt | None:
    """A "<partition>@<offset>" header's value (None: absent or not one)."""
    try:
        partition, offset = (raw or b"").split(b"@")
        return int(partition), int(offset)
    except ValueError:
        return None
