"""Streamfold's own schema registry: the Confluent Schema Registry REST API for Avro,
kept in a compacted Kafka topic, so confluent-kafka's clients and serdes work unchanged.

Run it with ``python -m app.adapters.registry_server``. One instance writes a topic;
its state is the topic replayed, rebuilt at every start.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from aiohttp import web
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

from app.adapters import codec, compatibility
from app.adapters.codec import Reference, SchemaRejected, self_contained
from app.adapters.topics import ensure_topics, read_to_end, required_topics
from app.settings import Settings

log = logging.getLogger("streamfold.registry")

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
DEFAULT_COMPATIBILITY = "BACKWARD_TRANSITIVE"
MAX_VERSION = 2**31 - 1
# A record of the schemas topic, decoded: its key and value (None: a tombstone).
SchemasRecord = tuple[dict[str, Any], dict[str, Any] | None]
_T = TypeVar("_T")


class RegistryError(Exception):
    """An API error as Confluent reports it: the HTTP status is the code's first three
    digits."""

    def __init__(self, error_code: int, message: str) -> None:
        super().__init__(message)
        self.error_code = error_code
        self.message = message

    @property
    def status(self) -> int:
        return int(str(self.error_code)[:3])


class StoreError(RuntimeError):
    """The schemas topic could not be read or written."""


def _subject_not_found(subject: str) -> RegistryError:
    return RegistryError(40401, f"Subject '{subject}' not found.")


def _version_not_found(subject: str, version: object) -> RegistryError:
    return RegistryError(40402, f"Version {version} not found for subject '{subject}'.")


# -- state: what the topic says, folded ------------------------------------------------


@dataclass(slots=True)
class Version:
    subject: str
    version: int
    id: int
    deleted: bool = False


@dataclass(slots=True)
class State:
    # A schema as registered: its text may use named types that its references define.
    schemas: dict[int, str] = field(default_factory=dict)
    references: dict[int, tuple[Reference, ...]] = field(default_factory=dict)
    # Identity: the canonical form of the whole schema, with its references; equal
    # identities share one id.
    identity: dict[int, str] = field(default_factory=dict)
    ids: dict[str, int] = field(default_factory=dict)
    subjects: dict[str, dict[int, Version]] = field(default_factory=dict)
    config: dict[str | None, str] = field(default_factory=dict)
    # Counted apart from ``schemas`` so an id is never reused, even one whose record
    # could not be read back.
    highest_id: int = 0
    _whole: dict[int, str] = field(default_factory=dict)

    def apply(self, key: dict[str, Any], value: dict[str, Any] | None) -> None:
        """Fold one record of the schemas topic; replay and live writes share this."""
        if key.get("keytype") == "CONFIG":
            if value is None:
                self.config.pop(key.get("subject"), None)
            else:
                self.config[key.get("subject")] = value["compatibilityLevel"]
        elif key.get("keytype") == "SCHEMA":
            subject, number = key["subject"], int(key["version"])
            versions = self.subjects.setdefault(subject, {})
            if value is None:
                versions.pop(number, None)
                return
            schema_id = int(value["id"])
            self.highest_id = max(self.highest_id, schema_id)
            if schema_id not in self.schemas:
                references = _references(value.get("references"))
                if not references:
                    # Checked now, so a record that is not a schema is skipped whole.
                    compatibility.parse(value["schema"])
                self.schemas[schema_id] = value["schema"]
                self.references[schema_id] = references
            versions[number] = Version(
                subject, number, schema_id, bool(value.get("deleted"))
            )

    def settle(self) -> None:
        """Index the schemas applied since the last call. Apart from ``apply``: a
        compacted topic may hold a referenced version after the schemas using it."""
        for schema_id in sorted(self.schemas.keys() - self.identity.keys()):
            try:
                parsed = compatibility.parse(self.whole(schema_id))
            except (RegistryError, compatibility.InvalidSchema) as error:
                log.warning("schema id %d cannot be resolved: %s", schema_id, error)
                continue
            key = _identity(parsed.canonical, self.references[schema_id])
            self.identity[schema_id] = key
            self.ids.setdefault(key, schema_id)

    def whole(self, schema_id: int) -> str:
        """The schema of ``schema_id`` with the types its references define inlined."""
        whole = self._whole.get(schema_id)
        if whole is None:
            whole = self.resolve(self.schemas[schema_id], self.references[schema_id])
            self._whole[schema_id] = whole
        return whole

    def resolve(self, schema: str, references: tuple[Reference, ...]) -> str:
        """``schema`` made whole through ``references`` (42201 if one is missing)."""
        try:
            return self_contained(schema, references, self._referenced)
        except (RegistryError, SchemaRejected) as error:
            message = error.message if isinstance(error, RegistryError) else error
            raise RegistryError(42201, f"Invalid schema: {message}") from None

    def _referenced(self, subject: str, version: int) -> tuple[str, Sequence[Any]]:
        found = self.version(subject, str(version), deleted=True)
        return self.schemas[found.id], self.references[found.id]

    def referenced_by(self, version: Version) -> list[int]:
        """Ids of the live schemas whose references point at ``version``."""
        users = {
            v.id
            for versions in self.subjects.values()
            for v in versions.values()
            if not v.deleted
        }
        return sorted(
            schema_id
            for schema_id in users
            if any(
                (r.subject, r.version) == (version.subject, version.version)
                for r in self.references[schema_id]
            )
        )

    def next_id(self) -> int:
        """The id for a schema never seen before."""
        return self.highest_id + 1

    def level(self, subject: str | None) -> str:
        """The compatibility level in force for a subject (None: the global one)."""
        return (
            self.config.get(subject) or self.config.get(None) or DEFAULT_COMPATIBILITY
        )

    def versions(self, subject: str, *, deleted: bool = False) -> list[Version]:
        """The subject's versions, oldest first; 40401 if it has none to show."""
        found = [
            v
            for _, v in sorted(self.subjects.get(subject, {}).items())
            if deleted or not v.deleted
        ]
        if not found:
            raise _subject_not_found(subject)
        return found

    def version(self, subject: str, raw: str, *, deleted: bool = False) -> Version:
        """A version by path segment ("latest", -1 or a number); 40401/40402/42202."""
        versions = self.versions(subject, deleted=deleted)
        number = _version_number(raw)
        if number is None:
            return versions[-1]
        for candidate in versions:
            if candidate.version == number:
                return candidate
        raise _version_not_found(subject, number)


