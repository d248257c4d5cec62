"""Command agents: one per aggregate type, the single writer for its partitions.

Thin by design: take the Faust events in batches, turn them into ``Incoming`` and
hand them over; every rule and every error path lives in ``app.runtime`` and the
domain. Faust acks a batch's events once ``process_batch`` has returned, that is
once they are durable, answered and marked processed (or once it raised or was
cancelled: the processor's own positions then find what was not done).
"""

from __future__ import annotations

from typing import Any

import faust

from agents.batching import take_batches
from app.runtime import CommandProcessor, Incoming

# A batch drains what is queued behind its first command for at most this long, and
# after a busy batch also waits this long for more (``take_batches``).
BATCH_WAIT_S = 0.02


def register(app: faust.App, topic: faust.TopicT, processor: CommandProcessor) -> Any:
    batch = processor.settings.command_batch

    async def process_commands(stream: faust.StreamT) -> None:
        async for events in take_batches(stream, batch, within=BATCH_WAIT_S):
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
