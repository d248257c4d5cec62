"""Fan-out of the WebSocket push (``/ws``): commit → delivery latency to N subscribers,
each following an aggregate, beside a plain read_committed consumer of the same
events in the same run.

    .venv/bin/python -m bench.push [--subscribers 50] [--rounds 100] [--interval 0.05]
                                   [--batch N] [--client-processes 4]

A transactional producer (in this process) appends one deposit per account per
round, ``--interval`` seconds apart, one transaction per round, straight to the
events topic of a deployment of its own with a worker running; the commit time is
taken when ``commit_transaction`` returns. Each subscriber (a ``websockets`` client)
follows one account; the subscribers are spread over ``--client-processes``
processes, as clients on machines of their own would be (one loop taking every
message measures mostly its own queue). The plain consumer reads the topic from its
end in a process of its own. Latency is arrival minus commit, on one clock
(``time.monotonic``, the machine's CLOCK_MONOTONIC in every process). The readers
share the machine's cores with the producer, the worker and the broker.

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
import multiprocessing
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka import Consumer, Producer, TopicPartition
from websockets.asyncio.client import connect

from app.adapters.topics import stable_ends, take
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


class Readers:
    """Processes of the bench's readers, each asked over a pipe: ``count`` (how many
    events it has), ``unsubscribe`` (answered once every subscription is gone) and
    ``stop`` (answered with each event's arrival time, by event id)."""

    def __init__(self) -> None:
        self.context = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.processes: list[BaseProcess] = []

    def start(self, target: Callable[..., None], *args: Any) -> None:
        """``target(pipe, *args)`` in a process of its own; returns once it says
        it is ready (connected and subscribed, or assigned)."""
        mine, theirs = self.context.Pipe()
        process = self.context.Process(target=target, args=(theirs, *args), daemon=True)
        process.start()
        self.pipes.append(mine)
        self.processes.append(process)
        if not mine.poll(120):
            raise RuntimeError(f"a reader ({target.__name__}) did not start in 120 s")
        said = mine.recv()
        if said != "ready":
            raise RuntimeError(f"a reader ({target.__name__}) said {said!r}, not ready")

    def ask(self, request: str, pipes: list[Connection] | None = None) -> list[Any]:
        chosen = self.pipes if pipes is None else pipes
        for pipe in chosen:
            pipe.send(request)
        return [pipe.recv() for pipe in chosen]

    def stop(self) -> list[dict[str, float]]:
        arrived: list[dict[str, float]] = self.ask("stop")
        for process in self.processes:
            process.join(10)
        return arrived


def plain_reader(pipe: Connection, settings: Settings) -> None:
    """A read_committed consumer from the topic's end, noting each event's arrival
    (by the ``event-id`` header); a process of its own."""
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
    arrived: dict[str, float] = {}
    pipe.send("ready")
    while True:
        # As the feed reads: wait for the first record, not for a full batch.
        for message in take(consumer, 500, 0.05):
            if message.error() is None:
                now = time.monotonic()
                found = dict(message.headers() or []).get("event-id")
                if isinstance(found, bytes):
                    arrived[found.decode()] = now
        if pipe.poll():
            request = pipe.recv()
            if request == "stop":
                break
            pipe.send(len(arrived))  # "count"; "unsubscribe" has nothing to undo
    consumer.close()
    pipe.send(arrived)


def subscribers(pipe: Connection, url: str, accounts: list[str]) -> None:
    """``websockets`` clients, one per account, each following its account through
    ``url``; a process of its own."""
    asyncio.run(_subscribers(pipe, url, accounts))


async def _subscribers(pipe: Connection, url: str, accounts: list[str]) -> None:
    sockets = [await connect(url) for _ in accounts]
    for socket, account in zip(sockets, accounts, strict=True):
        await socket.send(
            json.dumps({"type": "subscribe", "id": "s", "aggregate_id": account})
        )
        assert json.loads(await socket.recv())["type"] == "ack"
    arrived: dict[str, float] = {}
    left: list[str] = []
    all_left = asyncio.Event()

    async def take(socket: Any) -> None:
        async for frame in socket:
            now = time.monotonic()
            message = json.loads(frame)
            if message["type"] == "event":
                arrived[message["metadata"]["event_id"]] = now
            elif message["type"] == "ack" and message["request"] == "unsubscribe":
                left.append(message["id"])
                if len(left) == len(sockets):
                    all_left.set()

    readers = [asyncio.ensure_future(take(socket)) for socket in sockets]
    pipe.send("ready")
    while (request := await asyncio.to_thread(pipe.recv)) != "stop":
        if request == "unsubscribe":
            for socket in sockets:
                await socket.send(json.dumps({"type": "unsubscribe", "id": "s"}))
            await all_left.wait()
        pipe.send(len(arrived))
    for reader in readers:
        reader.cancel()
    for socket in sockets:
        await socket.close()
    pipe.send(arrived)


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


def measure(
    settings: Settings,
    count: int,
    rounds: int,
    interval: float,
    per_batch: int,
    clients: int,
    worker: Callable[[], list[int]],
) -> dict[str, Any]:
    batches, control = events(settings, count, rounds, per_batch)
    url = f"ws://{settings.web_host}:{settings.web_port}/ws"
    names = [f"acc-push-{n}" for n in range(count)]
    readers = Readers()
    readers.start(plain_reader, settings)
    for n in range(clients):
        readers.start(subscribers, url, names[n::clients])
    plain_pipe, client_pipes = readers.pipes[0], readers.pipes[1:]

    meter = CpuSampler({"worker": worker})
    hub_before = hub_cpu(settings)
    meter.start()
    committed = append(settings, batches, interval)
    # Until both readers have every event (or a minute passes: the figures then
    # say how many were delivered); then what the worker still does for them (its
    # views' last writes) counts here too, in both windows alike.
    eventually(
        lambda: (
            readers.ask("count", [plain_pipe])[0] >= len(committed)
            and sum(readers.ask("count", client_pipes)) >= len(committed)
        ),
        timeout=60,
    )
    time.sleep(SETTLE_S)
    fanout = cpu(meter.stop(), meter.seconds, len(committed))
    hub_after = hub_cpu(settings)
    hub = {name: hub_after[name] - hub_before.get(name, 0.0) for name in hub_after}

    # The control: the same pace of events with no subscription left.
    readers.ask("unsubscribe", client_pipes)
    topic = settings.topics.events("accounts")
    before = fed_to(settings, topic)
    expected = before + sum(len(batch) for batch in control)
    meter = CpuSampler({"worker": worker})
    meter.start()
    controlled = append(settings, control, interval)
    eventually(lambda: fed_to(settings, topic) >= expected, timeout=60, every=0.25)
    time.sleep(SETTLE_S)
    idle = cpu(meter.stop(), meter.seconds, len(controlled))
    plain, *clients_arrived = readers.stop()
    pushed = {e: t for arrived in clients_arrived for e, t in arrived.items()}
    delivered = sum(1 for e in committed if e in pushed)
    fanout["deliveries"] = delivered
    fanout["ms_per_delivery"] = (
        round(1000 * fanout["cpu_s"] / delivered, 3) if delivered else None
    )

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
    parser.add_argument(
        "--client-processes",
        type=int,
        default=4,
        help="processes the subscribers are spread over (as clients on machines "
        "of their own would be: one loop taking every message measures its own "
        "queue); the plain consumer has a process of its own",
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
            result = measure(
                settings,
                args.subscribers,
                args.rounds,
                args.interval,
                per_batch,
                min(args.client_processes, args.subscribers),
                process_tree(pid),
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
