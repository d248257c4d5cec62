"""What every benchmark in ``bench.run`` shares: isolated deployments, the seeded
order workload, producing commands, watching Postgres for read models, and CPU and
memory read from /proc."""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import itertools
import os
import platform
import random
import re
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
from confluent_kafka import Consumer, Producer, TopicPartition

from app.adapters import mapper, migrations, topics
from app.adapters.catalog import SchemaCatalog
from app.adapters.codec import Codec, ConfluentRegistry, Headers, headers
from app.adapters.eventlog import metadata_record, partition_for
from app.adapters.topics import end_offsets, record_end
from app.application.commands import Metadata, event_id
from app.client import PARTITIONER
from app.domain import accounts, orders
from app.domain.orders import (
    Address,
    DeliverOrder,
    LineItem,
    ShipOrder,
    line_total_minor,
)
from app.local import postgres
from app.local.deployments import (
    delete_local_state,
    delete_topics,
    free_port,
    with_database,
)
from app.local.process import wait_for
from app.settings import Settings, Topics
from app.workload import deposit, new_order, payment

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
RUN = uuid.uuid4().hex[:6]


# -- results -----------------------------------------------------------------------------


def figure(
    key: str,
    label: str,
    unit: str,
    value: float | None,
    baseline: float | None,
    baseline_label: str,
    *,
    better: str,
    reason: str | None = None,
    digits: int = 3,
) -> dict[str, Any]:
    """One row of the results table: a measured value beside a baseline measured in
    the same run, and their ratio; ``better`` is "higher", "lower" or "neither". A
    figure that could not be measured carries None and the reason instead of a
    number."""
    ratio = None
    if value is not None and baseline:
        ratio = round(value / baseline, 3)
    if value is None and reason is None:
        reason = "not measured"
    return {
        "key": key,
        "label": label,
        "unit": unit,
        "value": None if value is None else round(value, digits),
        "baseline": None if baseline is None else round(baseline, digits),
        "baseline_label": baseline_label,
        "ratio": ratio,
        "better": better,
        "reason": reason,
    }


def tail_figures(
    key: str,
    label: str,
    value: Mapping[str, Any],
    baseline: Mapping[str, Any],
    baseline_label: str,
    *,
    digits: int,
) -> list[dict[str, Any]]:
    """The p50 and p99 latency figures (in ms, lower is better) of ``value`` beside
    ``baseline``, each holding ``p50_ms`` and ``p99_ms``; ``{p}`` in ``key`` and
    ``label`` names the percentile. A value without them is not measured."""
    return [
        figure(
            key.replace("{p}", p),
            label.replace("{p}", p),
            "ms",
            value.get(f"{p}_ms"),
            baseline[f"{p}_ms"],
            baseline_label,
            better="lower",
            digits=digits,
        )
        for p in ("p50", "p99")
    ]


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def interleaved(
    variants: dict[str, Callable[[], Any]], repeats: int
) -> dict[str, list[float]]:
    """Seconds of each variant's ``repeats`` runs, after one warm-up run each. The
    variants take turns (in a rotating order), so a burst of load from elsewhere on
    the machine falls on all of them rather than on whichever ran at the time."""
    for run in variants.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            began = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - began)
    return times


# -- the machine -------------------------------------------------------------------------


def machine(settings: Settings) -> dict[str, Any]:
    from app.local.kafka import pinned_version

    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "cpu": "",
        "memory_gib": None,
        "kafka": pinned_version(),
        "postgres": None,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }
    with contextlib.suppress(Exception):  # context only; the run goes on without it
        listed = topics.admin_client(settings).list_topics(timeout=15).topics
        info["broker_partitions"] = sum(len(t.partitions) for t in listed.values())
    info["kafka_bootstrap"] = settings.bootstrap_servers
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            info["cpu"] = line.split(":", 1)[1].strip()
            break
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            info["memory_gib"] = round(int(line.split()[1]) / 1024 / 1024, 1)
    with (
        contextlib.suppress(psycopg.Error),
        psycopg.connect(settings.database_url, connect_timeout=5) as conn,
    ):
        row = conn.execute("SHOW server_version").fetchone()
        info["postgres"] = row[0] if row else None
    return info


