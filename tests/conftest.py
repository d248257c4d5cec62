"""Fixtures that start (or reuse) the real Kafka broker and PostgreSQL server.

A test that needs a service gets it from here or fails with the reason; nothing skips.
Each test session writes to topics under its own prefix and to its own database, so
runs never see each other's data.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from xdist.scheduler import LoadScopeScheduling

from app.local import deployments, postgres
from app.local.deployments import free_port
from app.local.kafka import KafkaNode
from app.settings import Settings, Topics

# tests.support asserts for the tests (eventually_equal): rewritten as theirs are.
pytest.register_assert_rewrite("tests.support")

# Where the processes of one run (pytest-xdist's workers and their controller) note
# which services a test process started, so the controller stops them at the end.
RUN_DIR = "STREAMFOLD_TEST_RUN"


class ModuleGroups(LoadScopeScheduling):
    """``--dist loadgroup`` as meant: a module marked ``xdist_group`` (its tests share
    a module-scoped deployment) runs whole on one test process, every other test on
    whichever is free. pytest-xdist 3.8 tags a grouped test by rewriting its node id,
    which pytest 9 ignores, so its own scheduler spread the groups over every process
    (each then set the module's deployment up again); this one groups by file."""

    def __init__(self, config: pytest.Config, log: object = None) -> None:
        super().__init__(config, log)
        self._grouped: dict[str, bool] = {}

    def _split_scope(self, nodeid: str) -> str:
        module = nodeid.split("::", 1)[0]
        if module not in self._grouped:
            source = self.config.rootpath / module
            self._grouped[module] = source.suffix == ".py" and (
                "pytest.mark.xdist_group(" in source.read_text()
            )
        return module if self._grouped[module] else nodeid


def pytest_xdist_make_scheduler(
    config: pytest.Config, log: object
) -> LoadScopeScheduling | None:
    if config.getvalue("dist") != "loadgroup":
        return None
    return ModuleGroups(config, log)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "services: needs the real Kafka broker and Postgres"
    )
    if not hasattr(config, "workerinput"):  # the controller, or a run without xdist
        os.environ[RUN_DIR] = tempfile.mkdtemp(prefix="streamfold-tests-")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow scenarios first: the test processes take them up at once, and the
    short tests fill in around them instead of one slow test ending the run alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_unconfigure(config: pytest.Config) -> None:
    """After every worker is done: stop the broker if a test process started it."""
    if hasattr(config, "workerinput"):
        return
    run = Path(os.environ.pop(RUN_DIR, "/nonexistent"))
    if (run / "kafka").exists():
        settings = Settings.from_env()
        KafkaNode(home=settings.home, cache=settings.cache).stop()


@contextmanager
def _one_at_a_time(settings: Settings) -> Iterator[None]:
    """Across the run's processes: one checks and starts the shared services."""
    settings.home.mkdir(parents=True, exist_ok=True)
    with open(settings.home / "tests.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    # A generous wait for command results: a freshly started worker on a busy
    # 2-core machine first joins its group and catches up from the log.
    return dataclasses.replace(Settings.from_env(), command_timeout_s=60.0)


@pytest.fixture(scope="session")
def kafka(base_settings: Settings) -> KafkaNode:
    """The broker every test process shares; stopped at the end of the run if a
    test process started it (``pytest_unconfigure``)."""
    node = KafkaNode(home=base_settings.home, cache=base_settings.cache)
    if base_settings.bootstrap_servers != node.bootstrap:
        pytest.fail(
            "tests start their own broker on 127.0.0.1:9092; unset "
            f"KAFKA_BOOTSTRAP_SERVERS (it is {base_settings.bootstrap_servers})"
        )
    with _one_at_a_time(base_settings):
        if node.start():
            (Path(os.environ[RUN_DIR]) / "kafka").touch()
    return node


@pytest.fixture(scope="session")
def postgres_server(base_settings: Settings) -> postgres.Conninfo:
    writer = postgres.Conninfo.parse(base_settings.database_url)
    reader = postgres.Conninfo.parse(base_settings.query_database_url)
    with _one_at_a_time(base_settings):
        postgres.ensure_running(writer.port)
        postgres.ensure_database(writer, reader)
    return writer


@pytest.fixture(scope="session")
def session_settings(
    base_settings: Settings, kafka: KafkaNode, postgres_server: postgres.Conninfo
) -> Iterator[Settings]:
    """Settings for this test session: a fresh database and a topic prefix of its own."""
    tag = uuid.uuid4().hex[:8]
    database = f"streamfold_test_{tag}"
    settings = dataclasses.replace(
        deployments.new_database(base_settings, database),
        topics=Topics(prefix=f"t{tag}."),
        app_id=f"streamfold-test-{tag}",
    )
    yield settings
    for used in [settings, *_FRESH]:
        deployments.delete_topics(used)
        deployments.delete_local_state(used)
    port = postgres.Conninfo.parse(settings.database_url).port
    postgres.drop_database(database, port=port)


# Settings handed out by fresh_settings, whose topics the session deletes at its end.
_FRESH: list[Settings] = []


def fresh_settings(settings: Settings, **changes: object) -> Settings:
    """A copy with its own topic prefix and application id: an isolated deployment."""
    tag = uuid.uuid4().hex[:8]
    fresh = dataclasses.replace(
        settings,
        topics=Topics(prefix=f"t{tag}."),
        app_id=f"streamfold-test-{tag}",
        **changes,  # type: ignore[arg-type]
    )
    _FRESH.append(fresh)
    return fresh


@pytest.fixture(scope="session")
def registry_settings(session_settings: Settings) -> Iterator[Settings]:
    """Session settings pointing at a schema registry of this session's own."""
    from app.local.registry import RegistryProcess

    port = free_port()
    settings = dataclasses.replace(
        session_settings,
        registry_port=port,
        schema_registry_url=f"http://127.0.0.1:{port}",
    )
    process = RegistryProcess(settings)
    process.start()
    yield settings
    process.stop()


@pytest.fixture
def deployment(registry_settings: Settings) -> Iterator[Settings]:
    """An isolated deployment: its own topics, app id, web port and database."""
    settings = deployments.create(registry_settings)
    yield settings
    deployments.remove(settings)
