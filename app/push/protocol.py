"""The ``/ws`` protocol's pure parts: parsing a client's request, matching an event
to a subscription, and the per-partition cursor that makes a resumed subscription
see every event once.

A position is, per partition of the event topics, the next offset a subscription
wants: it has seen every matching event below it. The live feed's position is the
next offset it will hand over. A subscription that starts behind the feed reads
``[cursor, live)`` from the log, partition by partition, and moves its cursor to
``live`` once read; it joins the feed when its cursor has reached the feed's
position on every partition, so the log covers what is below and the feed what is
above, and ``Cursor.takes`` drops anything the two hand over twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from app import params as checked

TP = tuple[str, int]
# What a subscription may follow, one per subscription.
FILTERS = ("aggregate_id", "correlation_id", "event_type")
# The Kafka headers that repeat each filter's field (see app.adapters.codec).
HEADER_OF = {
    "aggregate_id": "aggregate-id",
    "correlation_id": "correlation-id",
    "event_type": "event-type",
}
# Requests are small; a longer text is refused before it is parsed.
MAX_REQUEST_BYTES = 65_536


class BadRequest(ValueError):
    """A request the server cannot act on; ``field`` names what was wrong in it
    (None when it is not a JSON object at all)."""

    def __init__(
        self, field: str | None, message: str, request_id: str | None = None
    ) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message
        self.request_id = request_id


@dataclass(frozen=True, slots=True)
class Filter:
    """Which events a subscription follows: those whose ``field`` is ``value``."""

    field: str
    value: str

    def matches(self, keys: Mapping[str, str]) -> bool:
        return keys.get(self.field) == self.value


@dataclass(frozen=True, slots=True)
class Subscribe:
    id: str
    filter: Filter
    # Where to resume (every partition of the event topics); None: from now.
    start: dict[TP, int] | None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    id: str


Request = Subscribe | Unsubscribe

_TAKES = {
    "subscribe": ("type", "id", *FILTERS, "from"),
    "unsubscribe": ("type", "id"),
}


def parse(
    text: str | bytes, partitions: Mapping[str, int], event_types: Iterable[str]
) -> Request:
    """The request in a client's text frame; ``BadRequest`` naming the field at
    fault. ``partitions`` gives each event topic's partition count (what ``from``
    must cover); ``event_types`` the event types there are."""
    if len(text) > MAX_REQUEST_BYTES:
        raise BadRequest(None, f"a request must be at most {MAX_REQUEST_BYTES} bytes")
    try:
        body = checked.client_json(text)
    except checked.NotJson as error:
        raise BadRequest(None, f"the request {error}") from None
    if not isinstance(body, dict):
        raise BadRequest(None, "not a JSON object")
    raw_id = body.get("id")
    request_id = raw_id if isinstance(raw_id, str) else None
    try:
        return _request(body, partitions, frozenset(event_types))
    except checked.BadParameter as error:
        raise BadRequest(error.field, error.message, request_id) from None


def _request(
    body: dict[str, Any], partitions: Mapping[str, int], event_types: frozenset[str]
) -> Request:
    kind = body.get("type")
    if kind not in _TAKES:
        raise checked.BadParameter("type", "must be 'subscribe' or 'unsubscribe'")
    for name in body:
        if name not in _TAKES[kind]:
            raise checked.BadParameter(
                name, f"is not a field of {kind} (it takes {', '.join(_TAKES[kind])})"
            )
    request_id = _text(body, "id")
    if kind == "unsubscribe":
        return Unsubscribe(request_id)
    given = [name for name in FILTERS if name in body]
    if len(given) != 1:
        raise checked.BadParameter(
            given[1] if len(given) > 1 else "aggregate_id",
            "give exactly one of aggregate_id, correlation_id, event_type",
        )
    [field] = given
    value = _text(body, field)
    if field == "event_type" and value not in event_types:
        raise checked.BadParameter(
            "event_type",
            f"unknown event type {value!r}; known: {', '.join(sorted(event_types))}",
        )
    start = None if "from" not in body else position(body["from"], partitions)
    return Subscribe(request_id, Filter(field, value), start)


def _text(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str):
        raise checked.BadParameter(name, "must be a string")
    return checked.identifier(value, name)


def position(raw: object, partitions: Mapping[str, int]) -> dict[TP, int]:
    """A resume position as the server sends it (``Cursor.as_json``): every
    partition of every event topic, each with a whole offset of 0 or more."""
    if not isinstance(raw, dict):
        raise checked.BadParameter(
            "from", "must be an object of topics, as an event's 'resume' gives it"
        )
    found: dict[TP, int] = {}
    for topic in raw:
        if topic not in partitions:
            raise checked.BadParameter(
                f"from.{topic}",
                f"is not an event topic here ({', '.join(sorted(partitions))})",
            )
    for topic, count in partitions.items():
        offsets = raw.get(topic)
        field = f"from.{topic}"
        if not isinstance(offsets, dict):
            raise checked.BadParameter(field, "missing: give every partition's offset")
        wanted = {str(p) for p in range(count)}
        if set(offsets) != wanted:
            raise checked.BadParameter(
                field, f"must give exactly partitions 0..{count - 1}"
            )
        for key, offset in offsets.items():
            # bool is an int to Python, never an offset.
            if type(offset) is not int or offset < 0:
                raise checked.BadParameter(
                    f"{field}.{key}", "must be a whole number of 0 or more"
                )
            found[(topic, int(key))] = offset
    return found


def keys_from_headers(headers: Mapping[str, bytes | None]) -> dict[str, str] | None:
    """The fields filters match on, from a record's routing headers; None when one
    is missing (a producer that wrote none: the event is decoded instead)."""
    keys = {}
    for field, header in HEADER_OF.items():
        value = headers.get(header)
        if value is None:
            return None
        keys[field] = value.decode(errors="replace")
    return keys


def keys_from_metadata(metadata: Mapping[str, Any]) -> dict[str, str]:
    return {field: str(metadata.get(field, "")) for field in FILTERS}


class Cursor:
    """Per partition, the next offset a subscription wants."""

    def __init__(self, start: Mapping[TP, int]) -> None:
        self.next = dict(start)

    def takes(self, tp: TP, offset: int) -> bool:
        """Whether the event at ``offset`` of ``tp`` is new to the subscription;
        if so, the cursor moves past it."""
        if offset < self.next.get(tp, 0):
            return False
        self.next[tp] = offset + 1
        return True

    def behind(self, live: Mapping[TP, int]) -> dict[TP, tuple[int, int]]:
        """The ranges ``[cursor, live)`` still to read from the log, by partition."""
        return {
            tp: (self.next.get(tp, 0), end)
            for tp, end in live.items()
            if self.next.get(tp, 0) < end
        }

    def read_to(self, tp: TP, offset: int) -> None:
        """Everything below ``offset`` of ``tp`` has been read (matching or not)."""
        self.next[tp] = max(self.next.get(tp, 0), offset)

    def as_json(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (topic, partition), offset in sorted(self.next.items()):
            out.setdefault(topic, {})[str(partition)] = offset
        return out


def ack(request: Request, cursor: Cursor | None) -> dict[str, Any]:
    kind = "subscribe" if isinstance(request, Subscribe) else "unsubscribe"
    message: dict[str, Any] = {"type": "ack", "request": kind, "id": request.id}
    if cursor is not None:
        message["position"] = cursor.as_json()
    return message


def error(problem: BadRequest) -> dict[str, Any]:
    return {
        "type": "error",
        "id": problem.request_id,
        "field": problem.field,
        "error": problem.message,
    }
