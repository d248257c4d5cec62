"""Commands over HTTP against a real worker, broker and registry: every route and its
answers, the token, Idempotency-Key and If-Match under concurrent requests, a result
that arrives after the request gave up, and the generated OpenAPI document."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from openapi_spec_validator import validate as validate_openapi

from app.adapters.catalog import SchemaCatalog
from app.adapters.gateway import CommandGateway, KeyReused
from app.audit import answer
from app.client import CommandClient, new_envelope
from app.domain.accounts import Deposit, OpenAccount
from app.local import deployments
from app.local.process import Daemon
from app.rest.openapi import document
from app.rest.routes import ROUTES, endpoints
from app.settings import ApiToken, Settings
from app.writer import WRITER_NAME
from bench.harness import process_tree
from tests.invariants import serving_worker
from tests.support import (
    ORDER,
    as_run_here,
    codec_for,
    console_commands,
    events_by_aggregate,
    get_until,
    read_topic,
    readme_block,
    results_by_command,
)

# One test process runs the whole module: its module-scoped deployment is set up
# once (bin/streamfold test runs with --dist loadgroup).
pytestmark = [pytest.mark.xdist_group(__name__), pytest.mark.slow]

ADA = ApiToken("ada", "ada-0123456789abcdef0123")
OPS = ApiToken("ops", "ops-fedcba9876543210fedc")


@dataclasses.dataclass
class Api:
    settings: Settings
    worker: Daemon

    @property
    def base(self) -> str:
        return self.settings.web_url

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: ApiToken | None = ADA,
        **headers: str,
    ) -> httpx.Response:
        return httpx.request(
            method,
            self.base + path,
            json=body,
            headers=_headers(token, headers),
            timeout=90,
        )

    def open_account(self) -> str:
        """A new USD account's id."""
        account = unique("acc")
        body = {"account_id": account, "owner_id": "o", "currency": "USD"}
        opened = self.call("POST", "/accounts", body)
        assert opened.status_code == 201, opened.text
        return account


def _headers(token: ApiToken | None, given: dict[str, str]) -> dict[str, str]:
    sent = {name.replace("_", "-"): value for name, value in given.items()}
    if token is not None:
        sent["Authorization"] = f"Bearer {token.token}"
    return sent


@pytest.fixture(scope="module")
def api(registry_settings: Settings) -> Iterator[Api]:
    settings = dataclasses.replace(
        deployments.create(registry_settings), api_tokens=(ADA, OPS)
    )
    try:
        with serving_worker(settings, "rest") as worker:
            yield Api(settings, worker)
    finally:
        deployments.remove(settings)


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    catalog = SchemaCatalog.load()
    return document(endpoints(catalog), catalog)


def conforms(spec: dict[str, Any], schema_name: str, body: Any) -> None:
    """``body`` fits the document's schema ``schema_name`` (raises if not)."""
    schema = {
        "$ref": f"#/components/schemas/{schema_name}",
        "components": spec["components"],
    }
    jsonschema.Draft202012Validator(schema).validate(body)


def deposit_body(transaction_id: str, amount_minor: int) -> dict[str, Any]:
    """A USD card deposit's body."""
    return {
        "transaction_id": transaction_id,
        "amount_minor": amount_minor,
        "currency": "USD",
        "source": "card",
    }


def _sized(head: bytes, size: int) -> bytes:
    """``head`` + x… + ``"}``, ``size`` bytes in all."""
    return head + b"x" * (size - len(head) - 2) + b'"}'


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def keys_in(settings: Settings, area: str) -> set[bytes]:
    """The keys (aggregate ids) of every command produced to ``area``'s topic."""
    return {r.key or b"" for r in read_topic(settings, settings.topics.commands(area))}


