"""Promises 2, 4 and 5 when the broker dies: the Kafka broker is killed with SIGKILL
while commands flow and started again on the same data. Nobody touches the worker
or the client: producers retry, the worker resumes, and nothing acknowledged is lost.

The broker is one of the test's own: the session's broker, with every other test's
partitions on it, would take minutes to recover its logs after an unclean stop.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from app.client import CommandClient
from app.local import deployments
from app.local.kafka import KafkaNode
from app.local.process import tail
from app.settings import Settings
from tests.invariants import (
    assert_read_models_match_the_log,
    assert_write_side_promises,
    serving_worker,
)
from tests.reliability.test_worker_crash import ACCOUNTS, _workload
from tests.support import submit_paced

RATE = 300  # commands per second: the broker dies with commands in every stage
DOWN_S = 4.0


@pytest.fixture
def isolated(registry_settings: Settings) -> Iterator[tuple[Settings, KafkaNode]]:
    with deployments.private_broker(registry_settings) as (settings, node):
        deployment = deployments.create(settings)
        try:
            yield deployment, node
        finally:
            deployments.remove(deployment)


@pytest.mark.slow
def test_broker_sigkill_under_load_loses_nothing(
    isolated: tuple[Settings, KafkaNode],
) -> None:
    deployment, kafka = isolated
    work = _workload(seed=31)
    produced = threading.Event()
    with serving_worker(deployment) as worker, CommandClient(deployment) as client:
        client._listen()  # results from here on
        survivor = worker.pid()

        def produce() -> None:
            submit_paced(client, work, RATE)
            # Until the restarted broker has elected leaders again.
            client.flush(timeout=120)
            produced.set()

        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        time.sleep(2.5)
        assert kafka.stop(kill=True), "the broker was not running"
        time.sleep(DOWN_S)
        started = time.monotonic()
        kafka.start(timeout=120)
        print(f"broker back in {time.monotonic() - started:.1f}s")
        producer.join(300)
        assert produced.is_set(), "the client did not get every command to the broker"
        try:
            results = client.wait([cid for cid, _ in work], timeout=300)
        except TimeoutError as error:
            raise AssertionError(f"{error}\n{tail(worker.log_file, 40)}") from error
        # The same worker process carried on: it resumed by itself.
        assert worker.pid() == survivor, tail(worker.log_file, 40)
        try:
            assert_read_models_match_the_log(deployment)
        except AssertionError as error:
            raise AssertionError(f"{error}\n{tail(worker.log_file, 60)}") from error

    assert len(results) == len(work)
    assert_write_side_promises(deployment, results)
    outcomes = Counter(r.accepted for r in results)
    assert outcomes[True] > ACCOUNTS and outcomes[False] > 0
