"""Avro record schemas written out for the registry's tests (the compatibility
checks and the registry server)."""

from __future__ import annotations

import json
from typing import Any

ID = {"name": "order_id", "type": "string"}
AMOUNT = {"name": "amount", "type": "long"}


def record(*fields: dict[str, Any], name: str = "OrderPlaced") -> str:
    """A record schema's text with ``fields``, in the orders namespace."""
    return json.dumps(
        {
            "type": "record",
            "name": name,
            "namespace": "streamfold.orders",
            "fields": list(fields),
        }
    )
