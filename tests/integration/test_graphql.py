"""GraphQL at /graphql against a real worker, broker, registry and Postgres, spoken to
with a standard client (gql: HTTP, and graphql-transport-ws for the subscription):
the read-model queries, every mutation, the token, a rejection and a concurrency
conflict, the subscription, and the limits."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from gql import Client, GraphQLRequest, gql
from gql.transport.aiohttp import AIOHTTPTransport
from gql.transport.exceptions import TransportQueryError
from gql.transport.websockets import WebsocketsTransport

from app.graphql.schema import MAX_DEPTH
from app.local import deployments
from app.settings import ApiToken, Settings
from tests.invariants import serving_worker
from tests.support import ORDER, as_run_here, console_commands, readme_block

# One test process runs the whole module: its module-scoped deployment is set up
# once (bin/streamfold test runs with --dist loadgroup).
pytestmark = [pytest.mark.xdist_group(__name__), pytest.mark.slow]

ADA = ApiToken("ada", "ada-0123456789abcdef0123")
OPS = ApiToken("ops", "ops-fedcba9876543210fedc")
# Bounds a subscription's wait for events so that a missing one fails the test
# instead of hanging it; not a measure of anything.
EVENTS_WAIT_S = 90

RESULT = """
    command_id aggregate_type aggregate_id status version event_ids partition
    offset code message field correlation_id
"""


@dataclasses.dataclass
class Api:
    settings: Settings

    @property
    def url(self) -> str:
        return f"{self.settings.web_url}/graphql"

    def run(
        self,
        document: str,
        variables: dict[str, Any] | None = None,
        token: ApiToken | None = ADA,
    ) -> dict[str, Any]:
        """The operation's data; raises ``TransportQueryError`` with its errors."""
        headers = {"Authorization": f"Bearer {token.token}"} if token else {}

        async def execute() -> dict[str, Any]:
            transport = AIOHTTPTransport(url=self.url, headers=headers, timeout=90)
            async with Client(transport=transport) as session:
                request = GraphQLRequest(gql(document), variable_values=variables)
                return await session.execute(request)

        return asyncio.run(execute())

    def refused(
        self,
        document: str,
        variables: dict[str, Any] | None = None,
        token: ApiToken | None = ADA,
    ) -> list[dict[str, Any]]:
        with pytest.raises(TransportQueryError) as raised:
            self.run(document, variables, token)
        errors = raised.value.errors
        assert errors, raised.value
        return errors


@pytest.fixture(scope="module")
def api(registry_settings: Settings) -> Iterator[Api]:
    settings = dataclasses.replace(
        deployments.create(registry_settings),
        api_tokens=(ADA, OPS),
        # Read-your-writes: a query given a command's position waits for it.
        query_wait_s=30.0,
    )
    try:
        with serving_worker(settings, "graphql"):
            yield Api(settings)
    finally:
        deployments.remove(settings)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def position(result: dict[str, Any]) -> str:
    return f"{result['partition']}:{result['offset']}"


CREATE = f"""
mutation ($input: CreateOrderInput!, $key: String) {{
  create_order(input: $input, idempotency_key: $key) {{ {RESULT} }}
}}
"""
OPEN = f"""
mutation ($input: OpenAccountInput!, $expected: Int) {{
  open_account(input: $input, expected_version: $expected) {{ {RESULT} }}
}}
"""
DEPOSIT = f"""
mutation ($id: String!, $input: DepositInput!, $expected: Int, $key: String) {{
  deposit(account_id: $id, input: $input, expected_version: $expected,
          idempotency_key: $key) {{ {RESULT} }}
}}
"""


def order_input(order_id: str, customer_id: str, **more: Any) -> dict[str, Any]:
    return {**ORDER, "order_id": order_id, "customer_id": customer_id, **more}


def open_account(api: Api, account_id: str, owner: str = "ada") -> dict[str, Any]:
    result: dict[str, Any] = api.run(
        OPEN,
        {"input": {"account_id": account_id, "owner_id": owner, "currency": "USD"}},
    )["open_account"]
    assert result["status"] == "ACCEPTED", result
    return result


