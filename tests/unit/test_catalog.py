"""The schema catalog: reading the tree, inlining, identity, and the catalog check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import fastavro
import pytest

from app.adapters.catalog import (
    SchemaCatalog,
    UnknownRecord,
    check_catalog,
    domain_class,
    kind,
    record_name,
    short_name,
)
from app.domain import accounts, orders

ORDER_CREATED = "streamfold.orders.OrderCreated"
REAL_ROOT = Path(__file__).resolve().parents[2] / "schemas"


@pytest.fixture(scope="module")
def catalog() -> SchemaCatalog:
    return SchemaCatalog.load()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the real tree to break on purpose."""
    root = tmp_path / "schemas"
    shutil.copytree(REAL_ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def write(path: Path, schema: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(schema, indent=2), encoding="utf-8")


def latest_json(root: Path, area: str, record: str) -> dict[str, Any]:
    files = sorted(
        (root / area / record).glob("v*.avsc"), key=lambda p: int(p.stem[1:])
    )
    return json.loads(files[-1].read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def test_the_real_tree_passes_the_check(catalog: SchemaCatalog) -> None:
    assert catalog.problems == []
    assert check_catalog(catalog) == []


def test_the_real_tree_holds_every_record(catalog: SchemaCatalog) -> None:
    domain = {*orders.EVENTS, *orders.COMMANDS, *accounts.EVENTS, *accounts.COMMANDS}
    expected = {record_name(cls) for cls in domain} | {
        "streamfold.EventMetadata",
        "streamfold.CommandEnvelope",
        "streamfold.CommandResult",
        "streamfold.orders.Address",
        "streamfold.orders.LineItem",
        "streamfold.orders.OrderLine",
    }
    assert set(catalog.names()) == expected
    assert catalog.versions(ORDER_CREATED) == (1, 2, 3)
    assert catalog.latest_version(ORDER_CREATED) == 3
    others = [n for n in catalog.names() if n != ORDER_CREATED]
    assert all(catalog.versions(n) == (1,) for n in others)


def test_each_registered_schema_is_self_contained(catalog: SchemaCatalog) -> None:
    for name in catalog.names():
        for version in catalog.versions(name):
            text = catalog.schema(name, version)
            # A fresh parse with no named types known beforehand must succeed.
            parsed = fastavro.parse_schema(json.loads(text), named_schemas={})
            assert parsed["name"] == name
    event = json.loads(catalog.schema("streamfold.orders.OrderItemAdded"))
    assert event["fields"][0]["type"]["name"] == "EventMetadata"
    assert event["fields"][2]["type"]["name"] == "OrderLine"


def test_shared_types_are_defined_once_per_schema(catalog: SchemaCatalog) -> None:
    text = catalog.schema(ORDER_CREATED, 3)
    # Address is used once, OrderLine once; each definition appears exactly once.
    assert text.count('"name":"Address"') == 1
    assert text.count('"name":"OrderLine"') == 1


def test_identify_by_canonical_form(catalog: SchemaCatalog) -> None:
    for name in catalog.names():
        for version in catalog.versions(name):
            text = catalog.schema(name, version)
            assert catalog.identify(text) == (name, version)
            # Whitespace, key order and docs do not change identity.
            reformatted = json.dumps(json.loads(text), indent=4, sort_keys=True)
            assert catalog.identify(reformatted) == (name, version)
    assert catalog.identify('{"type": "record", "name": "X", "fields": []}') is None
    assert catalog.identify("not json") is None


def test_parsed_is_cached(catalog: SchemaCatalog) -> None:
    assert catalog.parsed(ORDER_CREATED) is catalog.parsed(ORDER_CREATED, 3)
    assert catalog.parsed(ORDER_CREATED, 1)["name"] == ORDER_CREATED


def test_names_and_domain_lookups(catalog: SchemaCatalog) -> None:
    assert short_name(ORDER_CREATED) == "OrderCreated"
    assert catalog.full_name("OrderCreated") == ORDER_CREATED
    assert catalog.full_name(ORDER_CREATED) == ORDER_CREATED
    assert record_name(orders.OrderCreated) == ORDER_CREATED
    assert record_name(accounts.Deposit) == "streamfold.accounts.Deposit"
    assert domain_class("streamfold.accounts.Deposit") is accounts.Deposit
    assert catalog.record_name(orders.AddItem) == "streamfold.orders.AddItem"
    assert catalog.class_for("PaymentProcessed") is orders.PaymentProcessed
    assert catalog.command_class("CreateOrder") is orders.CreateOrder
    assert catalog.event_class("streamfold.accounts.AccountOpened") is (
        accounts.AccountOpened
    )
    assert kind(ORDER_CREATED) == "event"
    assert kind("streamfold.orders.CreateOrder") == "command"
    assert kind("streamfold.orders.Address") == "value"
    assert kind("streamfold.EventMetadata") is None
    with pytest.raises(UnknownRecord, match="not a command"):
        catalog.command_class("OrderCreated")
    with pytest.raises(LookupError, match="'Nope' is not in the catalog"):
        catalog.full_name("Nope")
    with pytest.raises(UnknownRecord, match="has no version 4"):
        catalog.schema(ORDER_CREATED, 4)
    with pytest.raises(UnknownRecord):
        domain_class("streamfold.EventMetadata")


def test_upcast_from_latest_is_identity(catalog: SchemaCatalog) -> None:
    data = {"anything": 1}
    assert catalog.upcast(ORDER_CREATED, 3, data) is data
    with pytest.raises(UnknownRecord):
        catalog.upcast(ORDER_CREATED, 4, data)


# -- the check on broken copies ----------------------------------------------------------


def test_incompatible_version_is_named_with_field_and_file(tree: Path) -> None:
    v4 = latest_json(tree, "orders", "OrderCreated")
    v4["fields"].append({"name": "loyalty_tier", "type": "string"})
    write(tree / "orders" / "OrderCreated" / "v4.avsc", v4)

    problems = check_catalog(SchemaCatalog.load(tree))

    incompatible = [p for p in problems if "BACKWARD_TRANSITIVE" in p]
    assert len(incompatible) == 3, problems
    for problem in incompatible:
        assert problem.startswith(f"{tree}/orders/OrderCreated/v4.avsc: not ")
        assert "reader field 'loyalty_tier' has no default" in problem
    # Every earlier version lacks the field, so each is named.
    for version in (1, 2, 3):
        assert any(f"writer schema version {version}" in p for p in incompatible)
    # The new field is also not in the domain class.
    assert any("not in the class: loyalty_tier" in p for p in problems)


def test_type_change_is_incompatible(tree: Path) -> None:
    v2 = latest_json(tree, "accounts", "AccountOpened")
    for field in v2["fields"]:
        if field["name"] == "overdraft_limit_minor":
            field["type"] = "int"  # long → int narrows: old data may not fit
    write(tree / "accounts" / "AccountOpened" / "v2.avsc", v2)

    problems = check_catalog(SchemaCatalog.load(tree))

    assert len(problems) == 1, problems
    assert "AccountOpened/v2.avsc" in problems[0]
    assert "overdraft_limit_minor" in problems[0]


def test_payload_that_drifts_from_the_domain_class(tree: Path) -> None:
    schema = latest_json(tree, "accounts", "AccountClosed")
    schema["fields"] = [f for f in schema["fields"] if f["name"] != "reason"]
    write(tree / "accounts" / "AccountClosed" / "v1.avsc", schema)

    problems = check_catalog(SchemaCatalog.load(tree))

    assert problems == [
        f"{tree}/accounts/AccountClosed/v1.avsc: payload fields do not match "
        "app.domain.accounts.events.AccountClosed (missing reason)"
    ]


def test_event_without_metadata_first(tree: Path) -> None:
    schema = latest_json(tree, "orders", "OrderDelivered")
    schema["fields"].reverse()
    write(tree / "orders" / "OrderDelivered" / "v1.avsc", schema)

    problems = check_catalog(SchemaCatalog.load(tree))

    assert len(problems) == 1
    assert "OrderDelivered/v1.avsc: the first field must be 'metadata'" in problems[0]


def test_missing_record_for_a_domain_class(tree: Path) -> None:
    shutil.rmtree(tree / "orders" / "ShipOrder")

    problems = check_catalog(SchemaCatalog.load(tree))

    assert len(problems) == 1
    assert "orders/ShipOrder/v1.avsc: missing" in problems[0]
    assert "app.domain.orders.commands.ShipOrder has no schema" in problems[0]


def test_versions_must_be_contiguous(tree: Path) -> None:
    v3 = tree / "orders" / "OrderCreated" / "v3.avsc"
    v3.rename(v3.with_name("v5.avsc"))

    problems = check_catalog(SchemaCatalog.load(tree))

    assert any(
        "OrderCreated: versions must run from v1 without gaps; missing v3.avsc, v4.avsc"
        in p
        for p in problems
    ), problems


def test_upcasters_must_join_existing_adjacent_versions(tree: Path) -> None:
    module = tree / "orders" / "OrderCreated" / "upcasters.py"
    module.write_text(
        module.read_text(encoding="utf-8")
        + "\n\ndef upcast_v3_to_v4(data):\n    return data\n"
        + "\n\ndef upcast_v1_to_v3(data):\n    return data\n"
        + "\n\ndef upcast_from_v1(data):\n    return data\n",
        encoding="utf-8",
    )

    problems = check_catalog(SchemaCatalog.load(tree))

    assert len(problems) == 3, problems
    text = "\n".join(problems)
    assert "upcasters.py: upcast_from_v1 is not named upcast_v<N>_to_v<N+1>" in text
    assert "upcasters.py: upcast_v1_to_v3 must step from an existing version" in text
    assert "upcasters.py: upcast_v3_to_v4 must step from an existing version" in text


def test_unreadable_and_misnamed_files_are_reported(tree: Path) -> None:
    (tree / "orders" / "OrderShipped" / "v2.avsc").write_text("{oops", encoding="utf-8")
    wrong = latest_json(tree, "orders", "OrderDelivered")
    wrong["name"] = "OrderArrived"
    write(tree / "orders" / "OrderDelivered" / "v2.avsc", wrong)
    (tree / "orders" / "OrderDelivered" / "latest.avsc").write_text("{}")

    problems = check_catalog(SchemaCatalog.load(tree))

    text = "\n".join(problems)
    assert "OrderShipped/v2.avsc: not readable JSON" in text
    assert (
        "OrderDelivered/v2.avsc: must declare name 'OrderDelivered' and namespace "
        "'streamfold.orders', not 'OrderArrived'"
    ) in text
    assert "OrderDelivered/latest.avsc: a schema file must be named v<N>.avsc" in text


def test_unresolved_reference_is_reported(tree: Path) -> None:
    schema = latest_json(tree, "orders", "OrderItemAdded")
    schema["fields"][2]["type"] = "streamfold.orders.OrderLineV9"
    write(tree / "orders" / "OrderItemAdded" / "v1.avsc", schema)

    problems = check_catalog(SchemaCatalog.load(tree))

    assert any(
        "OrderItemAdded/v1.avsc: refers to 'streamfold.orders.OrderLineV9', which no "
        "schema file defines" in p
        for p in problems
    ), problems


def test_a_version_that_changes_nothing_is_reported(tree: Path) -> None:
    same = latest_json(tree, "orders", "OrderShipped")
    same["doc"] = "only the doc differs"
    write(tree / "orders" / "OrderShipped" / "v2.avsc", same)

    problems = check_catalog(SchemaCatalog.load(tree))

    assert len(problems) == 1
    assert "OrderShipped/v2.avsc: has the same canonical form as" in problems[0]
