"""What an HTTP command request says besides its path: its headers and JSON body,
each checked here; a bad one raises ``BadParameter`` naming the header (400), a
body that is not JSON ``BodyError`` (400), a body of another media type
``UnsupportedMediaType`` (415)."""

from __future__ import annotations

import re
from typing import Any

from app import params as checked
from app.params import BadParameter
from app.rest.bodies import BodyError

# RFC 7240's wait preference is capped: a request holds a connection meanwhile.
MAX_WAIT_S = 120
_VERSION = re.compile(r"[0-9]{1,18}")
_WAIT = re.compile(r"\s*wait\s*=\s*(\S*)\s*", re.IGNORECASE)


class UnsupportedMediaType(Exception):
    """A body sent as something other than JSON."""


def idempotency_key(value: str | None) -> str | None:
    """The ``Idempotency-Key`` header: the command id, or None for a new one."""
    if value is None:
        return None
    checked.identifier(value, "Idempotency-Key")
    if not value.isascii():
        # It comes back in the Streamfold-Command-Id header, which is ASCII.
        raise BadParameter("Idempotency-Key", "must be printable ASCII")
    return value


def expected_version(value: str | None) -> int | None:
    """The ``If-Match`` header: the version the caller saw, as the ETag it was
    given (``"3"``; a bare ``3`` is taken too); None when absent."""
    if value is None:
        return None
    text = value.strip()
    if text.startswith("W/"):
        raise BadParameter(
            "If-Match", 'a weak ETag names no version; send the ETag given, e.g. "3"'
        )
    if text == "*":
        raise BadParameter(
            "If-Match", '* is not supported; send the version you saw, e.g. "3"'
        )
    if "," in text:
        raise BadParameter("If-Match", "give one version, not a list")
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    if not _VERSION.fullmatch(text):
        raise BadParameter(
            "If-Match", f'expected a version such as "3", got {value[:40]!r}'
        )
    return int(text)


def prefer_wait(value: str | None) -> int | None:
    """The seconds of ``Prefer: wait=N`` (RFC 7240), at most ``MAX_WAIT_S``; None
    when the header asks for no wait. Other preferences are ignored, as the RFC
    has it."""
    if value is None:
        return None
    for preference in value.split(","):
        found = _WAIT.fullmatch(preference)
        if found is None:
            continue
        seconds = found.group(1)
        if not seconds.isascii() or not seconds.isdigit():
            raise BadParameter(
                "Prefer", f"wait takes whole seconds, e.g. wait=5, got {seconds!r}"
            )
        return min(int(seconds), MAX_WAIT_S)
    return None


def json_body(raw: bytes, content_type: str | None) -> Any:
    """The body as JSON (an empty body is ``{}``). Refused: another media type,
    text that is not UTF-8 JSON, NaN or Infinity, a key given twice."""
    if not raw.strip():
        return {}
    media = (content_type or "").split(";")[0].strip().lower()
    if media != "application/json" and not (
        media.startswith("application/") and media.endswith("+json")
    ):
        raise UnsupportedMediaType(
            f"send the body as JSON with Content-Type: application/json, "
            f"not {checked.shown(media) or 'no Content-Type'}"
        )
    try:
        return checked.client_json(
            raw, object_pairs_hook=_no_repeats, parse_constant=_no_constant
        )
    except checked.NotJson as error:
        raise BodyError(None, f"the body {error}") from None


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise BodyError(key, "is given more than once")
        seen[key] = value
    return seen


def _no_constant(name: str) -> Any:
    raise BodyError(None, f"the body is not JSON: {name} is not a JSON number")
