"""Amounts are shown in major units, as many decimals as their currency has."""

from __future__ import annotations

import pytest

from app.domain.errors import DomainError
from app.domain.money import CURRENCY_DECIMALS, fmt, require_currency


@pytest.mark.parametrize(
    ("amount_minor", "currency", "shown"),
    [
        (29, "USD", "0.29 USD"),
        (1_000_000, "USD", "10,000.00 USD"),
        (0, "EUR", "0.00 EUR"),
        (-200, "USD", "-2.00 USD"),
        (-5, "GBP", "-0.05 GBP"),
        (1500, "JPY", "1,500 JPY"),
        (-7, "KRW", "-7 KRW"),
        (1, "KWD", "0.001 KWD"),
        (1_234_567, "BHD", "1,234.567 BHD"),
        (123_456_789, "CLF", "12,345.6789 CLF"),
        (10**12, "USD", "10,000,000,000.00 USD"),
        (2**63 - 1, "USD", "92,233,720,368,547,758.07 USD"),
    ],
)
def test_amounts_are_shown_in_major_units(
    amount_minor: int, currency: str, shown: str
) -> None:
    assert fmt(amount_minor, currency) == shown


def test_a_code_from_before_the_check_is_shown_with_two_decimals() -> None:
    assert fmt(1234, "ABC") == "12.34 ABC"


@pytest.mark.parametrize("code", ["USD", "EUR", "JPY", "CHF", "XOF", "KWD"])
def test_active_codes_are_currencies(code: str) -> None:
    assert require_currency(code) == code


@pytest.mark.parametrize("code", ["usd", "Usd", "ABC", "XXX", "XAU", "US", "", "USD "])
def test_other_codes_are_refused_naming_the_field(code: str) -> None:
    with pytest.raises(DomainError) as refused:
        require_currency(code, "currency")
    assert refused.value.field == "currency"


def test_every_code_is_three_upper_case_letters() -> None:
    assert all(
        len(code) == 3 and code.isascii() and code.isalpha() and code.isupper()
        for code in CURRENCY_DECIMALS
    )
    assert set(CURRENCY_DECIMALS.values()) == {0, 2, 3, 4}


def test_the_cli_history_shows_amounts_in_major_units() -> None:
    from app.cli import _data_column

    deposited = {
        "account_id": "a-1",
        "amount_minor": 1_000_000,
        "currency": "USD",
        "balance_after_minor": 29,
        "items": [{"unit_price_minor": 1}],
    }
    assert _data_column(deposited, "USD") == (
        "account_id=a-1, amount=10,000.00 USD, balance_after=0.29 USD"
    )
    # Before its stream's currency is known, an amount stays in minor units.
    assert _data_column({"total_minor": 29}, None) == "total_minor=29"
