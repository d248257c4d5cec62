"""The GraphQL schema: its types, and resolvers that call what the HTTP views call.

Queries run the ``/query`` views' functions (``app.query``, ``app.readside``'s
history and state) as the read-only role, with the same checks: each argument goes
to them as the query-string parameter of the same name, so a bad one is refused
naming it. Mutations send commands through the HTTP commands' ``CommandApi.send``
(the route table, the gateway, the token's user id); a decided command, accepted or
refused, is the mutation's result, anything refused before it was sent an error.
Names are snake_case, as in the commands, events and HTTP bodies, so an error's
``field`` (``input.items[0].quantity``) is the argument's own spelling.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import re
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Any, NewType, ParamSpec, TypeVar, cast
from uuid import UUID

import strawberry
from graphql import GraphQLError
from strawberry.extensions import (
    MaskErrors,
    MaxAliasesLimiter,
    MaxTokensLimiter,
    QueryDepthLimiter,
)
from strawberry.scalars import JSON
from strawberry.schema.config import StrawberryConfig
from strawberry.tools import create_type
from strawberry.types import ExecutionContext
from strawberry.types.field import StrawberryField

from app import params as checked
from app import query, readside
from app.adapters import feed
from app.adapters.catalog import short_name
from app.adapters.codec import Codec
from app.adapters.eventlog import CommandResult as Decided
from app.graphql.cost import MaxCostLimiter
from app.readside import AREA_OF_TYPE, ReadSide
from app.rest.bodies import BodyError, describe
from app.rest.routes import Endpoint
from app.rest.web import CommandApi, Refused, result_body
from app.settings import Settings

log = logging.getLogger("streamfold.graphql")

# The limits every operation is checked against before it runs (see README,
# "GraphQL"): nesting, aliases (each alias is another resolver call), tokens (the
# document's size) and cost. Lists are bounded by page_size (100) and limit (500).
MAX_DEPTH = 8
MAX_ALIASES = 15
MAX_TOKENS = 2000
# Fields counted once per item of the lists around them (see graphql.cost): the
# largest page of orders with every field (500 x 18) fits; a page of 100 orders
# each with its customer's 100 orders does not.
MAX_COST = 10_000
# Subscriptions one worker serves at once, over every connection: each holds a
# Kafka consumer and a thread (a connection holds at most 10, see graphql.web).
MAX_FEEDS = 100

# GraphQL's Int is 32 bits; amounts in minor units and offsets are not.
Long = NewType("Long", int)


def _long(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Long must be a whole number, got {value!r}")
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"Long must fit in 64 bits, got {value}")
    return value


LONG = strawberry.scalar(
    name="Long",
    description="A 64-bit whole number (amounts in minor units, offsets)",
    serialize=int,
    parse_value=_long,
)


# -- context and errors ---------------------------------------------------------------


@dataclass(slots=True)
class Services:
    """What the resolvers share, one per worker."""

    settings: Settings
    read: ReadSide
    api: CommandApi
    codec: Codec
    feeds: feed.Feeds = field(default_factory=lambda: feed.Feeds(MAX_FEEDS))


@dataclass(slots=True)
class Context:
    """One request's (or WebSocket connection's) context."""

    services: Services
    authorization: str | None
    # Strawberry puts a WebSocket's connection_init payload here; nothing reads
    # it (the subscription, like the read views, needs no token).
    connection_params: dict[str, Any] | None = None


Info = strawberry.Info[Context, None]


class ClientError(GraphQLError):
    """An error the client caused or can act on; its message and ``extensions``
    (``code``, ``field``, …) are shown as they are. Anything else is masked."""

    def __init__(self, message: str, code: str, **extensions: Any) -> None:
        more = {k: v for k, v in extensions.items() if v is not None}
        super().__init__(message, extensions={"code": code, **more})


# What a refusal before sending is called in GraphQL, by its HTTP status.
REFUSED_CODES = {
    400: "BAD_USER_INPUT",
    401: "UNAUTHENTICATED",
    403: "FORBIDDEN",
    422: "BAD_USER_INPUT",
    503: "UNAVAILABLE",
    504: "TIMEOUT",
}
# The HTTP headers CommandApi names, as the mutations' arguments.
ARGUMENT_OF_HEADER = {
    "Idempotency-Key": "idempotency_key",
    "If-Match": "expected_version",
    "Authorization": "Authorization",
}

T = TypeVar("T")
P = ParamSpec("P")


async def guarded(work: Awaitable[T]) -> T:
    """``work``'s value; its failures as ``ClientError``s, an unexpected one
    logged and shown only as ``internal error`` with a correlation id."""
    try:
        return await work
    except (ClientError, StopAsyncIteration):
        raise
    except checked.BadParameter as error:
        raise ClientError(error.message, "BAD_USER_INPUT", field=error.field) from None
    except BodyError as error:
        field = f"input.{error.field}" if error.field else "input"
        raise ClientError(error.message, "BAD_USER_INPUT", field=field) from None
    except query.NotFound as error:
        raise ClientError(str(error), "NOT_FOUND") from None
    except Refused as refused:
        body = dict(refused.body)
        field = body.pop("field", None)
        message = body.pop("error")
        raise ClientError(
            message,
            body.pop("code", None) or REFUSED_CODES.get(refused.status, "REFUSED"),
            field=ARGUMENT_OF_HEADER.get(field, field) if field else None,
            **body,
        ) from None
    except feed.FeedError as error:
        raise ClientError(str(error), "UNAVAILABLE") from None
    except Exception:
        reference = str(uuid.uuid4())
        log.exception("GraphQL resolver failed (correlation id %s)", reference)
        raise ClientError(
            "internal error", "INTERNAL", correlation_id=reference
        ) from None


def _guarding(read: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """``read`` with its failures ``guarded``."""

    @functools.wraps(read)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        return await guarded(read(*args, **kwargs))

    return call


def _json(value: Any) -> Any:
    """A value as JSON has it: times as ISO 8601, decimals as text."""
    if isinstance(value, dict):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json(v) for v in value]
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal | UUID):
        return str(value)
    return value


def _params(**given: Any) -> dict[str, str]:
    """Arguments as the query-string parameters the query functions check."""
    return {name: str(value) for name, value in given.items() if value is not None}


def _fields(cls: type[T], row: Mapping[str, Any]) -> T:
    """An output type from a row with (at least) its fields."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in row.items() if k in names})


