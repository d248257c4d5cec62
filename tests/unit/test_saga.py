"""Given / when / then for the order payment saga: every path, idempotency, routing."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from app import workload
from app.application import saga
from app.application.saga import (
    Cancelled,
    Created,
    Deposited,
    Money,
    Paid,
    Phase,
    Reaction,
    Refused,
    SagaState,
    Step,
    TimedOut,
    Withdrawn,
)
from app.domain import accounts, orders
from app.domain.orders import Address
from app.domain.orders.values import to_order_line
from app.settings import Settings, SettingsError
from tests.unit.deciders import recorded

ORDER = "o-1"
ACCOUNT = "a-1"
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
TIMEOUT = timedelta(seconds=30)
DEADLINE = T0 + TIMEOUT


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def created(**changes: Any) -> Created:
    fields: dict[str, Any] = {
        "order_id": ORDER,
        "event_id": "ev-created",
        "correlation_id": "corr-1",
        "account_id": ACCOUNT,
        "amount_minor": 4200,
        "currency": "EUR",
        "at": T0,
    }
    return Created(**{**fields, **changes})


def withdrawn(seconds: float = 1, event_id: str = "ev-withdrawn") -> Withdrawn:
    return Withdrawn(
        order_id=ORDER,
        event_id=event_id,
        account_id=ACCOUNT,
        amount_minor=4200,
        at=at(seconds),
    )


def refused(step: Step, code: str = "InsufficientFunds", seconds: float = 1) -> Refused:
    return Refused(
        order_id=ORDER,
        command_id=saga.command_id(ORDER, step),
        step=step,
        code=code,
        message="not enough",
        at=at(seconds),
    )


def paid(seconds: float = 2) -> Paid:
    return Paid(order_id=ORDER, event_id="ev-paid", at=at(seconds))


def cancelled(seconds: float = 2, reason: str = "whatever") -> Cancelled:
    return Cancelled(
        order_id=ORDER, event_id="ev-cancelled", reason=reason, at=at(seconds)
    )


def deposited(seconds: float = 40) -> Deposited:
    return Deposited(order_id=ORDER, event_id="ev-deposited", at=at(seconds))


def timed_out(seconds: float = 31, deadline: datetime = DEADLINE) -> TimedOut:
    return TimedOut(order_id=ORDER, deadline=deadline, at=at(seconds))


def given(*messages: saga.Message) -> Given:
    return Given(messages)


@dataclass(frozen=True, slots=True)
class Given:
    messages: tuple[saga.Message, ...]

    def state(self) -> SagaState | None:
        state = None
        for message in self.messages:
            state = saga.react(state, message, timeout=TIMEOUT).state
        return state

    def when(self, message: saga.Message) -> When:
        return When(self.state(), message)


@dataclass(frozen=True, slots=True)
class When:
    state: SagaState | None
    message: saga.Message

    def then(self, *commands: Any) -> SagaState:
        """Assert the commands sent (domain commands, in order); return the new state.

        Also asserts the saga's idempotency: the same message again sends nothing and
        changes nothing.
        """
        reaction = saga.react(self.state, self.message, timeout=TIMEOUT)
        assert tuple(c.command for c in reaction.commands) == commands
        assert reaction.state is not None
        again = saga.react(reaction.state, self.message, timeout=TIMEOUT)
        assert again == Reaction(reaction.state)
        return reaction.state

    def reaction(self) -> Reaction:
        return saga.react(self.state, self.message, timeout=TIMEOUT)


WITHDRAW = workload.withdrawal(
    ACCOUNT,
    4200,
    f"order-payment:{ORDER}",
    currency="EUR",
    destination=f"order {ORDER}",
    reference=f"payment for order {ORDER}",
)
PAY = workload.payment(
    ORDER,
    4200,
    "ev-withdrawn",
    f"order-payment:{ORDER}",
    currency="EUR",
    method="account",
)
REFUND = workload.deposit(
    ACCOUNT,
    4200,
    f"order-refund:{ORDER}",
    currency="EUR",
    source=f"order {ORDER}",
    reference=f"refund for order {ORDER}",
)


def stage(state: SagaState, *more: str) -> tuple[Any, ...]:
    """``state``'s phase and money, then the fields named in ``more``."""
    return (state.phase, state.money, *(getattr(state, name) for name in more))


