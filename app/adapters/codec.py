"""Avro records on the wire in Confluent framing: magic byte 0, schema id, Avro body.

Subjects follow the topic-record-name strategy (``<topic>-<record full name>``); the
shared types a schema file refers to are Confluent schema references to subjects
named after the type. Old writers' data comes back upcast to the catalog's latest
version of its record.
"""

from __future__ import annotations

import importlib
import inspect
import json
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from io import BytesIO
from typing import Any, Protocol

import fastavro
from fastavro import schemaless_reader, schemaless_writer

from app.adapters.catalog import (
    SchemaCatalog,
    UnknownRecord,
    UpcastError,
    inline,
    short_name,
)

MAGIC = 0
HEADER_SIZE = 5
_MAGIC_PREFIX = bytes([MAGIC])


# -- errors -----------------------------------------------------------------------------


class RegistryError(Exception):
    """The schema registry refused or failed a request."""


class RegistryUnavailable(RegistryError):
    """The registry could not be reached or answered with a server error; retry."""


class SchemaRejected(RegistryError):
    """The registry refused a schema: invalid, or incompatible with the subject."""


class SchemaNotFound(RegistryError):
    """No schema has the asked-for id."""


class EncodeError(ValueError):
    """A record could not be written with its schema."""


class DecodeError(Exception):
    """A payload cannot be read; ``reason`` says why, for a rejection or dead letter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotFramed(DecodeError):
    """Empty, shorter than the 5-byte header, or a magic byte other than 0."""


class UnknownSchemaId(DecodeError):
    """The registry has no schema under the payload's id."""


class Undecodable(DecodeError):
    """The body does not decode with its writer schema."""


class UnknownRecordType(DecodeError):
    """The writer schema names a record the catalog does not know."""


class TooLarge(DecodeError):
    """The payload exceeds the size limit."""


def validate_size(payload: bytes, limit: int) -> None:
    """Raise ``TooLarge`` when ``payload`` is longer than ``limit`` bytes."""
    if len(payload) > limit:
        raise TooLarge(
            f"payload of {len(payload)} bytes exceeds the limit of {limit} bytes"
        )


# -- the registry port and its adapters -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reference:
    """A Confluent schema reference: the named type ``name`` is defined by version
    ``version`` of ``subject``."""

    name: str
    subject: str
    version: int


@dataclass(frozen=True, slots=True)
class Registered:
    """Where a registration put a schema: its id, and its version under the subject."""

    schema_id: int
    version: int


class SchemaRegistry(Protocol):
    """Where schemas get their ids: the Confluent Schema Registry REST API, or a fake."""

    def register(
        self, subject: str, schema: str, references: Sequence[Reference] = ()
    ) -> Registered:
        """Register ``schema`` (whose named types ``references`` define) under
        ``subject``, idempotently.

        Raises ``SchemaRejected`` if the registry refuses it, ``RegistryUnavailable``
        if it cannot be asked.
        """
        ...

    def schema_by_id(self, schema_id: int) -> str:
        """The schema registered under ``schema_id``, self-contained: the types its
        references define are inlined.

        Raises ``SchemaNotFound`` if there is none, ``RegistryUnavailable`` if the
        registry cannot be asked.
        """
        ...

    def versions(self, subject: str) -> list[str]:
        """The subject's live versions, oldest first, each self-contained; empty if
        the subject does not exist."""
        ...


def self_contained(
    schema: str,
    references: Sequence[Reference],
    fetch: Callable[[str, int], tuple[str, Sequence[Reference]]],
) -> str:
    """``schema`` with the types its references define inlined; ``fetch(subject,
    version)`` gives a referenced version's schema and its own references."""
    definitions: dict[str, dict[str, Any]] = {}

    def collect(refs: Sequence[Reference]) -> None:
        for ref in refs:
            if ref.name not in definitions:
                text, nested = fetch(ref.subject, ref.version)
                collect(nested)
                definitions[ref.name] = json.loads(text)

    collect(references)
    if not definitions:
        return schema
    try:
        inlined = inline(json.loads(schema), definitions)
    except UnknownRecord as exc:
        raise SchemaRejected(f"unresolved reference: {exc}") from None
    return json.dumps(inlined, separators=(",", ":"))


