"""Runs a projection from event topics into Postgres with an exactly-once effect.

Each batch's rows and the projection's position (projection, topic, partition, next
offset) commit in one Postgres transaction; on start the projection resumes from the
stored position. Kafka's committed group offsets follow the Postgres commit so Kafka's
own tools show lag and can rewind the group: a rewound group is noticed at start-up
and the projection is rebuilt from the beginning.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import psycopg
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from app.adapters.codec import Codec, DecodeError, RegistryUnavailable
from app.adapters.topics import FOREVER, TopicSpec, ensure_topics
from app.settings import Settings

log = logging.getLogger("streamfold.projections")

Handler = Callable[[psycopg.Cursor[Any], dict[str, Any], dict[str, Any]], None]


class Projection(Protocol):
    """A read model: which events it folds, into which tables, and how."""

    name: str
    areas: tuple[str, ...]
    tables: tuple[str, ...]
    handlers: Mapping[str, Handler]


@dataclass(frozen=True, slots=True)
class Event:
    topic: str
    partition: int
    offset: int
    metadata: dict[str, Any]
    data: dict[str, Any]
    # Kept so a poison event is dead-lettered with its original bytes.
    message: Any = field(repr=False, compare=False, default=None)


def group_id(settings: Settings, projection: str) -> str:
    return f"{settings.app_id}.projection.{projection}"


def dead_letter_topic(settings: Settings, projection: str) -> str:
    return f"{settings.topics.prefix}projection.{projection}.dlq"


def source_topics(settings: Settings, projection: Projection) -> list[str]:
    return [settings.topics.events(area) for area in projection.areas]


def stored_positions(
    conn: psycopg.Connection[Any], projection: str
) -> dict[tuple[str, int], int]:
    rows = conn.execute(
        "SELECT topic, partition, next_offset FROM projection_positions WHERE projection = %s",
        (projection,),
    ).fetchall()
    return {(topic, partition): offset for topic, partition, offset in rows}


def reset(conn: psycopg.Connection[Any], projection: Projection) -> None:
    """Empty the projection's tables and forget its positions (one transaction)."""
    with conn.transaction():
        conn.execute("TRUNCATE " + ", ".join(projection.tables))  # type: ignore[arg-type]
        conn.execute(
            "DELETE FROM projection_positions WHERE projection = %s", (projection.name,)
        )
        conn.execute(
            "DELETE FROM projection_streams WHERE projection = %s", (projection.name,)
        )


@dataclass
class Status:
    """What `/status`, `/metrics` and `streamfold status` report for one projection."""

    projection: str
    applied: int = 0
    dead_lettered: int = 0
    last_event_at: datetime | None = None
    positions: dict[tuple[str, int], int] = field(default_factory=dict)
    heads: dict[tuple[str, int], int] = field(default_factory=dict)
    rebuilt_at: datetime | None = None
    error: str | None = None

    @property
    def lag_events(self) -> int:
        return sum(
            max(high - self.positions.get(tp, 0), 0) for tp, high in self.heads.items()
        )

    @property
    def lag_seconds(self) -> float:
        if self.lag_events == 0 or self.last_event_at is None:
            return 0.0
        return max((datetime.now(UTC) - self.last_event_at).total_seconds(), 0.0)