def test_every_order_route_sends_its_command(api: Api, spec: dict[str, Any]) -> None:
    order = unique("ord")
    created = api.call("POST", "/orders", {**ORDER, "order_id": order})
    assert created.status_code == 201, created.text
    assert created.headers["Location"] == f"/orders/{order}"
    assert created.headers["ETag"] == '"1"'
    body = created.json()
    conforms(spec, "CommandResult", body)
    assert body["status"] == "ACCEPTED" and body["version"] == 1
    assert (
        created.headers["Streamfold-Position"]
        == f"{body['partition']}:{body['offset']}"
    )
    assert created.headers["Streamfold-Command-Id"] == body["command_id"]

    steps = [
        (
            "POST",
            f"/orders/{order}/items",
            {"product_id": "jam", "quantity": 1, "unit_price_minor": 250},
        ),
        ("DELETE", f"/orders/{order}/items/jam", None),
        (
            "POST",
            f"/orders/{order}/payment",
            {
                "payment_id": "pay-1",
                "amount_minor": 1200,
                "currency": "USD",
                "method": "paypal",
                "transaction_id": "tx-1",
            },
        ),
        (
            "POST",
            f"/orders/{order}/ship",
            {"tracking_number": "1ZADA", "carrier": "UPS"},
        ),
        ("POST", f"/orders/{order}/deliver", None),
    ]
    position = ""
    for version, (method, path, payload) in enumerate(steps, start=2):
        done = api.call(method, path, payload, If_Match=f'"{version - 1}"')
        assert done.status_code == 200, (path, done.text)
        assert done.headers["ETag"] == f'"{version}"', path
        assert done.headers["Location"] == f"/orders/{order}"
        assert done.json()["version"] == version
        conforms(spec, "CommandResult", done.json())
        position = done.headers["Streamfold-Position"]

    # The views are not broken, and the position is a read-your-writes token.
    view = get_until(
        f"{api.base}/orders/{order}",
        lambda r: r.status_code == 200 and r.json()["version"] == 6,
    )
    assert view.json()["status"] == "DELIVERED"
    # The position is what the /query views take to wait for the projection.
    queried = get_until(
        f"{api.base}/query/orders/{order}?after={position}",
        lambda r: r.status_code == 200 and r.json()["stale"] is False,
    )
    assert queried.json()["status"] == "DELIVERED", queried.text
    assert queried.json()["version"] == 6

    cancelled = unique("ord")
    assert (
        api.call("POST", "/orders", {**ORDER, "order_id": cancelled}).status_code == 201
    )
    gone = api.call(
        "POST", f"/orders/{cancelled}/cancel", {"reason": "changed my mind"}
    )
    assert gone.status_code == 200, gone.text

    # The caller comes from the token, in every event's metadata.
    streams = events_by_aggregate(api.settings, "orders")
    assert [e["metadata"]["stream_version"] for e in streams[order]] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]
    assert {e["metadata"]["user_id"] for e in streams[order] + streams[cancelled]} == {
        "ada"
    }


def test_every_account_route_and_its_refusals(api: Api, spec: dict[str, Any]) -> None:
    account = unique("acc")
    opened = api.call(
        "POST",
        "/accounts",
        {"account_id": account, "owner_id": "o-1", "currency": "USD"},
        token=OPS,
    )
    assert opened.status_code == 201, opened.text
    assert opened.headers["Location"] == f"/accounts/{account}"
    deposit = deposit_body("t-1", 1000)
    assert (
        api.call(
            "POST", f"/accounts/{account}/deposits", deposit, token=OPS
        ).status_code
        == 200
    )
    withdrawal = {
        "transaction_id": "t-2",
        "amount_minor": 400,
        "currency": "USD",
        "destination": "bank",
    }
    taken = api.call("POST", f"/accounts/{account}/withdrawals", withdrawal, token=OPS)
    assert taken.status_code == 200 and taken.headers["ETag"] == '"3"', taken.text

    # Refused by the domain: 422 with the rejection's code, message and field.
    overdraw = api.call(
        "POST",
        f"/accounts/{account}/withdrawals",
        {**withdrawal, "transaction_id": "t-3", "amount_minor": 10_000},
        token=OPS,
    )
    assert overdraw.status_code == 422, overdraw.text
    refused = overdraw.json()
    conforms(spec, "CommandResult", refused)
    assert refused["status"] == "REJECTED" and refused["code"] == "InsufficientFunds"
    assert "withdrawing 100.00 USD" in refused["message"]
    assert refused["field"] == "amount_minor"
    assert "ETag" not in overdraw.headers and "Location" not in overdraw.headers
    not_empty = api.call(
        "POST", f"/accounts/{account}/close", {"reason": "done"}, token=OPS
    )
    assert not_empty.status_code == 422 and not_empty.json()["code"] == "NonZeroBalance"

    # 404 for no such aggregate, 409 for one that exists already.
    missing = api.call("POST", f"/accounts/{unique('nobody')}/deposits", deposit)
    assert missing.status_code == 404 and missing.json()["code"] == "NotFound", (
        missing.text
    )
    again = api.call(
        "POST",
        "/accounts",
        {"account_id": account, "owner_id": "o-1", "currency": "USD"},
    )
    assert again.status_code == 409 and again.json()["code"] == "AlreadyExists", (
        again.text
    )

    rest = {**withdrawal, "transaction_id": "t-4", "amount_minor": 600}
    assert (
        api.call(
            "POST", f"/accounts/{account}/withdrawals", rest, token=OPS
        ).status_code
        == 200
    )
    closed = api.call(
        "POST", f"/accounts/{account}/close", {"reason": "done"}, token=OPS
    )
    assert closed.status_code == 200 and closed.headers["ETag"] == '"5"', closed.text
    events = events_by_aggregate(api.settings, "accounts")[account]
    assert [e["metadata"]["user_id"] for e in events] == ["ops"] * 5


