"""The HTTP commands' pure parts: the route table, bodies checked against the Avro
schemas, headers, tokens, the answers' statuses and the generated OpenAPI document."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate as validate_openapi

from app import workload
from app.adapters import mapper
from app.adapters.catalog import SchemaCatalog
from app.adapters.codec import Codec, InMemoryRegistry
from app.adapters.eventlog import (
    FINGERPRINT_HEADER,
    CommandResult,
    answered_at,
    fingerprint_in,
    format_at,
    kept_answer,
    parse_at,
    sent_answer,
)
from app.adapters.gateway import KeyReused, check_reuse
from app.client import AREAS, frame_command, new_envelope
from app.domain.orders import AddItem, LineItem, RemoveItem
from app.params import BadParameter
from app.rest import requests
from app.rest.auth import Credentials, Unauthorized
from app.rest.bodies import INT_RANGE, BodyError, conform
from app.rest.openapi import document, render_html
from app.rest.routes import ROUTES, Endpoint, endpoints
from app.rest.web import result_body, status_and_headers
from app.settings import ApiToken, Settings, SettingsError
from tests.support import ORDER

CATALOG = SchemaCatalog.load()
DEPOSIT = {"transaction_id": "t", "amount_minor": 5, "currency": "USD", "source": "s"}
ENDPOINTS = {e.route.name: e for e in endpoints(CATALOG)}
SPEC = document(list(ENDPOINTS.values()), CATALOG)


# -- the route table ----------------------------------------------------------------


def test_every_command_has_one_route_whose_path_names_its_fields() -> None:
    commands = [c for _, module in AREAS.values() for c in module.COMMANDS]
    assert sorted(r.command.__name__ for r in ROUTES) == sorted(
        c.__name__ for c in commands
    )
    for route in ROUTES:
        fields = {f.name for f in dataclasses.fields(route.command)}
        assert set(route.path_fields) <= fields, route


def test_a_request_becomes_its_command() -> None:
    add = ENDPOINTS["AddItem"].command(
        {"order_id": "o-1"}, {"product_id": "tea", "quantity": 2, "unit_price_minor": 5}
    )
    assert add == AddItem(
        order_id="o-1",
        item=LineItem(product_id="tea", quantity=2, unit_price_minor=5, tax_rate_bps=0),
    )
    remove = ENDPOINTS["RemoveItem"].command(
        {"order_id": "o-1", "product_id": "tea"}, {}
    )
    assert remove == RemoveItem(order_id="o-1", product_id="tea")
    deposit = ENDPOINTS["Deposit"].command(
        {"account_id": "a b"},
        {"transaction_id": "t", "amount_minor": 5, "currency": "USD", "source": "s"},
    )
    assert deposit == workload.deposit("a b", 5, "t", source="s")
    assert ENDPOINTS["Deposit"].location("a b/c") == "/accounts/a%20b%2Fc"


@pytest.mark.parametrize(
    ("name", "path", "body", "field", "fragment"),
    [
        ("CreateOrder", {}, {"order_id": "o"}, "customer_id", "is missing"),
        (
            "ShipOrder",
            {"order_id": "o"},
            {"order_id": "o", "carrier": "c"},
            "order_id",
            "not a field",
        ),
        (
            "Deposit",
            {"account_id": "a"},
            {**DEPOSIT, "amount_minor": True},
            "amount_minor",
            "whole number",
        ),
        (
            "Deposit",
            {"account_id": "a"},
            {**DEPOSIT, "amount_minor": 1.5},
            "amount_minor",
            "whole number",
        ),
        (
            "Deposit",
            {"account_id": "a"},
            {**DEPOSIT, "amount_minor": 2**63},
            "amount_minor",
            "between",
        ),
        (
            "Deposit",
            {"account_id": "a"},
            {**DEPOSIT, "user_id": "mallory"},
            "user_id",
            "not a field",
        ),
        ("Deposit", {"account_id": "a"}, ["a list"], None, "expected an object"),
        (
            "AddItem",
            {"order_id": "o"},
            {"product_id": "p", "quantity": 2**31, "unit_price_minor": 1},
            "quantity",
            "between",
        ),
        (
            "CreateOrder",
            {},
            {
                "order_id": "o",
                "customer_id": "c",
                "customer_name": "n",
                "customer_email": "e",
                "items": [{"product_id": "p", "quantity": "2", "unit_price_minor": 1}],
            },
            "items[0].quantity",
            "got '2'",
        ),
        (
            "CreateOrder",
            {},
            {**ORDER, "order_id": "o", "account_id": 7},
            "account_id",
            "expected a string",
        ),
    ],
)
def test_a_body_that_does_not_fit_names_the_field(
    name: str, path: dict[str, str], body: Any, field: str | None, fragment: str
) -> None:
    with pytest.raises(BodyError) as caught:
        ENDPOINTS[name].command(path, body)
    assert caught.value.field == field
    assert fragment in str(caught.value)


def test_a_bad_path_parameter_is_named() -> None:
    with pytest.raises(BadParameter) as caught:
        ENDPOINTS["DeliverOrder"].command({"order_id": " o"}, {})
    assert caught.value.field == "order_id"


def test_plain_json_values() -> None:
    assert conform("long", 2.0, {}) == 2
    assert type(conform("long", 2.0, {})) is int
    with pytest.raises(BodyError, match="whole number"):
        conform("long", 2.5, {}, "amount_minor")
    with pytest.raises(BodyError, match="whole number"):
        conform("int", True, {}, "quantity")


def test_nullable_fields_take_null_or_a_value() -> None:
    schema = ["null", "string"]
    assert conform(schema, None, {}) is None
    assert conform(schema, "x", {}) == "x"
    with pytest.raises(BodyError, match="expected a string"):
        conform(schema, 3, {}, "account_id")
    with pytest.raises(BodyError, match="must not be null"):
        conform(["string"], None, {}, "name")


# -- the body schemas in the document agree with the checks ----------------------------


def _from_avro(schema: Any, named: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values that fit an Avro type, as JSON."""
    if isinstance(schema, str):
        if schema in named:
            return _from_avro(named[schema], named)
        return {
            "null": st.none(),
            "boolean": st.booleans(),
            "int": st.integers(*INT_RANGE),
            "long": st.integers(-(2**63), 2**63 - 1),
            "string": st.text(max_size=5),
        }[schema]
    if isinstance(schema, list):
        return st.one_of(*(_from_avro(b, named) for b in schema))
    kind = schema["type"]
    if kind == "record":
        fields = schema["fields"]
        return st.fixed_dictionaries(
            {
                f["name"]: _from_avro(f["type"], named)
                for f in fields
                if "default" not in f
            },
            optional={
                f["name"]: _from_avro(f["type"], named)
                for f in fields
                if "default" in f
            },
        )
    if kind == "array":
        return st.lists(_from_avro(schema["items"], named), max_size=2)
    if kind == "enum":
        return st.sampled_from(schema["symbols"])
    return _from_avro(kind, named)


