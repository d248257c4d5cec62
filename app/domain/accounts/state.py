"""An account's state and ``evolve``, the fold of its events."""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from typing import assert_never

from app.domain.accounts import events


class AccountStatus(StrEnum):
    NEW = "NEW"  # no events yet: the account does not exist
    OPEN = "OPEN"
    CLOSED = "CLOSED"


@dataclass(frozen=True, slots=True, kw_only=True)
class AccountState:
    version: int
    status: AccountStatus
    account_id: str
    owner_id: str
    currency: str
    balance_minor: int
    overdraft_limit_minor: int


def initial_state() -> AccountState:
    """The state before any event: version 0, status NEW."""
    return AccountState(
        version=0,
        status=AccountStatus.NEW,
        account_id="",
        owner_id="",
        currency="",
        balance_minor=0,
        overdraft_limit_minor=0,
    )


def evolve(state: AccountState, event: events.Event) -> AccountState:
    """Apply one event. Events are facts: nothing is checked, only recorded."""
    state = replace(state, version=state.version + 1)
    match event:
        case events.AccountOpened():
            return replace(
                state,
                status=AccountStatus.OPEN,
                account_id=event.account_id,
                owner_id=event.owner_id,
                currency=event.currency,
                balance_minor=0,
                overdraft_limit_minor=event.overdraft_limit_minor,
            )
        case events.MoneyDeposited() | events.MoneyWithdrawn():
            return replace(state, balance_minor=event.balance_after_minor)
        case events.AccountClosed():
            return replace(state, status=AccountStatus.CLOSED)
        case _:
            assert_never(event)
