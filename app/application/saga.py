"""The order payment saga: a process manager across orders and accounts, written as a
pure decider ``react(state, message, timeout=...) -> Reaction`` over frozen dataclasses.

An order created with an account is charged (``Withdraw``); an accepted withdrawal is
recorded on the order (``ProcessPayment``, method "account"); a refused one, or no
answer by the deadline, cancels the order (``CancelOrder``); money taken after that
goes back (``Deposit``). Every step is recorded in the saga's history, and each
command's id is derived from the saga and the step, so a replayed or duplicated
message never yields a second command.
"""

from __future__ import annotations

import dataclasses
import typing
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import Enum, StrEnum
from typing import Any, TypeAlias

from app.domain import accounts, orders
from app.domain.money import fmt

SAGA = "order-payment"
# Who the saga's commands are issued by (the envelope's user id).
ACTOR = "saga:order-payment"
NAMESPACE = uuid.UUID("0b6f3f5e-3c1a-4b7e-9d0e-51a6a9c7e2d4")
REFUND_TRANSACTION = "order-refund:"
# Order and account event types the saga listens to (routing filters on them).
EVENT_TYPES = frozenset(
    {
        "OrderCreated",
        "PaymentProcessed",
        "OrderCancelled",
        "MoneyWithdrawn",
        "MoneyDeposited",
    }
)


class Step(StrEnum):
    """The commands a saga sends; each at most once per order."""

    WITHDRAW = "withdraw"
    PAY = "pay"
    CANCEL = "cancel"
    REFUND = "refund"


def command_id(order_id: str, step: Step) -> str:
    """The id of the saga's ``step`` command for ``order_id``: deterministic, so every
    retry or replay of the step carries the same id and the write side answers it
    once; the order id is kept at the end so results can be routed back by id."""
    token = uuid.uuid5(NAMESPACE, f"{SAGA}/{order_id}/{step.value}")
    return f"saga:{step.value}:{token}:{order_id}"


def parse_command_id(value: str) -> tuple[Step, str] | None:
    """(step, order id) of one of the saga's command ids; None for any other id."""
    parts = value.split(":", 3)
    if len(parts) != 4 or parts[0] != "saga":
        return None
    try:
        step = Step(parts[1])
    except ValueError:
        return None
    order_id = parts[3]
    return (step, order_id) if command_id(order_id, step) == value else None


def payment_transaction(order_id: str) -> str:
    # The one payment the orders decider takes on an order created with an account.
    return orders.account_payment_transaction(order_id)


def refund_transaction(order_id: str) -> str:
    return f"{REFUND_TRANSACTION}{order_id}"


# -- messages: what the saga learns, already routed to one order ----------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _Routed:
    """What every message carries: the order it is routed to, and when it happened."""

    order_id: str
    at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class _FromEvent(_Routed):
    """A message an event means: the event's id names the message."""

    event_id: str

    @property
    def message_id(self) -> str:
        return self.event_id


@dataclass(frozen=True, slots=True, kw_only=True)
class Created(_FromEvent):
    """An order was created with an account to charge."""

    correlation_id: str
    account_id: str
    amount_minor: int
    currency: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Withdrawn(_FromEvent):
    """The saga's withdrawal was accepted: the money is taken."""

    account_id: str
    amount_minor: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Deposited(_FromEvent):
    """The saga's refund reached the account."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Paid(_FromEvent):
    """The order recorded the saga's payment."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Cancelled(_FromEvent):
    """The order was cancelled, by the saga or by anyone else."""

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Refused(_Routed):
    """One of the saga's commands was rejected (from ``command-results``)."""

    command_id: str
    step: Step
    code: str
    message: str

    @property
    def message_id(self) -> str:
        # A command has exactly one result, so the command id names its result.
        return self.command_id


@dataclass(frozen=True, slots=True, kw_only=True)
class TimedOut(_Routed):
    """The saga's deadline passed (sent by the timer; the saga checks it again)."""

    deadline: datetime

    @property
    def message_id(self) -> str:
        return f"timeout:{self.order_id}@{self.deadline.isoformat()}"


