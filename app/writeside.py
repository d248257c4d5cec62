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
import threading
import time
from typing import Any

from app.adapters.topics import (
    ensure_topics,
    init_transactions,
    required_topics,
    saga_topics,
)
from app.children import Supervisor
from app.settings import Settings
from app.waiting import Backoff
from app.writer import (
    FENCE_TIMEOUT_S,
    REPORT_S,
    command_group,
    transactional_ids,
    write,
)

log = logging.getLogger("streamfold.worker")
# How long the worker lets its write processes start alone (see start_write_side).
START_WAIT_S = 10.0


def fence(settings: Settings, transactional_ids: list[str]) -> None:
    """Abort what earlier holders of ``transactional_ids`` left open, with a
    producer of each id that opens nothing itself.

    Run by the worker while the child that will use the ids starts: after a crash
    the broker answers a new producer's first InitProducerId by aborting the dead
    one's transaction, and its next with CONCURRENT_TRANSACTIONS until the abort is
    done; librdkafka retries that after a fixed 500 ms. Fenced here, that wait
    passes while the child imports its modules, and the child's own
    ``init_transactions`` (after ``fenced``) is answered at once."""
    from confluent_kafka import KafkaException, Producer

    def one(transactional_id: str) -> None:
        producer = Producer(
            {**settings.kafka_client_config(), "transactional.id": transactional_id}
        )
        try:
            init_transactions(producer, settings.topics.results, FENCE_TIMEOUT_S)
        except KafkaException as error:  # the child's own init deals with it
            log.info("could not fence %s ahead: %s", transactional_id, error)

    threads = [threading.Thread(target=one, args=(t,)) for t in transactional_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def start_write_side(settings: Settings) -> WriteProcess:
    """The topics, then the write processes: before the worker imports Faust, runs
    the migrations and registers the schemas' subjects (about two seconds), so a
    worker restarted after a crash answers commands again that much sooner."""
    ensure_topics(
        settings,
        required_topics(settings) + (saga_topics(settings) if settings.saga else []),
    )
    side = WriteProcess(settings, settings.write_processes)
    side.start()
    # The rest of the worker's start (Faust, the migrations, the projections: two
    # seconds of CPU) would compete with the write processes' own on a small
    # machine; after a crash, answering commands again comes first.
    side.wait_assigned(START_WAIT_S)
    return side


class WriteProcess(Supervisor):
    """Starts the write side's children, restarts each one that exits, and keeps
    what they last reported."""

    def __init__(self, settings: Settings, processes: int = 1) -> None:
        super().__init__(processes, "write-process")
        self.settings = settings
        self.reports: list[dict[str, Any]] = [{} for _ in range(processes)]

    def wait_assigned(self, timeout: float) -> bool:
        """Until a child reports command partitions it owns (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        while not self.assigned and time.monotonic() < deadline:
            if self._stopping.wait(REPORT_S / 5):
                break
        return bool(self.assigned)

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
            fenced = context.Event()
            child = context.Process(
                target=write,
                args=(self.settings, index, sending, os.getpid(), fenced),
                name=f"streamfold-writer-{index}",
            )
            with self._starting:
                if self._stopping.is_set():
                    return
                child.start()
                self._children[index] = child
            sending.close()
            began = time.monotonic()
            fence(self.settings, transactional_ids(self.settings, index))
            fenced.set()
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
            delay = backoff.after(time.monotonic() - began)
            log.error(
                "write process %d exited (code %s); restarting it in %.1fs",
                index,
                child.exitcode,
                delay,
            )
            self._stopping.wait(delay)
