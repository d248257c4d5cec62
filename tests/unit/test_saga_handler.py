"""The saga on the processor, without a broker: which deadlines a process fires (the
orders it owns, once their inbox is read that far), what it keeps across a failed
catch-up and a rebalance, and how it caches its states.

The saga's log is a list per partition (``SagaLog``, standing in for ``LogTail``);
commands are framed by a codec that needs no registry."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

import agents.saga
from agents.saga import FeedHandler, SagaHandler
from app.adapters.catalog import SchemaCatalog
from app.adapters.codec import Codec, ConfluentRegistry
from app.adapters.eventlog import partition_for
from app.adapters.logtail import StateCache
from app.adapters.saga_io import encode_message
from app.adapters.topics import TP, inbox_topic, state_topic
from app.application import saga
from app.deadletters import DeadLetter, redrive_of
from app.settings import Settings
from tests.support import Consumed

TIMEOUT = timedelta(seconds=30)


class SagaLog:
    """The saga's state log: records (key, value) per partition, and a tail that
    folds them as ``LogTail`` does. ``fail_next`` makes the next catch-up fail after
    it folded what it read (a fetch that errs, or nothing arriving in time)."""

    def __init__(self) -> None:
        self.records: dict[int, list[tuple[bytes, bytes]]] = {}
        self.fail_next = False

    def tail(self, settings: Settings, fold: Callable[[Any], None], **_: Any) -> Any:
        return _Tail(self, fold)


class _Tail:
    def __init__(self, log: SagaLog, fold: Callable[[Any], None]) -> None:
        self.log, self.fold = log, fold
        self.offsets: dict[TP, int] = {}

    def follow(self, starts: dict[TP, int]) -> None:
        for tp, offset in starts.items():
            self.offsets.setdefault(tp, offset)
            records = self.log.records.get(tp[1], [])
            while self.offsets[tp] < len(records):
                key, value = records[self.offsets[tp]]
                self.fold(Consumed(tp[0], tp[1], self.offsets[tp], value, key))
                self.offsets[tp] += 1
        if self.log.fail_next:
            self.log.fail_next = False
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "read no end"))

    def pause(self, tps: Any) -> None:
        return None

    def drop(self, tps: Any) -> None:
        for tp in tps:
            self.offsets.pop(tp, None)

    def close(self) -> None:
        return None


class FramingCodec:
    """What framing a command needs of a codec, without a registry."""

    catalog = SchemaCatalog.load()

    def encode(self, topic: str, name: str, data: Any, **_: Any) -> bytes:
        return name.encode()


class Reading:
    """How far the inbox is read: every partition to its end unless set."""

    def __init__(self) -> None:
        self.positions: dict[TP, int | None] = {}
        self.ends: dict[TP, int | None] = {}

    def position(self, tp: TP) -> int | None:
        return self.positions.get(tp, 0)

    def end(self, tp: TP) -> int | None:
        return self.ends.get(tp, 0)


class Batch:
    """What a handler writes in one batch (topic, key, partition, value), and the
    headers of each."""

    def __init__(self, reading: Reading | None = None) -> None:
        self.sent: list[tuple[str, bytes | None, int | None, bytes | None]] = []
        self.headers: list[list[tuple[str, bytes]]] = []
        self.reading = reading or Reading()
        self.drained = True  # what the processor said of a short batch

    def send(self, topic: str, value: bytes | None, **options: Any) -> None:
        self.sent.append((topic, options.get("key"), options.get("partition"), value))
        self.headers.append(list(options.get("headers") or []))

    def commands(self) -> list[tuple[str, str]]:
        """(command topic, order id) of each command sent."""
        return [
            (topic, (key or b"").decode())
            for topic, key, _, _ in self.sent
            if topic.endswith(".commands")
        ]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return replace(Settings(), home=tmp_path)


@pytest.fixture
def log(monkeypatch: pytest.MonkeyPatch) -> SagaLog:
    found = SagaLog()
    monkeypatch.setattr(agents.saga, "LogTail", found.tail)
    return found


@pytest.fixture
def handler(settings: Settings, log: SagaLog, tmp_path: Path) -> Iterator[SagaHandler]:
    made = SagaHandler(settings, FramingCodec(), tmp_path / "cache")  # type: ignore[arg-type]
    yield made
    made.close()


def order_on(settings: Settings, partition: int, *, after: str = "") -> str:
    """An order id whose saga lives on inbox ``partition`` (not ``after``)."""
    return next(
        order
        for n in range(10_000)
        if partition_for((order := f"o-{n}").encode(), settings.partitions) == partition
        and order != after
    )


def created_message(order_id: str) -> saga.Created:
    return saga.Created(
        order_id=order_id,
        event_id=f"created-{order_id}",
        correlation_id=f"flow-{order_id}",
        account_id="a-1",
        amount_minor=500,
        currency="EUR",
        at=datetime.now(UTC),
    )


def charging(order_id: str, *, since: timedelta) -> saga.SagaState:
    """The saga of ``order_id`` charging its account since ``since`` ago."""
    created = replace(created_message(order_id), at=datetime.now(UTC) - since)
    state = saga.react(None, created, timeout=TIMEOUT).state
    assert state is not None and state.deadline is not None
    return state


def logged(log: SagaLog, partition: int, state: saga.SagaState) -> None:
    value = json.dumps(saga.state_to_json(state)).encode()
    log.records.setdefault(partition, []).append((state.order_id.encode(), value))


# -- whose deadlines a process fires -----------------------------------------------


def test_a_failed_catch_up_then_a_rebalance_fires_no_deadline_of_another_owner(
    settings: Settings, log: SagaLog, handler: SagaHandler
) -> None:
    """A catch-up that fails keeps what it folded; the partition then goes to
    another process, and this one's next catch-up must not take its orders up."""
    inbox = inbox_topic(settings)
    kept, lost = order_on(settings, 0), order_on(settings, 1)
    for partition, order in ((0, kept), (1, lost)):
        logged(log, partition, charging(order, since=2 * TIMEOUT))

    handler.assigned([(inbox, 0), (inbox, 1)])
    log.fail_next = True
    with pytest.raises(KafkaException):
        handler.prepare(set())
    handler.aborted()
    handler.revoked([(inbox, 1)])  # the rebalance: another process owns it now
    handler.prepare(set())
    batch = Batch()
    handler.tick(batch)

    assert set(handler.deadlines) <= {kept}
    assert batch.commands() == [(settings.topics.commands("orders"), kept)]
    written = {(topic, key) for topic, key, _, _ in batch.sent}
    assert (state_topic(settings), lost.encode()) not in written