def cancel(reason: str) -> orders.CancelOrder:
    return orders.CancelOrder(order_id=ORDER, reason=reason)


# -- the happy path -----------------------------------------------------------------


def test_an_order_with_an_account_is_charged_with_linked_ids() -> None:
    reaction = given().when(created()).reaction()
    (out,) = reaction.commands
    assert out.command == WITHDRAW
    assert out.command_id == saga.command_id(ORDER, Step.WITHDRAW)
    assert out.correlation_id == "corr-1"
    assert out.causation_id == "ev-created"
    assert out.issued_at == T0
    state = reaction.state
    assert state is not None
    assert stage(state, "deadline") == (Phase.CHARGING, Money.REQUESTED, DEADLINE)
    assert state.history[-1].sent[0].command_type == "Withdraw"


def test_an_accepted_withdrawal_is_recorded_on_the_order() -> None:
    state = given(created()).when(withdrawn()).then(PAY)
    assert stage(state, "deadline") == (Phase.PAYING, Money.TAKEN, None)
    assert state.history[-1].sent[0].causation_id == "ev-withdrawn"


def test_the_recorded_payment_completes_the_saga() -> None:
    state = given(created(), withdrawn()).when(paid()).then()
    assert state.phase is Phase.PAID and state.settled
    assert [e.message_type for e in state.history] == ["Created", "Withdrawn", "Paid"]


# -- refusals -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "code", ["InsufficientFunds", "AccountClosed", "CurrencyMismatch"]
)
def test_a_refused_withdrawal_cancels_the_order_with_the_reason(code: str) -> None:
    reason = f"payment refused by account {ACCOUNT}: {code}: not enough"
    state = given(created()).when(refused(Step.WITHDRAW, code)).then(cancel(reason))
    assert stage(state, "reason") == (Phase.CANCELLING, Money.REFUSED, reason)
    assert state.deadline is None
    done = given(created(), refused(Step.WITHDRAW, code)).when(cancelled()).then()
    assert done.phase is Phase.CANCELLED and done.settled
    assert done.reason == reason  # the saga's reason, not the event's wording


def test_a_refused_payment_is_refunded_and_the_order_cancelled() -> None:
    reason = "payment could not be recorded: PaymentMismatch: not enough"
    state = (
        given(created(), withdrawn())
        .when(refused(Step.PAY, "PaymentMismatch", seconds=2))
        .then(REFUND, cancel(reason))
    )
    assert stage(state) == (Phase.CANCELLING, Money.REFUNDING)
    after = given(
        created(), withdrawn(), refused(Step.PAY, "PaymentMismatch", 2), cancelled(3)
    ).when(deposited())
    final = after.then()
    assert stage(final, "settled") == (Phase.CANCELLED, Money.REFUNDED, True)


def test_a_refused_refund_is_left_for_a_human() -> None:
    state = (
        given(created(), timed_out(), cancelled(32), withdrawn(33))
        .when(refused(Step.REFUND, "AccountClosed", seconds=34))
        .then()
    )
    assert state.money is Money.REFUND_REFUSED
    assert state.settled
    assert "needs attention" in state.history[-1].note


def test_a_refused_cancellation_is_noted_and_changes_nothing_else() -> None:
    before = given(created(), refused(Step.WITHDRAW)).state()
    assert before is not None
    state = (
        given(created(), refused(Step.WITHDRAW))
        .when(refused(Step.CANCEL, "InvalidState", seconds=2))
        .then()
    )
    assert stage(state) == stage(before)
    assert "cancellation refused" in state.history[-1].note


# -- the deadline -------------------------------------------------------------------


def test_a_timeout_before_the_deadline_does_nothing() -> None:
    reaction = given(created()).when(timed_out(seconds=29.9)).reaction()
    assert reaction.commands == ()
    assert reaction.state == given(created()).state()


def test_a_timeout_for_another_deadline_does_nothing() -> None:
    reaction = given(created()).when(timed_out(deadline=at(5))).reaction()
    assert reaction.commands == ()


def test_the_deadline_cancels_the_order_once() -> None:
    reason = f"payment timed out: no answer from account {ACCOUNT} within 30s"
    state = given(created()).when(timed_out()).then(cancel(reason))
    assert stage(state, "deadline") == (Phase.CANCELLING, Money.REQUESTED, None)
    # Sent again by a restarted timer, later: still nothing.
    assert given(created(), timed_out()).when(timed_out(seconds=60)).reaction() == (
        Reaction(state)
    )


