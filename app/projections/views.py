"""Pure folds behind the Faust-table views: event dicts in, JSON-ready dicts out.

A repeated event (same or older stream version) returns ``None`` and changes nothing;
a skipped version is flagged ``gap`` rather than hidden. ``needs_healing`` says when a
view must be folded again from the aggregate's committed events (``refold``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from app import params as checked

Row = dict[str, Any]
STATUS = {
    "PaymentProcessed": "PAID",
    "OrderShipped": "SHIPPED",
    "OrderDelivered": "DELIVERED",
    "OrderCancelled": "CANCELLED",
}


# What a view copies from the event that created its aggregate.
_CREATED_ORDER = (
    "order_id",
    "customer_id",
    "customer_name",
    "customer_email",
    "currency",
    "total_minor",
)
_OPENED_ACCOUNT = ("account_id", "owner_id", "currency", "overdraft_limit_minor")

# Orders the customer-orders view keeps per customer (see ``upsert_order``).
KEEP_ORDERS = 500


def _next(current: Row | None, meta: Row) -> Row | None:
    version = meta["stream_version"]
    if current is not None and version <= current["version"]:
        return None
    row = dict(current or {})
    expected = (current["version"] if current else 0) + 1
    row["gap"] = bool(row.get("gap")) or version != expected
    row["version"] = version
    row["event_id"] = meta["event_id"]
    row["updated_at"] = meta["timestamp"].isoformat()
    return row


def needs_healing(current: Row | None, meta: Row, folded: Row | None) -> bool:
    """Whether folding ``meta``'s event into ``current`` (giving ``folded``) shows
    the view was built from something other than the committed log: a version
    skipped (a gap that was not there before), or another event than the one
    folded at this version (the one folded was in a transaction that aborted; the
    write side's retry of the same command has the same event id)."""
    if folded is not None:
        return bool(folded["gap"]) and not (current or {}).get("gap")
    return (
        current is not None
        and current["version"] == meta["stream_version"]
        and current.get("event_id") not in (None, meta["event_id"])
    )


def refold(
    fold_view: Callable[[Row | None, Row, Row], Row | None],
    events: Iterable[tuple[Row, Row]],
) -> Row | None:
    """A view folded afresh from an aggregate's events (metadata, data), in order."""
    row = None
    for meta, data in events:
        row = fold_view(row, meta, data) or row
    return row


def _fold(
    step: Callable[[Row, str, Row, Row], None],
) -> Callable[[Row | None, Row, Row], Row | None]:
    """A view's fold from its ``step``, which changes the row (a copy, versioned by
    ``_next``) for one event: (row, event type, metadata, data). A repeated event
    changes nothing (None)."""

    def fold(current: Row | None, meta: Row, data: Row) -> Row | None:
        row = _next(current, meta)
        if row is not None:
            step(row, meta["event_type"], meta, data)
        return row

    return fold


@_fold
def fold_order(row: Row, kind: str, meta: Row, data: Row) -> None:
    if kind == "OrderCreated":
        row.update(
            {n: data[n] for n in _CREATED_ORDER},
            status="CREATED",
            items_count=len(data["items"]),
            created_at=meta["timestamp"].isoformat(),
        )
    elif "order_id" not in row:
        # Without its creation this order cannot be shown; the gap flag says so.
        row.update(
            order_id=meta["aggregate_id"], customer_id="", status="UNKNOWN", gap=True
        )
    if kind in ("OrderItemAdded", "OrderItemRemoved"):
        row["total_minor"] = data["total_minor"]
        row["items_count"] = row.get("items_count", 0) + (
            1 if kind == "OrderItemAdded" else -1
        )
    if kind in STATUS:
        row["status"] = STATUS[kind]
    if kind == "OrderShipped":
        row.update(tracking_number=data["tracking_number"], carrier=data["carrier"])
    if kind == "OrderCancelled":
        row["cancel_reason"] = data["reason"]


def upsert_order(current: Row | list[Row] | None, summary: Row) -> Row:
    """A customer's ``KEEP_ORDERS`` most recent orders, newest first, with ``summary``
    in its place; ``truncated`` once an older one was let go (it stays in Postgres).
    A table value is one Kafka message: a list of every order would outgrow its 1 MiB
    (at ~3,000 orders of ~350 bytes), and its changelog record could no longer be
    written."""
    held = _customer(current)
    kept = [o for o in held["orders"] if o["order_id"] != summary["order_id"]]
    kept.append(summary)
    kept.sort(key=lambda o: (o.get("created_at", ""), o["order_id"]), reverse=True)
    return {
        "orders": kept[:KEEP_ORDERS],
        "truncated": held["truncated"] or len(kept) > KEEP_ORDERS,
    }


def _customer(current: Row | list[Row] | None) -> Row:
    if current is None:
        return {"orders": [], "truncated": False}
    if isinstance(current, list):  # written before the view was bounded
        return {"orders": current, "truncated": False}
    return current


@_fold
def fold_account(row: Row, kind: str, meta: Row, data: Row) -> None:
    if kind == "AccountOpened":
        row.update(
            {n: data[n] for n in _OPENED_ACCOUNT}, balance_minor=0, status="OPEN"
        )
    elif "account_id" not in row:
        row.update(account_id=meta["aggregate_id"], status="UNKNOWN", gap=True)
    if kind in ("MoneyDeposited", "MoneyWithdrawn"):
        row["balance_minor"] = data["balance_after_minor"]
    if kind == "AccountClosed":
        row["status"] = "CLOSED"


def page(current: Row | list[Row] | None, params: Mapping[str, str]) -> Row:
    """One page of a customer's orders; ``BadParameter`` for a bad or absent page."""
    wanted = checked.page(params)
    held = _customer(current)
    items = held["orders"]
    wanted.within(len(items))
    return {
        "items": items[wanted.offset : wanted.offset + wanted.size],
        "total_count": len(items),
        "page": wanted.number,
        "page_size": wanted.size,
        # Older orders than these are in the Postgres view (/query/customers/...).
        "truncated": held["truncated"],
    }
