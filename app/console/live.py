"""The console's processors page: one row per processor, saga or projection and
partition, from what the worker already knows (``/status``: the projections'
positions and heads, the write processes' reports) and, for the transactional
processors, their consumer groups' committed offsets; and the replays an operator
started from the console, with the progress they print."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from app.settings import Settings

# A replay's progress line (app.projections.replay.Progress).
PROGRESS = re.compile(r"([\d,]+)/([\d,]+) events")
# How often a replay started from the console prints its progress: well under the
# page's push interval (web.LIVE_S, a second), so each document pushed shows where
# the replay was a moment ago rather than up to 5 s ago (the default off a terminal).
PROGRESS_EVERY_S = 0.25


def projection_rows(
    projections: Sequence[Mapping[str, Any]], owner: str
) -> list[dict[str, Any]]:
    """Per projection and partition: its position, the head and the lag between."""
    rows = []
    for projection in projections:
        for position in projection["positions"]:
            head = position["head"]
            at = position["next_offset"]
            rows.append(
                {
                    "kind": "projection",
                    "name": projection["name"],
                    "topic": position["topic"],
                    "partition": position["partition"],
                    "owner": owner,
                    "position": at,
                    "head": head,
                    "lag_events": max(head - at, 0) if head is not None else None,
                    "lag_seconds": projection["lag_seconds"],
                    "error": projection["error"],
                }
            )
    return rows


def processor_rows(
    reports: Sequence[Mapping[str, Any]],
    offsets: Mapping[tuple[str, int], tuple[int | None, int]],
    owner: str,
) -> list[dict[str, Any]]:
    """Per write process, consumer group and partition owned: the group's committed
    offset, the head (``offsets``: (committed, high watermark)) and the lag."""
    rows = []
    for index, report in enumerate(reports):
        for group, state in sorted(report.items()):
            if not isinstance(state, Mapping) or "assignment" not in state:
                continue
            for topic, partition in state["assignment"]:
                committed, head = offsets.get((topic, partition), (None, 0))
                rows.append(
                    {
                        "kind": "saga" if "saga" in group else "processor",
                        "name": group,
                        "topic": topic,
                        "partition": partition,
                        "owner": f"{owner} write process {index}",
                        "position": committed,
                        "head": head,
                        "lag_events": (
                            max(head - committed, 0) if committed is not None else None
                        ),
                        "lag_seconds": None,
                        "error": state.get("last_error"),
                    }
                )
    return rows


def owner_name() -> str:
    return f"{socket.gethostname()} pid {os.getpid()}"


@dataclass
class Replay:
    """A replay started from the console: a ``streamfold replay`` child process."""

    projection: str
    operator: str
    started_at: datetime
    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    # None until its first progress line: the lag is not known before.
    done: int | None = None
    total: int | None = None

    def follow(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.note(line)
        self.process.wait()

    def note(self, line: str) -> None:
        """Take in one line of the replay's output: its progress, its summary or an
        error; librdkafka's own log lines ("%6|…") are left out."""
        line = line.strip()
        if not line or line.startswith("%"):
            return
        self.lines = [*self.lines[-19:], line]
        found = PROGRESS.search(line)
        if found:
            self.done = int(found.group(1).replace(",", ""))
            self.total = int(found.group(2).replace(",", ""))

    def to_dict(self) -> dict[str, Any]:
        code = self.process.poll()
        return {
            "projection": self.projection,
            "operator": self.operator,
            "started_at": self.started_at.isoformat(),
            "state": "running" if code is None else ("done" if code == 0 else "failed"),
            "exit_code": code,
            "done": self.done,
            "total": self.total,
            "lag_events": (
                max(self.total - self.done, 0)
                if self.total is not None and self.done is not None
                else None
            ),
            "last_line": self.lines[-1] if self.lines else "",
        }


class Replays:
    """The replays this worker started; one at a time per projection."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self.started: dict[str, Replay] = {}

    def start(
        self, projection: str, operator: str, first: Callable[[], None]
    ) -> Replay:
        """Start a replay of ``projection``, once ``first`` (recording it) returned;
        ``RuntimeError`` when one runs already (then ``first`` is not called)."""
        with self._lock:
            running = self.started.get(projection)
            if running is not None and running.process.poll() is None:
                raise RuntimeError(f"a replay of {projection} is running already")
            first()
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "app.cli",
                    "replay",
                    projection,
                    "--progress-every",
                    str(PROGRESS_EVERY_S),
                ],
                env={**os.environ, **self.settings.as_env()},
                # Progress goes to stderr, the summary to stdout: read as one.
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            replay = Replay(projection, operator, datetime.now(UTC), process)
            self.started[projection] = replay
            threading.Thread(
                target=replay.follow, name=f"replay-{projection}", daemon=True
            ).start()
            return replay

    def to_list(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.started.values()]
