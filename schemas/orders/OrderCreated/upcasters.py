"""Semantic steps between ``OrderCreated`` versions: pure ``dict -> dict`` functions.

v1 wrote the address as one string and no line totals; v2 structured both and added
the currency; v3 added the customer's name, email and paying account.
"""

from __future__ import annotations

from typing import Any

# v2 writers record -1 for "line total not recorded"; readers compute it.
NOT_RECORDED = -1


def upcast_v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    """Parse the address string, price each line, and assume USD (v1 was US-only)."""
    items = [
        {
            "product_id": item["product_id"],
            "quantity": item["quantity"],
            "unit_price_minor": item["unit_price_minor"],
            "tax_rate_bps": 0,
            "total_price_minor": item["quantity"] * item["unit_price_minor"],
        }
        for item in data["items"]
    ]
    return {
        "metadata": data["metadata"],
        "order_id": data["order_id"],
        "customer_id": data["customer_id"],
        "items": items,
        "total_minor": data["total_minor"],
        "shipping_address": parse_address(data["shipping_address"]),
        "currency": "USD",
    }


def upcast_v2_to_v3(data: dict[str, Any]) -> dict[str, Any]:
    """Fill the customer fields, structure a leftover string address, price lines."""
    address = data["shipping_address"]
    return {
        "metadata": data["metadata"],
        "order_id": data["order_id"],
        "customer_id": data["customer_id"],
        # v2 never knew them; "" says "not recorded" without inventing a customer.
        "customer_name": "",
        "customer_email": "",
        "items": [_priced(item) for item in data["items"]],
        "currency": data["currency"],
        "shipping_address": (
            parse_address(address) if isinstance(address, str) else address
        ),
        "total_minor": data["total_minor"],
        "account_id": None,
    }


def parse_address(text: str) -> dict[str, str]:
    """``"street, city, state, zip, country"`` as an Address record.

    Missing parts become "" and a missing country "USA", as v1 writers meant. Extra
    leading parts belong to the street ("Apt 4, 1 Main St, ...").
    """
    parts = [part.strip() for part in text.split(",")]
    if len(parts) > 5:
        parts = [", ".join(parts[:-4]), *parts[-4:]]
    parts += [""] * (5 - len(parts))
    street, city, state, zip_code, country = parts
    return {
        "street": street,
        "city": city,
        "state": state,
        "zip_code": zip_code,
        "country": country or "USA",
    }


def _priced(item: dict[str, Any]) -> dict[str, Any]:
    if item["total_price_minor"] != NOT_RECORDED:
        return item
    return {**item, "total_price_minor": _line_total(item)}


def _line_total(item: dict[str, Any]) -> int:
    # The pricing rule in force when v2 was written, frozen here on purpose: history
    # must not change if the domain's rule does. Tax is rounded half-up.
    net: int = item["quantity"] * item["unit_price_minor"]
    tax_rate_bps: int = item["tax_rate_bps"]
    return net + (net * tax_rate_bps + 5000) // 10000
