"""The HTTP command routes: one table of method, path and command class.

Everything else a route needs is derived from the command's Avro schema and its
domain: the path's parameters are the command fields of the same names, the body is
the command's other fields (less the envelope, which the server fills), the resource
a command changes is its aggregate's view (``/orders/{order_id}``). A command class
without a route, or a path parameter that names no field, fails at import (and so in
the unit tests).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from app import params as checked
from app.adapters import mapper
from app.adapters.catalog import SchemaCatalog
from app.client import AREAS
from app.domain import accounts, orders
from app.rest.bodies import BodyError, conform, named_types


@dataclass(frozen=True, slots=True)
class Route:
    """One command over HTTP: ``"METHOD /path"`` sends ``command``.

    ``creates``: the command makes its aggregate (201 rather than 200).
    ``body_field``: the body is this one field's value rather than an object of
    the command's fields (``POST /orders/{order_id}/items`` takes the line item)."""

    request: str
    command: type
    summary: str
    creates: bool = field(default=False, kw_only=True)
    body_field: str | None = field(default=None, kw_only=True)

    @property
    def method(self) -> str:
        return self.request.split(" ", 1)[0]

    @property
    def path(self) -> str:
        return self.request.split(" ", 1)[1]

    @property
    def path_fields(self) -> tuple[str, ...]:
        return tuple(re.findall(r"\{(\w+)\}", self.path))

    @property
    def name(self) -> str:
        return self.command.__name__


ROUTES: tuple[Route, ...] = (
    Route("POST /orders", orders.CreateOrder, "Create an order", creates=True),
    Route(
        "POST /orders/{order_id}/items",
        orders.AddItem,
        "Add a line item to an order",
        body_field="item",
    ),
    Route(
        "DELETE /orders/{order_id}/items/{product_id}",
        orders.RemoveItem,
        "Remove an order's line item",
    ),
    Route(
        "POST /orders/{order_id}/payment",
        orders.ProcessPayment,
        "Record an order's payment",
    ),
    Route("POST /orders/{order_id}/ship", orders.ShipOrder, "Ship an order"),
    Route(
        "POST /orders/{order_id}/deliver",
        orders.DeliverOrder,
        "Mark an order delivered",
    ),
    Route("POST /orders/{order_id}/cancel", orders.CancelOrder, "Cancel an order"),
    Route("POST /accounts", accounts.OpenAccount, "Open an account", creates=True),
    Route(
        "POST /accounts/{account_id}/deposits",
        accounts.Deposit,
        "Deposit money into an account",
    ),
    Route(
        "POST /accounts/{account_id}/withdrawals",
        accounts.Withdraw,
        "Withdraw money from an account",
    ),
    Route(
        "POST /accounts/{account_id}/close", accounts.CloseAccount, "Close an account"
    ),
)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A route with what its command's schema says about it."""

    route: Route
    area: str  # "orders" / "accounts": the topics and the resource's path
    record_name: str  # the command's Avro full name
    body: dict[str, Any]  # the Avro schema of the body
    named: Mapping[str, dict[str, Any]]  # the named types ``body`` uses

    def command(self, path_params: Mapping[str, str], body: Any) -> Any:
        """The command this request asks for; raises ``checked.BadParameter`` for a
        bad path parameter, ``BodyError`` for a body that does not fit."""
        given = {
            name: checked.identifier(path_params[name], name)
            for name in self.route.path_fields
        }
        conformed = conform(self.body, body, self.named)
        if self.route.body_field is not None:
            fields = {**given, self.route.body_field: conformed}
        else:
            fields = {**conformed, **given}
        try:
            return mapper.from_dict(self.route.command, fields)
        except mapper.MappingError as error:  # the schema and the class disagree
            raise BodyError(error.path or None, error.message) from error

    def location(self, aggregate_id: str) -> str:
        """The resource the command changes: its aggregate's view."""
        return f"/{self.area}/{quote(aggregate_id, safe='')}"


def endpoints(catalog: SchemaCatalog) -> tuple[Endpoint, ...]:
    """Every route with its body schema, from ``catalog``."""
    return tuple(_endpoint(catalog, route) for route in ROUTES)


def _endpoint(catalog: SchemaCatalog, route: Route) -> Endpoint:
    [area] = [
        area for area, module in AREAS.values() if route.command in module.COMMANDS
    ]
    record_name = catalog.record_name(route.command)
    schema = catalog.parsed(record_name)
    fields = [
        field
        for field in schema["fields"]
        if field["name"] != "envelope" and field["name"] not in route.path_fields
    ]
    if route.body_field is not None:
        [field] = [f for f in fields if f["name"] == route.body_field]
        body = field["type"]
    else:
        body = {"type": "record", "name": record_name, "fields": fields}
    return Endpoint(route, area, record_name, body, named_types(schema))


def _check_table() -> None:
    """Every command has exactly one route, and every path parameter and body field
    is one of its command's fields."""
    commands = [c for _, module in AREAS.values() for c in module.COMMANDS]
    routed = [route.command for route in ROUTES]
    missing = [c.__name__ for c in commands if c not in routed]
    twice = sorted({c.__name__ for c in routed if routed.count(c) > 1})
    if missing or twice:
        raise TypeError(f"commands without a route: {missing}; with two: {twice}")
    for route in ROUTES:
        fields = {f.name for f in dataclasses.fields(route.command)}
        stray = [
            name
            for name in (*route.path_fields, route.body_field)
            if name is not None and name not in fields
        ]
        if stray:
            raise TypeError(f"{route.method} {route.path}: {stray} name no field")


_check_table()
