"""Dead letters re-driven against the real broker, registry and Postgres: two
operators racing on the same records re-drive each once; an action committed behind
another's open transaction still counts; a projection's dead letter, re-driven from
the CLI once its cause is fixed, reaches the read model; a saga inbox's, re-driven
once its cause is fixed, gets the order paid; the saga feed's, re-driven, reaches the
saga through the feed."""

from __future__ import annotations

import dataclasses
import json
import threading
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
import pytest
from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from agents.saga import FeedHandler
from app.adapters.codec import ConfluentRegistry
from app.adapters.deadletters import (
    DeadLetterError,
    Operations,
    Raced,
    read_actions,
    read_dead_letters,
    transactional_id,
)
from app.adapters.eventlog import partition_for
from app.adapters.saga_io import feed_group
from app.adapters.topics import inbox_topic
from app.audit import new_codec, read_topic
from app.client import CommandClient
from app.deadletters import REDRIVEN_FROM, Action, ActionRefused, record_id
from app.domain.accounts import OpenAccount
from app.projections.engine import dead_letter_topic
from app.settings import ApiToken, Settings
from app.waiting import eventually
from app.workload import charged_order, deposit, funded_account
from app.writer import command_group
from tests.support import (
    eventually_equal,
    get_until,
    query_rows,
    run_cli,
    running_worker,
)

ROUNDS = 10
GRACE = ApiToken("grace", "grace-0123456789abcdef01")
# The bound on every wait for the worker: a busy 2-core machine.
WAIT_S = 90


def _now() -> datetime:
    return datetime.now(UTC)


def _dead_letters(settings: Settings, dlq: str, source: str, count: int) -> list[str]:
    """``count`` dead letters of ``source`` partition 0, keyed ``agg-<n>``; their
    record ids (the dead-letter topic is new: offsets 0..count-1)."""
    producer = Producer(settings.producer_config())
    for n in range(count):
        producer.produce(
            dlq,
            f"command {n}".encode(),
            key=f"agg-{n}".encode(),
            headers=[
                ("dlq-source-topic", source.encode()),
                ("dlq-source-partition", b"0"),
                ("dlq-source-offset", str(n).encode()),
                ("dlq-reason", b"made by the test"),
            ],
        )
    assert producer.flush(30) == 0
    return [record_id(dlq, 0, n) for n in range(count)]