F = TypeVar("F", bound=Callable[..., Any])


def described(description: str) -> Callable[[F], F]:
    """``@strawberry.field(description=…)``, typed (strawberry's overload for a
    field without its resolver yet is typed as Any)."""
    return cast(Callable[[F], F], strawberry.field(description=description))


def subscription(description: str) -> Callable[[F], F]:
    """``@strawberry.subscription(description=…)``, typed (as ``described``)."""
    return cast(Callable[[F], F], strawberry.subscription(description=description))


@_guarding
async def _read(
    info: Info,
    area: str | None,
    after: str | None,
    run: Callable[[Any], Awaitable[dict[str, Any]]],
    **ids: str,
) -> tuple[dict[str, Any], bool]:
    """``run`` on a read-only connection, after checking ``ids`` as the HTTP views
    check path parameters and waiting for ``area``'s projection to pass ``after``;
    the answer, and whether it may be stale."""
    for name, value in ids.items():
        checked.identifier(value, name)
    read = info.context.services.read
    fresh = await read.wait_for(area, _params(after=after)) if area else True
    async with (await read.pool()).connection() as conn:
        return await run(conn), not fresh


async def _page_of(
    info: Info,
    page_type: type[T],
    item_type: type[Any],
    run: Callable[[Any, dict[str, str]], Awaitable[dict[str, Any]]],
    params: dict[str, str],
    **more: Any,
) -> T:
    """A page of a list an output type holds (a customer's orders, an account's
    transactions), read as its holder was read: without waiting again."""
    found, _ = await _read(info, None, None, lambda c: run(c, params))
    items = [_fields(item_type, row) for row in found["items"]]
    return _fields(page_type, {**found, "items": items, **more})


# -- read models ---------------------------------------------------------------------


