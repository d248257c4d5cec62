"""Idempotent provisioning of Streamfold's topics, refusing to run on conflicting ones;
and reading their partitions back (``reader``, ``read_range``, ``KafkaRecord``).

Event topics are the event store: kept forever and never compacted. An aggregate
type's command and event topics share a partition count so that one worker owns
both halves of an aggregate.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

from confluent_kafka import (
    Consumer,
    IsolationLevel,
    KafkaError,
    KafkaException,
    Message,
    TopicCollection,
    TopicPartition,
)

# ConfigResource, NewTopic and OffsetSpec are documented as confluent_kafka.admin's,
# which imports them without re-exporting them explicitly (attr-defined under
# strict), and leaves OffsetSpec untyped.
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    ConfigResource,
    NewTopic,
    OffsetSpec,
)

from app.settings import AGGREGATES, Settings
from app.waiting import Backoff, eventually

FOREVER = {"retention.ms": "-1", "retention.bytes": "-1", "cleanup.policy": "delete"}


class TopicConflict(RuntimeError):
    """An existing topic's settings contradict what Streamfold needs of it."""


class BrokerUnavailable(RuntimeError):
    """The Kafka cluster did not answer in time."""


class AuthenticationFailed(BrokerUnavailable):
    """The cluster refused Streamfold's credentials (never retried unauthenticated)."""


# A partition of a topic: (topic, partition).
TP = tuple[str, int]


@dataclass(frozen=True, slots=True)
class KafkaRecord:
    """One Kafka record as stored, copied out of the client's ``Message``."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    # By name (of a name given twice, the last); a header without a value has None.
    headers: dict[str, bytes | None]

    @classmethod
    def of(cls, message: Message) -> KafkaRecord:
        """The record a consumer handed over (one without an error)."""
        return cls(
            message.topic() or "",
            message.partition() or 0,
            message.offset() or 0,
            message.key(),
            message.value(),
            dict(headers_of(message)),
        )


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)
    # Settings whose value on an existing topic must match exactly.
    enforced: tuple[str, ...] = ()


def required_topics(settings: Settings) -> list[TopicSpec]:
    topics = settings.topics
    # Topics take twice the configured limit, so an oversized command reaches the
    # worker and is dead-lettered with a clear reason instead of vanishing at a producer.
    size = {"max.message.bytes": str(2 * settings.max_message_bytes + 65_536)}
    specs: list[TopicSpec] = []
    for aggregate in AGGREGATES:
        commands, events = topics.commands(aggregate), topics.events(aggregate)
        specs += [
            TopicSpec(commands, settings.partitions, dict(size)),
            TopicSpec(events, settings.partitions, {**FOREVER, **size}, tuple(FOREVER)),
            # The latest state of each aggregate (a cache of the events' fold).
            TopicSpec(
                topics.snapshots(aggregate),
                settings.partitions,
                {"cleanup.policy": "compact", "retention.ms": "-1"},
                ("cleanup.policy",),
            ),
            # Dead letters carry what was refused; losing them would lose input.
            TopicSpec(
                topics.dead_letter(commands), 1, {**FOREVER, **size}, tuple(FOREVER)
            ),
            TopicSpec(
                topics.dead_letter(events), 1, {**FOREVER, **size}, tuple(FOREVER)
            ),
        ]
    specs.append(TopicSpec(topics.results, settings.partitions, dict(size)))
    specs.append(
        TopicSpec(
            topics.schemas,
            1,
            {"cleanup.policy": "compact", "retention.ms": "-1"},
            ("cleanup.policy",),
        )
    )
    return specs


def inbox_topic(settings: Settings) -> str:
    """The saga's inbox: what it reacts to, keyed by order id."""
    return f"{settings.app_id}-saga-inbox"


def state_topic(settings: Settings) -> str:
    """The saga's log: each order's saga state, compacted."""
    return f"{settings.app_id}-saga-state"


