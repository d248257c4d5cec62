"""The query side over Postgres: read-only SQL behind validated parameters.

Runs as the read-only role; never touches the write side. Parameters are checked
with ``app.params`` and refused with ``BadParameter`` naming the field, so the HTTP
layer stays thin.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row

from app import params as checked

ORDER_STATUSES = ("CREATED", "PAID", "SHIPPED", "DELIVERED", "CANCELLED")
MAX_LIMIT = 500


class NotFound(LookupError):
    pass


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v.isoformat() if isinstance(v, datetime | date) else v
        for k, v in row.items()
    }


def _paged(
    rows: list[dict[str, Any]], total: int, page: checked.Page
) -> dict[str, Any]:
    """One page of ``rows`` and where it stands among ``total``."""
    return {
        "items": [_jsonable(r) for r in rows],
        "total_count": total,
        "page": page.number,
        "page_size": page.size,
    }


ORDER_COLUMNS = (
    "order_id, customer_id, customer_name, customer_email, status, currency, total_minor,"
    " paid_minor, items_count, tracking_number, carrier, cancel_reason, account_id,"
    " version, created_at, updated_at"
)


async def order(conn: AsyncConnection[Any], order_id: str) -> dict[str, Any]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {ORDER_COLUMNS} FROM order_summaries WHERE order_id = %s",  # noqa: S608 - constant column list
            (order_id,),
        )
        row = await cur.fetchone()
        if row is None:
            raise NotFound(f"order {order_id} not found")
        await cur.execute(
            "SELECT product_id, quantity, unit_price_minor, tax_rate_bps, total_price_minor"
            " FROM order_items WHERE order_id = %s ORDER BY product_id",
            (order_id,),
        )
        items = await cur.fetchall()
    return {**_jsonable(row), "items": items}


async def customer_orders(
    conn: AsyncConnection[Any], customer_id: str, params: Mapping[str, str]
) -> dict[str, Any]:
    page = checked.page(params)
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT count(*) AS n FROM order_summaries WHERE customer_id = %s",
            (customer_id,),
        )
        total = (await cur.fetchone() or {"n": 0})["n"]
        if not total:
            raise NotFound(f"customer {customer_id} has no orders")
        page.within(total)
        await cur.execute(
            f"SELECT {ORDER_COLUMNS} FROM order_summaries WHERE customer_id = %s"  # noqa: S608 - constant column list
            " ORDER BY created_at DESC, order_id LIMIT %s OFFSET %s",
            (customer_id, page.size, page.offset),
        )
        rows = await cur.fetchall()
        await cur.execute(
            "SELECT currency, total_orders, lifetime_value_minor FROM customer_statistics"
            " WHERE customer_id = %s ORDER BY currency",
            (customer_id,),
        )
        statistics = await cur.fetchall()
    return {
        "customer_id": customer_id,
        **_paged(rows, total, page),
        "statistics": statistics,
    }


async def search_orders(
    conn: AsyncConnection[Any], params: Mapping[str, str]
) -> dict[str, Any]:
    status = checked.choice(params, "status", ORDER_STATUSES)
    customer = checked.optional_identifier(params, "customer_id")
    since, until = checked.timestamp(params, "from"), checked.timestamp(params, "to")
    checked.in_order("from", since, "to", until)
    limit = checked.integer(params, "limit", 100, 1, MAX_LIMIT)
    clauses, values = [], []
    for clause, value in (
        ("status = %s", status),
        ("customer_id = %s", customer),
        ("created_at >= %s", since),
        ("created_at <= %s", until),
    ):
        if value is not None:
            clauses.append(clause)
            values.append(value)
    where = " AND ".join(clauses) or "TRUE"
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {ORDER_COLUMNS} FROM order_summaries WHERE {where}"  # noqa: S608 - clauses are constants above
            " ORDER BY created_at DESC, order_id LIMIT %s",
            (*values, limit),
        )
        rows = await cur.fetchall()
    return {"items": [_jsonable(r) for r in rows], "limit": limit}


async def account(conn: AsyncConnection[Any], account_id: str) -> dict[str, Any]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT account_id, owner_id, currency, balance_minor, overdraft_limit_minor,"
            " status, version, last_updated FROM account_balances WHERE account_id = %s",
            (account_id,),
        )
        row = await cur.fetchone()
    if row is None:
        raise NotFound(f"account {account_id} not found")
    return _jsonable(row)


async def transactions(
    conn: AsyncConnection[Any], account_id: str, params: Mapping[str, str]
) -> dict[str, Any]:
    page = checked.page(params)
    summary = await account(conn, account_id)
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT count(*) AS n FROM transactions WHERE account_id = %s",
            (account_id,),
        )
        total = (await cur.fetchone() or {"n": 0})["n"]
        page.within(total)
        await cur.execute(
            "SELECT transaction_id, kind, amount_minor, currency, counterparty, reference,"
            " balance_after_minor, stream_version, occurred_at FROM transactions"
            " WHERE account_id = %s ORDER BY stream_version DESC LIMIT %s OFFSET %s",
            (account_id, page.size, page.offset),
        )
        rows = await cur.fetchall()
    return {"account": summary, **_paged(rows, total, page)}


async def daily_report(
    conn: AsyncConnection[Any], params: Mapping[str, str]
) -> dict[str, Any]:
    since, until = checked.day(params, "from"), checked.day(params, "to")
    checked.in_order("from", since, "to", until)
    currency = checked.currency(params)
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT day, currency, deposits_minor, withdrawals_minor, deposit_count,"
            " withdrawal_count FROM financial_daily_totals"
            " WHERE (%(since)s::date IS NULL OR day >= %(since)s)"
            " AND (%(until)s::date IS NULL OR day <= %(until)s)"
            " AND (%(currency)s::text IS NULL OR currency = %(currency)s)"
            " ORDER BY day, currency",
            {"since": since, "until": until, "currency": currency},
        )
        rows = await cur.fetchall()
    return {"items": [_jsonable(r) for r in rows]}
