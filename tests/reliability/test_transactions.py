"""The write side's transactions against the real broker: a paused writer whose
partitions moved on (a zombie) writes nothing a read_committed reader sees, an
event someone else appended is folded before the next decision, without a restart,
and the worker's fencing of a write process's ids ahead of it aborts what the
slot's last holder left open without fencing the new holder."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

from app.adapters import topics
from app.adapters.eventlog import encode_event, partition_for
from app.adapters.processor import Processor
from app.adapters.saga_io import feed_group
from app.adapters.topics import (
    TopicSpec,
    committed_offsets,
    ensure_topics,
    log_ends,
    records_of_key,
    stable_ends,
)
from app.application.commands import Metadata, NewEvent, event_id
from app.client import CommandClient
from app.domain.accounts import Deposit, MoneyDeposited, OpenAccount
from app.local.deployments import free_port
from app.local.process import wait_for
from app.projections.replay import group_members
from app.settings import Settings
from app.workload import charged_order, deposit, funded_account, withdrawal
from app.writer import WRITER_NAME, command_group
from app.writeside import fence
from bench.harness import process_tree
from tests.invariants import assert_write_side_promises, serving_worker
from tests.support import (
    codec_for,
    events_by_aggregate,
    read_topic,
    results_by_command,
    running_worker,
)
from tests.unit.deciders import recorded

ACCOUNTS = 8


def _deposit(account: str, n: int) -> Deposit:
    return deposit(account, 1, f"t-{n}", source="s")


@pytest.mark.slow
def test_a_paused_writer_is_fenced_and_rejoins(deployment: Settings) -> None:
    other = dataclasses.replace(deployment, web_port=free_port())
    accounts = [f"z-{n}" for n in range(ACCOUNTS)]
    with serving_worker(deployment, "a") as first, CommandClient(deployment) as client:
        opened = [
            client.submit(OpenAccount(account_id=a, owner_id="o", currency="USD"))
            for a in accounts
        ]
        sent = list(opened)
        client.wait(opened, timeout=120)
        with serving_worker(other, "b"):
            group = command_group(deployment)
            wait_for(lambda: group_members(deployment, group) == 2, 60, "two writers")
            assert first.pid() is not None
            writers = [
                pid
                for pid in process_tree(first.pid())()[1:]
                if Path(f"/proc/{pid}/comm").read_text().strip() == WRITER_NAME
            ]
            assert len(writers) == 1, "the first worker has no write process"
            n = 0
            for _ in range(50):  # a load in flight when the writer stops
                sent += [client.submit(_deposit(a, n)) for a in accounts]
                n += 1
            client.flush()
            for pid in writers:
                os.kill(pid, signal.SIGSTOP)
            try:
                paused_at = time.monotonic()
                while time.monotonic() - paused_at < deployment.session_timeout_s + 5:
                    sent += [client.submit(_deposit(a, n)) for a in accounts]
                    n += 1
                    time.sleep(0.2)
                client.wait(sent, timeout=120)  # the other worker took over
            finally:
                for pid in writers:
                    os.kill(pid, signal.SIGCONT)
            # The resumed writer rejoins and shares the work again.
            wait_for(lambda: group_members(deployment, group) == 2, 90, "rejoined")
            more = [client.submit(_deposit(a, n + 1)) for a in accounts]
            sent += more
            results = client.wait(sent, timeout=120)
    assert all(r.accepted for r in results), [r for r in results if not r.accepted][:3]
    streams = assert_write_side_promises(deployment, results)
    for account in accounts:
        versions = [
            e["metadata"]["stream_version"] for e in streams["accounts"][account]
        ]
        assert versions == list(range(1, len(versions) + 1)), account


def test_an_event_appended_by_someone_else_is_folded_before_the_next_decision(
    deployment: Settings,
) -> None:
    account = f"imp-{uuid.uuid4().hex[:6]}"
    codec = codec_for(deployment)
    topic = deployment.topics.events("accounts")
    with serving_worker(deployment), CommandClient(deployment) as client:
        opened = client.send(
            OpenAccount(account_id=account, owner_id="o", currency="USD")
        )
        assert opened.accepted and opened.version == 1
        # An import: the money arrives as an event, not as a command.
        now = datetime.now(UTC)
        imported = NewEvent(
            metadata=Metadata(
                event_id=event_id("account", account, 2, "import-1"),
                event_type="MoneyDeposited",
                aggregate_type="account",
                aggregate_id=account,
                stream_version=2,
                timestamp=now,
                user_id="importer",
                correlation_id="import-1",
                causation_id="import-1",
                command_id="import-1",
            ),
            event=recorded(
                MoneyDeposited,
                deposit(account, 700, "legacy-1", source="legacy"),
                balance_after_minor=700,
            ),
        )
        value, headers, timestamp_ms = encode_event(codec, topic, imported)
        producer = Producer(deployment.producer_config())
        producer.produce(
            topic,
            value,
            key=account.encode(),
            partition=partition_for(account.encode(), deployment.partitions),
            headers=headers,
            timestamp=timestamp_ms,
        )
        assert producer.flush(30) == 0
        # Only a state that holds the imported deposit allows this, at version 3.
        spent = client.send(
            withdrawal(account, 700, "w-1", destination="d"),
            expected_version=2,
        )
    assert spent.accepted, spent
    assert spent.version == 3


def test_fencing_a_slot_ahead_aborts_what_its_last_holder_left_open(
    deployment: Settings,
) -> None:
    topic = f"{deployment.topics.prefix}fenced"
    ensure_topics(deployment, [TopicSpec(topic, 1)])
    slot = {**deployment.producer_config(), "transactional.id": f"{topic}-slot"}
    dead = Producer(slot)
    dead.init_transactions(30)
    dead.begin_transaction()
    dead.produce(topic, key=b"k", value=b"left open")
    assert dead.flush(30) == 0
    assert stable_ends(deployment, [topic]) == {(topic, 0): 0}
    assert log_ends(deployment, [topic]) == {(topic, 0): 1}

    fence(deployment, [str(slot["transactional.id"])])

    # Aborted before the slot's next producer starts: the marker is written and
    # read_committed readers are no longer held back.
    assert stable_ends(deployment, [topic]) == {(topic, 0): 2}
    assert log_ends(deployment, [topic]) == {(topic, 0): 2}
    new = Producer(slot)
    new.init_transactions(30)
    new.begin_transaction()
    new.produce(topic, key=b"k", value=b"committed")
    new.commit_transaction(30)  # not fenced by the fencing producer
    with pytest.raises(KafkaException):
        dead.commit_transaction(10)
    assert records_of_key(deployment, topic, 0, b"k", 4) == [b"committed"]


def test_a_lookup_of_held_offsets_times_out_until_their_transaction_ends(
    deployment: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """librdkafka waits out a lookup of committed offsets that an open transaction
    holds, and then says only "Timed out"; a processor's assignment fails the same
    way (its new clients look again), and once the transaction ends the lookup
    answers the offsets last committed."""
    monkeypatch.setattr(topics, "LOOKUP_S", 3.0)
    topic = deployment.topics.commands("accounts")
    group = f"{deployment.app_id}.held"
    consumer = Consumer(
        {**deployment.consumer_config(), "group.id": group, "enable.auto.commit": False}
    )
    holder = Producer(
        {
            **deployment.producer_config(),
            "transactional.id": f"{group}-holder",
            "transaction.timeout.ms": 60_000,
        }
    )
    processor = Processor(
        deployment, group=group, transactional_id=f"{group}-0", handlers=[]
    )
    own = Producer(processor.producer_config())
    partitions = [TopicPartition(topic, 0)]
    try:
        for producer in (holder, own):
            producer.init_transactions(30)
        own.begin_transaction()
        own.send_offsets_to_transaction(
            [TopicPartition(topic, 0, 3)], consumer.consumer_group_metadata(), 30
        )
        own.commit_transaction(30)
        holder.begin_transaction()
        holder.send_offsets_to_transaction(
            [TopicPartition(topic, 0, 5)], consumer.consumer_group_metadata(), 30
        )
        with pytest.raises(KafkaException) as held:
            committed_offsets(consumer, partitions, 3.0)
        assert held.value.args[0].code() == KafkaError._TIMED_OUT
        with pytest.raises(KafkaException) as assigning:
            processor._on_assign(consumer, partitions)
        assert assigning.value.args[0].code() == KafkaError._TIMED_OUT
        assert processor.report.assigned == set()
        # A processor whose handlers take input again harmlessly starts from the
        # offsets the group has, while the hold stays.
        safe = Processor(
            deployment,
            group=group,
            transactional_id=f"{group}-1",
            handlers=[],
            replays_safely=True,
        )
        safe._on_assign(consumer, partitions)
        assert safe.report.held_lookups == 1
        assert safe._committed == {(topic, 0): 3}
        with pytest.raises(KafkaException):
            committed_offsets(consumer, partitions, 3.0)  # still held
        holder.abort_transaction(30)
        [after] = committed_offsets(consumer, partitions)
        assert after.offset == 3  # the held 5 was aborted
    finally:
        consumer.close()


@pytest.mark.slow
def test_the_saga_feed_goes_on_past_offsets_a_transaction_keeps_holding(
    deployment: Settings,
) -> None:
    """A transaction that holds the saga feed's offsets past the lookup's time (as
    Kafka kept one after a broker SIGKILL in the soak of 2026-12-05 01:27, which
    stopped every refund) does not stop the saga: the feed starts from the offsets
    the group has (here none: the hold comes first), and an order paid from an
    account settles while the hold is still there, each command answered once."""
    group = feed_group(deployment)
    account, order = _id("acc"), _id("ord")
    partitions = [
        TopicPartition(topic, p)
        for topic in (
            deployment.topics.events("orders"),
            deployment.topics.events("accounts"),
            deployment.topics.results,
        )
        for p in range(deployment.partitions)
    ]
    consumer = Consumer(
        {**deployment.consumer_config(), "group.id": group, "enable.auto.commit": False}
    )
    holder = Producer(
        {
            **deployment.producer_config(),
            "transactional.id": f"{group}-holder",
            "transaction.timeout.ms": 300_000,
        }
    )
    try:
        holder.init_transactions(30)
        holder.begin_transaction()
        holder.send_offsets_to_transaction(
            [TopicPartition(tp.topic, tp.partition, 0) for tp in partitions],
            consumer.consumer_group_metadata(),
            30,
        )
        with pytest.raises(KafkaException):
            committed_offsets(consumer, partitions, 3.0)
        with running_worker(deployment), CommandClient(deployment) as client:
            for command in (
                *funded_account(account, 5_000),
                charged_order(order, account, 1_000),
            ):
                assert client.send(command, timeout=60).accepted
            wait_for(
                lambda: _event_types(deployment, order)[-1:] == ["PaymentProcessed"],
                120,
                f"order {order} paid by the saga",
            )
            status = httpx.get(f"{deployment.web_url}/status", timeout=5).json()
        with pytest.raises(KafkaException):
            committed_offsets(consumer, partitions, 3.0)  # the hold is still there
    finally:
        holder.abort_transaction(30)
        consumer.close()
    held = [
        report.get(group, {}).get("held_lookups", 0)
        for report in status["write"]["processes"]
    ]
    assert sum(held) >= 1, status["write"]
    answers = results_by_command(deployment)
    assert sorted(len(a) for a in answers.values()) == [1] * len(answers)
    assert len(answers) == 5  # open, deposit, order; the saga's withdrawal, payment


def _event_types(settings: Settings, order: str) -> list[str]:
    return [
        e["metadata"]["event_type"]
        for e in events_by_aggregate(settings, "orders").get(order, [])
    ]


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_a_read_of_a_topic_waits_for_a_transaction_committing_meanwhile(
    deployment: Settings,
) -> None:
    """``read_topic`` reads to each partition's log end: a read_committed consumer
    is told the last stable offset as its high watermark, which stays below a
    transaction until its markers arrive, so a read started then would stop short
    (a test saw every event of a partition missing, its results already seen)."""
    topic = deployment.topics.events("accounts")
    producer = Producer(
        {**deployment.producer_config(), "transactional.id": f"{topic}-reader-test"}
    )
    producer.init_transactions(30)
    producer.begin_transaction()
    for n in range(3):
        producer.produce(topic, f"r-{n}".encode(), partition=0)
    producer.flush(30)
    committing = threading.Timer(2.0, producer.commit_transaction, args=(30,))
    committing.start()
    try:
        found = read_topic(deployment, topic)
    finally:
        committing.join()
    assert [r.value for r in found] == [b"r-0", b"r-1", b"r-2"]


def test_the_dead_letter_overview_shows_every_action_committed_before_it(
    deployment: Settings,
) -> None:
    """The console lists the dead letters again right after an operator's action: its
    overview reads the operator actions to the log end, not to the last stable
    offset, which stays below an action committed after a transaction still open
    there, and below one committed a moment ago until its marker lands (a console
    test once saw a re-drive never shown)."""
    from app.adapters.deadletters import ensure_actions_topic, read_overview
    from app.deadletters import Action

    ensure_actions_topic(deployment)
    topic = deployment.topics.operator_actions

    def producer(name: str) -> Producer:
        made = Producer(
            {**deployment.producer_config(), "transactional.id": f"{topic}-{name}"}
        )
        made.init_transactions(30)
        made.begin_transaction()
        return made

    holder = producer("holder")
    holder.produce(topic, b"never committed")
    holder.flush(30)
    done = Action(
        action_id=str(uuid.uuid4()),
        at=datetime.now(UTC),
        operator="grace",
        verb="discard",
        record=f"{topic}.dlq:0:0",
        reason="seen after the open transaction",
    )
    other = producer("other")
    other.produce(topic, done.to_json())
    other.commit_transaction(30)
    aborting = threading.Timer(2.0, holder.abort_transaction, args=(30,))
    aborting.start()
    try:
        overview = read_overview(deployment)
    finally:
        aborting.join()
    assert [a.action_id for a in overview.actions] == [done.action_id]
