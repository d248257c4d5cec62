"""Commands an order accepts: intentions, validated by ``decide``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from app.domain.orders.values import Address, LineItem

PAYMENT_METHODS = frozenset({"credit_card", "paypal", "bank_transfer", "account"})


def account_payment_transaction(order_id: str) -> str:
    """The transaction id of the one payment an order created with an ``account_id``
    takes: the payment saga's, by method "account" (``app/application/saga.py``)."""
    return f"order-payment:{order_id}"


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateOrder:
    order_id: str
    customer_id: str
    customer_name: str
    customer_email: str
    items: tuple[LineItem, ...]
    currency: str
    shipping_address: Address
    account_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AddItem:
    order_id: str
    item: LineItem


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoveItem:
    order_id: str
    product_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessPayment:
    order_id: str
    payment_id: str
    amount_minor: int
    currency: str
    method: str
    transaction_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ShipOrder:
    order_id: str
    tracking_number: str
    carrier: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliverOrder:
    order_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelOrder:
    order_id: str
    reason: str


Command: TypeAlias = (
    CreateOrder
    | AddItem
    | RemoveItem
    | ProcessPayment
    | ShipOrder
    | DeliverOrder
    | CancelOrder
)

COMMANDS: tuple[type[Command], ...] = (
    CreateOrder,
    AddItem,
    RemoveItem,
    ProcessPayment,
    ShipOrder,
    DeliverOrder,
    CancelOrder,
)
