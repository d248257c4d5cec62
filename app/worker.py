"""Builds the worker: the Faust app, its tables and agents, the codec and producers."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, cast

import faust
from faust.tables import TableManager

from agents import saga as saga_agents
from agents import views as view_agents
from app import readside
from app.adapters.catalog import SchemaCatalog
from app.adapters.codec import Codec, ConfluentRegistry, RegistryError
from app.adapters.gateway import CommandGateway
from app.adapters.migrations import migrate
from app.adapters.subjects import ensure_subjects
from app.adapters.topics import TopicSpec, ensure_topics
from app.console import web as console_web
from app.faust_app import create_app
from app.graphql import web as graphql
from app.projections.engine import tune_gc
from app.push import hub as push
from app.readside import ReadSide
from app.rest import web as rest
from app.settings import Settings
from app.writeside import WriteProcess

log = logging.getLogger("streamfold.worker")


@dataclass(slots=True)
class Worker:
    settings: Settings
    app: faust.App
    write: WriteProcess
    read: ReadSide | None = None
    # Commands over HTTP: only with a token configured (STREAMFOLD_API_TOKENS).
    gateway: CommandGateway | None = None


def build(settings: Settings, write: WriteProcess) -> Worker:
    app = create_app(settings)
    catalog = SchemaCatalog.load()
    registry = ConfluentRegistry(settings.schema_registry_url)
    codec = Codec(registry, catalog)
    try:
        for problem in ensure_subjects(registry, catalog, settings.topics):
            log.warning("%s", problem)
    except RegistryError as error:
        # The codec registers what it writes as it goes; readers need the registry
        # anyway, and tell when it is missing.
        log.warning("could not register every subject: %s", error)
    worker = Worker(settings=settings, app=app, write=write)

    @app.page("/ready")
    async def ready(web: Any, request: Any) -> Any:
        """200 once this worker's write processes own command partitions and its
        Faust tables are recovered, 503 before that."""
        # App.tables is typed as TableManagerT, which leaves out the recovery
        # service; the app runs faust's own TableManager (the default), which has it.
        tables = cast(TableManager, app.tables)
        serving = bool(
            write.assigned
            and not app.rebalancing
            and not app.in_recovery
            and tables.recovery.completed.is_set()
        )
        return web.json({"ready": serving}, status=200 if serving else 503)

    view_agents.register(app, settings, codec)
    if settings.api_tokens:
        worker.gateway = CommandGateway(settings, codec)
    api, table = rest.register(app, settings, worker.gateway, catalog)
    if settings.saga:
        saga_agents.register_view(app, settings)
    ensure_changelogs(settings, app)
    read = ReadSide(settings, settings.projections)
    pushed = push.attach(app, settings, codec, read.index_below)
    readside.attach(app, settings, read, write.status, pushed.status)
    graphql.register(app, settings, read, api, codec, table)
    # A codec of its own: the console decodes in threads, beside the agents' loop.
    console_web.register(app, settings, Codec(registry, catalog), read, write)
    worker.read = read
    return worker


def run(settings: Settings, write: WriteProcess) -> None:
    """Run the worker in the foreground until interrupted, around ``write`` (started
    by ``app.writeside.start_write_side``)."""
    try:
        migrate(settings.database_url)
        worker = build(settings, write)
    except BaseException:
        write.stop(timeout=10.0)
        raise
    worker.app.finalize()
    tune_gc()
    if worker.read is not None:
        worker.read.start()
    if worker.gateway is not None:
        try:
            worker.gateway.start()
        except BaseException:
            write.stop(timeout=10.0)
            if worker.read is not None:
                worker.read.stop(timeout=3.0)
            raise
    from faust.worker import Worker as FaustWorker

    faust_worker = FaustWorker(worker.app, loglevel=settings.log_level, quiet=True)
    # Faust's terminal spinner sets the root logger to DEBUG so that every record
    # spins it (faust/worker.py, _setup_spinner_handler): every debug call in Faust
    # and aiokafka then builds a record only for the handler to drop it.
    faust_worker.spinner = None
    code = 0
    try:
        faust_worker.execute_from_commandline()
    except SystemExit as stopped:
        code = stopped.code if isinstance(stopped.code, int) else 1
    finally:
        # Exit now, also after a crash: the projections' consumers would otherwise
        # hold the process open while librdkafka waits out a pending group request
        # (up to 5 minutes), and a supervisor would see a live process that serves
        # nothing. Their positions are in Postgres, so this is as safe as SIGKILL.
        if worker.gateway is not None:
            worker.gateway.stop(timeout=2.0)
        worker.write.stop(timeout=10.0)
        if worker.read is not None:
            worker.read.stop(timeout=3.0)
        logging.shutdown()
        os._exit(code)


def ensure_changelogs(settings: Settings, app: faust.App) -> None:
    """Every table's changelog topic, before Faust starts. Left to Faust, one was
    sometimes created only after the consumer had subscribed; Faust then saw it
    with 0 partitions at the next rebalance and stopped the worker
    (PartitionsMismatch)."""
    ensure_topics(
        settings,
        [
            TopicSpec(
                table.changelog_topic.get_topic_name(),
                table.partitions or settings.partitions,
                {"cleanup.policy": "compact"},
            )
            for table in app.tables.values()
        ],
    )
