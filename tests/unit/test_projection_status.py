"""The worker's view of a projection that several processes run: each reports the
partitions it holds; together they are one status."""

from __future__ import annotations

from datetime import UTC, datetime

from app.projections.engine import Status
from app.projections.process import _merged

T1 = datetime(2026, 11, 1, tzinfo=UTC)
T2 = datetime(2026, 11, 2, tzinfo=UTC)


def test_children_statuses_merge_into_one() -> None:
    first = Status(
        "ledger",
        applied=10,
        dead_lettered=1,
        last_event_at=T2,
        positions={("ev", 0): 7, ("ev", 1): 3},
        heads={("ev", 0): 9, ("ev", 1): 3},
    )
    # Partition 1 was handed over: the newer holder is further along.
    second = Status(
        "ledger",
        applied=5,
        last_event_at=T1,
        positions={("ev", 1): 5, ("ev", 2): 4},
        heads={("ev", 1): 6, ("ev", 2): 4},
        error="a projection process exited (code -9)",
    )
    merged = _merged("ledger", [first, second, Status("ledger")])
    assert merged.applied == 15
    assert merged.dead_lettered == 1
    assert merged.positions == {("ev", 0): 7, ("ev", 1): 5, ("ev", 2): 4}
    assert merged.heads == {("ev", 0): 9, ("ev", 1): 6, ("ev", 2): 4}
    assert merged.lag_events == 2 + 1
    assert merged.last_event_at == T2
    assert merged.error == "a projection process exited (code -9)"


def test_distinct_errors_are_all_named_once() -> None:
    errors = ["Postgres down", "Postgres down", "a projection process exited (code 1)"]
    merged = _merged("orders", [Status("orders", error=e) for e in errors])
    assert merged.error == "Postgres down; a projection process exited (code 1)"
    assert _merged("orders", [Status("orders")]).error is None
