"""Promises 2, 4 and 5 while partitions move: two workers of one application share
the partitions under load; a third joins, one leaves gracefully, one is killed."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter

import httpx
import pytest

from app.client import CommandClient
from app.local.process import Daemon, tail, wait_for
from app.local.worker import WorkerProcess
from app.settings import Settings
from tests.conftest import free_port
from tests.invariants import (
    assert_read_models_match_the_log,
    assert_write_side_promises,
    start_serving,
)
from tests.reliability.test_worker_crash import ACCOUNTS, _workload
from tests.support import submit_paced

RATE = 200  # commands per second, spread over the whole choreography
COMMANDS = 4000


def _worker(settings: Settings) -> tuple[Daemon, Settings]:
    own = dataclasses.replace(settings, web_port=free_port())
    return WorkerProcess(own), own


def _assignment(settings: Settings) -> set[tuple[str, int]]:
    try:
        document = httpx.get(f"{settings.web_url}/status", timeout=2).json()
    except httpx.HTTPError:
        return set()
    # The write side's command partitions (cooperative-sticky balances them over
    # every topic the processors read, not per topic).
    commands = {settings.topics.commands(a) for a in ("accounts", "orders")}
    owned = document.get("write", {}).get("assignment", [])
    return {(t, p) for t, p in owned if t in commands}


@pytest.mark.slow
def test_partitions_move_under_load_and_every_promise_holds(
    deployment: Settings,
) -> None:
    work = _workload(seed=23, count=COMMANDS)
    first, first_settings = _worker(deployment)
    second, second_settings = _worker(deployment)
    third, third_settings = _worker(deployment)
    produced = threading.Event()
    client = CommandClient(deployment)
    client._listen()  # results from here on

    def produce() -> None:
        submit_paced(client, work, RATE)
        client.flush()
        produced.set()

    producer = threading.Thread(target=produce, daemon=True)
    # Shown with a failure: where each worker wrote its log.
    print("worker logs:", *(w.log_file for w in (first, second, third)))
    try:
        start_serving(first, first_settings)
        producer.start()
        time.sleep(3)
        # Join: the two share the partitions.
        start_serving(second, second_settings)
        wait_for(
            lambda: (
                bool(_assignment(first_settings)) and bool(_assignment(second_settings))
            ),
            90,
            "both workers to own partitions",
        )
        shared = _assignment(first_settings) | _assignment(second_settings)
        assert len(shared) == 2 * deployment.partitions
        assert not _assignment(first_settings) & _assignment(second_settings)
        time.sleep(3)
        first.stop()  # graceful: in-flight commands complete before it lets go
        time.sleep(2)
        start_serving(third, third_settings)
        time.sleep(3)
        second.stop(kill=True)  # its partitions move after the session timeout
        producer.join(120)
        assert produced.is_set()
        try:
            results = client.wait([cid for cid, _ in work], timeout=300)
        except TimeoutError as error:
            logs = "\n".join(
                f"--- {w.log_file}\n{tail(w.log_file, 30)}"
                for w in (first, second, third)
            )
            raise AssertionError(f"{error}\n{logs}") from error
        assert_read_models_match_the_log(third_settings)
    finally:
        client.close()
        for worker in (first, second, third):
            worker.stop()

    assert len(results) == len(work)
    assert_write_side_promises(deployment, results)
    outcomes = Counter(r.accepted for r in results)
    assert outcomes[True] > ACCOUNTS and outcomes[False] > 0
