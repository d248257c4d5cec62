"""The GraphQL schema without services: one mutation per route whose arguments are
the route's, the limits, and errors that name the argument and hide the rest."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from typing import Any

import pytest
from graphql import GraphQLError
from strawberry.types.base import StrawberryOptional, get_object_definition

from app import params as checked
from app import query
from app.adapters.catalog import SchemaCatalog
from app.graphql import schema as graphql
from app.rest.routes import endpoints
from app.rest.web import Refused

SCHEMA = graphql.build()


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def mutation_fields() -> dict[str, Any]:
    definition = get_object_definition(graphql.Mutation, strict=True)
    return {field.name: field for field in definition.fields}


def test_every_route_has_one_mutation_with_its_arguments() -> None:
    routed = endpoints(SchemaCatalog.load())
    mutations = mutation_fields()
    assert sorted(mutations) == sorted(snake(e.route.name) for e in routed)
    for endpoint in routed:
        field = mutations[snake(endpoint.route.name)]
        arguments = {a.python_name: a for a in field.arguments}
        body = [name for name in arguments if name in ("input", "item")]
        assert set(arguments) == {
            *endpoint.route.path_fields,
            *body,
            "idempotency_key",
            "expected_version",
        }, endpoint.route.name
        if endpoint.route.body_field is not None:
            assert body == [endpoint.route.body_field]
        assert bool(body) == bool(endpoint.body["fields"]), endpoint.route.name


def input_shape(cls: type) -> dict[str, bool]:
    """An input type's fields and whether each must be given."""
    definition = get_object_definition(cls, strict=True)
    return {
        f.python_name: not isinstance(f.type, StrawberryOptional)
        for f in definition.fields
    }


def avro_shape(record: dict[str, Any]) -> dict[str, bool]:
    """A record's fields and whether each must be given (no default, not nullable)."""
    return {
        f["name"]: "default" not in f
        and not (isinstance(f["type"], list) and "null" in f["type"])
        for f in record["fields"]
    }


def test_each_input_type_is_its_routes_body() -> None:
    mutations = mutation_fields()
    for endpoint in endpoints(SchemaCatalog.load()):
        field = mutations[snake(endpoint.route.name)]
        [body] = [a for a in field.arguments if a.python_name in ("input", "item")] or [
            None
        ]
        if body is None:
            continue
        cls = (
            body.type.of_type
            if isinstance(body.type, StrawberryOptional)
            else body.type
        )
        assert input_shape(cls) == avro_shape(endpoint.body), endpoint.route.name
    create = next(
        e for e in endpoints(SchemaCatalog.load()) if e.route.name == "CreateOrder"
    )
    by_name = {f["name"]: f["type"] for f in create.body["fields"]}
    assert input_shape(graphql.LineItemInput) == avro_shape(by_name["items"]["items"])
    assert input_shape(graphql.AddressInput) == avro_shape(by_name["shipping_address"])


def test_an_input_is_the_body_it_stands_for_less_what_was_left_out() -> None:
    item = graphql.LineItemInput(product_id="tea", quantity=2, unit_price_minor=450)
    order = graphql.CreateOrderInput(
        order_id="o-1",
        customer_id="c-1",
        customer_name="Ada",
        customer_email="ada@example.com",
        items=[item],
        currency="USD",
        shipping_address=graphql.AddressInput(
            street="1 Way", city="London", state="", zip_code="N1", country="GB"
        ),
    )
    assert graphql.body_of(order) == {
        "order_id": "o-1",
        "customer_id": "c-1",
        "customer_name": "Ada",
        "customer_email": "ada@example.com",
        # tax_rate_bps and account_id left out: the Avro defaults fill them in.
        "items": [{"product_id": "tea", "quantity": 2, "unit_price_minor": 450}],
        "currency": "USD",
        "shipping_address": {
            "street": "1 Way",
            "city": "London",
            "state": "",
            "zip_code": "N1",
            "country": "GB",
        },
    }
    endpoint = next(
        e for e in endpoints(SchemaCatalog.load()) if e.route.name == "CreateOrder"
    )
    command = endpoint.command({}, graphql.body_of(order))
    assert command.items[0].tax_rate_bps == 0 and command.account_id is None


