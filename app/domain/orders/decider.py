"""``decide`` for orders: turn a command into events, or refuse it.

An order created with an ``account_id`` is paid by the payment saga from that account,
at the total it was created with: its items stay as they are (no ``AddItem`` or
``RemoveItem``), and the one payment it takes is the saga's (method "account",
transaction ``account_payment_transaction``). Anything else would have the saga
charge an amount the order no longer has, or cancel an order paid another way.
Cancelling it stays allowed (the saga refunds what it took).
"""

from __future__ import annotations

from typing import TypeAlias, assert_never

from app.domain.errors import (
    MAX_REFERENCE_LENGTH,
    DomainError,
    ErrorCode,
    invalid,
    refuse_existing,
    require_existing,
    require_id,
    require_int,
    require_text,
)
from app.domain.money import MAX_LONG, fmt, require_currency
from app.domain.orders import commands, events
from app.domain.orders.state import OrderState, OrderStatus
from app.domain.orders.values import OrderLine, to_order_line, validate_address

# What a command decides: its events, in order (none: nothing to record).
Decided: TypeAlias = tuple[events.Event, ...]


def decide(state: OrderState, command: commands.Command) -> Decided:
    """The events ``command`` produces from ``state``; raises ``DomainError``.

    Checks run in a fixed order: existence, status, field validation, business rules.
    """
    match command:
        case commands.CreateOrder():
            return _create(state, command)
        case commands.AddItem():
            return _add_item(_existing(state, command.order_id), command)
        case commands.RemoveItem():
            return _remove_item(_existing(state, command.order_id), command)
        case commands.ProcessPayment():
            return _pay(_existing(state, command.order_id), command)
        case commands.ShipOrder():
            return _ship(_existing(state, command.order_id), command)
        case commands.DeliverOrder():
            return _deliver(_existing(state, command.order_id))
        case commands.CancelOrder():
            return _cancel(_existing(state, command.order_id), command)
        case _:
            assert_never(command)


def _existing(state: OrderState, order_id: str) -> OrderState:
    require_existing(
        "order", state.status is not OrderStatus.NEW, order_id, state.order_id
    )
    return state


def _require_status(state: OrderState, action: str, *allowed: OrderStatus) -> None:
    if state.status not in allowed:
        raise DomainError(
            ErrorCode.INVALID_STATE,
            f"cannot {action} a {state.status.value} order",
        )


def _refuse_on_a_saga_paid_order(state: OrderState, action: str) -> None:
    """The payment saga pays an order created with an account, at its created
    total: nothing else may change what it charges."""
    if state.account_id is not None:
        raise DomainError(
            ErrorCode.INVALID_STATE,
            f"cannot {action} order {state.order_id}: the payment saga pays it from "
            f"account {state.account_id} (transaction "
            f"{commands.account_payment_transaction(state.order_id)}), at the total "
            "it was created with",
        )


def _order_total(items: tuple[OrderLine, ...], field: str) -> int:
    total = sum(line.total_price_minor for line in items)
    if total > MAX_LONG:
        raise invalid(field, f"bring the order total to {total}, beyond {MAX_LONG}")
    return total


def _create(state: OrderState, command: commands.CreateOrder) -> Decided:
    refuse_existing("order", state.status is not OrderStatus.NEW, command.order_id)
    order_id = require_id(command.order_id, "order_id")
    customer_id = require_id(command.customer_id, "customer_id")
    customer_name = require_text(command.customer_name, "customer_name")
    customer_email = _require_email(command.customer_email, "customer_email")
    if not command.items:
        raise invalid("items", "must hold at least one item")
    lines: list[OrderLine] = []
    seen: set[str] = set()
    for index, item in enumerate(command.items):
        line = to_order_line(item, f"items[{index}]")
        if line.product_id in seen:
            raise invalid(
                f"items[{index}].product_id",
                f"repeats product {line.product_id!r}; combine the quantities",
            )
        seen.add(line.product_id)
        lines.append(line)
    items = tuple(lines)
    currency = require_currency(command.currency)
    address = validate_address(command.shipping_address, "shipping_address")
    account_id = (
        None
        if command.account_id is None
        else require_id(command.account_id, "account_id")
    )
    return (
        events.OrderCreated(
            order_id=order_id,
            customer_id=customer_id,
            customer_name=customer_name,
            customer_email=customer_email,
            items=items,
            currency=currency,
            shipping_address=address,
            total_minor=_order_total(items, "items"),
            account_id=account_id,
        ),
    )


