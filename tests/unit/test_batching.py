"""take_batches on a Faust agent's stream (Faust's in-memory test context, no
broker): a lone event is handed over without waiting, and batches keep the
stream's order and their size, events arriving while one is held going to the next."""

from __future__ import annotations

import asyncio
from typing import Any

import faust

from agents.batching import take_batches

WITHIN = 60.0  # the linger cap: far longer than any wait below


def _run(scenario: Any) -> list[list[str]]:
    async def main() -> list[list[str]]:
        app = faust.App("batching-test", store="memory://", autodiscover=False)
        seen: list[list[str]] = []

        @app.agent()
        async def agent(stream: faust.StreamT) -> None:
            async for batch in take_batches(stream, 2, within=WITHIN):
                seen.append([e.value for e in batch])
                await asyncio.sleep(0.05)  # more events arrive meanwhile

        async with agent.test_context() as running:
            await scenario(running, seen)
        return seen

    return asyncio.run(main())


async def _until(seen: list[list[str]], count: int) -> None:
    for _ in range(200):
        if sum(len(b) for b in seen) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"only {seen} of {count} events handed over")


def test_a_lone_event_is_handed_over_without_waiting_for_more() -> None:
    async def scenario(agent: Any, seen: list[list[str]]) -> None:
        await agent.put("alone")
        await _until(seen, 1)  # well before WITHIN

    assert _run(scenario) == [["alone"]]


def test_batches_keep_the_order_and_hold_at_most_max_events() -> None:
    values = [f"e{n}" for n in range(10)]

    async def scenario(agent: Any, seen: list[list[str]]) -> None:
        for value in values:
            await agent.put(value)
        await _until(seen, len(values))

    seen = _run(scenario)
    assert [v for batch in seen for v in batch] == values
    assert all(1 <= len(batch) <= 2 for batch in seen)
    assert any(len(batch) > 1 for batch in seen)