def test_two_operators_racing_redrive_each_record_once(deployment: Settings) -> None:
    """Each round, two independent ``Operations`` (two operators' processes) re-drive
    the same record at once; every other round one of them names the aggregate
    instead. Exactly one wins: one new record on the source, one action; the other is
    refused, nothing produced."""
    topics = deployment.topics
    source = topics.commands("orders")  # no worker runs: nothing consumes it
    dlq = topics.dead_letter(source)
    records = _dead_letters(deployment, dlq, source, ROUNDS)
    operators = [Operations(deployment, _now), Operations(deployment, _now)]
    won: list[Action] = []
    refused: list[ActionRefused] = []
    failed: list[BaseException] = []

    def act(index: int, n: int, start: threading.Barrier) -> None:
        by_aggregate = index == 1 and n % 2 == 1
        start.wait()
        try:
            won.extend(
                operators[index].act(
                    "redrive",
                    f"operator-{index}",
                    f"round {n}",
                    record=None if by_aggregate else records[n],
                    topic=dlq if by_aggregate else None,
                    aggregate_id=f"agg-{n}" if by_aggregate else None,
                )
            )
        except ActionRefused as error:
            refused.append(error)
        except BaseException as error:  # noqa: BLE001 - asserted below
            import traceback

            traceback.print_exc()
            failed.append(error)

    for n in range(ROUNDS):
        start = threading.Barrier(2)
        threads = [threading.Thread(target=act, args=(i, n, start)) for i in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    assert failed == []
    redriven = Counter(
        (record.headers[REDRIVEN_FROM] or b"").decode()
        for record in read_topic(deployment, source)
        if REDRIVEN_FROM in record.headers
    )
    assert redriven == Counter(records)
    acted = Counter(action.record for action in read_actions(deployment))
    assert acted == Counter(records)
    assert sorted(action.record for action in won) == records
    # Refused as raced or taken (409), or, named by its aggregate, as none open (404).
    assert len(refused) == ROUNDS
    for refusal in refused:
        assert (
            refusal.message == Raced().message
            or (
                refusal.status == 409
                and " was redriven by operator-" in refusal.message
            )
            or (refusal.status == 404 and "no open dead letters of" in refusal.message)
        ), refusal


def test_an_action_beyond_another_open_transaction_still_counts(
    deployment: Settings,
) -> None:
    """An action on another dead-letter topic holds a transaction open on the
    actions topic while a re-drive commits after it: the re-drive's action lies
    beyond the last stable offset, where a read_committed reader's end stops. A second
    re-drive of the record does not read less: while that transaction stays open it
    fails with nothing done; once it ends, it is refused as already re-driven."""
    topics = deployment.topics
    source = topics.commands("orders")
    dlq = topics.dead_letter(source)
    [record] = _dead_letters(deployment, dlq, source, 1)
    other = Producer(
        {
            **deployment.producer_config(),
            "transactional.id": transactional_id(deployment, "other.dlq"),
        }
    )
    other.init_transactions(30)

    opened: list[bool] = []

    def opening() -> datetime:
        # The clock is read as the action is produced: the other action opens its
        # transaction on the actions topic just before.
        if not opened:
            other.begin_transaction()
            other.produce(topics.operator_actions, b"{}", key=b"other.dlq:0:0")
            assert other.flush(30) == 0
            opened.append(True)
        return _now()

    [first] = Operations(deployment, opening).act(
        "redrive", "grace", "first", record=record
    )
    second = Operations(deployment, _now)
    with pytest.raises(DeadLetterError, match="a transaction is still open"):
        second.act("redrive", "alan", "second", record=record)
    other.abort_transaction(30)
    with pytest.raises(ActionRefused, match="was redriven by grace"):
        second.act("redrive", "alan", "second", record=record)
    redriven = [r for r in read_topic(deployment, source) if REDRIVEN_FROM in r.headers]
    assert [r.offset for r in redriven] == [int(first.produced.rsplit(":", 1)[1])]
    assert [a.record for a in read_actions(deployment)] == [record]


def _records(settings: Settings, topic: str, count: int) -> list[str]:
    """The ids of the first ``count`` records of ``topic``, once it holds them."""
    found = eventually(
        lambda: read_topic(settings, topic),
        lambda records: len(records) >= count,
        timeout=WAIT_S,
        every=0.5,
    )
    assert len(found) >= count, f"{topic} holds {len(found)} records"
    return [record_id(topic, r.partition, r.offset) for r in found[:count]]


def _balance(settings: Settings, account: str) -> tuple[int, list[int]] | None:
    """The ledger's balance of ``account`` and its transactions' amounts."""
    with psycopg.connect(settings.query_database_url) as conn:
        row = conn.execute(
            "SELECT balance_minor FROM account_balances WHERE account_id = %s",
            (account,),
        ).fetchone()
        amounts = conn.execute(
            "SELECT amount_minor FROM transactions WHERE account_id = %s "
            "ORDER BY stream_version",
            (account,),
        ).fetchall()
    return None if row is None else (row[0], [a for (a,) in amounts])


def test_a_projection_dead_letter_redriven_once_its_cause_is_fixed(
    deployment: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ledger's read model refuses a large deposit (a CHECK an operator added):
    the ledger dead-letters the event and goes on. The CHECK dropped, the event
    re-driven from the CLI is applied: the balance and the transaction appear."""
    settings = dataclasses.replace(deployment, operator_tokens=(GRACE,))
    account = f"acc-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(settings.database_url) as conn:
        conn.execute(
            "ALTER TABLE transactions ADD CONSTRAINT below_1000 "
            "CHECK (amount_minor < 100000)"
        )
    with running_worker(settings), CommandClient(settings) as client:
        for command in (
            OpenAccount(account_id=account, owner_id="o", currency="EUR"),
            deposit(account, 500, "t-small", currency="EUR"),
            deposit(account, 250_000, "t-large", currency="EUR"),
        ):
            assert client.send(command, timeout=60).accepted
        dlq = dead_letter_topic(settings, "ledger")
        [record] = _records(settings, dlq, 1)
        # The ledger went past it: the small deposit is there, the large one not.
        eventually_equal(lambda: _balance(settings, account), (500, [500]), WAIT_S)

        with psycopg.connect(settings.database_url) as conn:
            conn.execute("ALTER TABLE transactions DROP CONSTRAINT below_1000")
        listed = run_cli(settings, "dlq", "list", "--open")
        assert listed.returncode == 0, listed.stderr
        [line] = [x for x in listed.stdout.splitlines() if x.startswith(record)]
        assert " projection " in line and "below_1000" in line, line
        monkeypatch.setenv("STREAMFOLD_OPERATOR_TOKEN", GRACE.token)
        done = run_cli(
            settings, "dlq", "redrive", record, "--reason", "CHECK dropped", "--yes"
        )
        assert done.returncode == 0, done.stderr
        events = settings.topics.events("accounts")
        assert done.stdout.startswith(f"redrive {record} → {events}:"), done.stdout
        eventually_equal(
            lambda: _balance(settings, account), (250_500, [500, 250_000]), WAIT_S
        )
        again = run_cli(settings, "dlq", "redrive", record, "--yes")
        assert again.returncode == 3 and "was redriven by grace" in again.stderr
        # The write side took the copy for the event it is: the next deposit is
        # version 4, on the balance with the large deposit counted once.
        assert client.send(deposit(account, 100, "t-next", currency="EUR")).accepted
        eventually_equal(
            lambda: _balance(settings, account),
            (250_600, [500, 250_000, 100]),
            WAIT_S,
        )
    # Dead-lettered once: the re-driven copy was not poison. The event-log index
    # keeps the original of version 3, not the copy.
    [letter] = read_dead_letters(settings, [dlq])
    indexed = query_rows(
        settings.query_database_url,
        'SELECT stream_version, "offset" FROM event_log WHERE aggregate_id = %s '
        "ORDER BY stream_version",
        account,
    )
    assert [version for version, _ in indexed] == [1, 2, 3, 4]
    assert indexed[2][1] == letter.source_offset


def test_a_saga_inbox_dead_letter_redriven_once_its_cause_is_fixed(
    deployment: Settings,
) -> None:
    """The registry holds a wrong schema under the saga's Withdraw subject, so the
    saga cannot frame its withdrawal and dead-letters the order's creation. The
    wrong schema deleted, the message re-driven to the inbox: the saga withdraws,
    the order is paid."""
    # A deadline far off: the re-driven message carries the time it was first routed.
    settings = dataclasses.replace(deployment, saga_timeout_s=600.0)
    subject = f"{settings.topics.commands('accounts')}-streamfold.accounts.Withdraw"
    wrong = {
        "type": "record",
        "name": "Withdraw",
        "namespace": "streamfold.accounts",
        "fields": [{"name": "wrong", "type": "int"}],
    }
    ConfluentRegistry(settings.schema_registry_url).register(subject, json.dumps(wrong))
    account, order = f"acc-{uuid.uuid4().hex[:8]}", f"ord-{uuid.uuid4().hex[:8]}"
    base = settings.web_url
    with running_worker(settings), CommandClient(settings) as client:
        for command in (
            *funded_account(account, 5000),
            charged_order(order, account, 900),
        ):
            assert client.send(command, timeout=60).accepted
        dlq = f"{inbox_topic(settings)}.dlq"
        [record] = _records(settings, dlq, 1)
        operations = Operations(settings, lambda: datetime.now(UTC))
        [letter] = read_dead_letters(settings, [dlq])
        assert letter.kind == "saga" and "Withdraw" in letter.reason, letter.reason
        assert letter.aggregate_id == order

        deleted = httpx.delete(
            f"{settings.schema_registry_url}/subjects/{subject}", timeout=10
        )
        assert deleted.status_code == 200, deleted.text
        [action] = operations.act(
            "redrive", "grace", "schema fixed", topic=dlq, aggregate_id=order
        )
        assert action.record == record
        assert action.produced is not None
        assert action.produced.startswith(f"{inbox_topic(settings)}:")
        saga = get_until(
            f"{base}/sagas/{order}",
            lambda r: r.status_code == 200 and r.json()["settled"],
            timeout=WAIT_S,
        ).json()
        assert saga["phase"] == "PAID", saga
        eventually_equal(lambda: _order_status(settings, order), "PAID", WAIT_S)
    assert len(read_topic(settings, dlq)) == 1


def _order_status(settings: Settings, order: str) -> str | None:
    with psycopg.connect(settings.query_database_url) as conn:
        row = conn.execute(
            "SELECT status FROM order_summaries WHERE order_id = %s", (order,)
        ).fetchone()
    return None if row is None else str(row[0])


class _Producing:
    """A batch that produces at once: where a test writes what the saga's feed
    writes in its transactions."""

    def __init__(self, settings: Settings) -> None:
        self.producer = Producer(settings.producer_config())

    def send(self, topic: str, value: bytes | None, **options: Any) -> None:
        self.producer.produce(
            topic, value, key=options.get("key"), headers=options.get("headers")
        )

    def flush(self) -> None:
        assert self.producer.flush(30) == 0


def _feed_sources(settings: Settings) -> list[str]:
    topics = settings.topics
    return [topics.events("orders"), topics.events("accounts"), topics.results]


def _feed_past_everything(settings: Settings) -> None:
    """The saga feed's group committed at the end of its sources, as a feed that
    went past every record there (dead-lettering what it could not read) leaves it."""
    consumer = Consumer(
        {**settings.consumer_config(), "group.id": f"ends-{uuid.uuid4().hex[:6]}"}
    )
    try:
        ends = [
            TopicPartition(
                topic, p, consumer.get_watermark_offsets(TopicPartition(topic, p))[1]
            )
            for topic in _feed_sources(settings)
            for p in range(settings.partitions)
        ]
    finally:
        consumer.close()
    group = feed_group(settings)
    admin = AdminClient(dict(settings.kafka_client_config()))
    request = ConsumerGroupTopicPartitions(group, ends)
    done = admin.alter_consumer_group_offsets([request])[group].result(timeout=30)
    assert not [tp for tp in done.topic_partitions if tp.error]


def _until_no_members(settings: Settings, group: str) -> None:
    admin = AdminClient(dict(settings.kafka_client_config()))

    def members() -> int:
        found = admin.describe_consumer_groups([group])[group].result(timeout=30)
        return len(found.members)

    assert eventually(members, lambda n: n == 0, timeout=WAIT_S, every=0.5) == 0


def _event_at(settings: Settings, topic: str, partition: int, offset: int) -> Any:
    consumer = Consumer(
        {**settings.consumer_config(), "group.id": f"one-{uuid.uuid4().hex[:6]}"}
    )
    try:
        consumer.assign([TopicPartition(topic, partition, offset)])
        found = eventually(
            lambda: consumer.poll(0.5), lambda m: m is not None, timeout=WAIT_S
        )
        assert found is not None and found.error() is None, found
        return found
    finally:
        consumer.close()


def test_a_saga_feed_dead_letter_redriven_reaches_the_saga(
    deployment: Settings,
) -> None:
    """The saga's feed dead-letters what it cannot read, with where it read it; a
    re-drive puts the record back there for the feed to read again. An unreadable
    record comes back as a new dead letter. An order's creation the feed could not
    read at the time (here: one it went past while the saga was off, dead-lettered
    as the feed does) reaches the saga once re-driven: the account is charged and
    the order paid, the write side counting the copy as the event it is."""
    settings = dataclasses.replace(deployment, saga_timeout_s=600.0)
    account, order = f"acc-{uuid.uuid4().hex[:8]}", f"ord-{uuid.uuid4().hex[:8]}"
    events = settings.topics.events("orders")
    with (
        running_worker(dataclasses.replace(settings, saga=False)),
        CommandClient(settings) as client,
    ):
        for command in funded_account(account, 5000):
            assert client.send(command, timeout=60).accepted
        created = client.send(charged_order(order, account, 900), timeout=60)
        assert created.accepted and created.partition is not None
    _feed_past_everything(settings)
    # A static member that comes back within its session is given its assignment
    # again, without the inbox it now subscribes to as well: start once it is gone.
    _until_no_members(settings, command_group(settings))

    dlq = f"{inbox_topic(settings)}.dlq"
    poison = f"ord-{uuid.uuid4().hex[:8]}"
    with running_worker(settings):
        producing = _Producing(settings)
        producing.producer.produce(
            events,
            b"not avro",
            key=poison.encode(),
            partition=partition_for(poison.encode(), settings.partitions),
            headers=[("event-type", b"OrderCreated")],
        )
        producing.flush()
        [unreadable] = _records(settings, dlq, 1)
        [letter] = read_dead_letters(settings, [dlq])
        assert (letter.source_topic, letter.kind, letter.aggregate_id) == (
            events,
            "saga",
            poison,
        )
        assert "NotFramed" in letter.reason, letter.reason
        # The order's creation, dead-lettered as the feed does.
        original = _event_at(settings, events, created.partition, created.offset or 0)
        FeedHandler(settings, new_codec(settings)).dead_letter(
            original,
            "made by the test",
            producing,  # type: ignore[arg-type]
        )
        producing.flush()
        [_, missed] = _records(settings, dlq, 2)

        operations = Operations(settings, _now)
        for record in (unreadable, missed):
            [action] = operations.act("redrive", "grace", "fixed", record=record)
            assert action.produced is not None
            assert action.produced.startswith(f"{events}:")
        saga = get_until(
            f"{settings.web_url}/sagas/{order}",
            lambda r: r.status_code == 200 and r.json()["settled"],
            timeout=WAIT_S,
        ).json()
        assert saga["phase"] == "PAID", saga
        assert [s["message_type"] for s in saga["history"]] == [
            "Created",
            "Withdrawn",
            "Paid",
        ]
        eventually_equal(lambda: _order_status(settings, order), "PAID", WAIT_S)
        # The unreadable record, read again from where it was put back, is
        # dead-lettered again: a new open letter naming the re-driven copy.
        _records(settings, dlq, 3)
    again = read_dead_letters(settings, [dlq])[2]
    assert again.header(REDRIVEN_FROM) == unreadable
    assert again.aggregate_id == poison
