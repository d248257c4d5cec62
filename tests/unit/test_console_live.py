"""The processors page's rows and a replay's progress, without a worker."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from typing import Any

from app.console import live


def test_projection_rows_give_each_partitions_lag() -> None:
    projections = [
        {
            "name": "orders",
            "lag_seconds": 1.5,
            "error": None,
            "positions": [
                {
                    "topic": "orders.events",
                    "partition": 0,
                    "next_offset": 7,
                    "head": 10,
                },
                {
                    "topic": "orders.events",
                    "partition": 1,
                    "next_offset": 3,
                    "head": None,
                },
            ],
        }
    ]
    rows = live.projection_rows(projections, "host pid 1")
    assert [
        (r["partition"], r["position"], r["head"], r["lag_events"]) for r in rows
    ] == [
        (0, 7, 10, 3),
        (1, 3, None, None),
    ]
    assert {(r["kind"], r["name"], r["owner"], r["lag_seconds"]) for r in rows} == {
        ("projection", "orders", "host pid 1", 1.5)
    }


def test_processor_rows_come_from_the_reports_and_the_groups_offsets() -> None:
    reports: list[dict[str, Any]] = [
        {
            "app.commands": {
                "assignment": [["orders.commands", 0], ["orders.commands", 1]],
                "last_error": "broker down",
            },
            "app.saga": {"assignment": [["orders.events", 0]], "last_error": None},
            "restarts": 0,
        },
        {},
    ]
    offsets = {
        ("orders.commands", 0): (5, 9),
        ("orders.commands", 1): (None, 0),
        ("orders.events", 0): (4, 4),
    }
    rows = live.processor_rows(reports, offsets, "h")
    assert [
        (
            r["kind"],
            r["name"],
            r["partition"],
            r["position"],
            r["lag_events"],
            r["error"],
        )
        for r in rows
    ] == [
        ("processor", "app.commands", 0, 5, 4, "broker down"),
        ("processor", "app.commands", 1, None, None, "broker down"),
        ("saga", "app.saga", 0, 4, 0, None),
    ]
    assert {r["owner"] for r in rows} == {"h write process 0"}


def test_a_replay_reads_its_progress_lines() -> None:
    process = subprocess.Popen(["true"])
    process.wait()
    replay = live.Replay("orders", "grace", datetime(2026, 12, 3, tzinfo=UTC), process)
    replay.note("%6|1796292387.727|GROUP|rdkafka#consumer-1| joined")
    # No progress line yet: neither done nor the lag is known.
    assert (replay.to_dict()["total"], replay.to_dict()["lag_events"]) == (None, None)
    replay.note("replay orders: 1,200/5,000 events  24.0%  600 events/s  ETA 0:00:06\n")
    assert replay.to_dict()["lag_events"] == 3800
    assert (replay.done, replay.total) == (1200, 5000)
    replay.note("replay orders: 5,000/5,000 events 100.0%  900 events/s  done")
    replay.note("   ")
    replay.note("%6|1796292387.727|BGQUEUE|rdkafka#producer-5| Purging 1 events")
    replay.note("orders: replayed 5,000 events into new tables, switched (epoch 2)")
    shown = replay.to_dict()
    assert (shown["state"], shown["done"], shown["lag_events"]) == ("done", 5000, 0)
    assert shown["last_line"].startswith("orders: replayed 5,000 events")
    assert len(replay.lines) == 3
