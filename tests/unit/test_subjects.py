"""Every record's subject, every version in order, shared types as references."""

from __future__ import annotations

import json

import pytest

from app.adapters.catalog import SchemaCatalog
from app.adapters.codec import Codec, InMemoryRegistry, Reference
from app.adapters.subjects import check_subjects, ensure_subjects, expected_subjects
from app.settings import Topics

ORDER_CREATED = "streamfold.orders.OrderCreated"
TOPICS = Topics(prefix="p.")


@pytest.fixture(scope="module")
def catalog() -> SchemaCatalog:
    return SchemaCatalog.load()


def test_every_record_has_one_subject(catalog: SchemaCatalog) -> None:
    subjects = dict(expected_subjects(TOPICS, catalog))
    assert subjects["p.orders.commands-streamfold.orders.AddItem"] == (
        "streamfold.orders.AddItem"
    )
    assert subjects["p.accounts.commands-streamfold.accounts.CloseAccount"] == (
        "streamfold.accounts.CloseAccount"
    )
    assert subjects[f"p.orders.events-{ORDER_CREATED}"] == ORDER_CREATED
    assert subjects["p.command-results-streamfold.CommandResult"] == (
        "streamfold.CommandResult"
    )
    assert subjects["streamfold.CommandEnvelope"] == "streamfold.CommandEnvelope"
    assert sorted(subjects.values()) == sorted(catalog.names())


def test_a_fresh_registry_gets_every_version_in_order(catalog: SchemaCatalog) -> None:
    registry = InMemoryRegistry(compatibility="BACKWARD_TRANSITIVE")
    assert check_subjects(registry, catalog, TOPICS) != []

    assert ensure_subjects(registry, catalog, TOPICS) == []
    assert check_subjects(registry, catalog, TOPICS) == []
    subject = f"p.orders.events-{ORDER_CREATED}"
    assert len(registry.subjects[subject]) == 3
    # Idempotent: a second run registers nothing new.
    before = {s: list(ids) for s, ids in registry.subjects.items()}
    assert ensure_subjects(registry, catalog, TOPICS) == []
    assert registry.subjects == before


def test_files_refer_to_shared_types_as_references(catalog: SchemaCatalog) -> None:
    registry = InMemoryRegistry(compatibility="BACKWARD_TRANSITIVE")
    ensure_subjects(registry, catalog, TOPICS)
    [add_item] = registry.subjects["p.orders.commands-streamfold.orders.AddItem"]
    text, references = registry.registered(add_item)
    assert json.loads(text)["fields"][0]["type"] == "streamfold.CommandEnvelope"
    assert set(references) == {
        Reference("streamfold.CommandEnvelope", "streamfold.CommandEnvelope", 1),
        Reference("streamfold.orders.LineItem", "streamfold.orders.LineItem", 1),
    }
    # Read back, the schema is whole, and identifies as the file's version.
    assert catalog.identify(registry.schema_by_id(add_item)) == (
        "streamfold.orders.AddItem",
        1,
    )


def test_old_versions_cannot_follow_a_later_one(catalog: SchemaCatalog) -> None:
    registry = InMemoryRegistry(compatibility="BACKWARD_TRANSITIVE")
    subject = f"p.orders.events-{ORDER_CREATED}"
    # A registry filled before this change: v3 alone, written by the codec.
    registry.register(subject, catalog.schema(ORDER_CREATED))

    problems = ensure_subjects(registry, catalog, TOPICS)
    [problem] = problems
    assert problem.startswith(f"{subject}: v1 of OrderCreated was refused")
    # v3 again: the one registered before named its shared types inline.
    assert check_subjects(registry, catalog, TOPICS) == [
        f"{subject}: the registry holds v3, v3, schemas/ has v1, v2, v3 of OrderCreated"
    ]


def test_the_codec_registers_earlier_versions_first(catalog: SchemaCatalog) -> None:
    registry = InMemoryRegistry(compatibility="BACKWARD_TRANSITIVE")
    codec = Codec(registry, catalog)
    codec.registrar.register(f"t.events-{ORDER_CREATED}", ORDER_CREATED, 3)
    assert [
        catalog.identify(text)
        for text in registry.versions(f"t.events-{ORDER_CREATED}")
    ] == [(ORDER_CREATED, 1), (ORDER_CREATED, 2), (ORDER_CREATED, 3)]
