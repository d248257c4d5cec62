"""Recovery benchmarks of the write side: a worker killed in a burst, and the store's
memory with many aggregates.

    .venv/bin/python -m bench.recovery [--quick] [--burst 10000] [--aggregates 1000000]

- burst: ``--burst`` commands (deposits and withdrawals on ``accounts`` accounts)
  produced at once to a worker; the seconds until every one is answered, first
  without a fault, then (on a fresh deployment, same workload) with the worker
  SIGKILLed once half are answered and started again at once, as a supervisor
  would. The figure is the ratio of the two (the target is at most 2.0). Each run
  also counts the answers a read_committed reader sees: exactly one per command.
- memory: ``--aggregates`` accounts opened by an outside producer appending
  ``AccountOpened`` events straight to the events topic (no worker running), then a
  worker started on them; one deposit per partition makes the write side fold its
  partitions from the log into its store. Figures: the seconds until those are
  answered (a store rebuilt from the log), the peak and current resident memory of
  each process of the worker (the write process holds the store), the store's size
  on disk; then a deposit on each of 1,000 random accounts, each answered with the
  account's version 2 (the state was found).

Results go to bench/results/recovery.json.
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.adapters import topics
from app.adapters.eventlog import partition_for
from app.audit import read_topic
from app.domain import accounts as accounts_domain
from app.domain.accounts import OpenAccount
from app.local import stack
from app.local.deployments import delete_local_state, delete_topics, local_state
from app.local.worker import WorkerProcess
from app.settings import Settings
from app.workload import deposit
from bench.commands import Encoder, Outcomes, opening, pid_of, traffic
from bench.common import ResultListener, isolated, run_id
from bench.harness import (
    domain_events,
    encode_events,
    load_average,
    machine,
    memory_mib,
    new_codec,
    new_producer,
    peak_memory_mib,
    process_tree,
    produce,
)

RESULTS = Path(__file__).resolve().parent / "results" / "recovery.json"
PARTITIONS = 4
ACCOUNTS = 500
# How many outside events are encoded and produced at a time (bounds the driver's
# memory with a million aggregates).
CHUNK = 50_000


@dataclass
class Burst:
    commands: int
    killed: bool
    seconds: float
    kill_after_s: float | None
    # The restarted worker's web server answered; its first new result arrived.
    ready_after_s: float | None
    answering_after_s: float | None
    answers_read: int
    command_ids_answered: int
    duplicate_answers: int


def burst(base: Settings, run: str, size: int, *, kill: bool) -> Burst:
    settings = isolated(base, PARTITIONS, f"{run}{'k' if kill else 'n'}")
    encode = Encoder(settings)
    outcomes = Outcomes(encode.codec)
    worker = WorkerProcess(settings, "bench-recovery")
    worker.start(timeout=180)
    listener = ResultListener(settings, settings.topics.results, outcomes)
    producer = new_producer(settings)
    topic = settings.topics.commands("accounts")
    names = [f"acc-{n:05d}" for n in range(ACCOUNTS)]
    killed_at = ready_at = resumed_at = None
    try:
        opened = produce(producer, topic, opening(encode, names)).at
        listener.wait_for(list(opened), timeout=300)
        backlog = traffic(encode, names, size, seed=7)
        ids = [c.command_id for c in backlog]
        started = time.monotonic()
        produce(producer, topic, backlog)
        if kill:
            while sum(1 for c in ids if c in listener.arrived) < size // 2:
                time.sleep(0.01)
            worker.stop(kill=True)
            killed_at = time.monotonic() - started
            answered = len(listener.arrived)
            # The restarted worker answers commands before its web server is up
            # (its write processes start first): both are timed.
            ready: list[float] = []

            def restart() -> None:
                worker.start(timeout=180)
                ready.append(time.monotonic() - started)

            restarting = threading.Thread(target=restart, daemon=True)
            restarting.start()
            while len(listener.arrived) == answered:
                time.sleep(0.01)
            resumed_at = time.monotonic() - started
            restarting.join(180)
            ready_at = ready[0] if ready else None
        finished = listener.wait_for(ids, timeout=900)
        seconds = finished - started
    finally:
        listener.close()
        worker.stop()
    answers = _answers(settings, set(ids))
    _remove(settings)
    return Burst(
        commands=size,
        killed=kill,
        seconds=round(seconds, 2),
        kill_after_s=_round(killed_at),
        ready_after_s=_round(ready_at),
        answering_after_s=_round(resumed_at),
        answers_read=sum(answers.values()),
        command_ids_answered=len(answers),
        duplicate_answers=sum(n - 1 for n in answers.values() if n > 1),
    )


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 2)


def _answers(settings: Settings, wanted: set[str]) -> dict[str, int]:
    """How many results each of ``wanted`` has, as a read_committed reader of the
    whole results topic sees them."""
    counts: dict[str, int] = {}
    for record in read_topic(settings, settings.topics.results):
        key = (record.key or b"").decode()
        if key in wanted:
            counts[key] = counts.get(key, 0) + 1
    return counts


@dataclass
class Memory:
    aggregates: int
    events_produced_s: float
    rebuild_s: float
    rebuild_events_per_s: float
    warm_commands: int
    warm_s: float
    rss_peak_mib: dict[str, float]
    rss_now_mib: dict[str, float]
    store_mib: float
    load_average: list[float]


def memory(base: Settings, run: str, aggregates: int) -> Memory:
    settings = isolated(base, PARTITIONS, f"{run}m")
    topics.ensure_topics(settings)
    codec = new_codec(settings)
    events_topic = settings.topics.events("accounts")
    producer = new_producer(settings)
    names = [f"m-{n:07d}" for n in range(aggregates)]
    began = time.monotonic()
    for first in range(0, aggregates, CHUNK):
        opened = domain_events(
            accounts_domain,
            accounts_domain.AGGREGATE_TYPE,
            (
                OpenAccount(account_id=a, owner_id="bench", currency="USD")
                for a in names[first : first + CHUNK]
            ),
            start=datetime.now(UTC),
        )
        produce(producer, events_topic, encode_events(codec, events_topic, opened))
    produced_s = time.monotonic() - began

    encode = Encoder(settings)
    outcomes = Outcomes(encode.codec)
    worker = WorkerProcess(settings, "bench-memory")
    worker.start(timeout=300)
    listener = ResultListener(settings, settings.topics.results, outcomes)
    commands_topic = settings.topics.commands("accounts")
    try:
        # One account per partition: each partition's first command folds its log.
        firsts: dict[int, str] = {}
        for name in names:
            firsts.setdefault(partition_for(name.encode(), PARTITIONS), name)
            if len(firsts) == PARTITIONS:
                break
        started = time.monotonic()
        sent = produce(
            producer, commands_topic, [_deposit(encode, a) for a in firsts.values()]
        )
        rebuilt = listener.wait_for(list(sent.at), timeout=1800) - started
        rng = random.Random(11)
        sample = rng.sample(names, min(1000, aggregates))
        started = time.monotonic()
        warm = produce(producer, commands_topic, [_deposit(encode, a) for a in sample])
        warm_s = listener.wait_for(list(warm.at), timeout=600) - started
        versions = {outcomes.versions.get(c) for c in [*sent.at, *warm.at]}
        if versions != {2}:
            raise AssertionError(
                f"deposits on opened accounts answered with versions {versions}, not 2"
            )
        tree = process_tree(pid_of(worker))()
        peak = {_name(pid): peak_memory_mib(pid) or 0.0 for pid in tree}
        now = {_name(pid): memory_mib(pid) or 0.0 for pid in tree}
    finally:
        listener.close()
        worker.stop()
    store = sum(_size_mib(path) for path in local_state(settings))
    _remove(settings)
    return Memory(
        aggregates=aggregates,
        events_produced_s=round(produced_s, 1),
        rebuild_s=round(rebuilt, 1),
        rebuild_events_per_s=round(aggregates / rebuilt),
        warm_commands=len(sample),
        warm_s=round(warm_s, 2),
        rss_peak_mib=peak,
        rss_now_mib=now,
        store_mib=store,
        load_average=load_average(),
    )


def _deposit(encode: Encoder, account: str) -> Any:
    return encode(deposit(account, 100, f"warm-{account}", source="bench"))


def _name(pid: int) -> str:
    try:
        return f"{Path(f'/proc/{pid}/comm').read_text().strip()} ({pid})"
    except OSError:
        return str(pid)


def _remove(settings: Settings) -> None:
    delete_topics(settings)
    delete_local_state(settings)


def _size_mib(path: Path) -> float:
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return round(total / 2**20, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run")
    parser.add_argument("--burst", type=int, default=10_000)
    parser.add_argument("--aggregates", type=int, default=1_000_000)
    parser.add_argument(
        "--skip", choices=["burst", "memory"], action="append", default=[]
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    size = 2_000 if args.quick else args.burst
    aggregates = 20_000 if args.quick else args.aggregates
    base = Settings.from_env()
    stack.up(base, say=lambda line: None)
    run = run_id()
    report: dict[str, Any] = {
        "benchmark": "bench.recovery",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": machine(base),
    }
    if "burst" not in args.skip:
        plain = burst(base, run, size, kill=False)
        killed = burst(base, run, size, kill=True)
        report["burst"] = {
            "without_kill": asdict(plain),
            "with_kill": asdict(killed),
            "ratio": round(killed.seconds / plain.seconds, 2),
        }
        print(
            f"burst of {size}: {plain.seconds:.1f}s without a fault, "
            f"{killed.seconds:.1f}s with a worker SIGKILL at {killed.kill_after_s}s "
            f"(ready again at {killed.ready_after_s}s, answering at "
            f"{killed.answering_after_s}s) "
            f"({report['burst']['ratio']}x); duplicate answers "
            f"{plain.duplicate_answers} / {killed.duplicate_answers}"
        )
    if "memory" not in args.skip:
        measured = memory(base, run, aggregates)
        report["memory"] = asdict(measured)
        print(
            f"{aggregates} aggregates: rebuilt from the log in {measured.rebuild_s}s "
            f"({measured.rebuild_events_per_s} events/s); RSS peak "
            f"{measured.rss_peak_mib} MiB, now {measured.rss_now_mib} MiB; "
            f"store {measured.store_mib} MiB on disk"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
