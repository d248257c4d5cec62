"""`streamfold replay`'s progress lines: how often they are printed."""

from __future__ import annotations

import io
import itertools
import time

import pytest

from app.projections import replay
from app.settings import Settings, SettingsError


def _done_of_total(
    monkeypatch: pytest.MonkeyPatch, every: float | None, updates: int
) -> list[str]:
    """The lines of ``updates`` updates a tenth of a second apart (a clock of our
    own), then the final one."""
    ticks = itertools.count()
    monkeypatch.setattr(time, "monotonic", lambda: 1000 + next(ticks) / 10)
    out = io.StringIO()
    progress = replay.Progress("replay orders", out, every=every)
    for done in range(updates):
        progress.update(done, updates)
    progress.update(updates, updates, final=True)
    return [line.split()[2] for line in out.getvalue().splitlines()]


def test_off_a_terminal_a_line_every_5_s_and_the_last(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert _done_of_total(monkeypatch, None, 120) == [
        "0/120",
        "50/120",
        "100/120",
        "120/120",
    ]


def test_every_sets_how_often_a_line_is_printed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert _done_of_total(monkeypatch, 0.25, 9) == ["0/9", "3/9", "6/9", "9/9"]


@pytest.mark.parametrize("every", [0.0, -1.0, float("nan"), float("inf")])
def test_the_cli_refuses_an_interval_that_is_not_a_positive_number(
    every: float,
) -> None:
    with pytest.raises(SettingsError) as caught:
        replay.main(Settings.from_env({}), "orders", progress_every=every)
    assert caught.value.variable == "--progress-every"