def load_average() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


# -- isolated deployments ----------------------------------------------------------------


@contextlib.contextmanager
def deployment(
    base: Settings,
    name: str,
    *,
    kafka: bool = True,
    database: bool = True,
    **changes: Any,
) -> Iterator[Settings]:
    """A deployment of its own (topic prefix, application id, web port, database),
    provisioned as ``streamfold up`` would; its database, topics and worker store are
    removed afterwards. A bench that needs no topics or no database skips them."""
    tag = f"{RUN}-{name}"
    dbname = f"streamfold_bench_{tag}".replace("-", "_")
    writer = postgres.Conninfo.parse(base.database_url)
    reader = postgres.Conninfo.parse(base.query_database_url)
    settings = dataclasses.replace(
        base,
        topics=Topics(prefix=f"bench-{tag}."),
        app_id=f"streamfold-bench-{tag}",
        web_port=free_port(),
        database_url=with_database(base.database_url, dbname),
        query_database_url=with_database(base.query_database_url, dbname),
        **changes,
    )
    try:
        if database:
            postgres.create_database(
                dbname, owner=writer.user, reader=reader.user, port=writer.port
            )
            migrations.migrate(settings.database_url)
        if kafka:
            topics.ensure_topics(settings)
        yield settings
    finally:
        if database:
            postgres.drop_database(dbname, port=writer.port)
        delete_topics(settings)
        delete_local_state(settings)


# -- the seeded workload -----------------------------------------------------------------


