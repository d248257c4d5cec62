"""Exactly once through broker SIGKILLs: the transactional processor alone, under
load, on a private broker that is killed and started again and again.

``streamfold broker-kills --minutes 10`` starts a broker of its own, produces
numbered records to an input topic at ``--rate`` records/s (an idempotent
producer), and runs ``--processors`` processors, each in a process and a consumer
group of its own, echoing every input into an output topic of its own in Kafka
transactions. Every 15-40 s the broker is SIGKILLed, left down for 1-5 s and started
again. A processor process whose transactional call blocks past its limit exits and
is started again, as the worker does with a write process (each restart is listed).
At the end the feed stops and every group must commit its offsets to the input's
end; then each output, read as a read_committed consumer reads it, must hold every
input exactly once. It prints what it saw and exits 1 on any duplicate, loss or
group that did not catch up.

The soak (``streamfold soak``) runs the whole system under mixed faults; this loop
puts many more broker kills on the write path's one mechanism, which is where Kafka's
and librdkafka's behaviour around a broker's crash shows (see the README).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import random
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as EventType
from typing import Any

from confluent_kafka import (
    Consumer,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from app.adapters.eventlog import format_at, parse_at
from app.adapters.processor import Batch, Ownership, Processor
from app.adapters.topics import (
    TP,
    TopicSpec,
    committed_offsets,
    ensure_topics,
    headers_of,
    log_ends,
    read_range,
    reader,
    watermarks,
)
from app.audit import read_topic
from app.local import deployments
from app.settings import Settings
from app.writer import exit_if_stuck

log = logging.getLogger("streamfold.brokerkills")

INPUT = "broker-kills-in"
ECHOES_HEADER = "echoes"
GROUP = "broker-kills"
# A processor process that exits with this was stuck in a transactional call.
STUCK_EXIT = 3
PARTITIONS = 4
CATCH_UP_S = 300.0


class Echo:
    """A handler that writes each input record, unchanged, to ``output``."""

    def __init__(self, output: str) -> None:
        self.output = output
        self.topics = (INPUT,)

    def prepare(self, partitions: set[TP]) -> None:
        pass

    def assigned(self, partitions: Sequence[TP]) -> None:
        pass

    def revoked(self, partitions: Sequence[TP]) -> None:
        pass

    def handle(self, message: Message, batch: Batch) -> None:
        batch.send(self.output, message.value(), key=message.key())

    def tick(self, batch: Batch) -> None:
        pass

    def committed(self) -> None:
        pass

    def aborted(self) -> None:
        pass


class KeepingEcho(Echo):
    """An echo that takes input again harmlessly, as the write side's handlers do
    (``Processor(replays_safely=True)``): each output record names the input record it
    echoes (header ``echoes``, ``<partition>@<offset>``) and goes to the input's
    partition number, so a partition taken over, or left uncertain by an abort,
    first reads its output's last committed record, and skips input at or before
    it. A lookup of committed offsets held past its time then starts from the
    group's offsets instead of waiting."""

    def __init__(self, settings: Settings, output: str) -> None:
        super().__init__(output)
        self.settings = settings
        self.last: dict[int, int] = {}
        self.pending: dict[int, int] = {}
        self.partitions = Ownership()
        self.skipped = 0

    def assigned(self, partitions: Sequence[TP]) -> None:
        self.partitions.take(partitions)

    def revoked(self, partitions: Sequence[TP]) -> None:
        for p in self.partitions.give_up(partitions):
            self.last.pop(p, None)

    def prepare(self, partitions: set[TP]) -> None:
        for _, p in partitions:
            if p in self.partitions.stale:
                self.last[p] = last_echoed(self.settings, self.output, p)
                self.partitions.stale.discard(p)
                log.info("%s[%d]: last echoed input %d", self.output, p, self.last[p])

    def handle(self, message: Message, batch: Batch) -> None:
        partition, offset = message.partition() or 0, message.offset() or 0
        if offset <= self.pending.get(partition, self.last.get(partition, -1)):
            # Echoed before: taken again after the group's offsets went back.
            self.skipped += 1
            log.warning("%s: input %d@%d echoed before", self.output, partition, offset)
            return
        batch.send(
            self.output,
            message.value(),
            key=message.key(),
            partition=partition,
            headers=[(ECHOES_HEADER, format_at((partition, offset)))],
        )
        self.pending[partition] = offset

    def committed(self) -> None:
        self.last.update(self.pending)
        self.pending.clear()

    def aborted(self) -> None:
        # A commit that failed may have landed: the output says.
        self.pending.clear()
        self.partitions.doubt()


