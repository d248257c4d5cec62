"""The transactional processor: consume, handle, produce and commit, exactly once.

One consumer in a group (``read_committed``, no auto-commit, cooperative-sticky
assignment) and one transactional producer (EOS v2, KIP-447). Per batch: begin the
transaction, hand each message to the handler of its topic (which adds outputs and
changes its state only provisionally), send the input offsets with the consumer's
group metadata, commit. The outputs, the input offsets and so the state they imply
commit together or not at all, and a zombie (a paused process whose partitions
moved on) is fenced by the group's generation.

Any failure aborts the batch: the handlers drop what it changed, the consumer goes
back to the group's committed offsets, and each handler catches up from its log
before it decides again. The processor reads nothing back, probes nothing and keeps
no position of its own beside Kafka's offsets (the command handlers note, with their
states, the last input they took: ``runtime.CommandHandler``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypedDict

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from app.adapters.codec import Headers, RegistryUnavailable
from app.adapters.topics import (
    LOOKUP_S,
    TP,
    committed_offsets,
    init_transactions,
    take,
)
from app.settings import Settings
from app.waiting import Backoff

log = logging.getLogger("streamfold.processor")

# Failures that abort a batch and retry it, never skip it.
TRANSIENT = (KafkaException, RegistryUnavailable, OSError, TimeoutError)
# How long the broker lets a transaction stay open before aborting it: a process
# killed mid-batch holds read_committed readers of its partitions back this long
# unless it restarts first (its transactional id then aborts it at once).
TRANSACTION_TIMEOUT_MS = 10_000


# How long a transactional call may block before the process counts as stuck:
# librdkafka was seen to hang in send_offsets_to_transaction past its timeout
# after a broker restart, while the consumer's group rejoined. The call is made on
# the processor's own thread (a thread per call cost one command at a time 1.4-3 ms
# of its 12-18 ms); its deadline is watched from outside (``Processor.stuck``).
CALL_LIMIT_S = 60.0
# Sending the offsets waits no longer than the broker keeps the transaction open:
# past that the broker has aborted it, and only new clients get anywhere.
OFFSETS_TIMEOUT_S = TRANSACTION_TIMEOUT_MS / 1000
OFFSETS_LIMIT_S = OFFSETS_TIMEOUT_S + 5


@dataclass(slots=True)
class Sent:
    """One output of a batch; ``offset`` is known once the broker has it."""

    topic: str
    partition: int = -1
    offset: int = -1


class Reading(Protocol):
    """How far the processor has read a partition of its input: what a timer asks
    before it acts on something whose answer may still be on its way."""

    def position(self, tp: TP) -> int | None:
        """The next offset the processor takes; None when it is not known (a
        partition assigned with nothing committed, until a record comes)."""
        ...

    def end(self, tp: TP) -> int | None:
        """The partition's end for a read_committed reader (its last stable
        offset) now; None when the broker does not say."""
        ...


# How long a timer waits for the broker to say where a partition ends.
END_LOOKUP_S = 1.0


class ConsumerReading:
    """``Reading`` of the processor's consumer; ``committed`` holds the group's
    committed offsets of the partitions it owns, where the consumer was assigned
    or rewound to."""

    def __init__(self, consumer: Consumer, committed: Mapping[TP, int]) -> None:
        self.consumer = consumer
        self.committed = committed

    def position(self, tp: TP) -> int | None:
        [found] = self.consumer.position([TopicPartition(*tp)])
        if found.offset >= 0:
            return int(found.offset)
        # librdkafka knows no position after an assignment or a seek until it hands
        # over a record: a partition read to its end stays unknown for good, so the
        # offset it was assigned or rewound to (the committed one) stands for it.
        return self.committed.get(tp)

    def end(self, tp: TP) -> int | None:
        # Asked of the broker, not the consumer's cache: a partition just taken
        # back may still have its end from before.
        try:
            found = self.consumer.get_watermark_offsets(
                TopicPartition(*tp), timeout=END_LOOKUP_S
            )
        except KafkaException as error:
            log.info("the end of %s[%d] is not known now: %s", *tp, error)
            return None
        return None if found is None or found[1] < 0 else int(found[1])


class Batch:
    """What one transaction writes. Outputs are produced as they are added; work that
    needs the positions of earlier outputs (a result naming its events' offsets) is
    registered with ``later`` and runs once those are acknowledged, still inside the
    transaction. ``reading`` says how far the input is read (for timers)."""

    def __init__(self, producer: Producer, reading: Reading) -> None:
        self._producer = producer
        self.reading = reading
        self._later: list[Callable[[], None]] = []
        self.size = 0
        self.begun = False

    def begin(self) -> None:
        """Open the transaction (done by the first output): an idle loop opens none."""
        if not self.begun:
            self._producer.begin_transaction()
            self.begun = True

    def send(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        partition: int | None = None,
        headers: Headers | None = None,
        timestamp_ms: int = 0,
        track: bool = False,
    ) -> Sent | None:
        """Produce one output in this transaction; with ``track``, the returned
        ``Sent`` gets its partition and offset once the broker has it."""
        sent = Sent(topic) if track else None
        kwargs: _Produce = {"key": key, "headers": headers}
        if partition is not None:
            kwargs["partition"] = partition
        if timestamp_ms:
            kwargs["timestamp"] = timestamp_ms
        if sent is not None:
            kwargs["on_delivery"] = _recorder(sent)
        self.begin()
        while True:
            try:
                self._producer.produce(topic, value, **kwargs)
                break
            except BufferError:  # the local queue is full: let it drain
                self._producer.poll(0.05)
        self.size += 1
        return sent

    def later(self, work: Callable[[], None]) -> None:
        self._later.append(work)

    def settle(self, timeout: float = 30.0) -> None:
        """Run the work registered with ``later`` once every output so far is
        acknowledged (the transaction stays open)."""
        if not self._later:
            return
        if self._producer.flush(timeout) > 0:
            raise KafkaException(
                KafkaError(KafkaError._TIMED_OUT, "outputs not acknowledged in time")
            )
        work, self._later = self._later, []
        for step in work:
            step()


class _Produce(TypedDict, total=False):
    """What ``Batch.send`` passes to ``Producer.produce`` besides topic and value;
    the optional ones only when set, so librdkafka's defaults apply otherwise."""

    key: bytes | None
    headers: Headers | None
    partition: int
    timestamp: int
    on_delivery: Callable[[KafkaError | None, Message], None]


def _recorder(sent: Sent) -> Callable[[KafkaError | None, Message], None]:
    def delivered(error: KafkaError | None, message: Message) -> None:
        if error is None:
            sent.partition = message.partition() or 0
            sent.offset = message.offset() or 0

    return delivered


class Handler(Protocol):
    """What the processor runs per topic. ``handle`` may add outputs to the batch
    and change state provisionally (``prepare`` comes first, with the partitions
    the batch holds, before anything is produced: catch up there); ``committed``
    makes that state the handler's,
    ``aborted`` drops it (the handler then catches up from its log before deciding
    again). Rebalance calls come between batches."""

    @property
    def topics(self) -> tuple[str, ...]: ...

    def prepare(self, partitions: set[TP]) -> None: ...
    def assigned(self, partitions: Sequence[TP]) -> None: ...
    def revoked(self, partitions: Sequence[TP]) -> None: ...
    def handle(self, message: Message, batch: Batch) -> None: ...
    def tick(self, batch: Batch) -> None: ...
    def committed(self) -> None: ...
    def aborted(self) -> None: ...


class Ownership:
    """The partitions (numbers) a log-derived handler owns, and those it must catch
    up from its log before their next decision: one taken over, or every one
    after an abort (what the aborted batch did is uncertain until read back)."""

    def __init__(self) -> None:
        self.owned: set[int] = set()
        self.stale: set[int] = set()

    def take(self, partitions: Sequence[TP]) -> list[int]:
        taken = [p for _, p in partitions]
        self.owned.update(taken)
        self.stale.update(taken)
        return taken

    def give_up(self, partitions: Sequence[TP]) -> list[int]:
        given = [p for _, p in partitions]
        self.owned.difference_update(given)
        self.stale.difference_update(given)
        return given

    def doubt(self) -> None:
        self.stale |= self.owned


@dataclass(slots=True)
class Report:
    """What a processor tells its supervisor: the partitions it owns, batches done."""

    assigned: set[TP] = field(default_factory=set)
    batches: int = 0
    messages: int = 0
    aborts: int = 0
    # Lookups of committed offsets that stayed held and were answered by the
    # offsets the group has (see ``Processor.replays_safely``).
    held_lookups: int = 0
    last_error: str | None = None
    # The transactional call in progress, and when it counts as stuck.
    calling: tuple[str, float] | None = None


class Processor:
    """Runs ``handlers`` on their topics in consumer group ``group`` until stopped."""

    def __init__(
        self,
        settings: Settings,
        *,
        group: str,
        transactional_id: str,
        handlers: Sequence[Handler],
        batch_size: int = 500,
        poll_timeout: float = 0.05,
        replays_safely: bool = False,
    ) -> None:
        """``replays_safely``: the handlers write nothing for input they took before,
        and nothing a client waits for (the saga's feed, whose copies the saga
        recognises), so the processor may start a partition from the offsets the
        group has when a hanging transaction holds newer ones
        (``_committed_offsets``; why the command processor waits instead:
        ``writer.build``)."""
        self.settings = settings
        self.replays_safely = replays_safely
        self.group = group
        self.transactional_id = transactional_id
        self.handlers = list(handlers)
        self.routes = {t: h for h in self.handlers for t in h.topics}
        self.batch_size = batch_size
        self.poll_timeout = poll_timeout
        self.report = Report()
        self._backoff = Backoff(0.1, 5.0)
        # Per partition, the offset last committed here; when idle, the consumer's
        # position can move past it over transaction markers only.
        self._committed: dict[TP, int] = {}
        self._idle_check = 0.0

    def consumer_config(self) -> dict[str, object]:
        session_ms = int(self.settings.session_timeout_s * 1000)
        return {
            **self.settings.kafka_client_config(),
            "group.id": self.group,
            # Static membership (KIP-345) under the transactional id: a process
            # restarted in its slot takes its partitions back at once instead of
            # after the dead one's session. A consumer fenced by its own earlier
            # join (librdkafka makes that fatal, e.g. after a broker restart) is
            # replaced by a new one, which takes the id over (see ``_abort``).
            "group.instance.id": self.transactional_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "partition.assignment.strategy": "cooperative-sticky",
            # A long poll: the broker answers a fetch as soon as a record (or a
            # transaction's marker) arrives, so this only bounds an idle one. At
            # 10 ms an idle worker cost the broker 13% of a core, at 500 ms 0-2%,
            # with send() p50 the same (11 ms).
            "fetch.wait.max.ms": 500,
            "session.timeout.ms": session_ms,
            "heartbeat.interval.ms": max(session_ms // 10, 500),
            # A partition taken over is folded from its log before its first
            # command: that may take a while on a long log.
            "max.poll.interval.ms": max(2 * session_ms, 300_000),
        }

    def producer_config(self) -> dict[str, object]:
        return {
            **self.settings.producer_config(),
            "transactional.id": self.transactional_id,
            "transaction.timeout.ms": TRANSACTION_TIMEOUT_MS,
            "linger.ms": 1,
            "partitioner": "murmur2_random",
            "queue.buffering.max.messages": 1_000_000,
            # A batch that begins right after the last one committed finds that
            # transaction still completing on its coordinator, which answers
            # AddOffsetsToTxn with CONCURRENT_TRANSACTIONS; librdkafka retries that
            # after retry.backoff.ms (100 ms by default; it waits 20 ms for
            # AddPartitionsToTxn). At 1,000 commands/s 4% of the transactions
            # waited so, and end to end p99 went from 256 to 133 ms at 10 ms.
            "retry.backoff.ms": 10,
        }

    def run(self, stop: threading.Event) -> None:
        """Process until ``stop`` is set; a fenced or failed client is replaced."""
        backoff = Backoff(0.5, 10.0)
        while not stop.is_set():
            began, batches = time.monotonic(), self.report.batches
            try:
                self._run(stop)
                return
            except TRANSIENT as error:
                self.report.last_error = str(error)
                if self.report.batches > batches:
                    # Clients that got work done were fine: what failed them (a
                    # broker restart fences the producer) is no run of failures.
                    backoff.reset()
                delay = backoff.after(time.monotonic() - began)
                log.warning("%s: %s; starting again in %.1fs", self.group, error, delay)
            stop.wait(delay)

    def _run(self, stop: threading.Event) -> None:
        producer = Producer(self.producer_config())
        began = time.monotonic()
        # Aborts whatever an earlier incarnation with this id left open.
        init_transactions(producer, next(iter(self.routes)), 60)
        log.info(
            "%s: transactions initialised in %.2fs",
            self.group,
            time.monotonic() - began,
        )
        consumer = Consumer(self.consumer_config())
        try:
            consumer.subscribe(
                list(self.routes),
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_revoke,
            )
            while not stop.is_set():
                taken = take(consumer, self.batch_size, self.poll_timeout)
                self._transact(consumer, producer, self.still_mine(taken))
        finally:
            self.report.assigned.clear()
            for handler in self.handlers:
                handler.aborted()
            try:
                consumer.close()
            except KafkaException as error:  # leaving the group is best effort
                log.info("%s: closing the consumer: %s", self.group, error)

    def still_mine(self, messages: list[Message]) -> list[Message]:
        """``messages`` less those of partitions no longer assigned: a record polled
        before a rebalance that took its partition away (in ``take``'s second call)
        is the next owner's, and deciding it here too would answer it twice (the
        broker takes offsets from a member of the group's generation whatever it
        was assigned)."""
        assigned = self.report.assigned
        return [
            m
            for m in messages
            if m.error() is not None
            or (m.topic() or "", m.partition() or 0) in assigned
        ]

    def _transact(
        self, consumer: Consumer, producer: Producer, messages: list[Message]
    ) -> None:
        batch = Batch(producer, ConsumerReading(consumer, self._committed))
        # Where each partition's part of the batch begins, known before any is
        # handled: a failure rewinds every partition the batch holds.
        starts: dict[TP, int] = {}
        for message in messages:
            if message.error() is None:
                tp = (message.topic() or "", message.partition() or 0)
                starts.setdefault(tp, message.offset() or 0)
        ends: dict[TP, int] = {}
        try:
            for handler in self.handlers:
                handler.prepare({tp for tp in starts if tp[0] in handler.topics})
            for message in messages:
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise KafkaException(error)
                tp = (message.topic() or "", message.partition() or 0)
                ends[tp] = (message.offset() or 0) + 1
                self.routes[tp[0]].handle(message, batch)
            for handler in self.handlers:
                handler.tick(batch)
            # A batch that wrote nothing opens no transaction: taken again after a
            # crash it writes nothing again, so its offsets can wait for the idle
            # commit (at most a second). The saga's feed reads every event and
            # result and acts on few: one transaction each cost the broker more
            # than the command's own.
            idle = not batch.size
            if not idle:
                self._past_markers(consumer, ends)
                # Also a batch of timers' work only: the offsets (as committed) are
                # what fences a zombie's transaction. Sent before the outputs are
                # settled: the two round trips overlap.
                offsets = ends or self._owned_committed(consumer)
                if offsets:
                    self._send_offsets(consumer, producer, offsets)
                batch.settle()
                self._commit(producer)
        except TRANSIENT as failure:
            self._abort(producer, failure, len(messages), batch.begun)
            self._rewind(consumer, starts)
            time.sleep(self._backoff.next())
            return
        self._backoff.reset()
        if not idle:
            self._committed.update(ends)
        if messages or not idle:
            for handler in self.handlers:
                handler.committed()
        if idle:
            self._pass_markers(consumer, producer)
        if messages:
            self.report.batches += 1
            self.report.messages += len(messages)

    def _commit(self, producer: Producer) -> None:
        """Commit; an error that requires an abort is raised for ``_abort``, any
        other one too (then ``_abort`` raises it on, and ``run`` starts new
        clients)."""
        self._retrying("commit_transaction", producer.commit_transaction)

    def stuck(self, now: float) -> str | None:
        """The transactional call that has blocked past its limit, if any. Its
        process should exit: the call cannot be taken back from the thread it
        blocks, and a process started again fences the stuck producer by its
        transactional id."""
        calling = self.report.calling
        if calling is None or now < calling[1]:
            return None
        return f"{self.group}: {calling[0]} did not return within its limit"

    def _call(
        self,
        what: str,
        call: Callable[..., object],
        *args: object,
        limit_s: float = CALL_LIMIT_S,
    ) -> None:
        """``call(*args)``, with its deadline in the report for ``stuck``."""
        self.report.calling = (what, time.monotonic() + limit_s)
        try:
            call(*args)
        finally:
            self.report.calling = None

    def _retrying(
        self, what: str, call: Callable[[float], object], attempts: int = 5
    ) -> None:
        """A transactional call, called again while librdkafka says its error may
        be retried (its contract for commit and abort); any other error is
        raised."""
        for attempt in range(attempts):
            try:
                self._call(what, call, 30)
                return
            except KafkaException as failure:
                error = failure.args[0] if failure.args else None
                retriable = isinstance(error, KafkaError) and error.retriable()
                if not retriable or attempt == attempts - 1:
                    raise
                log.info("%s retried: %s", what, error)

    def _send_offsets(
        self, consumer: Consumer, producer: Producer, offsets: dict[TP, int]
    ) -> None:
        """The input offsets into the transaction, with the consumer's group
        metadata: the group's generation fences a zombie (KIP-447)."""
        self._call(
            "send_offsets_to_transaction",
            producer.send_offsets_to_transaction,
            [TopicPartition(t, p, o) for (t, p), o in offsets.items()],
            consumer.consumer_group_metadata(),
            OFFSETS_TIMEOUT_S,
            limit_s=OFFSETS_LIMIT_S,
        )

    def _owned_committed(self, consumer: Consumer) -> dict[TP, int]:
        owned = {(tp.topic, tp.partition) for tp in consumer.assignment()}
        return {tp: o for tp, o in self._committed.items() if tp in owned}

    def _past_markers(self, consumer: Consumer, ends: dict[TP, int]) -> None:
        """The offsets to commit: past the last message taken, and past any commit
        markers of the write side's own transactions that follow it (a Java
        consumer commits its position too), so a group at the end shows no lag."""
        for tp in consumer.position([TopicPartition(t, p) for t, p in ends]):
            key = (tp.topic, tp.partition)
            if tp.offset > ends[key]:
                ends[key] = tp.offset

    def _pass_markers(self, consumer: Consumer, producer: Producer) -> None:
        """When idle, at most once a second: commit the positions that moved past
        what is committed: past markers, or past batches that wrote nothing."""
        now = time.monotonic()
        if now < self._idle_check:
            return
        self._idle_check = now + 1.0
        moved = {
            (tp.topic, tp.partition): tp.offset
            for tp in consumer.position(consumer.assignment())
            if tp.offset > self._committed.get((tp.topic, tp.partition), -1)
        }
        if not moved:
            return
        producer.begin_transaction()
        try:
            self._send_offsets(consumer, producer, moved)
            self._commit(producer)
        except TRANSIENT as failure:
            self._abort(producer, failure, 0, True)  # raises unless aborted
            return
        self._committed.update(moved)

    def _abort(
        self, producer: Producer, failure: Exception, count: int, begun: bool
    ) -> None:
        """Abort the batch's transaction; the handlers drop what it changed. A
        failure that is not abortable (fatal, fenced, a call still in progress) or
        an abort that fails is raised: ``run`` then starts new clients."""
        self.report.aborts += 1
        self.report.last_error = str(failure)
        log.warning("%s: batch of %d aborted: %s", self.group, count, failure)
        for handler in self.handlers:
            handler.aborted()
        error = failure.args[0] if failure.args else None
        if isinstance(error, KafkaError) and (
            error.fatal()
            or error.code()
            in (KafkaError._CONFLICT, KafkaError._FENCED, KafkaError._FATAL)
        ):
            raise failure
        if begun:
            self._retrying("abort_transaction", producer.abort_transaction)

    def _rewind(self, consumer: Consumer, starts: dict[TP, int]) -> None:
        """Go back to the group's committed offsets of the batch's partitions (a
        commit that failed may still have landed; one the group has none of goes
        back to where the batch began), so the next ``consume`` takes them again in
        order, after any rebalance that the failure announced."""
        owned = {(tp.topic, tp.partition) for tp in consumer.assignment()}
        wanted = [TopicPartition(t, p) for (t, p) in starts if (t, p) in owned]
        if not wanted:
            return
        for tp in self._committed_offsets(wanted, consumer):
            offset = tp.offset if tp.offset >= 0 else starts[(tp.topic, tp.partition)]
            consumer.seek(TopicPartition(tp.topic, tp.partition, offset))

    def _committed_offsets(
        self, partitions: list[TopicPartition], consumer: Consumer
    ) -> list[TopicPartition]:
        """The group's committed offsets of ``partitions``, as a read_committed
        consumer asks for them: stable, waiting while a transaction holds offsets
        pending. A transaction ends within its timeout (the broker aborts it), but
        after a broker SIGKILL Kafka 4.4 was seen to hold offsets of a transaction
        that had ended for good (the soak of 2026-12-05: the saga's feed stopped).
        Past ``LOOKUP_S``, a processor whose handlers take input again harmlessly
        (``replays_safely``) starts from the offsets the group has, asked without
        waiting (read_uncommitted): no later than the held ones, so nothing is
        skipped. Ending the hold instead (a transaction of the same producer id
        that aborts drops what it holds) dropped a committed batch's offsets: an
        echo processor, which keeps nothing, wrote that batch twice
        (``streamfold broker-kills``, 2026-12-05)."""
        try:
            return committed_offsets(consumer, partitions)
        except KafkaException as failure:
            error = failure.args[0] if failure.args else None
            timed_out = isinstance(error, KafkaError) and (
                error.code() == KafkaError._TIMED_OUT
            )
            if not timed_out:
                raise
            if not self.replays_safely:
                held = sorted((tp.topic, tp.partition) for tp in partitions)
                # What /status shows as the last error: where, and the remedy.
                raise KafkaException(
                    KafkaError(
                        KafkaError._TIMED_OUT,
                        f"committed offsets of {held} held past {LOOKUP_S:.0f}s by a "
                        "transaction pending on the group; waiting for it to end (if "
                        "it never does: `streamfold kafka-tool transactions "
                        "find-hanging`, then `abort`)",
                    )
                ) from failure
        self.report.held_lookups += 1
        log.warning(
            "%s: committed offsets of %s held past %.0fs: starting from the "
            "offsets the group has; input taken again writes nothing",
            self.group,
            sorted((tp.topic, tp.partition) for tp in partitions),
            LOOKUP_S,
        )
        plain = Consumer(
            {
                **self.settings.kafka_client_config(),
                "group.id": self.group,
                "enable.auto.commit": False,
                "isolation.level": "read_uncommitted",
            }
        )
        try:
            return committed_offsets(plain, partitions)
        finally:
            plain.close()

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Start each new partition at its committed offset, looked up here: left to
        librdkafka, a lookup that fails at the request level (NOT_COORDINATOR or a
        lost connection after a broker restart) leaves the partition waiting for an
        answer for good, and the consumer fetches nothing while its group counts it
        as the owner (librdkafka #5586; seen in the 20-minute soak). A lookup that
        fails for good raises out of the poll: ``run`` closes the clients and starts
        new ones; offsets held pending, see ``_committed_offsets``."""
        committed: dict[TP, int] = {}
        starts = []
        for tp in self._committed_offsets(partitions, consumer):
            if tp.offset >= 0:
                committed[(tp.topic, tp.partition)] = tp.offset
            else:  # nothing committed yet: auto.offset.reset's earliest
                tp.offset = OFFSET_BEGINNING
            starts.append(tp)
        self._committed.update(committed)
        self._route(partitions, "assigned")
        consumer.incremental_assign(starts)
        self.report.assigned |= {(tp.topic, tp.partition) for tp in partitions}

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._route(partitions, "revoked")
        for tp in partitions:
            self._committed.pop((tp.topic, tp.partition), None)
        self.report.assigned -= {(tp.topic, tp.partition) for tp in partitions}

    def _route(self, partitions: Iterable[TopicPartition], what: str) -> None:
        by_handler: dict[int, list[TP]] = {}
        for tp in partitions:
            handler = self.routes.get(tp.topic)
            if handler is not None:
                by_handler.setdefault(id(handler), []).append((tp.topic, tp.partition))
        for handler in self.handlers:
            mine = by_handler.get(id(handler))
            if mine:
                getattr(handler, what)(mine)
        log.info(
            "%s: %s %s",
            self.group,
            what,
            sorted(tp for v in by_handler.values() for tp in v),
        )