def order_lifecycles(seed: int, count: int, *, first: int = 0) -> list[list[Any]]:
    """``count`` orders, each [CreateOrder with 3 items, ProcessPayment, ShipOrder,
    DeliverOrder]; the same seed and numbers give the same commands."""
    rng = random.Random(f"orders/{seed}/{first}")
    out = []
    customers = max(1, count // 4)
    for n in range(first, first + count):
        order_id = f"ord-{seed}-{n:07d}"
        items = tuple(
            LineItem(
                product_id=f"sku-{k:04d}",
                quantity=rng.randint(1, 5),
                unit_price_minor=rng.randint(100, 20_000),
                tax_rate_bps=rng.choice((0, 500, 700, 2000)),
            )
            for k in rng.sample(range(5000), 3)
        )
        customer = rng.randrange(customers)
        out.append(
            [
                new_order(
                    order_id,
                    f"cust-{seed}-{customer}",
                    items,
                    currency="EUR",
                    name=f"Customer {customer}",
                    email=f"customer{customer}@example.com",
                    address=Address(
                        street=f"{rng.randint(1, 200)} High Street",
                        city="Leeds",
                        state="",
                        zip_code=f"LS{rng.randint(1, 29)} {rng.randint(1, 9)}AB",
                        country="UK",
                    ),
                ),
                payment(
                    order_id,
                    sum(line_total_minor(i) for i in items),
                    f"pay-{seed}-{n}",
                    f"txn-{seed}-{n}",
                    currency="EUR",
                ),
                ShipOrder(
                    order_id=order_id,
                    tracking_number=f"1Z{rng.getrandbits(40):010X}",
                    carrier="UPS",
                ),
                DeliverOrder(order_id=order_id),
            ]
        )
    return out


def deposits(seed: int, account_id: str, count: int) -> list[Any]:
    """An account opened, then ``count - 1`` deposits: ``count`` events."""
    rng = random.Random(f"deposits/{seed}/{account_id}")
    return [
        accounts.OpenAccount(account_id=account_id, owner_id="owner", currency="EUR"),
        *(
            deposit(
                account_id,
                rng.randint(1, 50_000),
                f"dep-{n}",
                currency="EUR",
                source=rng.choice(("card", "cash", "transfer")),
                reference=f"ref {n}",
            )
            for n in range(count - 1)
        ),
    ]


@dataclass(frozen=True, slots=True)
class FramedRecord:
    """One record framed (its value Confluent-framed Avro) ahead of time, produced as
    is so the driver stays cheap."""

    command_id: str
    key: bytes
    value: bytes
    headers: Headers
    timestamp_ms: int | None = None

    def produce_keyed(self, producer: Producer, topic: str, partitions: int) -> None:
        """Produce it on its key's partition of ``topic``, where Streamfold's own
        producers would put it."""
        producer.produce(
            topic,
            self.value,
            self.key,
            partition=partition_for(self.key, partitions),
            headers=self.headers,
        )


def new_codec(settings: Settings, catalog: SchemaCatalog | None = None) -> Codec:
    return Codec(
        ConfluentRegistry(settings.schema_registry_url),
        catalog or SchemaCatalog.load(),
    )


def bench_envelope(command_id: str) -> dict[str, Any]:
    """The envelope record of a benchmark's command: its own correlation and
    cause, issued now by the user "bench"."""
    return {
        "command_id": command_id,
        "correlation_id": command_id,
        "causation_id": command_id,
        "user_id": "bench",
        "issued_at": datetime.now(UTC),
        "expected_version": None,
    }


class CommandEncoder:
    """Frames domain commands as the client does, with command ids from the seed."""

    def __init__(self, settings: Settings, codec: Codec, seed: int) -> None:
        self.settings = settings
        self.codec = codec
        self._rng = random.Random(f"command-ids/{seed}")

    def __call__(self, command: Any, topic: str | None = None) -> FramedRecord:
        command_id = str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
        envelope = bench_envelope(command_id)
        area = "orders" if type(command) in orders.COMMANDS else "accounts"
        name = self.codec.catalog.record_name(type(command))
        value = self.codec.encode(
            topic or self.settings.topics.commands(area),
            name,
            mapper.command_record(command, envelope),
        )
        aggregate_id = getattr(command, "order_id", None) or command.account_id
        return FramedRecord(
            command_id,
            str(aggregate_id).encode(),
            value,
            headers.for_command(
                command_type=type(command).__name__,
                command_id=command_id,
                correlation_id=command_id,
            ),
        )


def order_events(seed: int, count: int) -> list[tuple[dict[str, Any], Any]]:
    """The events of ``count`` order lifecycles (``order_lifecycles``), appended
    from 2026-01-01: the orders stream the codec and replay benchmarks read."""
    commands = [c for life in order_lifecycles(seed, count) for c in life]
    return domain_events(
        orders, orders.AGGREGATE_TYPE, commands, start=datetime(2026, 1, 1, tzinfo=UTC)
    )


def domain_events(
    module: ModuleType,
    aggregate_type: str,
    commands: Iterable[Any],
    *,
    start: datetime,
    step: timedelta = timedelta(milliseconds=10),
) -> list[tuple[dict[str, Any], Any]]:
    """(metadata record, event) pairs as the write side would append them, from
    the domain's own ``decide`` and ``evolve``: valid streams without a worker."""
    out: list[tuple[Metadata, Any]] = []
    states: dict[str, Any] = {}
    at = start
    for n, command in enumerate(commands):
        aggregate_id = getattr(command, "order_id", None) or command.account_id
        state = states.get(aggregate_id) or module.initial_state()
        command_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"bench/{aggregate_id}/{n}"))
        for event in module.decide(state, command):
            version = state.version + 1
            meta = Metadata(
                event_id=event_id(aggregate_type, aggregate_id, version, command_id),
                event_type=type(event).__name__,
                aggregate_type=aggregate_type,
                aggregate_id=aggregate_id,
                stream_version=version,
                timestamp=at,
                user_id="bench",
                correlation_id=command_id,
                causation_id=command_id,
                command_id=command_id,
            )
            out.append((meta, event))
            state = module.evolve(state, event)
        states[aggregate_id] = state
        at += step
    return [(_meta_record(meta, event), event) for meta, event in out]


