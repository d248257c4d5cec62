"""History and time travel against the real services: the event-log index, states as
of a version or a time, snapshots, and old schema versions read through upcasters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from app.client import CommandClient
from app.domain.accounts import OpenAccount
from app.domain.orders import DeliverOrder, ShipOrder
from app.history import SNAPSHOT_EVERY, EventStore
from app.importer import ImportRefused, import_events
from app.settings import Settings
from app.waiting import eventually
from app.workload import deposit, payment, withdrawal
from tests.support import get_until, read_topic, running_worker


def _wait_indexed(settings: Settings, aggregate_id: str, version: int) -> None:
    with psycopg.connect(settings.query_database_url, autocommit=True) as conn:

        def indexed() -> bool:
            row = conn.execute(
                "SELECT max(stream_version) FROM event_log WHERE aggregate_id = %s",
                (aggregate_id,),
            ).fetchone()
            return bool(row and row[0] is not None and row[0] >= version)

        if not eventually(indexed, timeout=60, every=0.2):
            raise AssertionError(f"{aggregate_id} not indexed up to version {version}")


def test_history_time_travel_and_snapshots(deployment: Settings) -> None:
    account = f"acc-{uuid.uuid4().hex[:6]}"
    deposits = SNAPSHOT_EVERY * 2 + 20
    base = deployment.web_url
    with running_worker(deployment), CommandClient(deployment) as client:
        opened = client.send(
            OpenAccount(account_id=account, owner_id="o", currency="EUR"),
            correlation_id=f"flow-{account}",
        )
        ids = [
            client.submit(deposit(account, n + 1, f"t{n}", currency="EUR", source="s"))
            for n in range(deposits)
        ]
        client.wait(ids, timeout=120)
        middle = datetime.now(UTC)
        time.sleep(0.05)
        last = client.send(withdrawal(account, 5, "w", currency="EUR", destination="d"))
        final_version = deposits + 2
        assert last.version == final_version
        _wait_indexed(deployment, account, final_version)

        with psycopg.connect(deployment.database_url) as conn:
            store = EventStore(conn)
            stream = store.read_stream("account", account)
            assert [e.stream_version for e in stream] == list(
                range(1, final_version + 1)
            )
            window = store.read_stream("account", account, 10, 12)
            assert [e.stream_version for e in window] == [10, 11, 12]
            flow = store.read_correlation(f"flow-{account}")
            assert [e.event_type for e in flow] == ["AccountOpened"]
            assert flow[0].event_id == opened.event_ids[0]
            recent = store.read_time_range(middle, middle + timedelta(minutes=5))
            assert [
                e.event_type for e in recent if e.data.get("account_id") == account
            ] == ["MoneyWithdrawn"]

            total = sum(n + 1 for n in range(deposits))
            state, version = store.state("account", account)
            assert (version, state.balance_minor) == (final_version, total - 5)
            at_ten, _ = store.state("account", account, version=10)
            assert at_ten.balance_minor == sum(range(1, 10))
            before, reached = store.state("account", account, at=middle)
            assert (reached, before.balance_minor) == (final_version - 1, total)

            # Snapshots were taken every N events and give the same state as a full fold.
            versions = [
                r[0]
                for r in conn.execute(
                    "SELECT version FROM snapshots WHERE aggregate_id = %s ORDER BY version",
                    (account,),
                )
            ]
            assert versions == [SNAPSHOT_EVERY, 2 * SNAPSHOT_EVERY]
            folded, _ = store.state("account", account, use_snapshots=False)
            assert folded == state
            # An unreadable snapshot is ignored: the stream is folded from the start.
            conn.execute(
                "UPDATE snapshots SET state = '{\"garbage\": true}' "
                "WHERE aggregate_id = %s",
                (account,),
            )
            assert store.state("account", account)[0] == folded
            conn.execute(
                "UPDATE snapshots SET state_schema = 'old-shape' "
                "WHERE aggregate_id = %s",
                (account,),
            )
            assert store.state("account", account)[0] == folded

        history = httpx.get(
            f"{base}/query/history/{account}",
            params={"from_version": 2, "to_version": 3},
        ).json()
        assert [e["event_type"] for e in history["events"]] == ["MoneyDeposited"] * 2
        then = httpx.get(f"{base}/query/state/{account}", params={"version": 10}).json()
        assert then["state"]["balance_minor"] == sum(range(1, 10))
        assert httpx.get(f"{base}/query/state/nobody").status_code == 404
        bad = httpx.get(f"{base}/query/state/{account}", params={"at": "noon"})
        assert bad.status_code == 400
        assert bad.json()["field"] == "at"


def _old_order_created(order_id: str, version: int) -> dict[str, Any]:
    """A line of `streamfold import`: an OrderCreated as an old writer of schema
    ``version`` wrote it (v1: the article's shape, the address one string)."""
    item: dict[str, Any] = {
        "product_id": "legacy",
        "quantity": 2,
        "unit_price_minor": 1500,
    }
    if version == 1:
        data: dict[str, Any] = {
            "order_id": order_id,
            "customer_id": "old-customer",
            "items": [item],
            "total_minor": 3000,
            "shipping_address": "1 Old Road, Oldtown, OT, 12345, UK",
        }
    else:
        data = {
            "order_id": order_id,
            "customer_id": "old-customer",
            "items": [{**item, "tax_rate_bps": 0, "total_price_minor": -1}],
            "total_minor": 3000,
            "currency": "USD",
            "shipping_address": {
                "street": "1 Old Road",
                "city": "Oldtown",
                "state": "OT",
                "zip_code": "12345",
                "country": "UK",
            },
        }
    return {
        "event_type": "OrderCreated",
        "event_version": version,
        "aggregate_id": order_id,
        "stream_version": 1,
        "timestamp": "2019-05-04T10:00:00Z",
        "user_id": "legacy-shop",
        "correlation_id": f"legacy-{order_id}",
        "data": data,
    }


def _import(settings: Settings, lines: list[dict[str, Any]], tmp_path: Path) -> str:
    """`bin/streamfold import FILE` as an operator runs it; its output."""
    file = tmp_path / f"import-{uuid.uuid4().hex[:6]}.jsonl"
    file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "import", str(file)],
        env={**os.environ, **settings.as_env()},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_imported_events_of_old_schemas_are_read_as_the_newest(
    deployment: Settings, tmp_path: Path
) -> None:
    old = {version: f"legacy-v{version}-{uuid.uuid4().hex[:4]}" for version in (1, 2)}
    base = deployment.web_url
    lines = [_old_order_created(order_id, v) for v, order_id in old.items()]
    with running_worker(deployment), CommandClient(deployment) as client:
        assert "imported 2 events" in _import(deployment, lines, tmp_path)
        # The same file again changes nothing.
        assert "imported 0 events (2 already" in _import(deployment, lines, tmp_path)
        for order_id in old.values():
            # The write side folds the upcast event: the total and currency hold.
            paid = client.send(payment(order_id, 3000, "p", "t", method="paypal"))
            assert paid.accepted, paid
            assert paid.version == 2
            shipped = client.send(
                ShipOrder(order_id=order_id, tracking_number="T", carrier="DHL")
            )
            assert shipped.version == 3
            delivered = client.send(DeliverOrder(order_id=order_id))
            assert delivered.accepted and delivered.version == 4, delivered
            _wait_indexed(deployment, order_id, 4)
            summary = get_until(
                f"{base}/query/orders/{order_id}",
                lambda r: r.status_code == 200 and r.json()["version"] == 4,
            ).json()
            assert (summary["status"], summary["currency"]) == ("DELIVERED", "USD")
            assert summary["items"][0]["total_price_minor"] == 3000
            view = get_until(
                f"{base}/orders/{order_id}",
                lambda r: r.status_code == 200 and r.json()["version"] == 4,
            )
            assert view.json()["status"] == "DELIVERED"
        with psycopg.connect(deployment.database_url) as conn:
            store = EventStore(conn)
            for version, order_id in old.items():
                created = store.read_stream("order", order_id, 1, 1)[0]
                assert created.schema_version == version
                assert created.user_id == "legacy-shop"
                assert created.data["shipping_address"] == {
                    "street": "1 Old Road",
                    "city": "Oldtown",
                    "state": "OT",
                    "zip_code": "12345",
                    "country": "UK",
                }
                assert created.data["items"][0]["total_price_minor"] == 3000
                assert created.data["currency"] == "USD"
                state, _ = store.state("order", order_id)
                assert (state.status, state.total_minor) == ("DELIVERED", 3000)


def test_an_import_with_a_bad_line_writes_nothing(
    deployment: Settings, tmp_path: Path
) -> None:
    order_id = f"legacy-{uuid.uuid4().hex[:6]}"
    good = _old_order_created(order_id, 1)
    unknown = {**good, "event_type": "OrderTeleported"}
    gap = {**good, "stream_version": 3}
    typo = {**good, "eventVersion": 1}
    wrong_shape = {**good, "data": {**good["data"], "shipping_address": {"x": 1}}}
    with pytest.raises(ImportRefused) as refused:
        import_events(
            deployment,
            [json.dumps(line) for line in (good, unknown, gap, typo, wrong_shape)],
        )
    problems = refused.value.problems
    assert [p.split(":")[0] for p in problems] == [
        "line 2",
        "line 4",
        "line 5",
        "line 3",
    ], problems
    assert "OrderTeleported" in problems[0]
    assert "unknown field(s) eventVersion" in problems[1]
    assert "shipping_address" in problems[2]
    assert "leaves a gap; the next version is 2" in problems[3]
    assert read_topic(deployment, deployment.topics.events("orders")) == []
    # The good line alone goes in.
    assert import_events(deployment, [json.dumps(good)]).written == 1
