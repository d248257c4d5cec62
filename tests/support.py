"""Helpers for tests against the real services: workers, and reading whole topics."""

from __future__ import annotations

import shutil
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from app.adapters.catalog import SchemaCatalog
from app.adapters.codec import Codec, ConfluentRegistry
from app.faust_app import worker_datadir
from app.local.process import Daemon
from app.local.worker import WorkerProcess
from app.settings import Settings


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]


def read_topic(settings: Settings, topic: str) -> list[Message]:
    """Every message currently in the topic, partition by partition, in offset order."""
    consumer = Consumer(
        {
            **settings.kafka_client_config(),
            "group.id": "tests-reader",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=30).topics[topic].partitions
        found: list[Message] = []
        for partition in sorted(partitions):
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=30
            )
            if high <= low:
                continue
            consumer.assign([TopicPartition(topic, partition, low)])
            while True:
                message = consumer.poll(5.0)
                if message is None:
                    raise AssertionError(f"{topic}[{partition}] stalled before {high}")
                if message.error():
                    if message.error().code() == -191:
                        break
                    raise AssertionError(str(message.error()))
                found.append(
                    Message(
                        topic,
                        partition,
                        message.offset(),
                        message.key(),
                        message.value(),
                        dict(message.headers() or []),
                    )
                )
                if message.offset() + 1 >= high:
                    break
        return found
    finally:
        consumer.close()


def codec_for(settings: Settings) -> Codec:
    return Codec(ConfluentRegistry(settings.schema_registry_url), SchemaCatalog.load())


def events_by_aggregate(
    settings: Settings, area: str
) -> dict[str, list[dict[str, Any]]]:
    codec = codec_for(settings)
    streams: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for message in read_topic(settings, settings.topics.events(area)):
        data = codec.decode(message.value).data  # type: ignore[arg-type]
        streams[data["metadata"]["aggregate_id"]].append(data)
    return streams


def results_by_command(settings: Settings) -> dict[str, list[dict[str, Any]]]:
    codec = codec_for(settings)
    results: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for message in read_topic(settings, settings.topics.results):
        data = codec.decode(message.value).data  # type: ignore[arg-type]
        results[data["command_id"]].append(data)
    return results


@contextmanager
def running_worker(settings: Settings, name: str = "worker") -> Iterator[Daemon]:
    worker = WorkerProcess(settings, name)
    worker.start(timeout=120)
    try:
        yield worker
    finally:
        worker.stop()


def delete_local_store(settings: Settings) -> None:
    shutil.rmtree(worker_datadir(settings), ignore_errors=True)
