"""OrderCreated as its schema versions 1 and 2 wrote it (without the metadata): the
upcasters' tests step these records up, the codec's tests decode them."""

from __future__ import annotations

from typing import Any

ORDER_CREATED_V1: dict[str, Any] = {
    "order_id": "o-1",
    "customer_id": "c-1",
    "items": [
        {"product_id": "p-1", "quantity": 3, "unit_price_minor": 250},
        {"product_id": "p-2", "quantity": 1, "unit_price_minor": 1999},
    ],
    "total_minor": 2749,
    "shipping_address": "742 Evergreen Terrace, Springfield, OR, 97403, USA",
}

ORDER_CREATED_V2: dict[str, Any] = {
    "order_id": "o-1",
    "customer_id": "c-1",
    "items": [
        # Written by v2 without its line total (-1 means "not recorded")...
        {
            "product_id": "p-1",
            "quantity": 3,
            "unit_price_minor": 333,
            "tax_rate_bps": 750,
            "total_price_minor": -1,
        },
        # ...and with it.
        {
            "product_id": "p-2",
            "quantity": 1,
            "unit_price_minor": 100,
            "tax_rate_bps": 0,
            "total_price_minor": 100,
        },
    ],
    "total_minor": 1174,
    "shipping_address": "1 Main St, Springfield, IL, 62701",
    "currency": "CAD",
}
