"""The query side over Postgres: read-only SQL behind validated parameters.

Runs as the read-only role; never touches the write side. Parameters are checked here
and refused with ``BadParameter`` naming the field, so the HTTP layer stays thin.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, date, datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row

ORDER_STATUSES = ("CREATED", "PAID", "SHIPPED", "DELIVERED", "CANCELLED")
MAX_PAGE_SIZE = 100
MAX_LIMIT = 500


class BadParameter(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class NotFound(LookupError):
    pass


def integer(
    params: Mapping[str, str], name: str, default: int, low: int, high: int
) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadParameter(name, f"must be a whole number, got {raw!r}") from None
    if not low <= value <= high:
        raise BadParameter(name, f"must be between {low} and {high}, got {value}")
    return value


def timestamp(params: Mapping[str, str], name: str) -> datetime | None:
    raw = params.get(name)
    if not raw:
        return None
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise BadParameter(
            name, f"must be an ISO-8601 date or time, got {raw!r}"
        ) from None
    # A time without a zone is read as UTC, the zone every stored time is in.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def day(params: Mapping[str, str], name: str) -> date | None:
    raw = params.get(name)
    if not raw:
        return None
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise BadParameter(
            name, f"must be a date like 2026-01-31, got {raw!r}"
        ) from None


def choice(
    params: Mapping[str, str], name: str, choices: tuple[str, ...]
) -> str | None:
    raw = params.get(name)
    if not raw:
        return None
    if raw not in choices:
        raise BadParameter(name, f"must be one of {', '.join(choices)}, got {raw!r}")
    return raw


def text(params: Mapping[str, str], name: str, limit: int = 200) -> str | None:
    raw = params.get(name)
    if raw is not None and len(raw) > limit:
        raise BadParameter(name, f"must be at most {limit} characters")
    return raw or None


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v.isoformat() if isinstance(v, datetime | date) else v
        for k, v in row.items()
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
    page = integer(params, "page", 0, 0, 1_000_000)
    page_size = integer(params, "page_size", 20, 1, MAX_PAGE_SIZE)
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {ORDER_COLUMNS} FROM order_summaries WHERE customer_id = %s"  # noqa: S608 - constant column list
            " ORDER BY created_at DESC, order_id LIMIT %s OFFSET %s",
            (customer_id, page_size, page * page_size),
        )
        rows = await cur.fetchall()
        await cur.execute(
            "SELECT count(*) AS n FROM order_summaries WHERE customer_id = %s",
            (customer_id,),
        )
        total = (await cur.fetchone() or {"n": 0})["n"]
        await cur.execute(
            "SELECT currency, total_orders, lifetime_value_minor FROM customer_statistics"
            " WHERE customer_id = %s ORDER BY currency",
            (customer_id,),
        )
        statistics = await cur.fetchall()
    return {
        "customer_id": customer_id,
        "items": [_jsonable(r) for r in rows],
        "total_count": total,
        "page": page,
        "page_size": page_size,
        "statistics": statistics,
    }


async def search_orders(
    conn: AsyncConnection[Any], params: Mapping[str, str]
) -> dict[str, Any]:
    status = choice(params, "status", ORDER_STATUSES)
    customer = text(params, "customer_id")
    since, until = timestamp(params, "from"), timestamp(params, "to")
    limit = integer(params, "limit", 100, 1, MAX_LIMIT)
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
    page = integer(params, "page", 0, 0, 1_000_000)
    page_size = integer(params, "page_size", 20, 1, MAX_PAGE_SIZE)
    summary = await account(conn, account_id)
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT transaction_id, kind, amount_minor, currency, counterparty, reference,"
            " balance_after_minor, stream_version, occurred_at FROM transactions"
            " WHERE account_id = %s ORDER BY stream_version DESC LIMIT %s OFFSET %s",
            (account_id, page_size, page * page_size),
        )
        rows = await cur.fetchall()
        await cur.execute(
            "SELECT count(*) AS n FROM transactions WHERE account_id = %s",
            (account_id,),
        )
        total = (await cur.fetchone() or {"n": 0})["n"]
    return {
        "account": summary,
        "items": [_jsonable(r) for r in rows],
        "total_count": total,
        "page": page,
        "page_size": page_size,
    }


async def daily_report(
    conn: AsyncConnection[Any], params: Mapping[str, str]
) -> dict[str, Any]:
    since, until = day(params, "from"), day(params, "to")
    currency = text(params, "currency", 3)
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
