"""The Kafka event log: durable appends, reads back by partition, command results.

Appends go through Streamfold's own idempotent ``acks=all`` producer (Faust's producer
offers no idempotence outside transactions). Sending returns an awaitable, so the
writer can hand many appends to the producer before it waits: an append counts only
once that awaitable says the broker acknowledged every event.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2
from confluent_kafka import Consumer, KafkaException, TopicPartition

from app.adapters import mapper
from app.adapters.catalog import SchemaCatalog
from app.adapters.codec import Codec, headers
from app.adapters.topics import watermarks
from app.application.commands import Metadata, NewEvent, Position, Result
from app.settings import Settings


class AppendFailed(RuntimeError):
    """The broker did not acknowledge an append; nothing may be reported accepted."""


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's Java client (and librdkafka's ``murmur2_random``, and
    aiokafka's default partitioner, so Faust's) picks for ``key``."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def aiokafka_security(settings: Settings) -> dict[str, Any]:
    """The same security settings for aiokafka clients as for confluent-kafka ones."""
    config: dict[str, Any] = {"security_protocol": settings.security_protocol}
    if settings.sasl_mechanism:
        config |= {
            "sasl_mechanism": settings.sasl_mechanism,
            "sasl_plain_username": settings.sasl_username,
            "sasl_plain_password": settings.sasl_password,
        }
    if settings.ssl_cafile:
        from aiokafka.helpers import create_ssl_context

        config["ssl_context"] = create_ssl_context(cafile=settings.ssl_cafile)
    return config


def new_producer(settings: Settings) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        acks="all",
        enable_idempotence=True,
        linger_ms=1,
        max_request_size=2 * settings.max_message_bytes + 65_536,
        **aiokafka_security(settings),
    )


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


@dataclass(slots=True)
class KafkaEventLog:
    producer: AIOKafkaProducer
    codec: Codec
    catalog: SchemaCatalog
    topic: str

    async def send(
        self, partition: int, aggregate_id: str, events: Sequence[NewEvent]
    ) -> Awaitable[list[Position]]:
        """Hand ``events`` to the producer; await the returned awaitable for their
        positions, which raises ``AppendFailed`` unless the broker took them all."""
        key = aggregate_id.encode()
        pending = []
        for new in events:
            name = self.catalog.record_name(type(new.event))
            version = self.catalog.latest_version(name)
            record = mapper.event_record(
                new.event, metadata_record(new.metadata, version)
            )
            value = self.codec.encode(self.topic, name, record)
            meta = new.metadata
            pending.append(
                await self.producer.send(
                    self.topic,
                    value,
                    key=key,
                    partition=partition,
                    timestamp_ms=int(meta.timestamp.timestamp() * 1000),
                    headers=headers.for_event(
                        event_type=meta.event_type,
                        event_version=version,
                        stream_version=meta.stream_version,
                        aggregate_id=meta.aggregate_id,
                        correlation_id=meta.correlation_id,
                        event_id=meta.event_id,
                        command_id=meta.command_id,
                    ),
                )
            )
        return asyncio.ensure_future(
            _delivered(pending, f"append to {self.topic}[{partition}]")
        )


async def _delivered(pending: Sequence[Awaitable[Any]], what: str) -> list[Position]:
    try:
        delivered = await asyncio.gather(*pending)
    except KafkaError as error:
        raise AppendFailed(f"{what} failed: {error}") from error
    return [Position(partition=m.partition, offset=m.offset) for m in delivered]


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


@dataclass(slots=True)
class KafkaResults:
    producer: AIOKafkaProducer
    codec: Codec
    topic: str

    async def send(self, result: Result) -> Awaitable[list[Position]]:
        """Hand one answer to the producer; await the returned awaitable, which
        raises ``AppendFailed`` unless the broker took it."""
        value = self.codec.encode(
            self.topic, RESULT_RECORD, result_record(result, datetime.now(UTC))
        )
        future = await self.producer.send(
            self.topic, value, key=result.command_id.encode()
        )
        return asyncio.ensure_future(
            _delivered([future], f"result for {result.command_id}")
        )


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One event read back from the log, decoded and upcast to the newest version."""

    partition: int
    offset: int
    record_name: str
    metadata: Metadata
    event: Any


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One record read back from a partition, as stored."""

    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


def committed_offset(settings: Settings, group: str, topic: str, partition: int) -> int:
    """The offset ``group`` has committed for one partition; 0 when it has none."""
    consumer = Consumer(
        {
            **settings.kafka_client_config(),
            "group.id": group,
            "enable.auto.commit": False,
        }
    )
    try:
        [found] = consumer.committed([TopicPartition(topic, partition)], timeout=30)
    finally:
        consumer.close()
    if found.error is not None:
        raise KafkaException(found.error)
    return max(found.offset, 0)


def read_records(
    settings: Settings,
    topic: str,
    partition: int,
    start: int,
    end: int | None = None,
) -> Iterator[RawRecord]:
    """Read [start, end) of one partition (end defaults to the current high
    watermark), without a consumer group. Blocking: the worker calls it in a thread.
    Raises ``KafkaException`` when Kafka does not deliver what it holds."""
    consumer = Consumer(
        {
            **settings.kafka_client_config(),
            "group.id": "streamfold-reader",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed",
        }
    )
    try:
        low, high = watermarks(consumer, topic, partition)
        end = high if end is None else min(end, high)
        offset = max(start, low)
        if offset >= end:
            return
        consumer.assign([TopicPartition(topic, partition, offset)])
        idle = 0
        while offset < end:
            message = consumer.poll(5.0)
            if message is None:
                idle += 1
                if idle >= 6:
                    raise KafkaException(f"{topic}[{partition}] stalled at {offset}")
                continue
            idle = 0
            error = message.error()
            if error is not None:
                if error.code() == -191:  # _PARTITION_EOF
                    break
                raise KafkaException(error)
            offset = message.offset() + 1
            if message.offset() < end:
                yield RawRecord(
                    message.offset(),
                    message.key(),
                    message.value(),
                    list(message.headers() or []),
                )
    finally:
        consumer.close()


def read_partition(
    settings: Settings,
    codec: Codec,
    catalog: SchemaCatalog,
    topic: str,
    partition: int,
    start: int,
    end: int | None = None,
) -> Iterator[StoredEvent]:
    """The events in [start, end) of one partition, decoded and upcast."""
    for record in read_records(settings, topic, partition, start, end):
        decoded = codec.decode(record.value or b"")
        meta, payload = mapper.split_event(decoded.data)
        cls = catalog.class_for(decoded.record_name)
        yield StoredEvent(
            partition=partition,
            offset=record.offset,
            record_name=decoded.record_name,
            metadata=metadata_from_record(meta),
            event=mapper.from_dict(cls, payload),
        )
