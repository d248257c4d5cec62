"""Write-side benchmark: sustained commands/s with events durable, through the worker,
beside two baselines on topics with the same settings: a raw confluent-kafka
consume→produce loop and an exactly-once Quix Streams application
(``bench.quix_peer``).

    .venv/bin/python -m bench.commands [--quick] [--partitions 1 4]

Per partition count, in one run against the local stack (``app.local.stack.up``) on
an isolated topic prefix:

- throughput: a backlog of deposits and withdrawals on many accounts is produced at
  once; commands/s = commands / (first produce → last result);
- latency: after a 5 s pause, the same mix at half the measured throughput;
  p50/p99 produce → result;
- CPU seconds of the worker (or the raw loop) and of the broker over the backlog.

The raw loop reads the commands-like topic, produces each command's bytes to an
events-like topic (acks=all, idempotent), and once the broker acknowledges that,
a result to a results-like topic; it stores the consumer offset after the result is
acknowledged. It decodes nothing and decides nothing: the ceiling for Python and
this broker on this machine. The Quix peer does the worker's work per command as an
exactly-once Quix Streams application: Avro command in, the account's state in its
RocksDB state (with a changelog), the accounts decider, Avro events and result out,
an answer kept per command id: a peer library's cost for what the worker does.
Results go to bench/results/commands.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from app.adapters import mapper, topics
from app.adapters.catalog import SchemaCatalog
from app.adapters.codec import COMMAND_ID_HEADER, Codec, ConfluentRegistry, headers
from app.domain.accounts import OpenAccount
from app.local import stack
from app.local.deployments import delete_local_state, delete_topics, free_port
from app.local.process import Daemon, wait_for
from app.local.worker import WorkerProcess
from app.projections.replay import group_members
from app.settings import Settings
from app.workload import ledger_traffic
from app.writer import WRITER_NAME
from bench import quix_peer
from bench.common import ResultListener, baseline_topics, isolated, run_id
from bench.harness import (
    CpuSampler,
    FramedRecord,
    bench_envelope,
    machine,
    new_producer,
    percentile,
    process_tree,
    produce,
)

RESULTS = Path(__file__).resolve().parent / "results" / "commands.json"


@dataclass(frozen=True, slots=True)
class Size:
    accounts: int
    backlog: int
    latency_s: float


FULL = Size(accounts=2000, backlog=40_000, latency_s=15.0)
QUICK = Size(accounts=200, backlog=6_000, latency_s=4.0)


@dataclass
class Figures:
    system: str
    partitions: int
    commands: int
    seconds: float
    commands_per_s: float
    p50_ms: float
    p99_ms: float
    latency_rate: float
    latency_commands: int
    cpu_s: dict[str, float]
    cpu_ms_per_command: dict[str, float]
    accepted: int | None = None
    rejected: int | None = None


# -- workload ---------------------------------------------------------------------------


class Encoder:
    def __init__(self, settings: Settings) -> None:
        self.catalog = SchemaCatalog.load()
        self.codec = Codec(
            ConfluentRegistry(settings.schema_registry_url), self.catalog
        )
        self.topic = settings.topics.commands("accounts")

    def __call__(self, command: Any) -> FramedRecord:
        command_id = str(uuid.uuid4())
        envelope = bench_envelope(command_id)
        name = self.catalog.record_name(type(command))
        return FramedRecord(
            command_id=command_id,
            key=command.account_id.encode(),
            value=self.codec.encode(
                self.topic, name, mapper.command_record(command, envelope)
            ),
            headers=headers.for_command(
                command_type=type(command).__name__,
                command_id=command_id,
                correlation_id=command_id,
            ),
        )


def opening(encode: Encoder, accounts: list[str]) -> list[FramedRecord]:
    return [
        encode(OpenAccount(account_id=a, owner_id=f"owner-{a}", currency="USD"))
        for a in accounts
    ]


def traffic(
    encode: Encoder, accounts: list[str], count: int, seed: int
) -> list[FramedRecord]:
    """Mostly deposits; a quarter withdrawals, some of which overdraw (rejected)."""
    commands = ledger_traffic(
        random.Random(seed), accounts, count, deposits=0.75, most=400, tag=f"{seed}-"
    )
    return [encode(command) for command in commands]


# -- one system under test ----------------------------------------------------------------


def measure(
    system: str,
    settings: Settings,
    pids: dict[str, Callable[[], list[int]]],
    commands_topic: str,
    listener: ResultListener,
    encode: Encoder,
    size: Size,
    own: str,
    idle: float = 0.15,
) -> Figures:
    """``own`` names the group in ``pids`` that is the system's own processes, and
    ``idle`` the cores they use at most when the load is done (their timers and
    polls: about 0.06 for a worker, measured)."""
    producer = new_producer(settings)
    accounts = [f"acc-{n:05d}" for n in range(size.accounts)]
    opened = produce(producer, commands_topic, opening(encode, accounts)).at
    listener.wait_for(list(opened), timeout=120, what=f"{system}: accounts opened")
    # Warm-up: caches, connections, batch sizes.
    warm = produce(
        producer, commands_topic, traffic(encode, accounts, size.backlog // 10, 1)
    ).at
    listener.wait_for(list(warm), timeout=300, what=f"{system}: warm-up commands")

    backlog = traffic(encode, accounts, size.backlog, 2)
    meter = CpuSampler(pids)
    meter.start()
    started = time.monotonic()
    produce(producer, commands_topic, backlog)
    finished = listener.wait_for(
        [c.command_id for c in backlog], timeout=900, what=f"{system}: backlog commands"
    )
    # What the system's own processes do for the backlog after its last answer (the
    # worker's views catching up) is part of its cost.
    cpu = meter.stop_when_quiet(own, below=idle, timeout=120)
    seconds = finished - started
    rate = len(backlog) / seconds

    # The system is quiet now, so the latency phase measures half load, not the tail
    # of the backlog.
    paced_rate = max(50.0, rate / 2)
    paced = traffic(encode, accounts, int(paced_rate * size.latency_s), 3)
    sent = produce(producer, commands_topic, paced, rate=paced_rate).at
    listener.wait_for(list(sent), timeout=300, what=f"{system}: paced commands")
    latencies = [
        (listener.arrived[c] - t) * 1000
        for c, t in sent.items()
        if c in listener.arrived
    ]
    return Figures(
        system=system,
        partitions=settings.partitions,
        commands=len(backlog),
        seconds=round(seconds, 2),
        commands_per_s=round(rate),
        p50_ms=_ms(latencies, 0.50),
        p99_ms=_ms(latencies, 0.99),
        latency_rate=round(paced_rate),
        latency_commands=len(paced),
        cpu_s=cpu,
        cpu_ms_per_command={
            name: round(1000 * seconds_ / len(backlog), 3)
            for name, seconds_ in cpu.items()
        },
    )


def _named(pid: int, name: str) -> bool:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/comm").read_text().strip() == name
    return False


def _ms(latencies: list[float], q: float) -> float:
    value = percentile(latencies, q)
    if value is None:
        raise RuntimeError("no command was answered in the latency phase")
    return round(value, 1)


class Outcomes:
    """Reads the command id of a ``streamfold.CommandResult`` and keeps its status."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.status: dict[str, str] = {}
        self.versions: dict[str, int | None] = {}

    def __call__(self, value: bytes) -> str:
        data = self.codec.decode(value).data
        self.status[data["command_id"]] = data["status"]
        self.versions[data["command_id"]] = data.get("version")
        return str(data["command_id"])

    def count(self, figures: Figures) -> Figures:
        figures.accepted = sum(1 for s in self.status.values() if s == "ACCEPTED")
        figures.rejected = sum(1 for s in self.status.values() if s == "REJECTED")
        return figures


