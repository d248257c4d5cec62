"""The order read models: ``order_summaries`` (denormalised, as in the article),
``order_items``, ``customers`` and ``customer_statistics``."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from psycopg import Cursor

Row = dict[str, Any]


def created(cur: Cursor[Any], meta: Row, data: Row) -> None:
    at = meta["timestamp"]
    cur.execute(
        # Orders of one customer sit on several partitions and are folded in no fixed
        # order, so every column is kept order-independent: the earliest first order,
        # and name and email from the newest one (a replay then rebuilds the same row).
        "INSERT INTO customers AS c (customer_id, name, email, first_order_at, updated_at)"
        " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (customer_id) DO UPDATE SET"
        " first_order_at = LEAST(c.first_order_at, EXCLUDED.first_order_at),"
        " name = CASE WHEN EXCLUDED.updated_at >= c.updated_at THEN EXCLUDED.name"
        " ELSE c.name END,"
        " email = CASE WHEN EXCLUDED.updated_at >= c.updated_at THEN EXCLUDED.email"
        " ELSE c.email END,"
        " updated_at = GREATEST(c.updated_at, EXCLUDED.updated_at)",
        (data["customer_id"], data["customer_name"], data["customer_email"], at, at),
    )
    cur.execute(
        "INSERT INTO order_summaries (order_id, customer_id, customer_name, customer_email,"
        " status, currency, total_minor, items_count, account_id, version, created_at,"
        " updated_at) VALUES (%s, %s, %s, %s, 'CREATED', %s, %s, %s, %s, %s, %s, %s)",
        (
            data["order_id"],
            data["customer_id"],
            data["customer_name"],
            data["customer_email"],
            data["currency"],
            data["total_minor"],
            len(data["items"]),
            data["account_id"],
            meta["stream_version"],
            at,
            at,
        ),
    )
    cur.executemany(
        "INSERT INTO order_items (order_id, product_id, quantity, unit_price_minor,"
        " tax_rate_bps, total_price_minor) VALUES (%s, %s, %s, %s, %s, %s)",
        [
            (
                data["order_id"],
                i["product_id"],
                i["quantity"],
                i["unit_price_minor"],
                i["tax_rate_bps"],
                i["total_price_minor"],
            )
            for i in data["items"]
        ],
    )
    cur.execute(
        "INSERT INTO customer_statistics (customer_id, currency, total_orders) "
        "VALUES (%s, %s, 1) ON CONFLICT (customer_id, currency) DO UPDATE SET "
        "total_orders = customer_statistics.total_orders + 1",
        (data["customer_id"], data["currency"]),
    )


def _touch(
    cur: Cursor[Any],
    meta: Row,
    order_id: str,
    assignments: str,
    values: tuple[Any, ...] = (),
) -> None:
    cur.execute(
        f"UPDATE order_summaries SET {assignments}, version = %s, updated_at = %s "  # noqa: S608 - fixed column lists from this module
        "WHERE order_id = %s",
        (*values, meta["stream_version"], meta["timestamp"], order_id),
    )


def item_added(cur: Cursor[Any], meta: Row, data: Row) -> None:
    item = data["item"]
    cur.execute(
        "INSERT INTO order_items (order_id, product_id, quantity, unit_price_minor,"
        " tax_rate_bps, total_price_minor) VALUES (%s, %s, %s, %s, %s, %s)",
        (
            data["order_id"],
            item["product_id"],
            item["quantity"],
            item["unit_price_minor"],
            item["tax_rate_bps"],
            item["total_price_minor"],
        ),
    )
    _touch(
        cur,
        meta,
        data["order_id"],
        "total_minor = %s, items_count = items_count + 1",
        (data["total_minor"],),
    )


def item_removed(cur: Cursor[Any], meta: Row, data: Row) -> None:
    cur.execute(
        "DELETE FROM order_items WHERE order_id = %s AND product_id = %s",
        (data["order_id"], data["product_id"]),
    )
    _touch(
        cur,
        meta,
        data["order_id"],
        "total_minor = %s, items_count = items_count - 1",
        (data["total_minor"],),
    )


def paid(cur: Cursor[Any], meta: Row, data: Row) -> None:
    _touch(
        cur,
        meta,
        data["order_id"],
        "status = 'PAID', paid_minor = %s",
        (data["amount_minor"],),
    )
    cur.execute(
        "UPDATE customer_statistics s SET lifetime_value_minor = lifetime_value_minor + %s "
        "FROM order_summaries o WHERE o.order_id = %s AND s.customer_id = o.customer_id "
        "AND s.currency = o.currency",
        (data["amount_minor"], data["order_id"]),
    )


def shipped(cur: Cursor[Any], meta: Row, data: Row) -> None:
    _touch(
        cur,
        meta,
        data["order_id"],
        "status = 'SHIPPED', tracking_number = %s, carrier = %s",
        (data["tracking_number"], data["carrier"]),
    )


def delivered(cur: Cursor[Any], meta: Row, data: Row) -> None:
    _touch(cur, meta, data["order_id"], "status = 'DELIVERED'")


def cancelled(cur: Cursor[Any], meta: Row, data: Row) -> None:
    _touch(
        cur,
        meta,
        data["order_id"],
        "status = 'CANCELLED', cancel_reason = %s",
        (data["reason"],),
    )
    if data["refund_due_minor"]:
        cur.execute(
            "UPDATE customer_statistics s SET lifetime_value_minor = "
            "lifetime_value_minor - %s FROM order_summaries o WHERE o.order_id = %s "
            "AND s.customer_id = o.customer_id AND s.currency = o.currency",
            (data["refund_due_minor"], data["order_id"]),
        )


class OrdersProjection:
    name = "orders"
    areas = ("orders",)
    tables = ("order_summaries", "order_items", "customers", "customer_statistics")
    handlers = MappingProxyType(
        {
            "OrderCreated": created,
            "OrderItemAdded": item_added,
            "OrderItemRemoved": item_removed,
            "PaymentProcessed": paid,
            "OrderShipped": shipped,
            "OrderDelivered": delivered,
            "OrderCancelled": cancelled,
        }
    )
