"""Dead letters re-driven against the real broker, registry and Postgres: two
operators racing on the same records re-drive each once; an action committed behind
another's open transaction still counts; a projection's dead letter, re-driven from
the CLI once its cause is fixed, reaches the read model; a saga inbox's, re-driven
once its cause is fixed, gets the order paid."""

from __future__ import annotations

import dataclasses
import json
import threading
import uuid
from collections import Counter
from datetime import UTC, datetime

import httpx
import psycopg
import pytest
from confluent_kafka import Producer

from app.adapters.codec import ConfluentRegistry
from app.adapters.deadletters import (
    DeadLetterError,
    Operations,
    Raced,
    read_actions,
    read_dead_letters,
    transactional_id,
)
from app.adapters.topics import inbox_topic
from app.audit import read_topic
from app.client import CommandClient
from app.deadletters import REDRIVEN_FROM, Action, ActionRefused, record_id
from app.domain.accounts import OpenAccount
from app.projections.engine import dead_letter_topic
from app.settings import ApiToken, Settings
from app.waiting import eventually
from app.workload import charged_order, deposit, funded_account
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
