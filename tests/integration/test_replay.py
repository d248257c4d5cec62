"""Replays against the real broker and Postgres: a blue/green rebuild gives the live
tables' exact contents while queries keep answering; a second replay gives the same;
`--in-place`, and an offset reset with Kafka's own consumer-groups tool followed by a
restart, converge to the same checksums; a poison event is dead-lettered only once."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from confluent_kafka import ConsumerGroupTopicPartitions, Producer
from confluent_kafka.admin import AdminClient

from app.client import CommandClient
from app.domain.accounts import OpenAccount
from app.domain.orders import (
    AddItem,
    CancelOrder,
    DeliverOrder,
    LineItem,
    RemoveItem,
    ShipOrder,
)
from app.local.process import Daemon
from app.projections.engine import dead_letter_topic, group_id
from app.settings import Settings
from app.workload import deposit, ledger_traffic, new_order, payment
from tests.readmodels import (
    actual_ledger,
    actual_orders,
    checksum,
    expected_ledger,
    expected_orders,
    wait_caught_up,
)
from tests.support import eventually_equal, query_rows, read_topic, running_worker

REPO = Path(__file__).resolve().parents[2]
TABLES = {
    "orders": {
        "order_summaries": "order_id",
        "order_items": "order_id, product_id",
        "order_search": "order_id",
        "customers": "customer_id",
        "customer_statistics": "customer_id, currency",
    },
    "ledger": {
        "account_balances": "account_id",
        "transactions": "event_id",
        "financial_daily_totals": "day, currency",
    },
}


# orders.py sets a customer's first_order_at from whichever of their orders is folded
# first and updated_at from the last one; with orders on several partitions that is
# the consumer's interleaving, not the log, so two folds can differ there. Compared on
# its own and reported as a known failure until orders.py takes LEAST / GREATEST.
CUSTOMER_TIMES = "(SELECT customer_id, first_order_at, updated_at FROM customers)"


def checksums(settings: Settings) -> dict[str, str]:
    """Every read-model table's digest, plus each projection's per-aggregate versions."""
    # customers without first_order_at and updated_at: see CUSTOMER_TIMES.
    sources = {"customers": "(SELECT customer_id, name, email FROM customers)"}
    sums = {
        table: checksum(settings, sources.get(table, table), order_by)
        for tables in TABLES.values()
        for table, order_by in tables.items()
    }
    for projection in TABLES:
        sums[f"streams:{projection}"] = checksum(
            settings,
            f"(SELECT aggregate_id, version FROM projection_streams "  # noqa: S608 - test-only constants
            f"WHERE projection = '{projection}')",
            "aggregate_id",
        )
    return sums


def streamfold(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """The `streamfold` console command, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=REPO,
        env={**os.environ, **settings.as_env()},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def replays(settings: Settings, *args: str) -> subprocess.Popen[str]:
    """`streamfold replay ARGS...` started in the background."""
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", "replay", *args],
        cwd=REPO,
        env={**os.environ, **settings.as_env()},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(process: subprocess.Popen[str]) -> None:
    """The replay succeeded and reported its progress and outcome."""
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    name = process.args[4]  # type: ignore[index]
    # The progress line: events done of total, percent, rate, time left.
    final = re.search(
        rf"replay {name}: ([\d,]+)/([\d,]+) events 100\.0%  [\d,]+ events/s  done",
        err,
    )
    assert final, err
    assert final.group(1) == final.group(2)
    assert int(final.group(1).replace(",", "")) > 0
    assert re.match(rf"{name}: replayed [\d,]+ events", out), out


def replay(settings: Settings, *args: str) -> None:
    finished(replays(settings, *args))


