"""The transactional processor's decisions that need no broker: which failures end
its clients (so ``run`` starts new ones) and how it joins its group."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_INVALID,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from app import writer
from app.adapters import processor as processor_module
from app.adapters import topics
from app.adapters.processor import (
    CALL_LIMIT_S,
    OFFSETS_LIMIT_S,
    Batch,
    ConsumerReading,
    Processor,
)
from app.settings import Settings
from tests.support import Consumed


def _processor() -> Processor:
    return Processor(
        Settings(), group="g.commands", transactional_id="app-host-8080-0", handlers=[]
    )


def test_it_is_a_static_member_under_its_transactional_id() -> None:
    config = _processor().consumer_config()
    assert config["group.instance.id"] == "app-host-8080-0"
    assert config["isolation.level"] == "read_committed"
    assert config["enable.auto.commit"] is False


@pytest.mark.parametrize(
    "code",
    [KafkaError._FATAL, KafkaError._FENCED, KafkaError._CONFLICT],
    ids=["fatal", "fenced", "conflict"],
)
def test_a_failure_that_ends_the_clients_is_raised(code: int) -> None:
    """A consumer librdkafka failed fatally (e.g. FENCED_INSTANCE_ID after a broker
    restart) polls nothing ever again: the abort raises, and ``run`` starts a new
    consumer under the same instance id, which takes the membership over."""
    failure = KafkaException(KafkaError(code))
    processor = _processor()
    with pytest.raises(KafkaException) as raised:
        processor._abort(None, failure, 3, begun=False)  # type: ignore[arg-type]
    assert raised.value is failure
    assert processor.report.aborts == 1


def test_a_passing_failure_is_aborted_and_the_processor_goes_on() -> None:
    processor = _processor()
    failure = KafkaException(KafkaError(KafkaError._TRANSPORT))
    processor._abort(None, failure, 3, begun=False)  # type: ignore[arg-type]
    assert processor.report.aborts == 1
    assert processor.report.last_error == str(failure)


class _Clients:
    """A consumer and a transactional producer that record the calls made to them."""

    def __init__(self, positions: dict[tuple[str, int], int]) -> None:
        self.calls: list[str] = []
        self.positions = positions
        self.offsets_sent: list[dict[tuple[str, int], int]] = []
        # What the processor's report said was in progress during each
        # transactional call (set ``watched`` to the processor).
        self.watched: Processor | None = None
        self.in_progress: list[tuple[str, float] | None] = []

    def _seen(self) -> None:
        if self.watched is not None:
            self.in_progress.append(self.watched.report.calling)

    # The producer.
    def begin_transaction(self) -> None:
        self.calls.append("begin")

    def produce(self, topic: str, value: bytes | None, **kwargs: object) -> None:
        self.calls.append(f"produce {topic}")
        delivered = kwargs.get("on_delivery")
        if callable(delivered):
            self.delivered = delivered

    def send_offsets_to_transaction(
        self, offsets: list[TopicPartition], *_: object
    ) -> None:
        self.calls.append("send_offsets")
        self._seen()
        self.offsets_sent.append(
            {(tp.topic, tp.partition): tp.offset for tp in offsets}
        )

    def flush(self, timeout: float) -> int:
        self.calls.append("flush")
        return 0

    def commit_transaction(self, timeout: float) -> None:
        self.calls.append("commit")
        self._seen()

    def abort_transaction(self, timeout: float) -> None:
        self.calls.append("abort")

    # The consumer.
    def consumer_group_metadata(self) -> object:
        return object()

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t, p in self.positions]

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return [
            TopicPartition(
                tp.topic, tp.partition, self.positions[(tp.topic, tp.partition)]
            )
            for tp in partitions
        ]


class _Echo:
    """Writes one output per message of ``answered`` (tracked, and answered once
    acknowledged), nothing for any other topic's message."""

    topics = ("in", "quiet")

    def __init__(self) -> None:
        self.committed_batches = 0

    def prepare(self, partitions: set[tuple[str, int]]) -> None:
        return None

    def handle(self, message: Any, batch: Batch) -> None:
        if message.topic() == "in":
            batch.send("out", b"x", track=True)
            batch.later(lambda: batch.send("results", b"r"))

    def tick(self, batch: Batch) -> None:
        return None

    def committed(self) -> None:
        self.committed_batches += 1

    def aborted(self) -> None:
        return None