# Any JSON value, with the whole numbers at the edges of Avro's int and long.
EDGES = st.sampled_from(
    [2**31 - 1, 2**31, -(2**31) - 1, 2**63 - 1, 2**63, -(2**63) - 1]
)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | EDGES
    | st.floats(allow_nan=False)
    | st.text(max_size=3),
    lambda inner: (
        st.lists(inner, max_size=2)
        | st.dictionaries(st.text(max_size=3), inner, max_size=2)
    ),
    max_leaves=4,
)


@st.composite
def _bodies(draw: st.DrawFn, endpoint: Endpoint) -> Any:
    """A valid body, or one with one field dropped, added or replaced."""
    body = draw(_from_avro(endpoint.body, dict(endpoint.named)))
    change = draw(st.sampled_from(["none", "drop", "add", "replace"]))
    if not isinstance(body, dict) or change == "none":
        return body
    if change == "add":
        return {**body, draw(st.text(min_size=1, max_size=8)): draw(JSON)}
    if not body:
        return body
    field = draw(st.sampled_from(sorted(body)))
    if change == "drop":
        return {k: v for k, v in body.items() if k != field}
    return {**body, field: draw(JSON)}


def _accepted_by_the_document(endpoint: Endpoint, body: Any) -> bool:
    operation = SPEC["paths"][endpoint.route.path][endpoint.route.method.lower()]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    validator = jsonschema.Draft202012Validator(
        {**schema, "components": SPEC["components"]}
    )
    return validator.is_valid(body)


def _accepted_by_the_checks(endpoint: Endpoint, body: Any) -> bool:
    try:
        conform(endpoint.body, body, endpoint.named)
    except BodyError:
        return False
    return True