# -- when a deadline fires ----------------------------------------------------------


def overdue(settings: Settings, log: SagaLog, handler: SagaHandler) -> tuple[str, TP]:
    """An order on inbox partition 0 whose deadline passed, taken over by
    ``handler``: the order and its inbox partition."""
    order = order_on(settings, 0)
    logged(log, 0, charging(order, since=2 * TIMEOUT))
    tp = (inbox_topic(settings), 0)
    handler.assigned([tp])
    handler.prepare(set())
    assert order in handler.deadlines
    return order, tp


def inbox_message(tp: TP, offset: int, message: saga.Message) -> Consumed:
    key, value = encode_message(message)
    return Consumed(tp[0], tp[1], offset, value, key)


def test_after_an_assignment_an_answer_in_the_inbox_comes_before_the_deadline(
    settings: Settings, log: SagaLog, handler: SagaHandler
) -> None:
    """Taken over with a backlog in its inbox, a deadline passed meanwhile waits
    for the backlog: the account's answer there pays the order, nothing cancels
    it (a short batch is no sign that the inbox is read to its end)."""
    order, tp = overdue(settings, log, handler)
    reading = Reading()
    reading.positions[tp], reading.ends[tp] = 3, 5  # the backlog: offsets 3 and 4
    before = Batch(reading)
    handler.tick(before)
    assert before.sent == []

    withdrawn = saga.Withdrawn(
        order_id=order,
        event_id="withdrawn-1",
        account_id="a-1",
        amount_minor=500,
        at=datetime.now(UTC) - TIMEOUT,  # the account answered in time
    )
    batch = Batch(reading)
    handler.handle(inbox_message(tp, 3, withdrawn), batch)
    reading.positions[tp] = 5
    handler.tick(batch)
    handler.committed()
    assert [c for c, _ in batch.commands()] == [settings.topics.commands("orders")]
    [(_, _, _, pay)] = [s for s in batch.sent if s[0].endswith(".commands")]
    assert pay == b"streamfold.orders.ProcessPayment"
    assert order not in handler.deadlines


def test_a_deadline_waits_while_the_position_is_unknown(
    settings: Settings, log: SagaLog, handler: SagaHandler
) -> None:
    """Just after an assignment or a rewind, until the consumer's first fetch."""
    order, tp = overdue(settings, log, handler)
    reading = Reading()
    reading.positions[tp] = None  # nothing fetched since
    batch = Batch(reading)
    handler.tick(batch)
    assert batch.sent == []
    reading.positions[tp] = 0  # read: the inbox is empty
    handler.tick(batch)
    assert batch.commands() == [(settings.topics.commands("orders"), order)]


