"""settle_commits hands Faust exactly the hole its commit waits at, and only once
the processor's own position shows the hole was handled."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from app.runtime import settle_commits

TP = ("orders.commands", 0)


class FaustConsumerBookkeeping:
    """The three attributes of faust.transport.consumer.Consumer that are used."""

    def __init__(self, committed: int | None, acked: list[int]) -> None:
        self._committed_offset: dict[Any, int | None] = {TP: committed}
        self._acked: defaultdict[Any, list[int]] = defaultdict(list, {TP: acked})
        self.gaps: list[tuple[int, int]] = []

    async def _add_gap(self, tp: Any, offset_from: int, offset_to: int) -> None:
        assert tp == TP
        self.gaps.append((offset_from, offset_to))


def _settle(consumer: FaustConsumerBookkeeping, position: int | None) -> list[Any]:
    asyncio.run(settle_commits(consumer, TP, position))
    return consumer.gaps


def test_a_handled_hole_is_handed_to_faust() -> None:
    # Committed 10; 11..14 dropped by Faust and read back; 15 onwards acked.
    assert _settle(FaustConsumerBookkeeping(10, [16, 15, 17]), 18) == [(11, 14)]


def test_a_hole_not_yet_handled_is_left_alone() -> None:
    assert _settle(FaustConsumerBookkeeping(10, [15, 16]), 12) == []


def test_no_hole_no_gap() -> None:
    assert _settle(FaustConsumerBookkeeping(10, [11, 12]), 13) == []
    assert _settle(FaustConsumerBookkeeping(None, [5, 6]), 7) == []
    assert _settle(FaustConsumerBookkeeping(10, []), 20) == []
    assert _settle(FaustConsumerBookkeeping(10, [15]), None) == []