# A number in a path: ASCII digits ("²".isdigit() is true, and int() refuses it),
# few enough for int().
_DIGITS = re.compile(r"[0-9]{1,19}")


def _version_number(raw: str) -> int | None:
    """A version path segment: None for the latest, else 1 … 2³¹-1 (42202 otherwise)."""
    if raw in ("latest", "-1"):
        return None
    if _DIGITS.fullmatch(raw) and 1 <= int(raw) <= MAX_VERSION:
        return int(raw)
    raise RegistryError(
        42202,
        f"The specified version '{raw}' is not a valid version id. Allowed values are "
        f'between [1, {MAX_VERSION}] and the string "latest"',
    )


# -- store: the compacted topic --------------------------------------------------------


def _key(key: dict[str, Any]) -> bytes:
    # Compaction matches keys byte for byte, so a key is always written the same way.
    return json.dumps(key, sort_keys=True, separators=(",", ":")).encode()


class Store(Protocol):
    """Where the registry keeps its records: the schemas topic, or a test's stand-in."""

    topic: str

    def ensure_topic(self) -> None: ...
    def load(self) -> list[SchemasRecord]: ...
    def write(self, records: list[SchemasRecord]) -> None: ...
    def close(self) -> None: ...


class KafkaStore:
    """Reads the schemas topic to its end and appends to it durably."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = settings.topics.schemas
        self._producer: Producer | None = None

    def ensure_topic(self) -> None:
        """Create the compacted, single-partition topic unless it exists as required."""
        specs = [s for s in required_topics(self.settings) if s.name == self.topic]
        ensure_topics(self.settings, specs)

    def load(self, timeout: float = 60.0) -> list[SchemasRecord]:
        """Every record from the start of the topic up to its current end."""
        consumer = Consumer(
            {
                **self.settings.consumer_config(),
                # Required by librdkafka, never joined: the partition is assigned.
                "group.id": f"streamfold-registry-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
            }
        )
        records: list[SchemasRecord] = []
        try:
            deadline = time.monotonic() + timeout
            low, high = self._watermarks(consumer, deadline)
            if high <= low:
                return records
            consumer.assign([TopicPartition(self.topic, 0, OFFSET_BEGINNING)])
            for message in read_to_end(consumer, deadline, 0.5):
                records.append(_decode(message.key(), message.value()))
                if (message.offset() or 0) >= high - 1:
                    break
        except TimeoutError:
            raise StoreError(
                f"reading {self.topic} did not finish in {timeout}s"
            ) from None
        except KafkaException as error:
            raise StoreError(f"reading {self.topic}: {error}") from error
        finally:
            consumer.close()
        return records

    def _watermarks(self, consumer: Consumer, deadline: float) -> tuple[int, int]:
        # A topic created a moment ago may not be known to every broker yet.
        while True:
            try:
                return consumer.get_watermark_offsets(
                    TopicPartition(self.topic, 0), timeout=5
                )
            except KafkaException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def write(self, records: list[SchemasRecord], timeout: float = 20.0) -> None:
        """Append records with acks=all and idempotence; return once all are stored."""
        if self._producer is None:
            self._producer = Producer(
                {
                    **self.settings.producer_config(),
                    # A delivery report must arrive before flush gives up, so a write
                    # is known to have failed rather than maybe landing later.
                    "delivery.timeout.ms": int(timeout * 1000 * 0.75),
                    "request.timeout.ms": int(timeout * 1000 * 0.5),
                }
            )
        failures: list[str] = []

        def delivered(error: KafkaError | None, _message: object) -> None:
            if error is not None:
                failures.append(str(error))

        try:
            for key, value in records:
                self._producer.produce(
                    self.topic,
                    key=_key(key),
                    value=None if value is None else json.dumps(value).encode(),
                    on_delivery=delivered,
                )
            pending = self._producer.flush(timeout)
        except (KafkaException, BufferError) as error:
            failures.append(str(error))
            pending = 0
        if pending or failures:
            # A fresh producer next time: this one's state is in doubt.
            self._producer = None
            raise StoreError(
                f"writing {self.topic}: "
                + ("; ".join(failures) or f"{pending} records not acknowledged")
            )

    def close(self) -> None:
        """Flush and drop the producer."""
        if self._producer is not None:
            self._producer.flush(10)
            self._producer = None


def _decode(key: bytes | None, value: bytes | None) -> SchemasRecord:
    try:
        return json.loads(key or b"{}"), None if value is None else json.loads(value)
    except ValueError:
        log.warning("skipping a record that is not JSON: key %r", key)
        return {}, None


# -- the registry: rules of the API over state and store -------------------------------


class Registry:
    """Confluent's registry semantics over ``State``; writes go through the store first."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.state = State()
        self.lock = asyncio.Lock()
        self._stale = True

    async def start(self) -> None:
        """Make sure the topic exists and rebuild the state from it."""
        await asyncio.to_thread(self.store.ensure_topic)
        await self._reload()

    async def _reload(self) -> None:
        state = State()
        records = await asyncio.to_thread(self.store.load)
        for key, value in records:
            try:
                state.apply(key, value)
            except (KeyError, TypeError, ValueError, RegistryError) as error:
                log.warning("skipping unreadable record %r: %r", key, error)
        state.settle()
        self.state, self._stale = state, False
        log.info(
            "loaded %d schemas in %d subjects from %s",
            len(state.schemas),
            len(state.subjects),
            self.store.topic,
        )

    async def _commit(self, records: list[SchemasRecord]) -> None:
        # Until the write is known to have landed, the topic may hold more than the
        # state does (a failed write can land late): re-read it before the next one.
        self._stale = True
        try:
            await asyncio.to_thread(self.store.write, records)
        except StoreError as error:
            log.error("%s", error)
            raise RegistryError(
                50001, "Error while storing to the schemas topic"
            ) from None
        for key, value in records:
            self.state.apply(key, value)
        self.state.settle()
        self._stale = False

    async def write(self, change: Callable[[], Awaitable[_T]]) -> _T:
        """Run one change alone, on state that is known to match the topic."""
        async with self.lock:
            if self._stale:
                try:
                    await self._reload()
                except StoreError as error:
                    log.error("%s", error)
                    raise RegistryError(
                        50001, "Error while reading the schemas topic"
                    ) from None
            return await change()

    async def register(self, subject: str, body: Any) -> int:
        """The id of the body's schema under subject, registering it if new (409 if
        the subject's compatibility level refuses it)."""
        text, references = _schema_from(body)

        async def change() -> int:
            state = self.state
            candidate = _Candidate(state, text, references)
            versions = state.subjects.get(subject, {})
            live = [v for _, v in sorted(versions.items()) if not v.deleted]
            for existing in reversed(live):
                if state.identity.get(existing.id) == candidate.identity:
                    return existing.id
            messages = compatibility.check(
                state.level(subject),
                candidate.whole,
                [state.whole(v.id) for v in live],
                versions=[v.version for v in live],
            )
            if messages:
                raise RegistryError(
                    409,
                    "Schema being registered is incompatible with an earlier schema "
                    f"for subject '{subject}' ({state.level(subject)}): "
                    + "; ".join(messages),
                )
            schema_id = state.ids.get(candidate.identity) or state.next_id()
            number = max(versions, default=0) + 1
            await self._commit(
                [_schema_record(subject, number, schema_id, text, references)]
            )
            return schema_id

        return await self.write(change)

    def lookup(self, subject: str, body: Any, *, deleted: bool) -> Version:
        """The latest version of subject holding the body's schema (40401, 40403)."""
        versions = self.state.versions(subject, deleted=deleted)
        candidate = _Candidate(self.state, *_schema_from(body))
        for version in reversed(versions):
            if self.state.identity.get(version.id) == candidate.identity:
                return version
        raise RegistryError(40403, "Schema not found")

    def test(self, subject: str, raw_version: str | None, body: Any) -> list[str]:
        """Messages against one version (or every version the mode asks for)."""
        candidate = _Candidate(self.state, *_schema_from(body))
        level = self.state.level(subject)
        if raw_version is None:
            found = self.state.subjects.get(subject, {})
            against = [v for _, v in sorted(found.items()) if not v.deleted]
        else:
            against = [self.state.version(subject, raw_version)]
        return compatibility.check(
            level,
            candidate.whole,
            [self.state.whole(v.id) for v in against],
            versions=[v.version for v in against],
        )

    async def delete(self, subject: str, raw_version: str | None) -> list[int]:
        """Soft-delete one version, or the whole subject with its config (None)."""

        async def change() -> list[int]:
            state = self.state
            if raw_version is None:
                targets = state.versions(subject, deleted=True)
                if all(v.deleted for v in targets):
                    raise RegistryError(40404, f"Subject '{subject}' was soft deleted.")
                targets = [v for v in targets if not v.deleted]
            else:
                # "latest" means the latest live version; a number may name a
                # deleted one, which is then reported as such.
                latest = _version_number(raw_version) is None
                target = state.version(subject, raw_version, deleted=not latest)
                if target.deleted:
                    raise RegistryError(
                        40406,
                        f"Subject '{subject}' Version {target.version} was soft deleted.",
                    )
                targets = [target]
            for target in targets:
                users = state.referenced_by(target)
                if users:
                    raise RegistryError(
                        42206,
                        f"One or more references exist to the schema "
                        f"{{subject={subject}, version={target.version}}}: "
                        f"schema ids {users}",
                    )
            records = [
                _schema_record(
                    subject,
                    v.version,
                    v.id,
                    state.schemas[v.id],
                    state.references[v.id],
                    deleted=True,
                )
                for v in targets
            ]
            if raw_version is None and subject in state.config:
                records.append(({"keytype": "CONFIG", "subject": subject}, None))
            await self._commit(records)
            return [v.version for v in targets]

        return await self.write(change)

    async def set_level(self, subject: str | None, level: str | None) -> None:
        """Set (or with None, remove) a subject's or the global compatibility level."""
        key = {"keytype": "CONFIG", "subject": subject}
        value = None if level is None else {"compatibilityLevel": level}
        await self.write(lambda: self._commit([(key, value)]))


