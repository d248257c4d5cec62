"""One aggregate's events as they are committed, for the GraphQL subscription.

A ``read_committed`` reader of the aggregate's partition of its events topic (by
assignment: no consumer group, nothing committed), from a given offset on, keeping
the records keyed by the aggregate's id. Each feed has a thread of its own for its
consumer (polling and decoding never run on the event loop, nor in the loop's
shared executor, which the command gateway needs), and reads only when the feed's
reader asks for more, so a slow subscriber holds back its own reader and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from app.adapters.codec import Codec, DecodeError, RegistryError
from app.adapters.eventlog import partition_for
from app.adapters.topics import reader, take, watermarks
from app.settings import Settings

# How long one poll waits for the next record; also how soon a closed feed's
# thread notices.
POLL_S = 0.5
BATCH = 100


class FeedError(Exception):
    """The feed cannot go on: the broker refused the read or a record could not be
    decoded. The message says which; nothing internal is in it."""


class Feeds:
    """How many feeds one worker runs at once (each holds a Kafka consumer and a
    thread); used from the event loop only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0

    def take(self) -> None:
        """One more feed, or ``FeedError`` when ``limit`` run already."""
        if self.running >= self.limit:
            raise FeedError(
                f"this worker already serves {self.limit} subscriptions, its limit; "
                "try again later or on another worker"
            )
        self.running += 1

    def give_back(self) -> None:
        self.running -= 1


@dataclass(frozen=True, slots=True)
class FedEvent:
    """An event as the feed hands it over: where it is and what it says."""

    partition: int
    offset: int
    metadata: dict[str, Any]
    data: dict[str, Any]


def _where(settings: Settings, area: str, aggregate_id: str) -> tuple[str, int]:
    topic = settings.topics.events(area)
    return topic, partition_for(aggregate_id.encode(), settings.partitions)


async def aggregate_events(
    settings: Settings,
    codec: Codec,
    area: str,
    aggregate_id: str,
    *,
    from_offset: int | None = None,
    from_version: int = 1,
) -> AsyncGenerator[FedEvent, None]:
    """The events of ``aggregate_id`` in ``area`` ("orders", "accounts"), read from
    ``from_offset`` of its partition (its start when None) with stream versions from
    ``from_version`` on, each once, in order; then each new one as it is committed,
    until the caller stops iterating."""
    topic, partition = _where(settings, area, aggregate_id)
    key = aggregate_id.encode()
    thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sf-feed")
    loop = asyncio.get_running_loop()
    consumer = reader(settings, "graphql-feed", tailing=True)

    def run(work: Callable[[], Any]) -> asyncio.Future[Any]:
        return loop.run_in_executor(thread, work)

    def start() -> None:
        low, _ = watermarks(consumer, topic, partition)
        begin = low if from_offset is None else max(low, from_offset)
        consumer.assign([TopicPartition(topic, partition, begin)])

    def batch() -> list[FedEvent]:
        found = []
        try:
            messages = take(consumer, BATCH, POLL_S)
        except KafkaException as failure:
            raise FeedError(f"reading {topic}[{partition}] failed") from failure
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                raise FeedError(f"reading {topic}[{partition}] failed: {error.str()}")
            if message.key() != key:
                continue
            try:
                data = dict(codec.decode(message.value() or b"").data)
            except (DecodeError, RegistryError) as failure:
                raise FeedError(
                    f"the event at {topic}[{partition}]@{message.offset()} "
                    "could not be decoded"
                ) from failure
            found.append(
                FedEvent(partition, message.offset() or 0, data.pop("metadata"), data)
            )
        return found

    try:
        try:
            await run(start)
        except KafkaException as failure:
            raise FeedError(f"{topic}[{partition}] cannot be read") from failure
        seen = from_version - 1
        while True:
            for event in await run(batch):
                version = int(event.metadata["stream_version"])
                # A repeated stream version is the same event (deterministic ids).
                if version <= seen:
                    continue
                seen = version
                yield event
    finally:
        # Runs after any poll still under way, on the feed's own thread.
        with contextlib.suppress(RuntimeError):
            thread.submit(consumer.close)
        thread.shutdown(wait=False)