@pytest.mark.parametrize(
    "name", [r.name for r in ROUTES if r.name not in ("RemoveItem", "DeliverOrder")]
)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_document_and_the_checks_accept_the_same_bodies(
    name: str, data: st.DataObject
) -> None:
    endpoint = ENDPOINTS[name]
    body = data.draw(_bodies(endpoint))
    assert _accepted_by_the_document(endpoint, body) == _accepted_by_the_checks(
        endpoint, body
    ), body


# -- headers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"), [(None, None), ('"3"', 3), ("3", 3), (' "0" ', 0)]
)
def test_if_match_is_the_expected_version(
    value: str | None, expected: int | None
) -> None:
    assert requests.expected_version(value) == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ('W/"3"', "weak"),
        ("*", "not supported"),
        ('"1", "2"', "one version"),
        ('"x"', "expected a version"),
        ('"-1"', "expected a version"),
        ("", "expected a version"),
    ],
)
def test_a_bad_if_match_is_refused(value: str, fragment: str) -> None:
    with pytest.raises(BadParameter, match=fragment) as caught:
        requests.expected_version(value)
    assert caught.value.field == "If-Match"


def test_idempotency_key_and_prefer() -> None:
    assert requests.idempotency_key(None) is None
    assert requests.idempotency_key("order-7-pay") == "order-7-pay"
    for bad in ("", " k", "k" * 201, "ключ", "a\x00b"):
        with pytest.raises(BadParameter) as caught:
            requests.idempotency_key(bad)
        assert caught.value.field == "Idempotency-Key"
    assert requests.prefer_wait(None) is None
    assert requests.prefer_wait("respond-async") is None
    assert requests.prefer_wait("respond-async, wait=5") == 5
    assert requests.prefer_wait("Wait = 0") == 0
    assert requests.prefer_wait("wait=100000") == requests.MAX_WAIT_S
    with pytest.raises(BadParameter, match="whole seconds"):
        requests.prefer_wait("wait=1.5")


def test_bodies_must_be_json() -> None:
    assert requests.json_body(b"", None) == {}
    assert requests.json_body(b'{"a": 1}', "application/json; charset=utf-8") == {
        "a": 1
    }
    assert requests.json_body(b'{"a": 1}', "application/merge-patch+json") == {"a": 1}
    with pytest.raises(requests.UnsupportedMediaType, match="text/plain"):
        requests.json_body(b'{"a": 1}', "text/plain")
    with pytest.raises(requests.UnsupportedMediaType, match="no Content-Type"):
        requests.json_body(b'{"a": 1}', None)
    with pytest.raises(BodyError, match="line 1 column 2"):
        requests.json_body(b"{oops", "application/json")
    with pytest.raises(BodyError, match="NaN") as nan:
        requests.json_body(b'{"a": NaN}', "application/json")
    assert nan.value.field is None
    with pytest.raises(BodyError, match="more than once") as twice:
        requests.json_body(b'{"a": 1, "a": 2}', "application/json")
    assert twice.value.field == "a"
    with pytest.raises(BodyError, match="UTF-8"):
        requests.json_body(b'{"a": "\xff"}', "application/json")


# -- tokens --------------------------------------------------------------------------

ADA = ApiToken("ada", "ada-0123456789abcdef")
OPS = ApiToken("ops", "ops-0123456789abcdef")


def test_a_token_names_its_user() -> None:
    credentials = Credentials([ADA, OPS])
    assert credentials.enabled
    assert credentials.user_id(f"Bearer {ADA.token}") == "ada"
    assert credentials.user_id(f"bearer  {OPS.token} ") == "ops"
    assert not Credentials([]).enabled


@pytest.mark.parametrize(
    ("header", "invalid"),
    [
        (None, False),
        ("", False),
        ("Bearer", True),
        (f"Basic {ADA.token}", True),
        ("Bearer ada-0123456789abcdeX", True),
        (f"Bearer {ADA.token} extra", True),
        (f"Bearer {ADA.token[:-1]}", True),
    ],
)
def test_a_missing_or_wrong_token_is_unauthorized(
    header: str | None, invalid: bool
) -> None:
    with pytest.raises(Unauthorized) as caught:
        Credentials([ADA, OPS]).user_id(header)
    assert caught.value.challenge.startswith('Bearer realm="streamfold"')
    assert ('error="invalid_token"' in caught.value.challenge) is invalid