def _meta_record(meta: Metadata, event: Any) -> dict[str, Any]:
    catalog = _catalog()
    return metadata_record(
        meta, catalog.latest_version(catalog.record_name(type(event)))
    )


@functools.cache
def _catalog() -> SchemaCatalog:
    return SchemaCatalog.load()


def encode_events(
    codec: Codec, topic: str, events: Sequence[tuple[dict[str, Any], Any]]
) -> list[FramedRecord]:
    """Events framed as the event log writes them (same record, headers, timestamp)."""
    out = []
    for meta, event in events:
        name = codec.catalog.record_name(type(event))
        record = mapper.event_record(event, meta)
        out.append(
            FramedRecord(
                meta["event_id"],
                meta["aggregate_id"].encode(),
                codec.encode(topic, name, record),
                headers(name, record),
                int(meta["timestamp"].timestamp() * 1000),
            )
        )
    return out


# -- producing ---------------------------------------------------------------------------


def new_producer(settings: Settings) -> Producer:
    """The product's producer settings (acks=all, idempotent) and key partitioner."""
    return Producer({**settings.producer_config(), "partitioner": PARTITIONER})


@dataclass
class Sent:
    """When each message was handed to the producer, and where it landed."""

    at: dict[str, float] = field(default_factory=dict)
    position: dict[str, tuple[int, int]] = field(default_factory=dict)

    def delivered(self, command_id: str) -> Callable[[Any, Any], None]:
        def report(error: Any, message: Any) -> None:
            if error is None:
                self.position[command_id] = (message.partition(), message.offset())

        return report


def produce(
    producer: Producer,
    topic: str,
    messages: Sequence[FramedRecord],
    *,
    rate: float | None = None,
    sent: Sent | None = None,
) -> Sent:
    """Produce as fast as librdkafka takes them, or at a steady ``rate`` per second;
    notes each message's send time (monotonic) and, once delivered, its position."""
    sent = sent or Sent()
    started = time.monotonic()
    for index, message in enumerate(messages):
        if rate is not None:
            delay = started + index / rate - time.monotonic()
            if delay > 0.001:
                time.sleep(delay)
        while True:
            try:
                producer.produce(
                    topic,
                    message.value,
                    message.key,
                    headers=message.headers,
                    timestamp=message.timestamp_ms or 0,
                    on_delivery=sent.delivered(message.command_id),
                )
                break
            except BufferError:
                producer.poll(0.01)
        sent.at[message.command_id] = time.monotonic()
        producer.poll(0)
    if producer.flush(120) != 0:
        raise RuntimeError(f"{topic}: messages not acknowledged within 120 s")
    return sent


def high_watermarks(settings: Settings, topic: str) -> dict[int, int]:
    """Each partition's end offset; retried while a new topic's leaders settle."""
    consumer = Consumer(
        {**settings.consumer_config(), "group.id": f"bench-{uuid.uuid4().hex}"}
    )
    try:
        return end_offsets(consumer, topic)
    finally:
        consumer.close()


def group_lag(settings: Settings, group: str, topics: list[str]) -> int:
    """Records in ``topics`` beyond what ``group`` has committed."""
    consumer = Consumer({**settings.consumer_config(), "group.id": group})
    try:
        ends = {
            TopicPartition(t, p): end
            for t in topics
            for p, end in end_offsets(consumer, t).items()
        }
        committed = consumer.committed(list(ends), timeout=30)
        lag = 0
        for c in committed:
            end = ends[TopicPartition(c.topic, c.partition)]
            if c.offset < end:
                # Past the last record is caught up: transaction markers count in
                # the high watermark.
                end = record_end(settings, c.topic, c.partition, max(c.offset, 0), end)
            lag += max(0, end - max(c.offset, 0))
        return lag
    finally:
        consumer.close()


# -- watching Postgres -------------------------------------------------------------------


