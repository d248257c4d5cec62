"""The dead-letter topics and the operators' actions on them, in Kafka: reading
every dead letter, and re-driving or discarding one in a Kafka transaction together
with the record of the action (``<prefix>operator-actions``, kept for ever)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import KafkaException, Message, Producer

from app.adapters.topics import (
    FOREVER,
    TopicSpec,
    admin_client,
    ensure_topics,
    headers_of,
    inbox_topic,
    partitions_of,
    read_range,
    reader,
    watermarks,
)
from app.deadletters import (
    Action,
    ActionRefused,
    DeadLetter,
    Verb,
    chosen,
    parse_record_id,
    record_id,
    redrive_of,
    standings,
)
from app.settings import AGGREGATES, Settings


class DeadLetterError(RuntimeError):
    """Kafka could not be read or written: nothing was done."""


def candidate_topics(settings: Settings) -> list[str]:
    """Every dead-letter topic Streamfold writes: the commands' and events' (per
    aggregate type), each projection's, and the saga inbox's."""
    from app.projections import PROJECTIONS
    from app.projections.engine import dead_letter_topic

    topics = settings.topics
    names = [topics.dead_letter(topics.commands(area)) for area in AGGREGATES] + [
        topics.dead_letter(topics.events(area)) for area in AGGREGATES
    ]
    names += [dead_letter_topic(settings, name) for name in PROJECTIONS]
    names.append(f"{inbox_topic(settings)}.dlq")
    return names


def existing_topics(settings: Settings) -> list[str]:
    """The candidate topics that exist (a projection's is made at its first)."""
    try:
        present = set(admin_client(settings).list_topics(timeout=30).topics)
    except KafkaException as error:
        raise DeadLetterError(f"listing topics: {error}") from error
    return [name for name in candidate_topics(settings) if name in present]


def _read(settings: Settings, topic: str, purpose: str) -> list[Message]:
    consumer = reader(settings, purpose)
    try:
        found: list[Message] = []
        for partition in partitions_of(consumer, topic):
            low, high = watermarks(consumer, topic, partition)
            found += read_range(consumer, topic, partition, low, high)
        return found
    except KafkaException as error:
        raise DeadLetterError(f"reading {topic}: {error}") from error
    finally:
        consumer.close()


def read_dead_letters(settings: Settings, topics: Sequence[str]) -> list[DeadLetter]:
    """Every record of ``topics``, in topic and offset order."""
    letters: list[DeadLetter] = []
    for topic in topics:
        for message in _read(settings, topic, "console-dead-letters"):
            _, timestamp = message.timestamp()
            letters.append(
                DeadLetter(
                    topic=topic,
                    partition=message.partition() or 0,
                    offset=message.offset() or 0,
                    key=message.key(),
                    value=message.value(),
                    headers=tuple(headers_of(message)),
                    timestamp_ms=int(timestamp),
                )
            )
    return letters


def ensure_actions_topic(settings: Settings) -> None:
    ensure_topics(
        settings,
        [TopicSpec(settings.topics.operator_actions, 1, dict(FOREVER), tuple(FOREVER))],
    )


def read_actions(settings: Settings) -> list[Action]:
    """Every operator action, oldest first (none before the first: the topic is
    made by the first action, not by reading)."""
    try:
        present = admin_client(settings).list_topics(timeout=30).topics
    except KafkaException as error:
        raise DeadLetterError(f"listing topics: {error}") from error
    if settings.topics.operator_actions not in present:
        return []
    return [
        Action.from_json(message.value() or b"{}")
        for message in _read(settings, settings.topics.operator_actions, "console")
    ]


class Operations:
    """Re-drives and discards, each in one Kafka transaction with its action record:
    a re-driven record is never without the action that produced it, nor the other
    way round. One at a time per process: the check that a record is still open and
    the action are not interleaved with another's."""

    def __init__(self, settings: Settings, clock: Callable[[], datetime]) -> None:
        self.settings = settings
        self.clock = clock
        self._lock = threading.Lock()
        self._producer: Producer | None = None

    def _transactional(self) -> Producer:
        if self._producer is None:
            ensure_actions_topic(self.settings)
            producer = Producer(
                {
                    **self.settings.producer_config(),
                    "transactional.id": (
                        f"{self.settings.app_id}-operator-{uuid.uuid4().hex}"
                    ),
                    "transaction.timeout.ms": 60_000,
                }
            )
            producer.init_transactions(30)
            self._producer = producer
        return self._producer

    def act(
        self,
        verb: Verb,
        operator: str,
        reason: str,
        *,
        record: str | None = None,
        topic: str | None = None,
        aggregate_id: str | None = None,
    ) -> list[Action]:
        """Re-drive or discard one record (``record``) or every open record of
        ``aggregate_id`` in dead-letter ``topic``, in their order; returns the
        actions recorded. Raises ``ActionRefused`` for a record not open, and
        ``DeadLetterError`` when Kafka failed (then nothing was done)."""
        if verb == "discard" and record is None:
            raise ActionRefused(400, "a discard names one record")
        with self._lock:
            named = topic if topic is not None else _topic_of(record)
            letters = read_dead_letters(self.settings, [named])
            decided = standings(read_actions(self.settings))
            targets = chosen(
                letters, decided, record=record, topic=topic, aggregate_id=aggregate_id
            )
            producer = self._transactional()
            try:
                producer.begin_transaction()
                actions = [
                    self._one(producer, verb, operator, reason, letter)
                    for letter in targets
                ]
                producer.commit_transaction(30)
            except KafkaException as error:
                self._abort(producer)
                raise DeadLetterError(f"{verb}: {error}") from error
            return actions

    def _one(
        self,
        producer: Producer,
        verb: Verb,
        operator: str,
        reason: str,
        letter: DeadLetter,
    ) -> Action:
        action_id = str(uuid.uuid4())
        produced = None
        if verb == "redrive":
            out = redrive_of(letter, action_id)
            landed: list[Any] = []
            producer.produce(
                out.topic,
                out.value,
                key=out.key,
                partition=out.partition,
                headers=list(out.headers),
                on_delivery=lambda error, message: landed.append((error, message)),
            )
            producer.flush(30)
            if not landed or landed[0][0] is not None:
                raise KafkaException(landed[0][0] if landed else "not delivered")
            message = landed[0][1]
            produced = record_id(message.topic(), message.partition(), message.offset())
        action = Action(
            action_id=action_id,
            at=self.clock(),
            operator=operator,
            verb=verb,
            record=letter.id,
            reason=reason,
            produced=produced,
        )
        producer.produce(
            self.settings.topics.operator_actions,
            action.to_json(),
            key=letter.id.encode(),
        )
        return action

    def record(self, action: Action) -> None:
        """Keep an action that produces nothing itself (a replay's start)."""
        with self._lock:
            producer = self._transactional()
            try:
                producer.begin_transaction()
                producer.produce(
                    self.settings.topics.operator_actions,
                    action.to_json(),
                    key=action.record.encode(),
                )
                producer.commit_transaction(30)
            except KafkaException as error:
                self._abort(producer)
                raise DeadLetterError(f"{action.verb}: {error}") from error

    def _abort(self, producer: Producer) -> None:
        try:
            producer.abort_transaction(30)
        except KafkaException:
            # A producer that cannot abort is dropped; the next action starts a
            # new one, whose transactional id is new (the broker aborts the old).
            self._producer = None

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(10)
            self._producer = None


def _topic_of(record: str | None) -> str:
    if record is None:
        raise ActionRefused(400, "name a record, or a topic and an aggregate id")
    return parse_record_id(record)[0]


def utc_now() -> datetime:
    return datetime.now(UTC)
