"""``topics.take``: every consumer of ours waits for the first record only, never for a
batch to fill (librdkafka's ``consume(n, timeout)`` waits out its timeout unless n
records arrive, so each record of a trickle would wait that long)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from app.adapters.topics import take

ROOT = Path(__file__).resolve().parents[2]


class _Consumer:
    """Hands out ``queued`` records, recording how it was asked."""

    def __init__(self, queued: list[str]) -> None:
        self.queued = queued
        self.calls: list[tuple[str, int | None, float]] = []

    def poll(self, timeout: float) -> str | None:
        self.calls.append(("poll", None, timeout))
        return self.queued.pop(0) if self.queued else None

    def consume(self, most: int, timeout: float) -> list[str]:
        self.calls.append(("consume", most, timeout))
        taken, self.queued = self.queued[:most], self.queued[most:]
        return taken


def test_the_first_record_is_waited_for_and_the_rest_are_not() -> None:
    consumer = _Consumer(["a", "b", "c"])
    assert take(consumer, 500, 0.2) == ["a", "b", "c"]  # type: ignore[arg-type]
    assert consumer.calls == [("poll", None, 0.2), ("consume", 499, 0)]


def test_no_more_than_most_are_taken() -> None:
    consumer = _Consumer([str(n) for n in range(10)])
    assert take(consumer, 4, 0.2) == ["0", "1", "2", "3"]  # type: ignore[arg-type]
    assert consumer.queued == ["4", "5", "6", "7", "8", "9"]


def test_nothing_arrived_is_an_empty_batch_without_a_second_call() -> None:
    consumer = _Consumer([])
    assert take(consumer, 500, 0.2) == []  # type: ignore[arg-type]
    assert consumer.calls == [("poll", None, 0.2)]


def _waiting_consumes(tree: ast.AST) -> list[int]:
    """Lines of ``x.consume(n, timeout)`` calls whose timeout is not the literal 0."""
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "consume"
        ):
            timeout: Any = node.args[1] if len(node.args) > 1 else None
            for keyword in node.keywords:
                if keyword.arg == "timeout":
                    timeout = keyword.value
            if not (isinstance(timeout, ast.Constant) and timeout.value == 0):
                found.append(node.lineno)
    return found


def test_the_check_finds_a_waiting_consume() -> None:
    tree = ast.parse("c.consume(500, 0.05)\nc.consume(10, 0)\nc.consume(5)\n")
    assert _waiting_consumes(tree) == [1, 3]


def test_no_consumer_in_app_agents_or_bench_waits_for_a_batch_to_fill() -> None:
    waiting = [
        f"{path.relative_to(ROOT)}:{line}"
        for folder in ("app", "agents", "bench")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for line in _waiting_consumes(ast.parse(path.read_text()))
    ]
    assert waiting == [], f"use topics.take instead of consume(n, timeout): {waiting}"
