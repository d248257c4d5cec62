"""Audit a deployment: check the event store's promises against what Kafka and
Postgres hold right now, by reading every topic from the start.

- ``answers``: every command on a command topic has a result, and every result one
  command ever got is the same answer; a command without one must be dead-lettered.
- ``streams``: each aggregate's events are versions 1..n, one event per version.
- ``balances``: each balance the ledger recorded is the fold of the log before it,
  and never below zero.
- ``acknowledged``: every event id an accepted result names is in the log.
- ``payments``: the order payment saga charged each order with an account at most
  once, every such order has an outcome (paid, or cancelled with any money taken
  given back); call once sagas settled.
- ``read models``: the Postgres ledger and order summaries equal a fold of the log
  written independently of the projections' SQL (call once projections caught up).

``streamfold audit`` prints these; the soak (``app.soak``) and the tests use them.
Reading whole topics is meant for test and soak deployments, not for a store of
billions of events.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from app.adapters import topics
from app.adapters.catalog import SchemaCatalog
from app.adapters.codec import Codec, ConfluentRegistry, DecodeError
from app.adapters.topics import KafkaRecord, Stalled, admin_client
from app.domain.money import fmt
from app.settings import Settings

AREAS = ("orders", "accounts")


class AuditError(RuntimeError):
    """A topic could not be read to the end."""


@dataclass(frozen=True, slots=True)
class Finding:
    """One check's outcome: what was checked, and every problem found."""

    check: str
    checked: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def read_topic(settings: Settings, topic: str) -> list[KafkaRecord]:
    """Every record currently in ``topic`` (none if there is no such topic),
    partition by partition, in offset order, as a read_committed reader sees them,
    up to each partition's log end (``topics.read_topic``): a client that has seen a
    result (its partition's marker written) could otherwise read its events'
    partition without them; a test missed every event of a partition so."""
    if topic not in admin_client(settings).list_topics(timeout=30).topics:
        return []
    try:
        return [KafkaRecord.of(m) for m in topics.read_topic(settings, topic, "audit")]
    except Stalled as error:
        raise AuditError(str(error.args[0].str())) from error


def new_codec(settings: Settings) -> Codec:
    return Codec(ConfluentRegistry(settings.schema_registry_url), SchemaCatalog.load())


