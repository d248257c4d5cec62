"""The ledger read models: ``account_balances``, ``transactions`` and the financial
report ``financial_daily_totals`` (per UTC day and currency, kept by SQL upserts)."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from psycopg import Cursor

Row = dict[str, Any]


def opened(cur: Cursor[Any], meta: Row, data: Row) -> None:
    cur.execute(
        "INSERT INTO account_balances (account_id, owner_id, currency, balance_minor,"
        " overdraft_limit_minor, status, version, last_updated)"
        " VALUES (%s, %s, %s, 0, %s, 'OPEN', %s, %s)",
        (
            data["account_id"],
            data["owner_id"],
            data["currency"],
            data["overdraft_limit_minor"],
            meta["stream_version"],
            meta["timestamp"],
        ),
    )


def _movement(
    cur: Cursor[Any], meta: Row, data: Row, kind: str, counterparty: str
) -> None:
    cur.execute(
        "UPDATE account_balances SET balance_minor = %s, version = %s, last_updated = %s "
        "WHERE account_id = %s",
        (
            data["balance_after_minor"],
            meta["stream_version"],
            meta["timestamp"],
            data["account_id"],
        ),
    )
    cur.execute(
        "INSERT INTO transactions (event_id, account_id, transaction_id, kind, amount_minor,"
        " currency, counterparty, reference, balance_after_minor, stream_version,"
        " occurred_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            meta["event_id"],
            data["account_id"],
            data["transaction_id"],
            kind,
            data["amount_minor"],
            data["currency"],
            counterparty,
            data["reference"],
            data["balance_after_minor"],
            meta["stream_version"],
            meta["timestamp"],
        ),
    )
    deposit = kind == "DEPOSIT"
    cur.execute(
        "INSERT INTO financial_daily_totals AS t (day, currency, deposits_minor,"
        " withdrawals_minor, deposit_count, withdrawal_count)"
        " VALUES ((%s AT TIME ZONE 'UTC')::date, %s, %s, %s, %s, %s)"
        " ON CONFLICT (day, currency) DO UPDATE SET"
        " deposits_minor = t.deposits_minor + EXCLUDED.deposits_minor,"
        " withdrawals_minor = t.withdrawals_minor + EXCLUDED.withdrawals_minor,"
        " deposit_count = t.deposit_count + EXCLUDED.deposit_count,"
        " withdrawal_count = t.withdrawal_count + EXCLUDED.withdrawal_count",
        (
            meta["timestamp"],
            data["currency"],
            data["amount_minor"] if deposit else 0,
            0 if deposit else data["amount_minor"],
            int(deposit),
            int(not deposit),
        ),
    )


def deposited(cur: Cursor[Any], meta: Row, data: Row) -> None:
    _movement(cur, meta, data, "DEPOSIT", data["source"])


def withdrawn(cur: Cursor[Any], meta: Row, data: Row) -> None:
    _movement(cur, meta, data, "WITHDRAWAL", data["destination"])


def closed(cur: Cursor[Any], meta: Row, data: Row) -> None:
    cur.execute(
        "UPDATE account_balances SET status = 'CLOSED', version = %s, last_updated = %s "
        "WHERE account_id = %s",
        (meta["stream_version"], meta["timestamp"], data["account_id"]),
    )


class LedgerProjection:
    name = "ledger"
    areas = ("accounts",)
    tables = ("account_balances", "transactions", "financial_daily_totals")
    handlers = MappingProxyType(
        {
            "AccountOpened": opened,
            "MoneyDeposited": deposited,
            "MoneyWithdrawn": withdrawn,
            "AccountClosed": closed,
        }
    )
