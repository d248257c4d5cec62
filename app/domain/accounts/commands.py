"""Commands an account accepts: intentions, validated by ``decide``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenAccount:
    account_id: str
    owner_id: str
    currency: str
    overdraft_limit_minor: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Deposit:
    account_id: str
    transaction_id: str
    amount_minor: int
    currency: str
    source: str
    reference: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Withdraw:
    account_id: str
    transaction_id: str
    amount_minor: int
    currency: str
    destination: str
    reference: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class CloseAccount:
    account_id: str
    reason: str


Command: TypeAlias = OpenAccount | Deposit | Withdraw | CloseAccount

COMMANDS: tuple[type[Command], ...] = (OpenAccount, Deposit, Withdraw, CloseAccount)
