"""The bench's CPU sampler counts what a system does after the load's last answer (a
reader catching up) and closes its window where that work ended, not where the quiet
after it was noticed; a system that never goes quiet is named.

A scripted reading stands in for /proc: CPU seconds as a function of the clock, so
the expected totals follow from the script whatever the machine's load."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from bench.harness import CpuSampler


def _script(busy_s: float, busy_rate: float, idle_rate: float) -> Callable[[], float]:
    """CPU seconds used since now: ``busy_rate`` cores for ``busy_s``, then
    ``idle_rate`` (below the sampler's threshold, but not zero)."""
    began = time.monotonic()

    def used() -> float:
        elapsed = time.monotonic() - began
        busy = min(elapsed, busy_s)
        return busy * busy_rate + max(0.0, elapsed - busy_s) * idle_rate

    return used


def _sampler(used: Callable[[], float]) -> CpuSampler:
    return CpuSampler({"system": lambda: [1]}, interval=0.05, read=lambda _: used())


def test_the_work_after_the_load_counts_and_the_quiet_after_it_does_not() -> None:
    sampler = _sampler(_script(busy_s=0.6, busy_rate=1.0, idle_rate=0.12))
    sampler.start()
    used = sampler.stop_when_quiet("system", below=0.15, every=1.0, timeout=60)
    # 0.6 s of work; the quiet second that proved it was over would add 0.12 more.
    assert 0.5 <= used["system"] <= 0.66, used
    # The window ends with the work (a sample late at most), not a second later.
    assert 0.5 <= sampler.seconds <= 1.1, sampler.seconds


def test_a_pause_shorter_than_the_quiet_window_does_not_end_it() -> None:
    first = _script(busy_s=0.4, busy_rate=1.0, idle_rate=0.0)
    began = time.monotonic()

    def used() -> float:
        # 0.4 s busy, 0.4 s paused, 0.4 s busy again, then idle.
        elapsed = time.monotonic() - began
        again = min(max(0.0, elapsed - 0.8), 0.4)
        return first() + again

    sampler = _sampler(used)
    sampler.start()
    spent = sampler.stop_when_quiet("system", below=0.15, every=1.0, timeout=60)
    assert 0.7 <= spent["system"] <= 0.81, spent


def test_a_system_idle_from_the_start_used_next_to_nothing() -> None:
    sampler = _sampler(_script(busy_s=0.0, busy_rate=0.0, idle_rate=0.05))
    sampler.start()
    used = sampler.stop_when_quiet("system", every=0.5, timeout=60)
    # Up to the first sample after the call: one interval of idling, not the
    # half second of quiet that proved it.
    assert used["system"] <= 0.02, used
    assert sampler.seconds < 0.5


def test_work_done_before_the_call_counts_even_if_no_sample_saw_it_busy() -> None:
    # 50 ms of work inside the first 0.5 s sample: 0.1 cores over the sample, under
    # the threshold, yet it is the load's work (done before its last answer).
    used_by = _script(busy_s=0.05, busy_rate=1.0, idle_rate=0.0)
    sampler = CpuSampler(
        {"system": lambda: [1]}, interval=0.5, read=lambda _: used_by()
    )
    sampler.start()
    time.sleep(0.1)
    used = sampler.stop_when_quiet("system", below=0.15, every=1.0, timeout=60)
    assert 0.04 <= used["system"] <= 0.06, used


def test_a_system_that_never_goes_quiet_is_named() -> None:
    sampler = _sampler(_script(busy_s=3600, busy_rate=1.0, idle_rate=0.0))
    sampler.start()
    with pytest.raises(RuntimeError, match="system was still busy"):
        sampler.stop_when_quiet("system", every=0.3, timeout=1.0)
