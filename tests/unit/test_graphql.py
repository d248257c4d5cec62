"""The GraphQL schema without services: one mutation per route whose arguments are
the route's, the limits, and errors that name the argument and hide the rest."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Mapping
from typing import Any, cast

import pytest
from graphql import (
    FragmentDefinitionNode,
    GraphQLError,
    GraphQLInputObjectType,
    OperationDefinitionNode,
    Undefined,
    build_schema,
    parse,
)
from strawberry.types.base import StrawberryObjectDefinition

from app import params as checked
from app import query
from app.adapters.catalog import SchemaCatalog, short_name
from app.graphql import schema as graphql
from app.graphql.cost import operation_cost
from app.rest.routes import Endpoint, endpoints
from app.rest.web import Refused

CATALOG = SchemaCatalog.load()
ENDPOINTS = endpoints(CATALOG)
SCHEMA = graphql.build(ENDPOINTS)
# The schema as a client sees it: its printed SDL, read back by graphql-core.
SDL = build_schema(SCHEMA.as_str())

SCALAR_OF_AVRO = {
    "boolean": "Boolean",
    "int": "Int",
    "long": "Long",
    "float": "Float",
    "double": "Float",
    "string": "String",
}


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def resolved(schema: Any, named: Mapping[str, Any]) -> Any:
    """A type with its named references and one-branch nullable unions resolved."""
    if isinstance(schema, str) and schema not in SCALAR_OF_AVRO:
        return resolved(named[schema], named)
    if isinstance(schema, list):
        [branch] = [b for b in schema if b != "null"]
        return resolved(branch, named)
    if isinstance(schema, dict) and schema["type"] not in ("record", "array"):
        return resolved(schema["type"], named)
    return schema


def graphql_type(schema: Any, named: Mapping[str, Any], records: dict[str, Any]) -> str:
    """The GraphQL input type an Avro type should be (nullable), noting each record
    it holds in ``records`` by its input type's name."""
    schema = resolved(schema, named)
    if isinstance(schema, str):
        return SCALAR_OF_AVRO[schema]
    if schema["type"] == "array":
        return f"[{graphql_type(schema['items'], named, records)}!]"
    name = f"{short_name(schema['name'])}Input"
    records[name] = (schema, named)
    return name


def left_out(field: Mapping[str, Any]) -> bool:
    """A field that may be left out: one with a default, or nullable."""
    kind = field["type"]
    return "default" in field or (isinstance(kind, list) and "null" in kind)


Shape = list[tuple[str, str, object]]  # name, GraphQL type, default


def shape(arguments: Mapping[str, Any]) -> Shape:
    return [(name, str(a.type), a.default_value) for name, a in arguments.items()]


def test_every_route_is_a_mutation_and_every_body_field_an_input_field() -> None:
    records: dict[str, Any] = {}
    expected_mutations: dict[str, Shape] = {}
    for endpoint in ENDPOINTS:
        route = endpoint.route
        arguments: Shape = [(name, "String!", Undefined) for name in route.path_fields]
        body = resolved(endpoint.body, endpoint.named)
        if not (body["type"] == "record" and not body["fields"]):
            kind = graphql_type(endpoint.body, endpoint.named, records)
            arguments.append((route.body_field or "input", f"{kind}!", Undefined))
        arguments += [("idempotency_key", "String", None)]
        arguments += [("expected_version", "Int", None)]
        expected_mutations[snake(route.name)] = arguments
    assert SDL.mutation_type is not None
    mutations = SDL.mutation_type.fields
    assert {name: shape(f.args) for name, f in mutations.items()} == expected_mutations
    assert {str(f.type) for f in mutations.values()} == {"CommandResult!"}

    seen: set[str] = set()
    while unseen := sorted(set(records) - seen):  # the records the inputs hold
        for name in unseen:
            seen.add(name)
            record, named = records[name]
            expected = [
                (f["name"], graphql_type(f["type"], named, records), None)
                if left_out(f)
                else (
                    f["name"],
                    graphql_type(f["type"], named, records) + "!",
                    Undefined,
                )
                for f in record["fields"]
            ]
            found = SDL.get_type(name)
            assert isinstance(found, GraphQLInputObjectType), name
            assert shape(found.fields) == expected, name
    inputs = {
        n for n, t in SDL.type_map.items() if isinstance(t, GraphQLInputObjectType)
    }
    assert (
        inputs
        == seen
        == {
            "AddressInput",
            "CancelOrderInput",
            "CloseAccountInput",
            "CreateOrderInput",
            "DepositInput",
            "LineItemInput",
            "OpenAccountInput",
            "ProcessPaymentInput",
            "ShipOrderInput",
            "WithdrawInput",
        }
    )


def input_class(name: str) -> Any:
    definition = SCHEMA.get_type_by_name(name)
    assert isinstance(definition, StrawberryObjectDefinition), name
    return definition.origin


