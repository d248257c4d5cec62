"""Aggregate loading and time travel: one account with ``events`` events (opened,
then deposits), indexed by the product's ``event_log`` projection (which keeps a
snapshot every ``SNAPSHOT_EVERY`` versions), then folded by ``EventStore.state`` with
and without snapshots: the current state, the state as of a version mid-stream, and
the state as of a time mid-stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from app.domain import accounts
from app.history import SNAPSHOT_EVERY, EventLogProjection, EventStore
from app.settings import Settings
from bench.harness import (
    deposits,
    domain_events,
    encode_events,
    figure,
    interleaved,
    median,
    new_codec,
    new_producer,
    produce,
)
from bench.projections import replay


@dataclass(frozen=True, slots=True)
class Sizes:
    events: int
    repeats: int


def _compare(
    store: EventStore, account: str, where: dict[str, Any], repeats: int, case: str
) -> dict[str, Any]:
    """Median milliseconds of ``state`` with and without snapshots, taking turns."""
    states: dict[str, Any] = {}

    def load(label: str) -> None:
        states[label] = store.state(
            accounts.AGGREGATE_TYPE,
            account,
            use_snapshots=label == "with_snapshots",
            **where,
        )

    times = interleaved(
        {
            "with_snapshots": lambda: load("with_snapshots"),
            "without_snapshots": lambda: load("without_snapshots"),
        },
        repeats,
    )
    if states["with_snapshots"] != states["without_snapshots"]:
        raise AssertionError(f"{case}: a snapshot changed the state")
    row: dict[str, Any] = {
        f"{label}_ms": round((median(seconds) or 0.0) * 1000, 3)
        for label, seconds in times.items()
    }
    row["version"] = states["with_snapshots"][1]
    return row


def run(base: Settings, sizes: Sizes, seed: int, deployment: Any) -> dict[str, Any]:
    with deployment(base, "loading") as settings:
        codec = new_codec(settings)
        topic = settings.topics.events("accounts")
        account = f"acc-{seed}-long"
        start = datetime(2026, 1, 1, tzinfo=UTC)
        events = domain_events(
            accounts,
            accounts.AGGREGATE_TYPE,
            deposits(seed, account, sizes.events),
            start=start,
            step=timedelta(seconds=1),
        )
        produce(new_producer(settings), topic, encode_events(codec, topic, events))
        indexing = replay(settings, EventLogProjection(), topic)

        middle = sizes.events // 2 + SNAPSHOT_EVERY // 2
        moment = start + timedelta(seconds=middle - 1)  # the time of version `middle`
        cases: dict[str, dict[str, Any]] = {
            "current": {},
            "as_of_version": {"version": middle},
            "as_of_time": {"at": moment},
        }
        out: dict[str, Any] = {
            "events": sizes.events,
            "snapshot_every": SNAPSHOT_EVERY,
            "indexing": indexing,
            "mid_version": middle,
        }
        with psycopg.connect(settings.query_database_url, autocommit=True) as conn:
            store = EventStore(conn)
            snapshots = conn.execute("SELECT count(*) FROM snapshots").fetchone()
            out["snapshots"] = snapshots[0] if snapshots else 0
            for name, where in cases.items():
                out[name] = _compare(store, account, where, sizes.repeats, name)
        out["as_of_time"]["note"] = (
            "EventStore.state folds from the first event when given a time: "
            "snapshots are not used for `at`"
        )
        return out


def figures(data: dict[str, Any]) -> list[dict[str, Any]]:
    n = data["events"]
    labels = {
        "current": f"Load a {n:,}-event aggregate",
        "as_of_version": f"Time travel to version {data['mid_version']:,}",
        "as_of_time": f"Time travel to the time of version {data['mid_version']:,}",
    }
    out = []
    for case, label in labels.items():
        row = data[case]
        out.append(
            figure(
                f"loading.{case}",
                f"{label}, with snapshots",
                "ms",
                row["with_snapshots_ms"],
                row["without_snapshots_ms"],
                "the same without snapshots",
                better="lower",
            )
        )
    return out
