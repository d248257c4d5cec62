"""The command service between the domain and the log, and the stores it runs on:
one contract, run against the in-memory store (``app.adapters.memory``) and the
writer's RocksDB-backed ``AggregateCache`` (decisions stay provisional until the
batch commits)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from app.adapters.logtail import StateCache
from app.adapters.memory import MemoryStore
from app.application.commands import (
    CONCURRENCY_CONFLICT,
    CommandService,
    Envelope,
)
from app.domain.accounts import OpenAccount
from app.runtime import ACCOUNTS, AggregateCache
from app.workload import deposit


@pytest.fixture(params=["memory", "rocksdb"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    cache = StateCache(tmp_path / "cache")
    yield AggregateCache(cache, ACCOUNTS, partitions=4)
    cache.close()


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
DEPOSIT = deposit("acc-1", 500, "t-1", currency="EUR")


# Both backends: the port, and what the processor does when a batch ends.
Store = MemoryStore | AggregateCache


def _service(store: Store) -> CommandService:
    return CommandService(aggregate=ACCOUNTS, store=store)


def test_a_decision_changes_nothing_until_applied(store: Store) -> None:
    service = _service(store)
    decision = service.decide(_envelope("c-1"), OPEN)
    assert decision.result is not None and decision.result.accepted
    assert [new.metadata.stream_version for new in decision.events] == [1]
    assert store.load("acc-1") is None
    service.apply(decision)
    versioned = store.load("acc-1")
    assert versioned is not None and versioned.version == 1


def test_a_second_command_in_a_batch_decides_on_the_first_ones_state(
    store: Store,
) -> None:
    service = _service(store)
    service.apply(service.decide(_envelope("c-1"), OPEN))
    deposit = service.decide(_envelope("c-2"), DEPOSIT)
    assert deposit.result is not None and deposit.result.version == 2
    assert deposit.events[0].metadata.stream_version == 2


def test_a_stale_expected_version_is_rejected_naming_both_and_writes_nothing(
    store: Store,
) -> None:
    service = _service(store)
    service.apply(service.decide(_envelope("c-1"), OPEN))
    decision = service.decide(_envelope("c-2", expected=0), DEPOSIT)
    assert decision.events == ()
    assert decision.result is not None and not decision.result.accepted
    assert decision.result.code == CONCURRENCY_CONFLICT
    assert "expected version 0" in (decision.result.message or "")
    assert "at version 1" in (decision.result.message or "")


def test_a_command_id_answered_before_gets_that_answer_and_is_not_decided(
    store: Store,
) -> None:
    service = _service(store)
    service.apply(service.decide(_envelope("c-1"), OPEN))
    store.remember_answer("c-1", b"the answer as sent")
    again = service.decide(_envelope("c-1"), OPEN)
    assert again.repeat == b"the answer as sent"
    assert again.events == () and again.result is None


def test_a_decided_command_s_result_names_it_by_its_fingerprint(store: Store) -> None:
    service = _service(store)
    accepted = service.decide(_envelope("c-1"), OPEN, "f1")
    assert accepted.result is not None and accepted.result.fingerprint == "f1"
    service.apply(accepted)
    refused = service.decide(_envelope("c-2"), OPEN, "f2")  # already exists
    assert refused.result is not None and not refused.result.accepted
    assert refused.result.fingerprint == "f2"
    stale = service.decide(_envelope("c-3", expected=7), OPEN, "f3")
    assert stale.result is not None and stale.result.fingerprint == "f3"


def test_a_refused_command_is_rejected_unless_its_id_was_answered(
    store: Store,
) -> None:
    service = _service(store)
    refused = service.refuse(_envelope("c-9"), "acc-1", "Validation", "bad", "amount")
    assert refused.result is not None and not refused.result.accepted
    assert (refused.result.code, refused.result.field) == ("Validation", "amount")
    assert refused.events == () and refused.repeat is None
    store.remember_answer("c-9", b"the first answer")
    again = service.refuse(_envelope("c-9"), "acc-1", "Validation", "bad", "amount")
    assert again.repeat == b"the first answer" and again.result is None


def test_event_ids_are_deterministic(store: Store) -> None:
    first = _service(store).decide(_envelope("c-1"), OPEN)
    second = _service(MemoryStore()).decide(_envelope("c-1"), OPEN)
    assert first.events[0].metadata.event_id == second.events[0].metadata.event_id


def test_a_batch_stays_provisional_until_it_commits(store: Store) -> None:
    service = _service(store)
    service.apply(service.decide(_envelope("c-1"), OPEN))
    store.remember_answer("c-1", b"accepted")
    assert store.answered("c-1") == b"accepted"  # within the batch
    store.drop()  # the transaction aborted
    assert store.load("acc-1") is None and store.answered("c-1") is None
    service.apply(service.decide(_envelope("c-1"), OPEN))
    store.remember_answer("c-1", b"accepted")
    store.commit()
    store.drop()  # nothing pending is left to drop
    versioned = store.load("acc-1")
    assert versioned is not None and versioned.version == 1
    assert store.answered("c-1") == b"accepted"


def test_the_cache_keeps_what_was_committed_across_a_restart(tmp_path: Path) -> None:
    cache = StateCache(tmp_path / "cache")
    store = AggregateCache(cache, ACCOUNTS, partitions=4)
    service = _service(store)
    service.apply(service.decide(_envelope("c-1"), OPEN))
    store.remember_answer("c-1", b"accepted")
    store.commit(taken={("t.commands", 1): 7})
    store.write({}, {}, {("t.events", 3): 42})
    cache.close()

    reopened = StateCache(tmp_path / "cache")  # a restart reads what was committed
    again = AggregateCache(reopened, ACCOUNTS, partitions=4)
    versioned = again.load("acc-1")
    assert versioned is not None and versioned.version == 1
    assert again.answered("c-1") == b"accepted"
    assert reopened.offset(("t.events", 3)) == 42
    assert reopened.offset(("t.events", 2)) == 0
    assert reopened.offset(("t.commands", 1)) == 7
    reopened.close()


def test_changed_states_are_marked_for_the_next_snapshot(tmp_path: Path) -> None:
    cache = StateCache(tmp_path / "cache", "shape-1")
    store = AggregateCache(cache, ACCOUNTS, partitions=4)
    service = _service(store)
    service.apply(service.decide(_envelope("c-1"), OPEN))
    store.commit()
    mark = store.dirty_key("acc-1")
    partition = int(mark.split("/")[1])
    assert store.dirty(partition, 10) == [mark]
    # Snapshotted in a batch that changes the state again: still marked.
    service.apply(service.decide(_envelope("c-2"), DEPOSIT))
    store.commit(snapshotted=[mark])
    assert store.dirty(partition, 10) == [mark]
    store.commit(snapshotted=[mark])
    assert store.dirty(partition, 10) == []
    # A snapshot's states come back committed and clean.
    store.restore({"acc-9": b'{"state":{},"version":3}'})
    assert store.dirty(partition, 10) == []
    cache.close()


def test_a_cache_of_another_shape_is_dropped(tmp_path: Path) -> None:
    cache = StateCache(tmp_path / "cache", "shape-1")
    cache.write({}, {"r/acc-1": b"{}"}, {("t.events", 0): 7})
    cache.close()
    same = StateCache(tmp_path / "cache", "shape-1")
    assert same.get_raw("r/acc-1") == b"{}" and same.known(("t.events", 0))
    same.close()
    other = StateCache(tmp_path / "cache", "shape-2")
    assert other.get_raw("r/acc-1") is None and not other.known(("t.events", 0))
    other.close()
