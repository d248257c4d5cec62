"""The query views' parameters, checked in one place: each bad one is refused with
``BadParameter`` naming it, which every view answers with 400 ``{"error", "field"}``.

Ids in paths and parameters are 1 to ``MAX_ID_LENGTH`` printable characters without
surrounding whitespace; whole numbers are ASCII digits; a range's bounds must be in
order; a page must lie within what there is.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, TypeVar

from app.domain.errors import MAX_ID_LENGTH, id_problem
from app.domain.money import CURRENCY_DECIMALS

MAX_PAGE_SIZE = 100
# Enough for any search a person types; a query is parsed and matched word by word.
MAX_SEARCH_LENGTH = 256
_WHOLE = re.compile(r"-?[0-9]{1,19}")
# A rank as Python writes a float (``repr``): 0.6079271, 1e-20, 6.079271e-05.
_RANK = re.compile(r"[0-9]{1,20}(\.[0-9]{1,20})?(e-?[0-9]{1,3})?")
Bound = TypeVar("Bound", int, date, datetime)


class BadParameter(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def accepted(
    given: Iterable[tuple[str, str]], names: Collection[str]
) -> dict[str, str]:
    """The query string as a dict, refusing a name the view does not take (a typo
    would otherwise be answered as if it were absent) or one given twice."""
    params: dict[str, str] = {}
    for name, value in given:
        if name not in names:
            takes = ", ".join(sorted(names)) or "no parameters"
            raise BadParameter(
                name, f"is not a parameter of this view (it takes {takes})"
            )
        if name in params:
            raise BadParameter(name, "is given more than once")
        params[name] = value
    return params


def identifier(value: str, field: str, most: int = MAX_ID_LENGTH) -> str:
    """An id from a path or a parameter: as an id in a command (``id_problem``)."""
    problem = id_problem(value, most)
    if problem is not None:
        raise BadParameter(field, problem)
    return value


class NotJson(ValueError):
    """A client's text that is not JSON Streamfold takes; the message says why."""