def deposit(
    api: Api,
    account_id: str,
    amount: int,
    transaction_id: str | None = None,
    **more: Any,
) -> dict[str, Any]:
    done: dict[str, Any] = api.run(
        DEPOSIT,
        {
            "id": account_id,
            "input": {
                "transaction_id": transaction_id or unique("t"),
                "amount_minor": amount,
                "currency": "USD",
                "source": "card",
            },
            **more,
        },
    )["deposit"]
    return done


def withdraw(api: Api, account_id: str, amount: int) -> dict[str, Any]:
    done: dict[str, Any] = api.run(
        f"""mutation ($id: String!, $input: WithdrawInput!) {{
          withdraw(account_id: $id, input: $input) {{ {RESULT} }}
        }}""",
        {
            "id": account_id,
            "input": {
                "transaction_id": unique("w"),
                "amount_minor": amount,
                "currency": "USD",
                "destination": "bank",
            },
        },
    )["withdraw"]
    return done


def with_reason(
    api: Api, mutation: str, id_argument: str, aggregate_id: str, reason: str
) -> dict[str, Any]:
    """``cancel_order`` or ``close_account``: a mutation whose input is a reason."""
    done: dict[str, Any] = api.run(
        f"""mutation ($id: String!) {{
          {mutation}({id_argument}: $id, input: {{reason: "{reason}"}}) {{ {RESULT} }}
        }}""",
        {"id": aggregate_id},
    )[mutation]
    return done


