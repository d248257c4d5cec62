"""The write side's promises as assertions over ``app.audit``'s checks, and a worker
that is known to be processing before a test talks to it.

Promise 2: one answer per command (repeats after a crash are the same answer).
Promise 4: each aggregate's events are versions 1..n, one event per version.
Promise 5: every balance the writer recorded equals the fold of the log, and so do
the Postgres read models once the projections have caught up.
Nothing acknowledged is lost: every accepted event id is in the log.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from app import audit
from app.adapters.eventlog import CommandResult
from app.local.process import Daemon, http_ok, wait_for
from app.local.worker import WorkerProcess
from app.settings import Settings
from tests.readmodels import wait_caught_up


def ready_url(settings: Settings) -> str:
    return f"{settings.web_url}/ready"


def wait_ready(settings: Settings, timeout: float = 120.0) -> None:
    """Until the worker owns partitions and has recovered its tables."""
    wait_for(lambda: http_ok(ready_url(settings)), timeout, "the worker's /ready")


def start_serving(worker: Daemon, settings: Settings, timeout: float = 120.0) -> None:
    started = time.monotonic()
    worker.start(timeout=timeout)
    wait_ready(settings, max(1.0, timeout - (time.monotonic() - started)))


@contextmanager
def serving_worker(settings: Settings, name: str = "worker") -> Iterator[Daemon]:
    """A worker process that is processing commands by the time the body runs."""
    worker = WorkerProcess(settings, name)
    try:
        start_serving(worker, settings)
        yield worker
    finally:
        worker.stop()


def assert_ok(finding: audit.Finding) -> None:
    assert finding.ok, audit.report([finding])


def assert_balances_fold(streams: dict[str, list[dict[str, Any]]]) -> dict[str, int]:
    """Promise 5 on the write side; returns each account's folded balance."""
    balances, problems = audit.fold_balances(streams)
    assert not problems, problems[:10]
    return balances


def assert_write_side_promises(
    settings: Settings,
    results: Sequence[CommandResult],
    *,
    sent_once: bool = True,
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Every promise above, over orders and accounts, for commands whose results the
    client has; returns each aggregate type's streams for further checks. Commands
    ``sent_once`` must have exactly one result on the results topic as a
    read_committed reader sees it, whatever crashed meanwhile."""
    codec = audit.new_codec(settings)
    logged = audit.results_by_command(settings, codec)
    assert_ok(
        audit.check_answers(
            settings,
            logged,
            codec,
            [r.command_id for r in results],
            exactly_once=sent_once,
        )
    )
    streams = {
        area: audit.events_by_aggregate(settings, area, codec)
        for area in ("orders", "accounts")
    }
    for area_streams in streams.values():
        assert_ok(audit.check_streams(area_streams))
    assert_balances_fold(streams["accounts"])
    # Nothing acknowledged is lost: the accepted results this client saw included.
    seen = {
        r.command_id: [{"status": "ACCEPTED", "event_ids": list(r.event_ids)}]
        for r in results
        if r.accepted
    }
    assert_ok(audit.check_acknowledged({**logged, **seen}, list(streams.values())))
    return streams


def assert_read_models_match_the_log(
    settings: Settings, timeout: float = 120.0
) -> None:
    """Promise 5 on the read side, checked while a worker serves: once projections
    have caught up, the Postgres read models equal a fold of the log. Sagas still
    in flight append events meanwhile, so the check repeats until it holds or the
    time is up."""
    deadline = time.monotonic() + timeout
    while True:
        status = wait_caught_up(settings, timeout=max(1.0, deadline - time.monotonic()))
        codec = audit.new_codec(settings)
        finding = audit.check_read_models(
            settings,
            audit.events_by_aggregate(settings, "orders", codec),
            audit.events_by_aggregate(settings, "accounts", codec),
        )
        if finding.ok:
            return
        if time.monotonic() > deadline:
            # What the projections said of themselves, to tell a lost write from a
            # runner that reported caught up without being so.
            projections = json.dumps(status.get("projections"), indent=1)
            raise AssertionError(
                f"{audit.report([finding])}\nprojections: {projections}"
            )
        time.sleep(2.0)