def events_by_aggregate(
    settings: Settings, area: str, codec: Codec | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Every event of one aggregate type, by aggregate id, in log order."""
    codec = codec or new_codec(settings)
    streams: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in read_topic(settings, settings.topics.events(area)):
        data = codec.decode(record.value or b"").data
        streams[data["metadata"]["aggregate_id"]].append(data)
    return streams


def results_by_command(
    settings: Settings, codec: Codec | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Every result on the results topic, by command id, in log order."""
    codec = codec or new_codec(settings)
    results: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in read_topic(settings, settings.topics.results):
        data = codec.decode(record.value or b"").data
        results[data["command_id"]].append(data)
    return results


def answer(result: dict[str, Any]) -> tuple[Any, ...]:
    """What must be identical among every result one command ever got."""
    return (
        result["status"],
        result["version"],
        tuple(result["event_ids"]),
        result["code"],
        result["partition"],
        result["offset"],
    )


def unique_versions(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One event per stream version (a repeat after a crash counts once)."""
    by_version = {e["metadata"]["stream_version"]: e for e in events}
    return [by_version[v] for v in sorted(by_version)]


def check_answers(
    settings: Settings,
    results: dict[str, list[dict[str, Any]]],
    codec: Codec,
    command_ids: Iterable[str] | None = None,
    *,
    exactly_once: bool = False,
) -> Finding:
    """Every command has one answer (``command_ids``: these; default: every command
    on the command topics that was not dead-lettered): identical copies only, and
    with ``exactly_once`` (commands sent once) a single result."""
    if command_ids is None:
        dead = {
            (
                (m.headers.get("dlq-source-topic") or b"").decode(),
                int(m.headers.get("dlq-source-partition") or b"-1"),
                int(m.headers.get("dlq-source-offset") or b"-1"),
            )
            for area in AREAS
            for m in read_topic(
                settings, settings.topics.dead_letter(settings.topics.commands(area))
            )
        }
        wanted: list[str] = []
        problems: list[str] = []
        for area in AREAS:
            for m in read_topic(settings, settings.topics.commands(area)):
                if (m.topic, m.partition, m.offset) in dead:
                    continue
                try:
                    data = codec.decode(m.value or b"").data
                    wanted.append(data["envelope"]["command_id"])
                except (DecodeError, KeyError, TypeError):
                    problems.append(
                        f"{m.topic}[{m.partition}]@{m.offset}: unreadable and "
                        "not dead-lettered"
                    )
    else:
        wanted, problems = list(command_ids), []
    for command_id in wanted:
        answers = {answer(r) for r in results.get(command_id, [])}
        if not answers:
            problems.append(f"command {command_id}: no result")
        elif exactly_once and len(results[command_id]) > 1:
            problems.append(
                f"command {command_id}: {len(results[command_id])} results, sent once"
            )
        elif len(answers) > 1:
            problems.append(
                f"command {command_id}: {len(answers)} different results "
                "(status, version, event ids, code, partition, offset): "
                + "; ".join(map(str, sorted(answers, key=repr)))
            )
    return Finding("answers", len(wanted), problems)


def check_streams(streams: dict[str, list[dict[str, Any]]]) -> Finding:
    problems = []
    for aggregate_id, events in streams.items():
        by_version: dict[int, set[str]] = defaultdict(set)
        for event in events:
            meta = event["metadata"]
            by_version[meta["stream_version"]].add(meta["event_id"])
        if sorted(by_version) != list(range(1, len(by_version) + 1)):
            problems.append(
                f"{aggregate_id}: versions {sorted(by_version)[:5]}... not 1..n"
            )
        clashes = [v for v, ids in by_version.items() if len(ids) > 1]
        if clashes:
            problems.append(f"{aggregate_id}: two events at version(s) {clashes[:5]}")
    return Finding("streams", len(streams), problems)


def fold_balances(
    streams: dict[str, list[dict[str, Any]]],
) -> tuple[dict[str, int], list[str]]:
    """Each account's balance folded from its log, and where a recorded balance
    differs from the fold or goes below zero."""
    balances, problems = {}, []
    for account, events in streams.items():
        balance, currency = 0, ""
        for event in unique_versions(events):
            kind = event["metadata"]["event_type"]
            version = event["metadata"]["stream_version"]
            currency = event.get("currency") or currency
            if kind == "MoneyDeposited":
                balance += event["amount_minor"]
            elif kind == "MoneyWithdrawn":
                balance -= event["amount_minor"]
            recorded = event.get("balance_after_minor")
            if recorded is not None and recorded != balance:
                problems.append(
                    f"{account}@{version}: recorded {fmt(recorded, currency)}, "
                    f"fold {fmt(balance, currency)}"
                )
            if balance < 0:
                problems.append(
                    f"{account}@{version}: balance {fmt(balance, currency)} below zero"
                )
        balances[account] = balance
    return balances, problems


def check_balances(streams: dict[str, list[dict[str, Any]]]) -> Finding:
    _, problems = fold_balances(streams)
    return Finding("balances", len(streams), problems)


def check_acknowledged(
    results: dict[str, list[dict[str, Any]]],
    streams: Iterable[dict[str, list[dict[str, Any]]]],
) -> Finding:
    in_log = {
        e["metadata"]["event_id"]
        for by_id in streams
        for events in by_id.values()
        for e in events
    }
    accepted = {
        (command_id, event)
        for command_id, answers in results.items()
        for r in answers
        if r["status"] == "ACCEPTED"
        for event in r["event_ids"]
    }
    problems = [
        f"command {command_id}: accepted event {event} missing from the log"
        for command_id, event in sorted(accepted)
        if event not in in_log
    ]
    return Finding("acknowledged", len(accepted), problems)


def check_payments(
    orders: dict[str, list[dict[str, Any]]],
    accounts: dict[str, list[dict[str, Any]]],
) -> Finding:
    movements: dict[str, int] = defaultdict(int)
    for events in accounts.values():
        for event in unique_versions(events):
            kind = event["metadata"]["event_type"]
            if kind in ("MoneyWithdrawn", "MoneyDeposited"):
                movements[event["transaction_id"]] += 1
    problems, checked = [], 0
    for order_id, events in orders.items():
        history = unique_versions(events)
        if not history or not history[0].get("account_id"):
            continue
        checked += 1
        kinds = [e["metadata"]["event_type"] for e in history]
        charged = movements[f"order-payment:{order_id}"]
        refunded = movements[f"order-refund:{order_id}"]
        if charged > 1:
            problems.append(f"order {order_id}: charged {charged} times")
        if "PaymentProcessed" in kinds:
            if (charged, refunded) != (1, 0):
                problems.append(
                    f"order {order_id}: paid, charged {charged}, refunded {refunded}"
                )
        elif "OrderCancelled" in kinds:
            if refunded != charged:
                problems.append(
                    f"order {order_id}: cancelled, charged {charged}, "
                    f"refunded {refunded}"
                )
        else:
            problems.append(f"order {order_id}: no outcome yet ({kinds[-1]})")
    return Finding("payments", checked, problems)


def expected_ledger(accounts: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    balances: dict[str, tuple[Any, ...]] = {}
    transactions = 0
    for account, events in accounts.items():
        balance, status, version, currency = 0, "OPEN", 0, ""
        for event in unique_versions(events):
            kind = event["metadata"]["event_type"]
            version = event["metadata"]["stream_version"]
            if kind == "AccountOpened":
                currency = event["currency"]
            elif kind == "MoneyDeposited":
                balance += event["amount_minor"]
                transactions += 1
            elif kind == "MoneyWithdrawn":
                balance -= event["amount_minor"]
                transactions += 1
            elif kind == "AccountClosed":
                status = "CLOSED"
        balances[account] = (currency, balance, status, version)
    return {"balances": balances, "transactions": transactions}


def actual_ledger(settings: Settings) -> dict[str, Any]:
    with psycopg.connect(settings.query_database_url) as conn:
        rows = conn.execute(
            "SELECT account_id, currency, balance_minor, status, version "
            "FROM account_balances"
        ).fetchall()
        counted = conn.execute("SELECT count(*) FROM transactions").fetchone()
        assert counted is not None  # count(*) always returns its one row
        (transactions,) = counted
    return {
        "balances": {r[0]: tuple(r[1:]) for r in rows},
        "transactions": transactions,
    }


ORDER_STATUS = {
    "PaymentProcessed": "PAID",
    "OrderShipped": "SHIPPED",
    "OrderDelivered": "DELIVERED",
    "OrderCancelled": "CANCELLED",
}


def expected_orders(
    orders: dict[str, list[dict[str, Any]]],
) -> dict[str, tuple[Any, ...]]:
    found: dict[str, tuple[Any, ...]] = {}
    for order_id, events in orders.items():
        status, total, items, version = "", 0, 0, 0
        for event in unique_versions(events):
            kind = event["metadata"]["event_type"]
            version = event["metadata"]["stream_version"]
            if kind == "OrderCreated":
                status, total, items = (
                    "CREATED",
                    event["total_minor"],
                    len(event["items"]),
                )
            elif kind == "OrderItemAdded":
                total, items = event["total_minor"], items + 1
            elif kind == "OrderItemRemoved":
                total, items = event["total_minor"], items - 1
            status = ORDER_STATUS.get(kind, status)
        found[order_id] = (status, total, items, version)
    return found


def actual_orders(settings: Settings) -> dict[str, tuple[Any, ...]]:
    with psycopg.connect(settings.query_database_url) as conn:
        rows = conn.execute(
            "SELECT order_id, status, total_minor, items_count, version "
            "FROM order_summaries"
        ).fetchall()
    return {r[0]: tuple(r[1:]) for r in rows}


def _differences(
    name: str, expected: dict[str, Any], actual: dict[str, Any]
) -> list[str]:
    keys = sorted(set(expected) | set(actual))
    return [
        f"{name} {key}: log says {expected.get(key)}, Postgres holds {actual.get(key)}"
        for key in keys
        if expected.get(key) != actual.get(key)
    ]


def check_read_models(
    settings: Settings,
    orders: dict[str, list[dict[str, Any]]],
    accounts: dict[str, list[dict[str, Any]]],
) -> Finding:
    ledger, held = expected_ledger(accounts), actual_ledger(settings)
    problems = _differences("account", ledger["balances"], held["balances"])
    if ledger["transactions"] != held["transactions"]:
        problems.append(
            f"transactions: log has {ledger['transactions']}, "
            f"Postgres holds {held['transactions']}"
        )
    problems += _differences("order", expected_orders(orders), actual_orders(settings))
    return Finding("read models", len(orders) + len(accounts), problems)


def audit(
    settings: Settings,
    *,
    command_ids: Iterable[str] | None = None,
    read_models: bool = True,
    payments: bool = True,
) -> list[Finding]:
    codec = new_codec(settings)
    results = results_by_command(settings, codec)
    orders = events_by_aggregate(settings, "orders", codec)
    accounts = events_by_aggregate(settings, "accounts", codec)
    findings = [
        check_answers(settings, results, codec, command_ids),
        check_streams({**orders, **accounts}),
        check_balances(accounts),
        check_acknowledged(results, [orders, accounts]),
    ]
    if payments:
        findings.append(check_payments(orders, accounts))
    if read_models:
        findings.append(check_read_models(settings, orders, accounts))
    return findings


def report(findings: list[Finding], limit: int = 10) -> str:
    lines = []
    for finding in findings:
        mark = "ok  " if finding.ok else "FAIL"
        lines.append(f"{mark} {finding.check:<13} {finding.checked:>8} checked")
        lines += [f"       {p}" for p in finding.problems[:limit]]
        if len(finding.problems) > limit:
            lines.append(f"       ... {len(finding.problems) - limit} more")
    return "\n".join(lines)