def test_a_withdrawal_after_the_timeout_is_refunded() -> None:
    state = (
        given(created(), timed_out(), cancelled(32)).when(withdrawn(40)).then(REFUND)
    )
    assert stage(state) == (Phase.CANCELLED, Money.REFUNDING)
    assert not state.settled
    done = given(created(), timed_out(), cancelled(32), withdrawn(40)).when(deposited())
    assert done.then().money is Money.REFUNDED


def test_a_withdrawal_before_the_cancellation_lands_is_refunded_too() -> None:
    state = given(created(), timed_out()).when(withdrawn(31.5)).then(REFUND)
    assert stage(state) == (Phase.CANCELLING, Money.REFUNDING)
    # A second withdrawal event of the same command (the log repeated it) is no
    # second refund.
    again = given(created(), timed_out(), withdrawn(31.5)).when(
        withdrawn(33, event_id="ev-withdrawn-again")
    )
    assert again.then() == state


def test_a_refusal_after_the_timeout_only_records_it() -> None:
    state = (
        given(created(), timed_out(), cancelled(32))
        .when(refused(Step.WITHDRAW, seconds=35))
        .then()
    )
    assert stage(state, "settled") == (Phase.CANCELLED, Money.REFUSED, True)


# -- the order moving on by itself ----------------------------------------------------


def test_an_order_cancelled_while_charging_refunds_a_late_withdrawal() -> None:
    state = given(created()).when(cancelled(reason="changed my mind")).then()
    assert stage(state, "reason") == (
        Phase.CANCELLED,
        Money.REQUESTED,
        "changed my mind",
    )
    assert not state.settled
    assert given(created(), cancelled()).when(withdrawn(3)).then(REFUND)


def test_an_order_cancelled_while_paying_is_refunded_once() -> None:
    state = given(created(), withdrawn()).when(cancelled(3)).then(REFUND)
    assert stage(state) == (Phase.CANCELLED, Money.REFUNDING)
    # The payment is then refused (the order is cancelled): no second refund.
    assert (
        given(created(), withdrawn(), cancelled(3))
        .when(refused(Step.PAY, "InvalidState", 4))
        .reaction()
        .commands
        == ()
    )


def test_a_paid_order_cancelled_later_is_refunded() -> None:
    state = given(created(), withdrawn(), paid()).when(cancelled(50)).then(REFUND)
    assert stage(state) == (Phase.CANCELLED, Money.REFUNDING)


def test_a_zero_total_is_paid_without_a_withdrawal() -> None:
    zero = created(amount_minor=0)
    expected = replace(PAY, amount_minor=0, payment_id="ev-created")
    state = given().when(zero).then(expected)
    assert stage(state, "deadline") == (Phase.PAYING, Money.NONE, None)
    assert (
        given(zero)
        .when(refused(Step.PAY, "InvalidState"))
        .then(cancel("payment could not be recorded: InvalidState: not enough"))
    )


@pytest.mark.parametrize("total", [4200, 0])
def test_the_orders_decider_takes_the_sagas_payment(total: int) -> None:
    """An order created with an account takes no payment but the saga's: the one the
    saga sends passes, and the event it records is the one the saga follows."""
    order = replace(_order_created(ACCOUNT), total_minor=total)
    state = orders.evolve(orders.initial_state(), order)
    start = created(amount_minor=total)
    # A zero total is paid at once; any other once the withdrawal is taken.
    before, trigger = (
        (None, start) if total == 0 else (given(start).state(), withdrawn())
    )
    reaction = saga.react(before, trigger, timeout=TIMEOUT)
    [pay] = [c.command for c in reaction.commands]
    assert isinstance(pay, orders.ProcessPayment)
    [payment] = orders.decide(state, pay)
    assert isinstance(payment, orders.PaymentProcessed)
    followed = saga.message_for_event(
        payment, event_id="ev-paid", correlation_id="corr", command_id="x", at=T0
    )
    assert isinstance(followed, Paid)


# -- idempotency ---------------------------------------------------------------------


FLOWS = {
    "paid": [created(), withdrawn(), paid()],
    "refused": [created(), refused(Step.WITHDRAW), cancelled()],
    "late": [created(), timed_out(), cancelled(32), withdrawn(40), deposited()],
}