def test_bad_requests_name_what_was_wrong_and_send_nothing(api: Api) -> None:
    order = unique("bad")
    item = {"product_id": "tea", "quantity": 1, "unit_price_minor": 450}
    cases: list[tuple[str, str, Any, dict[str, str], int, str | None]] = [
        ("POST", "/orders", {"order_id": order}, {}, 400, "customer_id"),
        (
            "POST",
            "/orders",
            {**ORDER, "order_id": order, "items": [{**item, "quantity": "two"}]},
            {},
            400,
            "items[0].quantity",
        ),
        (
            "POST",
            "/orders",
            {**ORDER, "order_id": order, "items": [{**item, "quantity": 2**31}]},
            {},
            400,
            "items[0].quantity",
        ),
        (
            "POST",
            "/orders",
            {**ORDER, "order_id": order, "user_id": "mallory"},
            {},
            400,
            "user_id",
        ),
        (
            "POST",
            "/orders",
            {**ORDER, "order_id": order, "account_id": 7},
            {},
            400,
            "account_id",
        ),
        (
            "POST",
            f"/orders/{order}/ship",
            {"order_id": "other", "tracking_number": "x", "carrier": "y"},
            {},
            400,
            "order_id",
        ),
        ("POST", f"/orders/{order}/items", [item], {}, 400, None),
        (
            "POST",
            f"/orders/{order}/ship",
            {"tracking_number": "x", "carrier": "y"},
            {"If_Match": 'W/"1"'},
            400,
            "If-Match",
        ),
        (
            "POST",
            f"/orders/{order}/ship",
            {"tracking_number": "x", "carrier": "y"},
            {"If_Match": "one"},
            400,
            "If-Match",
        ),
        (
            "POST",
            f"/orders/{order}/ship",
            {"tracking_number": "x", "carrier": "y"},
            {"Idempotency_Key": "k" * 201},
            400,
            "Idempotency-Key",
        ),
        (
            "POST",
            f"/orders/{order}/ship",
            {"tracking_number": "x", "carrier": "y"},
            {"Prefer": "wait=soon"},
            400,
            "Prefer",
        ),
        (
            "POST",
            f"/orders/{order}/ship?dry_run=1",
            {"tracking_number": "x", "carrier": "y"},
            {},
            400,
            "dry_run",
        ),
        ("POST", "/orders/%20bad/deliver", None, {}, 400, "order_id"),
    ]
    for method, path, body, headers, status, field in cases:
        got = api.call(method, path, body, **headers)
        assert got.status_code == status, (path, body, headers, got.text)
        assert got.json()["field"] == field, (path, body, headers, got.text)
        assert got.json()["error"], got.text

    raw = [
        (b"{not json", "application/json", 400, None),
        (
            b'{"tracking_number": "x", "tracking_number": "y", "carrier": "c"}',
            "application/json",
            400,
            "tracking_number",
        ),
        (b'{"tracking_number": NaN, "carrier": "c"}', "application/json", 400, None),
        (
            b'{"tracking_number": "x", "carrier": "c"}',
            "text/plain",
            415,
            "Content-Type",
        ),
        (b'{"carrier": "' + b"x" * 2**21 + b'"}', "application/json", 413, None),
        (b"[" * 5000, "application/json", 400, None),
        (
            b'{"tracking_number": "\\ud800", "carrier": "c"}',
            "application/json",
            400,
            None,
        ),
        # Under the HTTP limit, but its record would be over the write side's.
        (
            _sized(b'{"tracking_number": "t", "carrier": "', 2**20 - 16),
            "application/json",
            413,
            None,
        ),
    ]
    for content, media, status, field in raw:
        got = httpx.post(
            f"{api.base}/orders/{order}/ship",
            content=content,
            headers={"Content-Type": media, "Authorization": f"Bearer {ADA.token}"},
            timeout=30,
        )
        assert got.status_code == status, (content, got.text)
        assert got.json()["field"] == field, (content, got.text)
    # A header's bytes that are not UTF-8 are a token like any wrong one.
    garbled = httpx.post(
        f"{api.base}/orders/{order}/ship",
        json={"tracking_number": "x", "carrier": "c"},
        headers={"Authorization": b"Bearer \xff\xfe"},
        timeout=30,
    )
    assert garbled.status_code == 401, garbled.text
    # A method the route does not take.
    assert httpx.put(f"{api.base}/orders/{order}/ship", timeout=30).status_code == 405
    assert order.encode() not in keys_in(api.settings, "orders")
    assert b" bad" not in keys_in(api.settings, "orders")


