"""What the console shows of a Kafka record and an event: JSON-ready dictionaries.
Pure but for ``decode``, which is handed in (it may ask the schema registry)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from app.deadletters import Action, DeadLetter, standing

# The bytes shown as hex; a longer value is cut (its length is given).
HEX_SHOWN = 4096


def jsonable(value: Any) -> Any:
    """Decimals, datetimes and UUIDs as the strings JSON has for them."""
    return orjson.loads(
        orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS)
    )


def header_text(value: bytes | None) -> str | None:
    if value is None:
        return None
    try:
        return value.decode()
    except UnicodeDecodeError:
        return "0x" + value.hex()


def headers_dict(headers: Mapping[str, bytes | None]) -> dict[str, str | None]:
    return {name: header_text(value) for name, value in headers.items()}


def decoded_value(
    value: bytes | None, decode: Callable[[bytes], dict[str, Any]]
) -> dict[str, Any]:
    """The value as Streamfold reads it: an Avro record (``decode``), else JSON
    (the saga's inbox), else what went wrong."""
    if value is None:
        return {"error": "no value"}
    try:
        return {"format": "avro", **jsonable(decode(value))}
    except Exception as error:  # noqa: BLE001 - any failure is shown, not raised
        avro_error = f"{type(error).__name__}: {error}"
    try:
        return {"format": "json", "data": json.loads(value)}
    except (UnicodeDecodeError, ValueError):
        return {"error": avro_error}


def dead_letter(
    letter: DeadLetter,
    decided: Mapping[str, Action],
    decode: Callable[[bytes], dict[str, Any]],
) -> dict[str, Any]:
    value = letter.value or b""
    action = decided.get(letter.id)
    return {
        "id": letter.id,
        "topic": letter.topic,
        "partition": letter.partition,
        "offset": letter.offset,
        "kind": letter.kind,
        "dead_lettered_at": datetime.fromtimestamp(
            letter.timestamp_ms / 1000, UTC
        ).isoformat(),
        "reason": letter.reason,
        "projection": letter.projection,
        "source": {
            "topic": letter.source_topic,
            "partition": letter.source_partition,
            "offset": letter.source_offset,
        },
        "key": header_text(letter.key),
        "aggregate_id": letter.aggregate_id,
        "headers": [[n, header_text(v)] for n, v in letter.headers],
        "size": len(value),
        "hex": value[:HEX_SHOWN].hex(),
        "decoded": decoded_value(letter.value, decode),
        "standing": standing(letter, dict(decided)),
        "action": action.to_dict() if action else None,
    }