def bench_worker(
    settings: Settings, broker_pid: int, size: Size, workers: int = 1
) -> Figures:
    """``workers`` workers of one application: they share the partitions."""
    encode = Encoder(settings)
    outcomes = Outcomes(encode.codec)

    deployed = [
        dataclasses.replace(settings, web_port=free_port()) if n else settings
        for n in range(workers)
    ]
    processes = [WorkerProcess(s, f"bench-worker-{n}") for n, s in enumerate(deployed)]
    for worker in processes:
        worker.start(timeout=180)
    # Every worker in the group before the clock starts.
    wait_for(
        lambda: group_members(settings, settings.app_id) >= workers,
        120,
        f"{workers} workers in the consumer group",
    )
    listener = ResultListener(settings, settings.topics.results, outcomes)
    try:
        trees = [process_tree(pid_of(w)) for w in processes]
        figures = measure(
            "worker" if workers == 1 else f"{workers} workers",
            settings,
            {
                "worker": lambda: [pid for tree in trees for pid in tree()],
                "broker": process_tree(broker_pid),
                # The worker's share, split: the transactional write processes,
                # and the rest (Faust's view agents and tables, the web server).
                "of which write processes": lambda: [
                    pid for tree in trees for pid in tree() if _named(pid, WRITER_NAME)
                ],
                "of which the rest": lambda: [
                    pid
                    for tree in trees
                    for pid in tree()
                    if not _named(pid, WRITER_NAME)
                ],
            },
            settings.topics.commands("accounts"),
            listener,
            encode,
            size,
            own="worker",
            idle=0.15 * workers,
        )
    finally:
        listener.close()
        for worker in processes:
            worker.stop()
        for each in deployed:
            delete_local_state(each)
    return outcomes.count(figures)


