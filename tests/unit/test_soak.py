"""What the soak leaves behind: its own broker and PostgreSQL cluster are removed at
the end, unless it failed and was asked to keep what it made (to be looked at)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from app import soak
from app.settings import Settings


@pytest.mark.parametrize(
    ("status", "keep", "removed"),
    [
        (1, True, []),
        (1, False, ["postgres", "broker"]),
        (0, True, ["postgres", "broker"]),
    ],
    ids=["failed, kept", "failed", "passed, kept"],
)
def test_the_soaks_own_services_are_removed_unless_a_failure_is_kept(
    monkeypatch: pytest.MonkeyPatch, status: int, keep: bool, removed: list[str]
) -> None:
    gone: list[str] = []

    def own(name: str, value: object) -> Any:
        @contextlib.contextmanager
        def service(settings: Settings) -> Iterator[tuple[Settings, object]]:
            yield settings, value
            gone.append(name)

        return service

    monkeypatch.setattr(soak.stack, "up", lambda settings, say: None)
    monkeypatch.setattr(
        soak.deployments,
        "private_broker",
        own("broker", SimpleNamespace(bootstrap="127.0.0.1:1")),
    )
    monkeypatch.setattr(soak.deployments, "private_postgres", own("postgres", "c"))
    monkeypatch.setattr(soak, "_soak", lambda *args: status)
    said: list[str] = []
    assert (
        soak.run(
            Settings(),
            minutes=1,
            rate=1,
            faults=["broker", "postgres"],
            seed=1,
            keep=keep,
            say=said.append,
        )
        == status
    )
    assert gone == removed
    kept = [line for line in said if line.startswith("kept")]
    assert kept == (
        []
        if removed
        else [
            "kept      broker 127.0.0.1:1 and PostgreSQL cluster c, still running: "
            "stop by hand when done"
        ]
    )
