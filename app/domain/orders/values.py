"""Value objects of an order: what the client sends, what the events record."""

from __future__ import annotations

from dataclasses import dataclass

from app.domain.errors import optional_text, require_id, require_int, require_text
from app.domain.money import MAX_AMOUNT_MINOR

MAX_QUANTITY = 10_000
MAX_TAX_RATE_BPS = 10_000


@dataclass(frozen=True, slots=True, kw_only=True)
class LineItem:
    """A line as the client asks for it; its total is always computed here."""

    product_id: str
    quantity: int
    unit_price_minor: int
    tax_rate_bps: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderLine:
    """A validated line as recorded in events, with its computed total."""

    product_id: str
    quantity: int
    unit_price_minor: int
    tax_rate_bps: int
    total_price_minor: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Address:
    """A shipping address; ``state`` may be empty where a country has none."""

    street: str
    city: str
    state: str
    zip_code: str
    country: str


def line_total_minor(item: LineItem | OrderLine) -> int:
    """Quantity times unit price plus tax, the tax rounded half-up in integer math."""
    return _total(item.quantity, item.unit_price_minor, item.tax_rate_bps)


def _total(quantity: int, unit_price_minor: int, tax_rate_bps: int) -> int:
    net = quantity * unit_price_minor
    return net + (net * tax_rate_bps + 5000) // 10000


def to_order_line(item: LineItem, field: str) -> OrderLine:
    """Validate a client line (errors name ``field``) and price it."""
    product_id = require_id(item.product_id, f"{field}.product_id")
    quantity = require_int(item.quantity, f"{field}.quantity", 1, MAX_QUANTITY)
    unit_price = require_int(
        item.unit_price_minor, f"{field}.unit_price_minor", 0, MAX_AMOUNT_MINOR
    )
    tax_rate = require_int(
        item.tax_rate_bps, f"{field}.tax_rate_bps", 0, MAX_TAX_RATE_BPS
    )
    return OrderLine(
        product_id=product_id,
        quantity=quantity,
        unit_price_minor=unit_price,
        tax_rate_bps=tax_rate,
        total_price_minor=_total(quantity, unit_price, tax_rate),
    )


def validate_address(address: Address, field: str) -> Address:
    """Every part non-empty except ``state``; returned stripped."""
    return Address(
        street=require_text(address.street, f"{field}.street"),
        city=require_text(address.city, f"{field}.city"),
        state=optional_text(address.state, f"{field}.state"),
        zip_code=require_text(address.zip_code, f"{field}.zip_code"),
        country=require_text(address.country, f"{field}.country"),
    )