class ProjectionRunner:
    """One projection's consume → apply → commit loop, on its own thread."""

    def __init__(
        self,
        settings: Settings,
        projection: Projection,
        codec: Codec,
        *,
        batch_size: int = 1000,
        poll_timeout: float = 0.05,
    ) -> None:
        self.settings = settings
        self.projection = projection
        self.codec = codec
        self.batch_size = batch_size
        self.poll_timeout = poll_timeout
        self.status = Status(projection.name)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._progress = threading.Condition()

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.run, name=f"projection-{self.projection.name}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        """Consume until stopped; infrastructure failures are retried, never skipped."""
        delay = 0.5
        while not self._stop.is_set():
            try:
                self._run_once()
                return
            except (
                psycopg.OperationalError,
                RegistryUnavailable,
                KafkaTransient,
            ) as error:
                self.status.error = f"{type(error).__name__}: {error}"
                log.warning(
                    "projection %s: %s; retrying in %.1fs",
                    self.projection.name,
                    error,
                    delay,
                )
                self._close()
                self._stop.wait(delay)
                delay = min(delay * 2, 10.0)

    def _run_once(self) -> None:
        self._conn = psycopg.connect(self.settings.database_url, autocommit=False)
        self._consumer = Consumer(
            {
                **self.settings.kafka_client_config(),
                "group.id": group_id(self.settings, self.projection.name),
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                "fetch.wait.max.ms": 50,
            }
        )
        self._consumer.subscribe(
            source_topics(self.settings, self.projection), on_assign=self._on_assign
        )
        self.status.error = None
        try:
            while not self._stop.is_set():
                messages = self._consumer.consume(self.batch_size, self.poll_timeout)
                if messages:
                    self._handle(messages)
                self._refresh_heads()
        finally:
            self._close()

    def _close(self) -> None:
        for closer in (self._consumer, self._conn):
            # Closing after a failure may fail again; there is nothing left to save.
            with contextlib.suppress(Exception):
                if closer is not None:
                    closer.close()
        self._consumer = self._conn = None

    # -- assignment: resume from Postgres, notice rewinds ---------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        assert self._conn is not None
        stored = stored_positions(self._conn, self.projection.name)
        self._conn.commit()
        committed = consumer.committed(partitions, timeout=30)
        rewound = [
            tp
            for tp in committed
            if tp.offset >= 0 and tp.offset < stored.get((tp.topic, tp.partition), 0)
        ]
        if rewound:
            # Someone rewound the group (kafka-consumer-groups --reset-offsets): the rows
            # no longer match the offsets, so rebuild from the start of the log.
            log.warning(
                "projection %s: group offsets rewound on %s; rebuilding from the "
                "beginning",
                self.projection.name,
                ", ".join(f"{tp.topic}[{tp.partition}]" for tp in rewound),
            )
            reset(self._conn, self.projection)
            self.status.rebuilt_at = datetime.now(UTC)
            stored = {}
        for tp in partitions:
            position = stored.get((tp.topic, tp.partition))
            tp.offset = position if position is not None else _earliest(consumer, tp)
            self.status.positions[(tp.topic, tp.partition)] = tp.offset
        consumer.assign(partitions)

    def _refresh_heads(self) -> None:
        assert self._consumer is not None
        for tp in self._consumer.assignment():
            high = -1
            with contextlib.suppress(Exception):  # no cached watermark yet is fine
                _, high = self._consumer.get_watermark_offsets(tp, cached=True)
            if high >= 0:
                self.status.heads[(tp.topic, tp.partition)] = high

    # -- the batch ------------------------------------------------------------------

    def _handle(self, messages: list[Message]) -> None:
        events: list[Event] = []
        rejects: list[tuple[Message, str]] = []
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                if error.retriable() or not error.fatal():
                    raise KafkaTransient(str(error))
                raise RuntimeError(f"Kafka error: {error}")
            try:
                decoded = self.codec.decode(message.value())
                data = dict(decoded.data)
                metadata = data.pop("metadata")
                # Where the event came from, for projections that index the log itself.
                metadata["source"] = {
                    "topic": message.topic(),
                    "partition": message.partition(),
                    "offset": message.offset(),
                    "record_name": decoded.record_name,
                    "writer_version": decoded.writer_version,
                }
            except DecodeError as error:
                rejects.append((message, f"undecodable event: {error.reason}"))
                continue
            except (KeyError, TypeError):
                rejects.append((message, "not an event record (no metadata)"))
                continue
            events.append(
                Event(
                    message.topic(),
                    message.partition(),
                    message.offset(),
                    metadata,
                    data,
                    message,
                )
            )
        try:
            self._apply(events, [m for m, _ in rejects])
        except (psycopg.OperationalError, KafkaTransient):
            raise
        except Exception as error:  # noqa: BLE001 - find the poison event, keep going
            assert self._conn is not None
            self._conn.rollback()
            log.warning(
                "projection %s: batch failed (%s); applying one by one",
                self.projection.name,
                error,
            )
            for event in events:
                try:
                    self._apply([event], [])
                except psycopg.OperationalError:
                    raise
                except Exception as single:  # noqa: BLE001 - this one is the poison
                    self._conn.rollback()
                    rejects.append(
                        (event.message, f"{type(single).__name__}: {single}")
                    )
                    self._apply([], [event.message])
        for message, reason in rejects:
            self._dead_letter(message, reason)
        self._commit_offsets()

    def _apply(self, events: list[Event], skipped: Iterable[Any]) -> None:
        """Apply events and record positions in one transaction."""
        conn = self._conn
        assert conn is not None
        name = self.projection.name
        positions: dict[tuple[str, int], int] = {}
        for item in skipped:
            key = (item.topic(), item.partition())
            positions[key] = max(positions.get(key, 0), item.offset() + 1)
        applied = 0
        with conn.cursor() as cur:
            ids = list({e.metadata["aggregate_id"] for e in events})
            versions: dict[str, int] = {}
            if ids:
                cur.execute(
                    "SELECT aggregate_id, version FROM projection_streams "
                    "WHERE projection = %s AND aggregate_id = ANY(%s)",
                    (name, ids),
                )
                versions = dict(cur.fetchall())  # type: ignore[arg-type]
            touched: dict[str, int] = {}
            with conn.pipeline():
                for event in events:
                    key = (event.topic, event.partition)
                    positions[key] = max(positions.get(key, 0), event.offset + 1)
                    aggregate_id = event.metadata["aggregate_id"]
                    version = event.metadata["stream_version"]
                    if version <= versions.get(aggregate_id, 0):
                        continue  # seen before: a re-emitted or replayed event
                    versions[aggregate_id] = touched[aggregate_id] = version
                    handlers = self.projection.handlers
                    # "*" is a projection's catch-all, e.g. the event-log index.
                    handler = handlers.get(
                        event.metadata["event_type"], handlers.get("*")
                    )
                    if handler is not None:
                        handler(cur, event.metadata, event.data)
                    applied += 1
                if touched:
                    cur.executemany(
                        "INSERT INTO projection_streams (projection, aggregate_id, version) "
                        "VALUES (%s, %s, %s) ON CONFLICT (projection, aggregate_id) "
                        "DO UPDATE SET version = EXCLUDED.version",
                        [(name, a, v) for a, v in touched.items()],
                    )
                if positions:
                    cur.executemany(
                        "INSERT INTO projection_positions (projection, topic, partition, "
                        "next_offset, updated_at) VALUES (%s, %s, %s, %s, now()) "
                        "ON CONFLICT (projection, topic, partition) DO UPDATE SET "
                        "next_offset = EXCLUDED.next_offset, updated_at = now()",
                        [(name, t, p, o) for (t, p), o in positions.items()],
                    )
        conn.commit()
        with self._progress:
            self.status.positions.update(positions)
            self.status.applied += applied
            if events:
                self.status.last_event_at = events[-1].metadata["timestamp"]
            self._progress.notify_all()

    def _commit_offsets(self) -> None:
        """Mirror Postgres' positions into the group (Postgres stays authoritative)."""
        assert self._consumer is not None
        offsets = [
            TopicPartition(t, p, o) for (t, p), o in self.status.positions.items()
        ]
        if offsets:
            try:
                self._consumer.commit(offsets=offsets, asynchronous=False)
            except Exception as error:  # noqa: BLE001 - the next batch commits again
                log.info(
                    "projection %s: offset commit deferred: %s",
                    self.projection.name,
                    error,
                )

    def _dead_letter(self, message: Any, reason: str) -> None:
        if self._producer is None:
            topic = dead_letter_topic(self.settings, self.projection.name)
            ensure_topics(
                self.settings, [TopicSpec(topic, 1, dict(FOREVER), tuple(FOREVER))]
            )
            self._producer = Producer(self.settings.producer_config())
        headers = [
            *(message.headers() or []),
            ("dlq-source-topic", message.topic().encode()),
            ("dlq-source-partition", str(message.partition()).encode()),
            ("dlq-source-offset", str(message.offset()).encode()),
            ("dlq-projection", self.projection.name.encode()),
            ("dlq-reason", reason.encode()[:4000]),
        ]
        self._producer.produce(
            dead_letter_topic(self.settings, self.projection.name),
            message.value(),
            key=message.key(),
            headers=headers,
        )
        if self._producer.flush(30) != 0:
            raise KafkaTransient("dead letter not acknowledged")
        self.status.dead_lettered += 1
        log.warning(
            "projection %s dead-lettered %s[%d]@%d: %s",
            self.projection.name,
            message.topic(),
            message.partition(),
            message.offset(),
            reason,
        )

    # -- read-your-writes -------------------------------------------------------------

    def wait_for(self, topic: str, partition: int, offset: int, timeout: float) -> bool:
        """True once the projection has applied ``offset`` of ``topic[partition]``."""
        deadline = time.monotonic() + timeout
        with self._progress:
            while self.status.positions.get((topic, partition), 0) <= offset:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._progress.wait(remaining)
        return True


class KafkaTransient(RuntimeError):
    """A retriable Kafka error: the batch is retried from the stored position."""


def _earliest(consumer: Consumer, tp: TopicPartition) -> int:
    low, _ = consumer.get_watermark_offsets(
        TopicPartition(tp.topic, tp.partition), timeout=30
    )
    return int(low)
