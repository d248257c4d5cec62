"""Events an account records: facts, primitives only, one Avro record each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias


@dataclass(frozen=True, slots=True, kw_only=True)
class AccountOpened:
    account_id: str
    owner_id: str
    currency: str
    overdraft_limit_minor: int


@dataclass(frozen=True, slots=True, kw_only=True)
class MoneyDeposited:
    account_id: str
    transaction_id: str
    amount_minor: int
    currency: str
    source: str
    reference: str
    # Recorded so projections need not fold every movement to show a balance.
    balance_after_minor: int


@dataclass(frozen=True, slots=True, kw_only=True)
class MoneyWithdrawn:
    account_id: str
    transaction_id: str
    amount_minor: int
    currency: str
    destination: str
    reference: str
    balance_after_minor: int


@dataclass(frozen=True, slots=True, kw_only=True)
class AccountClosed:
    account_id: str
    reason: str


Event: TypeAlias = AccountOpened | MoneyDeposited | MoneyWithdrawn | AccountClosed

EVENTS: tuple[type[Event], ...] = (
    AccountOpened,
    MoneyDeposited,
    MoneyWithdrawn,
    AccountClosed,
)
