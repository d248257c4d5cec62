"""Fan-out of the WebSocket push (``/ws``): commit → delivery latency to N subscribers,
each following an aggregate, beside a plain read_committed consumer of the same
events in the same run.

    .venv/bin/python -m bench.push [--subscribers 50] [--rounds 100] [--interval 0.05]
                                   [--batch N]

A transactional producer (in this process) appends one deposit per account per
round, ``--interval`` seconds apart, one transaction per round, straight to the
events topic of a deployment of its own with a worker running; the commit time is
taken when ``commit_transaction`` returns. Each subscriber (a ``websockets`` client
in this process) follows one account; the plain consumer (a thread of this process)
reads the topic from its end. Latency is arrival minus commit, on one clock. Both
readers share this process's cores with the producer (and the machine's with the
worker and the broker).

The worker's CPU (its process and any children, from /proc) is read over the
measured window, and again over a control window of as many events at the same
pace once every subscription is gone (the connections stay open): the worker then
reads, folds into its views and matches the same events but pushes none, so the
difference is what the fan-out itself costs. Results go to bench/results/push.json;
not part of bench.run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka import Consumer, Producer, TopicPartition
from websockets.asyncio.client import connect

from app.adapters.topics import stable_ends
from app.domain import accounts
from app.domain.accounts import OpenAccount
from app.local.process import http_ok, wait_for
from app.local.worker import WorkerProcess
from app.settings import Settings
from app.waiting import eventually
from app.workload import deposit
from bench.harness import (
    CpuSampler,
    FramedRecord,
    deployment,
    domain_events,
    encode_events,
    load_average,
    machine,
    new_codec,
    percentile,
    process_tree,
)

# Kept in each CPU window once its events are delivered.
SETTLE_S = 2.0
RESULTS = Path(__file__).resolve().parent / "results" / "push.json"


def events(
    settings: Settings, count: int, rounds: int, per_batch: int
) -> tuple[list[list[FramedRecord]], list[list[FramedRecord]]]:
    """The measured events: round 0 opens the accounts, each later round is one
    deposit on each; then the control's, as many deposits again. Each in
    transactions of ``per_batch`` events."""
    names = [f"acc-push-{n}" for n in range(count)]
    commands: list[Any] = [
        OpenAccount(account_id=a, owner_id="o", currency="USD") for a in names
    ]
    for r in range(2 * rounds + 1):
        commands += [deposit(a, 1, f"t{r}") for a in names]
    framed = encode_events(
        new_codec(settings),
        settings.topics.events("accounts"),
        domain_events(
            accounts, accounts.AGGREGATE_TYPE, commands, start=datetime.now(UTC)
        ),
    )
    measured = count * (rounds + 1)

    def batches(records: list[FramedRecord]) -> list[list[FramedRecord]]:
        return [records[n : n + per_batch] for n in range(0, len(records), per_batch)]

    return batches(framed[:measured]), batches(framed[measured:])


def append(
    settings: Settings, batches: list[list[FramedRecord]], interval: float
) -> dict[str, float]:
    """Each batch in a transaction of its own; when each event's commit returned."""
    topic = settings.topics.events("accounts")
    producer = Producer(
        {**settings.producer_config(), "transactional.id": f"push-bench-{uuid.uuid4()}"}
    )
    producer.init_transactions(30)
    committed: dict[str, float] = {}
    for batch in batches:
        started = time.monotonic()
        producer.begin_transaction()
        for record in batch:
            record.produce_keyed(producer, topic, settings.partitions)
        producer.commit_transaction(30)
        now = time.monotonic()
        # encode_events names each framed event by its event id.
        committed.update((record.command_id, now) for record in batch)
        time.sleep(max(0.0, interval - (now - started)))
    return committed


