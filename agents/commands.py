"""Command agents: one per aggregate type, the single writer for its partitions.

Thin by design: turn the Faust event into an ``Incoming`` and hand it over; every
rule and every error path lives in ``app.runtime`` and the domain.
"""

from __future__ import annotations

import functools
from typing import Any

import faust

from app.runtime import CommandProcessor, Incoming


def register(app: faust.App, topic: faust.TopicT, processor: CommandProcessor) -> Any:
    async def process_commands(stream: faust.StreamT) -> None:
        # Acked once handled, not when the next one arrives: commands are handled
        # concurrently, and Faust's rebalance waits for what is unacked.
        commands = stream.noack()
        async for event in commands.events():
            message = event.message
            await processor.process(
                Incoming(
                    topic=message.topic,
                    partition=message.partition,
                    offset=message.offset,
                    key=message.key,
                    value=message.value,
                    headers=list(message.headers or []),
                ),
                functools.partial(commands.ack, event),
            )

    name = f"{processor.aggregate.type}-commands"
    return app.agent(topic, name=name)(process_commands)