def errors_of(document: str) -> list[str]:
    result = asyncio.run(SCHEMA.execute(document))
    return [error.message for error in result.errors or []]


def test_a_query_past_the_depth_limit_is_refused_before_it_runs() -> None:
    # The limiter counts nesting from 0 at the root field.
    [deep] = errors_of(
        '{ order(order_id: "o") { customer { orders { items { customer { orders {'
        " items { customer { orders { items { customer_id } } } } } } } } } } }"
    )
    assert deep == f"'anonymous' exceeds maximum operation depth of {graphql.MAX_DEPTH}"
    # One as deep as allowed is not refused by it: it runs (and fails without a
    # worker, as "internal error", which shows it got past validation).
    allowed = errors_of(
        '{ order(order_id: "o") { customer { orders { items { customer { orders {'
        " items { customer_id } } } } } } } }"
    )
    assert allowed == ["internal error"]


def test_too_many_aliases_or_tokens_are_refused() -> None:
    many = " ".join(f'a{i}: account(account_id: "x") {{ version }}' for i in range(16))
    assert errors_of(f"{{ {many} }}") == [
        f"{graphql.MAX_ALIASES + 1} aliases found. Allowed: {graphql.MAX_ALIASES}"
    ]
    fields = " ".join(["version"] * graphql.MAX_TOKENS)
    assert errors_of(f'{{ account(account_id: "x") {{ {fields} }} }}') == [
        "Syntax Error: Document contains more than "
        f"{graphql.MAX_TOKENS} tokens. Parsing aborted."
    ]


def refused_as(error: Exception) -> GraphQLError:
    async def fail() -> None:
        raise error

    with pytest.raises(GraphQLError) as raised:
        asyncio.run(graphql.guarded(fail()))
    return raised.value


def test_errors_name_the_argument_and_hide_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bad = refused_as(checked.BadParameter("page_size", "must be at most 100"))
    assert (bad.message, bad.extensions) == (
        "must be at most 100",
        {"code": "BAD_USER_INPUT", "field": "page_size"},
    )
    missing = refused_as(query.NotFound("order o-9 not found"))
    assert missing.extensions == {"code": "NOT_FOUND"}
    token = refused_as(
        Refused(401, "the bearer token is not valid", field="Authorization")
    )
    assert token.extensions == {"code": "UNAUTHENTICATED", "field": "Authorization"}
    reused = refused_as(
        Refused(
            422,
            "command id k-1 was already used for account a-2",
            field="Idempotency-Key",
            code="IdempotencyKeyReused",
            command_id="k-1",
        )
    )
    assert reused.extensions == {
        "code": "IdempotencyKeyReused",
        "field": "idempotency_key",
        "command_id": "k-1",
    }
    leak = refused_as(RuntimeError('relation "order_summaries" does not exist'))
    assert leak.message == "internal error"
    assert leak.extensions is not None
    assert leak.extensions["code"] == "INTERNAL"
    assert "order_summaries" not in str(leak.extensions)
    # The log keeps what the answer leaves out, under the same correlation id.
    assert leak.extensions["correlation_id"] in caplog.text
    assert "order_summaries" in caplog.text


@pytest.mark.parametrize(
    ("value", "ok"),
    [(2**40, True), (-(2**63), True), (2**63, False), (1.5, False), (True, False)],
)
def test_long_is_a_64_bit_whole_number(value: object, ok: bool) -> None:
    result = asyncio.run(
        SCHEMA.execute(
            'mutation ($a: Long!) { deposit(account_id: "a", input: {transaction_id:'
            ' "t", amount_minor: $a, currency: "USD", source: "s"}) { version } }',
            variable_values={"a": value},
        )
    )
    messages = [e.message for e in result.errors or []]
    if ok:
        # Past the variables: the mutation ran and, without a worker, failed.
        assert messages == ["internal error"]
    else:
        assert len(messages) == 1 and "$a" in messages[0], messages


def test_snake_case_names_as_in_the_commands() -> None:
    text = str(SCHEMA)
    assert "create_order(input: CreateOrderInput!" in text
    assert "idempotency_key: String = null, expected_version: Int = null" in text
    assert dataclasses.is_dataclass(graphql.CommandResult)