def workload(client: CommandClient, rng: random.Random, tag: str) -> list[str]:
    """Accounts with deposits and withdrawals, and orders through every step of their
    life; customers have orders on several partitions. Returns the account ids."""
    accounts = [f"acc-{tag}-{n}" for n in range(10)]
    sent = [
        client.submit(OpenAccount(account_id=a, owner_id=f"o-{a}", currency="USD"))
        for a in accounts
    ]
    for command in ledger_traffic(rng, accounts, 80, deposits=0.65, most=900):
        sent.append(client.submit(command))
    for n in range(20):
        order = f"ord-{tag}-{n}"
        price = rng.randint(100, 5000)
        steps: list[Any] = [
            new_order(
                order,
                f"cust-{tag}-{n % 4}",
                (
                    LineItem(product_id="p-1", quantity=1, unit_price_minor=price),
                    LineItem(product_id="p-2", quantity=2, unit_price_minor=100),
                ),
                name=f"Customer {n % 4}",
                email=f"c{n % 4}@example.com",
            )
        ]
        total = price + 200
        if n % 3 == 0:
            steps.append(
                AddItem(
                    order_id=order,
                    item=LineItem(product_id="p-3", quantity=1, unit_price_minor=50),
                )
            )
            total += 50
        if n % 5 == 0:
            steps.append(RemoveItem(order_id=order, product_id="p-2"))
            total -= 200
        fate = rng.choice(["open", "paid", "shipped", "delivered", "cancelled"])
        if fate != "open":
            steps.append(payment(order, total, f"pay-{n}", f"tx-{n}"))
        if fate in ("shipped", "delivered"):
            steps.append(
                ShipOrder(order_id=order, tracking_number=f"T{n}", carrier="UPS")
            )
        if fate == "delivered":
            steps.append(DeliverOrder(order_id=order))
        if fate == "cancelled":
            steps.append(CancelOrder(order_id=order, reason="changed mind"))
        sent += [client.submit(step) for step in steps]
    results = client.wait(sent, timeout=120)
    assert sum(r.accepted for r in results) > 120
    return accounts


def settled(settings: Settings) -> dict[str, str]:
    """Wait until the read models equal the fold of the log; return their checksums."""
    eventually_equal(lambda: actual_ledger(settings), expected_ledger(settings))
    eventually_equal(lambda: actual_orders(settings), expected_orders(settings))
    wait_caught_up(settings)
    return checksums(settings)


class Queries:
    """Asks the query views (HTTP) and the read-only role (SQL) for rows that do not
    change, over and over on a background thread, recording every wrong answer."""

    def __init__(
        self, settings: Settings, accounts: dict[str, int], order: str
    ) -> None:
        self.settings = settings
        self.accounts = accounts
        self.order = order
        self.answered = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Queries:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        base = self.settings.web_url
        # One connection throughout: after a few runs psycopg prepares the statement,
        # so this also shows prepared statements follow the switched tables.
        with (
            httpx.Client(base_url=base, timeout=10) as http,
            psycopg.connect(self.settings.query_database_url, autocommit=True) as sql,
        ):
            while not self._stop.is_set():
                for account, balance in self.accounts.items():
                    self._check(
                        f"http {account}",
                        lambda a=account: http.get(f"/query/accounts/{a}").json()[
                            "balance_minor"
                        ],
                        balance,
                    )
                    self._check(
                        f"sql {account}",
                        lambda a=account: sql.execute(
                            "SELECT balance_minor FROM account_balances "
                            "WHERE account_id = %s",
                            (a,),
                        ).fetchone()[0],  # type: ignore[index]
                        balance,
                    )
                self._check(
                    f"http {self.order}",
                    lambda: http.get(f"/query/orders/{self.order}").json()["order_id"],
                    self.order,
                )
                time.sleep(0.005)

    def _check(self, what: str, ask: Callable[[], Any], expected: Any) -> None:
        try:
            answer = ask()
        except Exception as error:  # noqa: BLE001 - every failure is the finding
            self.failures.append(f"{what}: {type(error).__name__}: {error}")
            return
        if answer != expected:
            self.failures.append(f"{what}: {answer!r} != {expected!r}")
        self.answered += 1


def catalog(settings: Settings) -> dict[str, Any]:
    """What replays must leave as they found it: index and constraint names, the
    reader's privileges, and no replay schemas."""
    with psycopg.connect(settings.database_url) as conn:
        tables = [t for ts in TABLES.values() for t in ts]

        def of_tables(query: str) -> list[tuple[Any, ...]]:
            return conn.execute(query, (tables,)).fetchall()

        indexes = of_tables(
            "SELECT tablename, indexname FROM pg_indexes WHERE schemaname = 'public' "
            "AND tablename = ANY(%s) ORDER BY 1, 2"
        )
        constraints = of_tables(
            "SELECT conrelid::regclass::text, conname FROM pg_constraint "
            "WHERE conrelid::regclass::text = ANY(%s) ORDER BY 1, 2"
        )
        readable = of_tables(
            "SELECT t, has_table_privilege('streamfold_reader', 'public.' || t, 'SELECT')"
            " FROM unnest(%s::text[]) t ORDER BY 1"
        )
        leftovers = conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname ~ '^(replay|retired)_'"
        ).fetchall()
    return {
        "indexes": indexes,
        "constraints": constraints,
        "readable": readable,
        "leftovers": leftovers,
    }