def test_tokens_are_read_from_the_environment() -> None:
    settings = Settings.from_env(
        {"STREAMFOLD_API_TOKENS": f" ada:{ADA.token} , ops:{OPS.token}"}
    )
    assert settings.api_tokens == (ADA, OPS)
    assert ADA.token not in repr(settings)
    assert Settings.from_env(settings.as_env()) == settings
    assert Settings.from_env({}).api_tokens == ()
    assert Settings.from_env(Settings().as_env()).api_tokens == ()


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("ada", "expected user_id:token"),
        (":abcdefghijklmnopq", "expected user_id:token"),
        ("ada:short", "at least 16"),
        ("ada:has space in it 0123456", "at least 16"),
        ("ada:abcdefghijklmnopq,ops:abcdefghijklmnopq", "listed twice"),
        ("ada:abcdefghijklmnopq,", "entry 2 of 2"),
    ],
)
def test_bad_tokens_are_refused_without_showing_them(value: str, fragment: str) -> None:
    with pytest.raises(SettingsError, match="STREAMFOLD_API_TOKENS") as caught:
        Settings.from_env({"STREAMFOLD_API_TOKENS": value})
    assert fragment in str(caught.value)
    assert "abcdefghijklmnopq" not in str(caught.value)


# -- answers -------------------------------------------------------------------------


def _result(**changes: Any) -> CommandResult:
    accepted = CommandResult(
        command_id="c-1",
        accepted=True,
        aggregate_type="account",
        aggregate_id="a-1",
        version=3,
        event_ids=("e-3",),
        partition=2,
        offset=41,
        code=None,
        message=None,
        field=None,
        correlation_id="c-1",
    )
    return dataclasses.replace(accepted, **changes)


def test_an_accepted_command_is_answered_with_its_version_and_position() -> None:
    status, headers = status_and_headers(ENDPOINTS["Deposit"], _result())
    assert status == 200
    assert headers == {
        "Streamfold-Command-Id": "c-1",
        "ETag": '"3"',
        "Streamfold-Position": "2:41",
        "Location": "/accounts/a-1",
    }
    created, _ = status_and_headers(ENDPOINTS["OpenAccount"], _result(version=1))
    assert created == 201
    body = result_body(_result())
    jsonschema.Draft202012Validator(
        {"$ref": "#/components/schemas/CommandResult", "components": SPEC["components"]}
    ).validate(body)


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("ConcurrencyConflict", 409),
        ("AlreadyExists", 409),
        ("NotFound", 404),
        ("InsufficientFunds", 422),
        ("Validation", 422),
    ],
)
def test_a_refused_command_is_answered_by_its_code(code: str, status: int) -> None:
    refused = _result(
        accepted=False,
        version=None,
        event_ids=(),
        partition=None,
        offset=None,
        code=code,
        message="no",
        field="f",
    )
    got, headers = status_and_headers(ENDPOINTS["Deposit"], refused)
    assert got == status
    assert headers == {"Streamfold-Command-Id": "c-1"}
    assert result_body(refused)["status"] == "REJECTED"


# -- the document and its page -------------------------------------------------------


def test_the_document_is_valid_openapi_and_covers_every_route() -> None:
    validate_openapi(json.loads(json.dumps(SPEC)))
    for route in ROUTES:
        operation = SPEC["paths"][route.path][route.method.lower()]
        assert operation["operationId"] == route.name
        assert [p["name"] for p in operation["parameters"] if "name" in p] == list(
            route.path_fields
        )
        success = "201" if route.creates else "200"
        assert set(operation["responses"][success]["headers"]) == {
            "Location",
            "ETag",
            "Streamfold-Position",
            "Streamfold-Command-Id",
        }
    assert "/commands/{command_id}" in SPEC["paths"]


def test_the_body_schemas_follow_the_avro_schemas() -> None:
    schemas = SPEC["components"]["schemas"]
    # CreateOrder: every field but the envelope; account_id nullable with its default.
    create = schemas["CreateOrder"]
    avro = [
        f["name"] for f in CATALOG.parsed("streamfold.orders.CreateOrder")["fields"]
    ]
    assert list(create["properties"]) == avro[1:]
    assert "account_id" not in create["required"]
    assert create["properties"]["account_id"]["default"] is None
    assert create["properties"]["items"]["items"] == {
        "$ref": "#/components/schemas/LineItem"
    }
    # ShipOrder: less the order_id its path gives.
    assert set(schemas["ShipOrder"]["properties"]) == {"tracking_number", "carrier"}
    assert schemas["LineItem"]["properties"]["quantity"]["format"] == "int32"
    assert schemas["CommandStatus"]["enum"] == ["ACCEPTED", "REJECTED"]
    assert "processed_at" not in schemas["CommandResult"]["properties"]