@strawberry.type(description="A line of an order")
class OrderItem:
    product_id: str
    quantity: int
    unit_price_minor: Long
    tax_rate_bps: int
    total_price_minor: Long


@strawberry.type(description="An order as order_summaries holds it")
class OrderSummary:
    order_id: str
    customer_id: str
    customer_name: str
    customer_email: str
    status: str
    currency: str
    total_minor: Long
    paid_minor: Long
    items_count: int
    tracking_number: str | None
    carrier: str | None
    cancel_reason: str | None
    account_id: str | None
    version: int
    created_at: str = strawberry.field(description="ISO 8601")
    updated_at: str = strawberry.field(description="ISO 8601")

    @described("The order's customer")
    async def customer(self, info: Info) -> Customer:
        return await _customer(info, self.customer_id, None)

    @described("The account that paid, once one did")
    async def account(self, info: Info) -> Account | None:
        if self.account_id is None:
            return None
        found, _ = await _read(
            info, None, None, lambda c: query.account(c, str(self.account_id))
        )
        return _fields(Account, {**found, "stale": False})


@strawberry.type(description="An order with its lines")
class Order(OrderSummary):
    items: list[OrderItem]
    stale: bool


@strawberry.type
class OrderList:
    items: list[OrderSummary]
    limit: int
    stale: bool


@strawberry.type
class CustomerStatistics:
    currency: str
    total_orders: int
    lifetime_value_minor: Long


@strawberry.type
class OrderPage:
    items: list[OrderSummary]
    total_count: int
    page: int
    page_size: int
    stale: bool


@strawberry.type(description="A customer: their orders, newest first, and totals")
class Customer:
    customer_id: str
    statistics: list[CustomerStatistics]
    stale: bool

    @strawberry.field
    async def orders(
        self, info: Info, page: int | None = None, page_size: int | None = None
    ) -> OrderPage:
        return await _page_of(
            info,
            OrderPage,
            OrderSummary,
            lambda c, p: query.customer_orders(c, self.customer_id, p),
            _params(page=page, page_size=page_size),
            stale=self.stale,
        )


async def _customer(info: Info, customer_id: str, after: str | None) -> Customer:
    found, stale = await _read(
        info,
        "orders",
        after,
        lambda c: query.customer_orders(c, customer_id, _params(page_size=1)),
        customer_id=customer_id,
    )
    return Customer(
        customer_id=customer_id,
        statistics=[_fields(CustomerStatistics, s) for s in found["statistics"]],
        stale=stale,
    )


@strawberry.type
class Transaction:
    transaction_id: str
    kind: str
    amount_minor: Long
    currency: str
    counterparty: str | None
    reference: str | None
    balance_after_minor: Long
    stream_version: int
    occurred_at: str = strawberry.field(description="ISO 8601")


@strawberry.type
class TransactionPage:
    items: list[Transaction]
    total_count: int
    page: int
    page_size: int


@strawberry.type(description="An account as account_balances holds it")
class Account:
    account_id: str
    owner_id: str
    currency: str
    balance_minor: Long
    overdraft_limit_minor: Long
    status: str
    version: int
    last_updated: str = strawberry.field(description="ISO 8601")
    stale: bool

    @described("Its transactions, newest first")
    async def transactions(
        self, info: Info, page: int | None = None, page_size: int | None = None
    ) -> TransactionPage:
        return await _page_of(
            info,
            TransactionPage,
            Transaction,
            lambda c, p: query.transactions(c, self.account_id, p),
            _params(page=page, page_size=page_size),
        )


@strawberry.type
class OrderMatch:
    order_id: str
    customer_id: str
    customer_name: str
    customer_email: str
    status: str
    currency: str
    total_minor: Long
    items_count: int
    shipping_address: str | None
    tracking_number: str | None
    created_at: str
    updated_at: str
    product_ids: list[str]
    rank: float


@strawberry.type
class CustomerMatch:
    customer_id: str
    name: str
    email: str
    first_order_at: str
    updated_at: str
    rank: float


@strawberry.type(description="Search results: orders or customers, by type")
class SearchPage:
    q: str
    type: str
    orders: list[OrderMatch]
    customers: list[CustomerMatch]
    total_count: int
    page: int | None
    page_size: int
    next_cursor: str | None
    stale: bool


