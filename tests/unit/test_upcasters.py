"""Upcasters: OrderCreated's semantic steps, and the generic default-filling step."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastavro.validation import validate

from app.adapters.catalog import SchemaCatalog, UpcastError
from schemas.orders.OrderCreated.upcasters import (
    parse_address,
    upcast_v1_to_v2,
    upcast_v2_to_v3,
)
from tests.unit.old_writers import ORDER_CREATED_V1, ORDER_CREATED_V2

ORDER_CREATED = "streamfold.orders.OrderCreated"
METADATA = {
    "event_id": "e-1",
    "event_type": "OrderCreated",
    "event_version": 1,
    "aggregate_type": "order",
    "aggregate_id": "o-1",
    "stream_version": 1,
    "timestamp": datetime(2024, 5, 1, tzinfo=UTC),
    "user_id": None,
    "correlation_id": "c-1",
    "causation_id": "c-1",
    "command_id": "c-1",
}
V1 = {"metadata": METADATA, **ORDER_CREATED_V1}


@pytest.fixture(scope="module")
def catalog() -> SchemaCatalog:
    return SchemaCatalog.load()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "742 Evergreen Terrace, Springfield, OR, 97403, USA",
            ("742 Evergreen Terrace", "Springfield", "OR", "97403", "USA"),
        ),
        ("1 Main St, Springfield", ("1 Main St", "Springfield", "", "", "USA")),
        ("", ("", "", "", "", "USA")),
        (
            "1 Rue X, Paris, , 75001, France",
            ("1 Rue X", "Paris", "", "75001", "France"),
        ),
        ("a,b,c,d,", ("a", "b", "c", "d", "USA")),
        (
            "Apt 4, 1 Main St, Springfield, IL, 62701, USA",
            ("Apt 4, 1 Main St", "Springfield", "IL", "62701", "USA"),
        ),
    ],
)
def test_parse_address(text: str, expected: tuple[str, ...]) -> None:
    keys = ("street", "city", "state", "zip_code", "country")
    assert parse_address(text) == dict(zip(keys, expected, strict=True))


def test_v1_to_v2_prices_lines_parses_the_address_and_assumes_usd(
    catalog: SchemaCatalog,
) -> None:
    before = copy.deepcopy(V1)
    v2 = upcast_v1_to_v2(V1)

    assert before == V1  # pure: the input is left alone
    assert validate(v2, catalog.parsed(ORDER_CREATED, 2), raise_errors=True)
    assert v2["items"] == [
        {
            "product_id": "p-1",
            "quantity": 3,
            "unit_price_minor": 250,
            "tax_rate_bps": 0,
            "total_price_minor": 750,
        },
        {
            "product_id": "p-2",
            "quantity": 1,
            "unit_price_minor": 1999,
            "tax_rate_bps": 0,
            "total_price_minor": 1999,
        },
    ]
    assert v2["shipping_address"]["street"] == "742 Evergreen Terrace"
    assert v2["currency"] == "USD"
    assert v2["total_minor"] == 2749


def test_v2_to_v3_fills_customer_fields_and_repairs_leftovers(
    catalog: SchemaCatalog,
) -> None:
    v2 = {"metadata": {**METADATA, "event_version": 2}, **ORDER_CREATED_V2}
    before = copy.deepcopy(v2)
    v3 = upcast_v2_to_v3(v2)

    assert v2 == before
    assert validate(v3, catalog.parsed(ORDER_CREATED, 3), raise_errors=True)
    # 999 net + 7.5% tax (74.925) rounded half up = 1074.
    assert [i["total_price_minor"] for i in v3["items"]] == [1074, 100]
    assert v3["shipping_address"] == {
        "street": "1 Main St",
        "city": "Springfield",
        "state": "IL",
        "zip_code": "62701",
        "country": "USA",
    }
    assert (v3["customer_name"], v3["customer_email"], v3["account_id"]) == (
        "",
        "",
        None,
    )
    assert v3["currency"] == "CAD"


def test_catalog_chains_the_steps_from_v1(catalog: SchemaCatalog) -> None:
    latest = catalog.upcast(ORDER_CREATED, 1, copy.deepcopy(V1))
    assert latest == upcast_v2_to_v3(upcast_v1_to_v2(V1))
    assert validate(latest, catalog.parsed(ORDER_CREATED), raise_errors=True)
    assert catalog.upcaster_functions(ORDER_CREATED) == {
        (1, 2): "upcast_v1_to_v2",
        (2, 3): "upcast_v2_to_v3",
    }


# -- the generic step --------------------------------------------------------------------


def _write(root: Path, relative: str, schema: dict[str, Any]) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(schema), encoding="utf-8")


@pytest.fixture
def parcel_tree(tmp_path: Path) -> Path:
    """A record with three versions and no upcasters: every step is the generic one."""
    root = tmp_path / "schemas"
    box_v1 = {
        "type": "record",
        "name": "Box",
        "fields": [{"name": "w", "type": "int"}],
    }
    box_v2 = {
        "type": "record",
        "name": "Box",
        "fields": [
            {"name": "w", "type": "int"},
            {"name": "h", "type": "int", "default": 1},
        ],
    }

    def parcel(*fields: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "record",
            "name": "Parcel",
            "namespace": "streamfold.orders",
            "fields": [{"name": "id", "type": "string"}, *fields],
        }

    _write(
        root,
        "orders/Parcel/v1.avsc",
        parcel(
            {"name": "box", "type": box_v1},
            {"name": "old", "type": "string"},
        ),
    )
    v2_fields = (
        {"name": "box", "type": box_v2},
        {"name": "boxes", "type": {"type": "array", "items": "Box"}, "default": []},
        {"name": "note", "type": "string", "default": "none"},
    )
    _write(root, "orders/Parcel/v2.avsc", parcel(*v2_fields))
    # v3 adds two fields with defaults to v2's.
    _write(
        root,
        "orders/Parcel/v3.avsc",
        parcel(
            *v2_fields,
            {"name": "spare", "type": ["null", "Box"], "default": None},
            {
                "name": "tags",
                "type": {"type": "map", "values": "string"},
                "default": {},
            },
        ),
    )
    return root


def test_generic_step_fills_defaults_and_drops_removed_fields(
    parcel_tree: Path,
) -> None:
    catalog = SchemaCatalog.load(parcel_tree)
    assert catalog.problems == []

    latest = catalog.upcast(
        "streamfold.orders.Parcel", 1, {"id": "p", "box": {"w": 2}, "old": "x"}
    )

    assert latest == {
        "id": "p",
        "box": {"w": 2, "h": 1},
        "boxes": [],
        "note": "none",
        "spare": None,
        "tags": {},
    }
    assert validate(
        latest, catalog.parsed("streamfold.orders.Parcel"), raise_errors=True
    )


def test_generic_step_fills_nested_records_in_arrays_and_unions(
    parcel_tree: Path,
) -> None:
    catalog = SchemaCatalog.load(parcel_tree)
    v2 = {"id": "p", "box": {"w": 2, "h": 3}, "boxes": [{"w": 4}], "note": "n"}

    latest = catalog.upcast("streamfold.orders.Parcel", 2, v2)

    assert latest["boxes"] == [{"w": 4, "h": 1}]
    assert latest["box"] == {"w": 2, "h": 3}
    assert latest["note"] == "n"


def test_generic_step_refuses_a_new_field_without_default(parcel_tree: Path) -> None:
    v4 = json.loads((parcel_tree / "orders/Parcel/v3.avsc").read_text())
    v4["fields"].append({"name": "weight", "type": "long"})
    _write(parcel_tree, "orders/Parcel/v4.avsc", v4)
    catalog = SchemaCatalog.load(parcel_tree)

    with pytest.raises(UpcastError, match=r"Parcel\.weight is new and has no default"):
        catalog.upcast("streamfold.orders.Parcel", 3, {"id": "p", "box": {"w": 1}})
