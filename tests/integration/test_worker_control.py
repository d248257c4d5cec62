"""`streamfold worker start|stop|restart` manage the worker alone: Kafka, PostgreSQL
and the schema registry keep running, and a restarted worker takes commands again."""

from __future__ import annotations

import psycopg

from app.client import CommandClient
from app.domain.accounts import OpenAccount
from app.local import stack
from app.local.process import http_ok, pid_alive
from app.local.worker import WorkerProcess
from app.settings import Settings
from app.workload import deposit
from tests.support import run_cli


def _services_up(settings: Settings) -> None:
    assert stack.kafka_node(settings).answers(timeout=10)
    assert http_ok(f"{settings.schema_registry_url}/subjects", timeout=10)
    with psycopg.connect(settings.database_url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_the_worker_stops_and_restarts_alone(deployment: Settings) -> None:
    worker = WorkerProcess(deployment)
    status_url = f"{deployment.web_url}/status"
    try:
        started = run_cli(deployment, "worker", "start")
        assert started.returncode == 0, started.stdout + started.stderr
        assert "worker    started" in started.stdout
        first = worker.pid()
        assert first is not None
        with CommandClient(deployment) as client:
            opened = client.send(
                OpenAccount(account_id="acc-ctl", owner_id="o", currency="USD")
            )
        assert opened.accepted, opened

        restarted = run_cli(deployment, "worker", "restart")
        assert restarted.returncode == 0, restarted.stdout + restarted.stderr
        assert "worker    stopped" in restarted.stdout
        assert "worker    started" in restarted.stdout
        second = worker.pid()
        assert second is not None and second != first
        assert not pid_alive(first)
        _services_up(deployment)
        with CommandClient(deployment) as client:
            deposited = client.send(deposit("acc-ctl", 29, "t-1", source="cash"))
        assert deposited.accepted and deposited.version == 2, deposited

        stopped = run_cli(deployment, "worker", "stop")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert "worker    stopped" in stopped.stdout
        assert worker.pid() is None and not pid_alive(second)
        assert not http_ok(status_url)
        _services_up(deployment)
        shown = run_cli(deployment, "status")
        assert shown.returncode == 1
        assert "kafka     up" in shown.stdout and "worker    DOWN" in shown.stdout

        again = run_cli(deployment, "worker", "stop")
        assert again.returncode == 0 and "worker    not running" in again.stdout
    finally:
        worker.stop()
