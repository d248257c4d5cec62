"""Command agents: one per aggregate type, the single writer for its partitions.

Thin by design: take the Faust events in batches, turn them into ``Incoming`` and
hand them over; every rule and every error path lives in ``app.runtime`` and the
domain. Faust acks a batch's events only once ``process_batch`` has returned, that
is once they are durable, answered and marked processed.
"""

from __future__ import annotations

from typing import Any

import faust

from app.runtime import CommandProcessor, Incoming

# How long a batch waits to fill up once it has a first command.
BATCH_WAIT_S = 0.005


def register(app: faust.App, topic: faust.TopicT, processor: CommandProcessor) -> Any:
    batch = processor.settings.command_batch

    async def process_commands(stream: faust.StreamT) -> None:
        async for events in stream.take_events(batch, within=BATCH_WAIT_S):
            await processor.process_batch(
                [
                    Incoming(
                        topic=event.message.topic,
                        partition=event.message.partition,
                        offset=event.message.offset,
                        key=event.message.key,
                        value=event.message.value,
                        headers=list(event.message.headers or []),
                    )
                    for event in events
                ]
            )

    name = f"{processor.aggregate.type}-commands"
    return app.agent(topic, name=name)(process_commands)
