"""An order's state and ``evolve``, the fold of its events."""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from typing import assert_never

from app.domain.orders import events
from app.domain.orders.values import OrderLine


class OrderStatus(StrEnum):
    NEW = "NEW"  # no events yet: the order does not exist
    CREATED = "CREATED"
    PAID = "PAID"
    SHIPPED = "SHIPPED"
    DELIVERED = "DELIVERED"
    CANCELLED = "CANCELLED"


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderState:
    version: int
    status: OrderStatus
    order_id: str
    customer_id: str
    items: tuple[OrderLine, ...]
    currency: str
    total_minor: int
    paid_minor: int
    account_id: str | None
    tracking_number: str | None


def initial_state() -> OrderState:
    """The state before any event: version 0, status NEW."""
    return OrderState(
        version=0,
        status=OrderStatus.NEW,
        order_id="",
        customer_id="",
        items=(),
        currency="",
        total_minor=0,
        paid_minor=0,
        account_id=None,
        tracking_number=None,
    )


def evolve(state: OrderState, event: events.Event) -> OrderState:
    """Apply one event. Events are facts: nothing is checked, only recorded."""
    state = replace(state, version=state.version + 1)
    match event:
        case events.OrderCreated():
            return replace(
                state,
                status=OrderStatus.CREATED,
                order_id=event.order_id,
                customer_id=event.customer_id,
                items=event.items,
                currency=event.currency,
                total_minor=event.total_minor,
                account_id=event.account_id,
            )
        case events.OrderItemAdded():
            return replace(
                state, items=(*state.items, event.item), total_minor=event.total_minor
            )
        case events.OrderItemRemoved():
            items = tuple(i for i in state.items if i.product_id != event.product_id)
            return replace(state, items=items, total_minor=event.total_minor)
        case events.PaymentProcessed():
            return replace(
                state,
                status=OrderStatus.PAID,
                paid_minor=state.paid_minor + event.amount_minor,
            )
        case events.OrderShipped():
            return replace(
                state,
                status=OrderStatus.SHIPPED,
                tracking_number=event.tracking_number,
            )
        case events.OrderDelivered():
            return replace(state, status=OrderStatus.DELIVERED)
        case events.OrderCancelled():
            return replace(state, status=OrderStatus.CANCELLED)
        case _:
            assert_never(event)