@pytest.mark.parametrize("flow", sorted(FLOWS))
def test_a_replayed_or_duplicated_flow_sends_nothing_twice(flow: str) -> None:
    messages = FLOWS[flow]

    def run(sequence: list[saga.Message]) -> tuple[SagaState | None, list[str]]:
        state, sent = None, []
        for message in sequence:
            reaction = saga.react(state, message, timeout=TIMEOUT)
            state = reaction.state
            sent += [c.command_id for c in reaction.commands]
        return state, sent

    once_state, once = run(messages)
    assert len(once) == len(set(once))
    doubled = list(itertools.chain.from_iterable((m, m) for m in messages))
    assert run(doubled) == (once_state, once)
    replayed_state, replayed = run(messages + messages)
    assert (replayed_state, replayed) == (once_state, once)


def test_messages_for_an_order_the_saga_never_started_are_ignored() -> None:
    for message in (withdrawn(), paid(), cancelled(), timed_out(), deposited()):
        assert saga.react(None, message, timeout=TIMEOUT) == Reaction(None)


def test_a_message_for_another_order_is_a_wiring_error() -> None:
    state = given(created()).state()
    with pytest.raises(ValueError, match="given the saga of"):
        saga.react(state, replace(withdrawn(), order_id="o-2"), timeout=TIMEOUT)


# -- command ids and routing --------------------------------------------------------


@pytest.mark.parametrize("order_id", ["o-1", "odd:order:id", "ü/ñ"])
def test_command_ids_are_deterministic_and_name_their_order(order_id: str) -> None:
    for step in Step:
        value = saga.command_id(order_id, step)
        assert value == saga.command_id(order_id, step)
        assert saga.parse_command_id(value) == (step, order_id)
    assert len({saga.command_id(order_id, step) for step in Step}) == len(Step)


@pytest.mark.parametrize(
    "value",
    [
        "cmd-1",
        "saga:withdraw:o-1",
        "saga:explode:00000000-0000-0000-0000-000000000000:o-1",
        "saga:withdraw:00000000-0000-0000-0000-000000000000:o-1",  # forged token
    ],
)
def test_other_command_ids_are_not_the_sagas(value: str) -> None:
    assert saga.parse_command_id(value) is None


def _order_created(account_id: str | None) -> orders.OrderCreated:
    item = orders.LineItem(product_id="p", quantity=1, unit_price_minor=4200)
    order = workload.new_order(
        ORDER,
        "c",
        (item,),
        currency="EUR",
        name="C",
        email="c@example.com",
        address=Address(street="s", city="c", state="", zip_code="z", country="C"),
        account_id=account_id,
    )
    line = to_order_line(item, "item")
    return recorded(orders.OrderCreated, order, items=(line,), total_minor=4200)


def test_events_are_routed_only_when_they_belong_to_a_saga() -> None:
    meta = {"event_id": "ev", "correlation_id": "corr", "at": T0}
    own = saga.command_id(ORDER, Step.WITHDRAW)
    route = saga.message_for_event
    assert route(_order_created(ACCOUNT), command_id="c", **meta) == created(
        event_id="ev", correlation_id="corr"
    )
    assert route(_order_created(None), command_id="c", **meta) is None
    moved = recorded(
        accounts.MoneyWithdrawn,
        WITHDRAW,
        destination="d",
        reference="r",
        balance_after_minor=0,
    )
    assert route(moved, command_id=own, **meta) == replace(
        withdrawn(), event_id="ev", at=T0
    )
    # The same movement made by anyone else is not the saga's, whatever its ids say.
    assert route(moved, command_id="client-cmd", **meta) is None
    assert route(moved, command_id=saga.command_id(ORDER, Step.REFUND), **meta) is None
    payment = orders.PaymentProcessed(
        order_id=ORDER,
        payment_id="p",
        amount_minor=4200,
        currency="EUR",
        method="account",
        transaction_id="order-payment:o-1",
    )
    assert route(payment, command_id="x", **meta) == Paid(
        order_id=ORDER, event_id="ev", at=T0
    )
    assert route(replace(payment, method="paypal"), command_id="x", **meta) is None


