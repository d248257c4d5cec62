"""Recompute the read models from the event log, to compare with what Postgres holds
(the folds live in ``app.audit``, written independently of the projections' SQL, so
a comparison catches a projection that drops, repeats or misapplies an event).
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import psycopg

from app import audit
from app.audit import actual_ledger, actual_orders  # noqa: F401 - re-exported
from app.settings import Settings
from tests.support import events_by_aggregate


def expected_ledger(settings: Settings) -> dict[str, Any]:
    return audit.expected_ledger(events_by_aggregate(settings, "accounts"))


def expected_orders(settings: Settings) -> dict[str, tuple[Any, ...]]:
    return audit.expected_orders(events_by_aggregate(settings, "orders"))


def checksum(settings: Settings, table: str, order_by: str) -> str:
    """A digest of a whole table's contents, for comparing two builds of it."""
    with psycopg.connect(settings.query_database_url) as conn:
        (digest,) = conn.execute(
            f"SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY {order_by}), '')) "  # noqa: S608 - test-only identifiers
            f"FROM {table} t"
        ).fetchone()  # type: ignore[misc]
    return str(digest)


def wait_caught_up(settings: Settings, timeout: float = 60.0) -> dict[str, Any]:
    """Poll the worker's /status until every projection has no lag left."""
    url = f"{settings.web_url}/status"
    deadline = time.monotonic() + timeout
    document: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            document = httpx.get(url, timeout=5).json()
        except httpx.HTTPError:
            time.sleep(0.2)
            continue
        projections = document.get("projections", [])
        if projections and all(
            p["lag_events"] == 0
            and all(pos["head"] is not None for pos in p["positions"])
            for p in projections
        ):
            return document
        time.sleep(0.2)
    raise AssertionError(
        f"projections not caught up in {timeout}s: {json.dumps(document)}"
    )
