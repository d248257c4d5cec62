"""The embedded schema registry against the real broker, spoken to by confluent-kafka's
own registry client and Avro serdes."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp.test_utils import TestClient, TestServer
from confluent_kafka.admin import AdminClient
from confluent_kafka.schema_registry import (
    Schema,
    SchemaReference,
    SchemaRegistryClient,
)
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

from app.adapters import registry_server
from app.local import registry as local_registry
from app.local.process import ServiceError
from app.local.registry import RegistryProcess
from app.settings import Settings
from tests.conftest import free_port, fresh_settings
from tests.schemas import AMOUNT, ID, record

# One test process runs the whole module: its module-scoped deployment is set up
# once (bin/streamfold test runs with --dist loadgroup).
pytestmark = pytest.mark.xdist_group(__name__)

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


V1 = record(ID, AMOUNT)


def _unique_record() -> str:
    return record(ID, name=f"Unique{uuid.uuid4().hex[:8]}")


def _subject() -> str:
    return f"orders.events-{uuid.uuid4().hex[:8]}-value"


@pytest.fixture(scope="module")
def module_settings(
    session_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    port = free_port()
    settings = fresh_settings(
        session_settings,
        registry_port=port,
        schema_registry_url=f"http://127.0.0.1:{port}",
        home=tmp_path_factory.mktemp("registry-home"),
    )
    yield settings
    admin = AdminClient(settings.kafka_client_config())
    for future in admin.delete_topics([settings.topics.schemas]).values():
        future.result(timeout=30)


@pytest.fixture(scope="module")
def registry(module_settings: Settings) -> Iterator[RegistryProcess]:
    process = RegistryProcess(module_settings)
    assert process.start() is True
    yield process
    process.stop()


@pytest.fixture
def client(registry: RegistryProcess) -> SchemaRegistryClient:
    return SchemaRegistryClient({"url": registry.url})


@pytest.fixture
def http(registry: RegistryProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=registry.url, timeout=30) as session:
        yield session


def _refused(call: Any, *args: Any) -> SchemaRegistryError:
    with pytest.raises(SchemaRegistryError) as raised:
        call(*args)
    return raised.value


def test_register_and_read_back_through_confluents_client(
    client: SchemaRegistryClient,
) -> None:
    subject = _subject()
    schema_id = client.register_schema(subject, Schema(V1, "AVRO"))

    assert client.get_schema(schema_id).schema_str == V1
    assert client.get_versions(subject) == [1]
    latest = client.get_latest_version(subject)
    assert (latest.subject, latest.version, latest.schema_id) == (subject, 1, schema_id)
    assert latest.schema.schema_str == V1
    assert client.get_version(subject, 1).schema_id == schema_id
    assert subject in client.get_subjects()
    found = client.lookup_schema(subject, Schema(V1, "AVRO"))
    assert (found.version, found.schema_id) == (1, schema_id)


def test_the_same_schema_keeps_one_id_across_subjects_and_layouts(
    registry: RegistryProcess,
) -> None:
    first, second = _subject(), _subject()
    # A schema no other test registers, so the subjects sharing its id are known.
    schema = _unique_record()
    spaced = json.dumps(json.loads(schema), indent=2)
    with_default = json.dumps({**json.loads(schema), "fields": [{**ID, "default": ""}]})
    # Fresh clients each time, so their caches cannot answer for the registry.
    ids = [
        SchemaRegistryClient({"url": registry.url}).register_schema(
            subject, Schema(text, "AVRO")
        )
        for subject, text in [(first, schema), (first, spaced), (second, schema)]
    ]
    assert ids[0] == ids[1] == ids[2]
    client = SchemaRegistryClient({"url": registry.url})
    assert client.get_versions(first) == [1]
    other = client.register_schema(_subject(), Schema(with_default, "AVRO"))
    assert other != ids[0]
    assert sorted(client.get_subjects_by_schema_id(ids[0])) == sorted([first, second])
    assert {(v.subject, v.version) for v in client.get_schema_versions(ids[0])} == {
        (first, 1),
        (second, 1),
    }


def test_an_incompatible_change_is_refused_naming_the_field(
    client: SchemaRegistryClient, http: httpx.Client
) -> None:
    subject = _subject()
    client.register_schema(subject, Schema(V1, "AVRO"))
    breaking = Schema(record(ID, AMOUNT, {"name": "currency", "type": "string"}))

    assert client.get_compatibility() == "BACKWARD_TRANSITIVE"
    assert client.test_compatibility(subject, breaking) is False
    error = _refused(client.register_schema, subject, breaking)
    assert (error.http_status_code, error.error_code) == (409, 409)
    assert (
        "reader field 'currency' has no default and is missing from writer schema "
        "version 1 (at /fields/2)" in error.error_message
    )
    tested = http.post(
        f"/compatibility/subjects/{subject}/versions/latest",
        json={"schema": breaking.schema_str},
    ).json()
    assert tested["is_compatible"] is False
    assert "'currency'" in tested["messages"][0]

    additive = Schema(
        record(ID, AMOUNT, {"name": "currency", "type": "string", "default": "EUR"})
    )
    assert client.test_compatibility(subject, additive, version=1) is True
    client.register_schema(subject, additive)
    assert client.get_versions(subject) == [1, 2]


def test_subject_config_overrides_the_global_one(
    client: SchemaRegistryClient, http: httpx.Client
) -> None:
    subject = _subject()
    client.register_schema(subject, Schema(V1, "AVRO"))
    assert client.set_compatibility(subject, "none") == {"compatibility": "NONE"}
    assert client.get_compatibility(subject) == "NONE"

    retyped = Schema(record(ID, {"name": "amount", "type": "string"}))
    client.register_schema(subject, retyped)
    assert client.get_versions(subject) == [1, 2]

    other = _subject()
    assert _refused(client.get_compatibility, other).error_code == 40408
    fallback = http.get(f"/config/{other}", params={"defaultToGlobal": "true"})
    assert fallback.json() == {"compatibilityLevel": "BACKWARD_TRANSITIVE"}
    assert client.delete_config(subject).compatibility_level.value == "NONE"
    assert http.get(f"/config/{subject}?defaultToGlobal=true").json() == {
        "compatibilityLevel": "BACKWARD_TRANSITIVE"
    }
    bad = http.put(f"/config/{subject}", json={"compatibility": "SIDEWAYS"})
    assert (bad.status_code, bad.json()["error_code"]) == (422, 42203)


def test_global_config_governs_subjects_without_their_own(
    client: SchemaRegistryClient, http: httpx.Client
) -> None:
    subject = _subject()
    client.register_schema(subject, Schema(V1, "AVRO"))
    try:
        assert client.set_compatibility(level="FORWARD") == {"compatibility": "FORWARD"}
        assert http.get("/config").json() == {"compatibilityLevel": "FORWARD"}
        # FORWARD: readers of version 1 need `amount`, which the new schema drops.
        error = _refused(client.register_schema, subject, Schema(record(ID)))
        assert error.error_code == 409
        assert "'amount' of schema version 1" in error.error_message
        added = Schema(record(ID, AMOUNT, {"name": "note", "type": "string"}))
        client.register_schema(subject, added)
    finally:
        http.delete("/config")
    assert client.get_compatibility() == "BACKWARD_TRANSITIVE"


def test_errors_carry_confluents_codes(
    client: SchemaRegistryClient, http: httpx.Client
) -> None:
    subject, unknown = _subject(), _subject()
    client.register_schema(subject, Schema(V1, "AVRO"))

    cases = {
        40401: [
            _refused(client.get_versions, unknown),
            _refused(client.get_latest_version, unknown),
            _refused(client.lookup_schema, unknown, Schema(V1, "AVRO")),
        ],
        40402: [_refused(client.get_version, subject, 9)],
        40403: [
            _refused(client.get_schema, 987654),
            _refused(client.lookup_schema, subject, Schema(record(ID), "AVRO")),
        ],
        42201: [
            _refused(client.register_schema, subject, Schema("{not avro", "AVRO")),
            _refused(
                client.register_schema,
                subject,
                Schema(record({"name": "n", "type": "int", "default": "x"}), "AVRO"),
            ),
            _refused(
                client.register_schema, subject, Schema('{"type": "object"}', "JSON")
            ),
        ],
        42202: [_refused(client.get_version, subject, "first")],
    }
    for code, errors in cases.items():
        for error in errors:
            assert error.error_code == code, error
            assert error.http_status_code == code // 100
            assert "Traceback" not in error.error_message
    assert "Subject '" in cases[40401][0].error_message
    assert "Invalid Avro schema" in cases[42201][0].error_message
    assert "must match schema type: int" in cases[42201][1].error_message
    assert "JSON" in cases[42201][2].error_message

    missing = http.get("/no/such/path")
    assert missing.status_code == 404
    assert missing.json() == {"error_code": 404, "message": "HTTP 404 Not Found"}
    garbage = http.post(f"/subjects/{subject}/versions", content=b"{oops")
    assert garbage.status_code == 400
    assert set(garbage.json()) == {"error_code", "message"}


def test_plain_json_is_accepted_and_the_registry_media_type_returned(
    http: httpx.Client,
) -> None:
    subject = _subject()
    registered = http.post(
        f"/subjects/{subject}/versions",
        content=json.dumps({"schema": V1}),
        headers={"Content-Type": "application/json"},
    )
    assert registered.status_code == 200
    assert registered.headers["content-type"].startswith(CONTENT_TYPE)
    schema_id = registered.json()["id"]
    assert http.get(f"/schemas/ids/{schema_id}").json() == {"schema": V1}
    raw = http.get(f"/subjects/{subject}/versions/1/schema")
    assert raw.json() == json.loads(V1)
    assert http.get("/mode").json() == {"mode": "READWRITE"}


def test_deletes_are_soft_and_ids_stay_resolvable(
    client: SchemaRegistryClient, http: httpx.Client
) -> None:
    subject = _subject()
    first = client.register_schema(subject, Schema(V1, "AVRO"))
    with_note = record(ID, AMOUNT, {"name": "note", "type": "string", "default": ""})
    second = client.register_schema(subject, Schema(with_note, "AVRO"))

    assert client.delete_version(subject, 1) == 1
    assert client.get_versions(subject) == [2]
    assert http.get(f"/subjects/{subject}/versions?deleted=true").json() == [1, 2]
    assert client.get_schema(first).schema_str == V1
    assert _refused(client.delete_version, subject, 1).error_code == 40406

    assert client.delete_subject(subject) == [2]
    assert subject not in client.get_subjects()
    assert subject in client.get_subjects(deleted=True)
    assert _refused(client.get_versions, subject).error_code == 40401
    assert http.get(f"/schemas/ids/{second}").json() == {"schema": with_note}
    assert _refused(client.delete_subject, subject).error_code == 40404
    refused = _refused(client.delete_subject, subject, True)
    assert refused.error_code == 42205

    # Registering again starts a new version that reuses the schema's id (a fresh
    # client: this one's cache would answer without asking).
    again = SchemaRegistryClient({"url": client.config()["url"]})
    assert again.register_schema(subject, Schema(V1, "AVRO")) == first
    assert again.get_versions(subject) == [3]


def test_avro_serde_round_trip_through_the_registry(
    client: SchemaRegistryClient,
) -> None:
    topic = f"orders.events-{uuid.uuid4().hex[:8]}"
    value = SerializationContext(topic, MessageField.VALUE)
    order = {"order_id": "o-1", "amount": 1250}

    data = AvroSerializer(client, V1)(order, value)
    assert data is not None
    assert data[0] == 0
    schema_id = int.from_bytes(data[1:5], "big")
    assert client.get_latest_version(f"{topic}-value").schema_id == schema_id

    fresh = SchemaRegistryClient({"url": client.config()["url"]})
    assert AvroDeserializer(fresh)(data, value) == order
    # An evolved reader fills the new field's default in old events.
    evolved = record(
        ID, AMOUNT, {"name": "currency", "type": "string", "default": "EUR"}
    )
    fresh.register_schema(f"{topic}-value", Schema(evolved, "AVRO"))
    read = AvroDeserializer(fresh, evolved)(data, value)
    assert read == {**order, "currency": "EUR"}


def test_references_resolve_through_confluents_serdes(
    client: SchemaRegistryClient, http: httpx.Client
) -> None:
    shared = f"streamfold.Shared{uuid.uuid4().hex[:8]}"
    money = json.dumps(
        {
            "type": "record",
            "name": shared,
            "fields": [{"name": "minor", "type": "long"}],
        }
    )
    client.register_schema(shared, Schema(money, "AVRO"))
    using = record(ID, {"name": "amount", "type": shared})
    reference = SchemaReference(shared, shared, 1)
    topic = f"orders.events-{uuid.uuid4().hex[:8]}"
    schema_id = client.register_schema(
        f"{topic}-value", Schema(using, "AVRO", [reference])
    )

    shown = http.get(f"/schemas/ids/{schema_id}").json()
    assert shown["references"] == [{"name": shared, "subject": shared, "version": 1}]
    assert http.get(f"/subjects/{shared}/versions/1/referencedby").json() == [schema_id]
    value = SerializationContext(topic, MessageField.VALUE)
    order = {"order_id": "o-1", "amount": {"minor": 1250}}
    serializer = AvroSerializer(
        client,
        conf={"auto.register.schemas": False, "use.latest.version": True},
    )
    data = serializer(order, value)
    assert data is not None and int.from_bytes(data[1:5], "big") == schema_id
    fresh = SchemaRegistryClient({"url": client.config()["url"]})
    assert AvroDeserializer(fresh)(data, value) == order
    # A schema still in use by another keeps every version.
    assert _refused(client.delete_version, shared, 1).error_code == 42206
    missing = SchemaReference(shared, shared, 9)
    refused = _refused(
        client.register_schema, _subject(), Schema(using, "AVRO", [missing])
    )
    assert refused.error_code == 42201


def test_a_fresh_registry_holds_every_streamfold_subject(
    module_settings: Settings, client: SchemaRegistryClient
) -> None:
    subjects = client.get_subjects()
    prefix = module_settings.topics.prefix
    for subject in (
        f"{prefix}orders.commands-streamfold.orders.AddItem",
        f"{prefix}orders.commands-streamfold.orders.RemoveItem",
        f"{prefix}accounts.commands-streamfold.accounts.CloseAccount",
        "streamfold.CommandEnvelope",
    ):
        assert subject in subjects
    created = f"{prefix}orders.events-streamfold.orders.OrderCreated"
    assert client.get_versions(created) == [1, 2, 3]


_REGISTER_AT = """
import sys, time
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