def test_an_input_is_the_body_it_stands_for_less_what_was_left_out() -> None:
    item = input_class("LineItemInput")(
        product_id="tea", quantity=2, unit_price_minor=450
    )
    order = input_class("CreateOrderInput")(
        order_id="o-1",
        customer_id="c-1",
        customer_name="Ada",
        customer_email="ada@example.com",
        items=[item],
        currency="USD",
        shipping_address=input_class("AddressInput")(
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
    endpoint = next(e for e in ENDPOINTS if e.route.name == "CreateOrder")
    command = endpoint.command({}, graphql.body_of(order))
    assert command.items[0].tax_rate_bps == 0 and command.account_id is None


@dataclasses.dataclass
class RecordingApi:
    """A CommandApi that notes what it was asked to send and refuses it."""

    sent: list[tuple[str, Mapping[str, str], Any, dict[str, Any]]]

    def user_of(self, authorization: str | None) -> str:
        return "ada"

    async def send(
        self, endpoint: Endpoint, ids: Mapping[str, str], body: Any, **more: Any
    ) -> None:
        self.sent.append((endpoint.route.name, ids, body, more))
        raise Refused(503, "not here")


def test_a_mutation_sends_its_routes_command_through_send() -> None:
    api = RecordingApi([])
    services = graphql.Services(
        settings=cast(Any, None),
        read=cast(Any, None),
        api=cast(Any, api),
        codec=cast(Any, None),
    )
    context = graphql.Context(services, "Bearer x")
    for document in (
        'mutation { add_item(order_id: "o-1", item: {product_id: "tea", quantity: 2,'
        " unit_price_minor: 450}, expected_version: 3) { status } }",
        'mutation { remove_item(order_id: "o-1", product_id: "tea",'
        ' idempotency_key: "k-1") { status } }',
    ):
        result = asyncio.run(SCHEMA.execute(document, context_value=context))
        assert [e.message for e in result.errors or []] == ["not here"]
    assert api.sent == [
        (
            "AddItem",
            {"order_id": "o-1"},
            {"product_id": "tea", "quantity": 2, "unit_price_minor": 450},
            {"user_id": "ada", "command_id": None, "expected_version": 3, "wait": None},
        ),
        (
            "RemoveItem",
            {"order_id": "o-1", "product_id": "tea"},
            {},
            {
                "user_id": "ada",
                "command_id": "k-1",
                "expected_version": None,
                "wait": None,
            },
        ),
    ]


def errors_of(document: str) -> list[str]:
    result = asyncio.run(SCHEMA.execute(document))
    return [error.message for error in result.errors or []]


def test_a_query_past_the_depth_limit_is_refused_before_it_runs() -> None:
    # The limiter counts nesting from 0 at the root field.
    deep = errors_of(
        '{ order(order_id: "o") { customer { orders { items { customer { orders {'
        " items { customer { orders { items { customer_id } } } } } } } } } } }"
    )
    # (Its three nested pages of orders cost too much as well.)
    assert f"'anonymous' exceeds maximum operation depth of {graphql.MAX_DEPTH}" in deep
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


def cost_of(document: str) -> int:
    parsed = parse(document)
    fragments = {
        d.name.value: d
        for d in parsed.definitions
        if isinstance(d, FragmentDefinitionNode)
    }
    [operation] = [
        d for d in parsed.definitions if isinstance(d, OperationDefinitionNode)
    ]
    return operation_cost(SDL, operation, fragments)


def test_a_field_costs_once_per_item_of_the_lists_around_it() -> None:
    assert cost_of('{ account(account_id: "a") { version balance_minor } }') == 3
    # A page of orders: its items 20 by default, page_size when given, its largest
    # when a variable; the page's own fields once; a fragment what it selects.
    page = '{{ customer(customer_id: "c") {{ orders{} {{ items {{ order_id }} }} }} }}'
    assert cost_of(page.format("")) == 3 + 20 * 1
    assert cost_of(page.format("(page_size: 5)")) == 3 + 5 * 1
    assert cost_of(f"query Q($n: Int) {page.format('(page_size: $n)')}") == 3 + 100
    assert (
        cost_of(
            '{ customer(customer_id: "c") { orders { total_count page'
            " items { order_id status } } } }"
        )
        == 5 + 20 * 2
    )
    assert (
        cost_of(
            'query { customer(customer_id: "c") { ...O } } '
            "fragment O on Customer { orders { items { order_id status } } }"
        )
        == 3 + 20 * 2
    )


def test_an_operation_costing_more_than_the_limit_is_refused_before_it_runs() -> None:
    # Each of 100 orders naming its customer's 100 orders, 15 times over.
    fan = " ".join(
        f"a{i}: orders(page_size: 100) {{ items {{ order_id }} }}" for i in range(15)
    )
    document = (
        '{ order(order_id: "o") { customer { orders(page_size: 100) { items {'
        f" customer {{ {fan} }} }} }} }} }} }}"
    )
    [refused] = errors_of(document)
    assert refused.startswith(f"the operation costs {cost_of(document)}, over the ")
    assert f"limit of {graphql.MAX_COST}" in refused
    # The largest page of orders with every field a list item has runs, its
    # size given or not.
    every = " ".join(f.name for f in dataclasses.fields(graphql.OrderSummary))
    for document in (
        f"{{ orders(limit: 500) {{ items {{ {every} }} }} }}",
        f"query Q($l: Int) {{ orders(limit: $l) {{ items {{ {every} }} }} }}",
    ):
        ran = errors_of(document)
        assert not any("costs" in error for error in ran), ran


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