Message: TypeAlias = (
    Created | Withdrawn | Deposited | Paid | Cancelled | Refused | TimedOut
)

MESSAGES: dict[str, type[Message]] = {
    cls.__name__: cls
    for cls in (Created, Withdrawn, Deposited, Paid, Cancelled, Refused, TimedOut)
}


# Account movements the saga follows only when its own command caused them.
OWN_MOVEMENTS = frozenset({"MoneyWithdrawn", "MoneyDeposited"})


def may_follow(event_type: str, command_id: str | None) -> bool:
    """Whether an event with this type and causing command (read from its headers,
    None when it has none) can mean anything to the saga: a look before decoding."""
    if event_type not in EVENT_TYPES:
        return False
    if event_type in OWN_MOVEMENTS and command_id is not None:
        return parse_command_id(command_id) is not None
    return True


def message_for_event(
    event: Any, *, event_id: str, correlation_id: str, command_id: str, at: datetime
) -> Message | None:
    """The saga message an order or account event means, or None if it is not one
    the saga follows. Account movements count only when the saga's own command
    caused them (their command id is the saga's)."""
    match event:
        case orders.OrderCreated(account_id=str(account_id)):
            return Created(
                order_id=event.order_id,
                event_id=event_id,
                correlation_id=correlation_id,
                account_id=account_id,
                amount_minor=event.total_minor,
                currency=event.currency,
                at=at,
            )
        case orders.PaymentProcessed(method="account") if (
            event.transaction_id == payment_transaction(event.order_id)
        ):
            return Paid(order_id=event.order_id, event_id=event_id, at=at)
        case orders.OrderCancelled():
            return Cancelled(
                order_id=event.order_id, event_id=event_id, reason=event.reason, at=at
            )
        case accounts.MoneyWithdrawn():
            found = parse_command_id(command_id)
            if found is None or found[0] is not Step.WITHDRAW:
                return None
            return Withdrawn(
                order_id=found[1],
                event_id=event_id,
                account_id=event.account_id,
                amount_minor=event.amount_minor,
                at=at,
            )
        case accounts.MoneyDeposited():
            found = parse_command_id(command_id)
            if found is None or found[0] is not Step.REFUND:
                return None
            return Deposited(order_id=found[1], event_id=event_id, at=at)
    return None


def message_for_result(
    *,
    command_id: str,
    accepted: bool,
    code: str | None,
    message: str | None,
    at: datetime,
) -> Refused | None:
    """A rejection of one of the saga's commands; None for anything else (an
    acceptance is followed by its events, which the saga reads instead)."""
    found = parse_command_id(command_id)
    if accepted or found is None:
        return None
    step, order_id = found
    return Refused(
        order_id=order_id,
        command_id=command_id,
        step=step,
        code=code or "Unknown",
        message=message or "",
        at=at,
    )


# -- state ----------------------------------------------------------------------------


class Phase(StrEnum):
    CHARGING = "CHARGING"  # Withdraw sent; waiting for the account or the deadline
    PAYING = "PAYING"  # money taken; ProcessPayment sent
    PAID = "PAID"  # the order recorded the payment (done)
    CANCELLING = "CANCELLING"  # CancelOrder sent: refused, timed out or not recordable
    CANCELLED = "CANCELLED"  # the order is cancelled (done, once the money is settled)


class Money(StrEnum):
    """Where the order's money is, as far as the saga knows."""

    NONE = "NONE"  # nothing to take (a zero total)
    REQUESTED = "REQUESTED"  # Withdraw sent, no answer yet
    TAKEN = "TAKEN"
    REFUSED = "REFUSED"
    REFUNDING = "REFUNDING"  # Deposit sent back
    REFUNDED = "REFUNDED"
    REFUND_REFUSED = "REFUND_REFUSED"  # the account refused the refund: a human's turn