def pid_of(worker: Daemon) -> int:
    """``worker``'s process id; it must be running."""
    pid = worker.pid()
    if pid is None:
        raise RuntimeError(f"{worker.name} has no pid")
    return pid


# -- the raw loop -----------------------------------------------------------------------


def provision_like(settings: Settings, names: dict[str, str]) -> None:
    """A baseline's topics, with the settings of the ones they stand for."""
    standing_for = {
        settings.topics.commands("accounts"): names["commands"],
        settings.topics.events("accounts"): names["events"],
        settings.topics.results: names["results"],
    }
    specs = [
        topics.TopicSpec(standing_for[spec.name], spec.partitions, dict(spec.config))
        for spec in topics.required_topics(settings)
        if spec.name in standing_for
    ]
    topics.ensure_topics(settings, specs)
    # A result listener that assigned offsets on topics created a moment earlier
    # fetched nothing on a fresh broker (every result "missing"); a pause avoids it.
    time.sleep(3)


def raw_loop(settings: Settings, ready_file: Path) -> None:
    """Consume → produce the event → once acknowledged, produce the result."""
    from confluent_kafka import Consumer, Producer

    names = baseline_topics(settings, "raw")
    consumer = Consumer(
        {
            **settings.consumer_config(),
            "group.id": settings.app_id,
            "auto.offset.reset": "earliest",
            "enable.auto.offset.store": False,
            "fetch.wait.max.ms": 5,
        }
    )
    producer = Producer({**settings.producer_config(), "linger.ms": 2})
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))

    def on_result(message: Any, error: Any, _: Any) -> None:
        if error is not None:
            raise SystemExit(f"result not delivered: {error}")
        consumer.store_offsets(message)

    def on_event(message: Any, command_id: bytes | None, error: Any, _: Any) -> None:
        if error is not None:
            raise SystemExit(f"event not delivered: {error}")
        producer.produce(
            names["results"],
            command_id,
            command_id,
            on_delivery=partial(on_result, message),
        )

    consumer.subscribe([names["commands"]])
    while not stopping:
        batch = topics.take(consumer, 500, 0.05)
        if consumer.assignment() and not ready_file.exists():
            ready_file.write_text("ready")
        for message in batch:
            if message.error():
                continue
            command_id = dict(topics.headers_of(message))[COMMAND_ID_HEADER]
            producer.produce(
                names["events"],
                message.value(),
                message.key(),
                partition=message.partition() or 0,
                on_delivery=partial(on_event, message, command_id),
            )
        producer.poll(0)
    producer.flush(10)
    consumer.close()


@dataclass(frozen=True, slots=True)
class Baseline:
    system: str
    kind: str  # names its topics (``baseline_topics``)
    argv: Callable[[Path], list[str]]
    # Its results are Avro ``streamfold.CommandResult``s (else the command id).
    avro_results: bool = False


RAW = Baseline(
    "raw loop", "raw", lambda ready: ["bench.commands", "--raw-loop", str(ready)]
)
QUIX = Baseline(
    "quix peer",
    quix_peer.KIND,
    lambda ready: ["bench.quix_peer", str(ready)],
    avro_results=True,
)


def bench_baseline(
    baseline: Baseline, settings: Settings, broker_pid: int, size: Size
) -> Figures:
    names = baseline_topics(settings, baseline.kind)
    provision_like(settings, names)
    # An application id (consumer group, table changelogs) of its own.
    settings = dataclasses.replace(
        settings, app_id=f"{settings.app_id}-{baseline.system.replace(' ', '-')}"
    )
    ready = settings.home / "bench" / f"{settings.app_id}.ready"
    ready.parent.mkdir(parents=True, exist_ok=True)
    ready.unlink(missing_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-m", *baseline.argv(ready)],
        env={**os.environ, **settings.as_env()},
    )
    encode = Encoder(settings)
    outcomes = Outcomes(encode.codec) if baseline.avro_results else None
    listener = ResultListener(settings, names["results"], outcomes or bytes.decode)
    try:
        wait_for(
            lambda: ready.exists() or process.poll() is not None,
            120,
            f"the {baseline.system}'s partition assignment",
        )
        if process.poll() is not None:
            raise RuntimeError(f"the {baseline.system} exited ({process.returncode})")
        figures = measure(
            baseline.system,
            settings,
            {
                baseline.system: process_tree(process.pid),
                "broker": process_tree(broker_pid),
            },
            names["commands"],
            listener,
            encode,
            size,
            own=baseline.system,
        )
    finally:
        listener.close()
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)
        ready.unlink(missing_ok=True)
        delete_local_state(settings)
    return outcomes.count(figures) if outcomes is not None else figures