def test_an_end_the_broker_does_not_say_is_not_asked_again_at_once(
    settings: Settings,
    log: SagaLog,
    handler: SagaHandler,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The question blocks the processor's thread: after no answer, the partition's
    deadlines wait ``END_RETRY_S`` before it is asked again."""
    order, tp = overdue(settings, log, handler)
    asked = []

    class Silent(Reading):
        def end(self, tp: TP) -> int | None:
            asked.append(tp)
            return None

    reading = Silent()
    now = [1000.0]
    monkeypatch.setattr(agents.saga.time, "monotonic", lambda: now[0])
    for _ in range(3):
        handler.tick(Batch(reading))
    assert asked == [tp]
    now[0] += agents.saga.END_RETRY_S
    answered = Batch(Reading())
    handler.tick(answered)
    assert answered.commands() == [(settings.topics.commands("orders"), order)]


def test_a_deadline_fires_once_read_past_where_the_inbox_ended_when_it_was_due(
    settings: Settings, log: SagaLog, handler: SagaHandler
) -> None:
    """Traffic that keeps coming (full batches, an end that moves on) holds a
    deadline back only until the inbox is read as far as it reached when the
    deadline was found due."""
    order, tp = overdue(settings, log, handler)
    reading = Reading()
    reading.positions[tp], reading.ends[tp] = 3, 5
    batch = Batch(reading)
    handler.tick(batch)
    assert batch.sent == []
    reading.positions[tp], reading.ends[tp] = 5, 500
    handler.tick(batch)
    assert batch.commands() == [(settings.topics.commands("orders"), order)]


def test_each_deadline_waits_for_where_the_inbox_ended_when_it_was_due(
    settings: Settings, log: SagaLog, handler: SagaHandler
) -> None:
    """A deadline found due later on the same partition waits for the inbox's end
    of its own moment, not the one an earlier deadline noted."""
    first, tp = overdue(settings, log, handler)
    reading = Reading()
    reading.positions[tp], reading.ends[tp] = 3, 5
    batch = Batch(reading)
    handler.tick(batch)
    assert batch.sent == []

    # A second order there, its deadline passed by the time its creation is read.
    second = order_on(settings, 0, after=first)
    late = replace(created_message(second), at=datetime.now(UTC) - 2 * TIMEOUT)
    handler.handle(inbox_message(tp, 3, late), batch)
    handler.committed()
    assert second in handler.deadlines
    reading.positions[tp], reading.ends[tp] = 5, 8
    batch = Batch(reading)
    handler.tick(batch)
    assert batch.commands() == [(settings.topics.commands("orders"), first)]
    handler.committed()
    reading.positions[tp] = 8
    batch = Batch(reading)
    handler.tick(batch)
    assert batch.commands() == [(settings.topics.commands("orders"), second)]


# -- the cache of states -----------------------------------------------------------


def test_states_cached_in_another_shape_are_folded_again_from_the_log(
    settings: Settings, log: SagaLog, tmp_path: Path
) -> None:
    """A release that changes SagaState finds the cache the one before wrote: it
    is dropped, and the states come from the saga's log. (The older release here
    tags its cache with no shape, as every release before the tag did.)"""
    inbox, topic = inbox_topic(settings), state_topic(settings)
    order = order_on(settings, 0)
    state = charging(order, since=2 * TIMEOUT)
    logged(log, 0, state)
    older = StateCache(tmp_path / "cache" / "saga", "")
    written = saga.state_to_json(state)
    del written["reason"]  # a field the older release did not have
    older.write({}, {order: json.dumps(written).encode()}, {(topic, 0): 1})
    older.close()

    handler = SagaHandler(settings, FramingCodec(), tmp_path / "cache")  # type: ignore[arg-type]
    try:
        handler.assigned([(inbox, 0)])
        handler.prepare(set())
        assert handler.deadlines == {order: state.deadline}
    finally:
        handler.close()


# -- what the feed cannot read -------------------------------------------------------


class WithHeaders(Consumed):
    def __init__(self, *args: Any, headers: list[tuple[str, bytes]]) -> None:
        super().__init__(*args)
        self.kept = headers

    def headers(self) -> list[tuple[str, bytes]]:
        return self.kept


def test_the_feed_dead_letters_what_it_cannot_read_for_a_redrive(
    settings: Settings,
) -> None:
    """Not skipped: kept on the saga inbox's dead-letter topic with its source, and
    re-driven to where the feed read it, headers and all, to be read again."""
    codec = Codec(ConfluentRegistry("http://127.0.0.1:1"), SchemaCatalog.load())
    feed = FeedHandler(settings, codec)
    events = settings.topics.events("orders")
    headers = [("event-type", b"OrderCreated"), ("aggregate-id", b"o-1")]
    unreadable = WithHeaders(events, 2, 7, b"not avro", b"o-1", headers=headers)
    batch = Batch()
    feed.handle(unreadable, batch)  # type: ignore[arg-type]

    dlq = f"{inbox_topic(settings)}.dlq"
    [(topic, key, _, value)] = batch.sent
    assert (topic, key, value) == (dlq, b"o-1", b"not avro")
    letter = DeadLetter(dlq, 0, 0, key, value, tuple(batch.headers[0]), 0)
    assert (letter.source_topic, letter.source_partition, letter.source_offset) == (
        events,
        2,
        7,
    )
    assert (letter.kind, letter.aggregate_id) == ("saga", "o-1")
    assert "NotFramed" in letter.reason
    again = redrive_of(letter, "act-1")
    assert (again.topic, again.partition, again.key, again.value) == (
        events,
        2,
        b"o-1",
        b"not avro",
    )
    assert again.headers[:2] == tuple(headers)