class PositionWatcher:
    """Polls a positions table (partition → next offset) every few milliseconds on a
    thread of its own and remembers when each partition passed each offset, so the
    moment a write became visible in Postgres can be looked up afterwards.

    Rows and positions commit in one transaction, so a position past an offset means
    the rows of that offset are visible. The time noted is just after the query
    returned: a visible time is late by at most one interval plus one query.
    """

    def __init__(
        self,
        database_url: str,
        sql: str,
        params: Sequence[Any] = (),
        interval: float = 0.005,
    ) -> None:
        self._conn = psycopg.connect(database_url, autocommit=True)
        self.backend_pid = self._conn.info.backend_pid
        self._sql, self._params, self._interval = sql, tuple(params), interval
        self._times: dict[int, list[float]] = {}
        self._offsets: dict[int, list[int]] = {}
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rows = self._conn.execute(self._sql, self._params).fetchall()
            now = time.monotonic()
            self.polls += 1
            for partition, offset in rows:
                offsets = self._offsets.setdefault(partition, [])
                if not offsets or offset > offsets[-1]:
                    offsets.append(offset)
                    self._times.setdefault(partition, []).append(now)
            self._stop.wait(self._interval)

    def current(self, partition: int) -> int:
        offsets = self._offsets.get(partition)
        return offsets[-1] if offsets else 0

    def wait_past(
        self, positions: Iterable[tuple[int, int]], timeout: float, what: str
    ) -> None:
        """Wait until each partition's position is past every offset given for it;
        ``what`` names the wait in the error when it times out."""
        needed: dict[int, int] = {}
        for partition, offset in positions:
            needed[partition] = max(needed.get(partition, 0), offset)
        wait_for(
            lambda: all(self.current(p) > o for p, o in needed.items()),
            timeout,
            what,
            every=0.02,
        )

    def visible_at(self, partition: int, offset: int) -> float | None:
        """When the position of ``partition`` first went past ``offset``."""
        offsets = self._offsets.get(partition, [])
        index = bisect.bisect_right(offsets, offset)
        return self._times[partition][index] if index < len(offsets) else None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._conn.close()


# -- CPU and memory from /proc -----------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process; None once it has gone.

    A process of one thread (a Postgres backend) is read in nanoseconds from
    /proc/<pid>/schedstat: the clock ticks of /proc/<pid>/stat (10 ms) round a
    short run of a fast pipeline's backends down to zero. /proc/<pid>/schedstat
    covers the main thread only, so a process of many threads is read in ticks.
    """
    try:
        if len(os.listdir(f"/proc/{pid}/task")) == 1:
            with contextlib.suppress(OSError, ValueError, IndexError):
                nanoseconds = Path(f"/proc/{pid}/schedstat").read_text().split()[0]
                return int(nanoseconds) / 1e9
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses; the fields after it are fixed.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def process_tree(pid: int) -> Callable[[], list[int]]:
    """A finder for ``pid`` and its descendants (the worker and its write and
    projection processes), as they are when called."""

    def find() -> list[int]:
        found, todo = [], [pid]
        while todo:
            current = todo.pop()
            found.append(current)
            with contextlib.suppress(OSError, ValueError):
                for task in os.listdir(f"/proc/{current}/task"):
                    children = Path(f"/proc/{current}/task/{task}/children")
                    todo += [int(child) for child in children.read_text().split()]
        return found

    return find


def peak_memory_mib(pid: int) -> float | None:
    """The process's peak resident set (VmHWM) in MiB."""
    return memory_mib(pid, "VmHWM")


