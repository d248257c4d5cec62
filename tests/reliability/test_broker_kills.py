"""``streamfold broker-kills`` in small: the transactional processor echoing a paced
input on a broker of its own that is SIGKILLed twice or more, each output exactly
once at the end (the command's long runs are in the README)."""

from __future__ import annotations

import pytest

from app import brokerkills
from app.settings import Settings


@pytest.mark.slow
def test_each_output_holds_every_input_once_through_broker_kills(
    registry_settings: Settings,
) -> None:
    outcome = brokerkills.run(
        registry_settings, minutes=1.0, rate=1000, processors=2, every=(3, 6)
    )
    shown = brokerkills.report(outcome)
    assert outcome.kills >= 2, shown
    assert outcome.produced > 30_000, shown
    assert len(outcome.outputs) == 2, shown
    for output in outcome.outputs.values():
        assert output == {
            "records": outcome.produced,
            "duplicated": 0,
            "missing": 0,
            "unknown": 0,
            "caught_up": True,
        }, shown
    assert outcome.ok, shown
    print(shown)