# -- report -----------------------------------------------------------------------------


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'system':<10} {'parts':>5} {'cmd/s':>7} {'×raw':>5} {'×quix':>6} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'@rate':>6} {'proc ms/cmd':>11} "
        f"{'broker ms/cmd':>13}"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        own = next(k for k in row["cpu_ms_per_command"] if k != "broker")
        lines.append(
            f"{row['system']:<10} {row['partitions']:>5} {row['commands_per_s']:>7} "
            f"{row['ratio_to_raw']['commands_per_s']:>5.2f} "
            f"{row['ratio_to_quix_peer']['commands_per_s']:>6.2f} {row['p50_ms']:>7} "
            f"{row['p99_ms']:>7} {row['latency_rate']:>6} "
            f"{row['cpu_ms_per_command'][own]:>11} "
            f"{row['cpu_ms_per_command']['broker']:>13}"
        )
    return "\n".join(lines)


def ratios(figures: Figures, raw: Figures) -> dict[str, float]:
    def ratio(a: float, b: float) -> float:
        return round(a / b, 3) if b else float("nan")

    own = next(k for k in figures.cpu_ms_per_command if k != "broker")
    raw_own = next(k for k in raw.cpu_ms_per_command if k != "broker")
    return {
        "commands_per_s": ratio(figures.commands_per_s, raw.commands_per_s),
        "p50_ms": ratio(figures.p50_ms, raw.p50_ms),
        "p99_ms": ratio(figures.p99_ms, raw.p99_ms),
        "process_cpu_per_command": ratio(
            figures.cpu_ms_per_command[own], raw.cpu_ms_per_command[raw_own]
        ),
        "broker_cpu_per_command": ratio(
            figures.cpu_ms_per_command["broker"], raw.cpu_ms_per_command["broker"]
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run (≤ 60 s)")
    parser.add_argument("--partitions", type=int, nargs="+", default=[1, 4])
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="also measure this many workers sharing the partitions, at the "
        "largest partition count (1: only one worker)",
    )
    parser.add_argument("--raw-loop", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.raw_loop:
        raw_loop(Settings.from_env(), args.raw_loop)
        return 0

    began = time.monotonic()
    size = QUICK if args.quick else FULL
    base = Settings.from_env()
    run = run_id()
    rows: list[dict[str, Any]] = []
    # Up with the shared settings: a registry started here serves every deployment
    # (subjects carry the topic prefix) from the shared schemas topic, which the
    # clean-up of an isolated deployment's topics leaves alone.
    stack.up(base, say=lambda line: None)
    for partitions in args.partitions:
        settings = isolated(base, partitions, run)
        broker_pid = stack.kafka_node(settings).daemon.pid()
        if broker_pid is None:
            raise SystemExit("the local broker is not running (app.local.stack.up)")
        try:
            raw = bench_baseline(RAW, settings, broker_pid, size)
            quix = bench_baseline(QUIX, settings, broker_pid, size)
            measured = [raw, quix, bench_worker(settings, broker_pid, size)]
            if 1 < args.workers <= partitions == max(args.partitions):
                # A fresh deployment: the same backlog, from the same state.
                delete_topics(settings)
                settings = isolated(base, partitions, f"{run}w")
                measured.append(bench_worker(settings, broker_pid, size, args.workers))
        finally:
            delete_topics(settings)
        for figures in measured:
            rows.append(
                {
                    **asdict(figures),
                    "ratio_to_raw": ratios(figures, raw),
                    "ratio_to_quix_peer": ratios(figures, quix),
                }
            )
        print(f"... {partitions} partition(s) done", file=sys.stderr)
    report = {
        "benchmark": "bench.commands",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": machine(base),
        "size": asdict(size),
        "notes": (
            "Local single-broker Kafka on the same machine as worker and driver; "
            "worker without Postgres projections (STREAMFOLD_PROJECTIONS=none), "
            "Faust-table views still running."
        ),
        "rows": rows,
        "seconds": round(time.monotonic() - began, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows))
    print(
        f"{report['machine']['cores']} cores ({report['machine']['cpu']}); "
        f"{report['seconds']}s; written to {args.output}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