class ConfluentRegistry:
    """``SchemaRegistry`` over confluent-kafka's ``SchemaRegistryClient``."""

    def __init__(self, url: str, conf: Mapping[str, Any] | None = None) -> None:
        self._conf = {**(conf or {}), "url": url}
        self._url = url
        self._made: Any = None

    @property
    def _client(self) -> Any:
        # Made at the first call: importing the client takes about 0.3 s (authlib,
        # httpx), which a process just started spends better beside its first
        # waits on the broker (see ``preload``).
        if self._made is None:
            try:
                from confluent_kafka.schema_registry import SchemaRegistryClient
            except ImportError as exc:
                raise RegistryError(
                    "the schema registry client needs confluent-kafka[schemaregistry] "
                    f"installed: {exc}"
                ) from exc
            self._made = SchemaRegistryClient(self._conf)
        return self._made

    @staticmethod
    def preload() -> None:
        """Import the client on a thread of its own, so that the first call finds
        it imported (or waits only for the rest of the import)."""
        threading.Thread(
            target=importlib.import_module,
            args=("confluent_kafka.schema_registry",),
            name="registry-import",
            daemon=True,
        ).start()

    def register(
        self, subject: str, schema: str, references: Sequence[Reference] = ()
    ) -> Registered:
        from confluent_kafka.schema_registry import Schema, SchemaReference

        refs = [SchemaReference(r.name, r.subject, r.version) for r in references]
        entry = Schema(schema, "AVRO", refs)
        with self._translated(f"registering {subject}"):
            schema_id = int(self._client.register_schema(subject, entry))
            # The registration answers with the id only; the version is looked up.
            version = self._client.lookup_schema(subject, entry).version
        return Registered(schema_id, int(version or 0))

    def schema_by_id(self, schema_id: int) -> str:
        with self._translated(f"fetching schema id {schema_id}"):
            found = self._client.get_schema(schema_id)
            return self_contained(
                str(found.schema_str), _references(found), self._version
            )

    def versions(self, subject: str) -> list[str]:
        try:
            with self._translated(f"listing the versions of {subject}"):
                numbers = self._client.get_versions(subject)
        except SchemaNotFound:
            return []
        with self._translated(f"reading the versions of {subject}"):
            return [
                self_contained(*self._version(subject, n), self._version)
                for n in numbers
            ]

    def compatibility(self, subject: str) -> str:
        """The subject's compatibility mode, else the registry's global one."""
        try:
            with self._translated(f"reading the compatibility of {subject}"):
                return str(self._client.get_compatibility(subject))
        except SchemaNotFound:
            with self._translated("reading the global compatibility"):
                return str(self._client.get_compatibility())

    def _version(self, subject: str, version: int) -> tuple[str, list[Reference]]:
        found = self._client.get_version(subject, version).schema
        return str(found.schema_str), _references(found)

    @contextmanager
    def _translated(self, what: str) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            translated = _translate(exc, f"{what} at {self._url}")
            if translated is None:
                raise
            raise translated from exc


def _references(schema: Any) -> list[Reference]:
    return [
        Reference(str(r.name), str(r.subject), int(r.version))
        for r in schema.references or ()
    ]


def _translate(exc: Exception, where: str) -> RegistryError | None:
    """Streamfold's error for one of the registry client's; None if it is not one."""
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    if isinstance(exc, SchemaRegistryError):
        status = exc.http_status_code
        detail = f"{where}: {exc.error_message} (HTTP {status}, code {exc.error_code})"
        if status == 404:
            return SchemaNotFound(detail)
        if status in (409, 422):
            return SchemaRejected(detail)
        if status >= 500 or status in (408, 429):
            return RegistryUnavailable(detail)
        return RegistryError(detail)
    if isinstance(exc, _transport_errors()):
        return RegistryUnavailable(f"{where}: {exc!r}")
    return None


@cache
def _transport_errors() -> tuple[type[BaseException], ...]:
    # The client speaks httpx2 when it is installed and httpx otherwise.
    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).HTTPError)
        except ImportError:
            continue
    return tuple(errors)


