"""Given / when / then for the account decider: every rule and every refusal."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from app import workload
from app.domain import accounts
from app.domain.accounts import (
    AccountClosed,
    AccountOpened,
    AccountStatus,
    CloseAccount,
    Deposit,
    MoneyDeposited,
    MoneyWithdrawn,
    OpenAccount,
    Withdraw,
)
from app.domain.errors import ErrorCode
from app.domain.money import MAX_LONG
from tests.unit.deciders import assert_primitive_record, given, recorded

ACCOUNT_ID = "a-1"
OPEN = OpenAccount(account_id=ACCOUNT_ID, owner_id="c-1", currency="USD")
OPENED = AccountOpened(
    account_id=ACCOUNT_ID, owner_id="c-1", currency="USD", overdraft_limit_minor=0
)
CLOSE = CloseAccount(account_id=ACCOUNT_ID, reason="customer request")
CLOSED = AccountClosed(account_id=ACCOUNT_ID, reason="customer request")


def deposit(**changes: Any) -> Deposit:
    command = workload.deposit(
        ACCOUNT_ID, 1000, "tx-1", source="bank", reference="salary"
    )
    return replace(command, **changes)


def deposited(**changes: Any) -> MoneyDeposited:
    """``deposit()`` recorded: the same fields and the balance after it."""
    return recorded(
        MoneyDeposited, deposit(), **({"balance_after_minor": 1000} | changes)
    )


def withdraw(**changes: Any) -> Withdraw:
    return replace(
        workload.withdrawal(ACCOUNT_ID, 300, "tx-2", destination="atm"), **changes
    )


def withdrawn(**changes: Any) -> MoneyWithdrawn:
    """``withdraw()`` recorded: the same fields and the balance after it."""
    return recorded(
        MoneyWithdrawn, withdraw(), **({"balance_after_minor": 700} | changes)
    )


# --- the module's shape -------------------------------------------------------


def test_module_names_its_aggregate_and_lists_its_classes() -> None:
    assert accounts.AGGREGATE_TYPE == "account"
    assert set(accounts.COMMANDS) == {OpenAccount, Deposit, Withdraw, CloseAccount}
    assert set(accounts.EVENTS) == {
        AccountOpened,
        MoneyDeposited,
        MoneyWithdrawn,
        AccountClosed,
    }


@pytest.mark.parametrize(
    "cls", [*accounts.COMMANDS, *accounts.EVENTS], ids=lambda c: c.__name__
)
def test_commands_and_events_are_frozen_records_of_primitives(cls: type) -> None:
    assert_primitive_record(cls)


def test_evolve_increments_version_by_one_per_event() -> None:
    events = (
        OPENED,
        deposited(),
        withdrawn(),
        withdrawn(transaction_id="tx-3", amount_minor=700, balance_after_minor=0),
        CLOSED,
    )
    state = accounts.initial_state()
    assert (state.version, state.status) == (0, AccountStatus.NEW)
    for expected_version, event in enumerate(events, start=1):
        state = accounts.evolve(state, event)
        assert state.version == expected_version
    assert state.status is AccountStatus.CLOSED
    assert state.balance_minor == 0


def test_decide_is_deterministic() -> None:
    state = given(accounts, OPENED, deposited()).state()
    assert accounts.decide(state, withdraw()) == accounts.decide(state, withdraw())


# --- OpenAccount --------------------------------------------------------------


def test_open_account() -> None:
    state = given(accounts).when(OPEN).then(OPENED)
    assert state.status is AccountStatus.OPEN
    assert (state.balance_minor, state.currency, state.version) == (0, "USD", 1)


@pytest.mark.parametrize("limit", [0, 1, 10**12])
def test_open_with_an_overdraft_limit(limit: int) -> None:
    state = (
        given(accounts)
        .when(replace(OPEN, overdraft_limit_minor=limit))
        .then(replace(OPENED, overdraft_limit_minor=limit))
    )
    assert state.overdraft_limit_minor == limit


@pytest.mark.parametrize(
    "history", [(OPENED,), (OPENED, CLOSED)], ids=["open", "closed"]
)
def test_open_only_once(history: tuple[Any, ...]) -> None:
    given(accounts, *history).when(OPEN).rejects(ErrorCode.ALREADY_EXISTS)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"account_id": ""}, "account_id"),
        ({"account_id": "a-1 "}, "account_id"),
        ({"owner_id": " "}, "owner_id"),
        ({"currency": "Usd"}, "currency"),
        ({"currency": "DOLLARS"}, "currency"),
        ({"currency": "ABC"}, "currency"),
        ({"overdraft_limit_minor": -1}, "overdraft_limit_minor"),
        ({"overdraft_limit_minor": 10**12 + 1}, "overdraft_limit_minor"),
    ],
)
def test_open_rejects_invalid_fields(changes: dict[str, Any], field: str) -> None:
    given(accounts).when(replace(OPEN, **changes)).rejects(ErrorCode.VALIDATION, field)


@pytest.mark.parametrize(
    "command", [deposit(), withdraw(), CLOSE], ids=lambda c: type(c).__name__
)
def test_commands_on_a_missing_account_are_not_found(command: Any) -> None:
    given(accounts).when(command).rejects(ErrorCode.NOT_FOUND)


@pytest.mark.parametrize(
    "command", [deposit(), withdraw(), CLOSE], ids=lambda c: type(c).__name__
)
def test_a_closed_account_takes_nothing(command: Any) -> None:
    given(accounts, OPENED, CLOSED).when(command).rejects(ErrorCode.ACCOUNT_CLOSED)


def test_a_command_for_another_account_is_refused() -> None:
    given(accounts, OPENED).when(deposit(account_id="a-2")).rejects(
        ErrorCode.VALIDATION, "account_id"
    )


# --- Deposit --------------------------------------------------------------------


def test_deposit_records_the_balance_after() -> None:
    state = given(accounts, OPENED).when(deposit()).then(deposited())
    assert state.balance_minor == 1000


def test_deposit_accepts_the_largest_amount_and_an_empty_reference() -> None:
    given(accounts, OPENED, deposited()).when(
        deposit(transaction_id="tx-9", amount_minor=10**12, reference="  ")
    ).then(
        deposited(
            transaction_id="tx-9",
            amount_minor=10**12,
            reference="",
            balance_after_minor=10**12 + 1000,
        )
    )


def test_deposit_into_an_overdrawn_account() -> None:
    overdrawn = withdrawn(amount_minor=300, balance_after_minor=-300)
    opened = replace(OPENED, overdraft_limit_minor=500)
    given(accounts, opened, overdrawn).when(deposit(amount_minor=100)).then(
        deposited(amount_minor=100, balance_after_minor=-200)
    )


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"amount_minor": 0}, "amount_minor"),
        ({"amount_minor": -1}, "amount_minor"),
        ({"amount_minor": 10**12 + 1}, "amount_minor"),
        ({"amount_minor": True}, "amount_minor"),
        ({"transaction_id": ""}, "transaction_id"),
        ({"source": "  "}, "source"),
        ({"currency": "usd"}, "currency"),
    ],
)
def test_deposit_rejects_invalid_fields(changes: dict[str, Any], field: str) -> None:
    given(accounts, OPENED).when(deposit(**changes)).rejects(
        ErrorCode.VALIDATION, field
    )


def test_deposit_refuses_a_balance_beyond_an_avro_long() -> None:
    rich = deposited(balance_after_minor=MAX_LONG - 5)
    given(accounts, OPENED, rich).when(deposit(amount_minor=10)).rejects(
        ErrorCode.VALIDATION, "amount_minor"
    )


@pytest.mark.parametrize("command", [deposit(currency="EUR"), withdraw(currency="EUR")])
def test_money_in_another_currency_is_a_currency_mismatch(command: Any) -> None:
    error = (
        given(accounts, OPENED, deposited())
        .when(command)
        .rejects(ErrorCode.CURRENCY_MISMATCH)
    )
    assert "EUR" in error.message
    assert "USD" in error.message


# --- Withdraw -------------------------------------------------------------------


def test_withdraw_records_the_balance_after() -> None:
    state = given(accounts, OPENED, deposited()).when(withdraw()).then(withdrawn())
    assert state.balance_minor == 700


def test_withdraw_the_whole_balance() -> None:
    given(accounts, OPENED, deposited()).when(withdraw(amount_minor=1000)).then(
        withdrawn(amount_minor=1000, balance_after_minor=0)
    )


def test_withdraw_down_to_the_overdraft_limit() -> None:
    opened = replace(OPENED, overdraft_limit_minor=500)
    given(accounts, opened, deposited()).when(withdraw(amount_minor=1500)).then(
        withdrawn(amount_minor=1500, balance_after_minor=-500)
    )


@pytest.mark.parametrize(
    ("limit", "amount", "amount_shown", "limit_shown"),
    [
        (0, 1001, "10.01", "0.00"),
        (500, 1501, "15.01", "5.00"),
        (0, 10**12, "10,000,000,000.00", "0.00"),
    ],
)
def test_withdraw_beyond_the_overdraft_limit_is_insufficient_funds(
    limit: int, amount: int, amount_shown: str, limit_shown: str
) -> None:
    opened = replace(OPENED, overdraft_limit_minor=limit)
    error = (
        given(accounts, opened, deposited())
        .when(withdraw(amount_minor=amount))
        .rejects(ErrorCode.INSUFFICIENT_FUNDS)
    )
    assert error.message == (
        f"withdrawing {amount_shown} USD from balance 10.00 USD would exceed the "
        f"overdraft limit of {limit_shown} USD"
    )


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"amount_minor": 0}, "amount_minor"),
        ({"amount_minor": 10**12 + 1}, "amount_minor"),
        ({"transaction_id": " tx"}, "transaction_id"),
        ({"destination": ""}, "destination"),
        ({"currency": "XX"}, "currency"),
    ],
)
def test_withdraw_rejects_invalid_fields(changes: dict[str, Any], field: str) -> None:
    given(accounts, OPENED, deposited()).when(withdraw(**changes)).rejects(
        ErrorCode.VALIDATION, field
    )


# --- CloseAccount -----------------------------------------------------------------


def test_close_at_zero_balance() -> None:
    state = given(accounts, OPENED).when(CLOSE).then(CLOSED)
    assert state.status is AccountStatus.CLOSED


def test_close_after_emptying_the_account() -> None:
    emptied = withdrawn(amount_minor=1000, balance_after_minor=0)
    given(accounts, OPENED, deposited(), emptied).when(CLOSE).then(CLOSED)


@pytest.mark.parametrize("balance", [1000, -200])
def test_close_refuses_a_non_zero_balance(balance: int) -> None:
    opened = replace(OPENED, overdraft_limit_minor=500)
    moved = (
        deposited(amount_minor=balance, balance_after_minor=balance)
        if balance > 0
        else withdrawn(amount_minor=-balance, balance_after_minor=balance)
    )
    error = (
        given(accounts, opened, moved).when(CLOSE).rejects(ErrorCode.NON_ZERO_BALANCE)
    )
    shown = {1000: "10.00 USD", -200: "-2.00 USD"}[balance]
    assert f"with balance {shown}; it must be 0" in error.message


def test_close_needs_a_reason() -> None:
    given(accounts, OPENED).when(replace(CLOSE, reason="")).rejects(
        ErrorCode.VALIDATION, "reason"
    )