def test_a_caller_needs_a_valid_token(api: Api) -> None:
    account = unique("acc")
    body = {"account_id": account, "owner_id": "o", "currency": "USD"}
    for sent, invalid in (
        (None, False),
        ("Bearer not-a-token-at-all-000", True),
        (f"Basic {ADA.token}", True),
        ("Bearer", True),
    ):
        headers = {} if sent is None else {"Authorization": sent}
        got = httpx.post(f"{api.base}/accounts", json=body, headers=headers, timeout=30)
        assert got.status_code == 401, (sent, got.text)
        assert got.json()["field"] == "Authorization"
        challenge = got.headers["WWW-Authenticate"]
        assert challenge.startswith('Bearer realm="streamfold"')
        assert ('error="invalid_token"' in challenge) is invalid, challenge
    lookup = httpx.get(f"{api.base}/commands/anything", timeout=30)
    assert lookup.status_code == 401
    # The token is checked before the body: a bad body without one is still a 401.
    assert api.call("POST", "/accounts", {"nonsense": 1}, token=None).status_code == 401
    assert account.encode() not in keys_in(api.settings, "accounts")


async def _concurrently(
    api: Api, requests: list[tuple[str, str, Any, dict[str, str]]]
) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=api.base, timeout=90) as client:
        return await asyncio.gather(
            *(
                client.request(method, path, json=body, headers=_headers(ADA, headers))
                for method, path, body, headers in requests
            )
        )


def _same_answer(response: httpx.Response) -> tuple[Any, ...]:
    kept = ("ETag", "Location", "Streamfold-Position", "Streamfold-Command-Id")
    return (
        response.status_code,
        response.json(),
        {h: response.headers.get(h) for h in kept},
    )


def test_a_retried_idempotency_key_gets_the_same_answer_and_one_set_of_events(
    api: Api,
) -> None:
    account = api.open_account()
    key = unique("deposit-key")
    deposit = deposit_body("t-1", 250)
    path = f"/accounts/{account}/deposits"
    responses = asyncio.run(
        _concurrently(api, [("POST", path, deposit, {"Idempotency-Key": key})] * 6)
    )
    first = _same_answer(responses[0])
    assert first[0] == 200 and first[1]["command_id"] == key, responses[0].text
    assert all(_same_answer(r) == first for r in responses), [r.text for r in responses]
    # Sent again later: the answer the key already got.
    assert _same_answer(api.call("POST", path, deposit, Idempotency_Key=key)) == first
    # Sent again with another body: refused, naming the header, and nothing
    # produced (the stream below has the one deposit).
    reused = api.call(
        "POST", path, {**deposit, "amount_minor": 999}, Idempotency_Key=key
    )
    assert reused.status_code == 422, reused.text
    assert reused.json()["code"] == "IdempotencyKeyReused"
    assert reused.json()["field"] == "Idempotency-Key"
    assert "another body" in reused.json()["error"]
    stream = events_by_aggregate(api.settings, "accounts")[account]
    deposits = [e for e in stream if e["metadata"]["command_id"] == key]
    assert len(deposits) == 1 and deposits[0]["amount_minor"] == 250
    assert len(stream) == 2
    answers = {answer(r) for r in results_by_command(api.settings)[key]}
    assert len(answers) == 1, answers
    # The same key for another aggregate is a different request: refused.
    other = api.call(
        "POST", f"/accounts/{unique('acc')}/deposits", deposit, Idempotency_Key=key
    )
    assert other.status_code == 422, other.text
    assert other.json()["code"] == "IdempotencyKeyReused"
    assert other.json()["field"] == "Idempotency-Key"


