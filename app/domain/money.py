"""Money as integer minor units plus an ISO 4217 currency code; never a float."""

from __future__ import annotations

from app.domain.errors import invalid, require_int

# The largest single amount a command may carry (a million million minor units).
MAX_AMOUNT_MINOR = 10**12

# Events map to Avro ``long``; a derived total beyond it could never be written.
MAX_LONG = 2**63 - 1


def require_currency(value: str, field: str = "currency") -> str:
    """Exactly three uppercase ASCII letters, as ISO 4217 spells them."""
    # No normalising of "usd": a lower-case code is a client bug worth surfacing.
    if not (
        isinstance(value, str)
        and len(value) == 3
        and value.isascii()
        and value.isalpha()
        and value.isupper()
    ):
        raise invalid(field, f"must be a 3-letter ISO 4217 code, got {value!r}")
    return value


def require_amount(value: int, field: str = "amount_minor") -> int:
    """A positive amount no larger than ``MAX_AMOUNT_MINOR``."""
    return require_int(value, field, 1, MAX_AMOUNT_MINOR)


def fmt(amount_minor: int, currency: str) -> str:
    """How messages name an amount: ``1500 USD`` (minor units, as stored)."""
    return f"{amount_minor} {currency}"