def _schema_record(
    subject: str,
    version: int,
    schema_id: int,
    schema: str,
    references: Sequence[Reference],
    *,
    deleted: bool = False,
) -> SchemasRecord:
    key = {"keytype": "SCHEMA", "subject": subject, "version": version}
    value: dict[str, Any] = {
        "subject": subject,
        "version": version,
        "id": schema_id,
        "schema": schema,
        "deleted": deleted,
    }
    if references:
        value["references"] = _references_json(references)
    return key, value


def _references(raw: Any) -> tuple[Reference, ...]:
    """References as a request or the topic carries them (42201 if malformed)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise RegistryError(42201, "Invalid schema: 'references' must be a list")
    references = []
    for item in raw:
        name = item.get("name") if isinstance(item, dict) else None
        subject = item.get("subject") if isinstance(item, dict) else None
        version = item.get("version") if isinstance(item, dict) else None
        if (
            not isinstance(name, str)
            or not isinstance(subject, str)
            or not isinstance(version, int)
            or version < 1
        ):
            raise RegistryError(
                42201,
                "Invalid schema: each reference needs a 'name', a 'subject' and a "
                f"'version' from 1, not {item!r}",
            )
        references.append(Reference(name, subject, version))
    return tuple(references)


def _references_json(references: Sequence[Reference]) -> list[dict[str, Any]]:
    return [
        {"name": r.name, "subject": r.subject, "version": r.version} for r in references
    ]


def _identity(canonical: str, references: Sequence[Reference]) -> str:
    if not references:
        return canonical
    return canonical + json.dumps(_references_json(references))


def _schema_from(body: Any) -> tuple[str, tuple[Reference, ...]]:
    """The Avro schema of a request body and its references; 42201 when the schema is
    absent or not Avro."""
    if not isinstance(body, dict) or not isinstance(body.get("schema"), str):
        raise RegistryError(42201, "Invalid schema: the body needs a 'schema' string")
    schema_type = body.get("schemaType") or "AVRO"
    if schema_type != "AVRO":
        raise RegistryError(
            42201,
            f"Invalid schema: schemaType {schema_type!r} is not supported; only AVRO",
        )
    for unsupported in ("metadata", "ruleSet"):
        if body.get(unsupported):
            raise RegistryError(
                42201, f"Invalid schema: '{unsupported}' is not supported"
            )
    return body["schema"], _references(body.get("references"))


class _Candidate:
    """A schema in a request, made whole through the references the state holds."""

    def __init__(
        self, state: State, text: str, references: tuple[Reference, ...]
    ) -> None:
        self.whole = state.resolve(text, references)
        try:
            parsed = compatibility.parse(self.whole)
        except compatibility.InvalidSchema as error:
            raise RegistryError(42201, str(error)) from None
        self.identity = _identity(parsed.canonical, references)


# -- HTTP ------------------------------------------------------------------------------

REGISTRY = web.AppKey("registry", Registry)
SOURCES = web.AppKey("sources", dict)
routes = web.RouteTableDef()


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data), status=status, content_type=CONTENT_TYPE)


def _flag(request: web.Request, name: str) -> bool:
    # Python clients send True/False as well as true/false.
    return request.query.get(name, "false").lower() == "true"


async def _body(request: web.Request) -> Any:
    try:
        return json.loads(await request.text() or "null")
    except ValueError as error:
        raise RegistryError(400, f"Request body is not JSON: {error}") from None


def _level(body: Any) -> str:
    level = body.get("compatibility") if isinstance(body, dict) else None
    if not isinstance(level, str) or level.upper() not in compatibility.MODES:
        raise RegistryError(
            42203,
            "Invalid compatibility level. Valid values are "
            + ", ".join(m.lower() for m in compatibility.MODES),
        )
    return level.upper()


def _schema_id(request: web.Request) -> int:
    raw = request.match_info["id"]
    state = request.app[REGISTRY].state
    if not _DIGITS.fullmatch(raw) or int(raw) not in state.schemas:
        raise RegistryError(40403, f"Schema {raw} not found")
    return int(raw)


def _describe(registry: Registry, version: Version) -> dict[str, Any]:
    return {
        "subject": version.subject,
        "version": version.version,
        "id": version.id,
        **_schema_json(registry.state, version.id),
    }


def _schema_json(state: State, schema_id: int) -> dict[str, Any]:
    """A schema as Confluent shows it: its text, and its references if it has any."""
    shown: dict[str, Any] = {"schema": state.schemas[schema_id]}
    if state.references[schema_id]:
        shown["references"] = _references_json(state.references[schema_id])
    return shown


@routes.get("/")
async def _root(request: web.Request) -> web.Response:
    return _json({})


def source_digests() -> dict[str, str]:
    """The sha256 of each of Streamfold's own source files this process has loaded,
    as they are on disk now."""
    root = Path(__file__).resolve().parents[2]
    digests: dict[str, str] = {}
    for module in list(sys.modules.values()):
        path: str | None = getattr(module, "__file__", None)
        if not path:
            continue
        where = Path(path).resolve()
        if root in where.parents and not where.relative_to(root).parts[0].startswith(
            "."
        ):
            with contextlib.suppress(OSError):
                digests[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return digests


@routes.get("/v1/metadata/version")
async def _version(request: web.Request) -> web.Response:
    """Which code serves: the digests of the sources it started from (``up``
    restarts a registry whose sources changed on disk since)."""
    return _json({"version": "streamfold", "sources": request.app[SOURCES]})


@routes.get("/subjects")
async def _list_subjects(request: web.Request) -> web.Response:
    state = request.app[REGISTRY].state
    deleted = _flag(request, "deleted")
    prefix = request.query.get("subjectPrefix", "")
    return _json(
        sorted(
            subject
            for subject, versions in state.subjects.items()
            if subject.startswith(prefix)
            and any(deleted or not v.deleted for v in versions.values())
        )
    )


@routes.get("/subjects/{subject}/versions")
async def _list_versions(request: web.Request) -> web.Response:
    state = request.app[REGISTRY].state
    versions = state.versions(
        request.match_info["subject"], deleted=_flag(request, "deleted")
    )
    return _json([v.version for v in versions])


@routes.get("/subjects/{subject}/versions/{version}")
async def _get_version(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    version = registry.state.version(
        request.match_info["subject"],
        request.match_info["version"],
        deleted=_flag(request, "deleted"),
    )
    return _json(_describe(registry, version))


@routes.get("/subjects/{subject}/versions/{version}/schema")
async def _get_version_schema(request: web.Request) -> web.Response:
    state = request.app[REGISTRY].state
    version = state.version(
        request.match_info["subject"],
        request.match_info["version"],
        deleted=_flag(request, "deleted"),
    )
    return web.Response(text=state.schemas[version.id], content_type=CONTENT_TYPE)


@routes.get("/subjects/{subject}/versions/{version}/referencedby")
async def _referenced_by(request: web.Request) -> web.Response:
    state = request.app[REGISTRY].state
    version = state.version(
        request.match_info["subject"], request.match_info["version"]
    )
    return _json(state.referenced_by(version))


@routes.post("/subjects/{subject}/versions")
async def _register(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    schema_id = await registry.register(
        request.match_info["subject"], await _body(request)
    )
    return _json({"id": schema_id})


@routes.post("/subjects/{subject}")
async def _lookup(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    version = registry.lookup(
        request.match_info["subject"],
        await _body(request),
        deleted=_flag(request, "deleted"),
    )
    return _json(_describe(registry, version))


@routes.delete("/subjects/{subject}")
async def _delete_subject(request: web.Request) -> web.Response:
    _refuse_permanent(request)
    registry = request.app[REGISTRY]
    return _json(await registry.delete(request.match_info["subject"], None))


@routes.delete("/subjects/{subject}/versions/{version}")
async def _delete_version(request: web.Request) -> web.Response:
    _refuse_permanent(request)
    registry = request.app[REGISTRY]
    deleted = await registry.delete(
        request.match_info["subject"], request.match_info["version"]
    )
    return _json(deleted[0])


def _refuse_permanent(request: web.Request) -> None:
    if _flag(request, "permanent"):
        # Events are kept forever, so the ids their bytes carry must stay readable.
        raise RegistryError(
            42205,
            "Operation not permitted: permanent deletion is disabled; schema ids "
            "stay resolvable for as long as events that carry them",
        )


@routes.get("/schemas/types")
async def _schema_types(request: web.Request) -> web.Response:
    return _json(["AVRO"])


@routes.get("/schemas/ids/{id}")
async def _get_schema(request: web.Request) -> web.Response:
    schema_id = _schema_id(request)
    return _json(_schema_json(request.app[REGISTRY].state, schema_id))


@routes.get("/schemas/ids/{id}/schema")
async def _get_raw_schema(request: web.Request) -> web.Response:
    schema_id = _schema_id(request)
    schema = request.app[REGISTRY].state.schemas[schema_id]
    return web.Response(text=schema, content_type=CONTENT_TYPE)


def _usages(request: web.Request) -> list[Version]:
    schema_id = _schema_id(request)
    deleted = _flag(request, "deleted")
    return [
        v
        for subject, versions in sorted(request.app[REGISTRY].state.subjects.items())
        for _, v in sorted(versions.items())
        if v.id == schema_id and (deleted or not v.deleted)
    ]


@routes.get("/schemas/ids/{id}/versions")
async def _get_schema_versions(request: web.Request) -> web.Response:
    return _json(
        [{"subject": v.subject, "version": v.version} for v in _usages(request)]
    )


@routes.get("/schemas/ids/{id}/subjects")
async def _get_schema_subjects(request: web.Request) -> web.Response:
    return _json(list(dict.fromkeys(v.subject for v in _usages(request))))


@routes.post("/compatibility/subjects/{subject}/versions/{version}")
async def _test_against_version(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    messages = registry.test(
        request.match_info["subject"],
        request.match_info["version"],
        await _body(request),
    )
    return _json({"is_compatible": not messages, "messages": messages})


@routes.post("/compatibility/subjects/{subject}/versions")
async def _test_against_all(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    messages = registry.test(request.match_info["subject"], None, await _body(request))
    return _json({"is_compatible": not messages, "messages": messages})


@routes.get("/config")
async def _get_global_config(request: web.Request) -> web.Response:
    return _json({"compatibilityLevel": request.app[REGISTRY].state.level(None)})


@routes.put("/config")
async def _put_global_config(request: web.Request) -> web.Response:
    level = _level(await _body(request))
    await request.app[REGISTRY].set_level(None, level)
    return _json({"compatibility": level})


@routes.delete("/config")
async def _delete_global_config(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    previous = registry.state.level(None)
    await registry.set_level(None, None)
    return _json({"compatibilityLevel": previous})


@routes.get("/config/{subject}")
async def _get_subject_config(request: web.Request) -> web.Response:
    state = request.app[REGISTRY].state
    subject = request.match_info["subject"]
    if subject in state.config:
        return _json({"compatibilityLevel": state.config[subject]})
    if _flag(request, "defaultToGlobal"):
        return _json({"compatibilityLevel": state.level(None)})
    raise RegistryError(
        40408,
        f"Subject '{subject}' does not have subject-level compatibility configured",
    )


@routes.put("/config/{subject}")
async def _put_subject_config(request: web.Request) -> web.Response:
    level = _level(await _body(request))
    await request.app[REGISTRY].set_level(request.match_info["subject"], level)
    return _json({"compatibility": level})


@routes.delete("/config/{subject}")
async def _delete_subject_config(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    subject = request.match_info["subject"]
    if subject not in registry.state.config:
        raise RegistryError(
            40408,
            f"Subject '{subject}' does not have subject-level compatibility configured",
        )
    previous = registry.state.config[subject]
    await registry.set_level(subject, None)
    return _json({"compatibilityLevel": previous})


@routes.get("/mode")
async def _get_mode(request: web.Request) -> web.Response:
    return _json({"mode": "READWRITE"})


@web.middleware
async def _errors(
    request: web.Request,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> web.StreamResponse:
    """Every failure as Confluent's ``{"error_code", "message"}``; never a traceback."""
    try:
        return await handler(request)
    except RegistryError as error:
        return _json(
            {"error_code": error.error_code, "message": error.message}, error.status
        )
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return _json(
            {
                "error_code": error.status,
                "message": f"HTTP {error.status} {error.reason}",
            },
            error.status,
        )
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return _json({"error_code": 500, "message": "Internal Server Error"}, 500)


