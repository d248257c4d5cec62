"""HTTP commands: one command at a time, ``POST /accounts/{id}/deposits`` until its
answer, beside ``CommandClient.send`` (produce, then the result from
``command-results``) against the same worker, the two taking turns command by
command so both see the same machine.

Both go the same way from the command topic on (the write process, its transaction,
the result); the difference is what sits in front: the HTTP request, the body check
against the Avro schema, the worker's gateway (its producer and its listener of every
result partition) and the response.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx

from app.client import CommandClient
from app.domain.accounts import OpenAccount
from app.local.worker import WorkerProcess
from app.settings import ApiToken, Settings
from app.workload import deposit
from bench.harness import percentile, tail_figures

TOKEN = ApiToken(user_id="bench", token=uuid.uuid4().hex)


@dataclass(frozen=True, slots=True)
class Sizes:
    commands: int  # per path
    warmup: int


def run(base: Settings, sizes: Sizes, seed: int, deployment: Any) -> dict[str, Any]:
    with deployment(base, "api", api_tokens=(TOKEN,)) as settings:
        return measure(settings, sizes)


def measure(settings: Settings, sizes: Sizes) -> dict[str, Any]:
    worker = WorkerProcess(dataclasses.replace(settings), "bench-api")
    worker.start(timeout=180)
    base = settings.web_url
    headers = {"Authorization": f"Bearer {TOKEN.token}"}
    account = "acc-api"
    rest: list[float] = []
    kafka: list[float] = []
    try:
        with CommandClient(settings) as client, httpx.Client(timeout=60) as http:
            opened = client.send(
                OpenAccount(account_id=account, owner_id="o", currency="USD")
            )
            if not opened.accepted:
                raise RuntimeError(f"could not open the account: {opened}")
            for n in range(sizes.warmup + sizes.commands):
                began = time.monotonic()
                answer = http.post(
                    f"{base}/accounts/{account}/deposits",
                    json={
                        "transaction_id": f"rest {n}",
                        "amount_minor": 100,
                        "currency": "USD",
                        "source": "card",
                        "reference": "",
                    },
                    headers=headers,
                )
                took = (time.monotonic() - began) * 1000
                if answer.status_code != 200:
                    raise RuntimeError(
                        f"POST deposits: {answer.status_code} {answer.text}"
                    )
                began = time.monotonic()
                result = client.send(
                    deposit(account, 100, f"kafka {n}", currency="USD"), timeout=60
                )
                sent = (time.monotonic() - began) * 1000
                if not result.accepted:
                    raise RuntimeError(f"deposit refused: {result}")
                if n >= sizes.warmup:
                    rest.append(took)
                    kafka.append(sent)
    finally:
        worker.stop()
    return {"rest": _tail(rest), "kafka": _tail(kafka)}


def _tail(values: list[float]) -> dict[str, Any]:
    return {
        "commands": len(values),
        "p50_ms": percentile(values, 0.50),
        "p99_ms": percentile(values, 0.99),
    }


def figures(rows: dict[str, Any]) -> list[dict[str, Any]]:
    commands = rows["rest"]["commands"]
    return [
        *tail_figures(
            "api.rest_{p}",
            f"HTTP command POST → 200, one at a time ({commands} deposits): {{p}}",
            rows["rest"],
            rows["kafka"],
            "CommandClient.send → result, same worker, taking turns",
            digits=2,
        ),
    ]
