"""End to end: a command produced → its read model visible in Postgres, through a real
worker process, beside a raw confluent-kafka + psycopg pipeline in the same run.

Per system: a warm-up, then a backlog of order lifecycles (create with 3 items, pay,
ship, deliver) produced at once — sustained commands/s = commands / (first produce →
last read model visible) — then, once the worker has settled (no lag in its
projections, agents or saga feed), the same workload paced at half that rate (or at
``e2e_latency_rate``) for the p50/p99 latency. CPU seconds of every process are sampled over the backlog.

The raw pipeline is one process with two threads: one consumes the commands and
produces each one's bytes to an events topic (acks=all, idempotent, offsets stored
once acknowledged); the other consumes the events and inserts them into Postgres with
its positions in the same transaction. It decodes nothing and decides nothing: the
floor for Python, this broker and this Postgres with the same delivery guarantees.

A read model is visible when the projection's stored position (committed with its
rows) passes the event's offset; ``PositionWatcher`` polls the positions table.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
from confluent_kafka import Consumer, Producer, TopicPartition

from app.adapters import topics
from app.adapters.codec import Codec
from app.adapters.saga_io import feed_group
from app.adapters.topics import inbox_topic, take
from app.client import CommandClient
from app.local import stack
from app.local.process import ServiceError, tail, wait_for
from app.local.worker import WorkerProcess
from app.settings import AGGREGATES, Settings
from app.waiting import eventually
from app.writer import command_group
from bench.harness import (
    CommandEncoder,
    CpuSampler,
    FramedRecord,
    PositionWatcher,
    Sent,
    figure,
    group_lag,
    high_watermarks,
    new_codec,
    new_producer,
    order_lifecycles,
    peak_memory_mib,
    percentile,
    postgres_backends,
    postgres_background,
    process_tree,
    produce,
    tail_figures,
)


@dataclass(frozen=True, slots=True)
class Sizes:
    warmup_orders: int
    orders: int  # backlog: 4 commands per order
    latency_seconds: float
    sequential_orders: int  # one command at a time, for the peer comparison
    latency_rate: float = 0  # commands/s offered for the latency; 0: half the max


# -- command results ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Arrived:
    at: float
    accepted: bool
    partition: int | None
    offset: int | None


class ResultListener:
    """Reads command-results from its current end on a thread of its own.

    ``consume(n, timeout)`` returns only when ``n`` messages arrived or the timeout
    passed, so the timeout is kept short: an arrival is noted at most 5 ms late.
    """

    def __init__(self, settings: Settings, codec: Codec) -> None:
        self.arrived: dict[str, Arrived] = {}
        self._codec = codec
        self._stop = threading.Event()
        self._news = threading.Condition()
        topic = settings.topics.results
        self._consumer = Consumer(
            {
                **settings.consumer_config(),
                "group.id": f"{settings.app_id}-bench-results",
                "enable.auto.commit": False,
            }
        )
        self._consumer.assign(
            [
                TopicPartition(topic, p, high)
                for p, high in high_watermarks(settings, topic).items()
            ]
        )
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = take(self._consumer, 1000, 0.05)
            now = time.monotonic()
            for message in batch:
                if message.error():
                    continue
                data = self._codec.decode(message.value() or b"").data
                self.arrived.setdefault(
                    data["command_id"],
                    Arrived(
                        now,
                        data["status"] == "ACCEPTED",
                        data["partition"],
                        data["offset"],
                    ),
                )
            if batch:
                with self._news:
                    self._news.notify_all()

    def wait_for(self, command_id: str, timeout: float) -> Arrived:
        with self._news:
            if not self._news.wait_for(lambda: command_id in self.arrived, timeout):
                raise TimeoutError(f"no result for {command_id} in {timeout:.0f}s")
        return self.arrived[command_id]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._consumer.close()


def _wait_all(ids: Sequence[str], found: Callable[[str], bool], timeout: float) -> None:
    missing = list(ids)

    def left() -> list[str]:
        missing[:] = [c for c in missing if not found(c)]
        return missing

    if eventually(left, lambda m: not m, timeout=timeout, every=0.05):
        raise TimeoutError(f"{len(missing)} of {len(ids)} commands not done")


# -- the systems under test --------------------------------------------------------------


class StreamfoldSystem:
    """The worker (`streamfold worker`, every projection the product runs)."""

    name = "streamfold"

    def __init__(self, settings: Settings, codec: Codec) -> None:
        self.settings = settings
        self.codec = codec
        self.topic = settings.topics.commands("orders")
        self.worker = WorkerProcess(settings, "bench-worker")
        self.listener: ResultListener | None = None
        self.watcher: PositionWatcher | None = None

    def start(self) -> int:
        self.worker.start(timeout=180)
        pid = self.worker.pid()
        if pid is None:
            raise ServiceError("the worker exited right after starting")
        self.listener = ResultListener(self.settings, self.codec)
        self.watcher = PositionWatcher(
            self.settings.database_url,
            "SELECT partition, next_offset FROM projection_positions"
            " WHERE projection = 'orders' AND topic = %s",
            (self.settings.topics.events("orders"),),
        )
        return pid

    def wait(self, sent: Sent, timeout: float) -> None:
        assert self.listener is not None
        assert self.watcher is not None
        arrived = self.listener.arrived
        _wait_all(list(sent.at), arrived.__contains__, timeout)
        results = [arrived[command_id] for command_id in sent.at]
        self.watcher.wait_past(
            [
                (r.partition, r.offset or 0)
                for r in results
                if r.accepted and r.partition is not None
            ],
            timeout,
            "the orders projection",
        )

    def settle(self, timeout: float) -> float:
        """Seconds until every projection the worker runs reports no lag and its
        Faust agents and saga feed have committed all they consume, so what is
        measured next meets an idle worker rather than its catch-up."""
        settings = self.settings
        url = f"{settings.web_url}/status"
        events = [settings.topics.events(a) for a in AGGREGATES]
        # The write processes' group: commands and the saga's inbox.
        writes = [settings.topics.commands(a) for a in AGGREGATES]
        writes.append(inbox_topic(settings))
        began = time.monotonic()

        lags: dict[str, int] = {}

        def idle() -> bool:
            status = httpx.get(url, timeout=5).raise_for_status().json()
            lags.clear()
            lags.update(
                {
                    f"projection {p['name']}": p["lag_events"]
                    for p in status["projections"]
                }
            )
            lags["faust agents"] = group_lag(settings, settings.app_id, events)
            lags["write processes"] = group_lag(
                settings, command_group(settings), writes
            )
            lags["saga feed"] = group_lag(
                settings, feed_group(settings), [*events, settings.topics.results]
            )
            return not any(lags.values())

        try:
            # Each look opens three consumers; a quarter second is fine enough for
            # waits of seconds.
            wait_for(idle, timeout, "the worker's projections to catch up", every=0.25)
        except ServiceError as error:
            behind = ", ".join(f"{k} {v}" for k, v in lags.items() if v)
            raise ServiceError(f"{error}; still behind: {behind}") from None
        return round(time.monotonic() - began, 2)

    def visible_at(self, sent: Sent, command_id: str) -> float | None:
        assert self.listener is not None
        assert self.watcher is not None
        result = self.listener.arrived.get(command_id)
        if result is None or not result.accepted or result.partition is None:
            return None
        return self.watcher.visible_at(result.partition, result.offset or 0)

    def durable_at(self, command_id: str) -> float | None:
        assert self.listener is not None
        result = self.listener.arrived.get(command_id)
        return None if result is None else result.at

    def rejected(self, sent: Sent) -> int:
        assert self.listener is not None
        arrived = self.listener.arrived
        return sum(1 for c in sent.at if c in arrived and not arrived[c].accepted)

    def stop(self) -> None:
        for part in (self.listener, self.watcher):
            if part is not None:
                part.close()
        self.worker.stop()


RAW_TABLES = """
CREATE TABLE IF NOT EXISTS bench_raw_events (
    partition integer NOT NULL,
    "offset" bigint NOT NULL,
    aggregate_id text NOT NULL,
    body bytea NOT NULL,
    PRIMARY KEY (partition, "offset")
);
CREATE TABLE IF NOT EXISTS bench_raw_positions (
    partition integer PRIMARY KEY,
    next_offset bigint NOT NULL
);
"""


def raw_topics(settings: Settings) -> tuple[str, str]:
    prefix = settings.topics.prefix
    return f"{prefix}raw.commands", f"{prefix}raw.events"


class RawSystem:
    """The raw pipeline, a subprocess of this module (``--raw-pipeline``)."""

    name = "raw pipeline"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic, events = raw_topics(settings)
        standing_for = {
            settings.topics.commands("orders"): self.topic,
            settings.topics.events("orders"): events,
        }
        topics.ensure_topics(
            settings,
            [
                topics.TopicSpec(
                    standing_for[s.name], s.partitions, dict(s.config), s.enforced
                )
                for s in topics.required_topics(settings)
                if s.name in standing_for
            ],
        )
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            conn.execute(RAW_TABLES)
        self.ready = settings.home / "bench" / f"{settings.app_id}.raw-ready"
        self.log = settings.home / "bench" / f"{settings.app_id}.raw.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.watcher: PositionWatcher | None = None

    def start(self) -> int:
        self.ready.parent.mkdir(parents=True, exist_ok=True)
        self.ready.unlink(missing_ok=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.end_to_end",
                    "--raw-pipeline",
                    str(self.ready),
                ],
                env={**os.environ, **self.settings.as_env()},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        process = self.process

        def ready() -> bool:
            if process.poll() is not None:
                raise ServiceError(f"the raw pipeline exited:\n{tail(self.log)}")
            return self.ready.exists()

        wait_for(ready, 60, "the raw pipeline's partition assignment", every=0.02)
        self.watcher = PositionWatcher(
            self.settings.database_url,
            "SELECT partition, next_offset FROM bench_raw_positions",
        )
        return process.pid

    def wait(self, sent: Sent, timeout: float) -> None:
        assert self.watcher is not None
        _wait_all(list(sent.at), sent.position.__contains__, timeout)
        self.watcher.wait_past(
            sent.position.values(), timeout, "the raw pipeline's rows"
        )

    def visible_at(self, sent: Sent, command_id: str) -> float | None:
        assert self.watcher is not None
        position = sent.position.get(command_id)
        return None if position is None else self.watcher.visible_at(*position)

    def durable_at(self, command_id: str) -> float | None:
        return None

    def rejected(self, sent: Sent) -> int:
        return 0

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.ready.unlink(missing_ok=True)


def raw_pipeline(settings: Settings, ready_file: Path) -> None:
    """Consume → produce the event → once acknowledged, store the offset; and
    consume the events → insert rows and positions in one transaction."""
    commands, events = raw_topics(settings)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    assigned = {"forward": False, "project": False}

    def forward() -> None:
        consumer = Consumer(
            {
                **settings.consumer_config(),
                "group.id": f"{settings.app_id}-raw-forward",
                "auto.offset.reset": "earliest",
                "enable.auto.offset.store": False,
            }
        )
        producer = Producer(settings.producer_config())

        def stored(message: Any) -> Callable[[Any, Any], None]:
            def report(error: Any, _: Any) -> None:
                if error is not None:
                    raise SystemExit(f"event not delivered: {error}")
                consumer.store_offsets(message)

            return report

        consumer.subscribe([commands])
        while not stopping.is_set():
            batch = take(consumer, 500, 0.05)
            assigned["forward"] = assigned["forward"] or bool(consumer.assignment())
            for message in batch:
                if message.error():
                    continue
                producer.produce(
                    events,
                    message.value(),
                    message.key(),
                    partition=message.partition() or 0,
                    headers=[("src-offset", str(message.offset()).encode())],
                    on_delivery=stored(message),
                )
            producer.poll(0)
        producer.flush(10)
        consumer.close()

    def project() -> None:
        conn = psycopg.connect(settings.database_url, autocommit=False)
        consumer = Consumer(
            {
                **settings.consumer_config(),
                "group.id": f"{settings.app_id}-raw-project",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 50,
            }
        )
        consumer.subscribe([events])
        while not stopping.is_set():
            batch = take(consumer, 1000, 0.05)
            assigned["project"] = assigned["project"] or bool(consumer.assignment())
            rows = []
            positions: dict[int, int] = {}
            for message in batch:
                if message.error():
                    continue
                source = dict(topics.headers_of(message))["src-offset"]
                assert source is not None  # forward() sets it on every event
                partition = message.partition() or 0
                rows.append(
                    (
                        partition,
                        message.offset(),
                        (message.key() or b"").decode(),
                        message.value(),
                    )
                )
                positions[partition] = max(positions.get(partition, 0), int(source) + 1)
            if not rows:
                continue
            with conn.cursor() as cur:
                cur.executemany(
                    'INSERT INTO bench_raw_events (partition, "offset", aggregate_id,'
                    " body) VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    rows,
                )
                cur.executemany(
                    "INSERT INTO bench_raw_positions (partition, next_offset)"
                    " VALUES (%s, %s) ON CONFLICT (partition) DO UPDATE SET"
                    " next_offset = EXCLUDED.next_offset",
                    list(positions.items()),
                )
            conn.commit()
            consumer.commit(asynchronous=False)
        consumer.close()
        conn.close()

    threads = [threading.Thread(target=forward), threading.Thread(target=project)]
    for thread in threads:
        thread.start()
    while not stopping.is_set():
        if all(assigned.values()) and not ready_file.exists():
            ready_file.write_text("ready")
        if not all(t.is_alive() for t in threads):
            stopping.set()
        time.sleep(0.05)
    for thread in threads:
        thread.join(15)


# -- one measurement ---------------------------------------------------------------------


System = StreamfoldSystem | RawSystem


def _messages(
    encode: CommandEncoder, topic: str, lifecycles: list[list[Any]]
) -> list[FramedRecord]:
    return [encode(command, topic) for lifecycle in lifecycles for command in lifecycle]


def measure(
    system: System,
    settings: Settings,
    sizes: Sizes,
    seed: int,
    broker_pid: int,
    codec: Codec,
) -> dict[str, Any]:
    phases: dict[str, float] = {}
    clock = time.monotonic()

    def phase(name: str) -> None:
        nonlocal clock
        now = time.monotonic()
        phases[name] = round(now - clock, 2)
        clock = now

    encode = CommandEncoder(settings, codec, seed)
    warm = order_lifecycles(seed, sizes.warmup_orders)
    backlog = order_lifecycles(seed, sizes.orders, first=sizes.warmup_orders)
    warm_messages = _messages(encode, system.topic, warm)
    backlog_messages = _messages(encode, system.topic, backlog)
    producer = new_producer(settings)
    phase("encode")
    pid = system.start()
    phase("start")
    try:
        system.wait(produce(producer, system.topic, warm_messages), 180)
        phase("warm_up")

        assert system.watcher is not None
        sampler = CpuSampler(
            {
                "process": process_tree(pid),
                "broker": lambda: [broker_pid],
                "postgres": postgres_backends(
                    _database(settings), exclude=[system.watcher.backend_pid]
                ),
                "postgres_background": postgres_background,
                "driver": lambda: [os.getpid()],
            }
        )
        sampler.start()
        started = time.monotonic()
        sent = produce(producer, system.topic, backlog_messages)
        system.wait(sent, 900)
        # Until the worker is idle: its Faust views fold the backlog's events after
        # the last read model is visible in Postgres (seconds of it, on one core).
        cpu = sampler.stop_when_quiet("process")
        phase("backlog")
        done = max(_times(system.visible_at, sent))
        commands = len(backlog_messages)
        throughput = commands / (done - started)
        durable_done = max(
            _times(lambda _, c: system.durable_at(c), sent), default=None
        )

        if isinstance(system, StreamfoldSystem):
            phases["settle_backlog"] = system.settle(300)
            clock = time.monotonic()
        rate = sizes.latency_rate or max(20.0, throughput / 2)
        paced_orders = max(1, math.ceil(rate * sizes.latency_seconds / 4))
        first = sizes.warmup_orders + sizes.orders
        paced_messages = _messages(
            encode, system.topic, order_lifecycles(seed, paced_orders, first=first)
        )
        paced = produce(producer, system.topic, paced_messages, rate=rate)
        last_sent = time.monotonic()
        system.wait(paced, 300)
        phase("paced")
        latencies = _since(system.visible_at, paced)
        durable = _since(lambda _, c: system.durable_at(c), paced)
        shown = _times(system.visible_at, paced)
        drain = max(shown) - last_sent
        paced_span = max(shown) - min(paced.at.values())
        peaks = [peak_memory_mib(p) for p in process_tree(pid)()]
        memory = round(sum(p for p in peaks if p is not None), 1) or None
        sequential = None
        if isinstance(system, StreamfoldSystem):
            phases["settle_wait"] = system.settle(300)
            clock = time.monotonic()
            first += paced_orders
            n = sizes.sequential_orders
            sequential = _sequential(
                system,
                encode,
                producer,
                order_lifecycles(seed, n, first=first),
                order_lifecycles(seed, n, first=first + n),
            )
            phase("sequential")
        return {
            "system": system.name,
            "commands": commands,
            "seconds": round(done - started, 3),
            "commands_per_s": round(throughput, 1),
            "durable_commands_per_s": (
                round(commands / (durable_done - started), 1) if durable_done else None
            ),
            "rejected": system.rejected(sent) + system.rejected(paced),
            "latency": {
                "rate_per_s": round(rate, 1),
                "fixed_rate": bool(sizes.latency_rate),
                "seconds": sizes.latency_seconds,
                **_latencies(latencies),
                # Rising from the first quarter of the sends to the last: a queue.
                "p50_ms_by_quarter": [
                    _round(percentile(q, 0.50)) for q in _quarters(latencies)
                ],
                "max_ms": _round(max(latencies, default=None)),
                "durable": _latencies(durable) if durable else None,
                # The rate read models actually became visible at while paced: well
                # below the offered rate means the latencies grew with a queue.
                "visible_rate_per_s": round(len(paced.at) / paced_span, 1),
                "drain_seconds": round(drain, 3),
            },
            "cpu_seconds": cpu,
            "window_seconds": round(sampler.seconds, 3),
            "peak_memory_mib": memory,
            "position_polls": system.watcher.polls,
            "sequential": sequential,
            "phase_seconds": phases,
        }
    finally:
        system.stop()


def _times(at: Callable[[Sent, str], float | None], sent: Sent) -> list[float]:
    return [t for c in sent.at if (t := at(sent, c)) is not None]


def _since(at: Callable[[Sent, str], float | None], sent: Sent) -> list[float]:
    """Milliseconds from each send to ``at``, for the messages that have one."""
    return [
        (t - began) * 1000
        for c, began in sent.at.items()
        if (t := at(sent, c)) is not None
    ]


def _sequential(
    system: StreamfoldSystem,
    encode: CommandEncoder,
    producer: Producer,
    orders: list[list[Any]],
    client_orders: list[list[Any]],
) -> dict[str, Any]:
    """One command at a time, each waiting for its result (the write side, durable
    in Kafka): first produced directly and its result read by the listener, then
    through ``CommandClient.send`` as an application would."""
    assert system.listener is not None
    direct = []
    rejected = 0
    for lifecycle in orders:
        for command in lifecycle:
            message = encode(command, system.topic)
            began = time.monotonic()
            producer.produce(
                system.topic, message.value, message.key, headers=message.headers
            )
            producer.flush(30)
            result = system.listener.wait_for(message.command_id, 60)
            direct.append((result.at - began) * 1000)
            rejected += not result.accepted
    client = []
    with CommandClient(system.settings) as sender:
        for lifecycle in client_orders:
            for command in lifecycle:
                began = time.monotonic()
                rejected += not sender.send(command, timeout=60).accepted
                client.append((time.monotonic() - began) * 1000)
    return {
        "rejected": rejected,
        # Every value, in order: a stall shows as one long wait among short ones.
        "direct": {**_latencies(direct), "values_ms": [round(v, 1) for v in direct]},
        "client": _latencies(client),
    }


def _latencies(values: list[float]) -> dict[str, Any]:
    return {
        "commands": len(values),
        "p50_ms": _round(percentile(values, 0.50)),
        "p99_ms": _round(percentile(values, 0.99)),
        "mean_ms": _round(sum(values) / len(values) if values else None),
    }


def _quarters(values: list[float]) -> list[list[float]]:
    size = max(1, math.ceil(len(values) / 4))
    return [values[i : i + size] for i in range(0, len(values), size)]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _database(settings: Settings) -> str:
    return settings.database_url.rpartition("/")[2]


def run(base: Settings, sizes: Sizes, seed: int, deployment: Any) -> dict[str, Any]:
    """Both systems, each in a deployment of its own."""
    broker_pid = stack.kafka_node(base).daemon.pid()
    if broker_pid is None:
        raise ServiceError("the local broker is not running")
    rows = {}
    # One deployment: the raw pipeline has topics and tables of its own and is
    # stopped before the worker starts.
    with deployment(base, "e2e") as settings:
        codec = new_codec(settings)
        rows["raw"] = measure(
            RawSystem(settings), settings, sizes, seed, broker_pid, codec
        )
        rows["streamfold"] = measure(
            StreamfoldSystem(settings, codec), settings, sizes, seed, broker_pid, codec
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw-pipeline", type=Path, required=True)
    args = parser.parse_args(argv)
    raw_pipeline(Settings.from_env(), args.raw_pipeline)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def figures(rows: dict[str, Any]) -> list[dict[str, Any]]:
    ours, raw = rows["streamfold"], rows["raw"]

    def load(row: dict[str, Any]) -> str:
        latency = row["latency"]
        return (
            f"{latency['rate_per_s']:.0f}/s offered, "
            f"{latency['visible_rate_per_s']:.0f}/s shown"
        )

    def fixed(row: dict[str, Any]) -> bool:
        return bool(row["latency"].get("fixed_rate"))

    def at(row: dict[str, Any]) -> str:
        return "a fixed rate" if fixed(row) else "half max load"

    return [
        figure(
            "e2e.throughput",
            "End to end, command → read model visible: sustained",
            "commands/s",
            ours["commands_per_s"],
            raw["commands_per_s"],
            "raw consume→produce→INSERT pipeline",
            better="higher",
            digits=1,
        ),
        *tail_figures(
            "e2e.{p}",
            f"End to end {{p}} at {at(ours)} ({load(ours)}; raw {load(raw)})",
            ours["latency"],
            raw["latency"],
            f"raw pipeline at {'the same rate' if fixed(raw) else 'half its max load'}",
            digits=1,
        ),
        figure(
            "e2e.client_send_p50",
            "Command client send() → result, one at a time: p50",
            "ms",
            (ours["sequential"] or {}).get("client", {}).get("p50_ms"),
            (ours["sequential"] or {}).get("direct", {}).get("p50_ms"),
            "the same worker, produce + result consumer",
            better="lower",
            digits=1,
        ),
    ]
