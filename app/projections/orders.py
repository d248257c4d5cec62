"""The order read models: ``order_summaries`` (denormalised, as in the article),
``order_items``, ``customers`` and ``customer_statistics``, and the search documents
of orders (``order_search``) and customers (``customers.search``).

A search document is a generated tsvector (``tables/migrations/0005_search.sql``):
Postgres computes it from its row as the batch writes the row. The projection keeps
the columns it is computed from.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from app.adapters.rows import Rows

Row = dict[str, Any]

# A customer's lifetime value moves with payments and refunds, which name the order,
# not the customer: the order's row supplies the customer (written before this runs).
LIFETIME_VALUE = (
    "INSERT INTO customer_statistics AS s (customer_id, currency, lifetime_value_minor)"
    " SELECT o.customer_id, o.currency, sum(m.amount)"
    " FROM unnest(%(order_id)b::text[], %(amount)b::bigint[]) AS m(order_id, amount)"
    " JOIN order_summaries o ON o.order_id = m.order_id"
    " GROUP BY o.customer_id, o.currency ORDER BY o.customer_id, o.currency"
    " ON CONFLICT (customer_id, currency) DO UPDATE SET"
    " lifetime_value_minor = s.lifetime_value_minor + EXCLUDED.lifetime_value_minor"
)

# An order's SKUs as its items stand once the batch has written them (statements run
# after the tables), in code-point order as ``_skus`` sorts an order's first items.
SKUS = (
    "UPDATE order_search s SET skus = coalesce((SELECT string_agg(i.product_id, ' '"
    ' ORDER BY i.product_id COLLATE "C") FROM order_items i'
    " WHERE i.order_id = s.order_id), '')"
    " WHERE s.order_id = ANY(%(order_id)b::text[])"
)


def _skus(items: list[Row]) -> str:
    return " ".join(sorted(item["product_id"] for item in items))


def _address(address: Row) -> str:
    """The shipping address as one line (a state may be empty)."""
    parts = ("street", "city", "state", "zip_code", "country")
    return ", ".join(address[part] for part in parts if address[part])


def _item(order_id: str, item: Row) -> Row:
    return {
        "order_id": order_id,
        "product_id": item["product_id"],
        "quantity": item["quantity"],
        "unit_price_minor": item["unit_price_minor"],
        "tax_rate_bps": item["tax_rate_bps"],
        "total_price_minor": item["total_price_minor"],
    }


def created(rows: Rows, meta: Row, data: Row) -> None:
    at = meta["timestamp"]
    rows.insert(
        "customers",
        {
            "customer_id": data["customer_id"],
            "name": data["customer_name"],
            "email": data["customer_email"],
            "first_order_at": at,
            "updated_at": at,
        },
    )
    rows.insert(
        "order_summaries",
        {
            "order_id": data["order_id"],
            "customer_id": data["customer_id"],
            "customer_name": data["customer_name"],
            "customer_email": data["customer_email"],
            "status": "CREATED",
            "currency": data["currency"],
            "total_minor": data["total_minor"],
            "paid_minor": 0,
            "items_count": len(data["items"]),
            "account_id": data["account_id"],
            "version": meta["stream_version"],
            "created_at": at,
            "updated_at": at,
        },
    )
    for item in data["items"]:
        rows.insert("order_items", _item(data["order_id"], item))
    rows.insert(
        "order_search",
        {
            "order_id": data["order_id"],
            "customer_id": data["customer_id"],
            "customer_name": data["customer_name"],
            "customer_email": data["customer_email"],
            "skus": _skus(data["items"]),
            "shipping_address": _address(data["shipping_address"]),
        },
    )
    rows.add(
        "customer_statistics",
        {"customer_id": data["customer_id"], "currency": data["currency"]},
        total_orders=1,
    )


def _touch(
    rows: Rows, meta: Row, order_id: str, add: Row | None = None, **values: Any
) -> None:
    rows.update(
        "order_summaries",
        {"order_id": order_id},
        set={
            **values,
            "version": meta["stream_version"],
            "updated_at": meta["timestamp"],
        },
        add=add,
    )


def item_added(rows: Rows, meta: Row, data: Row) -> None:
    rows.insert("order_items", _item(data["order_id"], data["item"]))
    _touch(
        rows,
        meta,
        data["order_id"],
        {"items_count": 1},
        total_minor=data["total_minor"],
    )
    rows.statement(SKUS, order_id=data["order_id"])


def item_removed(rows: Rows, meta: Row, data: Row) -> None:
    rows.delete(
        "order_items", {"order_id": data["order_id"], "product_id": data["product_id"]}
    )
    _touch(
        rows,
        meta,
        data["order_id"],
        {"items_count": -1},
        total_minor=data["total_minor"],
    )
    rows.statement(SKUS, order_id=data["order_id"])


def paid(rows: Rows, meta: Row, data: Row) -> None:
    _touch(rows, meta, data["order_id"], status="PAID", paid_minor=data["amount_minor"])
    rows.statement(
        LIFETIME_VALUE, order_id=data["order_id"], amount=data["amount_minor"]
    )


def shipped(rows: Rows, meta: Row, data: Row) -> None:
    _touch(
        rows,
        meta,
        data["order_id"],
        status="SHIPPED",
        tracking_number=data["tracking_number"],
        carrier=data["carrier"],
    )


def delivered(rows: Rows, meta: Row, data: Row) -> None:
    _touch(rows, meta, data["order_id"], status="DELIVERED")


def cancelled(rows: Rows, meta: Row, data: Row) -> None:
    _touch(
        rows, meta, data["order_id"], status="CANCELLED", cancel_reason=data["reason"]
    )
    if data["refund_due_minor"]:
        rows.statement(
            LIFETIME_VALUE, order_id=data["order_id"], amount=-data["refund_due_minor"]
        )


class OrdersProjection:
    name = "orders"
    areas = ("orders",)
    tables = (
        "order_summaries",
        "order_items",
        "order_search",
        "customers",
        "customer_statistics",
    )
    conflicts = MappingProxyType(
        {
            # Orders of one customer sit on several partitions and are folded in no
            # fixed order, so every column is kept order-independent: the earliest
            # first order, and name and email from the newest one (a replay then
            # rebuilds the same row).
            "customers": "first_order_at = LEAST(t.first_order_at, EXCLUDED.first_order_at),"
            " name = CASE WHEN EXCLUDED.updated_at >= t.updated_at THEN EXCLUDED.name"
            " ELSE t.name END,"
            " email = CASE WHEN EXCLUDED.updated_at >= t.updated_at THEN EXCLUDED.email"
            " ELSE t.email END,"
            " updated_at = GREATEST(t.updated_at, EXCLUDED.updated_at)",
        }
    )
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
