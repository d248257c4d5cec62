"""The worker's child processes (its write processes and projection processes):
each started, and started again when it exits, by a thread of the worker's; each
dies with the worker, however it dies.

Light on imports: the worker starts its write processes from here before it imports
anything else (see ``app.writeside.start_write_side``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import threading
import time
from typing import Any

from app.adapters.catalog import SchemaCatalog
from app.adapters.codec import Codec, ConfluentRegistry
from app.settings import Settings

PR_SET_PDEATHSIG = 1


class Supervisor:
    """Children started, and started again when they exit, each by a thread of its
    own; a subclass says in ``_supervise(index)`` how child ``index`` runs."""

    def __init__(self, processes: int, name: str) -> None:
        # Children that exited without being asked to.
        self.exits = 0
        self._name = name
        self._stopping = threading.Event()
        # Held while a child starts, so ``stop`` sees every child started.
        self._starting = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._children: list[Any] = [None] * processes

    def start(self) -> None:
        for index in range(len(self._children)):
            # From a thread that lives as long as the process: a child's death
            # signal fires when the thread that started it ends.
            thread = threading.Thread(
                target=self._supervise,
                args=(index,),
                name=f"{self._name}-{index}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        with self._starting:
            self._stopping.set()
        stop_children(self._children, timeout)
        for thread in self._threads:
            thread.join(5)

    @property
    def running(self) -> bool:
        return any(c is not None and c.is_alive() for c in self._children)

    def _supervise(self, index: int) -> None:
        raise NotImplementedError


def stop_children(children: list[Any], timeout: float) -> None:
    """SIGTERM each live child (it closes its clients), and SIGKILL those still
    alive after ``timeout``."""
    alive = [c for c in children if c is not None and c.is_alive()]
    for child in alive:
        child.terminate()
    deadline = time.monotonic() + timeout
    for child in alive:
        child.join(max(deadline - time.monotonic(), 0.1))
        if child.is_alive():
            child.kill()
            child.join(5)


def start_child(
    settings: Settings, parent: int, name: str
) -> tuple[threading.Event, Codec] | None:
    """What each of the worker's children does first: die with the worker, take
    ``name``, set SIGTERM to stop it (the returned event), log as the worker does;
    and its codec. None when the worker is gone already."""
    die_with_parent()
    name_process(name)
    if os.getppid() != parent:
        return None  # the worker died before the death signal was set
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s",
    )
    ConfluentRegistry.preload()
    codec = Codec(ConfluentRegistry(settings.schema_registry_url), SchemaCatalog.load())
    return stopping, codec


PR_SET_NAME = 15


def name_process(name: str) -> None:
    """Name this process in ``/proc/<pid>/comm`` (what ps and top show), so an
    operator (or a test) tells the worker's children apart."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, name.encode()[:15])


def die_with_parent() -> None:
    """Have Linux SIGKILL this process when the worker dies, however it dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
