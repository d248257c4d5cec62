"""The event topics as the ``/ws`` push reads them: one shared read_committed
consumer per worker that follows every partition from its end (``LiveFeed``), and
short-lived readers of a backlog below it (``read_backlog``)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from app.adapters.topics import (
    TP,
    KafkaRecord,
    describe,
    read_range,
    reader,
    stable_ends,
    take,
    watermarks,
)
from app.settings import Settings

log = logging.getLogger("streamfold.push")

# Records the feed hands over at once (a connection's queue must hold two such
# bursts: see STREAMFOLD_WS_QUEUE), and batches handed over but not yet taken: the
# feed never runs further ahead of the event loop than that.
BATCH = 100
IN_FLIGHT = 4


class LiveFeed:
    """Follows every partition of ``topics`` from its last stable offset, in a
    thread of its own, and hands each batch of committed records to ``deliver``
    (which must call ``taken`` once it has dealt with it)."""

    def __init__(
        self,
        settings: Settings,
        topics: list[str],
        deliver: Callable[[list[KafkaRecord]], object],
    ) -> None:
        self.settings = settings
        self.topics = topics
        self.deliver = deliver
        self.consumer: Consumer | None = None
        self._slots = threading.BoundedSemaphore(IN_FLIGHT)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> dict[TP, int]:
        """Assign every partition at its last stable offset (the end a
        read_committed reader sees) and start following; returns those offsets,
        the feed's first position. Blocking."""
        starts = stable_ends(self.settings, self.topics)
        consumer = Consumer(
            {
                **self.settings.consumer_config(),
                "group.id": f"{self.settings.app_id}.push",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 50,
            }
        )
        describe(consumer, self.topics)
        consumer.assign([TopicPartition(t, p, o) for (t, p), o in starts.items()])
        self.consumer = consumer
        self._thread = threading.Thread(
            target=self._run, name="sf-push-feed", daemon=True
        )
        self._thread.start()
        return starts

    def cpu_s(self) -> float:
        """CPU seconds of the feed's thread so far (librdkafka's own threads
        aside); 0 before it starts or once it has stopped."""
        thread = self._thread
        if thread is None or thread.ident is None or not thread.is_alive():
            return 0.0
        try:
            return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
        except OSError:  # it stopped meanwhile
            return 0.0

    def taken(self) -> None:
        """The event loop has dealt with one batch."""
        self._slots.release()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        consumer = self.consumer
        assert consumer is not None
        try:
            while not self._stopping.is_set():
                if not self._slots.acquire(timeout=0.5):
                    continue
                batch = []
                arrived = take(consumer, BATCH, 0.2)
                for message in arrived:
                    error = message.error()
                    if error is not None:
                        # librdkafka retries on its own; an error here is reported
                        # and the feed goes on from where it stands.
                        log.warning("push feed: %s", error.str())
                        continue
                    batch.append(KafkaRecord.of(message))
                if batch:
                    self.deliver(batch)
                else:
                    self._slots.release()
        except Exception:
            # Fatal to librdkafka (or a bug): subscribers get nothing more from
            # this worker until it restarts, which the log must say.
            log.exception("push feed stopped")
        finally:
            consumer.close()


def read_backlog(
    settings: Settings,
    ranges: Mapping[TP, tuple[int, int]],
    wanted: Callable[[KafkaRecord], Any],
    limit: int = 5_000,
) -> tuple[list[tuple[KafkaRecord, Any]], dict[TP, int]]:
    """The committed records in ``ranges`` (``[start, end)`` per partition) for
    which ``wanted`` gives something other than None, with what it gave, in offset
    order per partition; and how far each partition was read (its end, or less
    once ``limit`` records were read in all). Blocking; one consumer per call."""
    consumer = reader(settings, "push-backlog")
    found: list[tuple[KafkaRecord, Any]] = []
    reached: dict[TP, int] = {}
    scanned = 0
    try:
        for (topic, partition), (start, end) in sorted(ranges.items()):
            if scanned >= limit:
                break
            reached[(topic, partition)] = end
            # Below the low watermark nothing is left to read (the event topics keep
            # everything, unless someone deleted records): an offset out of range
            # would send the reader to the end, past what is there.
            low, _ = watermarks(consumer, topic, partition)
            for message in read_range(consumer, topic, partition, max(start, low), end):
                record = KafkaRecord.of(message)
                scanned += 1
                given = wanted(record)
                if given is not None:
                    found.append((record, given))
                if scanned >= limit:
                    reached[(topic, partition)] = record.offset + 1
                    break
    finally:
        consumer.close()
    return found, reached
