"""The local stack itself: a real broker, a real PostgreSQL, topics and migrations."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from app.adapters import migrations, topics
from app.local import postgres
from app.local.kafka import KafkaNode
from app.settings import Settings
from tests.conftest import fresh_settings

# One test process runs the whole module: its module-scoped deployment is set up
# once (bin/streamfold test runs with --dist loadgroup).
pytestmark = pytest.mark.xdist_group(__name__)

_CREATED: list[str] = []


def _topic(kafka: KafkaNode, partitions: int = 1) -> str:
    name = f"roundtrip-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    admin.create_topics([NewTopic(name, partitions, 1)])[name].result(timeout=30)
    _CREATED.append(name)
    return name


@pytest.fixture(autouse=True, scope="module")
def _delete_created(kafka: KafkaNode) -> Iterator[None]:
    yield
    if _CREATED:
        admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
        for future in admin.delete_topics(_CREATED, operation_timeout=30).values():
            future.result(timeout=30)


def test_confluent_kafka_round_trip(kafka: KafkaNode) -> None:
    name = _topic(kafka)
    producer = Producer(
        {
            "bootstrap.servers": kafka.bootstrap,
            "acks": "all",
            "enable.idempotence": True,
        }
    )
    producer.produce(name, b"value", b"key", headers=[("h", b"1")])
    assert producer.flush(30) == 0
    consumer = Consumer(
        {
            "bootstrap.servers": kafka.bootstrap,
            "group.id": name,
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([name])
    try:
        message = None
        for _ in range(60):
            message = consumer.poll(0.5)
            if message is not None and not message.error():
                break
        assert message is not None and message.error() is None
        assert (message.key(), message.value()) == (b"key", b"value")
        assert message.headers() == [("h", b"1")]
    finally:
        consumer.close()


def test_aiokafka_round_trip_and_transaction(kafka: KafkaNode) -> None:
    """Faust's client must speak to the pinned broker, transactions included."""
    name = _topic(kafka)

    async def scenario() -> list[bytes]:
        producer = AIOKafkaProducer(
            bootstrap_servers=kafka.bootstrap, acks="all", enable_idempotence=True
        )
        await producer.start()
        try:
            await producer.send_and_wait(name, b"plain", key=b"k")
        finally:
            await producer.stop()
        txn = AIOKafkaProducer(
            bootstrap_servers=kafka.bootstrap, transactional_id=f"tx-{name}"
        )
        await txn.start()
        try:
            async with txn.transaction():
                await txn.send(name, b"in-transaction", key=b"k")
        finally:
            await txn.stop()
        consumer = AIOKafkaConsumer(
            name,
            bootstrap_servers=kafka.bootstrap,
            group_id=name,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
        )
        await consumer.start()
        values: list[bytes] = []
        try:
            async with asyncio.timeout(30):
                while len(values) < 2:
                    batch = await consumer.getmany(timeout_ms=500)
                    values += [m.value for ms in batch.values() for m in ms]
        finally:
            await consumer.stop()
        return values

    assert asyncio.run(scenario()) == [b"plain", b"in-transaction"]


def test_kafka_tools_run_from_the_same_jars(kafka: KafkaNode) -> None:
    name = _topic(kafka)
    listed = kafka.tool("topics", "--bootstrap-server", kafka.bootstrap, "--list")
    assert listed.returncode == 0, listed.stderr
    assert name in listed.stdout.split()
    groups = kafka.tool(
        "consumer-groups", "--bootstrap-server", kafka.bootstrap, "--list"
    )
    assert groups.returncode == 0, groups.stderr


def test_second_start_finds_the_running_broker(kafka: KafkaNode) -> None:
    assert kafka.start() is False
    assert kafka.running()


def test_postgres_round_trip_and_roles(session_settings: Settings) -> None:
    with psycopg.connect(session_settings.database_url) as conn:
        conn.execute("CREATE TABLE roundtrip (id int PRIMARY KEY, note text)")
        conn.execute("INSERT INTO roundtrip VALUES (1, 'ok')")
    with psycopg.connect(session_settings.query_database_url) as conn:
        assert conn.execute("SELECT note FROM roundtrip").fetchall() == [("ok",)]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO roundtrip VALUES (2, 'no')")


def test_postgres_setup_is_idempotent(session_settings: Settings) -> None:
    writer = postgres.Conninfo.parse(session_settings.database_url)
    assert postgres.ensure_running(writer.port) is False
    postgres.ensure_database(
        postgres.Conninfo.parse(Settings().database_url),
        postgres.Conninfo.parse(Settings().query_database_url),
    )


def test_migrations_apply_once(session_settings: Settings) -> None:
    first = migrations.migrate(session_settings.database_url)
    again = migrations.migrate(session_settings.database_url)
    assert again == []
    with psycopg.connect(session_settings.database_url) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM schema_migrations")]
    assert sorted(names) == sorted(name for _, name, _ in migrations.available())
    assert set(first) <= set(names)


def _configs(settings: Settings, name: str) -> dict[str, str]:
    admin = topics.admin_client(settings)
    resource = ConfigResource(ConfigResource.Type.TOPIC, name)
    entries = admin.describe_configs([resource])[resource].result(timeout=30)
    return {key: entry.value for key, entry in entries.items()}


def test_topics_are_provisioned_idempotently(session_settings: Settings) -> None:
    settings = fresh_settings(session_settings)
    created = topics.ensure_topics(settings)
    assert settings.topics.events("orders") in created
    assert topics.ensure_topics(settings) == []
    events = _configs(settings, settings.topics.events("orders"))
    assert events["retention.ms"] == "-1"
    assert events["cleanup.policy"] == "delete"
    metadata = topics.admin_client(settings).list_topics(timeout=30).topics
    for aggregate in ("orders", "accounts"):
        commands = metadata[settings.topics.commands(aggregate)]
        stored = metadata[settings.topics.events(aggregate)]
        assert len(commands.partitions) == len(stored.partitions) == settings.partitions


def test_conflicting_partitions_stop_start_up(session_settings: Settings) -> None:
    settings = fresh_settings(session_settings)
    topics.ensure_topics(settings)
    with pytest.raises(topics.TopicConflict, match="STREAMFOLD_PARTITIONS"):
        topics.ensure_topics(
            dataclasses.replace(settings, partitions=settings.partitions + 1)
        )


@pytest.mark.parametrize(
    ("kind", "aggregate", "more_partitions", "config", "refusal"),
    [
        pytest.param(
            "events",
            "accounts",
            0,
            {"retention.ms": "86400000"},
            r"retention\.ms=86400000",
            id="finite-retention-on-an-event-topic",
        ),
        pytest.param(
            "commands",
            "orders",
            2,
            {},
            "an aggregate's topics must match",
            id="mismatched-command-and-event-partitions",
        ),
    ],
)
def test_a_conflicting_topic_stops_start_up(
    session_settings: Settings,
    kind: str,
    aggregate: str,
    more_partitions: int,
    config: dict[str, str],
    refusal: str,
) -> None:
    settings = fresh_settings(session_settings)
    name = getattr(settings.topics, kind)(aggregate)
    admin = topics.admin_client(settings)
    partitions = settings.partitions + more_partitions
    admin.create_topics([NewTopic(name, partitions, 1, config=config)])[name].result(
        timeout=30
    )
    with pytest.raises(topics.TopicConflict, match=refusal):
        topics.ensure_topics(settings)
