"""The broker-kill loop's keeping echo: input taken again writes nothing."""

from __future__ import annotations

from typing import Any

import pytest

from app import brokerkills
from app.brokerkills import ECHOES_HEADER, INPUT, KeepingEcho
from app.settings import Settings
from tests.support import Consumed


class _Batch:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Any, dict[str, Any]]] = []

    def send(self, topic: str, value: Any, **options: Any) -> None:
        self.sent.append((topic, value, options))


def test_a_keeping_echo_skips_input_its_output_already_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reads: list[int] = []
    outputs = {0: 5, 1: -1}

    def last_echoed(settings: Settings, output: str, partition: int) -> int:
        reads.append(partition)
        return outputs[partition]

    monkeypatch.setattr(brokerkills, "last_echoed", last_echoed)
    echo = KeepingEcho(Settings(), "out")
    echo.assigned([(INPUT, 0), (INPUT, 1)])
    batch = _Batch()
    echo.prepare({(INPUT, 0), (INPUT, 1)})
    for partition, offset in [(0, 4), (0, 5), (0, 6), (1, 0)]:
        echo.handle(
            Consumed(INPUT, partition, offset, f"{partition}:{offset}".encode()), batch
        )  # type: ignore[arg-type]
    assert [options["partition"] for _, _, options in batch.sent] == [0, 1]
    assert [options["headers"] for _, _, options in batch.sent] == [
        [(ECHOES_HEADER, b"0@6")],
        [(ECHOES_HEADER, b"1@0")],
    ]
    assert echo.skipped == 2
    # An abort leaves the output in doubt (a failed commit may have landed): it is
    # read again before the next batch; a commit makes the batch's echoes known.
    echo.aborted()
    outputs[0] = 6
    echo.prepare({(INPUT, 0)})
    echo.handle(Consumed(INPUT, 0, 6, b"0:6"), batch)  # type: ignore[arg-type]
    assert echo.skipped == 3
    echo.handle(Consumed(INPUT, 0, 7, b"0:7"), batch)  # type: ignore[arg-type]
    echo.committed()
    echo.prepare({(INPUT, 0)})
    echo.handle(Consumed(INPUT, 0, 7, b"0:7"), batch)  # type: ignore[arg-type]
    assert echo.skipped == 4
    assert reads == [0, 1, 0] or (sorted(reads[:2]) == [0, 1] and reads[2:] == [0])
