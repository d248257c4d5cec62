"""`streamfold replay PROJECTION`: rebuild one projection from the start of its topics.

Blue/green (the default): the same ``ProjectionRunner`` code folds the log into a
schema of its own (``replay_<projection>_<n>``: a copy of each of the projection's
tables under the live index and constraint names, and its own position bookkeeping)
under a consumer group of its own (``<app_id>.projection.<name>.replay-<n>``), while
the live tables keep serving queries. Once it reaches the head of every partition it
stops and switches in ONE transaction holding the projection's switch lock: the live
tables move aside, the new ones move into ``public``, the projection's rows in
``projection_positions`` / ``projection_streams`` are replaced by the replay's, and the
epoch is bumped. The old tables, the replay's schema and group are then dropped, and
the live group's Kafka offsets are pointed at the new positions (Kafka allows that
only while the group has no members; a running worker's runner commits them itself).

A running worker keeps projecting meanwhile. Its batch transactions take the same
lock (shared) and check the epoch first (``engine.ProjectionRunner._fence``), so a
batch either commits before the switch, into tables that are then retired, or runs
after it, finds the new epoch, rolls back and seeks to the positions the new tables
hold; the events that arrived between the replay's stop and the switch are folded
into the new tables that way. This needs no coordination with the worker process
beyond Postgres, works whether or not a worker runs, and leaves nothing to undo on
a crash before the switch (the next replay drops the leftover schema).

Queries never wait on the build and do not fail at the switch: the switch takes the
tables' locks with a short ``lock_timeout`` (below ``deadlock_timeout``), so it is the
one that gives way and retries when a query holds them; a query queued behind it
(at most that long) is re-resolved by Postgres to the new table when it commits. Privileges are copied from
the live tables explicitly: default privileges apply only to tables created in
``public``.

``--in-place`` empties the live tables and rewinds the live group instead: one
transaction under the switch lock truncates the tables, forgets the positions and
bumps the epoch. A running worker then refolds from the start (queries see the tables
fill up again); with no worker running, this process folds them itself under the live
group after rewinding its offsets to the earliest.

Side effects: the Postgres projections write only their own tables and send nothing
outward, so folding the log again repeats nothing outside Postgres; a projection that
ever sends anything must not send it again on a replay. The runner's own dead letters
are sent once per source event (a replayed poison event is not dead-lettered again).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TextIO, TypedDict, Unpack

import psycopg
from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from psycopg import sql

from app.adapters.topics import record_end
from app.projections import PROJECTIONS
from app.projections.engine import (
    Projection,
    bump_epoch,
    current_epoch,
    group_id,
    lock_for_switch,
    reset,
    source_topics,
    stored_positions,
    switch_lock,
)
from app.projections.process import ProjectionProcess
from app.settings import Settings

# Held for a whole replay, so two replays of one projection never overlap.
REPLAY_LOCK = 0x5F0_1F
# The runner's bookkeeping, copied into the replay's schema beside the read models.
BOOKKEEPING = ("projection_positions", "projection_streams", "projection_epochs")
PRIVILEGES = (
    "SELECT",
    "INSERT",
    "UPDATE",
    "DELETE",
    "TRUNCATE",
    "REFERENCES",
    "TRIGGER",
)
# Below Postgres' deadlock_timeout (1s): in a lock conflict with a query, the switch
# gives way and retries rather than the query failing.
SET_SWITCH_LOCK_TIMEOUT = "SET LOCAL lock_timeout = '100ms'"
SWITCH_ATTEMPTS = 300
Positions = dict[tuple[str, int], int]
# A replay gives up once its processes have exited this often (each is restarted).
MAX_EXITS = 3


class ReplayError(RuntimeError):
    """The replay could not run or finish; the live tables are as they were."""


@dataclass(frozen=True, slots=True)
class Replayed:
    projection: str
    in_place: bool
    events: int
    epoch: int
    seconds: float
    positions: Positions


class Options(TypedDict, total=False):
    """How ``replay`` runs, as ``main`` takes it from the CLI's flags."""

    in_place: bool
    processes: int | None
    progress_every: float | None


