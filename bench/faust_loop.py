"""The Faust loop: the least work a Faust agent with aggregate state in a Faust table
does per command, run as ``python -m bench.faust_loop READY_FILE`` by bench.commands.

Configured as the worker is (``create_app``, its producer, its batch size and wait),
it takes each batch as the command agent does: at most one command per key in
flight. A command reads its key's state, its bytes go to an events-like topic; once
the broker has them, the state is written (one RocksDB-backed table write, with its
changelog record) and a result produced; the batch is done once results and
changelog records are acknowledged. It decodes, decides and answers nothing.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import faust

from agents.batching import take_batches
from agents.commands import BATCH_WAIT_S
from app.adapters.codec import COMMAND_ID_HEADER
from app.faust_app import create_app
from app.runtime import as_current
from app.settings import Settings
from app.worker import LazyProducer
from bench.common import baseline_topics

# Its topics are named after this (see ``baseline_topics``).
KIND = "faust"


def build(settings: Settings, ready: Path) -> faust.App:
    names = baseline_topics(settings, KIND)
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

    async def finish(taken: list[tuple[faust.EventT, Awaitable[Any]]]) -> None:
        await asyncio.gather(*(appended for _, appended in taken))
        results = []
        for event, _ in taken:
            message = event.message
            with as_current(event):
                state[message.key] = message.value
            results.append(
                await producer.send(
                    names["results"],
                    dict(message.headers or [])[COMMAND_ID_HEADER],
                    key=message.key,
                )
            )
        await asyncio.gather(*results)
        pending = list(changelog)
        del changelog[: len(pending)]
        if pending:
            # Not gather: cancelling this wait must not cancel Faust's futures.
            await asyncio.wait(pending)
        taken.clear()

    @app.agent(commands, name="faust-loop")
    async def loop(stream: faust.StreamT) -> None:
        batch = settings.command_batch
        async for events in take_batches(stream, batch, within=BATCH_WAIT_S):
            # In waves, as the worker: a key already taken waits for the next.
            wave: list[faust.EventT] = list(events)
            while wave:
                taken: list[tuple[faust.EventT, Awaitable[Any]]] = []
                keys: set[bytes] = set()
                deferred: list[faust.EventT] = []
                for event in wave:
                    message = event.message
                    if message.key in keys:
                        deferred.append(event)
                        continue
                    with as_current(event):
                        state.get(message.key)
                    appended = await producer.send(
                        names["events"],
                        message.value,
                        key=message.key,
                        partition=message.partition,
                    )
                    taken.append((event, appended))
                    keys.add(message.key)
                await finish(taken)
                wave = deferred

    @app.on_before_shutdown.connect
    async def stop_producer(sender: Any, **kwargs: Any) -> None:
        await producer.stop()

    signalled: list[bool] = []

    @app.timer(interval=0.2)
    async def signal_ready() -> None:
        recovered = app.tables.recovery.completed.is_set()
        if not signalled and app.consumer is not None and app.consumer.assignment():
            if not recovered:
                return
            signalled.append(True)
            await asyncio.to_thread(ready.write_text, "ready")

    return app


def main(argv: list[str]) -> int:
    app = build(Settings.from_env(), Path(argv[0]))
    app.finalize()
    from faust.worker import Worker

    worker = Worker(app, loglevel="warning", quiet=True)
    worker.spinner = None
    worker.execute_from_commandline()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