def epochs(settings: Settings) -> dict[str, int]:
    with psycopg.connect(settings.database_url) as conn:
        return dict(conn.execute("SELECT projection, epoch FROM projection_epochs"))  # type: ignore[arg-type]


def groups(settings: Settings) -> set[str]:
    admin = AdminClient(settings.kafka_client_config())
    listed = admin.list_consumer_groups().result()
    return {g.group_id for g in listed.valid if g.group_id.startswith(settings.app_id)}


def committed(settings: Settings, projection: str) -> dict[tuple[str, int], int]:
    admin = AdminClient(settings.kafka_client_config())
    group = group_id(settings, projection)
    found = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])
    return {
        (tp.topic, tp.partition): tp.offset
        for tp in found[group].result().topic_partitions
    }


def members(settings: Settings, projection: str) -> int:
    admin = AdminClient(settings.kafka_client_config())
    group = group_id(settings, projection)
    return len(admin.describe_consumer_groups([group])[group].result().members)


def positions(settings: Settings, projection: str) -> dict[tuple[str, int], int]:
    rows = query_rows(
        settings.database_url,
        "SELECT topic, partition, next_offset FROM projection_positions "
        "WHERE projection = %s",
        projection,
    )
    return {(t, p): o for t, p, o in rows}


@pytest.mark.slow
def test_replays_rebuild_exactly_what_the_log_holds(deployment: Settings) -> None:
    """One workload (a worker start and a workload cost most of the time), then
    blue/green replays under queries and writes, in-place replays with and without a
    worker, and an offset reset with Kafka's own tool."""
    with running_worker(deployment) as worker, CommandClient(deployment) as client:
        accounts = workload(client, random.Random(11), "rp")
        live = settled(deployment)
        times = checksum(deployment, CUSTOMER_TIMES, "customer_id")
        live = blue_green_while_queries_answer(deployment, client, live, accounts)
        in_place_and_kafka_tool_reset(deployment, worker, live)
        # The customers row is folded order-independently, so it rebuilds exactly.
        assert checksum(deployment, CUSTOMER_TIMES, "customer_id") == times


def blue_green_while_queries_answer(
    deployment: Settings,
    client: CommandClient,
    live: dict[str, str],
    accounts: list[str],
) -> dict[str, str]:
    """Returns the checksums after the deposits made meanwhile."""
    before = catalog(deployment)
    assert before["leftovers"] == []
    assert all(ok for _, ok in before["readable"])
    stable = {a: b[1] for a, b in actual_ledger(deployment)["balances"].items()}
    busy = accounts[:3]

    with Queries(deployment, {a: stable[a] for a in accounts[3:]}, "ord-rp-7") as q:
        # Blue/green rebuilds of both projections side by side, nothing written
        # meanwhile: they give the live tables' exact contents.
        for running in [replays(deployment, p) for p in ("orders", "ledger")]:
            finished(running)
        assert checksums(deployment) == live
        assert epochs(deployment) == {"orders": 1, "ledger": 1}

        # Second rebuilds, while deposits keep landing: orders gives the same
        # contents again; the deposits between the ledger replay's stop and its
        # switch reach the new tables through the running worker.
        running, other = replays(deployment, "ledger"), replays(deployment, "orders")
        sent, n = [], 0
        while running.poll() is None:
            n += 1
            sent.append(client.submit(deposit(busy[n % 3], n, f"during-{n}")))
            time.sleep(0.01)
        finished(running)
        finished(other)
        assert n > 20, "the replay ended before writes could overlap it"
        assert all(r.accepted for r in client.wait(sent, timeout=60))
        eventually_equal(lambda: actual_ledger(deployment), expected_ledger(deployment))
        wait_caught_up(deployment)
        now = checksums(deployment)
        assert {t: now[t] for t in [*TABLES["orders"], "streams:orders"]} == {
            t: live[t] for t in [*TABLES["orders"], "streams:orders"]
        }

    assert q.failures == []
    assert q.answered > 200
    assert catalog(deployment) == before
    assert epochs(deployment) == {"orders": 2, "ledger": 2}
    # The replays' consumer groups are gone; only the live ones remain.
    assert not [g for g in groups(deployment) if ".replay-" in g]
    # The worker's ledger runner recommitted the live group at the new positions.
    eventually_equal(
        lambda: committed(deployment, "ledger"), positions(deployment, "ledger")
    )
    return checksums(deployment)