class InMemoryRegistry:
    """A ``SchemaRegistry`` in a dict, for unit tests.

    Equal schemas (by the registry's canonical form and references) share one id
    across subjects, as in the Confluent registry. With a ``compatibility`` mode other
    than ``NONE`` a subject's new schema must pass the same check the real registry
    makes.
    """

    def __init__(self, compatibility: str = "NONE", first_id: int = 1) -> None:
        self.compatibility = compatibility
        self.subjects: dict[str, list[int]] = {}
        self._ids: dict[str, int] = {}
        self._schemas: dict[int, tuple[str, tuple[Reference, ...]]] = {}
        self._next = first_id
        self._lock = threading.RLock()
        self.lookups = 0

    def register(
        self, subject: str, schema: str, references: Sequence[Reference] = ()
    ) -> Registered:
        from app.adapters import compatibility

        refs = tuple(references)
        with self._lock:
            try:
                whole = self_contained(schema, refs, self._version)
                canonical = compatibility.canonical_form(whole) + repr(refs)
            except (ValueError, RegistryError) as exc:
                raise SchemaRejected(f"{subject}: {exc}") from exc
            schema_id = self._ids.get(canonical)
            versions = self.subjects.setdefault(subject, [])
            if schema_id is not None and schema_id in versions:
                return Registered(schema_id, versions.index(schema_id) + 1)
            problems = compatibility.check(
                self.compatibility, whole, [self._whole(i) for i in versions]
            )
            if problems:
                raise SchemaRejected(f"{subject}: {'; '.join(problems)}")
            if schema_id is None:
                schema_id = self._next
                self._next += 1
                self._ids[canonical] = schema_id
                self._schemas[schema_id] = (schema, refs)
            versions.append(schema_id)
            return Registered(schema_id, len(versions))

    def schema_by_id(self, schema_id: int) -> str:
        self.lookups += 1
        with self._lock:
            if schema_id not in self._schemas:
                raise SchemaNotFound(f"no schema has id {schema_id}")
            return self._whole(schema_id)

    def versions(self, subject: str) -> list[str]:
        with self._lock:
            return [self._whole(i) for i in self.subjects.get(subject, [])]

    def registered(self, schema_id: int) -> tuple[str, tuple[Reference, ...]]:
        """The schema as registered under ``schema_id``: its text and references."""
        return self._schemas[schema_id]

    def _whole(self, schema_id: int) -> str:
        return self_contained(*self._schemas[schema_id], self._version)

    def _version(self, subject: str, version: int) -> tuple[str, Sequence[Reference]]:
        try:
            return self._schemas[self.subjects[subject][version - 1]]
        except (KeyError, IndexError):
            raise SchemaNotFound(f"{subject} has no version {version}") from None


# -- registering the catalog ------------------------------------------------------------


def reference_subject(record_name: str) -> str:
    """The subject a shared type is registered under for references: its full name."""
    return record_name


class Registrar:
    """Registers catalog versions: under a subject, every earlier version first, so
    the subject's versions follow the files; the shared types a version's file refers
    to go under their own subjects and are passed as references.

    Each (subject, version) costs one registration per process. A subject that began
    at a later version refuses the earlier ones: those are listed in ``problems``,
    while the asked-for version itself must register.
    """

    def __init__(self, registry: SchemaRegistry, catalog: SchemaCatalog) -> None:
        self.registry = registry
        self.catalog = catalog
        self.problems: list[str] = []
        self._done: dict[tuple[str, int], Registered] = {}
        self._lock = threading.RLock()

    def register(
        self, subject: str, record_name: str, version: int | None = None
    ) -> Registered:
        """Register ``record_name`` (full name) at ``version`` (default latest)."""
        catalog = self.catalog
        version = catalog.latest_version(record_name) if version is None else version
        with self._lock:
            for earlier in catalog.versions(record_name):
                if earlier >= version or (subject, earlier) in self._done:
                    continue
                try:
                    self._one(subject, record_name, earlier)
                except SchemaRejected as exc:
                    # Adding the versions after it would only tangle the order more.
                    self.problems.append(
                        f"{subject}: v{earlier} of {short_name(record_name)} was "
                        f"refused ({exc}); the subject holds a later version first"
                    )
                    break
            return self._one(subject, record_name, version)

    def _one(self, subject: str, record_name: str, version: int) -> Registered:
        done = self._done.get((subject, version))
        if done is not None:
            return done
        references = [
            Reference(
                name,
                reference_subject(name),
                self.register(reference_subject(name), name).version,
            )
            for name in self.catalog.references(record_name, version)
        ]
        schema = json.dumps(
            self.catalog.raw(record_name, version), separators=(",", ":")
        )
        registered = self.registry.register(subject, schema, references)
        self._done[(subject, version)] = registered
        return registered


