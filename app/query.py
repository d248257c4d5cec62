"""The query side over Postgres: read-only SQL behind validated parameters.

Runs as the read-only role; never touches the write side. Parameters are checked
with ``app.params`` and refused with ``BadParameter`` naming the field, so the HTTP
layer stays thin.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from psycopg import AsyncConnection, sql
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


# The text search configuration the search documents were built with
# (tables/migrations/0005_search.sql); a query parsed with another one would miss.
SEARCH_CONFIG = "simple"
RANK = sql.SQL("ts_rank(t.search, q)::float8")


@dataclass(frozen=True, slots=True)
class Searched:
    """Where ``search`` looks: the table holding the documents (``t``, its ``search``
    column), its unique key, what it joins to show, and the columns it answers."""

    table: str
    key: str
    join: str
    columns: str


SEARCHED = {
    "orders": Searched(
        "order_search",
        "order_id",
        " JOIN order_summaries o ON o.order_id = t.order_id",
        "o.order_id, o.customer_id, o.customer_name, o.customer_email, o.status,"
        " o.currency, o.total_minor, o.items_count, t.shipping_address,"
        " o.tracking_number, o.created_at, o.updated_at,"
        " (SELECT coalesce(array_agg(i.product_id ORDER BY i.product_id), '{}')"
        " FROM order_items i WHERE i.order_id = t.order_id) AS product_ids",
    ),
    "customers": Searched(
        "customers",
        "customer_id",
        "",
        "t.customer_id, t.name, t.email, t.first_order_at, t.updated_at",
    ),
}


async def search(
    conn: AsyncConnection[Any], params: Mapping[str, str]
) -> dict[str, Any]:
    """Orders or customers matching ``q`` (web-search syntax: words, "a phrase",
    or, -word), best match first: ``ts_rank`` descending, then the key ascending.
    A page is ``page`` (numbered from 0) or ``cursor`` (the rows after an earlier
    page's ``next_cursor``), never both."""
    text = checked.search_text(params, "q")
    kind = checked.choice(params, "type", tuple(SEARCHED)) or "orders"
    after = checked.cursor(params)
    if after is not None and params.get("page"):
        raise checked.BadParameter("cursor", "give either page or cursor, not both")
    page = checked.page(params)
    searched = SEARCHED[kind]
    # websearch_to_tsquery reads any text as words and operators: unbalanced
    # quotes, stray & | ! : * ( ) and the like are ignored, never an error.
    source = sql.SQL(
        "FROM {} t{}, websearch_to_tsquery({}, %(q)s) AS q WHERE t.search @@ q"
    ).format(
        sql.Identifier(searched.table),
        sql.SQL(searched.join),  # a constant of SEARCHED
        sql.Literal(SEARCH_CONFIG),
    )
    # ts_rank reads only the row's document and the query, so a row keeps its rank
    # while other rows come and go: a cursor's place stays put. As float8, whose
    # text Python reads back exactly (a real's shortest text is not its value).
    keyset = sql.SQL(
        " AND ({rank} < %(rank)s OR ({rank} = %(rank)s AND t.{key} > %(key)s))"
    ).format(rank=RANK, key=sql.Identifier(searched.key))
    values: dict[str, Any] = {"q": text, "limit": page.size + 1, "offset": 0}
    if after is not None:
        values.update(rank=after.rank, key=after.key)
    else:
        values["offset"] = page.offset
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(sql.SQL("SELECT count(*) AS n {}").format(source), values)
        total = (await cur.fetchone() or {"n": 0})["n"]
        if after is None:
            page.within(total)
        await cur.execute(
            sql.SQL(
                "SELECT {columns}, {rank} AS rank {source}{keyset}"
                " ORDER BY rank DESC, t.{key} LIMIT %(limit)s OFFSET %(offset)s"
            ).format(
                columns=sql.SQL(searched.columns),
                rank=RANK,
                source=source,
                keyset=keyset if after is not None else sql.SQL(""),
                key=sql.Identifier(searched.key),
            ),
            values,
        )
        rows = await cur.fetchall()
    more = len(rows) > page.size
    rows = rows[: page.size]
    last = rows[-1] if more else None
    return {
        "q": text,
        "type": kind,
        "items": [_jsonable(r) for r in rows],
        "total_count": total,
        "page": page.number if after is None else None,
        "page_size": page.size,
        "next_cursor": (
            str(checked.Cursor(last["rank"], last[searched.key])) if last else None
        ),
    }


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