def _processor_with(handler: _Echo, *, replays_safely: bool = False) -> Processor:
    return Processor(
        Settings(),
        group="g",
        transactional_id="t-0",
        handlers=[handler],  # type: ignore[list-item]
        replays_safely=replays_safely,
    )


def test_a_batch_that_writes_nothing_opens_no_transaction_and_its_offsets_follow() -> (
    None
):
    handler = _Echo()
    processor = _processor_with(handler)
    clients = _Clients({("quiet", 0): 8})
    processor._transact(
        clients, clients, [Consumed("quiet", 0, 6), Consumed("quiet", 0, 7)]
    )  # type: ignore[arg-type]
    # No transaction for the batch; the idle commit (due at once the first time)
    # carries its offsets in a transaction of its own.
    assert clients.calls == ["begin", "send_offsets", "commit"]
    assert clients.offsets_sent == [{("quiet", 0): 8}]
    assert handler.committed_batches == 1
    # Within the second: nothing more is committed.
    clients.positions[("quiet", 0)] = 9
    processor._transact(clients, clients, [Consumed("quiet", 0, 8)])  # type: ignore[arg-type]
    assert clients.calls == ["begin", "send_offsets", "commit"]
    assert handler.committed_batches == 2


def test_a_batch_that_writes_sends_its_offsets_before_its_outputs_settle() -> None:
    handler = _Echo()
    processor = _processor_with(handler)
    clients = _Clients({("in", 0): 4})
    processor._transact(clients, clients, [Consumed("in", 0, 3)])  # type: ignore[arg-type]
    assert clients.calls == [
        "begin",
        "produce out",
        "send_offsets",  # overlaps the outputs' acknowledgement
        "flush",
        "produce results",  # what waited for the acknowledgement
        "commit",
    ]
    assert clients.offsets_sent == [{("in", 0): 4}]
    assert handler.committed_batches == 1


def test_each_transactional_call_is_watched_with_its_limit() -> None:
    handler = _Echo()
    processor = _processor_with(handler)
    clients = _Clients({("in", 0): 4})
    clients.watched = processor
    began = time.monotonic()
    processor._transact(clients, clients, [Consumed("in", 0, 3)])  # type: ignore[arg-type]
    ended = time.monotonic()
    names = [c[0] for c in clients.in_progress if c is not None]
    assert names == ["send_offsets_to_transaction", "commit_transaction"]
    offsets, commit = (c[1] for c in clients.in_progress if c is not None)
    assert began + OFFSETS_LIMIT_S <= offsets <= ended + OFFSETS_LIMIT_S
    assert began + CALL_LIMIT_S <= commit <= ended + CALL_LIMIT_S
    assert processor.report.calling is None  # nothing in progress once done


def test_a_call_blocked_past_its_limit_is_reported_stuck() -> None:
    """Transactional calls run on the processor's thread; one that blocks past its
    limit (librdkafka was seen to, after a broker restart) is reported stuck."""
    processor = _processor()
    release = threading.Event()
    entered = threading.Event()

    def blocking(timeout: float) -> None:
        entered.set()
        release.wait(10)

    caller = threading.Thread(
        target=processor._call,
        args=("commit_transaction", blocking, 30.0),
        kwargs={"limit_s": 5.0},
    )
    caller.start()
    try:
        assert entered.wait(10)
        now = time.monotonic()
        assert processor.stuck(now) is None  # within its limit
        late = processor.stuck(now + 6.0)
        assert late == "g.commands: commit_transaction did not return within its limit"
    finally:
        release.set()
        caller.join(10)
    # Returned: nothing is in progress any more, however late it is.
    assert processor.report.calling is None
    assert processor.stuck(time.monotonic() + 3600) is None


class _Exited(Exception):
    pass