def last_echoed(settings: Settings, output: str, partition: int) -> int:
    """The input offset of the last committed record of ``output``'s ``partition``
    (-1: none), read backwards in growing windows (an open transaction at the end is
    waited for, then read past; as ``audit.read_topic``, to the log end)."""
    consumer = reader(settings, "broker-kills-echoed")
    try:
        low, _ = watermarks(consumer, output, partition)
        # The log end, not the high watermark a read_committed consumer is told
        # (the last stable offset: below a commit whose marker has not landed).
        end = log_ends(settings, [output])[(output, partition)]
        window = 64
        while end > low:
            start = max(low, end - window)
            found = [
                parse_at(dict(headers_of(m)).get(ECHOES_HEADER))
                for m in read_range(consumer, output, partition, start, end)
            ]
            named = [at[1] for at in found if at is not None]
            if named:
                return named[-1]
            end, window = start, window * 4
        return -1
    finally:
        consumer.close()


@dataclass
class Outcome:
    minutes: float
    rate: float
    keeping: bool = False
    kills: int = 0
    down_s: list[float] = field(default_factory=list)
    produced: int = 0
    # Processor processes that exited (stuck in a call, or failed) and were
    # started again, as the worker starts a write process again.
    restarts: list[str] = field(default_factory=list)
    # Per output: records, duplicated inputs, missing inputs, caught up.
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(
            o["duplicated"] == 0 and o["missing"] == 0 and o["caught_up"]
            for o in self.outputs.values()
        )


def run(
    settings: Settings,
    minutes: float,
    rate: float,
    *,
    processors: int = 2,
    seed: int = 1,
    every: tuple[float, float] = (15.0, 40.0),
    keeping: bool = False,
) -> Outcome:
    """The loop (see the module's docstring), a kill every ``every`` seconds (drawn
    between the two), with ``KeepingEcho`` processors if ``keeping``;
    ``Outcome.ok`` says whether it held."""
    rng = random.Random(seed)  # noqa: S311 - fault timing, not a secret
    outcome = Outcome(minutes=minutes, rate=rate, keeping=keeping)
    with deployments.private_broker(settings) as (own, node):
        outputs = [f"broker-kills-out-{n}" for n in range(processors)]
        ensure_topics(own, [TopicSpec(t, PARTITIONS) for t in (INPUT, *outputs)])
        feeding = threading.Event()
        feeding.set()
        feeder = threading.Thread(
            target=_feed, args=(own, rate, feeding, outcome), daemon=True
        )
        feeder.start()
        echoes = Echoes(own, outputs, keeping)
        try:
            end = time.monotonic() + minutes * 60
            while time.monotonic() < end:
                echoes.watch(min(rng.uniform(*every), end - time.monotonic()))
                if time.monotonic() >= end:
                    break
                killed = time.monotonic()
                node.stop(kill=True)
                outcome.kills += 1
                time.sleep(rng.uniform(1, 5))
                node.start(timeout=180)
                outcome.down_s.append(round(time.monotonic() - killed, 1))
                log.info(
                    "kill %d: broker back after %.1fs",
                    outcome.kills,
                    outcome.down_s[-1],
                )
            feeding.clear()
            feeder.join()
            ends = log_ends(own, [INPUT])
            caught_up = {
                output: _caught_up(own, f"{GROUP}.{n}", ends, echoes)
                for n, output in enumerate(outputs)
            }
        finally:
            echoes.stop()
            outcome.restarts = echoes.restarts
        inputs = Counter(r.value for r in read_topic(own, INPUT))
        if sum(inputs.values()) != outcome.produced or max(inputs.values()) != 1:
            raise RuntimeError(
                f"the input holds {sum(inputs.values())} records for "
                f"{outcome.produced} produced: the feed itself was not exactly once"
            )
        for output in outputs:
            seen = Counter(r.value for r in read_topic(own, output))
            outcome.outputs[output] = {
                "records": sum(seen.values()),
                "duplicated": sum(1 for count in seen.values() if count > 1),
                "missing": len(inputs.keys() - seen.keys()),
                "unknown": len(seen.keys() - inputs.keys()),
                "caught_up": caught_up[output],
            }
    return outcome


