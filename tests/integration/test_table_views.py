"""Faust-table views on the worker: key lookups, routed to the worker owning the key."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx

from app.client import CommandClient
from app.domain.accounts import Deposit, OpenAccount
from app.domain.orders import Address, CreateOrder, LineItem, ProcessPayment, ShipOrder
from app.settings import Settings
from tests.support import running_worker


def _get(url: str, until: Any, timeout: float = 30.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    response = httpx.get(url, timeout=10)
    while not until(response) and time.monotonic() < deadline:
        time.sleep(0.2)
        response = httpx.get(url, timeout=10)
    return response


def _create(order_id: str, customer: str) -> CreateOrder:
    return CreateOrder(
        order_id=order_id,
        customer_id=customer,
        customer_name="Grace Hopper",
        customer_email="grace@example.com",
        items=(LineItem(product_id="cobol", quantity=1, unit_price_minor=4200),),
        currency="USD",
        shipping_address=Address(
            street="1 Navy Way",
            city="Arlington",
            state="VA",
            zip_code="22202",
            country="US",
        ),
    )


def test_table_views_follow_the_events(deployment: Settings) -> None:
    base = f"http://{deployment.web_host}:{deployment.web_port}"
    order, account, customer = (f"{p}-{uuid.uuid4().hex[:6]}" for p in ("o", "a", "c"))
    with running_worker(deployment), CommandClient(deployment) as client:
        client.send(_create(order, customer))
        client.send(_create(f"{order}-2", customer))
        client.send(
            ProcessPayment(
                order_id=order,
                payment_id="p1",
                amount_minor=4200,
                currency="USD",
                method="paypal",
                transaction_id="t1",
            )
        )
        client.send(ShipOrder(order_id=order, tracking_number="1Z999", carrier="UPS"))
        client.send(OpenAccount(account_id=account, owner_id="o", currency="USD"))
        client.send(
            Deposit(
                account_id=account,
                transaction_id="t",
                amount_minor=77,
                currency="USD",
                source="s",
                reference="",
            )
        )
        shipped = _get(
            f"{base}/orders/{order}",
            lambda r: r.status_code == 200 and r.json()["status"] == "SHIPPED",
        )
        assert shipped.json()["tracking_number"] == "1Z999"
        assert shipped.json()["version"] == 3
        balance = _get(
            f"{base}/accounts/{account}",
            lambda r: r.status_code == 200 and r.json()["version"] == 2,
        )
        assert balance.json()["balance_minor"] == 77
        page = _get(
            f"{base}/customers/{customer}/orders?page_size=1",
            lambda r: r.status_code == 200 and r.json()["total_count"] == 2,
        )
        assert len(page.json()["items"]) == 1
        assert httpx.get(f"{base}/orders/nope").status_code == 404
        bad = httpx.get(f"{base}/customers/{customer}/orders?page=minus")
        assert bad.status_code == 400
        assert bad.json()["field"] == "page"
