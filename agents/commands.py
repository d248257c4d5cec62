"""Command agents: one per aggregate type, the single writer for its partitions.

Thin by design: turn the Faust event into an ``Incoming`` and hand it over; every
rule and every error path lives in ``app.runtime`` and the domain.
"""

from __future__ import annotations

from typing import Any

import faust

from app.runtime import CommandProcessor, Incoming


def register(app: faust.App, topic: faust.TopicT, processor: CommandProcessor) -> Any:
    async def process_commands(stream: faust.StreamT) -> None:
        async for event in stream.events():
            message = event.message
            await processor.process(
                Incoming(
                    topic=message.topic,
                    partition=message.partition,
                    offset=message.offset,
                    key=message.key,
                    value=message.value,
                    headers=list(message.headers or []),
                )
            )

    name = f"{processor.aggregate.type}-commands"
    return app.agent(topic, name=name)(process_commands)