def memory_mib(pid: int, field: str = "VmRSS") -> float | None:
    """A memory figure of the process from /proc/<pid>/status, in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


_PG_BACKGROUND = re.compile(
    r"^postgres: [^:]+: (checkpointer|background writer|walwriter|autovacuum launcher|"
    r"logical replication launcher|stats collector|archiver)"
)


def _postgres_processes() -> Iterator[tuple[int, str]]:
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes()
        except OSError:
            continue
        text = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
        if text.startswith("postgres: ") or "/bin/postgres " in text:
            yield int(entry.name), text


def postgres_backends(
    database: str, exclude: Iterable[int] = ()
) -> Callable[[], list[int]]:
    """A finder for the server processes working for one database (client backends
    and autovacuum workers), by the title Postgres gives them."""
    excluded = set(exclude)
    needle = f" {database} "

    def find() -> list[int]:
        return [
            pid
            for pid, title in _postgres_processes()
            if needle in f"{title} " and pid not in excluded
        ]

    return find


def postgres_background() -> list[int]:
    """The postmaster and its background writers: shared by every database."""
    return [
        pid
        for pid, title in _postgres_processes()
        if _PG_BACKGROUND.match(title) or not title.startswith("postgres: ")
    ]


class CpuSampler:
    """CPU seconds of groups of processes between ``start`` and ``stop``.

    Samples every ``interval`` on a thread, so a process that exits mid-window (a
    Postgres backend) keeps what it used up to its last sample; one that appears
    mid-window counts from zero. ``read`` gives a process's CPU seconds (None once
    it has gone).
    """

    def __init__(
        self,
        groups: Mapping[str, Callable[[], Iterable[int]]],
        interval: float = 0.25,
        read: Callable[[int], float | None] = cpu_seconds,
    ) -> None:
        self.groups = groups
        self.interval = interval
        self._read = read
        self._base: dict[str, dict[int, float]] = {}
        self._last: dict[str, dict[int, float]] = {}
        # (when, every group's total then), one entry a sample.
        self._history: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started = self.stopped = 0.0

    def _sample(self, first: bool = False) -> None:
        for name, find in self.groups.items():
            base = self._base.setdefault(name, {})
            last = self._last.setdefault(name, {})
            for pid in find():
                used = self._read(pid)
                if used is None:
                    continue
                if first:
                    base[pid] = used
                else:
                    base.setdefault(pid, 0.0)
                last[pid] = used
        self._history.append((time.monotonic(), self._totals()))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> None:
        self._sample(first=True)
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, float]:
        self._halt()
        self._sample()
        self.stopped = time.monotonic()
        return self._totals()

    def stop_when_quiet(
        self, group: str, below: float = 0.15, every: float = 2.0, timeout: float = 300
    ) -> dict[str, float]:
        """Stop once ``group`` has used less than ``below`` cores over the last
        ``every`` seconds, and give what every group had used by the end of its work:
        the first sample after this call (the load's last answer), or the last
        sample after that in which ``group`` was busier than ``below``. The work a
        system does for the load after its last answer (a reader catching up, a
        table's changelog) counts, its idle polling afterwards does not, and the
        window (``seconds``) ends there too. ``every`` is long enough to span a pause
        in the work: Faust's view agents, catching up on one core, stopped for about
        a second in the middle of it."""
        called = time.monotonic()
        deadline = called + timeout
        while True:
            time.sleep(self.interval)
            history = list(self._history)
            now, totals = history[-1]
            if now - max(called, history[0][0]) >= every:
                since, then = next(h for h in reversed(history) if h[0] <= now - every)
                if totals[group] - then[group] < below * (now - since):
                    break
            if time.monotonic() > deadline:
                self._halt()
                raise RuntimeError(
                    f"{group} was still busy {timeout:.0f}s after the load: it "
                    f"never used less than {below} cores over {every}s"
                )
        self._halt()
        end = next(h for h in history if h[0] >= called)
        for before, after in itertools.pairwise(history):
            busy = after[1][group] - before[1][group] > below * (after[0] - before[0])
            if busy and after[0] > end[0]:
                end = after
        self.stopped = end[0]
        return end[1]

    def _halt(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _totals(self) -> dict[str, float]:
        return {
            name: round(
                sum(
                    used - self._base[name].get(pid, 0.0) for pid, used in last.items()
                ),
                3,
            )
            for name, last in self._last.items()
        }

    @property
    def seconds(self) -> float:
        return self.stopped - self.started
