"""The console's schemas page: every subject Streamfold registers, its versions in
the registry, its compatibility mode, the diff between two versions and what
bridges them when an old event is read (an upcaster, or Avro's resolution)."""

from __future__ import annotations

import difflib
import json
from typing import Any, Protocol

from app.adapters.catalog import SchemaCatalog, kind
from app.adapters.subjects import expected_subjects
from app.deadletters import ActionRefused
from app.settings import Topics


class Registry(Protocol):
    def versions(self, subject: str) -> list[str]: ...

    def compatibility(self, subject: str) -> str: ...


def subjects(
    topics: Topics, catalog: SchemaCatalog, registry: Registry
) -> list[dict[str, Any]]:
    """Per subject: its record, kind, versions (registry and ``schemas/``), mode."""
    listed = []
    for subject, name in expected_subjects(topics, catalog):
        listed.append(
            {
                "subject": subject,
                "record": name,
                "kind": kind(name) or "type",
                "registry_versions": len(registry.versions(subject)),
                "catalog_versions": list(catalog.versions(name)),
                "compatibility": registry.compatibility(subject),
                "upcasters": {
                    f"v{a}→v{b}": function
                    for (a, b), function in sorted(
                        catalog.upcaster_functions(name).items()
                    )
                },
            }
        )
    return listed


def bridges(catalog: SchemaCatalog, name: str, old: int, new: int) -> list[str]:
    """What reads data written at ``old`` as ``new``, step by step."""
    found = catalog.upcaster_functions(name)
    return [
        f"v{v}→v{v + 1}: "
        + (
            f"upcaster {found[(v, v + 1)]}"
            if (v, v + 1) in found
            else "Avro resolution (fields kept, new ones take their defaults)"
        )
        for v in range(old, new)
    ]


def diff(
    topics: Topics,
    catalog: SchemaCatalog,
    registry: Registry,
    subject: str,
    old: int,
    new: int,
) -> dict[str, Any]:
    """The registry's versions ``old`` and ``new`` of ``subject``, pretty-printed,
    their unified diff and the bridges between them."""
    names = dict(expected_subjects(topics, catalog))
    if subject not in names:
        raise ActionRefused(404, f"no subject {subject} among Streamfold's")
    texts = registry.versions(subject)
    for label, version in (("from", old), ("to", new)):
        if not 1 <= version <= len(texts):
            raise ActionRefused(
                400, f"{label}: {subject} has versions 1..{len(texts)}, not {version}"
            )
    if old >= new:
        raise ActionRefused(400, "from: must be an older version than to")
    before, after = (
        json.dumps(json.loads(texts[v - 1]), indent=2).splitlines() for v in (old, new)
    )
    return {
        "subject": subject,
        "record": names[subject],
        "from": old,
        "to": new,
        "compatibility": registry.compatibility(subject),
        "diff": list(
            difflib.unified_diff(before, after, f"v{old}", f"v{new}", lineterm="", n=3)
        ),
        "bridges": bridges(catalog, names[subject], old, new),
    }
