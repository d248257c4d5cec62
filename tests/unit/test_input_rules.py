"""What a client may send, checked where it comes in: ids and free text in the
domain (every client's commands, Kafka's too), the envelope's ids, and the JSON of
HTTP bodies, GraphQL requests and WebSocket requests. Each bad input is refused
naming what was wrong, and none reaches a place where it would fail later (Avro's
UTF-8, Postgres text, an error message that echoes it)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from app import params
from app.adapters import feed
from app.adapters.memory import MemoryStore
from app.application.commands import CommandService, Envelope
from app.client import aggregate_id_of
from app.deadletters import ActionRefused, parse_record_id
from app.domain.errors import (
    MAX_ID_LENGTH,
    MAX_TEXT_LENGTH,
    DomainError,
    optional_text,
    require_id,
    require_text,
)
from app.domain.orders import LineItem
from app.graphql.web import decode_request, without_nulls
from app.push import protocol
from app.rest import requests
from app.rest.auth import Credentials, Unauthorized
from app.rest.bodies import BodyError
from app.runtime import ACCOUNTS
from app.settings import ApiToken
from app.workload import new_order

NUL, LONE = "\x00", "\ud800"


@pytest.mark.parametrize(
    "text",
    ["Ada", "line one\nline two\ttabbed", "no\u00a0break", "می\u200cخواهم", "😀"],
)
def test_free_text_takes_what_people_write(text: str) -> None:
    assert require_text(text, "reason") == text.strip()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (f"Ada{NUL}", "control characters"),
        ("bell\x07", "control characters"),
        (f"x{LONE}", "unpaired surrogates"),
        ("x" * (MAX_TEXT_LENGTH + 1), f"at most {MAX_TEXT_LENGTH}"),
    ],
)
def test_free_text_refuses_what_no_store_can_hold(text: str, fragment: str) -> None:
    for check in (require_text, optional_text):
        with pytest.raises(DomainError) as refused:
            check(text, "customer_name")
        assert refused.value.field == "customer_name"
        assert fragment in refused.value.message


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("", "empty"),
        (" o-1", "whitespace"),
        (f"o{NUL}1", "unprintable"),
        ("o\u00a01", "unprintable"),
        (f"o{LONE}", "unprintable"),
        ("o" * (MAX_ID_LENGTH + 1), f"at most {MAX_ID_LENGTH}"),
    ],
)
def test_an_id_is_what_a_path_can_address(value: str, fragment: str) -> None:
    with pytest.raises(DomainError) as refused:
        require_id(value, "order_id")
    assert fragment in refused.value.message
    # The same id in a path is refused too: nothing accepted is unaddressable.
    with pytest.raises(params.BadParameter):
        params.identifier(value, "order_id")


def test_an_id_of_the_longest_length_is_taken_in_both_places() -> None:
    longest = "o" * MAX_ID_LENGTH
    assert require_id(longest, "order_id") == params.identifier(longest, "order_id")


def _envelope(**ids: str | None) -> Envelope:
    base: dict[str, str | None] = {
        "command_id": "c-1",
        "correlation_id": "c-1",
        "causation_id": "c-1",
        "user_id": "u-1",
    }
    return Envelope(**{**base, **ids}, issued_at=datetime(2026, 12, 5, tzinfo=UTC))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "field", ["command_id", "correlation_id", "causation_id", "user_id"]
)
def test_an_envelope_id_that_is_not_one_is_rejected_by_name(field: str) -> None:
    from app.domain.accounts import OpenAccount

    service = CommandService(aggregate=ACCOUNTS, store=MemoryStore())
    command = OpenAccount(account_id="acc-1", owner_id="o-1", currency="EUR")
    decision = service.decide(_envelope(**{field: f"x{NUL}"}), command)
    assert decision.result is not None and not decision.result.accepted
    assert decision.result.field == field
    assert not decision.events
    # Without a user (a Kafka client's command may carry none) it is decided.
    accepted = service.decide(_envelope(user_id=None), command)
    assert accepted.result is not None and accepted.result.accepted


def test_an_orders_aggregate_is_its_order_even_with_an_empty_id() -> None:
    item = LineItem(product_id="p-1", quantity=1, unit_price_minor=100, tax_rate_bps=0)
    order = new_order("o-1", "c-1", [item], account_id="acc-1")
    assert aggregate_id_of(order) == "o-1"
    # The decider refuses the empty id; the gateway waits on the same aggregate.
    assert aggregate_id_of(replace(order, order_id="")) == ""


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"[" * 5000, "nested too deeply"),
        (b'{"customer_name": "\\ud800"}', "unpaired surrogate"),
        (b'{"\\udfff": 1}', "unpaired surrogate"),
    ],
)
def test_a_body_json_cannot_hold_is_refused(raw: bytes, fragment: str) -> None:
    with pytest.raises(BodyError, match=fragment):
        requests.json_body(raw, "application/json")


def test_a_paired_surrogate_escape_is_a_character() -> None:
    body = requests.json_body(
        b'{"customer_name": "\\ud83d\\ude00"}', "application/json"
    )
    assert body == {"customer_name": "😀"}


def test_a_media_type_is_echoed_printable() -> None:
    with pytest.raises(requests.UnsupportedMediaType) as refused:
        requests.json_body(b"{}", "text/\udcff\udcfe")
    message = str(refused.value)
    assert "text/\\udcff\\udcfe" in message
    message.encode("ascii")  # a JSON answer can carry it


def test_a_token_that_is_not_utf8_is_just_invalid() -> None:
    credentials = Credentials([ApiToken("ada", "ada-0123456789abcdef")])
    with pytest.raises(Unauthorized) as refused:
        credentials.user_id("Bearer \udcff\udcfe")
    assert 'error="invalid_token"' in refused.value.challenge


@pytest.mark.parametrize(
    "data",
    ["1", "null", '"x"', b"\xff\xfe{", "[" * 5000, '{"query": "\\ud800"}'],
)
def test_a_graphql_request_that_is_no_object_is_not_json(data: str | bytes) -> None:
    # Strawberry answers JSONDecodeError with 400 (HTTP) or closes the socket.
    with pytest.raises(json.JSONDecodeError):
        decode_request(data)


def test_a_graphql_request_or_a_batch_is_read() -> None:
    assert decode_request('{"query": "{ x }"}') == {"query": "{ x }"}
    assert decode_request(b'[{"query": "{ x }"}]') == [{"query": "{ x }"}]


@pytest.mark.parametrize(
    "text", ["[" * 3000, '{"type": "subscribe", "id": "\\ud800", "aggregate_id": "o"}']
)
def test_a_websocket_request_json_cannot_hold_is_refused(text: str) -> None:
    with pytest.raises(protocol.BadRequest) as refused:
        protocol.parse(text, {"orders.events": 4}, ["OrderCreated"])
    assert refused.value.request_id is None  # nothing of it is echoed


@pytest.mark.parametrize("text", ["t:0:²", "t:٣:1", "t:0:" + "9" * 5000])
def test_a_record_id_takes_ascii_digits_only(text: str) -> None:
    with pytest.raises(ActionRefused, match="topic:partition:offset"):
        parse_record_id(text)


def test_a_worker_runs_at_most_its_limit_of_feeds() -> None:
    feeds = feed.Feeds(2)
    feeds.take()
    feeds.take()
    with pytest.raises(feed.FeedError, match="2 subscriptions"):
        feeds.take()
    feeds.give_back()
    feeds.take()
    assert feeds.running == 2


def test_json_too_deep_to_write_back_is_a_problem_not_a_crash() -> None:
    # Where a request is parsed a few frames deeper than it is written back, some
    # depth parses but cannot be written: that is refused, never a RecursionError.
    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep]
    assert params.json_problem(deep) == "is nested too deeply"
    assert params.json_problem({"a": [1, "é", None]}) is None


def test_graphql_query_parameters_may_say_null() -> None:
    given = {"query": "{ x }", "variables": "null", "extensions": "null"}
    assert without_nulls(given) == {"query": "{ x }"}
    assert without_nulls({"variables": '{"a": 1}'}) == {"variables": '{"a": 1}'}


def test_the_ids_the_saga_makes_from_the_longest_order_id_are_taken() -> None:
    from app.application import saga
    from app.domain.errors import MAX_REFERENCE_LENGTH

    order = "o" * MAX_ID_LENGTH
    made = [saga.command_id(order, step) for step in saga.Step]
    made += [saga.payment_transaction(order), saga.refund_transaction(order)]
    for value in made:
        assert require_id(value, "command_id", MAX_REFERENCE_LENGTH) == value
    # …and would not all be with the aggregates' limit.
    with pytest.raises(DomainError):
        require_id(max(made, key=len), "command_id")
