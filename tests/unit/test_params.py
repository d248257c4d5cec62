"""Every bad query parameter is refused naming it; good ones pass unchanged."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from app import params
from app.domain.errors import MAX_ID_LENGTH
from app.params import BadParameter


def _refused(field: str) -> pytest.RaisesExc[BadParameter]:
    return pytest.raises(BadParameter, check=lambda e: e.field == field)


def test_a_view_takes_only_its_own_parameters_once_each() -> None:
    given = [("page", "1"), ("page_size", "5")]
    assert params.accepted(given, ("page", "page_size")) == {
        "page": "1",
        "page_size": "5",
    }
    with _refused("page_sise"):
        params.accepted([("page_sise", "5")], ("page", "page_size"))
    with _refused("page"):
        params.accepted([("page", "1"), ("page", "2")], ("page",))
    with _refused("after"):
        params.accepted([("after", "0:1")], ())


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a\x00b",
        "tab\there",
        "new\nline",
        "\u200bzero-width",
        " lead",
        "trail ",
        "x" * (MAX_ID_LENGTH + 1),
    ],
)
def test_bad_ids_are_refused(bad: str) -> None:
    with _refused("order_id"):
        params.identifier(bad, "order_id")


@pytest.mark.parametrize(
    "good", ["o-1", "x" * MAX_ID_LENGTH, "ord 1", "ÜSD-Bestellung"]
)
def test_printable_ids_pass(good: str) -> None:
    assert params.identifier(good, "order_id") == good


@pytest.mark.parametrize("bad", [" 5", "5 ", "+5", "1_0", "٣", "5.0", "0x5", "9" * 30])
def test_whole_numbers_are_ascii_digits(bad: str) -> None:
    with _refused("limit"):
        params.integer({"limit": bad}, "limit", 1, 1, 500)


def test_whole_numbers_keep_their_range() -> None:
    assert params.integer({}, "limit", 100, 1, 500) == 100
    assert params.integer({"limit": "500"}, "limit", 100, 1, 500) == 500
    with _refused("limit"):
        params.integer({"limit": "0"}, "limit", 100, 1, 500)


@pytest.mark.parametrize("bad", ["usd", "Usd", "ABC", "US", "USDT", "XXX", "U\x00D"])
def test_currencies_are_iso_codes_as_iso_spells_them(bad: str) -> None:
    assert params.currency({"currency": "JPY"}) == "JPY"
    with _refused("currency"):
        params.currency({"currency": bad})


def test_times_are_utc_and_out_of_range_ones_are_refused() -> None:
    assert params.timestamp({"from": "2026-01-01T01:00:00+01:00"}, "from") == datetime(
        2026, 1, 1, tzinfo=UTC
    )
    for bad in ("yesterday", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59-01:00"):
        with _refused("from"):
            params.timestamp({"from": bad}, "from")


def test_an_inverted_range_is_refused_naming_its_start() -> None:
    params.in_order("from", date(2026, 1, 1), "to", date(2026, 1, 1))
    params.in_order("from", None, "to", date(2026, 1, 1))
    with _refused("from"):
        params.in_order("from", date(2026, 1, 2), "to", date(2026, 1, 1))
    with _refused("from_version"):
        params.in_order("from_version", 5, "to_version", 4)


def test_a_page_beyond_the_end_is_refused_but_page_0_always_exists() -> None:
    first = params.page({})
    assert (first.number, first.size) == (0, 20)
    first.within(0)
    params.page({"page": "2", "page_size": "10"}).within(21)
    with _refused("page"):
        params.page({"page": "2", "page_size": "10"}).within(20)
    with _refused("page_size"):
        params.page({"page_size": "101"})


@pytest.mark.parametrize("bad", ["zero", "1", "1:2:3", "4:0", "-1:0", "0:-1", "0: 1"])
def test_a_position_names_a_partition_and_an_offset(bad: str) -> None:
    assert params.position({"after": "3:17"}, 4) == (3, 17)
    assert params.position({}, 4) is None
    with _refused("after"):
        params.position({"after": bad}, 4)


@pytest.mark.parametrize(
    ("raw", "read"),
    [
        ("ada", "ada"),
        ("  Ada\u00a0\tLovelace\n", "Ada Lovelace"),
        ("&|!:*()'\"", "&|!:*()'\""),
        ("x" * params.MAX_SEARCH_LENGTH, "x" * params.MAX_SEARCH_LENGTH),
    ],
)
def test_search_text_reads_whitespace_as_one_space(raw: str, read: str) -> None:
    assert params.search_text({"q": raw}, "q") == read


@pytest.mark.parametrize(
    "bad", ["", " \t\n", "ada\x00", "ada\x07", "\u200b", "x" * 257]
)
def test_bad_search_text_is_refused(bad: str) -> None:
    with _refused("q"):
        params.search_text({"q": bad}, "q")
    with _refused("q"):
        params.search_text({}, "q")


@pytest.mark.parametrize(
    "rank", [0.0, 1e-20, 0.6079270839691162, 6.079271e-05, 1.0, 12.5]
)
def test_a_cursor_reads_back_exactly_what_it_wrote(rank: float) -> None:
    written = str(params.Cursor(rank, "ord:1 b"))
    assert params.cursor({"cursor": written}) == params.Cursor(rank, "ord:1 b")
    assert params.cursor({}) is None


@pytest.mark.parametrize(
    "bad",
    [
        "next",
        "0.5",
        "0.5:",
        ":ord",
        "-1:ord",
        "nan:ord",
        "inf:ord",
        "1e999:ord",
        "0x1:ord",
        "0.5:ord\x00",
        "0.5: ord",
    ],
)
def test_bad_cursors_are_refused(bad: str) -> None:
    with _refused("cursor"):
        params.cursor({"cursor": bad})