def saga_topics(settings: Settings) -> list[TopicSpec]:
    inbox = inbox_topic(settings)
    return [
        TopicSpec(inbox, settings.partitions),
        TopicSpec(f"{inbox}.dlq", 1, dict(FOREVER), tuple(FOREVER)),
        TopicSpec(
            state_topic(settings), settings.partitions, {"cleanup.policy": "compact"}
        ),
    ]


def admin_client(settings: Settings) -> AdminClient:
    # log_level 3: errors only; librdkafka's informational chatter is not for users.
    return AdminClient({**settings.kafka_client_config(), "log_level": 3})


def ensure_topics(
    settings: Settings, specs: list[TopicSpec] | None = None, *, _attempt: int = 0
) -> list[str]:
    """Create missing topics; verify existing ones. Returns the names created."""
    specs = required_topics(settings) if specs is None else specs
    # librdkafka reports why a connection failed only through error_cb; keep it, so
    # a refused password is named as such rather than as a "transport failure".
    seen: list[KafkaError] = []
    config: dict[str, Any] = {
        **settings.kafka_client_config(),
        "log_level": 3,
        "error_cb": seen.append,
    }
    admin = AdminClient(config)
    try:
        metadata = admin.list_topics(timeout=15)
    except KafkaException as error:
        admin.poll(0.5)  # error_cb runs from poll(): collect what was queued
        refused = [e for e in seen if e.code() == KafkaError._AUTHENTICATION]
        if refused:
            raise AuthenticationFailed(
                f"Kafka at {settings.bootstrap_servers} refused the credentials of "
                f"{settings.sasl_username!r} ({settings.sasl_mechanism}): "
                f"{refused[-1].str()}"
            ) from error
        cause = seen[-1].str() if seen else str(error)
        raise BrokerUnavailable(
            f"Kafka at {settings.bootstrap_servers} did not answer: {cause}"
        ) from error
    existing = metadata.topics
    problems: list[str] = []
    to_create = [s for s in specs if s.name not in existing]
    present = [s for s in specs if s.name in existing]
    for spec in present:
        partitions = len(existing[spec.name].partitions)
        if partitions != spec.partitions:
            problems.append(
                f"topic {spec.name} has {partitions} partitions, Streamfold is configured "
                f"for {spec.partitions} (STREAMFOLD_PARTITIONS)"
            )
    if present:
        resources = [ConfigResource(ConfigResource.Type.TOPIC, s.name) for s in present]
        described = admin.describe_configs(resources)
        for spec, resource in zip(present, resources, strict=True):
            actual = described[resource].result(timeout=15)
            for key in spec.enforced:
                value = actual[key].value if key in actual else None
                if value != spec.config[key]:
                    problems.append(
                        f"topic {spec.name} has {key}={value}, Streamfold requires "
                        f"{key}={spec.config[key]}"
                    )
    problems += _co_partitioning(settings, existing, specs)
    if problems:
        raise TopicConflict(
            "refusing to start on conflicting topics:\n  - " + "\n  - ".join(problems)
        )
    raced = False
    created: set[str] = set()
    if to_create:
        futures = admin.create_topics(
            [
                NewTopic(
                    s.name,
                    num_partitions=s.partitions,
                    replication_factor=settings.replication_factor,
                    config=s.config,
                )
                for s in to_create
            ],
            operation_timeout=30,
        )
        for name, future in futures.items():
            try:
                future.result(timeout=30)
                created.add(name)
            except KafkaException as error:
                if "TOPIC_ALREADY_EXISTS" not in str(error):
                    raise
                raced = True
    if raced:
        # Someone created it between our look and our create (or metadata lagged):
        # look again, so its settings are verified rather than assumed.
        if _attempt >= 5:
            raise BrokerUnavailable("topic metadata did not settle after 5 attempts")
        time.sleep(0.2 * (_attempt + 1))
        ensure_topics(settings, specs, _attempt=_attempt + 1)
    # Only what this call created: one that existed already (metadata lagged behind
    # its creation) is not.
    return [s.name for s in to_create if s.name in created]