def test_the_write_process_exits_when_a_processor_is_stuck(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The write process's loop exits the process (the worker starts it again) when
    a processor's call is past its deadline, and only then."""
    codes: list[int] = []

    def exit_(code: int) -> None:
        codes.append(code)
        raise _Exited

    monkeypatch.setattr(writer.os, "_exit", exit_)
    stuck, healthy = _processor(), _processor()
    stuck.report.calling = ("send_offsets_to_transaction", time.monotonic() - 1.0)
    healthy.report.calling = ("commit_transaction", time.monotonic() + 60.0)
    sent: list[object] = []
    reports = SimpleNamespace(send=sent.append)
    stopping = threading.Event()
    alive = [threading.current_thread()]

    with pytest.raises(_Exited):
        writer._watch([healthy, stuck], [], reports, stopping, alive)  # type: ignore[arg-type]
    assert codes == [1]
    assert sent == []  # it exits before it reports

    # A call within its limit: the loop reports and goes on until stopped.
    stuck.report.calling = None
    monkeypatch.setattr(stopping, "wait", lambda timeout: stopping.set())
    writer._watch([healthy, stuck], [], reports, stopping, alive)  # type: ignore[arg-type]
    assert codes == [1]
    assert len(sent) == 1


def test_a_retriable_failure_is_called_again_and_then_given_up() -> None:
    processor = _processor()
    attempts: list[tuple[str, float] | None] = []

    def flaky(timeout: float) -> None:
        attempts.append(processor.report.calling)
        if len(attempts) < 3:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, retriable=True))

    processor._retrying("commit_transaction", flaky)
    assert len(attempts) == 3
    assert all(a is not None and a[0] == "commit_transaction" for a in attempts)
    assert processor.report.calling is None

    def failing(timeout: float) -> None:
        attempts.append(processor.report.calling)
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT, retriable=True))

    attempts.clear()
    with pytest.raises(KafkaException):
        processor._retrying("commit_transaction", failing, attempts=4)
    assert len(attempts) == 4
    assert processor.report.calling is None


def test_a_call_that_fails_is_not_left_in_progress() -> None:
    processor = _processor()

    def failing(timeout: float) -> None:
        raise KafkaException(KafkaError(KafkaError._TRANSPORT))

    with pytest.raises(KafkaException):
        processor._retrying("commit_transaction", failing)
    assert processor.report.calling is None


class _Failed(Consumed):
    """A consumer's error, as ``poll`` hands it over."""

    def __init__(self, error: KafkaError) -> None:
        super().__init__("", -1, -1001)
        self._error = error

    def error(self) -> KafkaError:  # type: ignore[override]
        return self._error


def test_a_consumer_error_in_a_batch_aborts_it_and_keeps_the_clients() -> None:
    """A consumer's error (a broker away for a while, which librdkafka rides out)
    aborts the batch; the processor goes on with the same clients."""
    error = KafkaError(
        KafkaError._TRANSPORT, "127.0.0.1:9092/1: Disconnected (after 5ms in state UP)"
    )
    processor = _processor_with(_Echo())
    clients = _Clients({("in", 0): 4})
    processor._transact(clients, clients, [_Failed(error)])  # type: ignore[arg-type]
    assert processor.report.aborts == 1
    assert processor.report.last_error is not None
    assert "Disconnected" in processor.report.last_error


class _Assigning:
    """A consumer in a rebalance: what the group committed (an answer per lookup,
    the last one repeated), and what is assigned."""

    def __init__(self, *answers: list[Any] | Exception) -> None:
        self._answers = list(answers)
        self.lookups = 0
        self.assigned: list[tuple[str, int, int]] = []

    def committed(self, partitions: list[TopicPartition], timeout: float) -> list[Any]:
        answer = self._answers[min(self.lookups, len(self._answers) - 1)]
        self.lookups += 1
        if isinstance(answer, Exception):
            raise answer
        return answer

    def incremental_assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned += [(tp.topic, tp.partition, tp.offset) for tp in partitions]

    def consumer_group_metadata(self) -> object:
        return object()


class _Told(_Echo):
    def __init__(self) -> None:
        super().__init__()
        self.told: list[list[tuple[str, int]]] = []

    def assigned(self, partitions: list[tuple[str, int]]) -> None:
        self.told.append(partitions)


def _committed_answer() -> list[Any]:
    return [TopicPartition("in", 0, 42), TopicPartition("in", 1, -1001)]


