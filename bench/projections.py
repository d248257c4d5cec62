"""Projections and replay: events/s folded into Postgres by the product's
``ProjectionRunner`` replaying an event topic from the beginning (a fresh consumer
group, as after a rewind), beside a raw confluent-kafka consume-from-earliest of the
same topic and beside ``COPY`` of the rows the projection wrote.

The events are the order workload's, made by the domain's own ``decide`` and framed
as the event log frames them. The runners run in child processes, as in the worker
and ``streamfold replay``: once in one process, then in as many as ``streamfold
replay`` starts by default (one per core, at most one per partition); the clock
starts when the first is assigned partitions.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from psycopg import sql

from app.adapters.codec import Codec
from app.adapters.topics import take
from app.history import EventLogProjection
from app.projections.engine import Projection, reset
from app.projections.orders import OrdersProjection
from app.projections.process import ProjectionProcess
from app.projections.replay import default_processes
from app.settings import Settings
from bench.harness import (
    encode_events,
    figure,
    high_watermarks,
    new_codec,
    new_producer,
    order_events,
    produce,
)


@dataclass(frozen=True, slots=True)
class Sizes:
    orders: int  # 4 events each


def replay(
    settings: Settings, projection: Projection, topic: str, processes: int = 1
) -> dict[str, Any]:
    """Run ``projection`` over ``topic`` from the start until it has caught up, in
    ``processes`` child processes as ``streamfold replay`` does."""
    highs = high_watermarks(settings, topic)
    events = sum(highs.values())
    name = projection.name
    runners = ProjectionProcess(settings, (name,), processes=processes)
    began = time.monotonic()
    runners.start()
    try:
        while not any(t == topic for t, _ in runners.statuses[name].positions):
            _check(runners, name, began, 60, "partition assignment")
            time.sleep(0.002)
        assigned = time.monotonic()
        for partition, high in highs.items():
            # Blocks on the children's reports instead of polling beside them.
            while high and not runners.wait_for(name, topic, partition, high - 1, 1.0):
                _check(runners, name, began, 900, "the replay")
        done = time.monotonic()
        status = runners.statuses[name]
    finally:
        runners.stop()
    if status.applied + status.dead_lettered != events:
        raise RuntimeError(
            f"projection {name}: {status.applied} events applied and "
            f"{status.dead_lettered} dead-lettered of {events}"
        )
    seconds = done - assigned
    return {
        "projection": name,
        "processes": processes,
        "events": events,
        "applied": status.applied,
        "dead_lettered": status.dead_lettered,
        "assignment_seconds": round(assigned - began, 3),
        "seconds": round(seconds, 3),
        "events_per_s": round(events / seconds, 1),
    }


def _check(
    runners: ProjectionProcess, name: str, began: float, timeout: float, what: str
) -> None:
    if time.monotonic() - began > timeout or runners.exits:
        raise TimeoutError(
            f"projection {name}: {what} took over {timeout:.0f}s or a process "
            f"exited (last error: {runners.statuses[name].error})"
        )


def consume_all(
    settings: Settings, topic: str, codec: Codec | None = None
) -> dict[str, Any]:
    """Every message of ``topic`` from the earliest offset, with the projection's
    consumer settings; decoded too when given a codec."""
    highs = high_watermarks(settings, topic)
    consumer = Consumer(
        {
            **settings.consumer_config(),
            "group.id": f"{settings.app_id}-bench-raw-{uuid.uuid4().hex[:6]}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 50,
        }
    )
    total = sum(highs.values())
    count = 0
    consumer.list_topics(topic, timeout=30)  # connected before the clock starts
    began = time.monotonic()
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in highs])
    try:
        while count < total:
            for message in take(consumer, 1000, 0.1):
                if message.error():
                    continue
                count += 1
                if codec is not None:
                    codec.decode(message.value() or b"")
            if time.monotonic() - began > 300:
                raise TimeoutError(f"{topic}: {count} of {total} read in 300s")
        seconds = time.monotonic() - began
    finally:
        consumer.close()
    return {
        "events": count,
        "seconds": round(seconds, 3),
        "events_per_s": round(count / seconds, 1),
    }


def copy_rows(
    settings: Settings, tables: tuple[str, ...], events: int
) -> dict[str, Any]:
    """COPY the projection's rows (binary) into empty tables of the same definition,
    indexes included, in one transaction."""
    with psycopg.connect(settings.database_url) as conn:
        data: dict[str, bytes] = {}
        rows = 0
        for table in tables:
            source, target = (
                sql.Identifier(table),
                sql.Identifier(f"bench_copy_{table}"),
            )
            with conn.cursor() as cur:
                with cur.copy(
                    sql.SQL("COPY {} TO STDOUT (FORMAT binary)").format(source)
                ) as copy:
                    data[table] = b"".join(bytes(chunk) for chunk in copy)
                cur.execute(sql.SQL("SELECT count(*) FROM {}").format(source))
                counted = cur.fetchone()
                assert counted is not None  # count(*) always returns its one row
                rows += counted[0]
                cur.execute(
                    sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING ALL)").format(
                        target, source
                    )
                )
        conn.commit()
        began = time.monotonic()
        with conn.cursor() as cur:
            for table, body in data.items():
                target = sql.Identifier(f"bench_copy_{table}")
                with cur.copy(
                    sql.SQL("COPY {} FROM STDIN (FORMAT binary)").format(target)
                ) as copy:
                    copy.write(body)
        conn.commit()
        seconds = time.monotonic() - began
    return {
        "tables": list(tables),
        "rows": rows,
        "bytes": sum(len(b) for b in data.values()),
        "seconds": round(seconds, 3),
        "events_per_s": round(events / seconds, 1),
    }


def run(base: Settings, sizes: Sizes, seed: int, deployment: Any) -> dict[str, Any]:
    with deployment(base, "replay") as settings:
        codec = new_codec(settings)
        topic = settings.topics.events("orders")
        events = order_events(seed, sizes.orders)
        produce(new_producer(settings), topic, encode_events(codec, topic, events))
        raw = consume_all(settings, topic)
        decoded = consume_all(settings, topic, codec)
        out: dict[str, Any] = {
            "events": len(events),
            "raw_consume": raw,
            "consume_and_decode": decoded,
        }
        processes = default_processes(settings)
        out["processes"] = processes
        for projection in (OrdersProjection(), EventLogProjection()):
            single = replay(settings, projection, topic)
            with psycopg.connect(settings.database_url) as conn:
                reset(conn, projection)  # empty tables, no positions: from the start
            replayed = replay(settings, projection, topic, processes)
            replayed["one_process"] = single
            replayed["copy"] = copy_rows(settings, projection.tables, len(events))
            out[projection.name] = replayed
        return out


def figures(data: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, label in (
        ("orders", "orders read models"),
        ("event_log", "event-log index"),
    ):
        row = data[name]
        baselines = (
            ("vs_one", row["one_process"], "the same replay in 1 process"),
            ("vs_consume", data["raw_consume"], "raw consume from earliest"),
            ("vs_copy", row["copy"], "COPY of the same rows"),
        )
        out += [
            figure(
                f"replay.{name}.{key}",
                f"Replay into Postgres: {label} ({row['events']:,} events, "
                f"{row['processes']} processes)",
                "events/s",
                row["events_per_s"],
                baseline["events_per_s"],
                what,
                better="higher",
                digits=1,
            )
            for key, baseline, what in baselines
        ]
    return out