def _co_partitioning(
    settings: Settings, existing: dict[str, Any], specs: list[TopicSpec]
) -> list[str]:
    wanted = {s.name: s.partitions for s in specs}
    counts = {
        name: len(existing[name].partitions) if name in existing else wanted.get(name)
        for name in wanted
    }
    problems = []
    for aggregate in AGGREGATES:
        commands = settings.topics.commands(aggregate)
        events = settings.topics.events(aggregate)
        for other in (commands, settings.topics.snapshots(aggregate)):
            if counts.get(other) != counts.get(events):
                problems.append(
                    f"{other} has {counts.get(other)} partitions but {events} has "
                    f"{counts.get(events)}; an aggregate's topics must match"
                )
    return problems


# What a broker answers about a topic created a moment ago, until its partitions have
# leaders: asked again, not raised.
SETTLING = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError._UNKNOWN_TOPIC,
    }
)


def partitions_of(consumer: Any, topic: str, timeout: float = 30.0) -> list[int]:
    """The partitions of ``topic``, once the broker knows them (see ``SETTLING``)."""
    deadline = time.monotonic() + timeout
    while True:
        metadata = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        error = None if metadata is None else metadata.error
        if metadata is not None and error is None and metadata.partitions:
            return sorted(metadata.partitions)
        if (error is not None and error.code() not in SETTLING) or (
            time.monotonic() >= deadline
        ):
            raise KafkaException(error or f"topic {topic} has no partitions")
        time.sleep(0.2)


def topic_ids(
    settings: Settings, names: Iterable[str], timeout: float = 120.0
) -> dict[str, str]:
    """Each topic's id: what tells a topic from one deleted and created again under
    its name, whose offsets start over. Waits for the broker and for a topic created
    a moment ago (see ``SETTLING``)."""
    admin = admin_client(settings)
    wanted = sorted(set(names))
    deadline = time.monotonic() + timeout
    pauses = Backoff(0.2, 5.0)
    while True:
        try:
            described = admin.describe_topics(
                TopicCollection(wanted), request_timeout=30
            )
            return {name: str(f.result().topic_id) for name, f in described.items()}
        except KafkaException as error:
            code = error.args[0].code() if error.args else None
            waiting = code in SETTLING or code in (
                KafkaError._TIMED_OUT,
                KafkaError._TRANSPORT,
            )
            if not waiting or time.monotonic() >= deadline:
                raise
            time.sleep(pauses.next())


def end_offsets(consumer: Any, topic: str) -> dict[int, int]:
    """Each partition's end (high watermark), once the topic has leaders."""
    return {
        p: watermarks(consumer, topic, p)[1] for p in partitions_of(consumer, topic)
    }


def init_transactions(producer: Any, topic: str, timeout: float) -> None:
    """``producer.init_transactions``, once a broker known by its id has answered a
    metadata request for ``topic`` (one that exists).

    librdkafka 2.16 drops its bootstrap connection as soon as metadata names the
    broker behind it. A producer id asked for at that moment finds no broker up,
    and the request waits for a fixed 500 ms timer: measured, one of two producers
    started together, and most write processes started after a worker restart.
    Asked for once a named broker has answered, it comes in a few milliseconds."""
    for _ in range(METADATA_TRIES):
        if producer.list_topics(topic, timeout=timeout).orig_broker_id >= 0:
            break
    producer.init_transactions(timeout)


# Metadata requests before a producer id (see ``init_transactions``): the first
# is answered by the bootstrap connection, the next by the broker it named.
METADATA_TRIES = 3


def describe(consumer: Any, topics: Iterable[str]) -> None:
    """Ask for ``topics``' metadata, before assigning partitions of them to
    ``consumer``: librdkafka fetches nothing from a partition of a topic it has no
    metadata for until its next scan of unknown topics, about once a second
    (measured: 0.1-1.0 s of a restarted write process's catch-up)."""
    for topic in topics:
        consumer.list_topics(topic, timeout=30)