def test_only_rejections_of_the_sagas_commands_are_routed() -> None:
    own = saga.command_id(ORDER, Step.WITHDRAW)
    result = {"code": "InsufficientFunds", "message": "not enough", "at": at(1)}
    assert saga.message_for_result(command_id=own, accepted=False, **result) == (
        refused(Step.WITHDRAW)
    )
    assert saga.message_for_result(command_id=own, accepted=True, **result) is None
    assert saga.message_for_result(command_id="cmd", accepted=False, **result) is None


# -- JSON ----------------------------------------------------------------------------


def test_state_and_messages_survive_json() -> None:
    state = given(created(), timed_out(), cancelled(32), withdrawn(40)).state()
    assert state is not None
    text = json.dumps(saga.state_to_json(state))
    assert saga.state_from_json(json.loads(text)) == state
    for message in (*FLOWS["late"], refused(Step.PAY), paid()):
        wire = json.loads(json.dumps(saga.message_to_json(message)))
        assert saga.message_from_json(wire) == message


@pytest.mark.parametrize(
    "data",
    [
        {"type": "Nope"},
        {"type": "Paid", "order_id": "o", "event_id": "e"},
        {"type": "Paid", "order_id": "o", "event_id": 5, "at": T0.isoformat()},
        {"type": "Paid", "order_id": "o", "event_id": "e", "at": "2025-01-01T00:00"},
        {"type": "Paid", "order_id": "o", "event_id": "e", "at": "x", "more": 1},
    ],
)
def test_malformed_messages_are_refused(data: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case fails differently
        saga.message_from_json(data)


# -- configuration -------------------------------------------------------------------


def test_configuration_defaults_and_parsing() -> None:
    default = Settings.from_env({})
    assert (default.saga, default.saga_timeout_s) == (True, 30.0)
    chosen = Settings.from_env(
        {"STREAMFOLD_SAGA": "off", "STREAMFOLD_SAGA_TIMEOUT": "2.5"}
    )
    assert (chosen.saga, chosen.saga_timeout_s) == (False, 2.5)
    # A worker started from these settings reads the same ones.
    assert Settings.from_env(chosen.as_env()) == chosen


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("STREAMFOLD_SAGA", "maybe"),
        ("STREAMFOLD_SAGA_TIMEOUT", "soon"),
        ("STREAMFOLD_SAGA_TIMEOUT", "0"),
        ("STREAMFOLD_SAGA_TIMEOUT", "-3"),
        ("STREAMFOLD_SAGA_TIMEOUT", "nan"),
        ("STREAMFOLD_SAGA_TIMEOUT", "1e9"),
    ],
)
def test_bad_configuration_names_the_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({variable: value})
    assert caught.value.variable == variable
    assert value in str(caught.value)


@pytest.mark.parametrize("on", [True, False])
def test_off_runs_no_saga(on: bool, tmp_path: Path) -> None:
    from agents.saga import FeedHandler, SagaHandler
    from app.adapters.catalog import SchemaCatalog
    from app.adapters.codec import Codec, ConfluentRegistry
    from app.writer import build

    settings = replace(Settings(), saga=on, home=tmp_path)
    codec = Codec(ConfluentRegistry("http://127.0.0.1:1"), SchemaCatalog.load())
    processors, handlers = build(settings, codec, 0)
    kinds = {type(h) for p in processors for h in p.handlers}
    assert (SagaHandler in kinds) is on
    assert (FeedHandler in kinds) is on
    assert len(processors) == (2 if on else 1)
    for handler in handlers:
        handler.close()  # type: ignore[attr-defined]


def test_the_feed_looks_at_headers_before_decoding_an_event() -> None:
    """An account movement matters only when a saga command caused it; the feed can
    tell from the event's command-id header and skips decoding the rest."""
    withdraw = saga.command_id(ORDER, Step.WITHDRAW)
    refund = saga.command_id(ORDER, Step.REFUND)
    assert saga.may_follow("MoneyWithdrawn", withdraw)
    assert saga.may_follow("MoneyDeposited", refund)
    assert not saga.may_follow("MoneyWithdrawn", "client-cmd-1")
    assert not saga.may_follow("MoneyDeposited", "client-cmd-2")
    # Order events count whoever caused them; events older than the header count.
    assert saga.may_follow("OrderCreated", "client-cmd-3")
    assert saga.may_follow("MoneyWithdrawn", None)
    assert not saga.may_follow("OrderItemAdded", None)
    assert not saga.may_follow("AccountOpened", withdraw)
