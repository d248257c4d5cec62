"""The order payment saga's Kafka side: command framing shared with ``app.client``,
the inbox's messages, and the routing of what the saga follows into its inbox.

The feed (``agents.saga.FeedHandler``) runs in a consumer group of its own
(``<app_id>.saga``), so replays of other read models never touch it, switching the
saga off leaves its position where it was, and ``kafka-consumer-groups
--reset-offsets`` on that group replays the saga's input (the saga recognises every
message it already acted on and sends nothing again).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Message

from app.adapters import mapper
from app.adapters.codec import Codec, Headers, headers
from app.adapters.eventlog import partition_for
from app.adapters.topics import headers_of
from app.application import saga
from app.client import aggregate_id_of, area_of
from app.settings import Settings

log = logging.getLogger("streamfold.saga")


@dataclass(frozen=True, slots=True)
class FramedCommand:
    """A command as ``app.client`` puts it on the wire: Confluent-framed Avro, keyed by
    aggregate id, on the aggregate's murmur2 partition, with routing headers."""

    topic: str
    key: bytes
    partition: int
    value: bytes
    headers: Headers


def frame_command(
    settings: Settings, codec: Codec, command: Any, envelope: Mapping[str, Any]
) -> FramedCommand:
    """Frame ``command`` with ``envelope`` (command_id, correlation_id, causation_id,
    user_id, issued_at, expected_version), as ``CommandClient.submit`` does."""
    topic = settings.topics.commands(area_of(command))
    name = codec.catalog.record_name(type(command))
    value = codec.encode(topic, name, mapper.command_record(command, dict(envelope)))
    key = aggregate_id_of(command).encode()
    return FramedCommand(
        topic=topic,
        key=key,
        partition=partition_for(key, settings.partitions),
        value=value,
        headers=headers.for_command(
            command_type=type(command).__name__,
            command_id=envelope["command_id"],
            correlation_id=envelope["correlation_id"],
        ),
    )


def inbox_topic(settings: Settings) -> str:
    return f"{settings.app_id}-saga-inbox"


def feed_group(settings: Settings) -> str:
    return f"{settings.app_id}.saga"


def encode_message(message: saga.Message) -> tuple[bytes, bytes]:
    """(key, value) of a message on the inbox: the order id, and JSON."""
    value = json.dumps(saga.message_to_json(message), separators=(",", ":"))
    return message.order_id.encode(), value.encode()


def route(
    codec: Codec, settings: Settings, message: Message
) -> tuple[bytes, bytes] | None:
    """(key, value) for the saga's inbox of an event or result the saga follows, or
    None when it does not follow it. Raises ``DecodeError``, ``MappingError``,
    ``LookupError`` or ``TypeError`` for a record it cannot read."""
    now = datetime.now(UTC)
    if message.topic() == settings.topics.results:
        if not (message.key() or b"").startswith(b"saga:"):
            return None
        data = codec.decode(message.value() or b"").data
        routed: saga.Message | None = saga.message_for_result(
            command_id=data["command_id"],
            accepted=data["status"] == "ACCEPTED",
            code=data["code"],
            message=data["message"],
            at=now,
        )
    else:
        found = dict(headers_of(message))
        kind, cause = found.get("event-type"), found.get("command-id")
        if kind is not None and not saga.may_follow(
            kind.decode(), cause.decode() if cause is not None else None
        ):
            return None
        decoded = codec.decode(message.value() or b"")
        meta, payload = mapper.split_event(decoded.data)
        event: object = mapper.from_dict(
            codec.catalog.class_for(decoded.record_name), payload
        )
        routed = saga.message_for_event(
            event,
            event_id=meta["event_id"],
            correlation_id=meta["correlation_id"],
            command_id=meta["command_id"],
            at=now,
        )
    return None if routed is None else encode_message(routed)