def _failed_partition(code: int) -> list[Any]:
    """An answer in which partition 1's lookup failed (TopicPartition.error is
    read-only, hence a stand-in)."""
    failed = SimpleNamespace(
        topic="in", partition=1, offset=-1001, error=KafkaError(code)
    )
    return [TopicPartition("in", 0, 42), failed]


NEW = [("in", 0), ("in", 1)]


def test_new_partitions_start_at_the_offsets_the_group_committed() -> None:
    """The processor looks the committed offsets up and assigns them itself; one
    without a committed offset starts at the log's beginning (auto.offset.reset)."""
    handler = _Told()
    processor = _processor_with(handler)
    consumer = _Assigning(_committed_answer())
    processor._on_assign(consumer, [TopicPartition(*tp) for tp in NEW])  # type: ignore[arg-type]
    assert consumer.assigned == [("in", 0, 42), ("in", 1, OFFSET_BEGINNING)]
    assert handler.told == [NEW]
    assert processor.report.assigned == set(NEW)
    assert processor._committed == {("in", 0): 42}


@pytest.mark.parametrize(
    "moving",
    [
        KafkaException(KafkaError(KafkaError.NOT_COORDINATOR)),
        _failed_partition(KafkaError.COORDINATOR_LOAD_IN_PROGRESS),
    ],
    ids=["coordinator moved", "coordinator loading"],
)
def test_a_lookup_during_a_coordinator_move_is_asked_again(moving: Any) -> None:
    """librdkafka answers NOT_COORDINATOR once, without asking again (a broker
    restart moves the group's coordinator): the processor asks again."""
    consumer = _Assigning(moving, moving, _committed_answer())
    processor = _processor_with(_Told())
    processor._on_assign(consumer, [TopicPartition(*tp) for tp in NEW])  # type: ignore[arg-type]
    assert consumer.lookups == 3
    assert consumer.assigned == [("in", 0, 42), ("in", 1, OFFSET_BEGINNING)]


@pytest.mark.parametrize(
    "refused",
    [
        KafkaException(KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED)),
        _failed_partition(KafkaError.GROUP_AUTHORIZATION_FAILED),
    ],
    ids=["lookup refused", "one partition's lookup refused"],
)
def test_an_assignment_whose_offsets_are_unknown_fails_the_clients(
    refused: Any,
) -> None:
    """The error raises out of the poll (``run`` then closes the clients and starts
    new ones, whose assignment looks again); meanwhile the handlers are not told
    of the partitions and nothing is taken for committed."""
    handler = _Told()
    processor = _processor_with(handler)
    consumer = _Assigning(refused)
    with pytest.raises(KafkaException):
        processor._on_assign(consumer, [TopicPartition(*tp) for tp in NEW])  # type: ignore[arg-type]
    assert consumer.lookups == 1
    assert consumer.assigned == []
    assert handler.told == []
    assert processor.report.assigned == set()
    assert processor._committed == {}


def test_an_empty_assignment_asks_nothing() -> None:
    """Cooperative rebalancing hands over an empty assignment after each revoke;
    asking for no offsets would still wait for a coordinator (up to the timeout
    after a broker restart)."""
    consumer = _Assigning(AssertionError("asked"))
    processor = _processor_with(_Told())
    processor._on_assign(consumer, [])  # type: ignore[arg-type]
    assert consumer.lookups == 0
    assert consumer.assigned == []


class _Held(_Assigning):
    """A consumer whose lookups time out, as librdkafka's do while the group holds
    the offsets pending for a transaction."""

    def __init__(self) -> None:
        super().__init__(_committed_answer())

    def committed(self, partitions: list[TopicPartition], timeout: float) -> list[Any]:
        self.lookups += 1
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT))


@pytest.mark.usefixtures("short_lookups")
def test_offsets_held_pending_fail_the_assignment_and_end_nothing() -> None:
    """A lookup that times out on offsets held pending fails the assignment
    (``run`` starts new clients, which look again): nothing is assigned or taken
    for committed, and no transaction is begun to end what the group holds (an
    abort of the same producer id drops pending offsets, a committed batch's
    too)."""
    consumer = _Held()
    handler = _Told()
    processor = _processor_with(handler)
    with pytest.raises(KafkaException) as raised:
        processor._on_assign(consumer, [TopicPartition(*tp) for tp in NEW])  # type: ignore[arg-type]
    assert raised.value.args[0].code() == KafkaError._TIMED_OUT
    # Named, with the remedy, for /status's last error.
    assert "('in', 0)" in raised.value.args[0].str()
    assert "find-hanging" in raised.value.args[0].str()
    assert consumer.lookups >= 2  # asked again until the time was up
    assert consumer.assigned == []
    assert handler.told == []
    assert processor._committed == {}


