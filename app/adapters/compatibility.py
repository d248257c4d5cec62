"""Avro schema validation, canonical form and the registry's compatibility modes.

Pure functions over schema JSON strings. Whether a reader can read a writer's data is
decided by the `avro` package's reader/writer checker; this module only picks which
pairs to check for a mode and turns the checker's findings into sentences that name
the offending field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

import avro.errors
import avro.schema
import fastavro.schema
from avro.compatibility import (
    ReaderWriterCompatibilityChecker,
    SchemaCompatibilityResult,
    SchemaCompatibilityType,
)

BACKWARD_MODES = ("BACKWARD", "BACKWARD_TRANSITIVE", "FULL", "FULL_TRANSITIVE")
FORWARD_MODES = ("FORWARD", "FORWARD_TRANSITIVE", "FULL", "FULL_TRANSITIVE")
TRANSITIVE_MODES = ("BACKWARD_TRANSITIVE", "FORWARD_TRANSITIVE", "FULL_TRANSITIVE")
MODES = (*dict.fromkeys(BACKWARD_MODES + FORWARD_MODES), "NONE")


class InvalidSchema(ValueError):
    """The text is not a valid Avro schema."""


@dataclass(frozen=True, slots=True)
class ParsedSchema:
    text: str
    schema: avro.schema.Schema
    # Whitespace and key order do not count; defaults, docs and aliases do, since
    # two schemas that differ in a default resolve old data differently.
    canonical: str


def parse(schema_str: str) -> ParsedSchema:
    """Validate an Avro schema (defaults included); raise ``InvalidSchema`` if it is not one."""
    if not isinstance(schema_str, str) or not schema_str.strip():
        raise InvalidSchema("Invalid Avro schema: empty schema")
    try:
        document = json.loads(schema_str)
    except ValueError as error:
        raise InvalidSchema(f"Invalid Avro schema: not JSON: {error}") from None
    try:
        schema = avro.schema.parse(schema_str)
        # avro does not check that defaults match their field's type; fastavro does.
        fastavro.schema.parse_schema(document, _write_hint=False)
    except (avro.errors.AvroException, fastavro.schema.SchemaParseException) as error:
        raise InvalidSchema(f"Invalid Avro schema: {error}") from None
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        raise InvalidSchema(f"Invalid Avro schema: {error!r}") from None
    canonical = json.dumps(schema.to_json(), sort_keys=True, separators=(",", ":"))
    return ParsedSchema(text=schema_str, schema=schema, canonical=canonical)


def canonical_form(schema_str: str) -> str:
    """The form under which equal schemas share one registry id."""
    return parse(schema_str).canonical


def check(
    mode: str,
    new_schema: str,
    existing_schemas_oldest_first: Sequence[str],
    *,
    versions: Sequence[int] | None = None,
) -> list[str]:
    """Why ``new_schema`` may not follow the existing ones under ``mode``; empty if it may.

    BACKWARD: the new schema reads data written with the old; FORWARD: the old read the
    new; FULL: both. Non-transitive modes look at the latest existing schema only.
    ``versions`` numbers the existing schemas in messages (default 1, 2, ...).
    """
    mode = mode.upper()
    if mode not in MODES:
        raise ValueError(
            f"unknown compatibility mode {mode!r}; one of {', '.join(MODES)}"
        )
    numbers = list(versions) if versions is not None else []
    if not numbers:
        numbers = list(range(1, len(existing_schemas_oldest_first) + 1))
    if len(numbers) != len(existing_schemas_oldest_first):
        raise ValueError("versions must number every existing schema")
    new = parse(new_schema)
    if mode == "NONE" or not existing_schemas_oldest_first:
        return []
    pairs = list(zip(existing_schemas_oldest_first, numbers, strict=True))
    targets = pairs[::-1] if mode in TRANSITIVE_MODES else pairs[-1:]
    messages: list[str] = []
    for text, version in targets:
        old = parse(text).schema
        if mode in BACKWARD_MODES:
            messages += _explain(
                new.schema,
                old,
                reader_of="",
                writer_is=f"writer schema version {version}",
            )
        if mode in FORWARD_MODES:
            messages += _explain(
                old,
                new.schema,
                reader_of=f" of schema version {version}",
                writer_is="the new writer schema",
            )
    return list(dict.fromkeys(messages))


def _explain(
    reader: avro.schema.Schema,
    writer: avro.schema.Schema,
    *,
    reader_of: str,
    writer_is: str,
) -> list[str]:
    result = _Checker().get_compatibility(reader, writer)
    if result.compatibility is not SchemaCompatibilityType.incompatible:
        return []
    return [
        _sentence(kind, where, detail, location, reader_of, writer_is)
        for kind, where, detail, location in _findings(result, reader)
    ]


class _Checker(ReaderWriterCompatibilityChecker):
    """avro's checker, except that a writer union's branches are reported at the
    union's own location: avro restarts the location at the root there, which would
    point a message at the wrong field."""

    def __init__(self) -> None:
        # avro leaves this __init__ unannotated, so strict mypy calls it untyped.
        super().__init__()  # type: ignore[no-untyped-call]
        self._locations: list[list[str]] = []

    def calculate_compatibility(
        self,
        reader: avro.schema.Schema,
        writer: avro.schema.Schema,
        location: list[str],
    ) -> SchemaCompatibilityResult:
        self._locations.append(location)
        try:
            return super().calculate_compatibility(reader, writer, location)
        finally:
            self._locations.pop()

    def get_compatibility(
        self,
        reader: avro.schema.Schema,
        writer: avro.schema.Schema,
        reference_token: str = ReaderWriterCompatibilityChecker.ROOT_REFERENCE_TOKEN,
        location: list[str] | None = None,
    ) -> SchemaCompatibilityResult:
        if location is None and self._locations:
            *location, reference_token = self._locations[-1]
        return super().get_compatibility(reader, writer, reference_token, location)


def _sentence(
    kind: str, where: str, detail: str, location: str, reader_of: str, writer: str
) -> str:
    at = f"(at {location})"
    if kind == "missing_default":
        return (
            f"reader field '{where}'{reader_of} has no default and is missing from "
            f"{writer} {at}"
        )
    if kind == "name":
        return f"name of '{where}'{reader_of} does not match {writer} ({detail}) {at}"
    if kind == "size":
        return (
            f"fixed '{where}'{reader_of} differs in size from {writer} ({detail}) {at}"
        )
    if kind == "symbols":
        return (
            f"enum '{where}'{reader_of} lacks symbols {detail} that {writer} can write, "
            f"and has no default {at}"
        )
    subject = (
        f"field '{where}'"
        if where[:1].isalpha() or where[:1] == "_"
        else (f"the schema at '{where}'" if where else "the schema")
    )
    return f"{subject}{reader_of}: {detail} in {writer} {at}"


# The checker keeps its findings as two unordered sets, messages and locations, so with
# more than one finding their pairing has to be recovered: the location's last step
# tells the kind, and the reader schema at that location tells which message is its own.
_KIND_OF_MESSAGE = (
    ("size", re.compile(r"^expected: .*, found: ")),
    ("name", re.compile(r"^expected: ")),
    ("symbols", re.compile(r"^\{.*\}$")),
    ("type", re.compile(r"^reader (type|union)\b")),
)


def _message_kind(message: str) -> str:
    for kind, pattern in _KIND_OF_MESSAGE:
        if pattern.match(message):
            return kind
    return "missing_default"  # the checker's message is then the field's name


def _location_kind(location: str) -> str:
    steps = location.strip("/").split("/")
    if steps[-1] in ("name", "size", "symbols"):
        return steps[-1]
    if len(steps) >= 2 and steps[-2] == "fields":
        return "missing_default"
    return "type"


def _findings(
    result: SchemaCompatibilityResult, reader: avro.schema.Schema
) -> list[tuple[str, str, str, str]]:
    """(kind, reader path, detail, location) for each incompatibility."""
    messages = sorted(result.messages)
    locations = sorted(result.locations)
    if len(messages) == 1 and len(locations) == 1:
        pairs = [(locations[0], messages[0])]
    else:
        pairs = _pair(messages, locations, reader)
    findings = []
    for location, message in pairs:
        kind = _message_kind(message)
        path, node = _walk(reader, location)
        if kind == "missing_default":
            # The checker's message is the field's own name: trust it over the walk
            # should a location ever point elsewhere.
            where = path if path.rsplit(".", 1)[-1] == message else message
        elif kind == "type":
            where = path
        else:
            where = path or getattr(node, "fullname", "")
        findings.append((kind, where, message, location))
    return findings


def _pair(
    messages: list[str], locations: list[str], reader: avro.schema.Schema
) -> list[tuple[str, str]]:
    unpaired = list(messages)
    pairs: list[tuple[str, str]] = []
    for location in locations:
        kind = _location_kind(location)
        candidates = [m for m in unpaired if _message_kind(m) == kind]
        path, node = _walk(reader, location)
        if kind == "missing_default":
            name = path.rsplit(".", 1)[-1]
            candidates = [m for m in candidates if m == name] or candidates
        elif kind == "type" and node is not None:
            own = [m for m in candidates if m.startswith(f"reader type: {node.type} ")]
            candidates = own or candidates
        if candidates:
            unpaired.remove(candidates[0])
            pairs.append((location, candidates[0]))
    # Anything left is still reported, at the root, rather than dropped.
    pairs += [("/", message) for message in unpaired]
    return pairs


def _walk(
    schema: avro.schema.Schema, location: str
) -> tuple[str, avro.schema.Schema | None]:
    """The dotted reader field path at a checker location, and the schema found there."""
    steps = [step for step in location.split("/") if step]
    node: avro.schema.Schema | None = schema
    names: list[str] = []
    index = 0
    while index < len(steps) and node is not None:
        step = steps[index]
        if step == "fields" and index + 1 < len(steps):
            fields = getattr(node, "fields", None)
            position = int(steps[index + 1]) if steps[index + 1].isdigit() else -1
            if fields is None or not 0 <= position < len(fields):
                return ".".join(names), None
            names.append(fields[position].name)
            node = fields[position].type
            index += 2
            continue
        if step == "items":
            node = getattr(node, "items", None)
            names.append("[]")
        elif step == "values":
            node = getattr(node, "values", None)
            names.append("{}")
        elif step != "type":
            break  # name, size, symbols, or a writer union branch: the walk ends here
        index += 1
    return ".".join(names).replace(".[]", "[]").replace(".{}", "{}"), node