def test_every_order_mutation_and_the_order_queries(api: Api) -> None:
    order, customer = unique("ord"), unique("cust")
    created = api.run(CREATE, {"input": order_input(order, customer)})["create_order"]
    assert created["status"] == "ACCEPTED" and created["version"] == 1, created
    steps: list[tuple[str, str, dict[str, Any]]] = [
        (
            "add_item",
            "(order_id: $id, item: $input, expected_version: $v)",
            {"product_id": "jam", "quantity": 1, "unit_price_minor": 250},
        ),
        ("remove_item", '(order_id: $id, product_id: "jam", expected_version: $v)', {}),
        (
            "process_payment",
            "(order_id: $id, input: $input, expected_version: $v)",
            {
                "payment_id": "pay-1",
                "amount_minor": 1200,
                "currency": "USD",
                "method": "paypal",
                "transaction_id": "tx-1",
            },
        ),
        (
            "ship_order",
            "(order_id: $id, input: $input, expected_version: $v)",
            {"tracking_number": "1ZADA", "carrier": "UPS"},
        ),
        ("deliver_order", "(order_id: $id, expected_version: $v)", {}),
    ]
    input_types = {
        "add_item": "LineItemInput",
        "process_payment": "ProcessPaymentInput",
        "ship_order": "ShipOrderInput",
    }
    last = created
    for version, (name, arguments, payload) in enumerate(steps, start=2):
        declared = "$id: String!, $v: Int"
        variables: dict[str, Any] = {"id": order, "v": version - 1}
        if name in input_types:
            declared += f", $input: {input_types[name]}!"
            variables["input"] = payload
        document = f"mutation ({declared}) {{ {name}{arguments} {{ {RESULT} }} }}"
        last = api.run(document, variables)[name]
        assert last["status"] == "ACCEPTED", (name, last)
        assert last["version"] == version, (name, last)

    found = api.run(
        """
        query ($id: String!, $after: String) {
          order(order_id: $id, after: $after) {
            order_id customer_id status total_minor paid_minor version
            tracking_number stale items { product_id quantity total_price_minor }
          }
        }
        """,
        {"id": order, "after": position(last)},
    )["order"]
    assert found == {
        "order_id": order,
        "customer_id": customer,
        "status": "DELIVERED",
        "total_minor": 1200,
        "paid_minor": 1200,
        "version": 6,
        "tracking_number": "1ZADA",
        "stale": False,
        "items": [
            {"product_id": "cake", "quantity": 1, "total_price_minor": 300},
            {"product_id": "tea", "quantity": 2, "total_price_minor": 900},
        ],
    }

    # A second order of the same customer, cancelled: filters and the customer.
    second = unique("ord")
    api.run(CREATE, {"input": order_input(second, customer)})
    cancelled = with_reason(api, "cancel_order", "order_id", second, "changed my mind")
    assert cancelled["status"] == "ACCEPTED" and cancelled["version"] == 2

    listed = api.run(
        """
        query ($customer: String!, $after: String) {
          delivered: orders(customer_id: $customer, status: "DELIVERED", after: $after) {
            items { order_id status } limit stale
          }
          one: orders(customer_id: $customer, limit: 1, after: $after) {
            items { order_id } limit
          }
          all: orders(customer_id: $customer, after: $after) {
            items { order_id status }
          }
        }
        """,
        {"customer": customer, "after": position(cancelled)},
    )
    assert listed["delivered"] == {
        "items": [{"order_id": order, "status": "DELIVERED"}],
        "limit": 100,
        "stale": False,
    }
    assert listed["one"]["limit"] == 1 and len(listed["one"]["items"]) == 1
    assert sorted((o["order_id"], o["status"]) for o in listed["all"]["items"]) == (
        sorted([(order, "DELIVERED"), (second, "CANCELLED")])
    )

    found_by_id = api.run(
        """query ($q: String!, $after: String) {
          search(q: $q, after: $after) {
            type orders { order_id customer_id product_ids } customers { customer_id }
            total_count page next_cursor stale
          }
          by_customer: search(q: $q, type: "customers", after: $after) {
            customers { customer_id name } orders { order_id }
          }
        }""",
        {"q": customer, "after": position(cancelled)},
    )
    assert found_by_id["search"] == {
        "type": "orders",
        "orders": sorted(
            [
                {"order_id": o, "customer_id": customer, "product_ids": ["cake", "tea"]}
                for o in (order, second)
            ],
            key=lambda o: o["order_id"],
        ),
        "customers": [],
        "total_count": 2,
        "page": 0,
        "next_cursor": None,
        "stale": False,
    }
    assert found_by_id["by_customer"] == {
        "customers": [{"customer_id": customer, "name": "Ada Lovelace"}],
        "orders": [],
    }

    customer_view = api.run(
        """
        query ($customer: String!) {
          customer(customer_id: $customer) {
            customer_id
            statistics { currency total_orders lifetime_value_minor }
            first: orders(page: 0, page_size: 1) { items { order_id } total_count page page_size }
            second: orders(page: 1, page_size: 1) { items { order_id } total_count page }
          }
        }
        """,
        {"customer": customer},
    )["customer"]
    assert customer_view["customer_id"] == customer
    assert customer_view["statistics"] == [
        {"currency": "USD", "total_orders": 2, "lifetime_value_minor": 1200}
    ]
    pages = [customer_view["first"], customer_view["second"]]
    assert [p["total_count"] for p in pages] == [2, 2]
    assert [p["page"] for p in pages] == [0, 1]
    assert {p["items"][0]["order_id"] for p in pages} == {order, second}

    # A paged query past its last page is refused, naming the argument.
    [error] = api.refused(
        """query ($c: String!) {
          customer(customer_id: $c) { orders(page: 5, page_size: 1) { total_count } }
        }""",
        {"c": customer},
    )
    assert error["extensions"] == {"code": "BAD_USER_INPUT", "field": "page"}
    assert error["path"] == ["customer", "orders"]

    history = api.run(
        """query ($id: String!, $after: String) {
          history(aggregate_id: $id, type: "order", from_version: 2, to_version: 3,
                  after: $after) {
            aggregate_type stale events { stream_version event_type user_id }
          }
          at2: state(aggregate_id: $id, type: "order", version: 2, after: $after) {
            version state
          }
          now: state(aggregate_id: $id, type: "order", after: $after) {
            version state stale
          }
        }""",
        {"id": order, "after": position(last)},
    )
    assert history["history"] == {
        "aggregate_type": "order",
        "stale": False,
        "events": [
            {"stream_version": 2, "event_type": "OrderItemAdded", "user_id": "ada"},
            {"stream_version": 3, "event_type": "OrderItemRemoved", "user_id": "ada"},
        ],
    }
    assert history["at2"]["version"] == 2
    lines = history["at2"]["state"]["items"]
    assert sorted(line["product_id"] for line in lines) == ["cake", "jam", "tea"]
    assert history["now"]["version"] == 6 and not history["now"]["stale"]
    assert history["now"]["state"]["status"] == "DELIVERED"


