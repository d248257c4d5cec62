"""The order payment saga's Kafka side: the inbox's messages, and the routing of
what the saga follows into its inbox (its commands are framed by ``app.client``).

The feed (``agents.saga.FeedHandler``) runs in a consumer group of its own
(``<app_id>.saga``), so replays of other read models never touch it, switching the
saga off leaves its position where it was, and ``kafka-consumer-groups
--reset-offsets`` on that group replays the saga's input (the saga recognises every
message it already acted on and sends nothing again).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from confluent_kafka import Message

from app.adapters import mapper
from app.adapters.codec import Codec
from app.adapters.topics import headers_of
from app.application import saga
from app.settings import Settings

log = logging.getLogger("streamfold.saga")


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