def main(settings: Settings, name: str, **options: Unpack[Options]) -> int:
    """The CLI's entry point: progress on stderr, a summary on stdout."""
    from app.adapters.migrations import migrate
    from app.settings import MAX_PROJECTION_PROCESSES, SettingsError

    processes, every = options.get("processes"), options.get("progress_every")
    if name not in PROJECTIONS:
        raise SettingsError(
            "PROJECTION",
            f"unknown projection {name!r}; known: {', '.join(PROJECTIONS)}",
        )
    if processes is not None and not 1 <= processes <= MAX_PROJECTION_PROCESSES:
        raise SettingsError(
            "--processes",
            f"must be between 1 and {MAX_PROJECTION_PROCESSES}, got {processes}",
        )
    if every is not None and not (math.isfinite(every) and every > 0):
        raise SettingsError(
            "--progress-every", f"must be a number of seconds above 0, got {every}"
        )
    migrate(settings.database_url)
    try:
        done = replay(settings, PROJECTIONS[name], **options)
    except (
        ReplayError,
        psycopg.OperationalError,
        KafkaException,
        TimeoutError,
    ) as error:
        print(f"streamfold: replay of {name} failed: {error}", file=sys.stderr)
        return 1
    how = "in place" if done.in_place else "into new tables, switched"
    print(
        f"{name}: replayed {done.events:,} events {how} (epoch {done.epoch}) "
        f"in {done.seconds:.1f}s"
    )
    return 0


def replay(
    settings: Settings,
    projection: Projection,
    *,
    in_place: bool = False,
    out: TextIO | None = None,
    processes: int | None = None,
    progress_every: float | None = None,
) -> Replayed:
    """Rebuild ``projection`` from the start of its topics; see the module docstring.
    ``processes`` fold it side by side (default: one per core, at most one per
    partition of its topics); a progress line every ``progress_every`` seconds
    (default: ``Progress``'s, by whether ``out`` is a terminal)."""
    name = projection.name
    if processes is None:
        processes = default_processes(settings)
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,40}", name):
        raise ReplayError(f"projection name {name!r} is not a plain identifier")
    progress = Progress(
        f"replay {name}", out if out is not None else sys.stderr, every=progress_every
    )
    started = time.monotonic()
    with (
        psycopg.connect(settings.database_url, autocommit=True) as conn,
        _only_replay(conn, name),
    ):
        _drop_leftovers(conn, name)
        run = _Run(settings, projection, conn, progress, processes)
        events, epoch, positions = (_in_place if in_place else _blue_green)(run)
    return Replayed(
        name, in_place, events, epoch, time.monotonic() - started, positions
    )


@dataclass(frozen=True, slots=True)
class _Run:
    """What a replay works with, either way it goes."""

    settings: Settings
    projection: Projection
    conn: psycopg.Connection[Any]
    progress: Progress
    processes: int


# -- blue/green -----------------------------------------------------------------------


def default_processes(settings: Settings) -> int:
    """One per core, at most one per partition of a topic: Kafka's default
    assignor hands out each topic's partitions on its own."""
    return max(1, min(os.cpu_count() or 1, settings.partitions))


def _blue_green(run: _Run) -> tuple[int, int, Positions]:
    name = run.projection.name
    n = current_epoch(run.conn, name) + 1
    shadow, retired = f"replay_{name}_{n}", f"retired_{name}_{n - 1}"
    group = f"{group_id(run.settings, name)}.replay-{n}"
    _delete_group(run.settings, group)  # a crashed replay's, if any
    try:
        _create_shadow(run.conn, run.projection, shadow)
        runners = ProjectionProcess(
            run.settings, (name,), processes=run.processes, schema=shadow, group=group
        )
        runners.start()
        try:
            events = _follow(
                run,
                lambda: runners.statuses[name].positions,
                lambda: _runners_state(runners, name),
            )
        finally:
            runners.stop()
        if runners.running:
            raise ReplayError("the replay's runners did not stop in time")
        epoch, positions = _switch(run.conn, run.projection, shadow, retired)
    finally:
        with contextlib.suppress(psycopg.Error):
            _drop_schema(run.conn, shadow)
        _delete_group(run.settings, group)
    with contextlib.suppress(psycopg.Error):
        _drop_schema(run.conn, retired)
    _point_group(run.settings, group_id(run.settings, name), positions)
    return events, epoch, positions


def _create_shadow(
    conn: psycopg.Connection[Any], projection: Projection, schema: str
) -> None:
    with conn.transaction():
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        for table in (*projection.tables, *BOOKKEEPING):
            _copy_table(conn, table, schema)