class InProcess:
    """The codec's ``SchemaRegistry`` port over a ``Registry`` running on ``loop``,
    for threads of the registry's own process."""

    def __init__(self, registry: Registry, loop: asyncio.AbstractEventLoop) -> None:
        self._registry = registry
        self._loop = loop

    def register(
        self, subject: str, schema: str, references: Sequence[Reference] = ()
    ) -> codec.Registered:
        body = {"schema": schema, "references": _references_json(references)}

        async def register() -> codec.Registered:
            schema_id = await self._registry.register(subject, body)
            found = self._registry.lookup(subject, body, deleted=False)
            return codec.Registered(schema_id, found.version)

        return self._call(register())

    def schema_by_id(self, schema_id: int) -> str:
        async def whole() -> str:
            if schema_id not in self._registry.state.schemas:
                raise RegistryError(40403, f"Schema {schema_id} not found")
            return self._registry.state.whole(schema_id)

        return self._call(whole())

    def versions(self, subject: str) -> list[str]:
        async def wholes() -> list[str]:
            state = self._registry.state
            found = state.subjects.get(subject, {})
            return [
                state.whole(v.id) for _, v in sorted(found.items()) if not v.deleted
            ]

        return self._call(wholes())

    def _call(self, work: Coroutine[Any, Any, _T]) -> _T:
        try:
            return asyncio.run_coroutine_threadsafe(work, self._loop).result()
        except RegistryError as error:
            if error.status in (409, 422):
                raise SchemaRejected(error.message) from None
            if error.status == 404:
                raise codec.SchemaNotFound(error.message) from None
            raise codec.RegistryUnavailable(error.message) from None