def in_place_and_kafka_tool_reset(
    deployment: Settings, worker: Daemon, live: dict[str, str]
) -> None:
    # A poison event: dead-lettered once by the live projection, never again by the
    # replays below (the one thing a projection runner sends outward).
    producer = Producer(deployment.producer_config())
    producer.produce(deployment.topics.events("accounts"), b"\x00junk", key=b"x")
    assert producer.flush(30) == 0
    dlq = dead_letter_topic(deployment, "ledger")
    eventually_equal(lambda: len(read_topic(deployment, dlq)), 1)

    # In place with the worker running: its runner finds the new epoch and folds
    # again from the start, rewinding the live group as it commits.
    replay(deployment, "ledger", "--in-place")
    assert checksums(deployment) == live
    eventually_equal(
        lambda: committed(deployment, "ledger"), positions(deployment, "ledger")
    )

    # A stopped worker leaves its groups at once, so Kafka lets tools reset them.
    worker.stop()
    eventually_equal(lambda: members(deployment, "orders"), 0, timeout=15)
    eventually_equal(lambda: members(deployment, "ledger"), 0, timeout=15)

    # In place with no worker: the command folds the projection itself under the
    # live group and leaves the group's offsets at the new positions.
    # Three processes fold it side by side, sharing the partitions.
    replay(deployment, "orders", "--in-place", "--processes", "3")
    assert checksums(deployment) == live
    assert committed(deployment, "orders") == positions(deployment, "orders")

    # Blue/green with no worker: the live group is pointed at the new positions, so
    # the next start neither folds again nor skips anything.
    replay(deployment, "ledger")
    assert checksums(deployment) == live
    assert committed(deployment, "ledger") == positions(deployment, "ledger")
    assert epochs(deployment) == {"orders": 3, "ledger": 4}

    # Kafka's own tool on the stopped projection's group, as the README tells an
    # operator; then rows the log does not explain, which the rebuild must undo.
    reset = streamfold(
        deployment,
        "kafka-tool",
        "consumer-groups",
        "--bootstrap-server",
        deployment.bootstrap_servers,
        "--group",
        f"{deployment.app_id}.projection.orders",
        "--reset-offsets",
        "--to-earliest",
        "--all-topics",
        "--execute",
    )
    assert reset.returncode == 0, reset.stderr
    assert "NEW-OFFSET" in reset.stdout
    assert set(committed(deployment, "orders").values()) == {0}, reset.stdout
    with psycopg.connect(deployment.database_url) as conn:
        conn.execute("DELETE FROM order_items")
        conn.execute("UPDATE order_summaries SET status = 'LOST'")
    assert checksums(deployment) != live

    worker.start(timeout=120)
    eventually_equal(lambda: checksums(deployment), live)
    status = {p["name"]: p for p in wait_caught_up(deployment)["projections"]}
    assert status["orders"]["rebuilt_at"] is not None
    assert status["orders"]["applied"] > 0
    # The ledger resumed where the replay left it: nothing folded twice, nothing
    # skipped (it is at the head).
    assert status["ledger"]["rebuilt_at"] is None
    assert status["ledger"]["applied"] == 0
    assert status["ledger"]["lag_events"] == 0
    assert epochs(deployment) == {"orders": 4, "ledger": 4}
    eventually_equal(
        lambda: committed(deployment, "orders"), positions(deployment, "orders")
    )
    assert [m.value for m in read_topic(deployment, dlq)] == [b"\x00junk"]