def _require_email(value: str, field: str) -> str:
    email = require_text(value, field)
    local, at, domain = email.partition("@")
    if not at or not local or not domain or "@" in domain:
        raise invalid(
            field, f"must hold one '@' with text on both sides, got {email!r}"
        )
    return email


def _add_item(state: OrderState, command: commands.AddItem) -> Decided:
    _require_status(state, "add items to", OrderStatus.CREATED)
    _refuse_on_a_saga_paid_order(state, "add items to")
    line = to_order_line(command.item, "item")
    if any(existing.product_id == line.product_id for existing in state.items):
        raise invalid(
            "item.product_id",
            f"{line.product_id!r} is already in the order; remove it first",
        )
    total = _order_total((*state.items, line), "item")
    return (
        events.OrderItemAdded(order_id=state.order_id, item=line, total_minor=total),
    )


def _remove_item(state: OrderState, command: commands.RemoveItem) -> Decided:
    _require_status(state, "remove items from", OrderStatus.CREATED)
    _refuse_on_a_saga_paid_order(state, "remove items from")
    product_id = require_id(command.product_id, "product_id")
    remaining = tuple(i for i in state.items if i.product_id != product_id)
    if len(remaining) == len(state.items):
        raise invalid("product_id", f"{product_id!r} is not in the order")
    if not remaining:
        raise DomainError(
            ErrorCode.INVALID_STATE,
            "an order keeps at least one item; cancel it instead",
        )
    return (
        events.OrderItemRemoved(
            order_id=state.order_id,
            product_id=product_id,
            total_minor=_order_total(remaining, "product_id"),
        ),
    )


def _pay(state: OrderState, command: commands.ProcessPayment) -> Decided:
    _require_status(state, "pay for", OrderStatus.CREATED)
    if not _is_the_sagas_payment(state, command):
        _refuse_on_a_saga_paid_order(state, f"pay by {command.method!r} for")
    payment_id = require_id(command.payment_id, "payment_id", MAX_REFERENCE_LENGTH)
    transaction_id = require_id(
        command.transaction_id, "transaction_id", MAX_REFERENCE_LENGTH
    )
    if command.method not in commands.PAYMENT_METHODS:
        raise invalid(
            "method",
            f"must be one of {', '.join(sorted(commands.PAYMENT_METHODS))}, "
            f"got {command.method!r}",
        )
    if command.method == "account" and state.account_id is None:
        raise invalid("method", "'account' needs an order created with an account_id")
    currency = require_currency(command.currency)
    amount = require_int(command.amount_minor, "amount_minor", 0, MAX_LONG)
    if currency != state.currency:
        raise DomainError(
            ErrorCode.CURRENCY_MISMATCH,
            f"payment currency {currency} does not match order currency "
            f"{state.currency}",
            "currency",
        )
    if amount != state.total_minor:
        raise DomainError(
            ErrorCode.PAYMENT_MISMATCH,
            f"payment {fmt(amount, currency)} does not match order total "
            f"{fmt(state.total_minor, state.currency)}",
            "amount_minor",
        )
    return (
        events.PaymentProcessed(
            order_id=state.order_id,
            payment_id=payment_id,
            amount_minor=amount,
            currency=currency,
            method=command.method,
            transaction_id=transaction_id,
        ),
    )


def _is_the_sagas_payment(state: OrderState, command: commands.ProcessPayment) -> bool:
    return command.method == "account" and (
        command.transaction_id == commands.account_payment_transaction(state.order_id)
    )


def _ship(state: OrderState, command: commands.ShipOrder) -> Decided:
    _require_status(state, "ship", OrderStatus.PAID)
    return (
        events.OrderShipped(
            order_id=state.order_id,
            tracking_number=require_text(command.tracking_number, "tracking_number"),
            carrier=require_text(command.carrier, "carrier"),
        ),
    )


def _deliver(state: OrderState) -> Decided:
    _require_status(state, "deliver", OrderStatus.SHIPPED)
    return (events.OrderDelivered(order_id=state.order_id),)


def _cancel(state: OrderState, command: commands.CancelOrder) -> Decided:
    _require_status(state, "cancel", OrderStatus.CREATED, OrderStatus.PAID)
    return (
        events.OrderCancelled(
            order_id=state.order_id,
            reason=require_text(command.reason, "reason"),
            refund_due_minor=state.paid_minor,
        ),
    )
