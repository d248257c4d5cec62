"""The mapper: frozen dataclasses ↔ dicts, and errors that name the field path."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import pytest

from app.adapters import mapper
from app.adapters.mapper import MappingError, from_dict, to_dict
from app.domain import accounts, orders
from app.domain.orders.values import to_order_line
from app.workload import new_order
from tests.unit.deciders import recorded


class Colour(StrEnum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True, slots=True, kw_only=True)
class Inner:
    colour: Colour
    tags: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Outer:
    flag: bool
    count: int
    at: datetime
    inner: Inner | None
    inners: tuple[Inner, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Floaty:
    amount: float


ITEM = orders.LineItem(product_id="p-1", quantity=2, unit_price_minor=100)
ORDER = recorded(
    orders.OrderCreated,
    new_order(
        "o-1",
        "c-1",
        (ITEM,),
        name="Ann",
        email="ann@example.com",
        address=orders.Address(
            street="s", city="c", state="", zip_code="z", country="US"
        ),
    ),
    items=(to_order_line(ITEM, "item"),),
    total_minor=200,
)


def order_dict() -> dict[str, Any]:
    return {
        "order_id": "o-1",
        "customer_id": "c-1",
        "customer_name": "Ann",
        "customer_email": "ann@example.com",
        "items": [
            {
                "product_id": "p-1",
                "quantity": 2,
                "unit_price_minor": 100,
                "tax_rate_bps": 0,
                "total_price_minor": 200,
            }
        ],
        "currency": "USD",
        "shipping_address": {
            "street": "s",
            "city": "c",
            "state": "",
            "zip_code": "z",
            "country": "US",
        },
        "total_minor": 200,
        "account_id": None,
    }


def test_nested_dataclasses_and_tuples_become_dicts_and_lists() -> None:
    assert to_dict(ORDER) == order_dict()
    assert from_dict(orders.OrderCreated, order_dict()) == ORDER


def test_enums_optionals_bools_and_datetimes() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    value = Outer(
        flag=True,
        count=3,
        at=when,
        inner=Inner(colour=Colour.RED, tags=("a", "b")),
        inners=(Inner(colour=Colour.BLUE, tags=()),),
    )
    data = to_dict(value)
    assert data == {
        "flag": True,
        "count": 3,
        "at": when,
        "inner": {"colour": "red", "tags": ["a", "b"]},
        "inners": [{"colour": "blue", "tags": []}],
    }
    assert type(data["inner"]["colour"]) is str
    assert from_dict(Outer, data) == value
    empty = Outer(flag=False, count=0, at=when, inner=None)
    assert from_dict(Outer, to_dict(empty)) == empty


def test_fields_with_defaults_may_be_left_out() -> None:
    data = {"flag": False, "count": 1, "at": datetime.now(UTC), "inner": None}
    assert from_dict(Outer, data).inners == ()
    command = from_dict(
        accounts.Deposit,
        {
            "account_id": "a",
            "transaction_id": "t",
            "amount_minor": 1,
            "currency": "EUR",
            "source": "s",
        },
    )
    assert command.reference == ""


@pytest.mark.parametrize(
    ("change", "path", "words"),
    [
        (lambda d: d["items"][0].pop("quantity"), "items[0].quantity", "is missing"),
        (lambda d: d.pop("order_id"), "order_id", "is missing"),
        (
            lambda d: d["shipping_address"].update(zipcode="z"),
            "shipping_address.zipcode",
            "is not a field of Address",
        ),
        (lambda d: d.update(extra=1), "extra", "is not a field of OrderCreated"),
        (
            lambda d: d["items"][0].update(quantity=True),
            "items[0].quantity",
            "expected a whole number, got True",
        ),
        (
            lambda d: d["items"][0].update(unit_price_minor=1.5),
            "items[0].unit_price_minor",
            "expected a whole number, got 1.5",
        ),
        (lambda d: d.update(customer_name=None), "customer_name", "expected a string"),
        (lambda d: d.update(items="p-1"), "items", "expected a list, got str"),
        (
            lambda d: d.update(shipping_address="1 Main St"),
            "shipping_address",
            "expected a record for Address, got str",
        ),
        (lambda d: d.update(account_id=7), "account_id", "expected a string, got 7"),
    ],
)
def test_errors_name_the_field_path(change: Any, path: str, words: str) -> None:
    data = order_dict()
    change(data)
    with pytest.raises(MappingError) as caught:
        from_dict(orders.OrderCreated, data)
    assert caught.value.path == path
    assert caught.value.field == path
    assert words in caught.value.message
    assert str(caught.value) == f"{path}: {caught.value.message}"


def test_enum_value_outside_the_enum() -> None:
    with pytest.raises(MappingError, match=r"inner\.colour: 'green' is not one of"):
        from_dict(
            Outer,
            {
                "flag": True,
                "count": 1,
                "at": datetime.now(UTC),
                "inner": {"colour": "green", "tags": []},
            },
        )


def test_a_record_that_is_not_a_mapping() -> None:
    with pytest.raises(MappingError) as caught:
        from_dict(orders.OrderDelivered, ["o-1"])  # type: ignore[arg-type]
    assert caught.value.path == ""


def test_floats_are_refused_when_the_class_is_first_used() -> None:
    with pytest.raises(TypeError, match=r"Floaty\.amount"):
        to_dict(Floaty(amount=1.0))
    with pytest.raises(TypeError, match="not a dataclass"):
        to_dict(object())


def test_event_and_command_records_split_back() -> None:
    meta = {"event_id": "e-1"}
    record = mapper.event_record(ORDER, meta)
    assert next(iter(record)) == "metadata"
    assert record == {"metadata": meta, **order_dict()}
    assert mapper.split_event(record) == (meta, order_dict())

    command = orders.DeliverOrder(order_id="o-1")
    envelope = {"command_id": "c-1"}
    record = mapper.command_record(command, envelope)
    assert record == {"envelope": envelope, "order_id": "o-1"}
    assert mapper.split_command(record) == (envelope, {"order_id": "o-1"})


def test_split_without_its_head_names_it() -> None:
    with pytest.raises(MappingError) as caught:
        mapper.split_command({"order_id": "o-1"})
    assert caught.value.path == "envelope"
    with pytest.raises(MappingError, match="metadata: is missing"):
        mapper.split_event({"order_id": "o-1"})
