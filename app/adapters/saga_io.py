"""The order payment saga's Kafka side: command framing shared with ``app.client``, and
the feed that routes what the saga follows into its inbox.

The feed runs in a consumer group of its own (``<app_id>.saga``), so replays of other
read models never touch it, switching the saga off leaves its position where it was,
and ``kafka-consumer-groups --reset-offsets`` on that group replays the saga's input
(the saga recognises every message it already acted on and sends nothing again).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from app.adapters import mapper
from app.adapters.codec import Codec, DecodeError, RegistryUnavailable, headers
from app.adapters.eventlog import partition_for, read_records
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
    headers: list[tuple[str, bytes]]


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


class FeedUnavailable(RuntimeError):
    """Kafka or the registry failed the feed just now; it retries from its group
    offsets (nothing is committed before the inbox has it)."""


class SagaFeed:
    """Order events, the saga's own account movements and the rejections of its
    commands, routed into the inbox keyed by order id, on a thread of its own.

    A batch's offsets are committed only once the broker has acknowledged every
    message it routed, so a crash repeats messages (the saga ignores repeats) and
    never loses one.
    """

    def __init__(
        self,
        settings: Settings,
        codec: Codec,
        *,
        batch_size: int = 500,
        poll_timeout: float = 0.05,
    ) -> None:
        self.settings = settings
        self.codec = codec
        self.inbox = inbox_topic(settings)
        self.sources = [
            settings.topics.events("orders"),
            settings.topics.events("accounts"),
            settings.topics.results,
        ]
        self.batch_size = batch_size
        self.poll_timeout = poll_timeout
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="saga-feed", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        """Route until stopped; failures are retried from the group's offsets."""
        delay = 0.5
        while not self._stop.is_set():
            try:
                self._run_once()
                return
            except (FeedUnavailable, KafkaException, RegistryUnavailable) as error:
                log.warning("saga feed: %s; retrying in %.1fs", error, delay)
            except Exception:  # logged: a dead feed would stall every saga
                log.exception("saga feed failed; retrying in %.1fs", delay)
            self._stop.wait(delay)
            delay = min(delay * 2, 10.0)

    def _run_once(self) -> None:
        session_ms = int(self.settings.session_timeout_s * 1000)
        consumer = Consumer(
            {
                **self.settings.kafka_client_config(),
                "group.id": feed_group(self.settings),
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                "fetch.wait.max.ms": 50,
                "session.timeout.ms": session_ms,
                "heartbeat.interval.ms": max(session_ms // 10, 500),
            }
        )
        producer = Producer({**self.settings.producer_config(), "linger.ms": 2})
        try:
            consumer.subscribe(self.sources)
            while not self._stop.is_set():
                messages = consumer.consume(self.batch_size, self.poll_timeout)
                if messages:
                    self._forward(consumer, producer, messages)
        finally:
            with contextlib.suppress(Exception):  # leaving the group is best effort
                consumer.close()
            producer.flush(10)

    def _forward(
        self, consumer: Consumer, producer: Producer, messages: list[Message]
    ) -> None:
        offsets: dict[tuple[str, int], int] = {}
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                raise FeedUnavailable(f"consuming: {error}")
            routed = self._route(message)
            if routed is not None:
                key, value = routed
                producer.produce(
                    self.inbox,
                    value,
                    key,
                    partition=partition_for(key, self.settings.partitions),
                )
                producer.poll(0)
            offsets[(message.topic(), message.partition())] = message.offset() + 1
        if producer.flush(30) > 0:
            raise FeedUnavailable("the inbox did not acknowledge within 30s")
        try:
            consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                asynchronous=False,
            )
        except KafkaException as error:
            # Revoked meanwhile: the new owner routes these again; repeats are harmless.
            log.info("saga feed: offset commit skipped: %s", error)

    def _route(self, message: Message) -> tuple[bytes, bytes] | None:
        """(key, value) for the inbox, or None when the saga does not follow it."""
        now = datetime.now(UTC)
        try:
            if message.topic() == self.settings.topics.results:
                if not (message.key() or b"").startswith(b"saga:"):
                    return None
                data = self.codec.decode(message.value()).data
                routed: saga.Message | None = saga.message_for_result(
                    command_id=data["command_id"],
                    accepted=data["status"] == "ACCEPTED",
                    code=data["code"],
                    message=data["message"],
                    at=now,
                )
            else:
                found = dict(message.headers() or [])
                kind, cause = found.get("event-type"), found.get("command-id")
                if kind is not None and not saga.may_follow(
                    kind.decode(), cause.decode() if cause is not None else None
                ):
                    return None
                decoded = self.codec.decode(message.value())
                meta, payload = mapper.split_event(decoded.data)
                event = mapper.from_dict(
                    self.codec.catalog.class_for(decoded.record_name), payload
                )
                routed = saga.message_for_event(
                    event,
                    event_id=meta["event_id"],
                    correlation_id=meta["correlation_id"],
                    command_id=meta["command_id"],
                    at=now,
                )
        except (DecodeError, mapper.MappingError, LookupError, TypeError) as error:
            # The projections dead-letter undecodable events; the saga cannot act on
            # one, so it says so and moves on.
            log.warning(
                "saga feed skipped %s[%d]@%d: %s",
                message.topic(),
                message.partition(),
                message.offset(),
                error,
            )
            return None
        return None if routed is None else encode_message(routed)


def read_range(
    settings: Settings, topic: str, partition: int, start: int, end: int
) -> list[tuple[int, bytes | None]]:
    """(offset, value) of the messages in [start, end) of one partition, read directly
    (no group). Blocking; raises ``FeedUnavailable`` when Kafka does not answer."""
    try:
        return [
            (r.offset, r.value)
            for r in read_records(settings, topic, partition, start, end)
        ]
    except KafkaException as error:
        raise FeedUnavailable(f"reading {topic}[{partition}]: {error}") from error
