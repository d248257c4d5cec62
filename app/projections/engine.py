"""Runs a projection from event topics into Postgres with an exactly-once effect.

Each batch's rows and the projection's position (projection, topic, partition, next
offset) commit in one Postgres transaction; on start the projection resumes from the
stored position. Kafka's committed group offsets follow the Postgres commit so Kafka's
own tools show lag and can rewind the group: a rewound group is noticed at start-up
and the projection is rebuilt from the beginning.

Each batch transaction also takes the projection's switch lock (shared) and checks its
epoch: a replay that swapped or emptied the tables meanwhile (``replay.py``) bumps the
epoch under the same lock held exclusively, and the runner then drops the batch and
seeks to the positions the new tables hold.

Several runners of one projection (processes of one worker, or several workers) share
its partitions through their consumer group. A rebalance can hand a partition to
another runner while this one still holds a batch of it, so each batch transaction
also locks its partitions (advisory locks, in order) and checks that Postgres still
holds the positions this runner last saw there; if another runner has moved one, the
batch is dropped and the runner continues from Postgres. No event is applied twice,
even by two runners at once.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, cast

import psycopg
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from psycopg import sql

from app.adapters import topics
from app.adapters.codec import Codec, DecodeError, RegistryUnavailable
from app.adapters.rows import Rows, Table, describe
from app.deadletters import dead_letter_headers
from app.settings import Settings
from app.waiting import Backoff

log = logging.getLogger("streamfold.projections")

# Any constants work; every Streamfold process has to use the same ones.
SWITCH_LOCK = 0x5F0_1E
PARTITION_LOCK = 0x5F0_20
# The metadata of the group offsets a runner commits: set by nobody else (Kafka's
# tools leave it empty), so offsets behind Postgres without it are a rewind.
COMMIT_MARK = "streamfold-projection"
# Events a runner applies before it first checks its tables' statistics.
ANALYZE_FIRST = 1_000
# How often an idle runner looks for a replay's switch (a busy one checks every batch).
EPOCH_CHECK_S = 1.0

# A handler describes what one event does to the tables; ``Rows`` writes a batch's
# worth at once.
Handler = Callable[[Rows, dict[str, Any], dict[str, Any]], None]


class Projection(Protocol):
    """A read model: which events it folds, into which tables, and how.

    Handlers change only ``tables`` (written in that order), through the ``Rows`` they
    are given, and send nothing outward: no Kafka, HTTP or mail. A replay folds the
    whole log again, so anything sent from a handler would be sent again. The
    Postgres projections keep it so; the runner's own dead letters are sent once per
    source event (see ``ProjectionRunner._dead_letter``). ``conflicts`` says what an
    insert does on a key conflict, per table (see ``Rows``).
    """

    @property
    def name(self) -> str: ...
    @property
    def areas(self) -> tuple[str, ...]: ...
    @property
    def tables(self) -> tuple[str, ...]: ...
    @property
    def handlers(self) -> Mapping[str, Handler]: ...
    @property
    def conflicts(self) -> Mapping[str, str]: ...


@dataclass(frozen=True, slots=True)
class DecodedEvent:
    """An event read from its topic, decoded at the newest version of its record:
    where it sits, its metadata and its payload (the dicts a handler takes)."""

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


def switch_lock(projection: str) -> tuple[int, int]:
    """The advisory lock key guarding a projection's tables against a swap."""
    return SWITCH_LOCK, zlib.crc32(projection.encode()) - 2**31


def lock_for_switch(conn: psycopg.Connection[Any], projection: str) -> None:
    """Hold the switch lock exclusively until the transaction ends: running batches
    finish first, later ones wait and then see the new epoch."""
    conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", switch_lock(projection))


def current_epoch(conn: psycopg.Connection[Any], projection: str) -> int:
    row = conn.execute(
        "SELECT epoch FROM projection_epochs WHERE projection = %s", (projection,)
    ).fetchone()
    return int(row[0]) if row else 0


def bump_epoch(conn: psycopg.Connection[Any], projection: str) -> int:
    row = conn.execute(
        "INSERT INTO projection_epochs (projection, epoch) VALUES (%s, 1) "
        "ON CONFLICT (projection) DO UPDATE SET "
        "epoch = projection_epochs.epoch + 1, changed_at = now() RETURNING epoch",
        (projection,),
    ).fetchone()
    assert row is not None
    return int(row[0])


