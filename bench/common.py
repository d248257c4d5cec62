"""Helpers of ``bench.commands``: isolated deployments, and a listener that times each
command until its result arrives (the rest is in ``bench.harness``)."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Callable, Sequence

from confluent_kafka import Consumer, TopicPartition

from app.adapters.topics import end_offsets, take
from app.local.deployments import free_port
from app.settings import Settings, Topics
from app.waiting import eventually


def isolated(settings: Settings, partitions: int, run: str) -> Settings:
    """A deployment of its own: topic prefix, application id, web port, no
    Postgres projections (the write side is what is measured)."""
    name = f"bench-{run}-p{partitions}"
    return dataclasses.replace(
        settings,
        topics=Topics(prefix=f"{name}."),
        app_id=f"streamfold-{name}",
        partitions=partitions,
        web_port=free_port(),
        projections=(),
    )


def baseline_topics(settings: Settings, kind: str) -> dict[str, str]:
    """The commands-, events- and results-like topics of one baseline loop."""
    prefix = f"{settings.topics.prefix}{kind}"
    return {name: f"{prefix}.{name}" for name in ("commands", "events", "results")}


def run_id() -> str:
    return uuid.uuid4().hex[:6]


class ResultListener:
    """Reads a results topic from its current end on a thread of its own and notes
    when each command's first result arrives."""

    def __init__(
        self,
        settings: Settings,
        topic: str,
        command_id_of: Callable[[bytes], str],
    ) -> None:
        self.arrived: dict[str, float] = {}
        self.results = 0
        self._topic = topic
        self._command_id_of = command_id_of
        self._stop = threading.Event()
        self._consumer = Consumer(
            {
                **settings.consumer_config(),
                "group.id": f"bench-listener-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 5,
            }
        )
        self._consumer.assign(self._ends(topic))
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _ends(self, topic: str) -> list[TopicPartition]:
        return [
            TopicPartition(topic, p, end)
            for p, end in end_offsets(self._consumer, topic).items()
        ]

    def _run(self) -> None:
        arrived = self.arrived
        while not self._stop.is_set():
            for message in take(self._consumer, 1000, 0.05):
                if message.error():
                    continue
                now = time.monotonic()
                self.results += 1
                arrived.setdefault(self._command_id_of(message.value() or b""), now)

    def wait_for(
        self, command_ids: Sequence[str], timeout: float, what: str = "commands"
    ) -> float:
        """Seconds until all have a result (monotonic clock); raises on timeout."""
        missing = eventually(
            lambda: sum(1 for c in command_ids if c not in self.arrived),
            lambda count: count == 0,
            timeout=timeout,
            every=0.05,
        )
        if missing:
            raise TimeoutError(
                f"{missing} of {len(command_ids)} {what} without a result "
                f"after {timeout:.0f}s"
            )
        return max(self.arrived[c] for c in command_ids)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._consumer.close()