def _feed(
    settings: Settings, rate: float, feeding: threading.Event, outcome: Outcome
) -> None:
    """Numbered records at ``rate`` a second, in bursts of 200, until told to stop;
    then every one delivered."""
    producer = Producer({**settings.producer_config(), "enable.idempotence": True})
    n, began = 0, time.monotonic()
    while feeding.is_set():
        for _ in range(200):
            try:
                producer.produce(INPUT, str(n).encode(), str(n % 97).encode())
                n += 1
            except BufferError:  # the broker is away: the queue is full
                producer.poll(0.1)
        producer.poll(0)
        time.sleep(max(0.0, began + n / rate - time.monotonic()))
    if producer.flush(CATCH_UP_S) > 0:
        raise RuntimeError("the feed's records were not all delivered")
    outcome.produced = n


class Echoes:
    """The echo processors, each in a process of its own as the worker runs its write
    processes: one whose transactional call blocks past its limit exits, and is
    started again here (as the worker does), which ``restarts`` records."""

    def __init__(self, settings: Settings, outputs: list[str], keeping: bool) -> None:
        self.settings = settings
        self.outputs = outputs
        self.keeping = keeping
        self.restarts: list[str] = []
        self._context = multiprocessing.get_context("spawn")
        self._stop = self._context.Event()
        self._processes = [self._start(n) for n in range(len(outputs))]

    def _start(self, n: int) -> BaseProcess:
        process = self._context.Process(
            target=_echo,
            args=(self.settings, n, self.outputs[n], self.keeping, self._stop),
            name=f"echo-{n}",
            daemon=True,
        )
        process.start()
        return process

    def watch(self, seconds: float) -> None:
        """Wait ``seconds``, starting again any processor process that exited."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for n, process in enumerate(self._processes):
                if process.exitcode is not None:
                    why = "stuck" if process.exitcode == STUCK_EXIT else "failed"
                    self.restarts.append(
                        f"{GROUP}.{n} {why} (exit {process.exitcode}), started again"
                    )
                    log.warning("%s", self.restarts[-1])
                    self._processes[n] = self._start(n)
            time.sleep(0.5)

    def stop(self) -> None:
        self._stop.set()
        for process in self._processes:
            process.join(60)
            if process.exitcode is None:
                process.kill()


def _echo(
    settings: Settings, n: int, output: str, keeping: bool, stop: EventType
) -> None:
    """One echo processor, in a child process, until ``stop``; stuck, it exits with
    ``STUCK_EXIT`` as a write process exits (``writer.exit_if_stuck``)."""
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s echo-{n} %(levelname)s %(message)s"
    )
    processor = Processor(
        settings,
        group=f"{GROUP}.{n}",
        transactional_id=f"{GROUP}-{n}",
        handlers=[KeepingEcho(settings, output) if keeping else Echo(output)],
        replays_safely=keeping,
    )
    stopping = threading.Event()
    thread = threading.Thread(target=processor.run, args=(stopping,), daemon=True)
    thread.start()
    while thread.is_alive() and not stop.is_set():
        exit_if_stuck([processor], time.monotonic(), STUCK_EXIT)
        time.sleep(0.5)
    stopping.set()
    thread.join(60)


def _caught_up(
    settings: Settings, group: str, ends: dict[TP, int], echoes: Echoes
) -> bool:
    """Whether ``group`` commits its offsets to the input's ``ends`` in time (a
    read_committed lookup, which offsets held pending would keep waiting)."""
    consumer = Consumer(
        {**settings.consumer_config(), "group.id": group, "enable.auto.commit": False}
    )
    try:
        deadline = time.monotonic() + CATCH_UP_S
        partitions = [TopicPartition(t, p) for t, p in ends]
        while time.monotonic() < deadline:
            try:
                found = committed_offsets(consumer, partitions, 10)
                if {(tp.topic, tp.partition): tp.offset for tp in found} == ends:
                    return True
            except KafkaException as error:
                log.info("%s: committed offsets not read: %s", group, error)
            echoes.watch(2)
        return False
    finally:
        consumer.close()


def report(outcome: Outcome) -> str:
    return json.dumps({**asdict(outcome), "ok": outcome.ok}, indent=2)
