"""The command service between the domain and the log: decisions save nothing until
they are completed, answers are remembered by command id, and recovery folds the
log into records and answers. No broker: positions stand for acknowledgements."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import faust

from app.application.commands import (
    CONCURRENCY_CONFLICT,
    CommandService,
    Envelope,
    Position,
)
from app.domain.accounts import Deposit, OpenAccount
from app.runtime import ACCOUNTS, TableStore, result_to_json


class _Writes(dict[str, object]):
    """A table that remembers the order of its writes, as a changelog would."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[str] = []

    def __setitem__(self, key: str, value: object) -> None:
        self.order.append(key)
        super().__setitem__(key, value)


def _service() -> tuple[CommandService, TableStore]:
    store = TableStore(_Writes(), ACCOUNTS)
    return CommandService(aggregate=ACCOUNTS, store=store), store


def _envelope(command_id: str, expected: int | None = None) -> Envelope:
    return Envelope(
        command_id=command_id,
        correlation_id=command_id,
        causation_id=command_id,
        user_id="u-1",
        issued_at=datetime(2026, 11, 26, tzinfo=UTC),
        expected_version=expected,
    )


OPEN = OpenAccount(account_id="acc-1", owner_id="o-1", currency="EUR")
DEPOSIT = Deposit(
    account_id="acc-1",
    transaction_id="t-1",
    amount_minor=500,
    currency="EUR",
    source="card",
    reference="",
)


def test_a_decision_changes_nothing_until_it_is_completed() -> None:
    service, store = _service()
    decision = service.decide(_envelope("c-1"), OPEN)
    assert [type(e.event).__name__ for e in decision.events] == ["AccountOpened"]
    assert store.load("acc-1") is None
    assert store.answer("c-1") is None
    result = service.complete(decision, [Position(partition=2, offset=7)])
    assert result.accepted and result.version == 1
    assert result.position == Position(partition=2, offset=7)
    assert store.answer("c-1") == result
    record = store.load("acc-1")
    assert record is not None and record.version == 1


def test_a_repeated_command_id_is_answered_as_before_and_saves_nothing() -> None:
    service, store = _service()
    first = service.complete(
        service.decide(_envelope("c-1"), OPEN), [Position(partition=0, offset=0)]
    )
    again = service.decide(_envelope("c-1"), OPEN)
    assert again.record is None and again.events == ()
    assert service.complete(again) == first
    record = store.load("acc-1")
    assert record is not None and record.version == 1


def test_a_stale_expected_version_is_rejected_remembered_and_writes_no_event() -> None:
    service, store = _service()
    service.complete(
        service.decide(_envelope("c-1"), OPEN), [Position(partition=0, offset=0)]
    )
    decision = service.decide(_envelope("c-2", expected=0), DEPOSIT)
    assert decision.events == ()
    rejected = service.complete(decision)
    assert rejected.code == CONCURRENCY_CONFLICT
    assert "expected version 0" in (rejected.message or "")
    assert store.answer("c-2") == rejected
    record = store.load("acc-1")
    assert record is not None and record.version == 1


def test_recovery_folds_the_log_into_records_and_answers_once() -> None:
    source, _ = _service()
    opened = source.decide(_envelope("c-1"), OPEN)
    source.complete(opened, [Position(partition=0, offset=0)])
    deposit = source.decide(_envelope("c-2"), DEPOSIT)
    source.complete(deposit, [Position(partition=0, offset=1)])
    log = [(new, n) for n, d in enumerate((opened, deposit)) for new in d.events]

    service, store = _service()  # a lost table, rebuilt from the log
    for new, offset in log + log:  # read twice: a repeat changes nothing
        service.replay(new.metadata, new.event, Position(partition=0, offset=offset))
    record = store.load("acc-1")
    assert record is not None and record.version == 2
    answer = store.answer("c-2")
    assert answer is not None and answer.accepted and answer.version == 2
    assert answer.event_ids == deposit.result.event_ids
    assert answer.position == Position(partition=0, offset=1)
    # The re-sent command is answered from the log, not decided again.
    assert service.decide(_envelope("c-2"), DEPOSIT).events == ()
    # Each answer is written before the record that holds its events.
    assert store.table.order == [
        "\x00answer/c-1",
        "acc-1",
        "\x00answer/c-2",
        "acc-1",
    ]


def test_answer_then_record_reach_the_changelog_and_durable_waits_for_both() -> None:
    """Through a Faust table of its own: each write is buffered for the changelog,
    the answer before the record (a crash keeps a prefix of them), and ``durable``
    returns once the producer has an acknowledgement for each."""

    async def scenario() -> None:
        app = faust.App(
            "durable-probe", broker="kafka://127.0.0.1:1", store="memory://"
        )
        store = TableStore(app.Table("records", partitions=1), ACCOUNTS, "commands")
        service = CommandService(aggregate=ACCOUNTS, store=store)
        with store.partition(0):
            service.complete(
                service.decide(_envelope("c-1"), OPEN),
                [Position(partition=0, offset=0)],
            )
        waiting = asyncio.ensure_future(store.durable())
        await asyncio.sleep(0.05)
        assert not waiting.done()  # no broker here: nothing is acknowledged
        buffered = app.producer.buffer.pending
        sent = [buffered.get_nowait() for _ in range(buffered.qsize())]
        keys = [json.loads(m.message.key) for m in sent]  # Faust's JSON keys
        assert keys == ["\x00answer/c-1", "acc-1"]
        assert {m.message.partition for m in sent} == {0}
        sent[0].set_result(None)
        await asyncio.sleep(0.05)
        assert not waiting.done()
        sent[1].set_result(None)
        await asyncio.wait_for(waiting, 5)

    asyncio.run(scenario())


def test_a_record_that_kept_its_answers_gets_them_keyed_once() -> None:
    # The format before answers had keys of their own: the record kept its last ones.
    service, store = _service()
    result = service.complete(
        service.decide(_envelope("c-1"), OPEN), [Position(partition=0, offset=0)]
    )
    table = store.table
    legacy = {**table["acc-1"], "recent": [result_to_json(result)]}
    table.clear()
    table["acc-1"] = legacy
    table.order.clear()

    record = store.load("acc-1")
    assert record is not None and record.version == 1
    # The answer before the record that no longer carries it, as complete() writes.
    assert table.order == ["\x00answer/c-1", "acc-1"]
    assert "recent" not in table["acc-1"]
    assert store.answer("c-1") == result
    store.load("acc-1")
    assert table.order == ["\x00answer/c-1", "acc-1"]  # nothing written again
