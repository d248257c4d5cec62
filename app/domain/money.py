"""Money as integer minor units plus an ISO 4217 currency code; never a float.

Minor units are the wire and storage format; ``fmt`` is how people are shown an
amount: in major units, with as many decimals as the currency has.
"""

from __future__ import annotations

from app.domain.errors import invalid, require_int

# The largest single amount a command may carry (a million million minor units).
MAX_AMOUNT_MINOR = 10**12

# Events map to Avro ``long``; a derived total beyond it could never be written.
MAX_LONG = 2**63 - 1

# ISO 4217 list one (2025): each active currency's minor unit, the number of decimals
# between its major and minor units. Funds and metals without one (XAU, XDR, XXX)
# are not money a ledger holds, so they are not here.
_DECIMALS_0 = "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF"
_DECIMALS_3 = "BHD IQD JOD KWD LYD OMR TND"
_DECIMALS_4 = "CLF UYW"
_DECIMALS_2 = (
    "AED AFN ALL AMD AOA ARS AUD AWG AZN BAM BBD BDT BGN BMD BND BOB BOV BRL BSD BTN"
    " BWP BYN BZD CAD CDF CHE CHF CHW CNY COP COU CRC CUC CUP CVE CZK DKK DOP DZD EGP"
    " ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GTQ GYD HKD HNL HTG HUF IDR ILS INR IRR"
    " JMD KES KGS KHR KPW KYD KZT LAK LBP LKR LRD LSL MAD MDL MGA MKD MMK MNT MOP MRU"
    " MUR MVR MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD PAB PEN PGK PHP PKR PLN QAR"
    " RON RSD RUB SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS"
    " TMT TOP TRY TTD TWD TZS UAH USD USN UYU UZS VED VES WST XCD XCG YER ZAR ZMW ZWG"
)
CURRENCY_DECIMALS: dict[str, int] = {
    code: decimals
    for decimals, codes in (
        (0, _DECIMALS_0),
        (2, _DECIMALS_2),
        (3, _DECIMALS_3),
        (4, _DECIMALS_4),
    )
    for code in codes.split()
}


def require_currency(value: str, field: str = "currency") -> str:
    """An active ISO 4217 code, spelled as the standard does (``USD``)."""
    # No normalising of "usd": a lower-case code is a client bug worth surfacing.
    if not isinstance(value, str) or value not in CURRENCY_DECIMALS:
        raise invalid(field, f"must be an ISO 4217 currency code, got {value!r}")
    return value


def require_amount(value: int, field: str = "amount_minor") -> int:
    """A positive amount no larger than ``MAX_AMOUNT_MINOR``."""
    return require_int(value, field, 1, MAX_AMOUNT_MINOR)


def fmt(amount_minor: int, currency: str) -> str:
    """How messages name an amount: ``10,000.00 USD``, ``1,500 JPY``, ``-0.29 EUR``."""
    # A code outside the table can only come from an event older than the check in
    # require_currency; two decimals is what most currencies have.
    decimals = CURRENCY_DECIMALS.get(currency, 2)
    major, minor = divmod(abs(amount_minor), 10**decimals)
    sign = "-" if amount_minor < 0 else ""
    fraction = f".{minor:0{decimals}d}" if decimals else ""
    return f"{sign}{major:,}{fraction} {currency}"
