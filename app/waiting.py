"""Waiting on what takes a while, in one place: doubling delays between attempts at
something that fails for a time (``Backoff``), and polling until a condition holds
(``eventually``), for the services, the demo, the soak, the benchmarks and the tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


# An attempt (a child process, a pair of clients) that ran this long was healthy.
HEALTHY_S = 60.0


class Backoff:
    """Delays that grow by ``factor`` from ``first`` up to ``most``: the wait before
    each new attempt, and ``reset`` once an attempt has done well."""

    def __init__(self, first: float, most: float, factor: float = 2.0) -> None:
        self.first, self.most, self.factor = first, most, factor
        self.delay = first

    def next(self) -> float:
        """The wait before the next attempt; the one after it is longer."""
        delay = self.delay
        self.delay = min(delay * self.factor, self.most)
        return delay

    def reset(self) -> None:
        self.delay = self.first

    def after(self, ran_s: float) -> float:
        """The wait after an attempt that ran ``ran_s`` seconds before it failed: one
        that ran ``HEALTHY_S`` or more did well, so the delays start over (a process
        restarted now and then over a long life waits the shortest delay)."""
        if ran_s >= HEALTHY_S:
            self.reset()
        return self.next()


def eventually(
    fetch: Callable[[], T],
    until: Callable[[T], object] = bool,
    *,
    timeout: float,
    every: float | Backoff = 0.1,
) -> T:
    """``fetch()`` again and again, ``every`` seconds apart, until ``until`` holds
    for what it returns or ``timeout`` seconds pass; the last value either way, so
    the caller says what a wait that failed means (an assertion, an error)."""
    pauses = every if isinstance(every, Backoff) else Backoff(every, every)
    deadline = time.monotonic() + timeout
    value = fetch()
    while not until(value) and time.monotonic() < deadline:
        time.sleep(pauses.next())
        value = fetch()
    return value
