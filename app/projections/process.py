"""The worker's Postgres projections, in a process of their own.

A projection folds events in Python on its thread; in the worker's process those
threads would share one GIL with the event loop that runs the Faust view agents,
which then waits for the GIL after every socket call.
So the worker starts child processes (``project``; ``STREAMFOLD_PROJECTION_PROCESSES``,
one by default) that each run every projection it has chosen, sharing each one's
partitions through its consumer group, and keeps a mirror of their progress for
``/status``, ``/metrics`` and read-your-writes (``ProjectionProcess.wait_for``).
``streamfold replay`` folds through the same children, several by default.

Each child sends its runners' statuses over a pipe after every commit and at least
every ``HEARTBEAT_S``. It dies with its parent (``PR_SET_PDEATHSIG``, so also when
the worker is SIGKILLed) and stops cleanly on SIGTERM. If it exits on its own, the
parent names the exit in every projection's ``error`` and starts it again; positions
live in Postgres, so nothing is lost or applied twice (see the partition check in
``engine``).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import threading
import time
from dataclasses import replace
from datetime import datetime
from multiprocessing.connection import Connection
from typing import Any

from app.children import Supervisor, start_child
from app.projections import PROJECTIONS
from app.projections.engine import ProjectionRunner, Status, tune_gc
from app.settings import Settings
from app.waiting import Backoff

log = logging.getLogger("streamfold.projections")

# How often the child reports when nothing was committed (heads and errors change
# without commits).
HEARTBEAT_S = 0.5
EXITED = "a projection process exited"
PROJECTIONS_NAME = "sf-projections"


class ProjectionProcess(Supervisor):
    """Starts the children, restarts each one that exits, and mirrors what they
    report. ``processes`` children each run every projection in ``names``; through
    each projection's consumer group they share its partitions. ``schema`` and
    ``group`` are a replay's (see ``ProjectionRunner``); ``group`` needs one name."""

    def __init__(
        self,
        settings: Settings,
        names: tuple[str, ...],
        *,
        processes: int = 1,
        schema: str = "public",
        group: str | None = None,
    ) -> None:
        if processes < 1:
            raise ValueError(f"processes must be at least 1, not {processes}")
        if group is not None and len(names) != 1:
            raise ValueError("a consumer group of its own needs exactly one projection")
        super().__init__(processes, "projection-process")
        self.settings = settings
        self.names = names
        self.schema = schema
        self.group = group
        # What each child last reported, per projection.
        self._reports = [
            {name: Status(name) for name in names} for _ in range(processes)
        ]
        self._progress = threading.Condition()

    def start(self) -> None:
        if self.names:
            super().start()

    @property
    def statuses(self) -> dict[str, Status]:
        """Each projection's status over all children: each reports the partitions
        it holds."""
        with self._progress:
            return {
                name: _merged(name, [report[name] for report in self._reports])
                for name in self.names
            }

    def _supervise(self, index: int) -> None:
        context = multiprocessing.get_context("spawn")
        backoff = Backoff(0.5, 10.0)
        while not self._stopping.is_set():
            began = time.monotonic()
            try:
                code = self._run_child(context, index)
            except Exception as failure:  # noqa: BLE001 - named in the status, retried
                code = f"not started: {type(failure).__name__}: {failure}"
            if self._stopping.is_set():
                return
            with self._progress:
                last = "; ".join(
                    sorted(
                        {
                            s.error
                            for s in self._reports[index].values()
                            if s.error and not s.error.startswith(EXITED)
                        }
                    )
                )
            delay = backoff.after(time.monotonic() - began)
            error = (
                f"{EXITED} ({code}"
                f"{', last error: ' + last if last else ''}); "
                f"restarting it in {delay:.1f}s"
            )
            log.error(error)
            with self._progress:
                self.exits += 1
                # Its positions go: they may be gone from Postgres by the time
                # its partitions' new holder reports (a rebuild, a switch).
                for name, status in self._reports[index].items():
                    self._reports[index][name] = replace(
                        status, positions={}, heads={}, error=error
                    )
                self._progress.notify_all()
            self._stopping.wait(delay)

    def _run_child(self, context: Any, index: int) -> str:
        """Start child ``index`` and mirror its reports until it exits."""
        receiving, sending = context.Pipe(duplex=False)
        child = context.Process(
            target=project,
            args=(
                self.settings,
                self.names,
                sending,
                os.getpid(),
                self.schema,
                self.group,
            ),
            name=f"streamfold-projections-{index}",
        )
        try:
            with self._starting:
                if self._stopping.is_set():
                    receiving.close()
                    return "not started: stopping"
                child.start()
                self._children[index] = child
        except BaseException:
            receiving.close()
            raise
        finally:
            sending.close()
        with contextlib.suppress(EOFError, OSError):
            while True:
                self._mirror(index, receiving.recv())
        receiving.close()
        child.join(10)
        return f"code {child.exitcode}"

    def _mirror(self, index: int, reported: list[Status]) -> None:
        with self._progress:
            for status in reported:
                self._reports[index][status.projection] = status
            self._progress.notify_all()

    def wait_for(
        self, name: str, topic: str, partition: int, offset: int, timeout: float
    ) -> bool:
        """True once projection ``name`` has applied ``offset`` of ``topic[partition]``."""
        key = (topic, partition)
        with self._progress:
            return self._progress.wait_for(
                lambda: any(
                    report[name].positions.get(key, 0) > offset
                    for report in self._reports
                ),
                timeout,
            )


def _merged(name: str, reported: list[Status]) -> Status:
    merged = Status(name)
    for status in reported:
        merged.applied += status.applied
        merged.dead_lettered += status.dead_lettered
        # A partition two children report (handed over between their reports):
        # the further position is the newer.
        for key, offset in status.positions.items():
            merged.positions[key] = max(merged.positions.get(key, offset), offset)
        for key, high in status.heads.items():
            merged.heads[key] = max(merged.heads.get(key, high), high)
        merged.last_event_at = _latest(merged.last_event_at, status.last_event_at)
        merged.rebuilt_at = _latest(merged.rebuilt_at, status.rebuilt_at)
        if status.error and status.error not in (merged.error or ""):
            merged.error = (
                f"{merged.error}; {status.error}" if merged.error else status.error
            )
    return merged


def _latest(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else max(a, b)


def project(
    settings: Settings,
    names: tuple[str, ...],
    reports: Connection,
    parent: int,
    schema: str = "public",
    group: str | None = None,
) -> None:
    """A child: run the projections, report their statuses, stop on SIGTERM."""
    started = start_child(settings, parent, PROJECTIONS_NAME)
    if started is None:
        return
    stopping, codec = started
    progressed = threading.Event()
    runners = [
        ProjectionRunner(
            settings,
            PROJECTIONS[name],
            codec,
            schema=schema,
            group=group,
            on_progress=progressed.set,
        )
        for name in names
    ]
    tune_gc()
    for runner in runners:
        runner.start()
    try:
        while not stopping.is_set():
            progressed.wait(HEARTBEAT_S)
            progressed.clear()
            reports.send([_snapshot(runner.status) for runner in runners])
            if not all(runner.running for runner in runners):
                # A runner stopped on a bug (named in its status, just sent):
                # exit, so the parent restarts this process and counts it.
                raise SystemExit(1)
    except OSError:  # the worker is gone
        pass
    finally:
        for runner in runners:
            runner.stop(timeout=10)


def _snapshot(status: Status) -> Status:
    # A runner changes its status on its own thread; copying a dict is atomic.
    return replace(status, positions=dict(status.positions), heads=dict(status.heads))
