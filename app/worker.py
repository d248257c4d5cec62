"""Builds the worker: the Faust app, its tables and agents, the codec and producers."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import faust
from aiokafka import AIOKafkaProducer

from agents import commands as command_agents
from agents import saga as saga_agents
from agents import views as view_agents
from app import readside
from app.adapters.catalog import SchemaCatalog
from app.adapters.codec import Codec, ConfluentRegistry
from app.adapters.eventlog import new_producer
from app.adapters.migrations import migrate
from app.adapters.topics import ensure_topics
from app.faust_app import create_app
from app.projections.engine import tune_gc
from app.readside import ReadSide
from app.runtime import (
    AGGREGATES,
    TRANSIENT,
    CommandProcessor,
    TableStore,
    settle_commits,
)
from app.settings import Settings

log = logging.getLogger("streamfold.worker")
# How often a command partition that stopped short of its end is looked at.
PROBE_INTERVAL_S = 5.0


class LazyProducer:
    """Streamfold's idempotent producer, started inside the worker's event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._producer: AIOKafkaProducer | None = None
        self._lock: asyncio.Lock | None = None

    async def get(self) -> AIOKafkaProducer:
        if self._producer is None:
            self._lock = self._lock or asyncio.Lock()
            async with self._lock:
                if self._producer is None:
                    producer = new_producer(self.settings)
                    await producer.start()
                    self._producer = producer
        return self._producer

    async def send(self, *args: Any, **kwargs: Any) -> Any:
        return await (await self.get()).send(*args, **kwargs)

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()


@dataclass(slots=True)
class Worker:
    settings: Settings
    app: faust.App
    processors: dict[str, CommandProcessor] = field(default_factory=dict)
    read: ReadSide | None = None


def build(settings: Settings) -> Worker:
    ensure_topics(settings)
    app = create_app(settings)
    catalog = SchemaCatalog.load()
    codec = Codec(ConfluentRegistry(settings.schema_registry_url), catalog)
    producer = LazyProducer(settings)
    worker = Worker(settings=settings, app=app)
    for name, aggregate in AGGREGATES.items():
        table = app.Table(
            f"{aggregate.type}-aggregates",
            partitions=settings.partitions,
            key_type=str,
        )
        commands_topic = settings.topics.commands(name)
        store = TableStore(table, aggregate, commands_topic)
        processor = CommandProcessor(
            settings=settings,
            aggregate=aggregate,
            store=store,
            codec=codec,
            catalog=catalog,
            producer=producer,  # type: ignore[arg-type]
            events_topic=settings.topics.events(name),
        )
        topic = app.topic(
            commands_topic,
            partitions=settings.partitions,
            key_serializer="raw",
            value_serializer="raw",
        )
        command_agents.register(app, topic, processor)
        worker.processors[name] = processor

    @app.timer(interval=PROBE_INTERVAL_S)
    async def _probe_stalled() -> None:
        if app.rebalancing or app.in_recovery or app.consumer is None:
            return
        assigned = app.consumer.assignment()
        for name, processor in worker.processors.items():
            topic = settings.topics.commands(name)
            highwaters = {
                tp.partition: high
                for tp in assigned
                if tp.topic == topic
                and (high := app.consumer.highwater(tp)) is not None
            }
            try:
                await processor.probe_stalled(topic, highwaters)
            except TRANSIENT as error:  # an exception here would crash the app
                log.warning("could not probe %s: %r", topic, error)
            for tp in assigned:
                if tp.topic == topic:
                    own = processor.store.next_command(tp.partition)
                    await settle_commits(app.consumer, tp, own)

    @app.on_partitions_revoked.connect
    async def _revoked(sender: Any, revoked: Any, **kwargs: Any) -> None:
        for processor in worker.processors.values():
            processor.forget_partitions()

    @app.on_partitions_assigned.connect
    async def _assigned(sender: Any, assigned: Any, **kwargs: Any) -> None:
        for processor in worker.processors.values():
            processor.forget_partitions()

    @app.page("/ready")
    async def ready(web: Any, request: Any) -> Any:
        """200 once this worker owns partitions and has recovered its tables (so
        it is processing commands), 503 before that and during a rebalance."""
        serving = bool(
            app.consumer is not None
            and app.consumer.assignment()
            and not app.rebalancing
            and not app.in_recovery
            and app.tables.recovery.completed.is_set()
        )
        return web.json({"ready": serving}, status=200 if serving else 503)

    view_agents.register(app, settings, codec)
    saga_agents.register(app, settings, codec)
    read = ReadSide(settings, settings.projections)
    readside.attach(app, settings, read)
    worker.read = read
    return worker


def run(settings: Settings) -> None:
    """Run the worker in the foreground until interrupted."""
    migrate(settings.database_url)
    worker = build(settings)
    worker.app.finalize()
    tune_gc()
    if worker.read is not None:
        worker.read.start()
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
        if worker.read is not None:
            worker.read.stop(timeout=3.0)
        logging.shutdown()
        os._exit(code)
