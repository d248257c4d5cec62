"""The worker's view of a projection that several processes run: each reports the
partitions it holds; together they are one status."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from app.projections.engine import KafkaTransient, ProjectionRunner, Status
from app.projections.ledger import LedgerProjection
from app.projections.process import _merged
from app.settings import Settings

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


def test_a_runner_whose_consumer_failed_reports_nothing_it_held() -> None:
    """After a consumer error the runner starts a new consumer, whose assignment may
    differ: the old one's positions and heads must not stand in the merged status,
    where another runner's lag on the same partition would hide behind them."""
    runner = ProjectionRunner(Settings(), LedgerProjection(), cast(Any, None))

    def failing_consumer() -> None:
        runner.status.positions[("ev", 0)] = 7
        runner.status.heads[("ev", 0)] = 7
        runner._stop.set()  # one attempt: run() returns after its retry delay
        raise KafkaTransient("Failed to fetch committed offsets")

    runner._run_once = failing_consumer  # type: ignore[method-assign]
    runner.run()
    assert runner.status.error == "KafkaTransient: Failed to fetch committed offsets"
    assert runner.status.positions == {}
    assert runner.status.heads == {}
    # Merged with a runner that is behind on the partition, the lag shows.
    behind = Status("ledger", positions={("ev", 0): 3}, heads={("ev", 0): 7})
    assert _merged("ledger", [runner.status, behind]).lag_events == 4


class _Empty:
    """A Postgres connection with no epochs and no positions stored."""

    def execute(self, query: str, params: object = None) -> _Empty:
        return self

    def fetchone(self) -> None:
        return None

    def fetchall(self) -> list[object]:
        return []

    def commit(self) -> None:
        return None


class _Away:
    """A consumer whose broker is away: every lookup fails."""

    def committed(self, partitions: object, timeout: float) -> None:
        raise KafkaException(KafkaError(KafkaError._ALL_BROKERS_DOWN))

    def assign(self, partitions: object) -> None:
        raise AssertionError("assigned without knowing where to start")


def test_an_assignment_that_cannot_be_looked_up_is_a_transient_failure() -> None:
    """A broker restart fails the lookups behind an assignment: the runner starts a
    new consumer after a while (``run`` retries a KafkaTransient) rather than
    stopping as on a bug, and assigns nothing meanwhile."""
    runner = ProjectionRunner(Settings(), LedgerProjection(), cast(Any, None))
    runner._conn = cast(Any, _Empty())
    with pytest.raises(KafkaTransient, match="assigning 1 partitions"):
        runner._on_assign(cast(Any, _Away()), [TopicPartition("ev", 0)])
    assert runner.status.positions == {}