def test_any_gateway_tells_a_reused_key_with_another_body(api: Api) -> None:
    """The fingerprint of the command a result answers goes with the result (a
    header of its record, which the writer keeps with its answer): a gateway that
    started later (another worker, or this one restarted) tells a key sent again
    with another body apart, whether it read the result back at start or the writer
    answered the repeated id again."""
    account = unique("acc")
    opened = {"account_id": account, "owner_id": "o", "currency": "USD"}
    assert api.call("POST", "/accounts", opened).status_code == 201
    key = unique("deposit-key")
    body = {"transaction_id": "t-1", "amount_minor": 250, "currency": "USD"}
    path = f"/accounts/{account}/deposits"
    first = api.call("POST", path, {**body, "source": "card"}, Idempotency_Key=key)
    assert first.status_code == 200, first.text
    # A result of the account's partition after it: a gateway keeping one result
    # per partition does not have the key's.
    later = api.call("POST", path, {**body, "transaction_id": "t-2", "source": "s"})
    assert later.status_code == 200, later.text
    deposit = Deposit(account_id=account, source="card", **body)
    for kept, knows in ((api.settings.api_results_kept, True), (4, False)):
        settings = dataclasses.replace(api.settings, api_results_kept=kept)
        gateway = CommandGateway(settings, codec_for(settings))
        gateway.start()
        try:
            read_back = asyncio.run(gateway.result(key))
            assert (read_back is not None) == knows, read_back
            same = asyncio.run(
                gateway.send(deposit, new_envelope(command_id=key), wait=60)
            )
            assert (same.command_id, same.version) == (key, 2), same
            with pytest.raises(KeyReused, match="another body"):
                asyncio.run(
                    gateway.send(
                        dataclasses.replace(deposit, amount_minor=999),
                        new_envelope(command_id=key),
                        wait=60,
                    )
                )
        finally:
            gateway.stop()
    stream = events_by_aggregate(api.settings, "accounts")[account]
    assert [e.get("amount_minor") for e in stream] == [None, 250, 250], stream


def test_if_match_lets_one_of_concurrent_writers_through(api: Api) -> None:
    account = api.open_account()
    racers = [
        (
            "POST",
            f"/accounts/{account}/deposits",
            deposit_body(f"t-{n}", 100 + n),
            {"If-Match": '"1"'},
        )
        for n in range(8)
    ]
    responses = asyncio.run(_concurrently(api, racers))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [409] * 7, [r.text for r in responses]
    [winner] = [r for r in responses if r.status_code == 200]
    assert winner.headers["ETag"] == '"2"'
    for loser in (r for r in responses if r.status_code == 409):
        assert loser.json()["code"] == "ConcurrencyConflict"
        assert loser.json()["field"] == "expected_version"
        assert "expected version 1" in loser.json()["message"]
    stream = events_by_aggregate(api.settings, "accounts")[account]
    assert [e["metadata"]["stream_version"] for e in stream] == [1, 2]
    assert stream[1]["amount_minor"] in {100 + n for n in range(8)}
    assert stream[1]["metadata"]["command_id"] == winner.json()["command_id"]

    # Creating one aggregate from many requests at once: one 201, the rest 409.
    contested = unique("acc")
    opens = [
        (
            "POST",
            "/accounts",
            {"account_id": contested, "owner_id": f"o-{n}", "currency": "USD"},
            {},
        )
        for n in range(6)
    ]
    opened = asyncio.run(_concurrently(api, opens))
    assert sorted(r.status_code for r in opened) == [201] + [409] * 5, [
        r.text for r in opened
    ]
    assert len(events_by_aggregate(api.settings, "accounts")[contested]) == 1