def plain_reader(
    settings: Settings, arrived: dict[str, float], stop: threading.Event
) -> threading.Thread:
    """A read_committed consumer from the topic's end, noting each event's arrival
    (by the ``event-id`` header)."""
    consumer = Consumer(
        {
            **settings.consumer_config(),
            "group.id": f"{settings.app_id}.push-bench",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 50,
        }
    )
    topic = settings.topics.events("accounts")
    starts = stable_ends(settings, [topic])
    consumer.assign([TopicPartition(t, p, o) for (t, p), o in starts.items()])

    def run() -> None:
        while not stop.is_set():
            # As the feed reads: wait for the first record, not for a full batch.
            first = consumer.poll(0.05)
            for message in [] if first is None else [first, *consumer.consume(499, 0)]:
                if message.error() is None:
                    now = time.monotonic()
                    found = dict(message.headers() or []).get("event-id")
                    if isinstance(found, bytes):
                        arrived[found.decode()] = now
        consumer.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def cpu(used: dict[str, float], seconds: float, events: int) -> dict[str, Any]:
    """The worker's CPU over a window: seconds, per event, and cores busy."""
    spent = used.get("worker", 0.0)
    return {
        "cpu_s": round(spent, 3),
        "window_s": round(seconds, 2),
        "events": events,
        "ms_per_event": round(1000 * spent / events, 3) if events else None,
        "cores_busy": round(spent / seconds, 3) if seconds else None,
    }


def push_status(settings: Settings) -> dict[str, Any]:
    """The worker's /status for the push."""
    answer = httpx.get(f"{settings.web_url}/status", timeout=10).raise_for_status()
    found: dict[str, Any] = answer.json()["push"]
    return found


def fed_to(settings: Settings, topic: str) -> int:
    """How far the worker's push feed has read ``topic``, over its partitions."""
    feed = push_status(settings)["feed"] or {}
    return sum(int(offset) for offset in feed.get(topic, {}).values())


def hub_cpu(settings: Settings) -> dict[str, float]:
    """The CPU seconds the worker counts for the fan-out itself: its feed's thread,
    and its loop handing the feed's batches out."""
    counted = push_status(settings).get("cpu_s", {})  # none before this was counted
    return {name: float(s) for name, s in counted.items()}


