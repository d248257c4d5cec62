"""The account aggregate as a decider: commands, events, state, decide, evolve."""

from __future__ import annotations

from app.domain.accounts.commands import (
    COMMANDS,
    CloseAccount,
    Command,
    Deposit,
    OpenAccount,
    Withdraw,
)
from app.domain.accounts.decider import decide
from app.domain.accounts.events import (
    EVENTS,
    AccountClosed,
    AccountOpened,
    Event,
    MoneyDeposited,
    MoneyWithdrawn,
)
from app.domain.accounts.state import (
    AccountState,
    AccountStatus,
    evolve,
    initial_state,
)

AGGREGATE_TYPE = "account"

__all__ = [
    "AGGREGATE_TYPE",
    "COMMANDS",
    "EVENTS",
    "AccountClosed",
    "AccountOpened",
    "AccountState",
    "AccountStatus",
    "CloseAccount",
    "Command",
    "Deposit",
    "Event",
    "MoneyDeposited",
    "MoneyWithdrawn",
    "OpenAccount",
    "Withdraw",
    "decide",
    "evolve",
    "initial_state",
]