async def _ensure_subjects(registry: Registry, settings: Settings) -> None:
    from app.adapters.catalog import SchemaCatalog
    from app.adapters.subjects import ensure_subjects

    port = InProcess(registry, asyncio.get_running_loop())
    try:
        problems = await asyncio.to_thread(
            ensure_subjects, port, SchemaCatalog.load(), settings.topics
        )
    except codec.RegistryError as error:
        log.error("could not register Streamfold's subjects: %s", error)
        return
    for problem in problems:
        log.warning("%s", problem)


def create_app(
    settings: Settings, store: Store | None = None, *, subjects: bool = False
) -> web.Application:
    """The registry as an aiohttp application; it loads the topic on startup and, with
    ``subjects``, registers every version of Streamfold's records under the settings'
    topics (``app.adapters.subjects``)."""
    app = web.Application(middlewares=[_errors])
    registry = Registry(KafkaStore(settings) if store is None else store)
    app[REGISTRY] = registry
    app[SOURCES] = source_digests()
    app.add_routes(routes)

    async def start(_app: web.Application) -> None:
        await registry.start()
        if subjects:
            await _ensure_subjects(registry, settings)

    async def stop(_app: web.Application) -> None:
        await asyncio.to_thread(registry.store.close)

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    """Serve the registry until SIGINT or SIGTERM; host and port default to the
    settings' (STREAMFOLD_REGISTRY_HOST, STREAMFOLD_REGISTRY_PORT)."""
    host = settings.registry_host if host is None else host
    port = settings.registry_port if port is None else port
    log.info(
        "schema registry on http://%s:%d, topic %s at %s",
        host,
        port,
        settings.topics.schemas,
        settings.bootstrap_servers,
    )
    web.run_app(
        create_app(settings, subjects=True),
        host=host,
        port=port,
        print=None,
        access_log=None,
    )


def main(settings: Settings | None = None) -> None:
    """Run the registry in the foreground, logging to stderr (``streamfold registry``)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    serve(Settings.from_env() if settings is None else settings)


if __name__ == "__main__":
    main()
