"""The order aggregate as a decider: commands, events, state, decide, evolve."""

from __future__ import annotations

from app.domain.orders.commands import (
    COMMANDS,
    PAYMENT_METHODS,
    AddItem,
    CancelOrder,
    Command,
    CreateOrder,
    DeliverOrder,
    ProcessPayment,
    RemoveItem,
    ShipOrder,
    account_payment_transaction,
)
from app.domain.orders.decider import decide
from app.domain.orders.events import (
    EVENTS,
    Event,
    OrderCancelled,
    OrderCreated,
    OrderDelivered,
    OrderItemAdded,
    OrderItemRemoved,
    OrderShipped,
    PaymentProcessed,
)
from app.domain.orders.state import OrderState, OrderStatus, evolve, initial_state
from app.domain.orders.values import Address, LineItem, OrderLine, line_total_minor

AGGREGATE_TYPE = "order"

__all__ = [
    "AGGREGATE_TYPE",
    "COMMANDS",
    "EVENTS",
    "PAYMENT_METHODS",
    "AddItem",
    "Address",
    "CancelOrder",
    "Command",
    "CreateOrder",
    "DeliverOrder",
    "Event",
    "LineItem",
    "OrderCancelled",
    "OrderCreated",
    "OrderDelivered",
    "OrderItemAdded",
    "OrderItemRemoved",
    "OrderLine",
    "OrderShipped",
    "OrderState",
    "OrderStatus",
    "PaymentProcessed",
    "ProcessPayment",
    "RemoveItem",
    "ShipOrder",
    "account_payment_transaction",
    "decide",
    "evolve",
    "initial_state",
    "line_total_minor",
]
