"""JSON request bodies checked against an Avro schema before anything is produced.

A body is plain JSON in the shape of the record: a union such as ``["null", "string"]``
takes ``null`` or a string as they are (not Avro's JSON encoding ``{"string": …}``).
Every problem raises ``BodyError`` naming the field, e.g. ``items[0].quantity``; what
passes comes back with the schema's defaults filled in, ready for the mapper.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

INT_RANGE = (-(2**31), 2**31 - 1)
LONG_RANGE = (-(2**63), 2**63 - 1)
PRIMITIVES = frozenset(
    {"null", "boolean", "int", "long", "float", "double", "string", "bytes"}
)
_NAMED = frozenset({"record", "error", "enum", "fixed"})


class BodyError(ValueError):
    """A body does not fit its schema; ``field`` is the path of what does not
    (``None`` for the body as a whole)."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


def named_types(schema: Any) -> dict[str, dict[str, Any]]:
    """Every named type (record, enum, fixed) a schema defines, by full name."""
    return {str(node["name"]): node for node in _walk(schema)}


def _walk(schema: Any) -> Iterator[dict[str, Any]]:
    if isinstance(schema, list):
        for branch in schema:
            yield from _walk(branch)
        return
    if not isinstance(schema, dict):
        return
    kind = schema["type"]
    if kind in _NAMED:
        yield schema
    if kind in ("record", "error"):
        for field in schema["fields"]:
            yield from _walk(field["type"])
    elif kind == "array":
        yield from _walk(schema["items"])
    elif kind == "map":
        yield from _walk(schema["values"])
    elif isinstance(kind, dict | list):
        yield from _walk(kind)


def conform(
    schema: Any, value: Any, named: Mapping[str, dict[str, Any]], path: str = ""
) -> Any:
    """``value`` (decoded JSON) checked against ``schema`` (a fastavro-parsed schema,
    whose named types ``named`` holds), defaults filled in; raises ``BodyError``."""
    if isinstance(schema, str):
        if schema in PRIMITIVES:
            return _primitive(schema, value, path)
        return conform(named[schema], value, named, path)
    if isinstance(schema, list):
        return _union(schema, value, named, path)
    kind = schema["type"]
    if kind in ("record", "error"):
        return _record(schema, value, named, path)
    if kind == "array":
        if not isinstance(value, list):
            raise BodyError(path or None, f"expected a list, got {_shown(value)}")
        return [
            conform(schema["items"], item, named, f"{path}[{index}]")
            for index, item in enumerate(value)
        ]
    if kind == "map":
        if not isinstance(value, dict):
            raise BodyError(path or None, f"expected an object, got {_shown(value)}")
        return {
            key: conform(schema["values"], item, named, f"{path}[{key!r}]")
            for key, item in value.items()
        }
    if kind == "enum":
        if value not in schema["symbols"]:
            allowed = ", ".join(schema["symbols"])
            raise BodyError(
                path or None, f"must be one of {allowed}, got {_shown(value)}"
            )
        return value
    if schema.get("logicalType") == "timestamp-millis" and kind == "long":
        return _timestamp(value, path)
    if isinstance(kind, str) and kind in PRIMITIVES:
        return _primitive(kind, value, path)
    return conform(kind, value, named, path)


def _record(
    schema: dict[str, Any], value: Any, named: Mapping[str, Any], path: str
) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BodyError(path or None, f"expected an object, got {_shown(value)}")
    prefix = f"{path}." if path else ""
    fields = {field["name"]: field for field in schema["fields"]}
    for key in value:
        if key not in fields:
            known = ", ".join(fields) or "no fields"
            raise BodyError(
                f"{prefix}{key}", f"is not a field here (the fields are {known})"
            )
    out: dict[str, Any] = {}
    for name, field in fields.items():
        if name in value:
            out[name] = conform(field["type"], value[name], named, f"{prefix}{name}")
        elif "default" in field:
            out[name] = field["default"]
        else:
            raise BodyError(f"{prefix}{name}", "is missing")
    return out


def _union(branches: list[Any], value: Any, named: Mapping[str, Any], path: str) -> Any:
    if value is None:
        if "null" in branches:
            return None
        raise BodyError(path or None, "must not be null")
    others = [b for b in branches if b != "null"]
    problems: list[BodyError] = []
    for branch in others:
        try:
            return conform(branch, value, named, path)
        except BodyError as error:
            problems.append(error)
    if len(problems) == 1:
        raise problems[0]
    raise BodyError(
        path or None,
        f"fits none of {', '.join(describe(b) for b in others)}: {_shown(value)}",
    )


def _primitive(kind: str, value: Any, path: str) -> Any:
    where = path or None
    if kind == "null":
        if value is not None:
            raise BodyError(where, f"must be null, got {_shown(value)}")
        return None
    if kind == "boolean":
        if not isinstance(value, bool):
            raise BodyError(where, f"expected true or false, got {_shown(value)}")
        return value
    if kind in ("int", "long"):
        low, high = INT_RANGE if kind == "int" else LONG_RANGE
        # bool is an int subclass in Python; true is not a 1 here. A number with
        # no fraction (2.0) is a whole number, as JSON Schema's "integer" has it.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise BodyError(where, f"expected a whole number, got {_shown(value)}")
        if not low <= value <= high:
            raise BodyError(where, f"must be between {low} and {high}, got {value}")
        return value
    if kind in ("float", "double"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BodyError(where, f"expected a number, got {_shown(value)}")
        return float(value)
    if kind == "string":
        if not isinstance(value, str):
            raise BodyError(where, f"expected a string, got {_shown(value)}")
        return value
    raise TypeError(f"{kind} has no JSON form in request bodies")


def _timestamp(value: Any, path: str) -> datetime:
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            parsed = None
        if parsed is not None and parsed.tzinfo is not None:
            return parsed
    raise BodyError(
        path or None,
        f"expected an ISO 8601 date and time with its offset, got {_shown(value)}",
    )


def describe(schema: Any) -> str:
    """A schema in a few words, for messages: ``a string``, ``LineItem``…"""
    if isinstance(schema, str):
        return _WORDS.get(schema, schema.rpartition(".")[2])
    if isinstance(schema, list):
        return " or ".join(describe(b) for b in schema)
    kind = schema["type"]
    if kind in _NAMED:
        return str(schema["name"]).rpartition(".")[2]
    if kind == "array":
        return f"a list of {describe(schema['items'])}"
    if kind == "map":
        return f"an object of {describe(schema['values'])}"
    return describe(kind)


_WORDS = {
    "null": "null",
    "boolean": "true or false",
    "int": "a whole number",
    "long": "a whole number",
    "float": "a number",
    "double": "a number",
    "string": "a string",
}


def _shown(value: Any) -> str:
    """A JSON value for a message, cut short: never a whole large body."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."
