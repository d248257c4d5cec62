"""The write side against the real broker: results, concurrency, idempotency, poison."""

from __future__ import annotations

import shutil
import threading
import uuid
import zlib
from typing import Any

import pytest
from confluent_kafka import Producer

from app.adapters import mapper
from app.adapters.eventlog import FINGERPRINT_HEADER, partition_for
from app.client import PARTITIONER, CommandClient, frame_command, new_envelope
from app.domain.accounts import CloseAccount, Deposit, OpenAccount
from app.domain.orders import CreateOrder, LineItem
from app.runtime import REROUTED_HEADER
from app.settings import Settings
from app.workload import LONDON, deposit, new_order, payment, withdrawal
from app.writer import command_group
from tests.support import (
    events_by_aggregate,
    read_topic,
    results_by_command,
    rewind_group,
    running_worker,
)


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _order(order_id: str) -> CreateOrder:
    items = (
        LineItem(
            product_id="p-1", quantity=2, unit_price_minor=1250, tax_rate_bps=2000
        ),
        LineItem(product_id="p-2", quantity=1, unit_price_minor=999),
    )
    return new_order(order_id, "c-1", items, currency="EUR", address=LONDON)


def test_accepted_and_rejected_commands_get_one_result_each(
    deployment: Settings,
) -> None:
    account = _id("acc")
    with running_worker(deployment), CommandClient(deployment) as client:
        opened = client.send(
            OpenAccount(account_id=account, owner_id="c-1", currency="EUR")
        )
        deposited = client.send(
            deposit(account, 5000, "t-1", currency="EUR", reference="top-up")
        )
        refused = client.send(
            withdrawal(account, 9000, "t-2", currency="EUR", reference="rent")
        )
        order = client.send(_order(_id("ord")))
    assert opened.accepted and opened.version == 1
    assert deposited.accepted and deposited.version == 2
    assert deposited.partition is not None and deposited.offset is not None
    assert not refused.accepted
    assert refused.code == "InsufficientFunds"
    assert "90.00 EUR" in (refused.message or "")
    assert order.accepted and order.version == 1
    stream = events_by_aggregate(deployment, "accounts")[account]
    assert [e["metadata"]["stream_version"] for e in stream] == [1, 2]
    assert [e["metadata"]["event_type"] for e in stream] == [
        "AccountOpened",
        "MoneyDeposited",
    ]
    assert stream[1]["metadata"]["event_id"] == deposited.event_ids[0]
    # The order total is computed from its items, never taken from the client.
    orders = events_by_aggregate(deployment, "orders")
    created = orders[order.aggregate_id][0]
    assert created["total_minor"] == 2 * 1250 + 500 + 999


def test_stale_expected_version_is_rejected_and_writes_nothing(
    deployment: Settings,
) -> None:
    account = _id("acc")
    with running_worker(deployment), CommandClient(deployment) as client:
        client.send(OpenAccount(account_id=account, owner_id="c-1", currency="USD"))
        stale = client.send(
            deposit(account, 100, "t-1", source="cash"),
            expected_version=0,
        )
        fresh = client.send(
            deposit(account, 100, "t-2", source="cash"),
            expected_version=1,
        )
    assert not stale.accepted
    assert stale.code == "ConcurrencyConflict"
    assert "expected version 0" in (stale.message or "")
    assert "version 1" in (stale.message or "")
    assert fresh.accepted and fresh.version == 2
    assert len(events_by_aggregate(deployment, "accounts")[account]) == 2


