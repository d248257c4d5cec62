"""The ledger read models: ``account_balances``, ``transactions`` and the financial
report ``financial_daily_totals`` (per UTC day and currency, kept as running sums)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC
from types import MappingProxyType
from typing import Any

from app.adapters.rows import Rows

Row = dict[str, Any]


def opened(rows: Rows, meta: Row, data: Row) -> None:
    rows.insert(
        "account_balances",
        {
            "account_id": data["account_id"],
            "owner_id": data["owner_id"],
            "currency": data["currency"],
            "balance_minor": 0,
            "overdraft_limit_minor": data["overdraft_limit_minor"],
            "status": "OPEN",
            "version": meta["stream_version"],
            "last_updated": meta["timestamp"],
        },
    )


def _movement(rows: Rows, meta: Row, data: Row, kind: str, counterparty: str) -> None:
    rows.update(
        "account_balances",
        {"account_id": data["account_id"]},
        set={
            "balance_minor": data["balance_after_minor"],
            "version": meta["stream_version"],
            "last_updated": meta["timestamp"],
        },
    )
    rows.insert(
        "transactions",
        {
            "event_id": meta["event_id"],
            "account_id": data["account_id"],
            "transaction_id": data["transaction_id"],
            "kind": kind,
            "amount_minor": data["amount_minor"],
            "currency": data["currency"],
            "counterparty": counterparty,
            "reference": data["reference"],
            "balance_after_minor": data["balance_after_minor"],
            "stream_version": meta["stream_version"],
            "occurred_at": meta["timestamp"],
        },
    )
    deposit = kind == "DEPOSIT"
    rows.add(
        "financial_daily_totals",
        {"day": meta["timestamp"].astimezone(UTC).date(), "currency": data["currency"]},
        deposits_minor=data["amount_minor"] if deposit else 0,
        withdrawals_minor=0 if deposit else data["amount_minor"],
        deposit_count=int(deposit),
        withdrawal_count=int(not deposit),
    )


def deposited(rows: Rows, meta: Row, data: Row) -> None:
    _movement(rows, meta, data, "DEPOSIT", data["source"])


def withdrawn(rows: Rows, meta: Row, data: Row) -> None:
    _movement(rows, meta, data, "WITHDRAWAL", data["destination"])


def closed(rows: Rows, meta: Row, data: Row) -> None:
    rows.update(
        "account_balances",
        {"account_id": data["account_id"]},
        set={
            "status": "CLOSED",
            "version": meta["stream_version"],
            "last_updated": meta["timestamp"],
        },
    )


class LedgerProjection:
    name = "ledger"
    areas = ("accounts",)
    tables = ("account_balances", "transactions", "financial_daily_totals")
    conflicts: Mapping[str, str] = MappingProxyType({})
    handlers = MappingProxyType(
        {
            "AccountOpened": opened,
            "MoneyDeposited": deposited,
            "MoneyWithdrawn": withdrawn,
            "AccountClosed": closed,
        }
    )
