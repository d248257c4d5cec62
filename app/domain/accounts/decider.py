"""``decide`` for accounts: turn a command into events, or refuse it."""

from __future__ import annotations

from typing import TypeAlias, TypedDict, assert_never

from app.domain.accounts import commands, events
from app.domain.accounts.state import AccountState, AccountStatus
from app.domain.errors import (
    MAX_REFERENCE_LENGTH,
    DomainError,
    ErrorCode,
    invalid,
    optional_text,
    refuse_existing,
    require_existing,
    require_id,
    require_int,
    require_text,
)
from app.domain.money import (
    MAX_AMOUNT_MINOR,
    MAX_LONG,
    fmt,
    require_amount,
    require_currency,
)

# What a command decides: its events, in order (none: nothing to record).
Decided: TypeAlias = tuple[events.Event, ...]


def decide(state: AccountState, command: commands.Command) -> Decided:
    """The events ``command`` produces from ``state``; raises ``DomainError``.

    Checks run in a fixed order: existence, status, field validation, business rules.
    """
    match command:
        case commands.OpenAccount():
            return _open(state, command)
        case commands.Deposit():
            return _deposit(_open_account(state, command.account_id), command)
        case commands.Withdraw():
            return _withdraw(_open_account(state, command.account_id), command)
        case commands.CloseAccount():
            return _close(_open_account(state, command.account_id), command)
        case _:
            assert_never(command)


def _open_account(state: AccountState, account_id: str) -> AccountState:
    exists = state.status is not AccountStatus.NEW
    require_existing("account", exists, account_id, state.account_id)
    if state.status is AccountStatus.CLOSED:
        raise DomainError(ErrorCode.ACCOUNT_CLOSED, f"account {account_id!r} is closed")
    return state


def _require_same_currency(state: AccountState, currency: str) -> None:
    if currency != state.currency:
        raise DomainError(
            ErrorCode.CURRENCY_MISMATCH,
            f"{currency} does not match account currency {state.currency}",
            "currency",
        )


def _open(state: AccountState, command: commands.OpenAccount) -> Decided:
    refuse_existing(
        "account", state.status is not AccountStatus.NEW, command.account_id
    )
    return (
        events.AccountOpened(
            account_id=require_id(command.account_id, "account_id"),
            owner_id=require_id(command.owner_id, "owner_id"),
            currency=require_currency(command.currency),
            overdraft_limit_minor=require_int(
                command.overdraft_limit_minor,
                "overdraft_limit_minor",
                0,
                MAX_AMOUNT_MINOR,
            ),
        ),
    )


class _Movement(TypedDict):
    """What a deposit and a withdrawal record alike."""

    account_id: str
    transaction_id: str
    amount_minor: int
    currency: str
    reference: str


def _movement(
    state: AccountState, command: commands.Deposit | commands.Withdraw
) -> _Movement:
    """The fields ``command`` shares with the other kind of movement, validated."""
    return _Movement(
        account_id=state.account_id,
        transaction_id=require_id(
            command.transaction_id, "transaction_id", MAX_REFERENCE_LENGTH
        ),
        amount_minor=require_amount(command.amount_minor),
        currency=require_currency(command.currency),
        reference=optional_text(command.reference, "reference"),
    )


def _deposit(state: AccountState, command: commands.Deposit) -> Decided:
    movement = _movement(state, command)
    source = require_text(command.source, "source")
    _require_same_currency(state, movement["currency"])
    balance_after = state.balance_minor + movement["amount_minor"]
    if balance_after > MAX_LONG:
        raise invalid("amount_minor", f"would bring the balance beyond {MAX_LONG}")
    return (
        events.MoneyDeposited(
            **movement, source=source, balance_after_minor=balance_after
        ),
    )


def _withdraw(state: AccountState, command: commands.Withdraw) -> Decided:
    movement = _movement(state, command)
    destination = require_text(command.destination, "destination")
    _require_same_currency(state, movement["currency"])
    amount, currency = movement["amount_minor"], movement["currency"]
    balance_after = state.balance_minor - amount
    if balance_after < -state.overdraft_limit_minor:
        raise DomainError(
            ErrorCode.INSUFFICIENT_FUNDS,
            f"withdrawing {fmt(amount, currency)} from balance "
            f"{fmt(state.balance_minor, currency)} would exceed the overdraft limit "
            f"of {fmt(state.overdraft_limit_minor, currency)}",
            "amount_minor",
        )
    return (
        events.MoneyWithdrawn(
            **movement, destination=destination, balance_after_minor=balance_after
        ),
    )


def _close(state: AccountState, command: commands.CloseAccount) -> Decided:
    reason = require_text(command.reason, "reason")
    if state.balance_minor != 0:
        raise DomainError(
            ErrorCode.NON_ZERO_BALANCE,
            f"cannot close account {state.account_id!r} with balance "
            f"{fmt(state.balance_minor, state.currency)}; it must be 0",
        )
    return (events.AccountClosed(account_id=state.account_id, reason=reason),)