def test_the_page_shows_every_operation_and_loads_nothing() -> None:
    page = render_html(SPEC)
    for route in ROUTES:
        assert f"<code>{route.path}</code>" in page
    assert "<script" not in page and "http://" not in page and "https://" not in page
    evil = json.loads(json.dumps(SPEC))
    evil["info"]["title"] = "<script>alert(1)</script>"
    assert "<script>alert" not in render_html(evil)


# -- the Idempotency-Key's body check ------------------------------------------------


def test_the_writer_reads_a_request_with_the_fingerprint_the_gateway_gave_it() -> None:
    """The gateway's fingerprint of a request's command is the one the writer takes
    of the command it decodes from Kafka (the body check compares the two); the
    envelope (ids, time) is no part of it, and another payload has another."""
    codec = Codec(InMemoryRegistry(), CATALOG)
    settings = Settings(partitions=4)
    order = ENDPOINTS["CreateOrder"].command({}, {**ORDER, "order_id": "o-1"})
    deposit = ENDPOINTS["Deposit"].command(
        {"account_id": "a-1"},
        {"transaction_id": "t", "amount_minor": 5, "currency": "USD", "source": "s"},
    )
    for command in (order, deposit):
        prints = set()
        for envelope in (new_envelope(), new_envelope(command_id="k", user_id="u")):
            framed = frame_command(settings, codec, command, envelope)
            decoded = codec.decode(framed.value)
            _, payload = mapper.split_command(decoded.data)
            read = mapper.from_dict(CATALOG.class_for(decoded.record_name), payload)
            prints.add(mapper.fingerprint(read))
        assert prints == {mapper.fingerprint(command)}
    assert mapper.fingerprint(deposit) != mapper.fingerprint(
        dataclasses.replace(deposit, amount_minor=6)
    )
    assert mapper.fingerprint(order) != mapper.fingerprint(deposit)


def test_a_kept_result_answers_only_the_same_request() -> None:
    aggregate = ("account", "a-1")
    printed = _result(fingerprint="f" * 64)
    assert check_reuse(printed, aggregate, "f" * 64) is printed
    with pytest.raises(KeyReused, match="with another body"):
        check_reuse(printed, aggregate, "e" * 64)
    with pytest.raises(KeyReused, match=r"for account a-1$"):
        check_reuse(printed, ("account", "a-2"), "f" * 64)
    # A result written before fingerprints names no payload: the first answer.
    assert check_reuse(_result(), aggregate, "e" * 64) == _result()


def test_the_writer_keeps_an_answer_with_its_fingerprint() -> None:
    value = b"\x00\x00\x00\x00\x07result"
    digest = "ab" * 32
    assert sent_answer(kept_answer(value, digest)) == (value, digest)
    # Kept before fingerprints were, or with a header that is no digest: none.
    assert sent_answer(value) == (value, None)
    assert kept_answer(value, None) == value
    assert kept_answer(value, "not hex") == value
    assert fingerprint_in({FINGERPRINT_HEADER: digest.encode()}) == digest
    assert fingerprint_in({}) is None


def test_the_writer_keeps_an_answer_with_the_command_record_it_answered() -> None:
    value = b"\x00\x00\x00\x00\x07result"
    digest = "cd" * 32
    kept = kept_answer(value, digest, (3, 1_234_567_890_123))
    assert sent_answer(kept) == (value, digest)
    assert answered_at(kept) == (3, 1_234_567_890_123)
    assert answered_at(kept_answer(value, None, (0, 5))) == (0, 5)
    assert sent_answer(kept_answer(value, None, (0, 5))) == (value, None)
    # Kept before the record was: none named.
    assert answered_at(kept_answer(value, digest)) is None
    assert answered_at(value) is None
    assert parse_at(format_at((2, 17))) == (2, 17)
    assert parse_at(b"2@") is None
    assert parse_at(None) is None