def _copy_table(conn: psycopg.Connection[Any], table: str, schema: str) -> None:
    """An empty copy of ``public.<table>`` in ``schema``, with the live table's index
    and constraint names (so the moved table keeps what migrations expect) and its
    privileges (default privileges cover only tables created in ``public``)."""
    live, copy = sql.Identifier("public", table), sql.Identifier(schema, table)
    row = conn.execute(
        "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relname = %s AND c.relkind = 'r'",
        (table,),
    ).fetchone()
    if row is None:
        raise ReplayError(f"table public.{table} does not exist")
    oid = row[0]
    conn.execute(
        sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING ALL EXCLUDING INDEXES)").format(
            copy, live
        )
    )
    constraints = conn.execute(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = %s AND contype IN ('p', 'u', 'x') ORDER BY conname",
        (oid,),
    ).fetchall()
    for constraint, definition in constraints:
        conn.execute(
            sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                copy, sql.Identifier(constraint), sql.SQL(definition)
            )
        )
    indexes = conn.execute(
        "SELECT pg_get_indexdef(i.indexrelid), format(' ON %%I.%%I ', 'public', %s::text),"
        " format(' ON %%I.%%I ', %s::text, %s::text) FROM pg_index i WHERE i.indrelid = %s"
        " AND NOT EXISTS (SELECT FROM pg_constraint c"
        " WHERE c.conindid = i.indexrelid AND c.conrelid = i.indrelid)",
        (table, schema, table, oid),
    ).fetchall()
    for definition, on_live, on_copy in indexes:
        if definition.count(on_live) != 1:
            raise ReplayError(f"cannot copy index {definition!r}")
        conn.execute(sql.SQL(definition.replace(on_live, on_copy)))
    grants = conn.execute(
        "SELECT a.grantee, r.rolname, a.privilege_type FROM pg_class c"
        " CROSS JOIN LATERAL aclexplode(c.relacl) a"
        " LEFT JOIN pg_roles r ON r.oid = a.grantee"
        " WHERE c.oid = %s AND a.grantee <> c.relowner",
        (oid,),
    ).fetchall()
    for grantee, role, privilege in grants:
        if privilege not in PRIVILEGES:
            continue
        to = sql.SQL("PUBLIC") if grantee == 0 else sql.Identifier(role)
        conn.execute(
            sql.SQL("GRANT {} ON {} TO {}").format(sql.SQL(privilege), copy, to)
        )


def _switch(
    conn: psycopg.Connection[Any], projection: Projection, shadow: str, retired: str
) -> tuple[int, Positions]:
    """Put the replay's tables and positions in place of the live ones, atomically."""
    name = projection.name
    public = [sql.Identifier("public", t) for t in projection.tables]
    with conn.transaction():
        # Running batches of the live projection finish first; later ones wait, then
        # find the new epoch and seek to the positions written here.
        lock_for_switch(conn, name)
        for table, columns in (
            (
                "projection_positions",
                "projection, topic, partition, next_offset, updated_at",
            ),
            ("projection_streams", "projection, aggregate_id, version"),
        ):
            conn.execute(
                sql.SQL("DELETE FROM {} WHERE projection = %s").format(
                    sql.Identifier("public", table)
                ),
                (name,),
            )
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} ({}) SELECT {} FROM {} WHERE projection = %s"
                ).format(
                    sql.Identifier("public", table),
                    sql.SQL(columns),
                    sql.SQL(columns),
                    sql.Identifier(shadow, table),
                ),
                (name,),
            )
        epoch = bump_epoch(conn, name)
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(retired)))
        conn.execute(SET_SWITCH_LOCK_TIMEOUT)
        for attempt in range(SWITCH_ATTEMPTS):
            try:
                with conn.transaction():  # a savepoint: a timeout keeps the rest
                    conn.execute(
                        sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
                            sql.SQL(", ").join(public)
                        )
                    )
                    for table in projection.tables:
                        conn.execute(
                            sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(
                                sql.Identifier("public", table), sql.Identifier(retired)
                            )
                        )
                        conn.execute(
                            sql.SQL("ALTER TABLE {} SET SCHEMA public").format(
                                sql.Identifier(shadow, table)
                            )
                        )
                break
            except psycopg.errors.LockNotAvailable:
                time.sleep(min(0.01 * (attempt + 1), 0.2))
        else:
            raise ReplayError(
                f"queries held {name}'s tables for {SWITCH_ATTEMPTS} attempts; "
                "nothing was switched"
            )
        positions = stored_positions(conn, name)
    return epoch, positions