async def measure(
    settings: Settings,
    count: int,
    rounds: int,
    interval: float,
    per_batch: int,
    worker: Callable[[], list[int]],
) -> dict[str, Any]:
    batches, control = events(settings, count, rounds, per_batch)
    url = f"ws://{settings.web_host}:{settings.web_port}/ws"
    pushed: dict[str, float] = {}
    plain: dict[str, float] = {}
    stop = threading.Event()
    sockets = [await connect(url) for _ in range(count)]
    for n, socket in enumerate(sockets):
        await socket.send(
            json.dumps(
                {"type": "subscribe", "id": "s", "aggregate_id": f"acc-push-{n}"}
            )
        )
        assert json.loads(await socket.recv())["type"] == "ack"

    left: list[str] = []

    async def take(socket: Any) -> None:
        async for frame in socket:
            now = time.monotonic()
            message = json.loads(frame)
            if message["type"] == "event":
                pushed[message["metadata"]["event_id"]] = now
            elif message["type"] == "ack" and message["request"] == "unsubscribe":
                left.append(message["id"])

    readers = [asyncio.ensure_future(take(socket)) for socket in sockets]
    thread = plain_reader(settings, plain, stop)
    meter = CpuSampler({"worker": worker})
    hub_before = await asyncio.to_thread(hub_cpu, settings)
    meter.start()
    committed = await asyncio.to_thread(append, settings, batches, interval)
    # Until both readers have every event (or a minute passes: the figures then
    # say how many were delivered); then what the worker still does for them (its
    # views' last writes) counts here too, in both windows alike.
    await asyncio.to_thread(
        eventually,
        lambda: len(pushed) >= len(committed) and len(plain) >= len(committed),
        timeout=60,
    )
    await asyncio.sleep(SETTLE_S)
    fanout = cpu(meter.stop(), meter.seconds, len(committed))
    hub_after = await asyncio.to_thread(hub_cpu, settings)
    delivered = sum(1 for e in committed if e in pushed)
    fanout["deliveries"] = delivered
    fanout["ms_per_delivery"] = (
        round(1000 * fanout["cpu_s"] / delivered, 3) if delivered else None
    )
    hub = {name: hub_after[name] - hub_before.get(name, 0.0) for name in hub_after}

    # The control: the same pace of events with no subscription left.
    for socket in sockets:
        await socket.send(json.dumps({"type": "unsubscribe", "id": "s"}))
    await asyncio.to_thread(eventually, lambda: len(left) >= count, timeout=60)
    topic = settings.topics.events("accounts")
    before = await asyncio.to_thread(fed_to, settings, topic)
    expected = before + sum(len(batch) for batch in control)
    meter = CpuSampler({"worker": worker})
    meter.start()
    controlled = await asyncio.to_thread(append, settings, control, interval)
    await asyncio.to_thread(
        eventually, lambda: fed_to(settings, topic) >= expected, timeout=60, every=0.25
    )
    await asyncio.sleep(SETTLE_S)
    idle = cpu(meter.stop(), meter.seconds, len(controlled))
    stop.set()
    for reader in readers:
        reader.cancel()
    for socket in sockets:
        await socket.close()
    thread.join(5)

    def figures(arrived: dict[str, float]) -> dict[str, Any]:
        latencies = [
            (arrived[e] - t) * 1000 for e, t in committed.items() if e in arrived
        ]
        return {
            "delivered": len(latencies),
            "p50_ms": percentile(latencies, 0.5),
            "p99_ms": percentile(latencies, 0.99),
        }

    extra = fanout["cpu_s"] - idle["cpu_s"] * fanout["events"] / max(1, idle["events"])
    return {
        "events": len(committed),
        "push": figures(pushed),
        "plain": figures(plain),
        "worker_cpu": {
            "fanout": fanout,
            "control": idle,
            # What the fan-out adds: the measured window's CPU less the control's
            # for as many events.
            "fanout_ms_per_delivery": round(1000 * extra / delivered, 3)
            if delivered
            else None,
            # As the worker counts it over the measured window: its feed's thread
            # and its loop's dispatch (matching, messages, socket writes).
            "hub_cpu_s": {name: round(s, 3) for name, s in hub.items()},
            "hub_ms_per_delivery": round(1000 * sum(hub.values()) / delivered, 3)
            if delivered
            else None,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument(
        "--batch",
        type=int,
        default=0,
        help="events per transaction, one every --interval (default: a round, "
        "one per subscriber); e.g. 1000 subscribers at 500 events/s spread out: "
        "--batch 25 --interval 0.05",
    )
    args = parser.parse_args()
    per_batch = args.batch or args.subscribers
    # The broker, Postgres and the registry must be running (bin/streamfold up).
    base = Settings.from_env()
    with deployment(
        base,
        "push",
        projections=(),
        saga=False,
        ws_max_connections=max(args.subscribers, 100),
    ) as settings:
        worker = WorkerProcess(settings, "push-bench")
        worker.start(timeout=120)
        try:
            ready = f"{settings.web_url}/ready"
            wait_for(lambda: http_ok(ready), 120, "the worker's /ready")
            started = datetime.now(UTC)
            pid = worker.pid()
            if pid is None:
                raise RuntimeError("the worker has no pid")
            result = asyncio.run(
                measure(
                    settings,
                    args.subscribers,
                    args.rounds,
                    args.interval,
                    per_batch,
                    process_tree(pid),
                )
            )
        finally:
            worker.stop()
    push, plain = result["push"], result["plain"]
    result.update(
        started=started.isoformat(timespec="seconds"),
        subscribers=args.subscribers,
        rounds=args.rounds,
        interval_s=args.interval,
        events_per_transaction=per_batch,
        load_average=load_average(),
        machine=machine(base),
        p99_ratio=None
        if not (push["p99_ms"] and plain["p99_ms"])
        else round(push["p99_ms"] / plain["p99_ms"], 3),
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    used = result["worker_cpu"]
    fanout, idle = used["fanout"], used["control"]
    print(
        f"{result['events']} events to {args.subscribers} subscribers: push p50 "
        f"{push['p50_ms']:.1f} ms p99 {push['p99_ms']:.1f} ms ({push['delivered']} "
        f"delivered); plain read_committed consumer p50 {plain['p50_ms']:.1f} ms "
        f"p99 {plain['p99_ms']:.1f} ms ({plain['delivered']}); p99 ratio "
        f"{result['p99_ratio']}\n"
        f"worker CPU: {fanout['ms_per_event']} ms per event pushed "
        f"({fanout['ms_per_delivery']} ms per delivery, {fanout['cores_busy']} cores "
        f"busy); {idle['ms_per_event']} ms per event with nobody subscribed "
        f"({idle['cores_busy']} cores); the fan-out's own "
        f"{used['fanout_ms_per_delivery']} ms per delivery by the difference, "
        f"{used['hub_ms_per_delivery']} as the worker counts it (feed thread and "
        f"dispatch); load average "
        f"{' '.join(str(x) for x in result['load_average'])}"
    )


if __name__ == "__main__":
    main()
