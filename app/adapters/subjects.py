"""The registry subjects Streamfold's records live under: every version of every
command, event and shared type registered in order, and checked against ``schemas/``.

Commands and events go under ``<topic>-<record full name>`` of their area's topics,
``CommandResult`` under the results topic's, and the shared types the files refer to
(``streamfold.EventMetadata``, ``streamfold.orders.OrderLine``…) under their own full
name, which the others name as Confluent schema references.
"""

from __future__ import annotations

from collections.abc import Sequence

from app.adapters.catalog import SchemaCatalog, kind, short_name
from app.adapters.codec import (
    Registrar,
    SchemaRegistry,
    SchemaRejected,
    reference_subject,
)
from app.adapters.eventlog import RESULT_RECORD
from app.settings import Topics


def expected_subjects(topics: Topics, catalog: SchemaCatalog) -> list[tuple[str, str]]:
    """(subject, record full name) for every record of the catalog."""
    subjects = []
    for name in catalog.names():
        area = name.split(".")[1] if name.count(".") == 2 else ""
        record_kind = kind(name)
        if record_kind == "command":
            subjects.append((f"{topics.commands(area)}-{name}", name))
        elif record_kind == "event":
            subjects.append((f"{topics.events(area)}-{name}", name))
        elif name == RESULT_RECORD:
            subjects.append((f"{topics.results}-{name}", name))
        else:
            subjects.append((reference_subject(name), name))
    return subjects


def ensure_subjects(
    registry: SchemaRegistry, catalog: SchemaCatalog, topics: Topics
) -> list[str]:
    """Register every version of every record under its subject, oldest first;
    idempotent. Returns what the registry refused, as sentences naming the subject.

    Raises ``RegistryUnavailable`` if the registry cannot be asked.
    """
    registrar = Registrar(registry, catalog)
    refused = []
    for subject, name in expected_subjects(topics, catalog):
        try:
            registrar.register(subject, name)
        except SchemaRejected as exc:
            refused.append(f"{subject}: {exc}")
    return [*registrar.problems, *refused]


def check_subjects(
    registry: SchemaRegistry, catalog: SchemaCatalog, topics: Topics
) -> list[str]:
    """Where the registry's subjects differ from ``schemas/``: a subject missing, or
    its versions not the files' v1..vN in order. Empty when they match."""
    problems = []
    for subject, name in expected_subjects(topics, catalog):
        found = [catalog.identify(text) for text in registry.versions(subject)]
        wanted = [(name, version) for version in catalog.versions(name)]
        if found != wanted:
            problems.append(
                f"{subject}: the registry holds {_listing(found) or 'nothing'}, "
                f"schemas/ has {_listing(wanted)} of {short_name(name)}"
            )
    return problems


def _listing(found: Sequence[tuple[str, int] | None]) -> str:
    return ", ".join(
        "a schema not in schemas/" if entry is None else f"v{entry[1]}"
        for entry in found
    )
