"""The customer-orders Faust view stays one bounded table value however many orders a
customer places, and says when older orders live only in Postgres."""

from __future__ import annotations

import json
from typing import Any

from app.projections.views import KEEP_ORDERS, page, upsert_order


def summary(n: int, status: str = "CREATED") -> dict[str, Any]:
    return {
        "order_id": f"o-{n:05d}",
        "customer_id": "c-1",
        "customer_name": "A Customer With A Long Name",
        "customer_email": "customer@example.com",
        "status": status,
        "currency": "USD",
        "total_minor": 12_345,
        "items_count": 3,
        "version": 1,
        "gap": False,
        "created_at": f"2026-01-01T00:00:00.{n:06d}+00:00",
        "updated_at": f"2026-01-01T00:00:00.{n:06d}+00:00",
    }


def test_a_customer_with_many_orders_keeps_the_newest_in_one_small_value() -> None:
    value: Any = None
    for n in range(5_000):
        value = upsert_order(value, summary(n))
    assert len(value["orders"]) == KEEP_ORDERS
    assert value["truncated"] is True
    assert [o["order_id"] for o in value["orders"][:2]] == ["o-04999", "o-04998"]
    assert value["orders"][-1]["order_id"] == f"o-{5_000 - KEEP_ORDERS:05d}"
    # One Kafka message (the table's changelog record) holds it with room to spare.
    assert len(json.dumps(value).encode()) < 512 * 1024

    # A kept order changes in place; an order let go does not come back.
    value = upsert_order(value, summary(4_990, "PAID"))
    value = upsert_order(value, summary(3, "DELIVERED"))
    assert len(value["orders"]) == KEEP_ORDERS
    assert {o["order_id"]: o["status"] for o in value["orders"]}["o-04990"] == "PAID"
    assert "o-00003" not in {o["order_id"] for o in value["orders"]}


def test_few_orders_are_all_kept_and_pages_say_whether_older_ones_exist() -> None:
    value: Any = None
    for n in range(3):
        value = upsert_order(value, summary(n))
    value = upsert_order(value, summary(1, "SHIPPED"))
    shown = page(value, {"page": "0", "page_size": "2"})
    assert [o["order_id"] for o in shown["items"]] == ["o-00002", "o-00001"]
    assert shown["items"][1]["status"] == "SHIPPED"
    assert (shown["total_count"], shown["truncated"]) == (3, False)


def test_a_value_written_before_the_bound_is_read_and_upgraded() -> None:
    legacy = [summary(2), summary(1)]
    assert page(legacy, {})["total_count"] == 2
    upgraded = upsert_order(legacy, summary(3))
    assert [o["order_id"] for o in upgraded["orders"]] == [
        "o-00003",
        "o-00002",
        "o-00001",
    ]
    assert upgraded["truncated"] is False
    assert page(None, {})["items"] == []