@dataclass(frozen=True, slots=True, kw_only=True)
class Sent:
    command_id: str
    command_type: str
    causation_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    """One message the saga acted on, and what it did."""

    at: datetime
    message_id: str
    message_type: str
    note: str
    phase: Phase
    money: Money
    sent: tuple[Sent, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class SagaState:
    order_id: str
    correlation_id: str
    account_id: str
    amount_minor: int
    currency: str
    phase: Phase
    money: Money
    deadline: datetime | None
    reason: str | None
    started_at: datetime
    history: tuple[Entry, ...]

    @property
    def settled(self) -> bool:
        """Finished: the order is paid or cancelled, and no money is in flight."""
        return self.phase is Phase.PAID or (
            self.phase is Phase.CANCELLED
            and self.money not in (Money.REQUESTED, Money.TAKEN, Money.REFUNDING)
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Outgoing:
    """A command to send, with the envelope fields the saga decides."""

    command_id: str
    correlation_id: str
    causation_id: str
    issued_at: datetime
    command: accounts.Command | orders.Command


@dataclass(frozen=True, slots=True)
class Reaction:
    state: SagaState | None
    commands: tuple[Outgoing, ...] = ()


# -- the decider ----------------------------------------------------------------------


def react(state: SagaState | None, message: Message, *, timeout: timedelta) -> Reaction:
    """The saga's next state and the commands to send for ``message``.

    Pure and deterministic: time comes with the message, ids from the order and step.
    A message already acted on, or one that means nothing in the current phase,
    changes nothing and sends nothing.
    """
    if state is None:
        if isinstance(message, Created):
            return _start(message, timeout)
        return Reaction(None)  # not an order the saga charges
    if message.order_id != state.order_id:
        raise ValueError(
            f"message for order {message.order_id!r} given the saga of "
            f"{state.order_id!r}"
        )
    if any(entry.message_id == message.message_id for entry in state.history):
        return Reaction(state)
    match message:
        case Created():
            return Reaction(state)
        case Withdrawn():
            return _withdrawn(state, message)
        case Refused():
            return _refused(state, message)
        case TimedOut():
            return _timed_out(state, message)
        case Paid():
            if state.phase is not Phase.PAYING:
                return Reaction(state)
            return _record(state, message, "the order recorded the payment", Phase.PAID)
        case Cancelled():
            return _cancelled(state, message)
        case Deposited():
            if state.money is not Money.REFUNDING:
                return Reaction(state)
            return _record(
                state, message, "the refund reached the account", money=Money.REFUNDED
            )
    raise TypeError(f"not a saga message: {message!r}")  # pragma: no cover


def _start(message: Created, timeout: timedelta) -> Reaction:
    state = SagaState(
        order_id=message.order_id,
        correlation_id=message.correlation_id,
        account_id=message.account_id,
        amount_minor=message.amount_minor,
        currency=message.currency,
        phase=Phase.CHARGING,
        money=Money.REQUESTED,
        deadline=message.at + timeout,
        reason=None,
        started_at=message.at,
        history=(),
    )
    if message.amount_minor == 0:
        # Nothing to take (withdrawals must be positive): record the payment at once.
        return _record(
            replace(state, deadline=None),
            message,
            "zero total: recording the payment without a withdrawal",
            Phase.PAYING,
            Money.NONE,
            commands=(_pay(state, message, payment_id=message.event_id),),
        )
    return _record(
        state,
        message,
        f"charging {fmt(message.amount_minor, message.currency)} to account "
        f"{message.account_id}",
        commands=(
            _outgoing(
                state,
                message,
                Step.WITHDRAW,
                accounts.Withdraw(
                    account_id=state.account_id,
                    transaction_id=payment_transaction(state.order_id),
                    amount_minor=state.amount_minor,
                    currency=state.currency,
                    destination=f"order {state.order_id}",
                    reference=f"payment for order {state.order_id}",
                ),
            ),
        ),
    )


def _withdrawn(state: SagaState, message: Withdrawn) -> Reaction:
    if state.money is not Money.REQUESTED:
        return Reaction(state)
    if state.phase is Phase.CHARGING:
        return _record(
            replace(state, deadline=None),
            message,
            "money taken; recording the payment on the order",
            Phase.PAYING,
            Money.TAKEN,
            commands=(_pay(state, message, payment_id=message.event_id),),
        )
    # The order was cancelled (timed out, or by its owner) before the money came.
    return _record(
        state,
        message,
        "money taken after the order was given up: refunding it",
        money=Money.REFUNDING,
        commands=(_refund(state, message),),
    )


def _refused(state: SagaState, message: Refused) -> Reaction:
    why = f"{message.code}: {message.message}"
    match message.step:
        case Step.WITHDRAW if state.money is Money.REQUESTED:
            if state.phase is not Phase.CHARGING:
                return _record(
                    state, message, f"withdrawal refused ({why})", money=Money.REFUSED
                )
            reason = f"payment refused by account {state.account_id}: {why}"
            return _record(
                replace(state, deadline=None, reason=reason),
                message,
                f"withdrawal refused; cancelling the order ({why})",
                Phase.CANCELLING,
                Money.REFUSED,
                commands=(_cancel(state, message, reason),),
            )
        case Step.PAY if state.phase is Phase.PAYING:
            reason = f"payment could not be recorded: {why}"
            commands = [_cancel(state, message, reason)]
            money = state.money
            if state.money is Money.TAKEN:
                commands.insert(0, _refund(state, message))
                money = Money.REFUNDING
            return _record(
                replace(state, reason=reason),
                message,
                f"payment refused; refunding and cancelling the order ({why})",
                Phase.CANCELLING,
                money,
                commands=tuple(commands),
            )
        case Step.CANCEL:
            # Already cancelled (its event settles the saga) or moved on by someone
            # else; either way nothing the saga can fix by itself.
            return _record(state, message, f"cancellation refused ({why})")
        case Step.REFUND if state.money is Money.REFUNDING:
            return _record(
                state,
                message,
                f"refund refused ({why}); needs attention",
                money=Money.REFUND_REFUSED,
            )
    return Reaction(state)


def _timed_out(state: SagaState, message: TimedOut) -> Reaction:
    if (
        state.phase is not Phase.CHARGING
        or state.deadline is None
        or message.deadline != state.deadline
        or message.at < state.deadline
    ):
        return Reaction(state)
    waited = (state.deadline - state.started_at).total_seconds()
    reason = (
        f"payment timed out: no answer from account {state.account_id} "
        f"within {waited:g}s"
    )
    return _record(
        replace(state, deadline=None, reason=reason),
        message,
        "deadline passed; cancelling the order (a late withdrawal is refunded)",
        Phase.CANCELLING,
        commands=(_cancel(state, message, reason),),
    )


def _cancelled(state: SagaState, message: Cancelled) -> Reaction:
    if state.phase is Phase.CANCELLED:
        return Reaction(state)
    reason = state.reason or message.reason
    settled = replace(state, deadline=None, reason=reason)
    if state.money is Money.TAKEN:
        # Paid, or paying, and now cancelled: the money goes back where it came from.
        return _record(
            settled,
            message,
            "order cancelled after the money was taken: refunding it",
            Phase.CANCELLED,
            Money.REFUNDING,
            commands=(_refund(state, message),),
        )
    note = (
        "order cancelled; a withdrawal still answering will be refunded"
        if state.money is Money.REQUESTED
        else "order cancelled"
    )
    return _record(settled, message, note, Phase.CANCELLED)


# -- helpers --------------------------------------------------------------------------


def _record(
    state: SagaState,
    message: Message,
    note: str,
    phase: Phase | None = None,
    money: Money | None = None,
    *,
    commands: tuple[Outgoing, ...] = (),
) -> Reaction:
    phase = state.phase if phase is None else phase
    money = state.money if money is None else money
    entry = Entry(
        at=message.at,
        message_id=message.message_id,
        message_type=type(message).__name__,
        note=note,
        phase=phase,
        money=money,
        sent=tuple(
            Sent(
                command_id=c.command_id,
                command_type=type(c.command).__name__,
                causation_id=c.causation_id,
            )
            for c in commands
        ),
    )
    new = replace(state, phase=phase, money=money, history=(*state.history, entry))
    return Reaction(new, commands)


def _outgoing(
    state: SagaState,
    message: Message,
    step: Step,
    command: accounts.Command | orders.Command,
) -> Outgoing:
    return Outgoing(
        command_id=command_id(state.order_id, step),
        correlation_id=state.correlation_id,
        causation_id=message.message_id,
        issued_at=message.at,
        command=command,
    )


def _pay(state: SagaState, message: Message, *, payment_id: str) -> Outgoing:
    return _outgoing(
        state,
        message,
        Step.PAY,
        orders.ProcessPayment(
            order_id=state.order_id,
            payment_id=payment_id,
            amount_minor=state.amount_minor,
            currency=state.currency,
            method="account",
            transaction_id=payment_transaction(state.order_id),
        ),
    )


def _cancel(state: SagaState, message: Message, reason: str) -> Outgoing:
    return _outgoing(
        state,
        message,
        Step.CANCEL,
        orders.CancelOrder(order_id=state.order_id, reason=reason),
    )


def _refund(state: SagaState, message: Message) -> Outgoing:
    return _outgoing(
        state,
        message,
        Step.REFUND,
        accounts.Deposit(
            account_id=state.account_id,
            transaction_id=refund_transaction(state.order_id),
            amount_minor=state.amount_minor,
            currency=state.currency,
            source=f"order {state.order_id}",
            reference=f"refund for order {state.order_id}",
        ),
    )


# -- JSON: the saga table's values and the inbox's messages ---------------------------


def state_to_json(state: SagaState) -> dict[str, Any]:
    data: dict[str, Any] = _to_json(state)
    return data


def state_from_json(data: Mapping[str, Any]) -> SagaState:
    return _from_json(SagaState, data)


def message_to_json(message: Message) -> dict[str, Any]:
    return {"type": type(message).__name__, **_to_json(message)}


def message_from_json(data: Mapping[str, Any]) -> Message:
    """Raises ``ValueError`` for anything that is not a saga message."""
    fields = dict(data)
    kind = fields.pop("type", None)
    cls = MESSAGES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"not a saga message type: {kind!r}")
    return _from_json(cls, fields)


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)
        }
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple):
        return [_to_json(item) for item in value]
    return value


if typing.TYPE_CHECKING:
    from _typeshed import DataclassInstance

_T = typing.TypeVar("_T", bound="DataclassInstance")


def _from_json(cls: type[_T], data: Mapping[str, Any]) -> _T:
    if not isinstance(data, Mapping):
        raise ValueError(f"{cls.__name__}: expected an object, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    if set(data) != names:
        raise ValueError(
            f"{cls.__name__}: fields {sorted(data)} do not match {sorted(names)}"
        )
    return cls(**{name: _revive(hints[name], data[name], name) for name in names})


def _revive(tp: Any, value: Any, where: str) -> Any:
    args = typing.get_args(tp)
    if type(None) in args:
        inner = next(a for a in args if a is not type(None))
        return None if value is None else _revive(inner, value, where)
    if typing.get_origin(tp) is tuple:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return tuple(_revive(args[0], item, where) for item in value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _from_json(tp, value)
    if tp is datetime:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a timestamp, got {value!r}")
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            raise ValueError(f"{where}: timestamp without a time zone: {value!r}")
        return parsed
    if isinstance(tp, type) and issubclass(tp, Enum):
        return tp(value)
    if tp in (str, int) and (type(value) is not tp):
        raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value
