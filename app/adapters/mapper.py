"""Frozen dataclasses ↔ the plain dicts the codec reads and writes, in one place.

Field types are read once per class with ``typing.get_type_hints``; a dict that does
not fit its class raises ``MappingError`` naming the field path, e.g.
``items[0].quantity``, the same way domain errors name fields.
"""

from __future__ import annotations

import dataclasses
import hashlib
import types
import typing
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from enum import Enum
from functools import cache
from typing import Any, TypeVar

import orjson

T = TypeVar("T")

_ToDict = Callable[[Any], Any]
_FromDict = Callable[[Any, str], Any]
_MISSING = dataclasses.MISSING


class MappingError(ValueError):
    """A record does not fit its dataclass; ``path`` is the field that does not,
    e.g. ``items[0].quantity`` ("" for the record itself)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message

    @property
    def field(self) -> str:
        """The same as ``path``: the name ``command-results`` gives it."""
        return self.path


def to_dict(obj: Any) -> dict[str, Any]:
    """A frozen dataclass instance as a dict of primitives, lists and dicts."""
    out: dict[str, Any] = {}
    cls: type = type(obj)
    for name, to, _ in _plan(cls).fields:
        value = getattr(obj, name)
        out[name] = value if to is None else to(value)
    return out


def fingerprint(command: Any) -> str:
    """A digest (SHA-256, hex) of a command's type and fields, without its envelope
    (no id, no time of sending): the same for the same request, whoever builds the
    command from it; what tells a command id sent again with another payload
    apart (``Idempotency-Key``)."""
    canonical = orjson.dumps(
        [type(command).__name__, to_dict(command)], option=orjson.OPT_SORT_KEYS
    )
    return hashlib.sha256(canonical).hexdigest()


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """``cls`` built from ``data``; unknown, missing or mistyped keys raise."""
    built: T = _from_dict(cls, data, "")
    return built


def utc(value: datetime) -> datetime:
    """``value`` with its time zone, UTC where it has none (a timestamp-millis read
    without one)."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def event_record(event: Any, metadata: dict[str, Any]) -> dict[str, Any]:
    """The Avro record of a domain event: ``{"metadata": ..., **payload}``."""
    return {"metadata": metadata, **to_dict(event)}


def command_record(command: Any, envelope: dict[str, Any]) -> dict[str, Any]:
    """The Avro record of a domain command: ``{"envelope": ..., **payload}``."""
    return {"envelope": envelope, **to_dict(command)}


def split_event(record: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metadata, payload) of an event record; ``from_dict`` turns the payload back."""
    return _split(record, "metadata")


def split_command(record: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(envelope, payload) of a command record."""
    return _split(record, "envelope")


def _split(
    record: Mapping[str, Any], head: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    if not isinstance(record, Mapping):
        raise MappingError("", f"expected a record, got {type(record).__name__}")
    try:
        first = record[head]
    except KeyError:
        raise MappingError(head, "is missing") from None
    if not isinstance(first, dict):
        raise MappingError(head, f"expected a record, got {type(first).__name__}")
    return first, {k: v for k, v in record.items() if k != head}


# -- compiled per class -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Plan:
    # (name, to-dict converter or None for primitives, from-dict converter)
    fields: tuple[tuple[str, _ToDict | None, _FromDict], ...]
    names: frozenset[str]
    # Fields a record may leave out because the dataclass has a default.
    optional: frozenset[str]


def _from_dict(cls: type, data: Any, path: str) -> Any:
    plan = _plan(cls)
    if not isinstance(data, Mapping):
        raise MappingError(
            path, f"expected a record for {cls.__name__}, got {type(data).__name__}"
        )
    prefix = f"{path}." if path else ""
    kwargs: dict[str, Any] = {}
    for name, _, convert in plan.fields:
        try:
            value = data[name]
        except KeyError:
            if name in plan.optional:
                continue
            raise MappingError(f"{prefix}{name}", "is missing") from None
        kwargs[name] = convert(value, f"{prefix}{name}")
    if len(kwargs) != len(data):  # every key that names a field was taken
        unknown = sorted(str(k) for k in data if k not in plan.names)
        raise MappingError(f"{prefix}{unknown[0]}", f"is not a field of {cls.__name__}")
    return cls(**kwargs)


@cache
def _plan(cls: type) -> _Plan:
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = []
    optional = set()
    for field in dataclasses.fields(cls):
        to, convert = _converters(hints[field.name], f"{cls.__qualname__}.{field.name}")
        fields.append((field.name, to, convert))
        if field.default is not _MISSING or field.default_factory is not _MISSING:
            optional.add(field.name)
    return _Plan(
        fields=tuple(fields),
        names=frozenset(name for name, _, _ in fields),
        optional=frozenset(optional),
    )


def _converters(tp: Any, where: str) -> tuple[_ToDict | None, _FromDict]:
    """How one field type goes to a dict (None: unchanged) and comes back, checked."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(tp)
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1 or len(args) != 2:
            raise TypeError(f"{where}: only `X | None` unions map to Avro, not {tp}")
        to, convert = _converters(inner[0], where)
        return _optional(to), lambda v, path: None if v is None else convert(v, path)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"{where}: only tuple[X, ...] maps to an Avro array")
        to, convert = _converters(args[0], where)
        return (
            (lambda v: list(v)) if to is None else (lambda v: [to(x) for x in v]),
            _sequence(convert),
        )
    if isinstance(tp, type):
        if dataclasses.is_dataclass(tp):
            return to_dict, lambda v, path: _from_dict(tp, v, path)
        if issubclass(tp, Enum):
            return (lambda v: v.value), _enum(tp)
        if tp is bool:
            return None, _exact(bool, "a boolean")
        if tp is int:
            return None, _int
        if tp is str:
            return None, _exact(str, "a string")
        if tp is datetime:
            return None, _exact(datetime, "a datetime")
    # float is refused on purpose: money is never a float.
    raise TypeError(f"{where}: {tp!r} has no Avro mapping here")


def _optional(to: _ToDict | None) -> _ToDict | None:
    if to is None:
        return None
    inner = to
    return lambda v: None if v is None else inner(v)


def _sequence(convert: _FromDict) -> _FromDict:
    def from_list(value: Any, path: str) -> tuple[Any, ...]:
        if not isinstance(value, list | tuple):
            raise MappingError(path, f"expected a list, got {type(value).__name__}")
        return tuple(convert(item, f"{path}[{i}]") for i, item in enumerate(value))

    return from_list


def _exact(kind: type, label: str) -> _FromDict:
    def check(value: Any, path: str) -> Any:
        if not isinstance(value, kind):
            raise MappingError(path, f"expected {label}, got {value!r}")
        return value

    return check


def _int(value: Any, path: str) -> int:
    # bool is an int subclass; True as an amount is a bug upstream, not a 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise MappingError(path, f"expected a whole number, got {value!r}")
    return value


def _enum(cls: type[Enum]) -> _FromDict:
    def convert(value: Any, path: str) -> Enum:
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in cls)
            raise MappingError(path, f"{value!r} is not one of {allowed}") from None

    return convert
