"""`streamfold soak`: a mixed workload of orders, payments and ledger commands for a
given time while random faults hit the worker, the broker and PostgreSQL; then the
audit (``app.audit``) of every promise. Not part of the test suite: run it by hand.

    bin/streamfold soak --minutes 20 [--rate 40] [--faults worker,broker,postgres]

It runs in a deployment of its own (topic prefix, application id, database, web
port), removed afterwards unless ``--keep`` (which also keeps the broker and
PostgreSQL cluster of a soak that failed running). Faults, one every 20-60 s:

- ``worker``: SIGKILL, then a restart (as a process supervisor would);
- ``broker``: SIGKILL of the Kafka broker, restarted on the same data after a few
  seconds; nobody touches the worker or the client. With this fault the soak starts
  a broker (and schema registry) of its own on free ports, removed at the end
  unless the soak failed with ``--keep``: killing the shared broker would hit
  everything else on it, and it recovers every partition it holds before it
  answers again;
- ``postgres``: an immediate-mode stop of the PostgreSQL cluster, started again
  after a few seconds. With this fault the soak runs on a cluster of its own on a
  free port, dropped at the end (kept as the broker is): stopping the machine's
  cluster would hit every other database on it.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx

from app import audit
from app.client import CommandClient, CommandTimeout
from app.domain.accounts import Deposit, OpenAccount
from app.domain.orders import (
    AddItem,
    CancelOrder,
    CreateOrder,
    DeliverOrder,
    LineItem,
    ShipOrder,
)
from app.local import deployments, postgres, stack
from app.local.kafka import KafkaNode
from app.local.process import Daemon, wait_for
from app.local.worker import WorkerProcess
from app.settings import Settings
from app.workload import LONDON, deposit, new_order, payment, withdrawal

FAULTS = ("worker", "broker", "postgres")


class Workload:
    """Random commands over a pool of accounts and orders; some are refused on
    purpose (overdrafts, shipping unpaid orders), which is part of the test."""

    def __init__(self, rng: random.Random, accounts: int = 30) -> None:
        self.rng = rng
        self.accounts = [f"acc-{n:03d}" for n in range(accounts)]
        self.card_orders: dict[str, int] = {}  # order id -> total
        self.account_orders: list[str] = []
        self.n = 0

    def opening(self) -> list[Any]:
        commands: list[Any] = []
        for account in self.accounts:
            commands.append(
                OpenAccount(account_id=account, owner_id=f"c-{account}", currency="EUR")
            )
            commands.append(self._deposit(account, self.rng.choice([0, 5_000, 50_000])))
        return [c for c in commands if getattr(c, "amount_minor", 1) > 0]

    def next(self) -> Any:
        self.n += 1
        roll = self.rng.random()
        account = self.rng.choice(self.accounts)
        if roll < 0.20:
            return self._deposit(account, self.rng.randint(100, 5_000))
        if roll < 0.35:
            amount = self.rng.randint(100, 5_000)
            return withdrawal(
                account, amount, f"w{self.n}", currency="EUR", reference="soak"
            )
        if roll < 0.55:  # charged by the payment saga
            order = f"ord-a{self.n}"
            self.account_orders.append(order)
            return self._order(order, account)
        if roll < 0.65:
            order = f"ord-c{self.n}"
            command = self._order(order, None)
            self.card_orders[order] = sum(
                i.quantity * i.unit_price_minor for i in command.items
            )
            return command
        orders = list(self.card_orders)
        if not orders:
            return self._deposit(account, 100)
        order = self.rng.choice(orders[-200:])
        if roll < 0.75:
            total = self.card_orders[order]
            return payment(
                order,
                total,
                f"p{self.n}",
                f"card-{self.n}",
                currency="EUR",
                method="card",
            )
        if roll < 0.83:
            return ShipOrder(
                order_id=order, tracking_number=f"T{self.n}", carrier="DHL"
            )
        if roll < 0.90:
            return DeliverOrder(order_id=order)
        if roll < 0.95:
            item = LineItem(product_id=f"p{self.n}", quantity=1, unit_price_minor=250)
            self.card_orders[order] += 250  # if refused (paid already), a later
            return AddItem(order_id=order, item=item)  # payment is refused too
        return CancelOrder(order_id=order, reason="changed my mind")

    def _deposit(self, account: str, amount: int) -> Deposit:
        return deposit(
            account,
            amount,
            f"d{self.n}-{account}",
            currency="EUR",
            source="bank",
            reference="soak",
        )

    def _order(self, order: str, account: str | None) -> CreateOrder:
        items = tuple(
            LineItem(
                product_id=f"sku-{k}",
                quantity=self.rng.randint(1, 3),
                unit_price_minor=self.rng.randint(200, 2_000),
            )
            for k in range(self.rng.randint(1, 3))
        )
        return new_order(
            order,
            f"c-{account or 'card'}",
            items,
            currency="EUR",
            address=LONDON,
            account_id=account,
        )


class Faults:
    """Injects one fault at a time on a thread of its own, and logs each."""

    def __init__(
        self,
        settings: Settings,
        worker: Daemon,
        broker: KafkaNode | None,
        cluster: str | None,
        kinds: list[str],
        rng: random.Random,
        say: Callable[[str], None],
    ) -> None:
        self.settings, self.worker, self.broker = settings, worker, broker
        self.cluster = cluster
        self.kinds = kinds
        self.rng, self.say = rng, say
        self.injected: Counter[str] = Counter()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, name="faults", daemon=True)

    def run(self) -> None:
        while not self.stop.wait(self.rng.uniform(20, 60)):
            kind = self.rng.choice(self.kinds)
            started = time.monotonic()
            try:
                getattr(self, f"_{kind}")()
            except Exception as error:  # noqa: BLE001 - reported, and the soak goes on
                self.say(f"fault     {kind}: recovery failed: {error}")
                continue
            self.injected[kind] += 1
            self.say(
                f"fault     {kind} killed and back in {time.monotonic() - started:.1f}s"
            )

    def _worker(self) -> None:
        self.worker.stop(kill=True)
        self.worker.start(timeout=180)

    def _broker(self) -> None:
        assert self.broker is not None, "broker faults need the soak's own broker"
        self.broker.stop(kill=True)
        time.sleep(self.rng.uniform(1, 5))
        self.broker.start(timeout=180)

    def _postgres(self) -> None:
        assert self.cluster is not None, "postgres faults need the soak's own cluster"
        port = postgres.Conninfo.parse(self.settings.database_url).port
        postgres.stop(mode="immediate", cluster=self.cluster)
        time.sleep(self.rng.uniform(1, 5))
        postgres.ensure_running(port, self.cluster)


def run(
    settings: Settings,
    *,
    minutes: float,
    rate: float,
    faults: list[str],
    seed: int,
    keep: bool,
    say: Callable[[str], None] = print,
) -> int:
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown:
        raise ValueError(f"unknown fault(s) {unknown}; known: {', '.join(FAULTS)}")
    stack.up(settings, say)
    with contextlib.ExitStack() as scope:
        broker = cluster = None
        if "broker" in faults:
            settings, broker = scope.enter_context(deployments.private_broker(settings))
            say(f"broker    {broker.bootstrap}, the soak's own")
        if "postgres" in faults:
            settings, cluster = scope.enter_context(
                deployments.private_postgres(settings)
            )
            say(f"postgres  cluster {cluster}, the soak's own")
        status = _soak(
            settings, broker, cluster, minutes, rate, faults, seed, keep, say
        )
        if status and keep and (broker or cluster):
            scope.pop_all()  # left running, as the failure left them, to be looked at
            kept = [f"broker {broker.bootstrap}"] if broker else []
            kept += [f"PostgreSQL cluster {cluster}"] if cluster else []
            say(
                f"kept      {' and '.join(kept)}, still running: stop by hand when done"
            )
        return status


def _soak(
    settings: Settings,
    broker: KafkaNode | None,
    cluster: str | None,
    minutes: float,
    rate: float,
    faults: list[str],
    seed: int,
    keep: bool,
    say: Callable[[str], None],
) -> int:
    own = deployments.create(settings, kind="soak")
    say(
        f"soak      {own.app_id}: {minutes:g} min at {rate:g} commands/s, faults {faults}"
    )
    rng = random.Random(seed)  # noqa: S311 - a workload, not a secret
    workload = Workload(rng)
    worker = WorkerProcess(own)
    worker.start(timeout=180)
    rng_faults = random.Random(seed + 1)  # noqa: S311
    injector = Faults(own, worker, broker, cluster, faults, rng_faults, say)
    client = CommandClient(own)
    sent: list[str] = []
    kinds: Counter[str] = Counter()
    started = time.monotonic()
    try:
        for command in workload.opening():
            sent.append(client.submit(command))
        client.wait(sent, timeout=180)
        if faults:
            injector.thread.start()
        deadline = started + minutes * 60
        next_report = time.monotonic() + 60
        while (now := time.monotonic()) < deadline:
            command = workload.next()
            sent.append(client.submit(command))
            kinds[type(command).__name__] += 1
            if now >= next_report:
                next_report += 60
                say(
                    f"progress  {len(sent)} commands sent, {(now - started) / 60:.0f} min"
                )
            time.sleep(max(0.0, started + len(sent) / rate - time.monotonic()))
        injector.stop.set()
        injector.thread.join(300) if faults else None
        if worker.pid() is None:  # a fault's restart failed: what a supervisor does
            worker.start(timeout=180)
        say(f"produced  {len(sent)} commands; waiting for every result")
        try:
            results = client.wait(sent, timeout=600)
        except CommandTimeout as error:
            say(f"FAIL      {error}")
            return 1
        accepted = sum(r.accepted for r in results)
        say(f"results   {accepted} accepted, {len(results) - accepted} refused")
        _wait_projections(own, say)
        findings = _settled_audit(own, sent, say)
    finally:
        injector.stop.set()
        client.close()
        worker.stop()
        if not keep:
            deployments.remove(own)
    say(f"faults    {dict(injector.injected) or 'none'}")
    say(f"commands  {dict(kinds)}")
    say(audit.report(findings))
    ok = all(f.ok for f in findings)
    say(
        f"soak      {'PASSED' if ok else 'FAILED'} after {(time.monotonic() - started) / 60:.1f} min"
    )
    return 0 if ok else 1


def _wait_projections(settings: Settings, say: Callable[[str], None]) -> None:
    url = f"{settings.web_url}/status"

    def caught_up() -> bool:
        try:
            projections = httpx.get(url, timeout=5).json()["projections"]
        except (httpx.HTTPError, KeyError, ValueError):
            return False
        return bool(projections) and all(
            p["lag_events"] == 0 and all(q["head"] is not None for q in p["positions"])
            for p in projections
        )

    wait_for(caught_up, 600, "the projections to catch up")
    say("read side caught up")


def _settled_audit(
    settings: Settings, sent: list[str], say: Callable[[str], None]
) -> list[audit.Finding]:
    """The audit, repeated while only sagas are still running (up to their timeout
    and a margin), so an order still being paid is not reported as lost."""
    deadline = time.monotonic() + 180
    while True:
        findings = audit.audit(settings, command_ids=sent)
        pending = [f for f in findings if not f.ok]
        if not pending or time.monotonic() > deadline:
            return findings
        if {f.check for f in pending} - {"payments", "read models"}:
            return findings
        say(f"audit     waiting for sagas to settle: {pending[0].problems[0]}")
        time.sleep(10)
        _wait_projections(settings, lambda _: None)
