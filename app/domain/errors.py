"""The domain's one exception, its codes, and the small guards that raise it."""

from __future__ import annotations

import unicodedata
from enum import StrEnum

# Longer than any id Streamfold or its clients make (uuids, prefixed uuids), short
# enough that an absurd one is refused before it keys a stream, a row or a log line.
MAX_ID_LENGTH = 200
# Ids that name no aggregate (command, correlation and causation ids, transaction
# and payment ids) may be longer: the saga makes its own from an order id, a prefix
# and the order id.
MAX_REFERENCE_LENGTH = 512
# Room for a name, an address line or a reason a person writes.
MAX_TEXT_LENGTH = 1000
# Never in free text: control characters but whitespace (NUL above all: Postgres
# text cannot store it) and lone surrogates (no UTF-8, so no Avro string).
_REFUSED_IN_TEXT = frozenset({"Cc", "Cs"})


class ErrorCode(StrEnum):
    """Why a command was refused; the value travels on ``command-results``."""

    VALIDATION = "Validation"
    ALREADY_EXISTS = "AlreadyExists"
    NOT_FOUND = "NotFound"
    INVALID_STATE = "InvalidState"
    PAYMENT_MISMATCH = "PaymentMismatch"
    CURRENCY_MISMATCH = "CurrencyMismatch"
    INSUFFICIENT_FUNDS = "InsufficientFunds"
    ACCOUNT_CLOSED = "AccountClosed"
    NON_ZERO_BALANCE = "NonZeroBalance"


class DomainError(Exception):
    """A command broke a business rule; nothing was decided."""

    code: str
    message: str
    field: str | None

    def __init__(self, code: ErrorCode, message: str, field: str | None = None) -> None:
        super().__init__(message)
        # The plain value, so the code serialises and compares the same everywhere.
        self.code = ErrorCode(code).value
        self.message = message
        self.field = field

    def __reduce__(self) -> tuple[type[DomainError], tuple[ErrorCode, str, str | None]]:
        # Exception pickles only ``args``; keep code and field across process hops.
        return (type(self), (ErrorCode(self.code), self.message, self.field))

    def __repr__(self) -> str:
        return f"DomainError({self.code!r}, {self.message!r}, field={self.field!r})"


def invalid(field: str, message: str) -> DomainError:
    """A VALIDATION error; the message is prefixed with the field it concerns."""
    return DomainError(ErrorCode.VALIDATION, f"{field} {message}", field)


def require_text(value: str, field: str) -> str:
    """Free text that must not be blank; returned stripped."""
    stripped = optional_text(value, field)
    if not stripped:
        raise invalid(field, "must not be empty")
    return stripped


def optional_text(value: str, field: str) -> str:
    """Free text that may be empty, of at most ``MAX_TEXT_LENGTH`` characters, none
    of them a control character but whitespace; returned stripped."""
    if not isinstance(value, str):
        raise invalid(field, f"must be a string, got {type(value).__name__}")
    if len(value) > MAX_TEXT_LENGTH:
        raise invalid(
            field, f"must be at most {MAX_TEXT_LENGTH} characters, got {len(value)}"
        )
    if not value.isprintable() and any(
        unicodedata.category(c) in _REFUSED_IN_TEXT and not c.isspace() for c in value
    ):
        raise invalid(
            field, "must not contain control characters or unpaired surrogates"
        )
    return value.strip()


def require_id(value: str, field: str, most: int = MAX_ID_LENGTH) -> str:
    """An identifier: 1 to ``most`` printable characters, kept verbatim.

    Surrounding whitespace is refused rather than stripped, because ids key streams and
    partitions: silently rewriting one would split an aggregate in two.
    """
    if not isinstance(value, str):
        raise invalid(field, f"must be a string, got {type(value).__name__}")
    problem = id_problem(value, most)
    if problem is not None:
        raise invalid(field, problem)
    return value


def id_problem(value: str, most: int = MAX_ID_LENGTH) -> str | None:
    """What keeps ``value`` from being an id (see ``require_id``), or None; the
    query views' parameters are held to the same rule."""
    if not value:
        return "must not be empty"
    if len(value) > most:
        return f"must be at most {most} characters, got {len(value)}"
    if not value.isprintable():
        return "must not contain control or unprintable characters"
    if value != value.strip():
        return "must not start or end with whitespace"
    return None


def require_int(value: int, field: str, low: int, high: int) -> int:
    """A whole number within ``low..high`` inclusive."""
    # bool is an int subclass; True as a quantity is a bug upstream, not a 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(field, f"must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise invalid(field, f"must be between {low} and {high}, got {value}")
    return value


def refuse_existing(kind: str, exists: bool, aggregate_id: str) -> None:
    """Refuse to create the ``kind`` (``"order"``) ``aggregate_id`` if it ``exists``."""
    if exists:
        raise DomainError(
            ErrorCode.ALREADY_EXISTS, f"{kind} {aggregate_id!r} already exists"
        )


def require_existing(
    kind: str, exists: bool, aggregate_id: str, loaded_id: str
) -> None:
    """Refuse a command for the ``kind`` ``aggregate_id`` unless it ``exists`` and is
    the one loaded (``loaded_id``); the id's field is ``<kind>_id``."""
    if not exists:
        raise DomainError(
            ErrorCode.NOT_FOUND, f"{kind} {aggregate_id!r} does not exist"
        )
    if aggregate_id != loaded_id:
        # The application loads state by the command's id; a mismatch is a wiring bug.
        raise invalid(
            f"{kind}_id",
            f"{aggregate_id!r} does not match the loaded {kind} {loaded_id!r}",
        )