def test_racing_clients_with_one_expected_version_one_wins(
    deployment: Settings,
) -> None:
    account = _id("acc")
    outcomes: list[bool] = []
    with running_worker(deployment):
        with CommandClient(deployment) as client:
            client.send(OpenAccount(account_id=account, owner_id="c-1", currency="USD"))

        def race(n: int) -> None:
            with CommandClient(deployment) as racer:
                result = racer.send(
                    deposit(account, 10, f"t-{n}", source="cash"),
                    expected_version=1,
                )
                outcomes.append(result.accepted)

        threads = [threading.Thread(target=race, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sorted(outcomes) == [False, False, False, True]
    assert len(events_by_aggregate(deployment, "accounts")[account]) == 2


def test_a_repeated_command_id_gets_the_same_result_across_restarts(
    deployment: Settings,
) -> None:
    account = _id("acc")
    cash = deposit(account, 700, "t-1", source="cash")
    with running_worker(deployment), CommandClient(deployment) as client:
        client.send(OpenAccount(account_id=account, owner_id="c-1", currency="USD"))
        first = client.send(cash, command_id="dep-once")
        again = client.send(cash, command_id="dep-once")
    with running_worker(deployment), CommandClient(deployment) as client:
        after_restart = client.send(cash, command_id="dep-once")
        closed = client.send(CloseAccount(account_id=account, reason="done"))
    assert first.accepted and first.version == 2
    assert (again.version, again.event_ids) == (first.version, first.event_ids)
    assert (after_restart.version, after_restart.event_ids) == (
        first.version,
        first.event_ids,
    )
    # The balance holds one deposit, so closing (which needs zero) is refused.
    assert closed.code == "NonZeroBalance"
    assert len(events_by_aggregate(deployment, "accounts")[account]) == 2
    # Every answer to the id, the ones sent again too, names the command it
    # answered (what the HTTP gateway tells a reused Idempotency-Key by).
    prints = [
        r.headers.get(FINGERPRINT_HEADER)
        for r in read_topic(deployment, deployment.topics.results)
        if r.key == b"dep-once"
    ]
    assert prints == [mapper.fingerprint(cash).encode()] * 3, prints


def test_poison_commands_are_dead_lettered_and_the_next_one_is_processed(
    deployment: Settings,
) -> None:
    topic = deployment.topics.commands("accounts")
    # The good command shares the poison's key, so its partition and its place
    # after them: its result proves the worker got past all three.
    account = _id("acc")
    key = account.encode()
    producer = Producer({**deployment.producer_config(), "partitioner": PARTITIONER})
    producer.produce(topic, b"not avro at all", key=key)
    producer.produce(topic, b"\x00\x00\x01\x86\xa0garbage", key=key)
    producer.produce(topic, b"x" * (deployment.max_message_bytes + 10), key=key)
    assert producer.flush(30) == 0
    with running_worker(deployment), CommandClient(deployment) as client:
        good = client.send(
            OpenAccount(account_id=account, owner_id="c-1", currency="USD")
        )
    assert good.accepted
    dead = read_topic(deployment, deployment.topics.dead_letter(topic))
    assert len(dead) == 3
    assert dead[0].value == b"not avro at all"
    assert dead[0].headers["dlq-source-topic"] == topic.encode()
    assert b"magic byte" in dead[0].headers["dlq-reason"].lower()
    assert b"schema id" in dead[1].headers["dlq-reason"].lower()
    assert b"exceeds the limit" in dead[2].headers["dlq-reason"]
    assert dead[2].value == b"x" * (deployment.max_message_bytes + 10)


def test_invalid_values_are_rejected_naming_the_field(deployment: Settings) -> None:
    order, account = _id("ord"), _id("acc")
    with running_worker(deployment), CommandClient(deployment) as client:
        missing = client.send(
            payment(order, 1, "pay-1", "tx", currency="EUR", method="cheque")
        )
        created = client.send(_order(order))
        cheque = client.send(
            payment(order, 3999, "pay-1", "tx", currency="EUR", method="cheque")
        )
        client.send(OpenAccount(account_id=account, owner_id="c-1", currency="USD"))
        negative = client.send(deposit(account, -5, "t-1", source="cash"))
    assert missing.code == "NotFound"
    assert created.accepted
    assert (cheque.code, cheque.field) == ("Validation", "method")
    assert (negative.code, negative.field) == ("Validation", "amount_minor")
    results = results_by_command(deployment)
    assert len(results) == 5


def test_results_sit_beside_their_aggregates(deployment: Settings) -> None:
    """A command's result goes to the results partition of its aggregate (keyed by
    command id): a writer that takes a partition over finds that partition's
    answers beside its events, and derives both from the log."""
    accounts = [_id("acc") for _ in range(24)]
    with running_worker(deployment), CommandClient(deployment) as client:
        ids = [
            client.submit(OpenAccount(account_id=a, owner_id="c-1", currency="EUR"))
            for a in accounts
        ]
        results = client.wait(ids, timeout=60)
    assert all(r.accepted for r in results)
    placed = {
        (m.key or b"").decode(): m.partition
        for m in read_topic(deployment, deployment.topics.results)
    }
    for command_id, account in zip(ids, accounts, strict=True):
        home = partition_for(account.encode(), deployment.partitions)
        assert placed[command_id] == home, command_id


def test_a_command_id_repeated_within_one_batch_is_decided_once(
    deployment: Settings,
) -> None:
    """Sent back to back, the repeats land in one batch of the agent: the same
    deposit twice, and the same command id for another account of the partition."""
    partitions = deployment.partitions
    first = _id("acc")
    home = partition_for(first.encode(), partitions)
    second = next(
        a
        for a in (_id("acc") for _ in range(1000))
        if partition_for(a.encode(), partitions) == home
    )

    def same_deposit(account: str) -> Deposit:
        return deposit(account, 300, "t-1", currency="EUR")

    with running_worker(deployment), CommandClient(deployment) as client:
        opened = [
            client.submit(OpenAccount(account_id=a, owner_id="c-1", currency="EUR"))
            for a in (first, second)
        ]
        client.wait(opened, timeout=30)
        ids = [
            client.submit(same_deposit(first), command_id="dep-x"),
            client.submit(same_deposit(second), command_id="dep-x"),
            client.submit(same_deposit(first), command_id="dep-x"),
        ]
        client.wait(ids, timeout=30)
    answers = {
        (r["status"], r["aggregate_id"], r["version"], tuple(r["event_ids"]))
        for r in results_by_command(deployment)["dep-x"]
    }
    assert len(answers) == 1
    assert next(iter(answers))[:3] == ("ACCEPTED", first, 2)
    streams = events_by_aggregate(deployment, "accounts")
    assert len(streams[first]) == 2
    assert len(streams[second]) == 1


def test_a_command_on_another_partition_than_its_aggregates_is_sent_on_there(
    deployment: Settings,
) -> None:
    """librdkafka's default partitioner hashes keys with CRC32, not murmur2, so a
    plain producer can put an account's commands on a partition other than the
    account's. The worker sends each on to the account's partition, in order: the
    deposits are decided against the open account, and a second open is refused."""
    n = deployment.partitions
    account = next(
        a
        for a in (_id("acc") for _ in range(1000))
        if zlib.crc32(a.encode()) % n != partition_for(a.encode(), n)
    )
    home = partition_for(account.encode(), n)
    with running_worker(deployment), CommandClient(deployment) as client:
        opened = client.send(
            OpenAccount(account_id=account, owner_id="c-1", currency="EUR")
        )
        plain = Producer(deployment.producer_config())  # CRC32 keys
        ids = []
        for command in [
            *(deposit(account, 100 * k, f"t-{k}", currency="EUR") for k in (1, 2, 3)),
            OpenAccount(account_id=account, owner_id="c-2", currency="EUR"),
        ]:
            envelope = new_envelope()
            framed = frame_command(deployment, client.codec, command, envelope)
            # No partition given: the producer's own partitioner picks one.
            plain.produce(
                framed.topic, framed.value, key=framed.key, headers=framed.headers
            )
            ids.append(str(envelope["command_id"]))
        assert plain.flush(30) == 0
        results = client.wait(ids, timeout=60)
    assert opened.accepted
    assert [(r.accepted, r.version) for r in results[:3]] == [
        (True, 2),
        (True, 3),
        (True, 4),
    ]
    assert not results[3].accepted
    sent = [
        m
        for m in read_topic(deployment, deployment.topics.commands("accounts"))
        if m.key == account.encode()
    ]
    # read_topic goes partition by partition: the client's open is on ``home``.
    direct = [m for m in sent if REROUTED_HEADER not in m.headers]
    originals = [m for m in direct if m.partition != home]
    copies = [m for m in sent if REROUTED_HEADER in m.headers]
    assert len(direct) == 5
    assert {m.partition for m in originals} == {zlib.crc32(account.encode()) % n}
    assert {m.partition for m in copies} == {home}
    # A retried batch may send a copy again; the repeat is answered, not decided.
    assert list(dict.fromkeys(m.headers[REROUTED_HEADER] for m in copies)) == [
        f"{m.partition}@{m.offset}".encode() for m in originals
    ]
    streams = events_by_aggregate(deployment, "accounts")
    assert len(streams[account]) == 4


@pytest.mark.slow
def test_commands_taken_again_get_no_second_answer(deployment: Settings) -> None:
    """The commands group set back to the log's beginning (what
    ``kafka-consumer-groups --reset-offsets --to-earliest`` does; a write process
    starts from the group's offsets so when a hanging transaction holds newer ones):
    every command record is taken again and writes nothing, neither events nor a
    second answer, nor a second dead letter or a second copy sent on, with the local
    store kept; with it rebuilt from the log, nothing is answered twice.
    A command id sent again afterwards is still answered again."""
    n = deployment.partitions
    account = next(
        a
        for a in (_id("acc") for _ in range(1000))
        if zlib.crc32(a.encode()) % n != partition_for(a.encode(), n)
    )
    topic = deployment.topics.commands("accounts")
    producer = Producer({**deployment.producer_config(), "partitioner": PARTITIONER})
    producer.produce(topic, b"not avro at all", key=account.encode())
    assert producer.flush(30) == 0
    cash = deposit(account, 500, "t-1", source="cash")
    with running_worker(deployment), CommandClient(deployment) as client:
        client.send(OpenAccount(account_id=account, owner_id="c-1", currency="USD"))
        first = client.send(cash, command_id="dep-again")
        client.send(cash, command_id="dep-again")
        refused = client.send(withdrawal(account, 10_000, "w-1"))
        # On the partition CRC32 picks, not the account's: sent on from there.
        envelope = new_envelope()
        framed = frame_command(
            deployment, client.codec, deposit(account, 7, "t-crc"), envelope
        )
        plain = Producer(deployment.producer_config())
        plain.produce(
            framed.topic, framed.value, key=framed.key, headers=framed.headers
        )
        assert plain.flush(30) == 0
        [sent_on] = client.wait([str(envelope["command_id"])], timeout=60)
    assert first.accepted and refused.code == "InsufficientFunds" and sent_on.accepted
    answers = {k: len(v) for k, v in results_by_command(deployment).items()}
    assert sorted(answers.values()) == [1, 1, 1, 2]

    def dead_and_copies() -> tuple[int, int]:
        dead = read_topic(deployment, deployment.topics.dead_letter(topic))
        copies = [
            m for m in read_topic(deployment, topic) if REROUTED_HEADER in m.headers
        ]
        return len(dead), len(copies)

    assert dead_and_copies() == (1, 1)
    for store in ("kept", "rebuilt"):
        rewind_group(
            deployment,
            command_group(deployment),
            [deployment.topics.commands(area) for area in ("orders", "accounts")],
        )
        if store == "rebuilt":
            for cache in (deployment.home / "write-state").glob(
                f"{deployment.app_id}-*"
            ):
                shutil.rmtree(cache)
        with running_worker(deployment), CommandClient(deployment) as client:
            later = client.send(deposit(account, 1, f"t-{store}", source="cash"))
            again = client.send(cash, command_id="dep-again")
        assert later.accepted, store
        assert (again.version, again.event_ids) == (first.version, first.event_ids)
        answers[later.command_id] = 1
        answers["dep-again"] += 1
        found = {k: len(v) for k, v in results_by_command(deployment).items()}
        assert found == answers, store
        if store == "kept":
            # Rebuilt, the store knows only the answers: the poison is
            # dead-lettered again, the record sent on is sent on again.
            assert dead_and_copies() == (1, 1)
    versions = [e["metadata"]["stream_version"] for e in _stream(deployment, account)]
    assert versions == [1, 2, 3, 4, 5]


def _stream(settings: Settings, account: str) -> list[dict[str, Any]]:
    return events_by_aggregate(settings, "accounts")[account]