def test_account_mutations_rejection_conflict_and_transactions(api: Api) -> None:
    account = unique("acc")
    open_account(api, account)
    first = deposit(api, account, 2500, expected=1)
    assert first["status"] == "ACCEPTED" and first["version"] == 2, first

    # A stale expected version: a concurrency conflict, as the command's result.
    stale = deposit(api, account, 100, expected=1)
    assert stale["status"] == "REJECTED", stale
    assert stale["code"] == "ConcurrencyConflict"
    assert stale["field"] == "expected_version"
    assert stale["version"] is None and stale["event_ids"] == []

    # A rule of the domain refuses it: a rejection, not an error.
    overdraw = withdraw(api, account, 1_000_000)
    assert overdraw["status"] == "REJECTED"
    assert overdraw["code"] == "InsufficientFunds", overdraw

    # The same idempotency key twice with the same input: one command, the same
    # answer; with another input, refused.
    key, transaction = unique("key"), unique("t")
    once = deposit(api, account, 500, transaction, key=key)
    again = deposit(api, account, 500, transaction, key=key)
    assert once == again and once["command_id"] == key and once["version"] == 3
    [reused] = api.refused(
        DEPOSIT,
        {
            "id": account,
            "key": key,
            "input": {
                "transaction_id": transaction,
                "amount_minor": 501,
                "currency": "USD",
                "source": "card",
            },
        },
    )
    assert reused["extensions"]["code"] == "IdempotencyKeyReused", reused
    assert reused["extensions"]["field"] == "idempotency_key"

    withdrawn = withdraw(api, account, 3_000)
    assert withdrawn["status"] == "ACCEPTED" and withdrawn["version"] == 4
    closed = with_reason(api, "close_account", "account_id", account, "moving")
    assert closed["status"] == "ACCEPTED" and closed["version"] == 5, closed

    seen = api.run(
        """query ($id: String!, $after: String) {
          account(account_id: $id, after: $after) {
            account_id owner_id balance_minor status version stale
            transactions(page_size: 2) {
              items { kind amount_minor balance_after_minor stream_version }
              total_count page page_size
            }
          }
        }""",
        {"id": account, "after": position(closed)},
    )["account"]
    assert seen == {
        "account_id": account,
        "owner_id": "ada",
        "balance_minor": 0,
        "status": "CLOSED",
        "version": 5,
        "stale": False,
        "transactions": {
            "items": [
                {
                    "kind": "WITHDRAWAL",
                    "amount_minor": 3000,
                    "balance_after_minor": 0,
                    "stream_version": 4,
                },
                {
                    "kind": "DEPOSIT",
                    "amount_minor": 500,
                    "balance_after_minor": 3000,
                    "stream_version": 3,
                },
            ],
            "total_count": 3,
            "page": 0,
            "page_size": 2,
        },
    }


