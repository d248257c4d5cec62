"""Isolated deployments on the local services: their own topic prefix, application id
(so consumer groups and Faust tables), web port and database. Tests, the soak and
the benchmarks each work in one and remove it afterwards."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import re
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from confluent_kafka import KafkaException

from app.adapters import migrations, topics
from app.faust_app import worker_datadir
from app.local import postgres
from app.local.kafka import KafkaNode
from app.local.registry import RegistryProcess
from app.settings import Settings, Topics
from app.waiting import eventually
from app.writer import state_dir


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range: a port from that range
    (what binding port 0 gives) can be taken by any outgoing connection before the
    process it was chosen for binds it, and the suite's Kafka clients open many."""
    low = ephemeral_low()
    ports = range(max(1024, low - 12_000), low)
    for port in random.sample(ports, min(64, len(ports))):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # a machine with its ephemeral range set low
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux's default: 32768)."""
    try:
        return int(
            Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]
        )
    except (OSError, ValueError, IndexError):
        return 32768


def with_database(url: str, database: str) -> str:
    head, _, _ = url.rpartition("/")
    return f"{head}/{database}"


def with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")
    userinfo = f"{host[0]}@" if host[1] else ""
    hostname = parts.hostname or "127.0.0.1"
    return urlunsplit(parts._replace(netloc=f"{userinfo}{hostname}:{port}"))


def create(settings: Settings, kind: str = "test") -> Settings:
    """A new deployment beside ``settings``, with its topics and tables in place."""
    tag = uuid.uuid4().hex[:8]
    app_id = f"streamfold-{kind}-{tag}"
    own = dataclasses.replace(
        new_database(settings, app_id.replace("-", "_")),
        topics=Topics(prefix=f"{kind[0]}{tag}."),
        app_id=app_id,
        web_port=free_port(),
    )
    topics.ensure_topics(own)
    migrations.migrate(own.database_url)
    return own


def new_database(settings: Settings, database: str) -> Settings:
    """``settings`` on ``database``, created here on the same server: owned by the
    writer's role, readable by the query role."""
    writer = postgres.Conninfo.parse(settings.database_url)
    reader = postgres.Conninfo.parse(settings.query_database_url)
    postgres.create_database(
        database, owner=writer.user, reader=reader.user, port=writer.port
    )
    return dataclasses.replace(
        settings,
        database_url=with_database(settings.database_url, database),
        query_database_url=with_database(settings.query_database_url, database),
    )


def remove(settings: Settings) -> None:
    """Drop the deployment's database, delete its topics and its workers' local
    state."""
    delete_topics(settings)
    delete_local_state(settings)
    database = postgres.Conninfo.parse(settings.database_url)
    postgres.drop_database(database.database, port=database.port)


def local_state(settings: Settings) -> list[Path]:
    """What the deployment's workers keep on this machine, whatever web port each
    ran on: Faust's data directory (``<app_id>-<port>``) and the write processes'
    stores (``<app_id>-<port>-<index>``)."""
    mine = re.compile(rf"{re.escape(settings.app_id)}-\d+(-\d+)?")
    folders = (worker_datadir(settings).parent, state_dir(settings, 0).parent)
    return sorted(
        path
        for folder in folders
        for path in folder.glob(f"{settings.app_id}-*")
        if mine.fullmatch(path.name)
    )


def delete_local_state(settings: Settings) -> None:
    """Delete ``local_state``: caches of the deployment's topics, of no use once
    those are gone (left behind, a test run's deployments held about 2 GiB)."""
    for path in local_state(settings):
        shutil.rmtree(path, ignore_errors=True)


def delete_topics(settings: Settings) -> None:
    """Delete the topics under the settings' prefix and application id."""
    admin = topics.admin_client(settings)
    names = [
        name
        for name in admin.list_topics(timeout=30).topics
        if name.startswith((settings.topics.prefix, f"{settings.app_id}-"))
    ]
    if names:
        # Wait until the topics are gone from the metadata (their files go later): an
        # admin client dropped before its request is sent deletes nothing, and a
        # topic created again under a name still being deleted is deleted with it.
        for future in admin.delete_topics(names, operation_timeout=30).values():
            with contextlib.suppress(KafkaException):
                future.result(timeout=30)
        left = eventually(
            lambda: set(names) & set(admin.list_topics(timeout=30).topics),
            lambda found: not found,
            timeout=120,
            every=0.5,
        )
        if left:
            raise RuntimeError(f"topics not deleted within 120 s: {sorted(left)}")


@contextlib.contextmanager
def private_broker(
    settings: Settings, *, heap: str = "384m"
) -> Iterator[tuple[Settings, KafkaNode]]:
    """A Kafka broker and a schema registry of their own, on free ports, for work that
    kills the broker: it restarts in seconds (it hosts only this work's partitions) and
    nothing else on the machine notices. Removed, data and all, on exit."""
    settings.home.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="broker-", dir=settings.home))
    node = KafkaNode(
        home=home,
        cache=settings.cache,
        port=free_port(),
        controller_port=free_port(),
        heap=heap,
    )
    registry_port = free_port()
    own = dataclasses.replace(
        settings,
        bootstrap_servers=node.bootstrap,
        registry_port=registry_port,
        schema_registry_url=f"http://127.0.0.1:{registry_port}",
    )
    registry = RegistryProcess(dataclasses.replace(own, home=home))
    try:
        node.start(timeout=120)
        registry.start(timeout=120)
        yield own, node
    finally:
        registry.stop()
        node.stop(kill=True)
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def private_postgres(settings: Settings) -> Iterator[tuple[Settings, str]]:
    """A PostgreSQL cluster of its own on a free port (same roles and database
    names), for work that stops the server: the machine's cluster and everything
    on it go on. Yields the settings pointing at it and the cluster's name, for
    ``postgres.stop(cluster=...)``; dropped, data and all, on exit."""
    port = free_port()
    cluster = f"streamfold_{port}"
    own = dataclasses.replace(
        settings,
        database_url=with_port(settings.database_url, port),
        query_database_url=with_port(settings.query_database_url, port),
    )
    try:
        postgres.ensure_running(port, cluster)
        postgres.ensure_database(
            postgres.Conninfo.parse(own.database_url),
            postgres.Conninfo.parse(own.query_database_url),
        )
        yield own, cluster
    finally:
        postgres.drop_cluster(cluster)
