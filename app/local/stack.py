"""The whole local stack in one place: Kafka, PostgreSQL, the schema registry, topics
and migrations, brought up idempotently and taken down in reverse."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from app.adapters import migrations, topics
from app.local import postgres
from app.local.kafka import KafkaNode
from app.settings import Settings


@dataclass(slots=True)
class Report:
    lines: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        self.lines.append(line)


def kafka_node(settings: Settings) -> KafkaNode:
    return KafkaNode(home=settings.home, cache=settings.cache)


def _local_kafka(settings: Settings) -> bool:
    return settings.bootstrap_servers == kafka_node(settings).bootstrap


def up(settings: Settings, say: Callable[[str], None] = print) -> None:
    """Start whatever is not running yet; a second call finds everything up."""
    started = time.monotonic()
    if _local_kafka(settings):
        node = kafka_node(settings)
        node.resolve()
        fresh = node.start()
        say(
            f"kafka     {'started' if fresh else 'running'}  {node.bootstrap} "
            f"(Apache Kafka {node.version}, KRaft)"
        )
    else:
        say(f"kafka     external {settings.bootstrap_servers}")
    writer = postgres.Conninfo.parse(settings.database_url)
    reader = postgres.Conninfo.parse(settings.query_database_url)
    if writer.local:
        fresh = postgres.ensure_running(writer.port)
        postgres.ensure_database(writer, reader)
        say(
            f"postgres  {'started' if fresh else 'running'}  127.0.0.1:{writer.port}/"
            f"{writer.database} (roles {writer.user}, {reader.user})"
        )
    else:
        say(f"postgres  external {writer.host}:{writer.port}/{writer.database}")
    created = topics.ensure_topics(settings)
    say(
        f"topics    {len(created)} created, {len(topics.required_topics(settings))} checked"
    )
    applied = migrations.migrate(settings.database_url)
    say(f"migrations {len(applied)} applied")
    _registry_up(settings, say)
    _subjects_up(settings, say)
    say(f"ready in {time.monotonic() - started:.1f}s")


def _registry_up(settings: Settings, say: Callable[[str], None]) -> None:
    from app.local.registry import RegistryProcess

    local = f"http://127.0.0.1:{settings.registry_port}"
    if settings.schema_registry_url != local:
        say(f"registry  external {settings.schema_registry_url}")
        return
    fresh = RegistryProcess(settings).start()
    say(f"registry  {'started' if fresh else 'running'}  {local}")


def _subjects_up(settings: Settings, say: Callable[[str], None]) -> None:
    from app.adapters.catalog import SchemaCatalog
    from app.adapters.codec import ConfluentRegistry
    from app.adapters.subjects import ensure_subjects, expected_subjects

    catalog = SchemaCatalog.load()
    registry = ConfluentRegistry(settings.schema_registry_url)
    problems = ensure_subjects(registry, catalog, settings.topics)
    versions = sum(len(catalog.versions(name)) for name in catalog.names())
    say(
        f"subjects  {len(expected_subjects(settings.topics, catalog))} with "
        f"{versions} versions, {len(problems)} refused"
    )
    for problem in problems:
        say(f"  ✗ {problem}")


def down(
    settings: Settings, say: Callable[[str], None] = print, *, postgres_too: bool = True
) -> None:
    from app.local.registry import RegistryProcess
    from app.local.worker import WorkerProcess

    if WorkerProcess(settings).stop():
        say("worker    stopped")
    if RegistryProcess(settings).stop():
        say("registry  stopped")
    if _local_kafka(settings) and kafka_node(settings).stop():
        say("kafka     stopped")
    if (
        postgres_too
        and postgres.Conninfo.parse(settings.database_url).local
        and postgres.stop()
    ):
        say("postgres  stopped")