# -- in place -------------------------------------------------------------------------


def _in_place(run: _Run) -> tuple[int, int, Positions]:
    name = run.projection.name
    live = group_id(run.settings, name)
    worker_runs = group_members(run.settings, live) > 0
    epoch = reset(run.conn, run.projection)

    def positions() -> Positions:
        return stored_positions(run.conn, name)

    if worker_runs:
        # The worker's runners see the new epoch and refold from the start.
        events = _follow(run, positions, _worker_state(run.settings, live))
        return events, epoch, positions()
    _point_group(run.settings, live, _earliest(run.settings, run.projection))
    runners = ProjectionProcess(run.settings, (name,), processes=run.processes)
    runners.start()
    try:
        events = _follow(run, positions, lambda: _runners_state(runners, name))
    finally:
        runners.stop()
    return events, epoch, positions()


# -- following progress ---------------------------------------------------------------


class Progress:
    """One line on stderr: events done of total, rate and time left. Redrawn in place
    on a terminal; a line every few seconds otherwise (logs, CI), or every ``every``
    seconds when given (a program that reads the lines, such as the console)."""

    def __init__(
        self, label: str, stream: TextIO, *, every: float | None = None
    ) -> None:
        self.label = label
        self.stream = stream
        self.tty = stream.isatty()
        if every is None:
            every = 0.2 if self.tty else 5.0
        self.interval = every
        self.started = time.monotonic()
        self._shown = 0.0
        self._width = 0

    def update(
        self, done: int, total: int, *, note: str = "", final: bool = False
    ) -> None:
        now = time.monotonic()
        if not final and now - self._shown < self.interval:
            return
        self._shown = now
        elapsed = max(now - self.started, 1e-9)
        rate = done / elapsed
        percent = 100.0 * done / total if total else 100.0
        if final:
            left = "done"
        elif rate > 0:
            left = "ETA " + _clock((total - done) / rate)
        else:
            left = "ETA --:--"
        line = (
            f"{self.label}: {done:,}/{total:,} events {percent:5.1f}%  "
            f"{rate:,.0f} events/s  {left}"
        )
        if note:
            line += f"  ({note})"
        if self.tty:
            self.stream.write("\r" + line.ljust(self._width) + ("\n" if final else ""))
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def _follow(
    run: _Run,
    positions: Callable[[], Mapping[tuple[str, int], int]],
    state: Callable[[], str],
    poll: float = 0.1,
) -> int:
    """Report progress until ``positions`` reach the head of every partition (lag 0,
    heads read afresh each time); return the events folded. ``state`` raises
    ``ReplayError`` when nothing is folding any more, else returns a note."""
    settings, progress = run.settings, run.progress
    watcher = _consumer(
        settings, f"{group_id(settings, run.projection.name)}.replay-watch"
    )
    try:
        partitions = _partitions(watcher, source_topics(settings, run.projection))
        lows = {
            key: watcher.get_watermark_offsets(TopicPartition(*key), timeout=30)[0]
            for key in partitions
        }
        # The high watermark counts transaction markers: the head is one past the
        # last record, read again whenever the high watermark moves.
        ends: dict[tuple[str, int], tuple[int, int]] = {}
        while True:
            heads = {}
            for key in partitions:
                high = watcher.get_watermark_offsets(TopicPartition(*key), timeout=30)[
                    1
                ]
                if key not in ends or ends[key][0] != high:
                    ends[key] = (high, record_end(settings, *key, lows[key], high))
                heads[key] = ends[key][1]
            now = positions()
            total = sum(heads[k] - lows[k] for k in partitions)
            done = sum(
                min(max(now.get(k, lows[k]), lows[k]), heads[k]) - lows[k]
                for k in partitions
            )
            # A partition with no events never gets a position: its low is its head.
            if all(now.get(k, lows[k]) >= heads[k] for k in partitions):
                progress.update(done, total, final=True)
                return done
            progress.update(done, total, note=state())
            time.sleep(poll)
    finally:
        watcher.close()


def _runners_state(runners: ProjectionProcess, name: str) -> str:
    error = runners.statuses[name].error
    if runners.exits >= MAX_EXITS:
        raise ReplayError(
            f"the replay's processes exited {runners.exits} times: {error}"
        )
    return error or ""