class _Plain(_Assigning):
    """The read_uncommitted consumer a processor asks when a lookup stays held."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__([TopicPartition("in", 0, 40), TopicPartition("in", 1, 7)])
        self.config = config
        self.closed = False

    def close(self) -> None:
        self.closed = True


@pytest.mark.usefixtures("short_lookups")
def test_a_processor_that_replays_safely_starts_held_partitions_where_the_group_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past the lookup's time, a processor whose handlers take input again
    harmlessly asks the group's offsets without waiting for the hold (no stable
    offsets: read_uncommitted) and starts there; nothing ends the hold."""
    plain: list[_Plain] = []

    def consumer(config: dict[str, Any]) -> _Plain:
        plain.append(_Plain(config))
        return plain[-1]

    monkeypatch.setattr(processor_module, "Consumer", consumer)
    held, handler = _Held(), _Told()
    processor = _processor_with(handler, replays_safely=True)
    processor._on_assign(held, [TopicPartition(*tp) for tp in NEW])  # type: ignore[arg-type]
    assert held.lookups >= 2
    assert [(c.config["group.id"], c.config["isolation.level"]) for c in plain] == [
        ("g", "read_uncommitted")
    ]
    assert held.assigned == [("in", 0, 40), ("in", 1, 7)]
    assert handler.told == [NEW]
    assert processor.report.held_lookups == 1
    assert plain[0].closed


@pytest.fixture
def short_lookups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(topics, "LOOKUP_S", 0.2)


def test_new_clients_wait_longer_only_while_the_last_ones_got_nothing_done(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run of failures backs off (0.5 s, 1 s, 2 s ...); clients that committed a
    batch before failing (a broker restart fenced them) start the waits over."""
    processor = _processor()
    stop = threading.Event()
    waits: list[float] = []
    attempts = iter([False, False, False, True, False])

    def attempt(stop_: threading.Event) -> None:
        got_work_done = next(attempts, None)
        if got_work_done is None:
            stop.set()
        elif got_work_done:
            processor.report.batches += 1
        raise KafkaException(KafkaError(KafkaError._FENCED))

    monkeypatch.setattr(processor, "_run", attempt)
    monkeypatch.setattr(stop, "wait", waits.append)
    processor.run(stop)
    assert waits == [0.5, 1.0, 2.0, 0.5, 1.0, 2.0]


def test_records_of_a_partition_taken_away_meanwhile_are_left_to_its_next_owner() -> (
    None
):
    processor = _processor()
    processor.report.assigned = {("in", 0)}
    taken = [Consumed("in", 0, 5), Consumed("in", 1, 7), Consumed("in", 0, 6)]
    kept = processor.still_mine(taken)  # type: ignore[arg-type]
    assert [(m.partition(), m.offset()) for m in kept] == [(0, 5), (0, 6)]


def test_a_partition_read_to_its_end_since_its_assignment_has_a_position() -> None:
    # librdkafka knows no position after an assignment or a seek until a record is
    # handed over: a quiet partition would stay unknown, and the saga's deadlines on
    # it never fire. The offset it was assigned or rewound to stands for it.
    class Positions:
        def __init__(self, offset: int) -> None:
            self.offset = offset

        def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
            return [
                TopicPartition(p.topic, p.partition, self.offset) for p in partitions
            ]

    committed = {("inbox", 1): 7}
    unknown = ConsumerReading(Positions(OFFSET_INVALID), committed)  # type: ignore[arg-type]
    assert unknown.position(("inbox", 1)) == 7
    assert unknown.position(("inbox", 2)) is None  # nothing committed there
    assert ConsumerReading(Positions(9), committed).position(("inbox", 1)) == 9  # type: ignore[arg-type]
