"""Recompute the read models from the event log, to compare with what Postgres holds.

The fold here is written independently of the projections' SQL, so a test comparing
the two catches a projection that drops, repeats or misapplies an event.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import psycopg

from app.settings import Settings
from tests.support import events_by_aggregate


def _unique(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_version = {e["metadata"]["stream_version"]: e for e in events}
    return [by_version[v] for v in sorted(by_version)]


def expected_ledger(settings: Settings) -> dict[str, Any]:
    balances: dict[str, tuple[Any, ...]] = {}
    transactions = 0
    for account, events in events_by_aggregate(settings, "accounts").items():
        balance, status, version = 0, "OPEN", 0
        currency = ""
        for event in _unique(events):
            kind = event["metadata"]["event_type"]
            version = event["metadata"]["stream_version"]
            if kind == "AccountOpened":
                currency = event["currency"]
            elif kind == "MoneyDeposited":
                balance += event["amount_minor"]
                transactions += 1
            elif kind == "MoneyWithdrawn":
                balance -= event["amount_minor"]
                transactions += 1
            elif kind == "AccountClosed":
                status = "CLOSED"
        balances[account] = (currency, balance, status, version)
    return {"balances": balances, "transactions": transactions}


def actual_ledger(settings: Settings) -> dict[str, Any]:
    with psycopg.connect(settings.query_database_url) as conn:
        rows = conn.execute(
            "SELECT account_id, currency, balance_minor, status, version FROM account_balances"
        ).fetchall()
        (transactions,) = conn.execute("SELECT count(*) FROM transactions").fetchone()  # type: ignore[misc]
    return {
        "balances": {r[0]: tuple(r[1:]) for r in rows},
        "transactions": transactions,
    }


def expected_orders(settings: Settings) -> dict[str, tuple[Any, ...]]:
    orders: dict[str, tuple[Any, ...]] = {}
    for order_id, events in events_by_aggregate(settings, "orders").items():
        status, total, items, version = "", 0, 0, 0
        for event in _unique(events):
            kind = event["metadata"]["event_type"]
            version = event["metadata"]["stream_version"]
            if kind == "OrderCreated":
                status, total, items = (
                    "CREATED",
                    event["total_minor"],
                    len(event["items"]),
                )
            elif kind == "OrderItemAdded":
                total, items = event["total_minor"], items + 1
            elif kind == "OrderItemRemoved":
                total, items = event["total_minor"], items - 1
            elif kind == "PaymentProcessed":
                status = "PAID"
            elif kind == "OrderShipped":
                status = "SHIPPED"
            elif kind == "OrderDelivered":
                status = "DELIVERED"
            elif kind == "OrderCancelled":
                status = "CANCELLED"
        orders[order_id] = (status, total, items, version)
    return orders


def actual_orders(settings: Settings) -> dict[str, tuple[Any, ...]]:
    with psycopg.connect(settings.query_database_url) as conn:
        rows = conn.execute(
            "SELECT order_id, status, total_minor, items_count, version FROM order_summaries"
        ).fetchall()
    return {r[0]: tuple(r[1:]) for r in rows}


def checksum(settings: Settings, table: str, order_by: str) -> str:
    """A digest of a whole table's contents, for comparing two builds of it."""
    with psycopg.connect(settings.query_database_url) as conn:
        (digest,) = conn.execute(
            f"SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY {order_by}), '')) "  # noqa: S608 - test-only identifiers
            f"FROM {table} t"
        ).fetchone()  # type: ignore[misc]
    return str(digest)


def wait_caught_up(settings: Settings, timeout: float = 60.0) -> dict[str, Any]:
    """Poll the worker's /status until every projection has no lag left."""
    url = f"http://{settings.web_host}:{settings.web_port}/status"
    deadline = time.monotonic() + timeout
    document: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            document = httpx.get(url, timeout=5).json()
        except httpx.HTTPError:
            time.sleep(0.2)
            continue
        projections = document.get("projections", [])
        if projections and all(
            p["lag_events"] == 0
            and all(pos["head"] is not None for pos in p["positions"])
            for p in projections
        ):
            return document
        time.sleep(0.2)
    raise AssertionError(
        f"projections not caught up in {timeout}s: {json.dumps(document)}"
    )