@strawberry.type(description="An event as the event-log index holds it")
class HistoricEvent:
    stream_version: int
    event_type: str
    schema_version: int | None
    occurred_at: str
    event_id: str
    correlation_id: str
    causation_id: str
    user_id: str | None
    data: JSON


@strawberry.type
class History:
    aggregate_type: str
    aggregate_id: str
    events: list[HistoricEvent]
    stale: bool


@strawberry.type(description="An aggregate's state, folded from its events")
class AggregateState:
    aggregate_type: str
    aggregate_id: str
    version: int
    state: JSON
    stale: bool


@strawberry.type
class Query:
    @described("An order and its lines")
    async def order(self, info: Info, order_id: str, after: str | None = None) -> Order:
        found, stale = await _read(
            info,
            "orders",
            after,
            lambda c: query.order(c, order_id),
            order_id=order_id,
        )
        items = [_fields(OrderItem, i) for i in found.pop("items")]
        return _fields(Order, {**found, "items": items, "stale": stale})

    @described("Orders by status, customer and creation time")
    async def orders(
        self,
        info: Info,
        status: str | None = None,
        customer_id: str | None = None,
        since: Annotated[str | None, strawberry.argument(name="from")] = None,
        until: Annotated[str | None, strawberry.argument(name="to")] = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> OrderList:
        params = _params(
            status=status,
            customer_id=customer_id,
            limit=limit,
            **{"from": since, "to": until},
        )
        found, stale = await _read(
            info, "orders", after, lambda c: query.search_orders(c, params)
        )
        return OrderList(
            items=[_fields(OrderSummary, r) for r in found["items"]],
            limit=found["limit"],
            stale=stale,
        )

    @described("A customer (one with orders)")
    async def customer(
        self, info: Info, customer_id: str, after: str | None = None
    ) -> Customer:
        return await _customer(info, customer_id, after)

    @described("An account")
    async def account(
        self, info: Info, account_id: str, after: str | None = None
    ) -> Account:
        found, stale = await _read(
            info,
            "accounts",
            after,
            lambda c: query.account(c, account_id),
            account_id=account_id,
        )
        return _fields(Account, {**found, "stale": stale})

    @described("Full-text search, as GET /query/search")
    async def search(
        self,
        info: Info,
        q: str,
        type: str | None = None,
        page: int | None = None,
        page_size: int | None = None,
        cursor: str | None = None,
        after: str | None = None,
    ) -> SearchPage:
        params = _params(q=q, type=type, page=page, page_size=page_size, cursor=cursor)
        found, stale = await _read(
            info, "orders", after, lambda c: query.search(c, params)
        )
        rows = found["items"]
        kind = found["type"]
        return SearchPage(
            q=found["q"],
            type=kind,
            orders=[_fields(OrderMatch, r) for r in rows] if kind == "orders" else [],
            customers=(
                [_fields(CustomerMatch, r) for r in rows] if kind == "customers" else []
            ),
            total_count=found["total_count"],
            page=found["page"],
            page_size=found["page_size"],
            next_cursor=found["next_cursor"],
            stale=stale,
        )

    @described("An aggregate's events from the event-log index")
    async def history(
        self,
        info: Info,
        aggregate_id: str,
        type: str | None = None,
        from_version: int | None = None,
        to_version: int | None = None,
        after: str | None = None,
    ) -> History:
        params = _params(type=type, from_version=from_version, to_version=to_version)
        found, stale = await _indexed(
            info, readside.history_view, aggregate_id, params, type, after
        )
        return History(
            aggregate_type=found["aggregate_type"],
            aggregate_id=found["aggregate_id"],
            events=[_fields(HistoricEvent, e) for e in found["events"]],
            stale=stale,
        )

    @described("An aggregate's state now, at a version or a time")
    async def state(
        self,
        info: Info,
        aggregate_id: str,
        type: str | None = None,
        version: int | None = None,
        at: str | None = None,
        after: str | None = None,
    ) -> AggregateState:
        params = _params(type=type, version=version, at=at)
        found, stale = await _indexed(
            info, readside.state_view, aggregate_id, params, type, after
        )
        return _fields(
            AggregateState, {**found, "state": _json(found["state"]), "stale": stale}
        )


@_guarding
async def _indexed(
    info: Info,
    view: Callable[[Settings, str, dict[str, str]], Awaitable[T]],
    aggregate_id: str,
    params: dict[str, str],
    kind: str | None,
    after: str | None,
) -> tuple[T, bool]:
    """``view`` of ``aggregate_id`` from the event-log index, after waiting for the
    index to pass ``after`` in the events topic of ``kind`` (which ``after`` needs: a
    position names a partition of one topic); its answer, and whether it may be
    stale."""
    checked.identifier(aggregate_id, "aggregate_id")
    fresh = await info.context.services.read.wait_for_index(kind, _params(after=after))
    return await view(info.context.services.settings, aggregate_id, params), not fresh


# -- commands ------------------------------------------------------------------------
# The mutations and their input types are generated from the route table and the
# commands' Avro schemas, as the OpenAPI document is (app.rest.openapi): one mutation
# per route, named as its command in snake_case, whose arguments are the path's ids,
# the body (as ``input``, or as the route's body field: ``add_item``'s ``item``),
# idempotency_key and expected_version. An input type is a body record: the Avro
# fields less the envelope and the path's ids; a field with a default, or nullable,
# may be left out and then takes the schema's default.


@strawberry.type(description="A decided command: accepted, or refused with a code")
class CommandResult:
    command_id: str
    aggregate_type: str
    aggregate_id: str
    status: str = strawberry.field(description="ACCEPTED or REJECTED")
    version: int | None
    event_ids: list[str]
    partition: int | None
    offset: Long | None = strawberry.field(
        description="The last event's offset; with partition, the after argument "
        "of the read-model queries (PARTITION:OFFSET)"
    )
    code: str | None
    message: str | None
    field: str | None
    correlation_id: str


def body_of(value: Any) -> Any:
    """An input as the JSON body it stands for; fields left out (None) are left out,
    so the Avro schema's defaults apply."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: body_of(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if getattr(value, f.name) is not None
        }
    if isinstance(value, list):
        return [body_of(item) for item in value]
    return value


async def send(
    info: Info,
    endpoint: Endpoint,
    ids: Mapping[str, str],
    body: Any,
    idempotency_key: str | None,
    expected_version: int | None,
) -> CommandResult:
    """``endpoint``'s command through ``CommandApi.send``, as the caller's token's
    user."""
    services = info.context.services

    async def run() -> Decided:
        user_id = services.api.user_of(info.context.authorization)
        if idempotency_key is not None:
            checked.identifier(idempotency_key, "idempotency_key")
        if expected_version is not None and expected_version < 0:
            raise checked.BadParameter("expected_version", "must be 0 or more")
        return await services.api.send(
            endpoint,
            ids,
            body_of(body) if body is not None else {},
            user_id=user_id,
            command_id=idempotency_key,
            expected_version=expected_version,
            wait=None,
        )

    decided = await guarded(run())
    return CommandResult(**result_body(decided))


# What each Avro primitive a body holds is in GraphQL.
SCALAR_OF_AVRO: dict[str, Any] = {
    "boolean": bool,
    "int": int,
    "long": Long,
    "float": float,
    "double": float,
    "string": str,
}
KEYWORD = inspect.Parameter.KEYWORD_ONLY
# The arguments every mutation takes after its route's: the HTTP headers'.
HEADER_ARGUMENTS = (
    inspect.Parameter("idempotency_key", KEYWORD, default=None, annotation=str | None),
    inspect.Parameter("expected_version", KEYWORD, default=None, annotation=int | None),
)


def mutation_name(endpoint: Endpoint) -> str:
    """The command's name in snake_case: ``CreateOrder`` → ``create_order``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", endpoint.route.name).lower()


def may_be_left_out(field: Mapping[str, Any]) -> bool:
    """An Avro field with a default, or nullable: its input field is optional."""
    kind = field["type"]
    return "default" in field or (isinstance(kind, list) and "null" in kind)


class InputTypes:
    """The input types of the command bodies: one per Avro record, by full name, so
    that a record two bodies hold (``LineItem``) is one GraphQL type."""

    def __init__(self) -> None:
        self.made: dict[str, type] = {}

    def annotation(self, schema: Any, named: Mapping[str, dict[str, Any]]) -> Any:
        """What strawberry reads as ``schema``'s GraphQL input type."""
        if isinstance(schema, str):
            if schema in SCALAR_OF_AVRO:
                return SCALAR_OF_AVRO[schema]
            if schema in named:
                return self.annotation(named[schema], named)
        elif isinstance(schema, list):
            others = [branch for branch in schema if branch != "null"]
            if len(others) == 1:  # GraphQL has no input unions
                return self.annotation(others[0], named) | None
        elif isinstance(schema["type"], dict | list):
            return self.annotation(schema["type"], named)
        elif schema["type"] == "record":
            return self.record(schema, named)
        elif schema["type"] == "array":
            # mypy takes list[...] for a type, and this one is made at run time
            item = self.annotation(schema["items"], named)
            return list[item]  # type: ignore[valid-type]
        elif schema["type"] in SCALAR_OF_AVRO and "logicalType" not in schema:
            return SCALAR_OF_AVRO[schema["type"]]
        # Enums, maps, timestamps… would need their own GraphQL types; no body
        # holds one yet, and one that does fails here, at start-up.
        raise TypeError(f"{describe(schema)} has no GraphQL input type here")

    def record(self, schema: dict[str, Any], named: Mapping[str, Any]) -> type:
        name = str(schema["name"])
        if name not in self.made:
            fields = [
                (f["name"], self.annotation(f["type"], named) | None, None)
                if may_be_left_out(f)
                else (f["name"], self.annotation(f["type"], named))
                for f in schema["fields"]
            ]
            cls = dataclasses.make_dataclass(
                f"{short_name(name)}Input", fields, kw_only=True
            )
            self.made[name] = strawberry.input(cls)
        return self.made[name]


def _has_body(endpoint: Endpoint) -> bool:
    """Whether a route takes a body: not when its command has only the path's ids
    (as in app.rest.openapi)."""
    body = endpoint.body
    return not (isinstance(body, dict) and body.get("fields") == [])


def _body_required(endpoint: Endpoint) -> bool:
    """Whether a body must be given: a record with a field that may not be left out,
    or anything else not nullable."""
    body = endpoint.body
    if isinstance(body, str):
        body = endpoint.named.get(body, body)
    if isinstance(body, dict) and body["type"] == "record":
        return not all(may_be_left_out(field) for field in body["fields"])
    return not (isinstance(body, list) and "null" in body)


def mutation_type(routed: Iterable[Endpoint]) -> type:
    """The Mutation type: a mutation for each of ``routed``."""
    inputs = InputTypes()
    return create_type(
        "Mutation",
        [_mutation(endpoint, inputs) for endpoint in routed],
        description="One mutation per command. Each needs Authorization: Bearer "
        "<token>; idempotency_key is the command id, expected_version the version "
        "the caller saw.",
    )


def _mutation(endpoint: Endpoint, inputs: InputTypes) -> StrawberryField:
    route = endpoint.route
    # Strawberry reads a resolver's arguments from its signature, which is this one
    # (resolve takes them as keywords).
    parameters = [inspect.Parameter("info", KEYWORD, annotation=Info)]
    parameters += [
        inspect.Parameter(name, KEYWORD, annotation=str) for name in route.path_fields
    ]
    body = route.body_field or "input"
    if _has_body(endpoint):
        annotation = inputs.annotation(endpoint.body, endpoint.named)
        parameters.append(
            inspect.Parameter(body, KEYWORD, annotation=annotation)
            if _body_required(endpoint)
            else inspect.Parameter(
                body, KEYWORD, default=None, annotation=annotation | None
            )
        )
    parameters += HEADER_ARGUMENTS

    async def resolve(info: Info, **arguments: Any) -> CommandResult:
        return await send(
            info,
            endpoint,
            {name: arguments[name] for name in route.path_fields},
            arguments.get(body),
            arguments.get("idempotency_key"),
            arguments.get("expected_version"),
        )

    resolve.__name__ = mutation_name(endpoint)
    # mypy knows no __signature__ on functions; inspect.signature reads it.
    resolve.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        parameters, return_annotation=CommandResult
    )
    return strawberry.mutation(resolve)


