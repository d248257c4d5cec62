"""Faust-table views on the worker: key lookups, routed to the worker owning the key."""

from __future__ import annotations

import dataclasses
import time
import uuid
from datetime import UTC, datetime

import httpx
from confluent_kafka import Producer

from app.adapters.eventlog import partition_for
from app.client import CommandClient
from app.domain import orders
from app.domain.accounts import OpenAccount
from app.domain.orders import CancelOrder, ProcessPayment, ShipOrder
from app.local.deployments import free_port
from app.settings import Settings
from app.workload import deposit, payment
from bench.harness import FramedRecord, domain_events, encode_events
from tests.invariants import serving_worker
from tests.support import codec_for, create_order, get_until, running_worker


def _payment(order_id: str) -> ProcessPayment:
    return payment(order_id, 4200, "p1", "t1", method="paypal")


def test_table_views_follow_the_events(deployment: Settings) -> None:
    base = deployment.web_url
    order, account, customer = (f"{p}-{uuid.uuid4().hex[:6]}" for p in ("o", "a", "c"))
    with running_worker(deployment), CommandClient(deployment) as client:
        client.send(create_order(order, customer))
        client.send(create_order(f"{order}-2", customer))
        client.send(_payment(order))
        client.send(ShipOrder(order_id=order, tracking_number="1Z999", carrier="UPS"))
        client.send(OpenAccount(account_id=account, owner_id="o", currency="USD"))
        client.send(deposit(account, 77, "t", source="s"))
        shipped = get_until(
            f"{base}/orders/{order}",
            lambda r: r.status_code == 200 and r.json()["status"] == "SHIPPED",
        )
        assert shipped.json()["tracking_number"] == "1Z999"
        assert shipped.json()["version"] == 3
        balance = get_until(
            f"{base}/accounts/{account}",
            lambda r: r.status_code == 200 and r.json()["version"] == 2,
        )
        assert balance.json()["balance_minor"] == 77
        page = get_until(
            f"{base}/customers/{customer}/orders?page_size=1",
            lambda r: r.status_code == 200 and r.json()["total_count"] == 2,
        )
        assert len(page.json()["items"]) == 1
        assert httpx.get(f"{base}/orders/nope").status_code == 404
        bad = httpx.get(f"{base}/customers/{customer}/orders?page=minus")
        assert bad.status_code == 400
        assert bad.json()["field"] == "page"


def _owned(settings: Settings) -> set[int]:
    """The order-event partitions this worker's view agents own (and so the
    order views' keys it serves), from its /status."""
    url = f"{settings.web_url}/status"
    topic = settings.topics.events("orders")
    assignment = httpx.get(url, timeout=10).json().get("assignment", [])
    return {p for t, p in assignment if t == topic}


def test_views_are_routed_to_the_worker_owning_the_key(deployment: Settings) -> None:
    second = dataclasses.replace(deployment, web_port=free_port(), projections=())
    orders = [f"o-{n}-{uuid.uuid4().hex[:4]}" for n in range(12)]
    with serving_worker(deployment), serving_worker(second, "second"):
        # Both workers share the partitions (so some keys live only on the other).
        deadline = time.monotonic() + 90
        while not (_owned(deployment) and _owned(second)):
            assert time.monotonic() < deadline, "the workers did not share partitions"
            time.sleep(0.5)
        assert not _owned(deployment) & _owned(second)
        owners = {
            partition_for(order.encode(), deployment.partitions) for order in orders
        }
        assert owners & _owned(deployment) and owners & _owned(second), owners
        with CommandClient(deployment) as client:
            for order in orders:
                assert client.send(create_order(order, "c-routed"), timeout=60).accepted
        # Every key answers on either worker: a non-owner forwards to the owner.
        for port in (deployment.web_port, second.web_port):
            for order in orders:
                found = get_until(
                    f"http://{deployment.web_host}:{port}/orders/{order}",
                    lambda r: r.status_code == 200,
                    timeout=60,
                )
                assert found.json().get("order_id") == order, (port, found.text)