# -- the codec --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Decoded:
    """A decoded record: ``data`` is at the catalog's latest version of its record."""

    record_name: str  # full name, e.g. streamfold.orders.OrderCreated
    short_name: str  # e.g. OrderCreated
    # The catalog version the payload was written with; None for a writer schema the
    # catalog does not hold (an external producer's compatible variant).
    writer_version: int | None
    schema_id: int
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Reader:
    record_name: str
    short_name: str
    writer_version: int | None
    writer: dict[str, Any]
    # Set only for a writer outside the catalog: read with Avro resolution into it.
    reader: dict[str, Any] | None
    # Set when the writer is an older catalog version: upcast after reading.
    upcast_from: int | None


class Codec:
    """Encodes dicts as framed Avro and decodes them back, upcast to the latest version.

    Registrations and writer schemas are cached per subject and per id, so the hot
    path makes no registry call and parses no JSON. Safe to share between threads.
    """

    def __init__(self, registry: SchemaRegistry, catalog: SchemaCatalog) -> None:
        self._registry = registry
        self._catalog = catalog
        self.registrar = Registrar(registry, catalog)
        self._writers: dict[tuple[str, str, int | None], tuple[bytes, Any]] = {}
        self._readers: dict[int, _Reader] = {}
        self._refused: dict[int, DecodeError] = {}

    @property
    def catalog(self) -> SchemaCatalog:
        return self._catalog

    def encode(
        self,
        topic: str,
        record_name: str,
        data: Mapping[str, Any],
        *,
        version: int | None = None,
    ) -> bytes:
        """``data`` framed under subject ``<topic>-<full name>``.

        ``record_name`` is a full or unique short name; ``version`` defaults to the
        latest (an older one is for tools and tests that play old writers).
        """
        try:
            header, schema = self._writers[(topic, record_name, version)]
        except KeyError:
            header, schema = self._writer(topic, record_name, version)
        out = BytesIO()
        out.write(header)
        try:
            schemaless_writer(out, schema, data, strict_allow_default=True)
        except Exception as exc:  # fastavro raises many kinds for a bad datum
            raise EncodeError(
                f"{short_name(schema['name'])} does not fit its schema: {exc}"
            ) from exc
        return out.getvalue()

    def decode(self, payload: bytes) -> Decoded:
        """The record in ``payload``, at its record's latest version; raises
        ``DecodeError`` (``NotFramed``, ``UnknownSchemaId``, ``Undecodable``,
        ``UnknownRecordType``) or ``RegistryUnavailable``."""
        if len(payload) < HEADER_SIZE or payload[0] != MAGIC:
            raise NotFramed(_framing_problem(payload))
        schema_id = int.from_bytes(payload[1:HEADER_SIZE], "big")
        reader = self._readers.get(schema_id)
        if reader is None:
            reader = self._reader(schema_id)
        body = BytesIO(payload)
        body.seek(HEADER_SIZE)
        try:
            data: Any = schemaless_reader(body, reader.writer, reader.reader)
        except Exception as exc:  # noqa: BLE001 - fastavro raises many kinds for a bad body
            raise Undecodable(
                f"{reader.short_name} body does not decode with schema id "
                f"{schema_id}: {type(exc).__name__}: {exc}"
            ) from None
        if body.tell() != len(payload):
            raise Undecodable(
                f"{reader.short_name} body has {len(payload) - body.tell()} bytes "
                f"left over after the record (schema id {schema_id})"
            )
        if reader.upcast_from is not None:
            try:
                data = self._catalog.upcast(
                    reader.record_name, reader.upcast_from, data
                )
            except (UpcastError, KeyError, TypeError, ValueError) as exc:
                raise Undecodable(
                    f"{reader.short_name} v{reader.upcast_from} could not be upcast: "
                    f"{type(exc).__name__}: {exc}"
                ) from None
        return Decoded(
            reader.record_name,
            reader.short_name,
            reader.writer_version,
            schema_id,
            data,
        )

    def _writer(
        self, topic: str, record_name: str, version: int | None
    ) -> tuple[bytes, Any]:
        catalog = self._catalog
        try:
            full = catalog.full_name(record_name)
            parsed = catalog.parsed(full, version)
        except UnknownRecord as exc:
            raise EncodeError(str(exc)) from None
        schema_id = self.registrar.register(f"{topic}-{full}", full, version).schema_id
        entry = (_MAGIC_PREFIX + schema_id.to_bytes(4, "big"), parsed)
        self._writers[(topic, record_name, version)] = entry
        return entry

    def _reader(self, schema_id: int) -> _Reader:
        refused = self._refused.get(schema_id)
        if refused is not None:
            raise type(refused)(refused.reason)
        try:
            text = self._registry.schema_by_id(schema_id)
        except SchemaNotFound:
            raise UnknownSchemaId(
                f"schema id {schema_id} is not in the registry"
            ) from None
        try:
            reader = self._identify(schema_id, text)
        except DecodeError as exc:
            # An id's schema never changes, so neither does this verdict.
            self._refused[schema_id] = exc
            raise
        self._readers[schema_id] = reader
        return reader

    def _identify(self, schema_id: int, text: str) -> _Reader:
        catalog = self._catalog
        identity = catalog.identify(text)
        if identity is not None:
            name, version = identity
            latest = catalog.latest_version(name)
            return _Reader(
                record_name=name,
                short_name=short_name(name),
                writer_version=version,
                writer=catalog.parsed(name, version),
                reader=None,
                upcast_from=None if version == latest else version,
            )
        try:
            writer: Any = fastavro.parse_schema(json.loads(text), named_schemas={})
        except Exception as exc:  # noqa: BLE001 - fastavro raises several kinds
            raise Undecodable(
                f"writer schema id {schema_id} is not a valid Avro schema: {exc}"
            ) from None
        written = writer.get("name") if isinstance(writer, dict) else None
        if not isinstance(written, str) or written not in catalog:
            raise UnknownRecordType(
                f"schema id {schema_id} writes {written or 'an unnamed type'}, a "
                "record the catalog does not know"
            )
        return _Reader(
            record_name=written,
            short_name=short_name(written),
            writer_version=None,
            writer=writer,
            reader=catalog.parsed(written),
            upcast_from=None,
        )