def test_a_mutation_needs_a_token_and_the_user_comes_from_it(api: Api) -> None:
    account = unique("acc")
    variables = {"input": {"account_id": account, "owner_id": "ada", "currency": "USD"}}
    [missing] = api.refused(OPEN, variables, token=None)
    assert missing["extensions"] == {
        "code": "UNAUTHENTICATED",
        "field": "Authorization",
    }
    assert missing["path"] == ["open_account"]
    assert "Bearer" in missing["message"]
    [wrong] = api.refused(
        OPEN, variables, token=ApiToken("ada", "not-a-token-0000000000")
    )
    assert wrong["extensions"]["code"] == "UNAUTHENTICATED"

    # Nothing was sent: the account has no events.
    [unknown] = api.refused(
        "query ($id: String!) { history(aggregate_id: $id) { aggregate_type } }",
        {"id": account},
    )
    assert unknown["extensions"] == {"code": "NOT_FOUND"}

    # The events' user id is the token's user, whatever the input says.
    opened = api.run(OPEN, variables, token=OPS)["open_account"]
    assert opened["status"] == "ACCEPTED"
    events = api.run(
        """query ($id: String!, $after: String) {
          history(aggregate_id: $id, type: "account", after: $after) {
            events { stream_version user_id } stale
          }
        }""",
        {"id": account, "after": position(opened)},
    )
    assert events["history"] == {
        "events": [{"stream_version": 1, "user_id": "ops"}],
        "stale": False,
    }
    # A position names a partition of one topic: after needs the type.
    [untyped] = api.refused(
        'query ($id: String!) { history(aggregate_id: $id, after: "0:0") { stale } }',
        {"id": account},
    )
    assert untyped["extensions"] == {"code": "BAD_USER_INPUT", "field": "type"}


def test_bad_arguments_are_refused_naming_them(api: Api) -> None:
    # GraphQL's own types refuse first, naming where (an Int is 32 bits).
    [item] = api.refused(
        CREATE,
        {
            "input": order_input(
                unique("ord"),
                unique("cust"),
                items=[{"product_id": "tea", "quantity": 2**31, "unit_price_minor": 1}],
            )
        },
    )
    assert "quantity" in item["message"]
    [status] = api.refused('{ orders(status: "LOST") { limit } }')
    assert status["extensions"] == {"code": "BAD_USER_INPUT", "field": "status"}
    [after] = api.refused('{ account(account_id: "a", after: "99:0") { version } }')
    assert after["extensions"]["field"] == "after"
    for error in (item, status, after):
        assert "Traceback" not in error["message"]
        assert "SELECT" not in error["message"]


def test_a_subscription_receives_an_aggregates_events(api: Api) -> None:
    account = unique("acc")
    opened = open_account(api, account)
    url = api.url.replace("http://", "ws://")
    subscription = gql(
        """subscription ($id: String!) {
          aggregate_events(type: "account", aggregate_id: $id) {
            aggregate_id stream_version event_type user_id partition offset data
          }
        }"""
    )

    async def follow() -> list[dict[str, Any]]:
        transport = WebsocketsTransport(
            url=url, subprotocols=[WebsocketsTransport.GRAPHQLWS_SUBPROTOCOL]
        )
        received: list[dict[str, Any]] = []
        async with Client(transport=transport) as session:
            request = GraphQLRequest(subscription, variable_values={"id": account})
            async for result in session.subscribe(request):
                received.append(result["aggregate_events"])
                if len(received) == 1:
                    # Sent once the subscription is live: it must arrive too.
                    await asyncio.to_thread(deposit, api, account, 700)
                if len(received) == 2:
                    return received
        return received

    received = asyncio.run(asyncio.wait_for(follow(), EVENTS_WAIT_S))
    assert [(e["stream_version"], e["event_type"]) for e in received] == [
        (1, "AccountOpened"),
        (2, "MoneyDeposited"),
    ]
    assert {e["aggregate_id"] for e in received} == {account}
    assert {e["user_id"] for e in received} == {"ada"}
    assert (received[0]["partition"], received[0]["offset"]) == (
        opened["partition"],
        opened["offset"],
    )
    assert received[1]["data"]["amount_minor"] == 700

    # From a version on, and from an offset: what is already committed comes first.
    async def first_of(arguments: str) -> dict[str, Any]:
        transport = WebsocketsTransport(
            url=url, subprotocols=[WebsocketsTransport.GRAPHQLWS_SUBPROTOCOL]
        )
        async with Client(transport=transport) as session:
            request = gql(
                f"""subscription {{
                  aggregate_events(type: "account", aggregate_id: "{account}"{arguments})
                  {{ stream_version offset }}
                }}"""
            )
            async for result in session.subscribe(request):
                event: dict[str, Any] = result["aggregate_events"]
                return event
        raise AssertionError("the subscription ended without an event")

    later = asyncio.run(asyncio.wait_for(first_of(", from_version: 2"), EVENTS_WAIT_S))
    assert later == {"stream_version": 2, "offset": received[1]["offset"]}
    skipped = asyncio.run(
        asyncio.wait_for(
            first_of(f", from_offset: {received[1]['offset']}"), EVENTS_WAIT_S
        )
    )
    assert skipped == later

    async def refused() -> list[Any]:
        transport = WebsocketsTransport(
            url=url, subprotocols=[WebsocketsTransport.GRAPHQLWS_SUBPROTOCOL]
        )
        async with Client(transport=transport) as session:
            request = gql(
                'subscription { aggregate_events(type: "invoice", aggregate_id: "x")'
                " { stream_version } }"
            )
            with pytest.raises(TransportQueryError) as raised:
                async for _ in session.subscribe(request):
                    pass
            return raised.value.errors or []

    [error] = asyncio.run(asyncio.wait_for(refused(), EVENTS_WAIT_S))
    assert error["extensions"] == {"code": "BAD_USER_INPUT", "field": "type"}


