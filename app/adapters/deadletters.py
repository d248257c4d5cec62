"""The dead-letter topics and the operators' actions on them, in Kafka: reading
every dead letter, and re-driving or discarding one in a Kafka transaction together
with the record of the action (``<prefix>operator-actions``, kept for ever)."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from app.adapters.processor import TRANSACTION_TIMEOUT_MS
from app.adapters.topics import (
    FOREVER,
    Stalled,
    TopicSpec,
    admin_client,
    ensure_topics,
    headers_of,
    inbox_topic,
    init_transactions,
    read_topic,
)
from app.deadletters import (
    Action,
    ActionRefused,
    DeadLetter,
    Overview,
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


def _read(
    settings: Settings, topic: str, purpose: str, *, whole: bool = False
) -> list[Message]:
    """Every committed record of ``topic``. ``whole``: every record committed when
    it was called (read up to the log's end, past any transaction open there once
    it ends), or ``DeadLetterError``."""
    try:
        return list(read_topic(settings, topic, purpose, to_log_end=whole))
    except Stalled as error:
        raise DeadLetterError(
            f"reading {topic}: a transaction is still open there; try again"
        ) from error
    except KafkaException as error:
        raise DeadLetterError(f"reading {topic}: {error}") from error


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


def read_overview(settings: Settings) -> Overview:
    """Every dead letter of the dead-letter topics that exist, with every action
    committed before the call (one just taken shows its letter no longer open), or
    ``DeadLetterError`` while a transaction stays open on the actions."""
    topics = existing_topics(settings)
    letters = read_dead_letters(settings, topics)
    actions = read_actions(settings, whole=True)
    return Overview(topics, letters, actions)


def ensure_actions_topic(settings: Settings) -> None:
    ensure_topics(
        settings,
        [TopicSpec(settings.topics.operator_actions, 1, dict(FOREVER), tuple(FOREVER))],
    )


def read_actions(settings: Settings, *, whole: bool = False) -> list[Action]:
    """Every operator action, oldest first (none before the first: the topic is
    made by the first action, not by reading). ``whole``: every action committed
    when it was called, or ``DeadLetterError``."""
    try:
        present = admin_client(settings).list_topics(timeout=30).topics
    except KafkaException as error:
        raise DeadLetterError(f"listing topics: {error}") from error
    if settings.topics.operator_actions not in present:
        return []
    return [
        Action.from_json(message.value() or b"{}")
        for message in _read(
            settings, settings.topics.operator_actions, "console", whole=whole
        )
    ]


# What a producer reports when another with its transactional id took over.
FENCED = frozenset(
    {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH}
)


class Raced(ActionRefused):
    """Another process acted on the same dead-letter topic meanwhile (its producer
    fenced this one's): nothing was produced."""

    def __init__(self) -> None:
        super().__init__(
            409,
            "another operator acted on this dead-letter topic at the same time; "
            "nothing was done, look again",
        )


def transactional_id(settings: Settings, topic: str) -> str:
    """The one transactional id of every action on dead-letter ``topic``, in every
    process: a new producer with it fences the one before (see ``Operations``)."""
    return f"{settings.app_id}-operator-{topic}"


class Operations:
    """Re-drives and discards, each in one Kafka transaction with its action record:
    a re-driven record is never without the action that produced it, nor the other
    way round.

    Actions on one dead-letter topic are serialised across processes by Kafka's
    fencing: each starts a producer with the topic's transactional id
    (``transactional_id``) before it checks that its records are open. Starting it
    completes the transaction of any earlier producer with that id (a commit under
    way is finished, an open one aborted) and fences that producer, so the actions
    read next hold every action ever committed on the topic, and a producer started
    in between makes this one's commit fail: then nothing was produced, and the action
    is refused (409, ``Raced``). Within a process, one action at a time."""

    def __init__(self, settings: Settings, clock: Callable[[], datetime]) -> None:
        self.settings = settings
        self.clock = clock
        self._lock = threading.Lock()
        self._topic_made = False

    @contextlib.contextmanager
    def _transactional(self, transactional: str) -> Iterator[Producer]:
        """A producer with transactions initialised under ``transactional`` (any
        earlier one with that id is fenced and its transaction ended), closed after."""
        if not self._topic_made:
            ensure_actions_topic(self.settings)
            self._topic_made = True
        producer = Producer(
            {
                **self.settings.producer_config(),
                "transactional.id": transactional,
                "transaction.timeout.ms": TRANSACTION_TIMEOUT_MS,
            }
        )
        try:
            init_transactions(producer, self.settings.topics.operator_actions, 30)
        except KafkaException as error:
            producer.close()
            raise DeadLetterError(f"starting a transaction: {error}") from error
        try:
            yield producer
        except Raced:
            # Fenced: its successor ended its transaction; close() would only try
            # to abort it again (and warn). Dropped instead.
            raise
        except BaseException:
            producer.close()
            raise
        producer.close()

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
        actions recorded. Raises ``ActionRefused`` for a record not open (``Raced``
        when another process acted on the topic meanwhile), and ``DeadLetterError``
        when Kafka failed (then nothing was done)."""
        if verb == "discard" and record is None:
            raise ActionRefused(400, "a discard names one record")
        named = topic if topic is not None else _topic_of(record)
        if named not in existing_topics(self.settings):
            raise ActionRefused(
                404, f"{named} is not a dead-letter topic of this deployment"
            )
        # The producer first, then the check: see the class's docstring.
        with (
            self._lock,
            self._transactional(transactional_id(self.settings, named)) as producer,
        ):
            letters = read_dead_letters(self.settings, [named])
            decided = standings(read_actions(self.settings, whole=True))
            targets = chosen(
                letters, decided, record=record, topic=topic, aggregate_id=aggregate_id
            )
            return self._commit(
                producer,
                verb,
                lambda: [
                    self._one(producer, verb, operator, reason, letter)
                    for letter in targets
                ],
            )

    def _commit(
        self, producer: Producer, verb: Verb, produce: Callable[[], list[Action]]
    ) -> list[Action]:
        """What ``produce`` produces, in one transaction; its actions once committed."""
        try:
            producer.begin_transaction()
            actions = produce()
            producer.commit_transaction(30)
            return actions
        except KafkaException as error:
            if _fenced(error):
                raise Raced() from error
            with contextlib.suppress(KafkaException):
                producer.abort_transaction(30)
            raise DeadLetterError(f"{verb}: {error}") from error

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
            _flush(producer)
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
        """Keep an action that produces nothing itself (a replay's start). Nothing
        is checked first, so no other process need be fenced: the transactional id
        is the action's own."""
        with (
            self._lock,
            self._transactional(
                f"{self.settings.app_id}-operator-{action.action_id}"
            ) as producer,
        ):
            self._commit(producer, action.verb, lambda: [self._keep(producer, action)])

    def _keep(self, producer: Producer, action: Action) -> Action:
        producer.produce(
            self.settings.topics.operator_actions,
            action.to_json(),
            key=action.record.encode(),
        )
        return action

    def close(self) -> None:
        """Nothing is held between actions: each has a producer of its own."""


def _flush(producer: Producer) -> None:
    try:
        producer.flush(30)
    except SystemError as error:
        # A producer fenced meanwhile raises the fatal KafkaException from flush()
        # while it runs the delivery callback, which then surfaces as a SystemError
        # chained to it (confluent-kafka 2.16): the KafkaException is the answer.
        if isinstance(error.__cause__, KafkaException):
            raise error.__cause__ from None
        raise


def _fenced(error: KafkaException) -> bool:
    found = error.args[0] if error.args else None
    return isinstance(found, KafkaError) and found.code() in FENCED


def _topic_of(record: str | None) -> str:
    if record is None:
        raise ActionRefused(400, "name a record, or a topic and an aggregate id")
    return parse_record_id(record)[0]


def utc_now() -> datetime:
    return datetime.now(UTC)
