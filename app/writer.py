"""A write process: the transactional processors of one slot of the worker (see
``app.writeside``), with the command handlers of every aggregate type and the saga
in the commands group, and the saga's feed in a group of its own."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from agents.saga import FeedHandler, SagaHandler
from app.adapters.codec import Codec
from app.adapters.processor import Handler, Processor
from app.adapters.saga_io import feed_group
from app.children import start_child
from app.runtime import AGGREGATES, CommandHandler, drop_cache_of_other_topics
from app.settings import Settings

log = logging.getLogger("streamfold.worker")
REPORT_S = 0.5
# How long a child's transactional ids may take to be fenced ahead (see
# ``app.writeside.fence``).
FENCE_TIMEOUT_S = 10.0
WRITER_NAME = "sf-writer"


def command_group(settings: Settings) -> str:
    return f"{settings.app_id}.commands"


def transactional_ids(settings: Settings, index: int) -> list[str]:
    """Child ``index``'s transactional ids: its command processor's, then its saga
    feed's (with the saga on). Unique per process slot and the same after a
    restart: the new incarnation's producers abort what the old one left open."""
    slot = f"{settings.app_id}-{socket.gethostname()}-{settings.web_port}-{index}"
    return [slot, f"{slot}-feed"] if settings.saga else [slot]


def state_dir(settings: Settings, index: int) -> Path:
    """Where child ``index`` of this worker caches its state (RocksDB)."""
    return (
        settings.home / "write-state" / f"{settings.app_id}-{settings.web_port}-{index}"
    )


def write(
    settings: Settings, index: int, reports: Connection, parent: int, fenced: Any
) -> None:
    """A child: run the processors, report what they own, stop on SIGTERM.

    ``fenced`` is set by the worker once it has fenced this slot's transactional
    ids (``app.writeside.fence``); the processors start after that, so the worker's
    fencing producers cannot fence theirs."""
    started = start_child(settings, parent, WRITER_NAME)
    if started is None:
        return
    stopping, codec = started
    log.info("write process %d started", index)
    drop_cache_of_other_topics(settings, state_dir(settings, index))
    processors, handlers = build(settings, codec, index)
    began = time.monotonic()
    if fenced.wait(FENCE_TIMEOUT_S + 5.0):
        log.info(
            "write process %d: ids fenced %.2fs later", index, time.monotonic() - began
        )
    else:
        log.warning("write process %d: the worker did not fence its ids", index)
    threads = [
        threading.Thread(target=_running, args=(p, stopping), daemon=True)
        for p in processors
    ]
    for thread in threads:
        thread.start()
    try:
        _watch(processors, handlers, reports, stopping, threads)
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
    ids = transactional_ids(settings, index)
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
                transactional_id=ids[1],
                handlers=[FeedHandler(settings, codec)],
                replays_safely=True,
            )
        )
    processors.insert(
        0,
        Processor(
            settings,
            group=command_group(settings),
            transactional_id=ids[0],
            handlers=handlers,
            batch_size=settings.command_batch,
            # Its handlers take input again harmlessly too, but it waits holds out:
            # after a broker SIGKILL a transaction can be left hanging on an events
            # partition as well, and commands decided past the hold would be
            # answered while their events sat behind it, out of a read_committed
            # reader's sight (a clean-clone run of test_broker_crash, 2026-12-05).
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


def _watch(
    processors: list[Processor],
    handlers: list[Handler],
    reports: Connection,
    stopping: threading.Event,
    threads: list[threading.Thread],
) -> None:
    """Until stopped or a processor's thread ends: exit the process if a processor
    is stuck in a call, and report what they own, every ``REPORT_S``."""
    while not stopping.is_set() and all(t.is_alive() for t in threads):
        exit_if_stuck(processors, time.monotonic())
        reports.send(_report(processors, handlers))
        stopping.wait(REPORT_S)


def exit_if_stuck(processors: list[Processor], now: float, code: int = 1) -> None:
    """A processor blocked in a transactional call past its limit ends the process
    with ``code`` (its supervisor starts it again), as a bug in one does
    (``_running``)."""
    for processor in processors:
        stuck = processor.stuck(now)
        if stuck is not None:
            log.error("%s; the process exits to be started again", stuck)
            os._exit(code)


def _report(processors: list[Processor], handlers: list[Handler]) -> dict[str, Any]:
    report: dict[str, Any] = {
        p.group: {
            "assignment": sorted(p.report.assigned),
            "batches": p.report.batches,
            "messages": p.report.messages,
            "aborts": p.report.aborts,
            "held_lookups": p.report.held_lookups,
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
