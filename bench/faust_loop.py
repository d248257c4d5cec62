"""The Faust loop: the least a Faust worker does per command under Streamfold's design,
as a second baseline for ``bench.commands``.

    .venv/bin/python -m bench.faust_loop READY_FILE   (settings from the environment)

A Faust agent (configured as the worker's: ``app.faust_app.create_app``) takes the
commands in batches, writes each command's bytes into a RocksDB-backed Faust table
under its key (one state write, with its changelog record), produces them to an
events-like topic with the worker's idempotent ``acks=all`` producer, and once the
broker acknowledges those, a result per command; the batch is done once the results
and the table's changelog records are acknowledged. It decodes nothing, decides
nothing, answers no duplicates and feeds no views: the ceiling of a Faust agent with
aggregate state in a Faust table on this machine, where the raw loop is the ceiling
of Python and the broker.
"""

from __future__ import annotations

import asyncio
import sys
import weakref
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import faust
from faust.streams import _current_event

from app.faust_app import create_app
from app.settings import Settings
from app.worker import LazyProducer

BATCH = 500
BATCH_WAIT_S = 0.005


def topics(settings: Settings) -> dict[str, str]:
    prefix = f"{settings.topics.prefix}faust"
    return {name: f"{prefix}.{name}" for name in ("commands", "events", "results")}


def build(settings: Settings, ready: Path) -> faust.App:
    names = topics(settings)
    app = create_app(settings)
    state = app.Table(
        "faust-loop-state",
        partitions=settings.partitions,
        key_type=bytes,
        value_type=bytes,
    )
    changelog: list[Awaitable[Any]] = []
    send_changelog = state.send_changelog

    def keeping(*args: Any, **kwargs: Any) -> Any:
        # As the worker's TableStore: keep the futures Faust drops, to await them.
        future = send_changelog(*args, **kwargs)
        changelog.append(future)
        return future

    state.send_changelog = keeping  # type: ignore[method-assign]
    commands = app.topic(
        names["commands"],
        partitions=settings.partitions,
        key_serializer="raw",
        value_serializer="raw",
    )
    producer = LazyProducer(settings)

    @app.agent(commands, name="faust-loop")
    async def loop(stream: faust.StreamT) -> None:
        async for events in stream.take_events(BATCH, within=BATCH_WAIT_S):
            sent = []
            for event in events:
                message = event.message
                # The table's store and changelog partition come from the current
                # event, which Faust sets only when an agent takes one at a time.
                token = _current_event.set(weakref.ref(event))
                try:
                    state[message.key] = message.value
                finally:
                    _current_event.reset(token)
                sent.append(
                    await producer.send(
                        names["events"],
                        message.value,
                        key=message.key,
                        partition=message.partition,
                    )
                )
            await asyncio.gather(*sent)
            results = [
                await producer.send(
                    names["results"],
                    dict(event.message.headers or [])["command-id"],
                    key=event.message.key,
                )
                for event in events
            ]
            await asyncio.gather(*results)
            pending = list(changelog)
            del changelog[: len(pending)]
            await asyncio.gather(*pending)

    @app.on_before_shutdown.connect
    async def stop_producer(sender: Any, **kwargs: Any) -> None:
        await producer.stop()

    signalled: list[bool] = []

    @app.timer(interval=0.2)
    async def signal_ready() -> None:
        if not signalled and app.consumer is not None and app.consumer.assignment():
            signalled.append(True)
            await asyncio.to_thread(ready.write_text, "ready")

    return app


def main(argv: list[str]) -> int:
    ready = Path(argv[0])
    app = build(Settings.from_env(), ready)
    app.finalize()
    from faust.worker import Worker

    worker = Worker(app, loglevel="warning", quiet=True)
    worker.spinner = None
    worker.execute_from_commandline()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
