"""Projections and replay: events/s folded into Postgres by the product's
``ProjectionRunner`` replaying an event topic from the beginning (a fresh consumer
group, as after a rewind), beside a raw confluent-kafka consume-from-earliest of the
same topic and beside ``COPY`` of the rows the projection wrote.

The events are the order workload's, made by the domain's own ``decide`` and framed
as the event log frames them. The runner runs in this process on its own thread, as
it does inside the worker; its clock starts when it is assigned its partitions.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from psycopg import sql

from app.adapters.codec import Codec
from app.domain import orders
from app.history import EventLogProjection
from app.projections.engine import Projection, ProjectionRunner, tune_gc
from app.projections.orders import OrdersProjection
from app.settings import Settings
from bench.harness import (
    domain_events,
    encode_events,
    figure,
    high_watermarks,
    new_codec,
    new_producer,
    order_lifecycles,
    produce,
)


@dataclass(frozen=True, slots=True)
class Sizes:
    orders: int  # 4 events each


def replay(
    settings: Settings, projection: Projection, codec: Codec, topic: str
) -> dict[str, Any]:
    """Run ``projection`` over ``topic`` from the start until it has caught up."""
    highs = high_watermarks(settings, topic)
    events = sum(highs.values())
    runner = ProjectionRunner(settings, projection, codec)
    tune_gc()  # as the worker and `streamfold replay` do
    began = time.monotonic()
    runner.start()
    positions = runner.status.positions
    try:
        while not any(t == topic for t, _ in list(positions)):
            _check(runner, began, 60, "partition assignment")
            time.sleep(0.002)
        assigned = time.monotonic()
        for partition, high in highs.items():
            # Blocks on the runner's progress instead of polling beside it.
            while high and not runner.wait_for(topic, partition, high - 1, 1.0):
                _check(runner, began, 900, "the replay")
        done = time.monotonic()
    finally:
        runner.stop()
    seconds = done - assigned
    return {
        "projection": projection.name,
        "events": events,
        "applied": runner.status.applied,
        "dead_lettered": runner.status.dead_lettered,
        "assignment_seconds": round(assigned - began, 3),
        "seconds": round(seconds, 3),
        "events_per_s": round(events / seconds, 1),
    }


def _check(runner: ProjectionRunner, began: float, timeout: float, what: str) -> None:
    if time.monotonic() - began > timeout:
        raise TimeoutError(
            f"projection {runner.projection.name}: {what} took over {timeout:.0f}s "
            f"(last error: {runner.status.error})"
        )


def consume_all(
    settings: Settings, topic: str, codec: Codec | None = None
) -> dict[str, Any]:
    """Every message of ``topic`` from the earliest offset, with the projection's
    consumer settings; decoded too when given a codec."""
    highs = high_watermarks(settings, topic)
    consumer = Consumer(
        {
            **settings.kafka_client_config(),
            "group.id": f"{settings.app_id}-bench-raw-{uuid.uuid4().hex[:6]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
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
            for message in consumer.consume(1000, 0.1):
                if message.error():
                    continue
                count += 1
                if codec is not None:
                    codec.decode(message.value())
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
                rows += cur.fetchone()[0]  # type: ignore[index]
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
        commands = [c for life in order_lifecycles(seed, sizes.orders) for c in life]
        events = domain_events(
            orders,
            orders.AGGREGATE_TYPE,
            commands,
            start=datetime(2026, 1, 1, tzinfo=UTC),
        )
        produce(new_producer(settings), topic, encode_events(codec, topic, events))
        raw = consume_all(settings, topic)
        decoded = consume_all(settings, topic, codec)
        out: dict[str, Any] = {
            "events": len(events),
            "raw_consume": raw,
            "consume_and_decode": decoded,
        }
        for projection in (OrdersProjection(), EventLogProjection()):
            replayed = replay(settings, projection, codec, topic)
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
        out += [
            figure(
                f"replay.{name}.vs_consume",
                f"Replay into Postgres: {label} ({row['events']:,} events)",
                "events/s",
                row["events_per_s"],
                data["raw_consume"]["events_per_s"],
                "raw consume from earliest",
                better="higher",
                digits=1,
            ),
            figure(
                f"replay.{name}.vs_copy",
                f"Replay into Postgres: {label} ({row['events']:,} events)",
                "events/s",
                row["events_per_s"],
                row["copy"]["events_per_s"],
                "COPY of the same rows",
                better="higher",
                digits=1,
            ),
        ]
    return out
