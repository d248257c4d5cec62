"""When a Faust-table view must be folded again from the committed log (the
order and account views by version, the saga view by its history)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from agents.saga import AT, after_an_abort
from app.projections.views import fold_account, needs_healing, refold


def meta(version: int, event_id: str, kind: str = "MoneyDeposited") -> dict[str, Any]:
    return {
        "event_type": kind,
        "aggregate_id": "a-1",
        "stream_version": version,
        "event_id": event_id,
        "timestamp": datetime(2026, 12, 2, tzinfo=UTC),
    }


OPENED = (
    meta(1, "e1", "AccountOpened"),
    {
        "account_id": "a-1",
        "owner_id": "o",
        "currency": "USD",
        "overdraft_limit_minor": 0,
    },
)


def deposit(version: int, event_id: str, balance: int) -> tuple[Any, Any]:
    return meta(version, event_id), {"balance_after_minor": balance}


def test_the_next_version_folds_without_healing() -> None:
    opened = fold_account(None, *OPENED)
    nxt = deposit(2, "e2", 10)
    folded = fold_account(opened, *nxt)
    assert folded is not None and folded["version"] == 2 and folded["event_id"] == "e2"
    assert not needs_healing(opened, nxt[0], folded)


def test_a_new_gap_needs_healing_an_old_one_does_not_again() -> None:
    opened = fold_account(None, *OPENED)
    skipped = deposit(3, "e3", 10)
    folded = fold_account(opened, *skipped)
    assert folded is not None and folded["gap"] is True
    assert needs_healing(opened, skipped[0], folded)
    # The log itself has the gap: healing showed it, it is not healed again.
    later = deposit(4, "e4", 20)
    assert not needs_healing(folded, later[0], fold_account(folded, *later))


def test_another_event_at_a_folded_version_needs_healing_a_repeat_does_not() -> None:
    opened = fold_account(None, *OPENED)
    aborted = fold_account(opened, *deposit(2, "aborted", 99))
    assert not needs_healing(aborted, deposit(2, "aborted", 99)[0], None)
    assert needs_healing(aborted, deposit(2, "committed", 10)[0], None)
    # An older version is a plain repeat.
    assert not needs_healing(aborted, OPENED[0], None)


def test_refold_folds_in_order_and_skips_repeats() -> None:
    row = refold(fold_account, [OPENED, deposit(2, "e2", 10), deposit(2, "e2", 10)])
    assert row is not None
    assert (row["version"], row["balance_minor"], row["gap"]) == (2, 10, False)
    assert refold(fold_account, []) is None


def saga_state(*steps: str, phase: str = "CHARGING") -> dict[str, Any]:
    return {"order_id": "o-1", "phase": phase, "history": [{"step": s} for s in steps]}


def test_a_saga_state_no_longer_than_the_shown_one_heals_the_view() -> None:
    shown = saga_state("created", "withdraw sent")
    # The next committed state, or the same one written again: no healing.
    assert not after_an_abort(shown, saga_state("created", "withdraw sent", "paid"))
    assert not after_an_abort(shown, saga_state("created", "withdraw sent"))
    assert not after_an_abort(None, saga_state("created"))
    # The view keeps where it read the shown state beside it; that is no change.
    assert not after_an_abort({**shown, AT: 4}, saga_state("created", "withdraw sent"))
    # What the owner wrote after a zombie's step that aborted: the view heals.
    assert after_an_abort(shown, saga_state("created", "timed out", phase="CANCELLING"))
    assert after_an_abort(shown, saga_state("created"))
