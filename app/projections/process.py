"""The worker's Postgres projections, in a process of their own.

A projection folds events in Python on its thread; in the worker's process those
threads would share one GIL with the event loop that runs the command agents, the
saga and the Faust views, which then waits for the GIL after every socket call.
So the worker starts one child process (``project``) that runs every projection it
has chosen, and keeps a mirror of their progress for ``/status``, ``/metrics`` and
read-your-writes (``ProjectionProcess.wait_for``).

The child sends its runners' statuses over a pipe after every commit and at least
every ``HEARTBEAT_S``. It dies with the worker (``PR_SET_PDEATHSIG``, so also when
the worker is SIGKILLed) and stops cleanly on SIGTERM. If it exits on its own, the
worker names the exit in every projection's ``error`` and starts it again; positions
live in Postgres, so nothing is lost or applied twice.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import Any

from app.adapters.catalog import SchemaCatalog
from app.adapters.codec import Codec, ConfluentRegistry
from app.projections import PROJECTIONS
from app.projections.engine import ProjectionRunner, Status, tune_gc
from app.settings import Settings

log = logging.getLogger("streamfold.projections")

# How often the child reports when nothing was committed (heads and errors change
# without commits).
HEARTBEAT_S = 0.5
PR_SET_PDEATHSIG = 1


class ProjectionProcess:
    """Starts the child, restarts it when it exits, and mirrors what it reports."""

    def __init__(self, settings: Settings, names: tuple[str, ...]) -> None:
        self.settings = settings
        self.names = names
        self.statuses = {name: Status(name) for name in names}
        self._progress = threading.Condition()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._child: Any = None

    def start(self) -> None:
        if not self.names:
            return
        # From the thread that lives as long as the process: the child's death
        # signal fires when the thread that started it ends.
        self._thread = threading.Thread(
            target=self._supervise, name="projection-process", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        child = self._child
        if child is not None and child.is_alive():
            child.terminate()  # SIGTERM: the child closes its consumers
            child.join(timeout)
            if child.is_alive():
                child.kill()
                child.join(5)
        if self._thread is not None:
            self._thread.join(5)

    def _supervise(self) -> None:
        context = multiprocessing.get_context("spawn")
        delay = 0.5
        while not self._stopping.is_set():
            receiving, sending = context.Pipe(duplex=False)
            child = context.Process(
                target=project,
                args=(self.settings, self.names, sending, os.getpid()),
                name="streamfold-projections",
            )
            child.start()
            sending.close()
            self._child = child
            began = time.monotonic()
            with contextlib.suppress(EOFError, OSError):
                while True:
                    self._mirror(receiving.recv())
            receiving.close()
            child.join(10)
            if self._stopping.is_set():
                return
            error = (
                f"the projection process exited (code {child.exitcode}); "
                f"restarting in {delay:.1f}s"
            )
            log.error(error)
            with self._progress:
                for status in self.statuses.values():
                    status.error = error
            if time.monotonic() - began > 60:
                delay = 0.5
            self._stopping.wait(delay)
            delay = min(delay * 2, 10.0)

    def _mirror(self, reported: list[Status]) -> None:
        with self._progress:
            for status in reported:
                self.statuses[status.projection] = status
            self._progress.notify_all()

    def wait_for(
        self, name: str, topic: str, partition: int, offset: int, timeout: float
    ) -> bool:
        """True once projection ``name`` has applied ``offset`` of ``topic[partition]``."""
        with self._progress:
            return self._progress.wait_for(
                lambda: (
                    self.statuses[name].positions.get((topic, partition), 0) > offset
                ),
                timeout,
            )


def project(
    settings: Settings, names: tuple[str, ...], reports: Connection, parent: int
) -> None:
    """The child: run the projections, report their statuses, stop on SIGTERM."""
    _die_with_parent()
    if os.getppid() != parent:
        return  # the worker died before the death signal was set
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s",
    )
    codec = Codec(ConfluentRegistry(settings.schema_registry_url), SchemaCatalog.load())
    progressed = threading.Event()
    runners = [
        ProjectionRunner(settings, PROJECTIONS[name], codec, on_progress=progressed.set)
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
    except OSError:  # the worker is gone
        pass
    finally:
        for runner in runners:
            runner.stop(timeout=10)


def _snapshot(status: Status) -> Status:
    # A runner changes its status on its own thread; copying a dict is atomic.
    return replace(status, positions=dict(status.positions), heads=dict(status.heads))


def _die_with_parent() -> None:
    """Have Linux SIGKILL this process when the worker dies, however it dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