def _framing_problem(payload: bytes) -> str:
    if not payload:
        return "empty payload; expected Confluent framing (magic byte 0, schema id)"
    if payload[0] != MAGIC:
        return f"magic byte is 0x{payload[0]:02x}, not 0x00: not Confluent-framed Avro"
    return (
        f"payload of {len(payload)} bytes is shorter than the {HEADER_SIZE}-byte "
        "Confluent header"
    )


# -- headers ---------------------------------------------------------------------------

# Headers to produce, in the type confluent_kafka's ``produce`` takes (a list is
# invariant, so its value type is spelled out as produce has it).
Headers = list[tuple[str, str | bytes | None]]
# On every command and event: the command's id (what ``bench`` matches results by).
COMMAND_ID_HEADER = "command-id"


class _Headers:
    """Kafka headers that repeat a record's type, versions and ids, so tools can
    route and filter without decoding.

    ``headers.for_event(...)`` and ``headers.for_command(...)`` take the values;
    ``headers(record_name, record)`` reads them from a record about to be encoded.
    """

    @staticmethod
    def for_event(
        *,
        event_type: str,
        event_version: int,
        stream_version: int,
        aggregate_id: str,
        correlation_id: str,
        event_id: str,
        command_id: str,
    ) -> Headers:
        return [
            ("event-type", event_type.encode()),
            ("event-version", str(event_version).encode()),
            ("stream-version", str(stream_version).encode()),
            ("aggregate-id", aggregate_id.encode()),
            ("correlation-id", correlation_id.encode()),
            ("event-id", event_id.encode()),
            (COMMAND_ID_HEADER, command_id.encode()),
        ]

    @staticmethod
    def for_command(
        *, command_type: str, command_id: str, correlation_id: str
    ) -> Headers:
        return [
            ("command-type", short_name(command_type).encode()),
            (COMMAND_ID_HEADER, command_id.encode()),
            ("correlation-id", correlation_id.encode()),
        ]

    def __call__(self, record_name: str, record: Mapping[str, Any]) -> Headers:
        """Headers for an event record (it has ``metadata``) or a command record (it
        has ``envelope``); other records get none."""
        if "metadata" in record:
            meta = record["metadata"]
            # for_event's keywords are metadata fields of the same names.
            return self.for_event(**{name: meta[name] for name in _EVENT_FIELDS})
        if "envelope" in record:
            envelope = record["envelope"]
            return self.for_command(
                command_type=record_name,
                command_id=envelope["command_id"],
                correlation_id=envelope["correlation_id"],
            )
        return []


headers = _Headers()
_EVENT_FIELDS = tuple(inspect.signature(_Headers.for_event).parameters)
