"""Batches of a Faust stream's events that wait for nothing but the first one.

Faust's ``Stream.take_events(max, within)`` waits up to ``within`` for every batch,
from the moment the previous one was handed back: an idle agent wakes up every
``within``, and a command arriving alone waits it out. ``take_batches`` sleeps
until an event arrives, then takes whatever the stream has already queued behind it
(at most ``max_`` events, draining for at most ``within``) and hands the batch over
at once. Under load the queue fills while a batch is processed, so batches grow with
the load; when idle, a command is taken the moment it arrives.

As with ``take_events``, the stream's acks are off while batching and no event is
added to a batch the caller holds. A batch's events are acked when the caller is done
with it: when ``async for`` moves on, and also when the caller raises or is
cancelled, so Faust may then commit past events that were not processed. The command
agents do not rely on Faust's commits for that: their own positions, read-back and
probes find such events (see ``app.runtime``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import faust

# A batch of at least this many means commands are queueing: the next batch waits
# (up to ``within``) for more instead of going with what is there.
BUSY = 4
LINGER_STEP_S = 0.001


async def take_batches(
    stream: faust.StreamT, max_: int, within: float
) -> AsyncIterator[list[faust.EventT]]:
    batch: list[faust.EventT] = []
    arrived = asyncio.Event()  # ``batch`` holds an event
    free = asyncio.Event()  # no batch is out with the caller, and ``batch`` has room
    free.set()
    queue = stream.channel.queue  # type: ignore[attr-defined]
    loop = asyncio.get_running_loop()

    async def add(value: Any) -> Any:
        try:
            await free.wait()
            event = stream.current_event
            if event is None:
                raise RuntimeError("a batched stream value came without its event")
            batch.append(event)
            arrived.set()
            if len(batch) >= max_:
                free.clear()
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - any error stops the stream
            # Stop the stream (its agent's supervisor then stops the worker) rather
            # than leave the batch loop waiting for events that will never come.
            await stream.crash(error)  # type: ignore[attr-defined]
        return value

    acks = stream.enable_acks
    stream.enable_acks = False
    stream.add_processor(add)
    stream._enable_passive(aiter(stream.channel))  # type: ignore[attr-defined]
    busy = False
    try:
        while not stream.should_stop:  # type: ignore[attr-defined]
            await stream.wait_for_stopped(arrived)  # type: ignore[attr-defined]
            # Let the drainer move what is already queued into the batch; after a
            # batch of several, also wait for more to arrive.
            now = loop.time()
            deadline = now + within
            linger = deadline if busy else now
            while len(batch) < max_ and now < deadline:
                if not queue.empty():
                    await asyncio.sleep(0)
                elif now < linger:
                    await asyncio.sleep(min(LINGER_STEP_S, linger - now))
                else:
                    break
                now = loop.time()
            if not batch:
                continue
            busy = len(batch) >= BUSY
            free.clear()
            events = list(batch)
            batch.clear()
            arrived.clear()
            try:
                yield events
            finally:
                for event in events:
                    await stream.ack(event)
                free.set()
    finally:
        stream.enable_acks = acks
        stream._processors.remove(add)  # type: ignore[attr-defined]