def test_views_fold_a_burst_of_events_per_key(deployment: Settings) -> None:
    """A backlog puts several events of one key, from several partitions, in one
    batch of a view agent: each key's view is still the fold of all its events."""
    base = deployment.web_url
    run = uuid.uuid4().hex[:6]
    accounts = [f"a-{run}-{n}" for n in range(6)]
    customers = [f"c-{run}-{n}" for n in range(2)]
    orders = [f"o-{run}-{n}" for n in range(8)]
    with running_worker(deployment), CommandClient(deployment) as client:
        opened = [
            client.submit(OpenAccount(account_id=a, owner_id="o", currency="USD"))
            for a in accounts
        ]
        created = [
            client.submit(create_order(order, customers[n % 2]))
            for n, order in enumerate(orders)
        ]
        assert all(r.accepted for r in client.wait(opened + created))
        deposits = [
            client.submit(
                deposit(accounts[n % len(accounts)], n + 1, f"t{n}", source="s")
            )
            for n in range(240)
        ]
        payments = [
            client.submit(
                payment(order, 4200, f"p-{order}", f"t-{order}", method="paypal")
            )
            for order in orders
        ]
        assert all(r.accepted for r in client.wait(deposits + payments))

        for index, account in enumerate(accounts):
            amounts = [n + 1 for n in range(240) if n % len(accounts) == index]
            version = len(amounts) + 1
            view = get_until(
                f"{base}/accounts/{account}",
                lambda r, v=version: r.status_code == 200 and r.json()["version"] == v,
            ).json()
            assert view["version"] == len(amounts) + 1
            assert view["balance_minor"] == sum(amounts)
        for index, customer in enumerate(customers):
            mine = sorted(o for n, o in enumerate(orders) if n % 2 == index)
            count = len(mine)
            page = get_until(
                f"{base}/customers/{customer}/orders?page_size=10",
                lambda r, c=count: (
                    r.status_code == 200
                    and {o["status"] for o in r.json()["items"]} == {"PAID"}
                    and r.json()["total_count"] == c
                ),
            ).json()
            assert sorted(o["order_id"] for o in page["items"]) == mine
            assert {o["status"] for o in page["items"]} == {"PAID"}


def test_a_view_that_took_an_aborted_event_heals_from_the_log(
    deployment: Settings,
) -> None:
    """Faust's consumer reads uncommitted records: a view takes the event of a
    transaction that then aborts. When the committed event at that version (another
    event id) arrives, the view is folded again from the committed log."""
    base = deployment.web_url
    order = f"o-heal-{uuid.uuid4().hex[:6]}"
    topic = deployment.topics.events("orders")
    codec = codec_for(deployment)
    created, paid = encode_events(
        codec,
        topic,
        domain_events(
            orders,
            orders.AGGREGATE_TYPE,
            [create_order(order, "c-heal"), _payment(order)],
            start=datetime.now(UTC),
        ),
    )
    [_, cancelled_meta] = domain_events(
        orders,
        orders.AGGREGATE_TYPE,
        [create_order(order, "c-heal"), CancelOrder(order_id=order, reason="aborted")],
        start=datetime.now(UTC),
    )
    # Another command's event at version 2, as a write that aborted would leave.
    cancelled_meta[0]["event_id"] = f"aborted-{order}"
    [cancelled] = encode_events(codec, topic, [cancelled_meta])
    producer = Producer(
        {
            **deployment.producer_config(),
            "transactional.id": f"{deployment.app_id}-heal-test",
        }
    )
    producer.init_transactions(30)

    def write(message: FramedRecord, commit: bool) -> None:
        producer.begin_transaction()
        message.produce_keyed(producer, topic, deployment.partitions)
        producer.flush(30)
        if commit:
            producer.commit_transaction(30)
        else:
            producer.abort_transaction(30)

    with running_worker(deployment):
        write(created, commit=True)
        get_until(f"{base}/orders/{order}", lambda r: r.status_code == 200)
        write(cancelled, commit=False)
        # The aborted event reaches the view (read uncommitted)...
        aborted = get_until(
            f"{base}/orders/{order}", lambda r: r.json().get("version") == 2
        )
        assert aborted.json()["status"] == "CANCELLED", aborted.text
        write(paid, commit=True)
        # ...and the committed one at the same version heals it.
        healed = get_until(
            f"{base}/orders/{order}", lambda r: r.json().get("status") == "PAID"
        )
        assert healed.json()["status"] == "PAID", healed.text
        assert healed.json()["version"] == 2
        assert healed.json()["gap"] is False
        assert healed.json()["event_id"] == paid.command_id  # the event's id
