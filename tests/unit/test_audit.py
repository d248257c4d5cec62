"""The audit's checks find what they are there to find (and nothing in a clean log)."""

from __future__ import annotations

from typing import Any

from app import audit


def _event(aggregate: str, version: int, kind: str, **fields: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "aggregate_id": aggregate,
            "stream_version": version,
            "event_type": kind,
            "event_id": f"{aggregate}/{version}/{fields.pop('eid', kind)}",
        },
        **fields,
    }


def _account(*movements: tuple[str, int, str]) -> list[dict[str, Any]]:
    events = [_event("acc", 1, "AccountOpened", currency="EUR")]
    balance = 0
    for n, (kind, amount, transaction) in enumerate(movements, start=2):
        balance += amount if kind == "MoneyDeposited" else -amount
        events.append(
            _event(
                "acc",
                n,
                kind,
                amount_minor=amount,
                transaction_id=transaction,
                balance_after_minor=balance,
            )
        )
    return events


def test_a_clean_log_passes_every_check() -> None:
    account = _account(
        ("MoneyDeposited", 500, "d1"), ("MoneyWithdrawn", 200, "order-payment:o1")
    )
    order = [
        _event("o1", 1, "OrderCreated", account_id="acc", total_minor=200, items=[{}]),
        _event("o1", 2, "PaymentProcessed"),
    ]
    streams = {"acc": account, "o1": order}
    assert audit.check_streams(streams).ok
    assert audit.check_balances({"acc": account}).ok
    assert audit.check_payments({"o1": order}, {"acc": account}).ok
    assert audit.expected_ledger({"acc": account})["balances"] == {
        "acc": ("EUR", 300, "OPEN", 3)
    }


def test_a_gap_and_a_clash_in_a_stream_are_reported() -> None:
    gap = [_event("a", 1, "X"), _event("a", 3, "X")]
    clash = [_event("b", 1, "X"), _event("b", 1, "Y")]
    finding = audit.check_streams({"a": gap, "b": clash})
    assert not finding.ok
    assert any(p.startswith("a: versions") for p in finding.problems)
    assert any(p.startswith("b: two events at version") for p in finding.problems)


def test_a_repeated_event_counts_once() -> None:
    account = _account(("MoneyDeposited", 500, "d1"))
    repeated = [*account, account[-1]]
    assert audit.check_streams({"acc": repeated}).ok
    balances, problems = audit.fold_balances({"acc": repeated})
    assert balances == {"acc": 500} and not problems


def test_a_recorded_balance_that_is_not_the_fold_is_reported() -> None:
    account = _account(("MoneyDeposited", 500, "d1"))
    account[-1]["balance_after_minor"] = 499
    finding = audit.check_balances({"acc": account})
    assert finding.problems == ["acc@2: recorded 4.99 EUR, fold 5.00 EUR"]


def test_double_charges_missing_outcomes_and_unrefunded_cancellations() -> None:
    account = _account(
        ("MoneyDeposited", 5000, "d1"),
        ("MoneyWithdrawn", 100, "order-payment:twice"),
        ("MoneyWithdrawn", 100, "order-payment:twice"),
        ("MoneyWithdrawn", 100, "order-payment:kept"),
    )
    created = {"account_id": "acc", "total_minor": 100, "items": [{}]}
    orders = {
        "twice": [
            _event("twice", 1, "OrderCreated", **created),
            _event("twice", 2, "PaymentProcessed"),
        ],
        "pending": [_event("pending", 1, "OrderCreated", **created)],
        "kept": [
            _event("kept", 1, "OrderCreated", **created),
            _event("kept", 2, "OrderCancelled"),
        ],
        "card": [_event("card", 1, "OrderCreated", account_id=None)],
    }
    finding = audit.check_payments(orders, {"acc": account})
    assert finding.checked == 3  # the card order is not the saga's
    assert sorted(finding.problems) == [
        "order kept: cancelled, charged 1, refunded 0",
        "order pending: no outcome yet (OrderCreated)",
        "order twice: charged 2 times",
        "order twice: paid, charged 2, refunded 0",
    ]


def test_an_accepted_event_missing_from_the_log_is_reported() -> None:
    results = {"c1": [{"status": "ACCEPTED", "event_ids": ["e1", "e2"]}]}
    streams = {"a": [{"metadata": {"event_id": "e1"}}]}
    finding = audit.check_acknowledged(results, [streams])
    assert finding.problems == ["command c1: accepted event e2 missing from the log"]
