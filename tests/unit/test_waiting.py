"""The one polling helper and the one backoff: what they wait for and how long."""

from __future__ import annotations

import itertools

from app.waiting import HEALTHY_S, Backoff, eventually


def test_backoff_doubles_up_to_its_ceiling_and_starts_again_on_reset() -> None:
    backoff = Backoff(0.5, 3.0)
    assert [backoff.next() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    backoff.reset()
    assert backoff.next() == 0.5


def test_after_a_healthy_run_the_delays_start_over() -> None:
    backoff = Backoff(0.5, 3.0)
    # Attempts that failed soon: the delay keeps growing.
    assert [backoff.after(1.0) for _ in range(4)] == [0.5, 1.0, 2.0, 3.0]
    assert backoff.after(HEALTHY_S - 0.1) == 3.0
    # One that ran a healthy while: the shortest delay again, then growing anew.
    assert backoff.after(HEALTHY_S) == 0.5
    assert backoff.after(1.0) == 1.0


def test_backoff_grows_by_its_factor() -> None:
    backoff = Backoff(0.1, 1.0, factor=1.5)
    assert [round(backoff.next(), 3) for _ in range(3)] == [0.1, 0.15, 0.225]


def test_eventually_returns_the_first_value_that_holds() -> None:
    counter = itertools.count()
    assert eventually(lambda: next(counter), lambda n: n >= 3, timeout=5, every=0) == 3


def test_eventually_returns_the_last_value_when_time_runs_out() -> None:
    assert eventually(lambda: 0, timeout=0.05, every=0.01) == 0


def test_eventually_waits_as_a_backoff_says() -> None:
    calls = []
    eventually(lambda: calls.append(1), timeout=0.3, every=Backoff(0.01, 0.02))
    assert len(calls) > 2