def _worker_state(settings: Settings, group: str) -> Callable[[], str]:
    checked = time.monotonic()

    def state() -> str:
        nonlocal checked
        if time.monotonic() - checked > 2.0:
            checked = time.monotonic()
            if group_members(settings, group) == 0:
                raise ReplayError(
                    f"the worker left consumer group {group}; it goes on rebuilding "
                    "when it starts again"
                )
        return "folded by the worker"

    return state


# -- Postgres and Kafka housekeeping --------------------------------------------------


@contextlib.contextmanager
def _only_replay(conn: psycopg.Connection[Any], name: str) -> Iterator[None]:
    key = (REPLAY_LOCK, switch_lock(name)[1])
    row = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", key).fetchone()
    if not (row and row[0]):
        raise ReplayError(f"another replay of {name} is running")
    try:
        yield
    finally:
        with contextlib.suppress(psycopg.Error):
            conn.execute("SELECT pg_advisory_unlock(%s, %s)", key)


def _drop_leftovers(conn: psycopg.Connection[Any], name: str) -> None:
    """Schemas of replays that crashed (none can be running: we hold the lock)."""
    rows = conn.execute(
        "SELECT nspname FROM pg_namespace WHERE nspname ~ %s",
        (rf"^(replay|retired)_{name}_[0-9]+$",),
    ).fetchall()
    for (schema,) in rows:
        _drop_schema(conn, schema)


def _drop_schema(conn: psycopg.Connection[Any], schema: str) -> None:
    conn.execute(
        sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
    )


def _consumer(settings: Settings, group: str) -> Consumer:
    # Never subscribes or commits: it only reads watermarks.
    return Consumer(
        {
            **settings.consumer_config(),
            "group.id": group,
            "enable.auto.commit": False,
        }
    )


def _partitions(consumer: Consumer, topics: list[str]) -> list[tuple[str, int]]:
    found = []
    for topic in topics:
        metadata = consumer.list_topics(topic, timeout=30).topics[topic]
        if metadata.error is not None:
            raise ReplayError(f"topic {topic}: {metadata.error}")
        found += [(topic, p) for p in sorted(metadata.partitions)]
    return found


def _earliest(settings: Settings, projection: Projection) -> Positions:
    consumer = _consumer(
        settings, f"{group_id(settings, projection.name)}.replay-watch"
    )
    try:
        return {
            key: consumer.get_watermark_offsets(TopicPartition(*key), timeout=30)[0]
            for key in _partitions(consumer, source_topics(settings, projection))
        }
    finally:
        consumer.close()


def _admin(settings: Settings) -> AdminClient:
    config: dict[str, str | int | float | bool] = {**settings.kafka_client_config()}
    return AdminClient(config)


def group_members(settings: Settings, group: str) -> int:
    admin = _admin(settings)  # referenced until the future resolves: it runs it
    try:
        found = admin.describe_consumer_groups([group])[group].result(timeout=60)
    except KafkaException as error:
        if error.args[0].code() == KafkaError.GROUP_ID_NOT_FOUND:
            return 0
        raise ReplayError(f"cannot describe consumer group {group}: {error}") from error
    return len(found.members)


def _point_group(settings: Settings, group: str, positions: Positions) -> bool:
    """Commit ``positions`` as the group's offsets, so Kafka's tools show them and a
    restarted runner does not take them for a rewind. Kafka refuses while the group
    has members; a running runner then commits them itself after its next look at
    the epoch."""
    if not positions:
        return True
    request = ConsumerGroupTopicPartitions(
        group, [TopicPartition(t, p, o) for (t, p), o in sorted(positions.items())]
    )
    admin = _admin(settings)
    try:
        done = admin.alter_consumer_group_offsets([request])[group].result(timeout=60)
    except (KafkaException, TimeoutError):
        return False
    return all(tp.error is None for tp in done.topic_partitions)


def _delete_group(settings: Settings, group: str) -> None:
    admin = _admin(settings)
    for _ in range(40):
        try:
            future = admin.delete_consumer_groups([group], request_timeout=10)[group]
            future.result(timeout=60)
        except KafkaException as error:
            code = error.args[0].code()
            if code == KafkaError.NON_EMPTY_GROUP:  # the runner's leave is in flight
                time.sleep(0.25)
                continue
            if code != KafkaError.GROUP_ID_NOT_FOUND:
                sys.stderr.write(
                    f"streamfold: could not delete group {group}: {error}\n"
                )
        return