# -- the subscription -----------------------------------------------------------------


@strawberry.type(description="An event as its topic holds it")
class AggregateEvent:
    aggregate_type: str
    aggregate_id: str
    stream_version: int
    event_type: str
    event_id: str
    occurred_at: str = strawberry.field(description="ISO 8601")
    user_id: str | None
    correlation_id: str
    causation_id: str
    command_id: str | None
    partition: int
    offset: Long
    data: JSON


def _event(fed: feed.FedEvent) -> AggregateEvent:
    meta = fed.metadata
    return AggregateEvent(
        aggregate_type=meta["aggregate_type"],
        aggregate_id=meta["aggregate_id"],
        stream_version=meta["stream_version"],
        event_type=meta["event_type"],
        event_id=meta["event_id"],
        occurred_at=meta["timestamp"].isoformat(),
        user_id=meta.get("user_id"),
        correlation_id=meta["correlation_id"],
        causation_id=meta["causation_id"],
        command_id=meta.get("command_id"),
        partition=fed.partition,
        offset=Long(fed.offset),
        data=_json(fed.data),
    )


@strawberry.type
class Subscription:
    @subscription(
        "An aggregate's committed events: those at or after from_offset "
        "of its partition (its start by default) with versions from from_version "
        "on, then each new one"
    )
    async def aggregate_events(
        self,
        info: Info,
        type: str,
        aggregate_id: str,
        from_version: int = 1,
        from_offset: Long | None = None,
    ) -> AsyncGenerator[AggregateEvent, None]:
        services = info.context.services

        async def check() -> str:
            checked.identifier(aggregate_id, "aggregate_id")
            if type not in AREA_OF_TYPE:
                raise checked.BadParameter(
                    "type", f"must be one of {', '.join(AREA_OF_TYPE)}, got {type!r}"
                )
            if from_version < 1:
                raise checked.BadParameter("from_version", "must be 1 or more")
            if from_offset is not None and from_offset < 0:
                raise checked.BadParameter("from_offset", "must be 0 or more")
            services.feeds.take()
            return AREA_OF_TYPE[type]

        area = await guarded(check())
        events = feed.aggregate_events(
            services.settings,
            services.codec,
            area,
            aggregate_id,
            from_offset=from_offset,
            from_version=from_version,
        )
        try:
            while True:
                try:
                    fed = await guarded(anext(events))
                except StopAsyncIteration:
                    return
                yield _event(fed)
        finally:
            services.feeds.give_back()
            await events.aclose()


