"""Events an order records: facts, primitives only, one Avro record each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from app.domain.orders.values import Address, OrderLine


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderCreated:
    order_id: str
    customer_id: str
    customer_name: str
    customer_email: str
    items: tuple[OrderLine, ...]
    currency: str
    shipping_address: Address
    total_minor: int
    account_id: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderItemAdded:
    order_id: str
    item: OrderLine
    # The order's new total, so readers need not re-price the order.
    total_minor: int


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderItemRemoved:
    order_id: str
    product_id: str
    total_minor: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PaymentProcessed:
    order_id: str
    payment_id: str
    amount_minor: int
    currency: str
    method: str
    transaction_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderShipped:
    order_id: str
    tracking_number: str
    carrier: str


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderDelivered:
    order_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderCancelled:
    order_id: str
    reason: str
    # What was paid and must go back; 0 when cancelled before payment.
    refund_due_minor: int


Event: TypeAlias = (
    OrderCreated
    | OrderItemAdded
    | OrderItemRemoved
    | PaymentProcessed
    | OrderShipped
    | OrderDelivered
    | OrderCancelled
)

EVENTS: tuple[type[Event], ...] = (
    OrderCreated,
    OrderItemAdded,
    OrderItemRemoved,
    PaymentProcessed,
    OrderShipped,
    OrderDelivered,
    OrderCancelled,
)