def reset(conn: psycopg.Connection[Any], projection: Projection) -> int:
    """Empty the projection's tables, forget its positions and bump its epoch (one
    transaction, under the switch lock); return the new epoch."""
    with conn.transaction():
        lock_for_switch(conn, projection.name)
        conn.execute(
            sql.SQL("TRUNCATE {}").format(
                sql.SQL(", ").join(map(sql.Identifier, projection.tables))
            )
        )
        conn.execute(
            "DELETE FROM projection_positions WHERE projection = %s", (projection.name,)
        )
        conn.execute(
            "DELETE FROM projection_streams WHERE projection = %s", (projection.name,)
        )
        return bump_epoch(conn, projection.name)


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
    """One projection's consume → apply → commit loop, on its own thread.

    ``schema`` and ``group`` let a replay run the same code into a schema of its own
    under a consumer group of its own; by default the live tables and group.
    """

    def __init__(
        self,
        settings: Settings,
        projection: Projection,
        codec: Codec,
        *,
        batch_size: int = 1000,
        poll_timeout: float = 0.05,
        schema: str = "public",
        group: str | None = None,
        on_progress: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.projection = projection
        self.codec = codec
        self.batch_size = batch_size
        self.poll_timeout = poll_timeout
        self.schema = schema
        self.group = group or group_id(settings, projection.name)
        self._epoch: int | None = None
        # Events applied at which to check the tables' statistics next (``_analyze``).
        self._next_analyze = ANALYZE_FIRST
        self._next_epoch_check = 0.0
        self._dead_lettered: set[tuple[str, int, int]] = set()
        self.status = Status(projection.name)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self._tables: dict[str, Table] | None = None
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._progress = threading.Condition()
        # Called after each commit, assignment and table switch, on the runner's
        # thread.
        self._on_progress = on_progress

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.run, name=f"projection-{self.projection.name}", daemon=True
        )
        self._thread.start()
        _STARTED.add(self)

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def run(self) -> None:
        """Consume until stopped; infrastructure failures are retried, never skipped."""
        backoff = Backoff(0.5, 10.0)
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
                delay = backoff.next()
                log.warning(
                    "projection %s: %s; retrying in %.1fs",
                    self.projection.name,
                    error,
                    delay,
                )
                self._close()
                self._stop.wait(delay)
            except Exception as error:
                # A bug, not a fault to wait out: stop, named, so the process running
                # this runner exits and is restarted (``process.project``).
                self.status.error = f"stopped: {type(error).__name__}: {error}"
                log.exception("projection %s stopped", self.projection.name)
                self._close()
                raise

    def _run_once(self) -> None:
        options: dict[str, Any] = {}
        if self.schema != "public":
            # Only the replay's schema: a table it did not copy fails loudly instead
            # of writing to the live one.
            options["options"] = f"-c search_path={self.schema}"
        self._conn = psycopg.connect(
            self.settings.database_url, autocommit=False, **options
        )
        self._consumer = Consumer(
            {
                **self.settings.consumer_config(),
                "group.id": self.group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                # A long poll, as the write side's (``Processor.consumer_config``).
                "fetch.wait.max.ms": 500,
                # As the worker's own consumers: a killed worker's partitions move on
                # (and its group can be reset) after this, not librdkafka's 45 s.
                "session.timeout.ms": int(self.settings.session_timeout_s * 1000),
            }
        )
        self._consumer.subscribe(
            source_topics(self.settings, self.projection),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
        )
        self.status.error = None
        try:
            while not self._stop.is_set():
                messages = topics.take(
                    self._consumer, self.batch_size, self.poll_timeout
                )
                try:
                    if messages:
                        self._write(*self._decode(messages))
                    elif time.monotonic() >= self._next_epoch_check:
                        self._check_epoch()
                except Superseded:
                    self._resync()
                    continue
                self._refresh_heads(idle=not messages)
        finally:
            self._close()

    def _close(self) -> None:
        for closer in (self._consumer, self._conn):
            # Closing after a failure may fail again; there is nothing left to save.
            with contextlib.suppress(Exception):
                if closer is not None:
                    closer.close()
        self._consumer = self._conn = None
        self._tables = None
        # What the closed consumer held is no longer this runner's to report or
        # commit: a partition it had may be another runner's by the next assignment,
        # and a stale "caught up" here would hide that runner's lag in the merged
        # status (`process._merged` keeps the furthest report).
        with self._progress:
            self.status.positions.clear()
            self.status.heads.clear()
            self._progress.notify_all()

    # -- assignment: resume from Postgres, notice rewinds ---------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        assert self._conn is not None
        # The epoch before the positions: a switch in between is noticed later.
        epoch = current_epoch(self._conn, self.projection.name)
        stored = stored_positions(self._conn, self.projection.name)
        self._conn.commit()
        try:
            epoch = self._start_at(consumer, partitions, stored, epoch)
        except KafkaException as error:
            # The broker away or its group coordinator moving (a broker restart):
            # raised out of the poll, and the runner starts a new consumer.
            raise KafkaTransient(
                f"assigning {len(partitions)} partitions: {error}"
            ) from error
        with self._progress:
            for tp in partitions:
                self.status.positions[(tp.topic, tp.partition)] = tp.offset
            # Read-your-writes waiters: a position already past theirs answers now.
            self._progress.notify_all()
        self._epoch = epoch
        consumer.assign(partitions)
        if self._on_progress is not None:
            self._on_progress()

    def _start_at(
        self,
        consumer: Consumer,
        partitions: list[TopicPartition],
        stored: dict[tuple[str, int], int],
        epoch: int,
    ) -> int:
        """Set each partition's offset: where Postgres has it, else the log's start;
        the whole log again when someone rewound the group (the tables' epoch then
        moves on: the new one is returned)."""
        assert self._conn is not None
        committed = topics.committed_offsets(consumer, partitions)
        # Behind Postgres is a rewind only if someone else committed it: a runner's
        # own commit (marked) lags Postgres when it died or lost the partition
        # between the two commits, and then Postgres simply wins.
        rewound = [
            tp
            for tp in committed
            if tp.offset >= 0
            and tp.offset < stored.get((tp.topic, tp.partition), 0)
            and tp.metadata != COMMIT_MARK
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
            epoch = reset(self._conn, self.projection)
            self.status.rebuilt_at = datetime.now(UTC)
            stored = {}
        for tp in partitions:
            position = stored.get((tp.topic, tp.partition))
            tp.offset = position if position is not None else _earliest(consumer, tp)
        return epoch

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Commit the revoked partitions' offsets, then forget them: their progress
        is now another runner's to report, and a batch of theirs still in hand fails
        the position check."""
        self._commit_offsets()
        with self._progress:
            for tp in partitions:
                key = (tp.topic, tp.partition)
                self.status.positions.pop(key, None)
                self.status.heads.pop(key, None)
            self._progress.notify_all()
        if self._on_progress is not None:
            self._on_progress()

    # -- epochs: a replay swapped or emptied the tables -----------------------------

    def _check_epoch(self) -> None:
        assert self._conn is not None
        self._next_epoch_check = time.monotonic() + EPOCH_CHECK_S
        if self._epoch is None:
            return  # not assigned yet; the assignment reads the epoch
        epoch = current_epoch(self._conn, self.projection.name)
        self._conn.commit()
        if epoch != self._epoch:
            raise Superseded

    def _fence(
        self, cur: psycopg.Cursor[Any], partitions: Iterable[tuple[str, int]]
    ) -> None:
        """First in every batch transaction: the shared switch lock, then the epoch,
        then the batch's partitions: locked in order, and still where this runner
        last saw them in Postgres (no other runner moved them)."""
        name = self.projection.name
        cur.execute("SELECT pg_advisory_xact_lock_shared(%s, %s)", switch_lock(name))
        # A statement of its own: its snapshot is taken once the lock is granted, so
        # it sees a switch that committed while this batch waited.
        cur.execute(
            "SELECT epoch FROM projection_epochs WHERE projection = %s", (name,)
        )
        row = cur.fetchone()
        if (row[0] if row else 0) != self._epoch:
            assert self._conn is not None
            self._conn.rollback()
            raise Superseded
        keys = sorted(partitions)
        for topic, partition in keys:
            cur.execute(
                "SELECT pg_advisory_xact_lock(%s, %s)",
                (
                    PARTITION_LOCK,
                    zlib.crc32(f"{self.schema}/{name}/{topic}/{partition}".encode())
                    - 2**31,
                ),
            )
        if not keys:
            return
        cur.execute(
            "SELECT topic, partition, next_offset FROM projection_positions "
            "WHERE projection = %s AND topic = ANY(%s)",
            (name, list({topic for topic, _ in keys})),
        )
        stored = {(t, p): o for t, p, o in cur.fetchall()}
        # status.positions holds what this runner read or wrote there last (a
        # partition without a row starts at its earliest offset); a revoked one is
        # gone from it.
        held = self.status.positions
        moved = [k for k in keys if k not in held or stored.get(k, held[k]) != held[k]]
        if moved:
            assert self._conn is not None
            self._conn.rollback()
            log.warning(
                "projection %s: %s moved by another runner (or no longer assigned "
                "here); continuing from Postgres",
                name,
                ", ".join(f"{t}[{p}]" for t, p in moved),
            )
            raise Superseded

    def _resync(self) -> None:
        """Continue from the positions the current tables hold; what was fetched for
        the old ones is dropped by the seek."""
        conn, consumer = self._conn, self._consumer
        assert conn is not None
        assert consumer is not None
        name = self.projection.name
        conn.rollback()
        epoch = current_epoch(conn, name)
        stored = stored_positions(conn, name)
        conn.commit()
        positions = {}
        for tp in consumer.assignment():
            position = stored.get((tp.topic, tp.partition))
            if position is None:
                position = _earliest(consumer, tp)
            positions[(tp.topic, tp.partition)] = position
        log.warning(
            "projection %s: continuing from the positions Postgres holds (epoch "
            "%d -> %d: a replay replaced the tables, or another runner moved a "
            "partition)",
            name,
            self._epoch or 0,
            epoch,
        )
        with self._progress:
            self.status.positions = positions
            self.status.rebuilt_at = datetime.now(UTC)
            self._progress.notify_all()
        if self._on_progress is not None:
            self._on_progress()
        # Offsets first: should the seek fail and the consumer start over, the group
        # must not look rewound (that would rebuild the projection once more).
        self._commit_offsets()
        try:
            for (topic, partition), offset in positions.items():
                consumer.seek(TopicPartition(topic, partition, offset))
        except KafkaException as error:
            raise KafkaTransient(f"seek after a table switch: {error}") from error
        self._epoch = epoch

    def _refresh_heads(self, idle: bool = False) -> None:
        assert self._consumer is not None
        assignment = self._consumer.assignment()
        # When idle, every event handed over is applied; a consumer at the end may
        # still be past the last one, by the commit markers of the write side's
        # transactions (each takes an offset): for lag, the head is then where
        # the projection is.
        read = (
            {
                (tp.topic, tp.partition): tp.offset
                for tp in self._consumer.position(assignment)
            }
            if idle
            else {}
        )
        for tp in assignment:
            key = (tp.topic, tp.partition)
            high = -1
            with contextlib.suppress(Exception):  # no cached watermark yet is fine
                _, high = self._consumer.get_watermark_offsets(tp, cached=True)
            if high < 0:
                continue
            applied = self.status.positions.get(key)
            if applied is not None and read.get(key, -1) >= high:
                high = min(high, applied)
            self.status.heads[key] = high

    # -- the batch ------------------------------------------------------------------

    def _decode(
        self, messages: list[Message]
    ) -> tuple[list[DecodedEvent], list[tuple[Message, str]]]:
        events: list[DecodedEvent] = []
        rejects: list[tuple[Message, str]] = []
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                if error.retriable() or not error.fatal():
                    raise KafkaTransient(str(error))
                raise RuntimeError(f"Kafka error: {error}")
            value = message.value()
            if value is None:
                rejects.append((message, "empty message (no value)"))
                continue
            # Set on every message without an error.
            topic = cast(str, message.topic())
            partition = cast(int, message.partition())
            offset = cast(int, message.offset())
            try:
                decoded = self.codec.decode(value)
                data = dict(decoded.data)
                metadata = data.pop("metadata")
                # Where the event came from, for projections that index the log itself.
                metadata["source"] = {
                    "topic": topic,
                    "partition": partition,
                    "offset": offset,
                    "record_name": decoded.record_name,
                    "writer_version": decoded.writer_version,
                }
            except DecodeError as undecodable:
                rejects.append((message, f"undecodable event: {undecodable.reason}"))
                continue
            except (KeyError, TypeError):
                rejects.append((message, "not an event record (no metadata)"))
                continue
            events.append(
                DecodedEvent(topic, partition, offset, metadata, data, message)
            )
        return events, rejects

    def _write(
        self, events: list[DecodedEvent], rejects: list[tuple[Message, str]]
    ) -> None:
        """Apply a decoded batch, dead-letter its poison, commit its offsets."""
        try:
            self._apply(events, [m for m, _ in rejects])
        except (psycopg.OperationalError, KafkaTransient, Superseded):
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
                except (psycopg.OperationalError, Superseded):
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
        if self.status.applied >= self._next_analyze:
            self._next_analyze = 2 * self.status.applied
            self._analyze()

    def _analyze(self) -> None:
        """ANALYZE those of the projection's tables Postgres has no fresh statistics
        for. A new table (a first run, a replay's copy) that grows fast has none
        until autovacuum comes by (up to a minute), and meanwhile the planner takes
        it for tiny: it looks a batch's keys up with a scan of all the rows (the
        first replay of 60,000 events spent half its time there). Checked as the
        runner's work doubles, so a long run analyzes a few times at most."""
        conn = self._conn
        assert conn is not None
        stale = [
            name
            for (name,) in conn.execute(
                "SELECT relname FROM pg_stat_user_tables WHERE relid IN "
                "(SELECT to_regclass(t) FROM unnest(%s::text[]) AS t) AND "
                "(coalesce(last_analyze, last_autoanalyze) IS NULL "
                "OR n_mod_since_analyze > n_live_tup / 2)",
                ([*self.projection.tables, "projection_streams"],),
            ).fetchall()
        ]
        conn.commit()
        for name in stale:
            try:
                # Never wait on another runner's ANALYZE of the same table.
                conn.execute("SET LOCAL lock_timeout = '100ms'")
                conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(name)))
                conn.commit()
            except (
                psycopg.errors.LockNotAvailable,
                psycopg.errors.InsufficientPrivilege,
            ) as error:
                conn.rollback()
                log.info(
                    "projection %s: ANALYZE %s skipped: %s",
                    self.projection.name,
                    name,
                    error,
                )

    def _apply(self, events: list[DecodedEvent], skipped: Iterable[Any]) -> None:
        """Apply events and record positions in one transaction."""
        conn = self._conn
        assert conn is not None
        name = self.projection.name
        positions: dict[tuple[str, int], int] = {}
        for item in skipped:
            key = (item.topic(), item.partition())
            positions[key] = max(positions.get(key, 0), item.offset() + 1)
        applied = 0
        if self._tables is None:
            self._tables = {t: describe(conn, t) for t in self.projection.tables}
        # In a pipeline, Postgres works through one statement while the next is built.
        with conn.cursor() as cur, conn.pipeline():
            self._fence(cur, {*positions, *((e.topic, e.partition) for e in events)})
            ids = list({e.metadata["aggregate_id"] for e in events})
            versions: dict[str, int] = {}
            if ids:
                cur.execute(
                    "SELECT aggregate_id, version FROM projection_streams "
                    "WHERE projection = %s AND aggregate_id = ANY(%s)",
                    (name, ids),
                )
                versions = dict(cur.fetchall())
            touched: dict[str, int] = {}
            rows = Rows(self._tables, self.projection.conflicts)
            handlers = self.projection.handlers
            for event in events:
                key = (event.topic, event.partition)
                positions[key] = max(positions.get(key, 0), event.offset + 1)
                aggregate_id = event.metadata["aggregate_id"]
                version = event.metadata["stream_version"]
                if version <= versions.get(aggregate_id, 0):
                    continue  # seen before: a re-emitted or replayed event
                versions[aggregate_id] = touched[aggregate_id] = version
                # "*" is a projection's catch-all, e.g. the event-log index.
                handler = handlers.get(event.metadata["event_type"], handlers.get("*"))
                if handler is not None:
                    handler(rows, event.metadata, event.data)
                applied += 1
            rows.write(cur, self.projection.tables)
            if touched:
                cur.execute(
                    "INSERT INTO projection_streams (projection, aggregate_id, version) "
                    "SELECT %s, * FROM unnest(%b::text[], %b::bigint[]) "
                    "ON CONFLICT (projection, aggregate_id) "
                    "DO UPDATE SET version = EXCLUDED.version",
                    (name, list(touched), list(touched.values())),
                )
            if positions:
                cur.execute(
                    "INSERT INTO projection_positions (projection, topic, partition, "
                    "next_offset, updated_at) SELECT %s, *, now() FROM "
                    "unnest(%b::text[], %b::int[], %b::bigint[]) "
                    "ON CONFLICT (projection, topic, partition) DO UPDATE SET "
                    "next_offset = EXCLUDED.next_offset, updated_at = now()",
                    (
                        name,
                        [t for t, _ in positions],
                        [p for _, p in positions],
                        list(positions.values()),
                    ),
                )
        conn.commit()
        with self._progress:
            self.status.positions.update(positions)
            self.status.applied += applied
            if events:
                self.status.last_event_at = events[-1].metadata["timestamp"]
            self._progress.notify_all()
        if self._on_progress is not None:
            self._on_progress()

    def _commit_offsets(self) -> None:
        """Mirror Postgres' positions into the group (Postgres stays authoritative)."""
        assert self._consumer is not None
        offsets = [
            TopicPartition(t, p, o, metadata=COMMIT_MARK)
            for (t, p), o in self.status.positions.items()
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
        """Send a poison event to the dead-letter topic, once per source event: a
        replay or a rewound group meets the same poison again and sends nothing."""
        if self._producer is None:
            topic = dead_letter_topic(self.settings, self.projection.name)
            topics.ensure_topics(
                self.settings,
                [
                    topics.TopicSpec(
                        topic, 1, dict(topics.FOREVER), tuple(topics.FOREVER)
                    )
                ],
            )
            self._dead_lettered = dead_lettered(self.settings, topic)
            self._producer = Producer(self.settings.producer_config())
        source = topics.source_of(message)
        if source in self._dead_lettered:
            log.info(
                "projection %s: %s[%d]@%d is already dead-lettered",
                self.projection.name,
                *source,
            )
            return
        headers = dead_letter_headers(
            topics.headers_of(message),
            source,
            reason,
            ("dlq-projection", self.projection.name.encode()),
        )
        self._producer.produce(
            dead_letter_topic(self.settings, self.projection.name),
            message.value(),
            key=message.key(),
            headers=headers,
        )
        if self._producer.flush(30) != 0:
            raise KafkaTransient("dead letter not acknowledged")
        self._dead_lettered.add(source)
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
        with self._progress:
            return self._progress.wait_for(
                lambda: self.status.positions.get((topic, partition), 0) > offset,
                timeout,
            )


_STARTED: weakref.WeakSet[ProjectionRunner] = weakref.WeakSet()

# Allocations between collections of the youngest generation (Python's default: 700).
GC_THRESHOLD = (50_000, 20, 100)


def tune_gc() -> None:
    """Collect garbage less often, in a process that runs projections.

    A batch allocates a few dicts per event; at Python's default thresholds the
    collector runs every 700 allocations and keeps walking the long-lived objects of
    a worker. What lives from start-up is frozen out of the walks. The projections
    benchmark folds 20-28% more events per second with this (bench/projections.py).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


@atexit.register
def _stop_started() -> None:
    # Runner threads are daemons: without this an exiting worker never closes their
    # consumers, so its groups stay "Stable" until the session times out, and Kafka's
    # consumer-groups tool refuses to reset them meanwhile.
    runners = list(_STARTED)
    for runner in runners:
        runner._stop.set()
    for runner in runners:
        runner.stop(timeout=10)


class KafkaTransient(RuntimeError):
    """A retriable Kafka error: the batch is retried from the stored position."""


class Superseded(Exception):
    """Since this runner looked, a replay swapped or emptied the projection's tables,
    or another runner moved one of its partitions: drop the batch, go on from Postgres."""


def dead_lettered(settings: Settings, topic: str) -> set[tuple[str, int, int]]:
    """The source (topic, partition, offset) of every record in a dead-letter topic."""
    found: set[tuple[str, int, int]] = set()
    try:
        for message in topics.read_topic(
            settings, topic, "dead-letter-reader", to_log_end=False
        ):
            headers = {n: v for n, v in topics.headers_of(message) if v is not None}
            with contextlib.suppress(KeyError, ValueError):
                found.add(
                    (
                        headers["dlq-source-topic"].decode(),
                        int(headers["dlq-source-partition"]),
                        int(headers["dlq-source-offset"]),
                    )
                )
    except KafkaException as error:
        raise KafkaTransient(f"reading {topic}: {error}") from error
    return found


def _earliest(consumer: Consumer, tp: TopicPartition) -> int:
    low, _ = consumer.get_watermark_offsets(
        TopicPartition(tp.topic, tp.partition), timeout=30
    )
    return int(low)