def test_limits_refuse_a_query_before_it_runs(api: Api) -> None:
    # order → customer → orders → items, again and again: valid, and too deep.
    nested = "customer_id"
    for _ in range(MAX_DEPTH):
        nested = f"customer {{ orders {{ items {{ {nested} }} }} }}"
    deep = api.refused(f'{{ order(order_id: "o-1") {{ {nested} }} }}')
    assert any("exceeds maximum operation depth" in e["message"] for e in deep)

    # Lists in lists: 100 orders, each naming its customer's 100 orders.
    fan = "customer { orders(page_size: 100) { items { customer_id status } } }"
    [dear] = api.refused(
        f'{{ order(order_id: "o-1") {{ customer {{ orders(page_size: 100) {{'
        f" items {{ {fan} }} }} }} }} }}"
    )
    assert "over the limit" in dear["message"]

    # A body that is no GraphQL request: 400 before anything runs.
    for body in (b"1", b"null", b'"x"', b"\xff\xfe{", b"[" * 5000):
        got = httpx.post(
            api.url,
            content=body,
            headers={"Content-Type": "application/json"},
            timeout=30,
        )
        assert got.status_code == 400, (body[:10], got.text)

    aliases = " ".join(
        f'a{i}: account(account_id: "x") {{ version }}' for i in range(20)
    )
    [many] = api.refused(f"{{ {aliases} }}")
    assert "aliases" in many["message"]

    # A field that does not exist is named.
    [unknown] = api.refused('{ order(order_id: "o-1") { price } }')
    assert "price" in unknown["message"]


def without_positions(answer: Any) -> Any:
    """An answer with its partitions and offsets left out: they depend on the
    account id, which each run chooses anew."""
    if isinstance(answer, dict):
        return {
            key: without_positions(value)
            for key, value in answer.items()
            if key not in ("partition", "offset")
        }
    if isinstance(answer, list):
        return [without_positions(item) for item in answer]
    return answer


def test_the_readme_example(api: Api) -> None:
    """The README's curl commands against a worker with its token: the same answers
    but for the account id and where its events are."""
    example = console_commands(readme_block("### GraphQL", "console"))
    assert len(example) >= 5, "the README shows no GraphQL example"
    run_id = unique("acc")[:10]
    position = None
    for argv, shown in example:
        assert argv[0] == "curl", argv
        argv = as_run_here(argv, run_id, api.settings.web_url)
        if position is not None:
            # The README's position is its account's; this run's is elsewhere.
            here = f'after: \\"{position}\\"'
            argv = [
                re.sub(r'after: \\"\d+:\d+\\"', here.replace("\\", "\\\\"), a)
                for a in argv
            ]
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        expected = json.loads(re.sub(r"acc-[0-9a-f]{6}", run_id, shown))
        assert without_positions(answer) == without_positions(expected), argv
        for result in (answer.get("data") or {}).values():
            if result.get("status") == "ACCEPTED":
                position = f"{result['partition']}:{result['offset']}"