def client_json(text: str | bytes, **hooks: Any) -> Any:
    """A client's JSON (a body, a GraphQL request, a WebSocket request) parsed, or
    ``NotJson``: not UTF-8, not JSON, nested too deeply, or holding what no record
    or answer could (``json_problem``). ``hooks`` go to ``json.loads``; what they
    raise goes through."""
    try:
        value = json.loads(
            text.decode("utf-8") if isinstance(text, bytes) else text, **hooks
        )
    except UnicodeDecodeError as error:
        raise NotJson(f"is not UTF-8: {error.reason}") from None
    except json.JSONDecodeError as error:
        raise NotJson(
            f"is not JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from None
    except RecursionError:
        raise NotJson("is nested too deeply") from None
    problem = json_problem(value)
    if problem is not None:
        raise NotJson(problem)
    return value


def json_problem(value: object) -> str | None:
    """What a client's decoded JSON holds that no record or answer could, or None:
    a string (a key or a value) with an unpaired surrogate (``"\\ud800"`` parses,
    but has no UTF-8, so no Avro string and no JSON answer that could echo it), or
    nesting just too deep to write back."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return "holds an unpaired surrogate escape (such as \\ud800)"
    except RecursionError:
        return "is nested too deeply"
    return None


def shown(text: str) -> str:
    """``text`` as an error message may echo it: what is not printable ASCII
    escaped (a header's bytes that were not UTF-8 arrive as surrogate escapes)."""
    return "".join(
        c if " " <= c <= "~" else c.encode("unicode_escape").decode("ascii")
        for c in text
    )


def search_text(params: Mapping[str, str], name: str) -> str:
    """Words to search for, as a person types them: required, with any run of
    whitespace (tabs, newlines, no-break spaces) read as one space. Every other
    character is the search engine's to parse; a control character is refused
    (Postgres text cannot hold a NUL)."""
    raw = params.get(name, "")
    if len(raw) > MAX_SEARCH_LENGTH:
        raise BadParameter(
            name, f"must be at most {MAX_SEARCH_LENGTH} characters, got {len(raw)}"
        )
    text = " ".join(raw.split())
    if not text:
        raise BadParameter(name, "must be given: the words to search for")
    if not text.isprintable():
        raise BadParameter(name, "must not contain control or unprintable characters")
    return text


def optional_identifier(params: Mapping[str, str], name: str) -> str | None:
    raw = params.get(name)
    return identifier(raw, name) if raw else None


def integer(
    params: Mapping[str, str], name: str, default: int, low: int, high: int
) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    if not _WHOLE.fullmatch(raw):
        raise BadParameter(name, f"must be a whole number, got {raw!r}")
    value = int(raw)
    if not low <= value <= high:
        raise BadParameter(name, f"must be between {low} and {high}, got {value}")
    return value


def timestamp(params: Mapping[str, str], name: str) -> datetime | None:
    raw = params.get(name)
    if not raw:
        return None
    try:
        value = datetime.fromisoformat(raw)
        # A time without a zone is read as UTC, the zone every stored time is in.
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise BadParameter(
            name, f"must be an ISO-8601 date or time, got {raw!r}"
        ) from None


def day(params: Mapping[str, str], name: str) -> date | None:
    raw = params.get(name)
    if not raw:
        return None
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise BadParameter(
            name, f"must be a date like 2026-01-31, got {raw!r}"
        ) from None


def choice(
    params: Mapping[str, str], name: str, choices: tuple[str, ...]
) -> str | None:
    return _member(params, name, choices, f"one of {', '.join(choices)}")


def currency(params: Mapping[str, str], name: str = "currency") -> str | None:
    # The codes the domain accepts, spelled as ISO 4217 does: "usd" is refused.
    return _member(params, name, CURRENCY_DECIMALS, "an ISO 4217 currency code")


def _member(
    params: Mapping[str, str], name: str, allowed: Collection[str], described: str
) -> str | None:
    raw = params.get(name)
    if not raw:
        return None
    if raw not in allowed:
        raise BadParameter(name, f"must be {described}, got {raw!r}")
    return raw


def in_order(
    low_name: str, low: Bound | None, high_name: str, high: Bound | None
) -> None:
    """A range whose bounds are inverted would silently match nothing."""
    if low is not None and high is not None and low > high:
        raise BadParameter(
            low_name, f"{low_name} ({low}) is after {high_name} ({high})"
        )


@dataclass(frozen=True, slots=True)
class Page:
    number: int
    size: int

    @property
    def offset(self) -> int:
        return self.number * self.size

    def within(self, total: int) -> None:
        """Page 0 always exists; a later one only if it holds something."""
        if self.number and self.offset >= total:
            last = max(0, (total - 1) // self.size)
            raise BadParameter(
                "page",
                f"page {self.number} is beyond the last page ({last}) of {total} "
                f"at page_size {self.size}",
            )


def page(params: Mapping[str, str]) -> Page:
    return Page(
        integer(params, "page", 0, 0, 1_000_000),
        integer(params, "page_size", 20, 1, MAX_PAGE_SIZE),
    )


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a ranked page ended: the last row's rank and key (``rank:key``).
    The next page holds the rows ranked after it, key breaking ties."""

    rank: float
    key: str

    def __str__(self) -> str:
        # repr round-trips a float exactly, so the next page starts exactly here.
        return f"{self.rank!r}:{self.key}"


def cursor(params: Mapping[str, str]) -> Cursor | None:
    """``cursor`` from an earlier page's ``next_cursor``, or None."""
    raw = params.get("cursor")
    if not raw:
        return None
    rank, colon, key = raw.partition(":")
    if not (colon and _RANK.fullmatch(rank) and math.isfinite(float(rank))):
        raise BadParameter(
            "cursor", f"must be a next_cursor from an earlier page, got {raw!r}"
        )
    return Cursor(float(rank), identifier(key, "cursor"))


def position(params: Mapping[str, str], partitions: int) -> tuple[int, int] | None:
    """``after=PARTITION:OFFSET`` from a command result, or None."""
    raw = params.get("after")
    if not raw:
        return None
    parts = raw.split(":")
    if len(parts) != 2 or not all(_WHOLE.fullmatch(part) for part in parts):
        raise BadParameter(
            "after", f"must be PARTITION:OFFSET from a command result, got {raw!r}"
        )
    partition, offset = int(parts[0]), int(parts[1])
    if not 0 <= partition < partitions or offset < 0:
        raise BadParameter(
            "after",
            f"partition must be 0 to {partitions - 1} and offset not negative, "
            f"got {raw!r}",
        )
    return partition, offset