def watermarks(
    consumer: Any, topic: str, partition: int, timeout: float = 30.0
) -> tuple[int, int]:
    """One partition's (low, high) offsets, once it has a leader (see ``SETTLING``)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=timeout
            )
            return int(low), int(high)
        except KafkaException as error:
            code = error.args[0].code() if error.args else None
            if code not in SETTLING or time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


def stable_ends(settings: Settings, topics: list[str]) -> dict[TP, int]:
    """Each partition's last stable offset: the end a read_committed reader sees
    (an open transaction's records lie above it)."""
    return _ends(settings, topics, IsolationLevel.READ_COMMITTED)


def log_ends(settings: Settings, topics: list[str]) -> dict[TP, int]:
    """Each partition's log end, open transactions' records included: records that
    other producers committed after a transaction still open began lie between the
    last stable offset and here."""
    return _ends(settings, topics, IsolationLevel.READ_UNCOMMITTED)


def _ends(
    settings: Settings, topics: list[str], isolation: IsolationLevel
) -> dict[TP, int]:
    admin = admin_client(settings)
    wanted = {
        TopicPartition(topic, partition): OffsetSpec.latest()  # type: ignore[no-untyped-call]
        for topic in topics
        for partition in partitions_of(admin, topic)
    }
    futures = admin.list_offsets(wanted, isolation_level=isolation, request_timeout=30)
    return {
        (tp.topic, tp.partition): int(future.result().offset)
        for tp, future in futures.items()
    }


# The longest a transaction of Streamfold's stays open (the processor's
# transaction timeout) and a margin for the broker's abort of it.
OPEN_TRANSACTION_WAIT_S = 15.0


class Stalled(KafkaException):
    """A partition stopped short of the offset it was read to."""


def read_range(
    consumer: Consumer,
    topic: str,
    partition: int,
    start: int,
    end: int,
    wait_s: float = OPEN_TRANSACTION_WAIT_S,
    *,
    stop_at_open: bool = True,
) -> Iterator[Message]:
    """The records a read_committed ``consumer`` (assigned here) finds in
    ``[start, end)`` of one partition, in offset order.

    It reads on past a transaction still open there: Kafka writes a transaction's
    markers partition by partition, so a record elsewhere can be readable a moment
    before this one is. After ``wait_s`` without progress it stops if it reached the
    last stable offset (a transaction left open, which the broker will abort) and
    raises ``Stalled`` if it never did (or, without ``stop_at_open``, either way)."""
    if start >= end:
        return
    tp = TopicPartition(topic, partition, start)
    describe(consumer, [topic])
    consumer.assign([tp])
    deadline = time.monotonic() + wait_s
    at_end = False  # the last stable offset was reached once
    while True:
        message = consumer.poll(0.2)
        error = None if message is None else message.error()
        if message is None or error is not None:
            if error is not None and error.code() != KafkaError._PARTITION_EOF:
                raise KafkaException(error)
            at_end = at_end or error is not None
            [at] = consumer.position([tp])
            # Before the first fetch the position is unknown (negative); the end
            # reported is where a read_committed reader stands.
            reported = message.offset() if message is not None else None
            reached = max(at.offset, -1 if reported is None else reported)
            if reached >= end:
                return
            if time.monotonic() > deadline:
                if at_end and stop_at_open:
                    return
                raise Stalled(
                    KafkaError(
                        KafkaError._TIMED_OUT,
                        f"{topic}[{partition}] stalled before {end}",
                    )
                )
            continue
        yield message
        if (message.offset() or 0) + 1 >= end:
            return
        deadline = time.monotonic() + wait_s


def read_topic(
    settings: Settings, topic: str, purpose: str, *, to_log_end: bool = True
) -> Iterator[Message]:
    """Every committed record of ``topic``, partition by partition, in offset order,
    as a read_committed reader (``reader``) finds them (blocking), one at a time.

    ``to_log_end``: every record committed when it was called: up to each
    partition's log end, waiting for a transaction open there to end (``Stalled``
    if it does not). A read_committed consumer is told its high watermark as the
    last stable offset, which stays below a committed transaction until its markers
    reach the partition, and below what other producers committed after a
    transaction still open began: a reader stopping there misses those. Otherwise
    up to that last stable offset, stopping at a transaction left open there."""
    consumer = reader(settings, purpose)
    try:
        ends = log_ends(settings, [topic]) if to_log_end else {}
        for partition in partitions_of(consumer, topic):
            low, high = watermarks(consumer, topic, partition)
            end = ends.get((topic, partition), high)
            yield from read_range(
                consumer, topic, partition, low, end, stop_at_open=not to_log_end
            )
    finally:
        consumer.close()


def read_to_end(
    consumer: Consumer, deadline: float, poll_s: float
) -> Iterator[Message]:
    """The records ``consumer`` finds in its assigned partition until it reports the
    partition's end; raises ``TimeoutError`` at ``deadline`` (``time.monotonic()``)
    and ``KafkaException`` on a consumer error."""
    while time.monotonic() < deadline:
        message = consumer.poll(poll_s)
        if message is None:
            continue
        error = message.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                return
            raise KafkaException(error)
        yield message
    raise TimeoutError


def take(consumer: Consumer, most: int, timeout: float) -> list[Message]:
    """The next records: the first as soon as it arrives (none after ``timeout``),
    with whatever is queued behind it, up to ``most``. librdkafka's
    ``consume(most, timeout)`` alone waits out its timeout unless ``most`` arrive:
    the whole timeout on every record of a trickle."""
    first = consumer.poll(timeout)
    if first is None:
        return []
    return [first, *consumer.consume(most - 1, 0)]


def headers_of(message: Message) -> list[tuple[str, bytes | None]]:
    """A consumed record's headers, in order (a header without a value has None)."""
    # What a consumer hands over is always such a list; the stub's type is the wider
    # one produce() accepts (a dict, or str values).
    return cast(list[tuple[str, bytes | None]], message.headers() or [])


def source_of(message: Message) -> tuple[str, int, int]:
    """Where a consumed record was read: topic, partition, offset."""
    return (message.topic() or "", message.partition() or 0, message.offset() or 0)


# How long a new assignment's committed offsets are asked for, and the answers
# worth asking again: the group's coordinator moved or is loading (a broker
# restart), or the broker is away for a moment.
LOOKUP_S = 30.0
COORDINATOR_MOVING = {
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError._TRANSPORT,
    KafkaError._TIMED_OUT,
}


def committed_offsets(
    consumer: Consumer,
    partitions: list[TopicPartition],
    timeout: float | None = None,
) -> list[TopicPartition]:
    """The group's committed offsets of ``partitions`` (-1001 where none), asked
    again while the coordinator moves, for up to ``timeout`` seconds (``LOOKUP_S``);
    any failure raises ``KafkaException``. librdkafka asks once on NOT_COORDINATOR,
    and waits out its timeout on offsets a transaction holds, without saying so
    (then "Timed out")."""
    if not partitions:
        return []  # asks nothing, but would wait for a coordinator first
    timeout = LOOKUP_S if timeout is None else timeout

    def ask() -> list[TopicPartition] | KafkaError:
        try:
            found = consumer.committed(partitions, min(timeout, 10.0))
        except KafkaException as error:
            failure: KafkaError = error.args[0]
            return failure
        return next((tp.error for tp in found if tp.error is not None), found)

    def settled(answer: list[TopicPartition] | KafkaError) -> bool:
        return not isinstance(answer, KafkaError) or not (
            answer.retriable() or answer.code() in COORDINATOR_MOVING
        )

    answer = eventually(ask, settled, timeout=timeout, every=Backoff(0.1, 2.0))
    if isinstance(answer, KafkaError):
        raise KafkaException(answer)
    return answer


def reader(settings: Settings, purpose: str, *, tailing: bool = False) -> Consumer:
    """A consumer for reading partitions by assignment (no group membership, no
    commits), read_committed, that reports each partition's end.

    A read that ends at a partition's end leaves a fetch there, which the broker
    holds for ``fetch.wait.max.ms``, and the next assignment waits for it: 1.5 s
    per partition read one after the other at librdkafka's 500 ms, 45 ms at 10 ms
    (a write process restoring 4 partitions from their snapshots). A ``tailing``
    reader, which waits at the end for what comes next, keeps the long poll."""
    return Consumer(
        {
            **settings.consumer_config(),
            "group.id": f"{settings.app_id}.{purpose}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 500 if tailing else 10,
        }
    )


def records_of_key(
    settings: Settings, topic: str, partition: int, key: bytes, end: int
) -> list[bytes]:
    """The values of the committed records keyed ``key`` in ``[0, end)`` of one
    partition, in order (blocking: it reads the partition from its start)."""
    consumer = reader(settings, "records-of-key")
    try:
        low, _ = watermarks(consumer, topic, partition)
        return [
            message.value() or b""
            for message in read_range(consumer, topic, partition, low, end)
            if message.key() == key
        ]
    finally:
        consumer.close()


def records_at(
    settings: Settings, topic: str, partition: int, offsets: set[int]
) -> dict[int, KafkaRecord]:
    """The committed records at ``offsets`` of one partition, by offset (blocking).
    Near offsets are read in one pass; far ones each on their own."""
    consumer = reader(settings, "records-at")
    found: dict[int, KafkaRecord] = {}
    try:
        ordered = sorted(offsets)
        runs: list[tuple[int, int]] = []
        for offset in ordered:
            if runs and offset - runs[-1][1] <= RUN_GAP:
                runs[-1] = (runs[-1][0], offset)
            else:
                runs.append((offset, offset))
        for first, last in runs:
            for message in read_range(consumer, topic, partition, first, last + 1):
                if (message.offset() or 0) in offsets:
                    found[message.offset() or 0] = KafkaRecord.of(message)
    finally:
        consumer.close()
    return found


class GroupOffsets:
    """A consumer group's committed offsets and the partitions' heads, read without
    joining the group (blocking; one caller at a time)."""

    def __init__(self, settings: Settings, group: str) -> None:
        self._consumer = Consumer(
            {
                **settings.consumer_config(),
                "group.id": group,
                "enable.auto.commit": False,
            }
        )

    def read(self, partitions: list[TP]) -> dict[TP, tuple[int | None, int]]:
        """Per partition: (committed offset or None, high watermark)."""
        found: dict[TP, tuple[int | None, int]] = {}
        if not partitions:
            return found
        try:
            committed = self._consumer.committed(
                [TopicPartition(t, p) for t, p in partitions], timeout=10
            )
            for tp in committed:
                _, high = self._consumer.get_watermark_offsets(
                    TopicPartition(tp.topic, tp.partition), timeout=10
                )
                found[(tp.topic, tp.partition)] = (
                    tp.offset if tp.offset >= 0 else None,
                    int(high),
                )
        except KafkaException:
            # Unknown this round; the next read asks again.
            return {}
        return found

    def close(self) -> None:
        self._consumer.close()


# Offsets closer than this are read in one pass by ``records_at``.
RUN_GAP = 500


def record_end(
    settings: Settings, topic: str, partition: int, low: int, high: int
) -> int:
    """One past the last record a read_committed reader finds in ``[low, high)``.

    The high watermark counts the markers that Kafka transactions leave (one per
    partition a transaction wrote, after its records), so a reader that has taken
    every record still sits below it. Blocking; reads the partition's tail."""
    if high <= low:
        return high
    consumer = reader(settings, "record-end")
    try:
        window = 16
        while True:
            start = max(low, high - window)
            consumer.assign([TopicPartition(topic, partition, start)])
            last = None
            # Past the deadline the tail read so far stands.
            with contextlib.suppress(TimeoutError):
                for message in read_to_end(consumer, time.monotonic() + 30, 1.0):
                    offset = message.offset() or 0
                    if offset >= high:
                        break
                    last = offset
            if last is not None:
                return last + 1
            if start == low:
                return low
            window *= 8
    finally:
        consumer.close()