def test_a_late_result_is_504_then_found_by_its_command_id(api: Api) -> None:
    account = api.open_account()
    pid = api.worker.pid()
    assert pid is not None
    writers = [
        p
        for p in process_tree(pid)()[1:]
        if Path(f"/proc/{p}/comm").read_text().strip() == WRITER_NAME
    ]
    assert len(writers) == 1, "the worker has no write process"
    key = unique("late")
    deposit = deposit_body("t-late", 5)
    os.kill(writers[0], signal.SIGSTOP)
    try:
        # No writer runs: no result can arrive within the second the caller waits.
        late = api.call(
            "POST",
            f"/accounts/{account}/deposits",
            deposit,
            Idempotency_Key=key,
            Prefer="wait=1",
        )
    finally:
        os.kill(writers[0], signal.SIGCONT)
    assert late.status_code == 504, late.text
    assert late.json()["command_id"] == key
    assert late.headers["Streamfold-Command-Id"] == key
    found = api.call("GET", f"/commands/{key}", Prefer="wait=60")
    assert found.status_code == 200, found.text
    assert found.json()["status"] == "ACCEPTED" and found.json()["version"] == 2
    assert found.headers["ETag"] == '"2"'
    retried = api.call(
        "POST", f"/accounts/{account}/deposits", deposit, Idempotency_Key=key
    )
    assert retried.status_code == 200 and retried.json() == found.json()

    # A command no HTTP request sent (a plain Kafka client's) is found too.
    with CommandClient(api.settings) as client:
        sent = client.send(
            Deposit(
                account_id=account,
                transaction_id="t-kafka",
                amount_minor=7,
                currency="USD",
                source="cash",
            )
        )
    kafka = api.call("GET", f"/commands/{sent.command_id}", Prefer="wait=30")
    assert kafka.status_code == 200 and kafka.json()["version"] == sent.version
    unknown = api.call("GET", f"/commands/{unique('never-sent')}")
    assert unknown.status_code == 404 and unknown.json()["field"] == "command_id"


def test_a_new_gateway_reads_back_the_newest_results(api: Api) -> None:
    """What a restarted worker knows: the newest results of each partition, read
    back at start, however they were sent; older ones are not kept."""
    account = unique("acc")
    with CommandClient(api.settings) as client:
        opened = client.send(
            OpenAccount(account_id=account, owner_id="o", currency="USD")
        )
        deposits = [
            client.submit(
                Deposit(
                    account_id=account,
                    transaction_id=f"t-{n}",
                    amount_minor=1,
                    currency="USD",
                    source="s",
                )
            )
            for n in range(60)
        ]
        assert all(r.accepted for r in client.wait(deposits))
    # 100 kept over 4 partitions: the newest 25 of the account's partition.
    kept = dataclasses.replace(api.settings, api_results_kept=100)
    gateway = CommandGateway(kept, codec_for(kept))
    gateway.start()
    try:
        newest = asyncio.run(gateway.result(deposits[-1]))
        oldest = asyncio.run(gateway.result(opened.command_id))
    finally:
        gateway.stop()
    assert newest is not None and newest.version == 61, newest
    assert oldest is None


