"""`streamfold demo`: bring everything up, drive a small shop and ledger through it,
and show what happened and where to look."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx

from app.adapters.eventlog import CommandResult
from app.application import saga
from app.application.saga import Step
from app.client import CommandClient
from app.domain.accounts import OpenAccount
from app.domain.money import fmt
from app.domain.orders import DeliverOrder, LineItem, ShipOrder
from app.local import stack
from app.local.worker import WorkerProcess
from app.settings import Settings
from app.waiting import eventually
from app.workload import LONDON, deposit, new_order, withdrawal


def run(settings: Settings) -> int:
    stack.up(settings)
    fresh = WorkerProcess(settings).start(timeout=120)
    web = settings.web_url
    print(f"worker    {'started' if fresh else 'running'}  {web}")
    tag = uuid.uuid4().hex[:6]
    account, order, customer = f"acc-{tag}", f"ord-{tag}", f"cust-{tag}"
    print(f"\n── demo workload (ids end in {tag}) " + "─" * 40)
    top_up = deposit(account, 10_000, f"dep-{tag}", reference="welcome top-up")
    with CommandClient(settings) as client:
        steps: list[tuple[str, Any, dict[str, Any]]] = [
            (
                "open account",
                OpenAccount(
                    account_id=account,
                    owner_id=customer,
                    currency="USD",
                    overdraft_limit_minor=0,
                ),
                {},
            ),
            (f"deposit {fmt(10_000, 'USD')}", top_up, {}),
            (
                "create order",
                new_order(
                    order,
                    customer,
                    (
                        LineItem(
                            product_id="notebook",
                            quantity=2,
                            unit_price_minor=1_250,
                            tax_rate_bps=2_000,
                        ),
                        LineItem(product_id="pen", quantity=3, unit_price_minor=199),
                    ),
                    address=LONDON,
                    account_id=account,
                ),
                {},
            ),
            # The payment saga pays the order from the account; the demo waits
            # for the results of its two commands (their ids are derived).
            ("saga: withdraw", Step.WITHDRAW, {}),
            ("saga: record payment", Step.PAY, {}),
            (
                "ship",
                ShipOrder(
                    order_id=order, tracking_number=f"1Z{tag.upper()}", carrier="UPS"
                ),
                {},
            ),
            ("deliver", DeliverOrder(order_id=order), {}),
            (
                "overdraw (refused)",
                withdrawal(account, 1_000_000, f"big-{tag}", destination="yacht"),
                {},
            ),
            (
                "stale version (refused)",
                deposit(account, 1, f"late-{tag}", source="cash"),
                {"expected_version": 1},
            ),
            ("deposit, chosen command id", top_up, {"command_id": f"repeat-{tag}"}),
            ("same command id again", top_up, {"command_id": f"repeat-{tag}"}),
        ]
        last: dict[str, CommandResult] = {}
        for label, command, envelope in steps:
            if isinstance(command, Step):
                [result] = client.wait([saga.command_id(order, command)], timeout=60)
            else:
                result = client.send(command, timeout=30, **envelope)
            last[result.aggregate_type] = (
                result if result.accepted else last.get(result.aggregate_type, result)
            )
            outcome = (
                f"accepted  v{result.version}  events@{result.partition}:{result.offset}"
                if result.accepted
                else f"rejected  {result.code}: {result.message}"
            )
            print(f"  {label:<26} {outcome}")
    print(
        "\n── read models (waiting for each projection to reach the last write) "
        + "─" * 8
    )
    order_pos = last["order"]
    account_pos = last["account"]
    for label, url, last_write, after in (
        ("order (Postgres)", f"{web}/query/orders/{order}", order_pos, True),
        ("account (Postgres)", f"{web}/query/accounts/{account}", account_pos, True),
        ("order (Faust table)", f"{web}/orders/{order}", order_pos, False),
    ):
        params = (
            {"after": f"{last_write.partition}:{last_write.offset}"} if after else {}
        )
        body = _get(url, params, last_write.version or 0)
        print(f"  {label}: {json.dumps(_brief(body))}")
    print(f"""
── where to look {"─" * 60}
  web views      {web}/orders/{order}   {web}/accounts/{account}
                 {web}/customers/{customer}/orders
  query views    {web}/query/orders/{order}   {web}/query/accounts/{account}/transactions
                 {web}/query/orders?status=DELIVERED   {web}/query/reports/daily
  status         {web}/status   {web}/metrics   (or: bin/streamfold status)
  history        bin/streamfold history {order}
  topics         {settings.topics.commands("orders")}, {settings.topics.events("orders")},
                 {settings.topics.events("accounts")}, {settings.topics.results}
  Postgres       psql {settings.query_database_url}   (the read-only role)
  registry       {settings.schema_registry_url}/subjects
  stop it all    bin/streamfold down""")
    return 0


def _get(url: str, params: dict[str, str], version: int) -> dict[str, Any]:
    """The view once it shows ``version``: a Faust view takes no ``after``, a
    Postgres view answers ``"stale": true`` after STREAMFOLD_QUERY_WAIT, and a
    worker that has just started may be slow to answer at all."""

    def fetch() -> tuple[bool, dict[str, Any]]:
        try:
            response = httpx.get(url, params=params, timeout=10)
        except httpx.TransportError as error:
            return False, {"error": f"{type(error).__name__} from {url}"}
        body = dict(response.json())
        shown = response.status_code == 200 and not body.get("stale")
        return shown and body.get("version", 0) >= version, body

    _, body = eventually(fetch, lambda found: found[0], timeout=60, every=0.2)
    return body


def _brief(body: dict[str, Any]) -> dict[str, Any]:
    keep = (
        "order_id",
        "account_id",
        "status",
        "total_minor",
        "balance_minor",
        "version",
        "tracking_number",
        "items_count",
        "stale",
        "error",
    )
    return {k: body[k] for k in keep if k in body}
