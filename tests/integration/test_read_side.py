"""The read side against the real broker and Postgres: read models equal the fold of
the log, query views behave, read-your-writes, lag, poison events, faults."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import signal
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
from confluent_kafka import Producer

from app.client import CommandClient
from app.domain.accounts import OpenAccount
from app.domain.orders import (
    CancelOrder,
    CreateOrder,
    DeliverOrder,
    LineItem,
    ShipOrder,
)
from app.local import deployments, postgres
from app.local.process import pid_alive, wait_for
from app.projections.process import PROJECTIONS_NAME
from app.settings import Settings
from app.workload import deposit, ledger_traffic, new_order, payment
from bench.harness import process_tree
from tests.readmodels import (
    actual_ledger,
    actual_orders,
    expected_ledger,
    expected_orders,
)
from tests.support import eventually_equal, get_until, read_topic, running_worker


def _order(order_id: str, customer: str, price: int) -> CreateOrder:
    items = (
        LineItem(product_id="p-1", quantity=1, unit_price_minor=price),
        LineItem(product_id="p-2", quantity=3, unit_price_minor=250, tax_rate_bps=1000),
    )
    return new_order(
        order_id,
        customer,
        items,
        name=f"Customer {customer}",
        email=f"{customer}@example.com",
    )


def mixed_workload(
    client: CommandClient, rng: random.Random, orders: int = 30, accounts: int = 10
) -> None:
    """Orders through their whole life and a busy ledger, in a seeded random mix."""
    ids = []
    sent: list[str] = []
    for n in range(accounts):
        account = f"acc-{n}-{uuid.uuid4().hex[:4]}"
        ids.append(account)
        sent.append(
            client.submit(
                OpenAccount(account_id=account, owner_id=f"o{n}", currency="USD")
            )
        )
    for command in ledger_traffic(rng, ids, accounts * 8, deposits=0.6, most=900):
        sent.append(client.submit(command))
    for n in range(orders):
        order = f"ord-{n}-{uuid.uuid4().hex[:4]}"
        price = rng.randint(100, 5000)
        created = client.send(_order(order, f"cust-{n % 5}", price))
        assert created.accepted, created
        total = 1 * price + 750 + 75
        steps = rng.choice(["created", "paid", "shipped", "delivered", "cancelled"])
        if steps in ("paid", "shipped", "delivered", "cancelled"):
            sent.append(client.submit(payment(order, total, f"pay-{n}", f"tx-{n}")))
        if steps in ("shipped", "delivered"):
            sent.append(
                client.submit(
                    ShipOrder(order_id=order, tracking_number=f"TRK{n}", carrier="UPS")
                )
            )
        if steps == "delivered":
            sent.append(client.submit(DeliverOrder(order_id=order)))
        if steps == "cancelled":
            sent.append(
                client.submit(CancelOrder(order_id=order, reason="changed mind"))
            )
    client.wait(sent, timeout=120)


def test_read_models_equal_the_fold_of_the_log(deployment: Settings) -> None:
    rng = random.Random(3)
    with running_worker(deployment), CommandClient(deployment) as client:
        mixed_workload(client, rng)
        eventually_equal(lambda: actual_ledger(deployment), expected_ledger(deployment))
        eventually_equal(lambda: actual_orders(deployment), expected_orders(deployment))
    with psycopg.connect(deployment.query_database_url) as conn:
        stats = conn.execute(
            "SELECT sum(total_orders) FROM customer_statistics"
        ).fetchone()
        assert stats == (30,)


def test_query_views_read_your_writes_and_errors(deployment: Settings) -> None:
    base = deployment.web_url
    account = f"acc-{uuid.uuid4().hex[:6]}"
    order = f"ord-{uuid.uuid4().hex[:6]}"
    with running_worker(deployment), CommandClient(deployment) as client:
        client.send(OpenAccount(account_id=account, owner_id="o", currency="USD"))
        deposited = client.send(
            deposit(account, 1234, "t1", reference="<script>alert(1)</script>")
        )
        created = client.send(_order(order, "cust-rw", 1000))

        # With ``after``, an answer either holds the write or says it is stale
        # (the projection did not get there within STREAMFOLD_QUERY_WAIT, 2 s: on a
        # busy machine it may not); the first answer not stale holds it.
        def fresh(response: httpx.Response) -> bool:
            return response.status_code == 200 and response.json()["stale"] is False

        balance = get_until(
            f"{base}/query/accounts/{account}"
            f"?after={deposited.partition}:{deposited.offset}",
            fresh,
        ).json()
        assert balance["balance_minor"] == 1234
        assert balance["stale"] is False
        summary = get_until(
            f"{base}/query/orders/{order}?after={created.partition}:{created.offset}",
            fresh,
        ).json()
        assert summary["status"] == "CREATED"
        assert summary["total_minor"] == 1000 + 750 + 75
        assert [i["product_id"] for i in summary["items"]] == ["p-1", "p-2"]
        history = httpx.get(
            f"{base}/query/accounts/{account}/transactions",
            params={"page": 0, "page_size": 1},
        ).json()
        assert history["total_count"] == 1
        assert history["items"][0]["reference"] == "<script>alert(1)</script>"
        mine = httpx.get(f"{base}/query/customers/cust-rw/orders").json()
        assert mine["total_count"] == 1
        assert mine["statistics"][0]["total_orders"] == 1
        found = httpx.get(
            f"{base}/query/orders",
            params={"status": "CREATED", "customer_id": "cust-rw"},
        ).json()
        assert [o["order_id"] for o in found["items"]] == [order]
        report = httpx.get(
            f"{base}/query/reports/daily", params={"currency": "USD"}
        ).json()
        assert sum(day["deposits_minor"] for day in report["items"]) == 1234

        # A position the projection cannot reach in time is answered, marked stale.
        stale = httpx.get(
            f"{base}/query/accounts/{account}",
            params={"after": f"{deposited.partition}:{deposited.offset + 10_000}"},
            timeout=deployment.query_wait_s + 30,
        )
        assert stale.status_code == 200
        assert stale.json()["stale"] is True

        missing = httpx.get(f"{base}/query/orders/no-such-order")
        assert missing.status_code == 404
        assert "no-such-order" in missing.json()["error"]
        for path, params, field in [
            ("/query/customers/cust-rw/orders", {"page_size": "1000"}, "page_size"),
            ("/query/customers/cust-rw/orders", {"page": "-1"}, "page"),
            ("/query/orders", {"status": "LOST"}, "status"),
            ("/query/orders", {"from": "yesterday"}, "from"),
            ("/query/orders", {"customer_id": "x' OR '1'='1"}, None),
            (f"/query/accounts/{account}", {"after": "zero"}, "after"),
        ]:
            response = httpx.get(base + path, params=params)
            body = response.text
            assert "Traceback" not in body and "SELECT" not in body
            assert "order_summaries" not in body
            if field is None:
                assert response.status_code == 200
                assert response.json()["items"] == []
            else:
                assert response.status_code == 400, (path, params)
                assert response.json()["field"] == field


def test_lag_is_reported_in_status_and_metrics(deployment: Settings) -> None:
    base = deployment.web_url
    with running_worker(deployment), CommandClient(deployment) as client:
        client.send(OpenAccount(account_id="acc-lag", owner_id="o", currency="USD"))
        eventually_equal(lambda: actual_ledger(deployment), expected_ledger(deployment))

        def ledger() -> tuple[int, int]:
            status = httpx.get(f"{base}/status").json()
            found = next(p for p in status["projections"] if p["name"] == "ledger")
            return found["applied"], found["lag_events"]

        # Lag is sampled: it reaches 0 once the projection has read past the
        # transaction's commit marker, a moment after it applied the event.
        eventually_equal(ledger, (1, 0))
        metrics = httpx.get(f"{base}/metrics").text
        assert 'streamfold_projection_lag_events{projection="ledger"} 0' in metrics
        assert 'streamfold_projection_events_total{projection="ledger"} 1' in metrics


def test_poison_events_are_dead_lettered_and_the_projection_goes_on(
    deployment: Settings,
) -> None:
    from app.projections.engine import dead_letter_topic

    producer = Producer(deployment.producer_config())
    producer.produce(
        deployment.topics.events("accounts"),
        b"\x00\x00\x00\x00\x07junk",
        key=b"acc-poison",
    )
    assert producer.flush(30) == 0
    with running_worker(deployment), CommandClient(deployment) as client:
        client.send(OpenAccount(account_id="acc-after", owner_id="o", currency="USD"))
        eventually_equal(
            lambda: "acc-after" in actual_ledger(deployment)["balances"], True
        )
    dead = read_topic(deployment, dead_letter_topic(deployment, "ledger"))
    assert len(dead) == 1
    assert dead[0].value == b"\x00\x00\x00\x00\x07junk"
    assert b"schema id 7" in dead[0].headers["dlq-reason"]


def test_postgres_restart_and_worker_kill_keep_read_models_exact(
    registry_settings: Settings,
) -> None:
    """The server restarted is a cluster of the test's own: the one every other test
    (and test process) uses goes on."""
    rng = random.Random(5)
    from app.local.worker import WorkerProcess

    with deployments.private_postgres(registry_settings) as (own, cluster):
        port = postgres.Conninfo.parse(own.database_url).port
        deployment = deployments.create(own)
        worker = WorkerProcess(deployment)
        worker.start(timeout=120)
        try:
            with CommandClient(deployment) as client:
                ids = []
                for n in range(20):
                    ids.append(
                        client.submit(
                            OpenAccount(
                                account_id=f"pg-{n}", owner_id="o", currency="USD"
                            )
                        )
                    )
                for n in range(600):
                    ids.append(
                        client.submit(
                            deposit(
                                f"pg-{rng.randrange(20)}",
                                rng.randint(1, 100),
                                f"t{n}",
                                source="s",
                            )
                        )
                    )
                    if n == 200:
                        postgres.stop(mode="immediate", cluster=cluster)
                        postgres.ensure_running(port, cluster)
                    if n == 400:
                        worker.stop(kill=True)
                        worker.start(timeout=120)
                client.wait(ids, timeout=180)
            eventually_equal(
                lambda: actual_ledger(deployment), expected_ledger(deployment), 120
            )
        finally:
            worker.stop()
            deployments.remove(deployment)


def test_an_internal_failure_is_a_generic_500_with_a_correlation_id(
    deployment: Settings,
) -> None:
    base = deployment.web_url
    with running_worker(deployment):
        with psycopg.connect(deployment.database_url) as conn:
            conn.execute("ALTER TABLE order_summaries RENAME TO order_summaries_gone")
        response = httpx.get(f"{base}/query/orders/o-1")
    assert response.status_code == 500
    body = response.json()
    assert body["error"] == "internal error"
    assert uuid.UUID(body["correlation_id"])
    assert "order_summaries" not in response.text
    assert "Traceback" not in response.text


def _projection_processes(worker: int, count: int) -> list[int]:
    """The pids of the worker's ``count`` projection processes (its children
    running the spawn entry)."""
    found: list[int] = []

    def started() -> bool:
        found[:] = []
        for pid in process_tree(worker)()[1:]:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == PROJECTIONS_NAME:
                    found.append(pid)
        return len(found) == count

    wait_for(started, 60, f"worker {worker}'s {count} projection processes")
    return list(found)


def test_projections_run_in_children_that_restart_and_die_with_the_worker(
    deployment: Settings,
) -> None:
    from app.local.worker import WorkerProcess

    # Two processes share each projection's partitions.
    deployment = dataclasses.replace(deployment, projection_processes=2)

    base = deployment.web_url
    account = f"acc-{uuid.uuid4().hex[:6]}"

    def errors() -> set[str | None]:
        status = httpx.get(f"{base}/status").json()
        return {p["error"] for p in status["projections"]}

    worker = WorkerProcess(deployment)
    worker.start(timeout=120)
    try:
        pid = worker.pid()
        assert pid is not None
        first = _projection_processes(pid, 2)
        with CommandClient(deployment) as client:
            client.send(OpenAccount(account_id=account, owner_id="o", currency="USD"))
            os.kill(first[0], signal.SIGKILL)
            # Named in the status until the new process reports, then cleared.
            eventually_equal(
                lambda: any("projection process exited" in (e or "") for e in errors()),
                True,
                timeout=10,
            )
            eventually_equal(errors, {None})
            second = _projection_processes(pid, 2)
            assert first[0] not in second and first[1] in second
            deposited = client.send(deposit(account, 700, "t1"))

            def balance() -> Any:
                body = httpx.get(
                    f"{base}/query/accounts/{account}",
                    params={"after": f"{deposited.partition}:{deposited.offset}"},
                ).json()
                return (body.get("balance_minor"), body.get("stale"))

            # The killed process's consumers hold their partitions until the
            # session times out; then the new one catches up and answers fresh.
            eventually_equal(balance, (700, False))
        worker.stop(kill=True)
        wait_for(
            lambda: not any(pid_alive(child) for child in second),
            10,
            "the projection processes to die with the worker",
        )
    finally:
        worker.stop()