url, subject, schema, start = sys.argv[1:5]
client = SchemaRegistryClient({"url": url})
time.sleep(max(0.0, float(start) - time.time()))
print(client.register_schema(subject, Schema(schema, "AVRO")))
"""


def test_concurrent_registrations_from_two_processes_get_one_id(
    registry: RegistryProcess,
) -> None:
    subject = _subject()
    schema = _unique_record()
    start = str(time.time() + 1.5)
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", _REGISTER_AT, registry.url, subject, schema, start],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=60) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    ids = {int(out.strip()) for out, _ in outputs}
    assert len(ids) == 1
    client = SchemaRegistryClient({"url": registry.url})
    assert client.get_versions(subject) == [1]


def test_concurrent_registrations_from_many_clients_get_one_id(
    registry: RegistryProcess,
) -> None:
    subjects = [_subject() for _ in range(4)]
    schema = _unique_record()

    def register(index: int) -> int:
        client = SchemaRegistryClient({"url": registry.url})
        return client.register_schema(subjects[index % 4], Schema(schema, "AVRO"))

    with ThreadPoolExecutor(max_workers=16) as pool:
        ids = set(pool.map(register, range(16)))
    assert len(ids) == 1
    client = SchemaRegistryClient({"url": registry.url})
    assert all(client.get_versions(subject) == [1] for subject in subjects)


def _snapshot(http: httpx.Client) -> dict[str, Any]:
    state: dict[str, Any] = {"config": http.get("/config").json()}
    for subject in http.get("/subjects", params={"deleted": "true"}).json():
        versions = http.get(
            f"/subjects/{subject}/versions", params={"deleted": "true"}
        ).json()
        state[subject] = [
            http.get(
                f"/subjects/{subject}/versions/{v}", params={"deleted": "true"}
            ).json()
            for v in versions
        ]
    return state


def test_a_restart_keeps_ids_versions_and_config(
    registry: RegistryProcess, http: httpx.Client
) -> None:
    client = SchemaRegistryClient({"url": registry.url})
    subject = _subject()
    client.register_schema(subject, Schema(V1, "AVRO"))
    client.set_compatibility(subject, "FULL")
    before = _snapshot(http)
    highest = max(
        v["id"]
        for versions in before.values()
        if isinstance(versions, list)
        for v in versions
    )

    assert registry.stop() is True
    assert not registry.running()
    assert registry.start() is True

    assert _snapshot(http) == before
    assert client.get_compatibility(subject) == "FULL"
    unseen = _unique_record()
    assert client.register_schema(_subject(), Schema(unseen, "AVRO")) == highest + 1


def test_start_is_idempotent_and_an_early_exit_shows_the_log(
    registry: RegistryProcess, module_settings: Settings
) -> None:
    assert registry.running()
    assert RegistryProcess(module_settings).start() is False

    with socket.socket() as squatter:
        # Bound, not listening: the probe is refused at once, the server's bind fails.
        squatter.bind(("127.0.0.1", 0))
        port = squatter.getsockname()[1]
        blocked = RegistryProcess(
            dataclasses.replace(module_settings, registry_port=port)
        )
        with pytest.raises(ServiceError, match="exited with code") as raised:
            blocked.start(timeout=60)
    assert "address already in use" in str(raised.value).lower()
    assert Path(blocked.log_file).name == f"registry-{port}.log"
    assert not blocked.running()


def test_a_registry_running_older_code_is_restarted_by_start(
    registry: RegistryProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    sources = httpx.get(f"{registry.url}/v1/metadata/version").json()["sources"]
    assert any(path.endswith("registry_server.py") for path in sources)
    assert registry.current()
    before = registry.daemon.pid()
    assert registry.start() is False and registry.daemon.pid() == before
    # As after an upgrade: a source it runs is no longer what is on disk.
    real = local_registry._digest
    monkeypatch.setattr(
        local_registry,
        "_digest",
        lambda path: "changed" if path.endswith("registry_server.py") else real(path),
    )
    assert not registry.current()
    assert registry.start() is True
    assert registry.daemon.pid() not in (None, before)
    monkeypatch.undo()
    assert registry.current() and registry.running()


class _FlakyStore:
    """The schemas topic in a list, whose next write can fail after landing."""

    topic = "in-memory"

    def __init__(self) -> None:
        self.records: list[Any] = []
        self.fail_next: Exception | None = None
        self.loads = 0

    def ensure_topic(self) -> None:
        pass

    def load(self) -> list[Any]:
        self.loads += 1
        return list(self.records)

    def write(self, records: list[Any]) -> None:
        self.records += records
        error, self.fail_next = self.fail_next, None
        if error is not None:
            raise error

    def close(self) -> None:
        pass


def test_a_failed_write_is_50001_and_the_next_write_rereads_the_store() -> None:
    store = _FlakyStore()

    async def scenario() -> None:
        app = registry_server.create_app(Settings(), store)
        async with TestClient(TestServer(app)) as http:
            store.fail_next = registry_server.StoreError("broker gone")
            failed = await http.post("/subjects/s/versions", json={"schema": V1})
            assert failed.status == 500
            assert await failed.json() == {
                "error_code": 50001,
                "message": "Error while storing to the schemas topic",
            }
            # The write did land: after re-reading, the same schema keeps its id and
            # the next schema does not reuse it.
            again = await http.post("/subjects/s/versions", json={"schema": V1})
            assert await again.json() == {"id": 1}
            assert store.loads == 2
            other = await http.post(
                "/subjects/t/versions", json={"schema": _unique_record()}
            )
            assert await other.json() == {"id": 2}

            store.fail_next = RuntimeError("a bug, with a traceback")
            crashed = await http.put("/config", json={"compatibility": "FULL"})
            assert crashed.status == 500
            body = await crashed.text()
            assert json.loads(body) == {
                "error_code": 500,
                "message": "Internal Server Error",
            }
            assert "Traceback" not in body
            level = await http.put("/config", json={"compatibility": "FULL"})
            assert await level.json() == {"compatibility": "FULL"}
            assert store.loads == 3

    asyncio.run(scenario())