class Schema(strawberry.Schema):
    """Logs what it masks: an unexpected error's traceback stays in the log."""

    def process_errors(
        self,
        errors: list[GraphQLError],
        execution_context: ExecutionContext | None = None,
    ) -> None:
        for error in errors:
            if error.original_error is not None and not isinstance(
                error.original_error, GraphQLError
            ):
                log.error("GraphQL error", exc_info=error.original_error)


def _unexpected(error: GraphQLError) -> bool:
    original = error.original_error
    return original is not None and not isinstance(original, GraphQLError)


def build(routed: Iterable[Endpoint]) -> strawberry.Schema:
    """The schema, with its limits and a mutation for each of ``routed``."""
    return Schema(
        query=Query,
        mutation=mutation_type(routed),
        subscription=Subscription,
        config=StrawberryConfig(auto_camel_case=False, scalar_map={Long: LONG}),
        extensions=[
            lambda: QueryDepthLimiter(max_depth=MAX_DEPTH),
            lambda: MaxAliasesLimiter(max_alias_count=MAX_ALIASES),
            lambda: MaxTokensLimiter(max_token_count=MAX_TOKENS),
            lambda: MaxCostLimiter(max_cost=MAX_COST),
            # The last guard: a message no resolver chose (a bug) is not shown.
            lambda: MaskErrors(
                should_mask_error=_unexpected, error_message="internal error"
            ),
        ],
    )
