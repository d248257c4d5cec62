"""The write side's processes: the transactional processors, as children of the
worker.

Each child (``STREAMFOLD_WRITE_PROCESSES``, one by default) runs one processor in the
consumer group ``<app_id>.commands`` with the command handlers of every aggregate
type and the saga, and one in ``<app_id>.saga`` with the saga's feed; children share
the partitions through those groups. A child dies with the worker (``SIGKILL`` too),
stops cleanly on SIGTERM, and is started again if it exits; it reports the
partitions it owns, for ``/ready`` and ``/status``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from agents.saga import FeedHandler, SagaHandler, ensure_saga_topics
from app.adapters.codec import Codec
from app.adapters.processor import Handler, Processor
from app.adapters.saga_io import feed_group
from app.adapters.topics import ensure_topics
from app.projections.process import Supervisor, start_child
from app.runtime import AGGREGATES, CommandHandler
from app.settings import Settings
from app.waiting import Backoff

log = logging.getLogger("streamfold.worker")
REPORT_S = 0.5
WRITER_NAME = "sf-writer"


def command_group(settings: Settings) -> str:
    return f"{settings.app_id}.commands"


def state_dir(settings: Settings, index: int) -> Path:
    """Where child ``index`` of this worker caches its state (RocksDB)."""
    return (
        settings.home / "write-state" / f"{settings.app_id}-{settings.web_port}-{index}"
    )


def write(settings: Settings, index: int, reports: Connection, parent: int) -> None:
    """A child: run the processors, report what they own, stop on SIGTERM."""
    started = start_child(settings, parent, WRITER_NAME)
    if started is None:
        return
    stopping, codec = started
    processors, handlers = build(settings, codec, index)
    threads = [
        threading.Thread(target=_running, args=(p, stopping), daemon=True)
        for p in processors
    ]
    for thread in threads:
        thread.start()
    try:
        while not stopping.is_set() and all(t.is_alive() for t in threads):
            reports.send(_report(processors, handlers))
            stopping.wait(REPORT_S)
    except OSError:  # the worker is gone
        pass
    finally:
        stopping.set()
        for thread in threads:
            thread.join(30)
        for handler in handlers:
            close = getattr(handler, "close", None)
            if close is not None:
                close()
    if not stopping.is_set():
        raise SystemExit(1)


def build(
    settings: Settings, codec: Codec, index: int
) -> tuple[list[Processor], list[Handler]]:
    """Child ``index``'s processors and their handlers: the command handlers and
    the saga in the commands group, and the saga's feed in a group of its own."""
    cache = state_dir(settings, index)
    # Unique per process slot, and the same after a restart: the new incarnation's
    # producer then aborts what the old one left open at once.
    tx_id = f"{settings.app_id}-{socket.gethostname()}-{settings.web_port}-{index}"
    handlers: list[Handler] = [
        CommandHandler(settings, area, codec, cache) for area in AGGREGATES
    ]
    processors = []
    if settings.saga:
        handlers.append(SagaHandler(settings, codec, cache))
        processors.append(
            Processor(
                settings,
                group=feed_group(settings),
                transactional_id=f"{tx_id}-feed",
                handlers=[FeedHandler(settings, codec)],
            )
        )
    processors.insert(
        0,
        Processor(
            settings,
            group=command_group(settings),
            transactional_id=tx_id,
            handlers=handlers,
            batch_size=settings.command_batch,
        ),
    )
    return processors, handlers


def _running(processor: Processor, stopping: threading.Event) -> None:
    try:
        processor.run(stopping)
    except Exception:  # a bug: the child exits and is started again
        log.exception("%s stopped", processor.group)
        stopping.set()
        os._exit(1)


def _report(processors: list[Processor], handlers: list[Handler]) -> dict[str, Any]:
    report: dict[str, Any] = {
        p.group: {
            "assignment": sorted(p.report.assigned),
            "batches": p.report.batches,
            "messages": p.report.messages,
            "aborts": p.report.aborts,
            "last_error": p.report.last_error,
        }
        for p in processors
    }
    # Snapshots written and states restored from them, per aggregate type.
    report[processors[0].group]["stores"] = {
        h.aggregate.type: dict(h.stats)
        for h in handlers
        if isinstance(h, CommandHandler)
    }
    return report


def start_write_side(settings: Settings) -> WriteProcess:
    """The topics, then the write processes: before the worker imports Faust, runs
    the migrations and registers the schemas' subjects (about two seconds), so a
    worker restarted after a crash answers commands again that much sooner."""
    ensure_topics(settings)
    if settings.saga:
        ensure_saga_topics(settings)
    write = WriteProcess(settings, settings.write_processes)
    write.start()
    return write


class WriteProcess(Supervisor):
    """Starts the write side's children, restarts each one that exits, and keeps
    what they last reported."""

    def __init__(self, settings: Settings, processes: int = 1) -> None:
        super().__init__(processes, "write-process")
        self.settings = settings
        self.reports: list[dict[str, Any]] = [{} for _ in range(processes)]

    @property
    def assigned(self) -> set[tuple[str, int]]:
        """The command partitions the children own now."""
        group = command_group(self.settings)
        return {
            (topic, partition)
            for report in self.reports
            for topic, partition in report.get(group, {}).get("assignment", [])
        }

    def status(self) -> dict[str, Any]:
        """What the children last reported: per consumer group, the partitions
        owned, batches committed and aborted, the last error; and the restarts."""
        owned = {
            tuple(tp)
            for report in self.reports
            for group in report.values()
            for tp in group.get("assignment", [])
        }
        return {
            "assignment": sorted(list(tp) for tp in owned),
            "processes": list(self.reports),
            "restarts": self.exits,
        }

    def _supervise(self, index: int) -> None:
        context = multiprocessing.get_context("spawn")
        backoff = Backoff(0.5, 10.0)
        while not self._stopping.is_set():
            receiving, sending = context.Pipe(duplex=False)
            child = context.Process(
                target=write,
                args=(self.settings, index, sending, os.getpid()),
                name=f"streamfold-writer-{index}",
            )
            with self._starting:
                if self._stopping.is_set():
                    return
                child.start()
                self._children[index] = child
            sending.close()
            try:
                while True:
                    self.reports[index] = receiving.recv()
            except (EOFError, OSError):
                pass
            receiving.close()
            child.join(10)
            self.reports[index] = {}
            if self._stopping.is_set():
                return
            self.exits += 1
            delay = backoff.next()
            log.error(
                "write process %d exited (code %s); restarting it in %.1fs",
                index,
                child.exitcode,
                delay,
            )
            self._stopping.wait(delay)