def test_history_and_state_read_a_write_at_its_position(api: Api) -> None:
    """POST, then at once GET the aggregate's history and state with the answer's
    Streamfold-Position as ?after=: the event just written is there, not stale."""
    account = unique("acc")
    opened = api.call(
        "POST", "/accounts", {"account_id": account, "owner_id": "o", "currency": "USD"}
    )
    assert opened.status_code == 201, opened.text
    deposit = {
        "transaction_id": "t-1",
        "amount_minor": 725,
        "currency": "USD",
        "source": "card",
    }
    sent = api.call("POST", f"/accounts/{account}/deposits", deposit)
    assert sent.status_code == 200, sent.text
    after = sent.headers["Streamfold-Position"]
    history = httpx.get(
        f"{api.base}/query/history/{account}",
        params={"type": "account", "after": after},
        timeout=30,
    )
    assert history.status_code == 200, history.text
    assert [e["event_type"] for e in history.json()["events"]] == [
        "AccountOpened",
        "MoneyDeposited",
    ]
    assert history.json()["stale"] is False
    state = httpx.get(
        f"{api.base}/query/state/{account}",
        params={"type": "account", "after": after},
        timeout=30,
    ).json()
    assert (state["version"], state["state"]["balance_minor"]) == (2, 725), state
    assert state["stale"] is False
    # A position the index has not reached: the answer as it stands, said stale.
    partition = after.split(":")[0]
    ahead = httpx.get(
        f"{api.base}/query/state/{account}",
        params={"type": "account", "after": f"{partition}:{10**12}"},
        timeout=30,
    ).json()
    assert (ahead["version"], ahead["stale"]) == (2, True), ahead
    # A position names a partition of one type's events topic: without the type,
    # refused.
    untyped = httpx.get(
        f"{api.base}/query/history/{account}", params={"after": after}, timeout=30
    )
    assert untyped.status_code == 400 and untyped.json()["field"] == "type"


def test_the_openapi_document_and_its_page(api: Api, spec: dict[str, Any]) -> None:
    served = httpx.get(f"{api.base}/openapi.json", timeout=30)
    assert served.status_code == 200
    assert served.json() == spec
    validate_openapi(served.json())
    for route in ROUTES:
        assert route.method.lower() in served.json()["paths"][route.path], route
    page = httpx.get(f"{api.base}/docs", timeout=30)
    assert page.status_code == 200
    assert page.headers["Content-Type"].startswith("text/html")
    for route in ROUTES:
        assert f"<code>{route.path}</code>" in page.text, route.path
    # Every asset is on the page itself: nothing is loaded from elsewhere.
    assert not re.search(r"<(script|link|img)\b", page.text)
    assert "http://" not in page.text and "https://" not in page.text


def test_without_a_token_writes_are_refused_and_reads_stay_open(
    deployment: Settings,
) -> None:
    settings = dataclasses.replace(deployment, api_tokens=())
    base = settings.web_url
    account = unique("acc")
    with serving_worker(settings, "no-token"):
        refused = httpx.post(
            f"{base}/accounts",
            json={"account_id": account, "owner_id": "o", "currency": "USD"},
            headers={"Authorization": f"Bearer {ADA.token}"},
            timeout=30,
        )
        assert refused.status_code == 403, refused.text
        assert "STREAMFOLD_API_TOKENS" in refused.json()["error"]
        assert httpx.get(f"{base}/commands/x", timeout=30).status_code == 403
        assert httpx.get(f"{base}/openapi.json", timeout=30).status_code == 200
        assert httpx.get(f"{base}/accounts/{account}", timeout=30).status_code == 404
        assert (
            httpx.get(f"{base}/query/accounts/{account}", timeout=30).status_code == 404
        )
    assert account.encode() not in keys_in(settings, "accounts")


def _header_names(head: str) -> set[str]:
    return set(_header_values(head))


def _header_values(head: str) -> dict[str, str]:
    pairs = (line.partition(":") for line in head.splitlines()[1:])
    return {name.lower(): value.strip() for name, _, value in pairs}


def test_the_readme_example(api: Api) -> None:
    """The README's curl example, run with curl against a worker with its token:
    the same status lines, headers and JSON fields come back."""
    example = console_commands(readme_block("### HTTP commands", "console"))
    assert example, "the README shows no HTTP commands example"
    run_id = unique("acc")
    for argv, shown in example:
        assert argv[0] == "curl", argv
        argv = as_run_here(argv, run_id, api.base)
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 0, done.stderr
        head, _, body = done.stdout.replace("\r\n", "\n").partition("\n\n")
        shown_head, _, shown_body = shown.partition("\n\n")
        shown_head = re.sub(r"acc-[0-9a-f]{6}", run_id, shown_head)
        assert head.splitlines()[0] == shown_head.splitlines()[0], (argv, head)
        assert _header_names(shown_head) <= _header_names(head), (argv, head)
        for name in ("etag", "location", "www-authenticate"):
            shown_value = _header_values(shown_head).get(name)
            assert _header_values(head).get(name) == shown_value, (argv, name, head)
        assert set(json.loads(body)) == set(json.loads(shown_body)), (argv, body)
