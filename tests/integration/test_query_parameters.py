"""Every bad query parameter is a 400 naming it (or a 404 for an unknown id), never a
500 or a silent 200: the issue's cases one by one, then generated inputs (Hypothesis)
against every query view of a real worker."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator
from datetime import date
from urllib.parse import quote, urlencode

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.client import CommandClient
from app.domain.accounts import OpenAccount
from app.local import deployments
from app.settings import Settings
from app.workload import deposit
from tests.invariants import serving_worker
from tests.support import create_order, get_until

# One test process runs the whole module: its module-scoped deployment is set up
# once (bin/streamfold test runs with --dist loadgroup).
pytestmark = pytest.mark.xdist_group(__name__)

# Fixed, since the module's deployment is its own: test ids name them, and every
# test process (pytest-xdist) must collect the same ids.
ACCOUNT, ORDER, CUSTOMER = "acc-qp1", "ord-qp1", "cust-qp1"

# Each view with the parameters it takes (the Postgres read models' and the event-log
# index's history and state also ?after=).
VIEWS: dict[str, tuple[str, ...]] = {
    "/query/orders/{id}": ("after",),
    "/query/orders": ("status", "customer_id", "from", "to", "limit", "after"),
    "/query/customers/{id}/orders": ("page", "page_size", "after"),
    "/query/accounts/{id}": ("after",),
    "/query/accounts/{id}/transactions": ("page", "page_size", "after"),
    "/query/reports/daily": ("from", "to", "currency", "after"),
    "/query/search": ("q", "type", "page", "page_size", "cursor", "after"),
    "/query/history/{id}": ("type", "from_version", "to_version", "after"),
    "/query/state/{id}": ("type", "version", "at", "after"),
    "/query/correlation/{id}": (),
    "/orders/{id}": (),
    "/accounts/{id}": (),
    "/customers/{id}/orders": ("page", "page_size"),
    "/sagas/{id}": (),
}


@pytest.fixture(scope="module")
def base(registry_settings: Settings) -> Iterator[str]:
    """A worker with an account, a deposit and an order; a short read-your-writes
    wait, since generated ?after= positions are mostly never reached."""
    deployment = dataclasses.replace(
        deployments.create(registry_settings), query_wait_s=0.1
    )
    url = deployment.web_url
    try:
        with serving_worker(deployment), CommandClient(deployment) as client:
            client.send(
                OpenAccount(account_id=ACCOUNT, owner_id=CUSTOMER, currency="USD")
            )
            client.send(deposit(ACCOUNT, 4200, "t-1"))
            client.send(create_order(ORDER, CUSTOMER))
            for path in (
                f"/query/orders/{ORDER}",
                f"/query/accounts/{ACCOUNT}/transactions",
                f"/query/history/{ORDER}",
                f"/customers/{CUSTOMER}/orders",
            ):
                assert get_until(url + path, lambda r: r.status_code == 200)
            yield url
    finally:
        deployments.remove(deployment)


def _get(base: str, path: str, params: list[tuple[str, str]]) -> httpx.Response:
    query = f"?{urlencode(params)}" if params else ""
    return httpx.get(base + path + query, timeout=30)


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        ("/query/reports/daily", [("currency", "usd")], "currency"),
        ("/query/reports/daily", [("currency", "ABC")], "currency"),
        (
            "/query/reports/daily",
            [("from", "2026-02-01"), ("to", "2026-01-01")],
            "from",
        ),
        ("/query/orders", [("from", "2026-02-01"), ("to", "2026-01-01")], "from"),
        ("/query/orders", [("customer_id", "c\x00")], "customer_id"),
        ("/query/orders", [("customer_id", "c" * 201)], "customer_id"),
        ("/query/orders", [("stauts", "PAID")], "stauts"),
        ("/query/orders", [("limit", "1"), ("limit", "2")], "limit"),
        ("/query/orders/o%00", [], "order_id"),
        ("/query/orders/" + "o" * 201, [], "order_id"),
        ("/query/history/x%01", [], "aggregate_id"),
        (
            f"/query/history/{ORDER}",
            [("from_version", "3"), ("to_version", "2")],
            "from_version",
        ),
        (f"/query/customers/{CUSTOMER}/orders", [("page", "1")], "page"),
        (f"/query/accounts/{ACCOUNT}/transactions", [("page", "1")], "page"),
        (f"/query/accounts/{ACCOUNT}", [("after", "99:0")], "after"),
        # A position names a partition of one aggregate type's events topic.
        (f"/query/history/{ORDER}", [("after", "0:0")], "type"),
        (f"/query/state/{ACCOUNT}", [("type", "account"), ("after", "0")], "after"),
        ("/query/correlation/c", [("after", "0:0")], "after"),
        (f"/customers/{CUSTOMER}/orders", [("page", "1")], "page"),
        ("/orders/o%00", [], "order_id"),
        ("/accounts/" + "a" * 201, [], "account_id"),
        ("/sagas/s%0A", [], "order_id"),
    ],
)
def test_each_bad_parameter_is_a_400_naming_it(
    base: str, path: str, params: list[tuple[str, str]], field: str
) -> None:
    response = _get(base, path, params)
    assert response.status_code == 400, (path, params, response.text)
    assert response.json()["field"] == field
    assert response.json()["error"]


@pytest.mark.parametrize(
    "path",
    [
        "/query/customers/nobody/orders",
        "/query/state/nothing?type=order",
        "/query/history/nothing?type=account",
        "/customers/nobody/orders",
        "/query/accounts/nothing/transactions",
    ],
)
def test_an_unknown_id_is_a_404(base: str, path: str) -> None:
    response = httpx.get(base + path, timeout=30)
    assert response.status_code == 404, response.text
    assert response.json()["error"]


# Any text a URL can carry, and short runs of the characters that break things
# (NUL, controls, separators, URL syntax) often enough to be tried every run.
TEXT = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=250),
    st.text(st.sampled_from("\x00\x01\x7f\t\n \u200b\u2028%/?#&=.:-a1"), max_size=8),
)
VALUES = st.one_of(
    TEXT,
    st.integers(-(10**20), 10**20).map(str),
    st.dates().map(date.isoformat),
    st.datetimes().map(lambda t: t.isoformat() + "+05:00"),
    st.sampled_from(
        [
            "",
            "0",
            "1",
            "100",
            "USD",
            "usd",
            "JPY",
            "XXX",
            "0:0",
            "3:5",
            "9:1",
            "order",
            "account",
            "orders",
            "customers",
            "0.5:ord-qp1",
            "Grace Hopper",
            "PAID",
            "2026-01-01",
            "9999-12-31T23:59-01:00",
            ACCOUNT,
            ORDER,
        ]
    ),
)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, list[tuple[str, str]]]:
    template = draw(st.sampled_from(sorted(VIEWS)))
    key = draw(st.one_of(st.sampled_from([ACCOUNT, ORDER, CUSTOMER]), TEXT))
    path = template.replace("{id}", quote(key, safe=""))
    names = st.one_of(st.sampled_from(VIEWS[template] or ("page",)), TEXT)
    params = draw(st.lists(st.tuples(names, VALUES), max_size=4))
    return template, path, params


def test_no_generated_query_makes_a_500(base: str) -> None:
    seen: Counter[int] = Counter()

    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(requests())
    def answers_without_failing(
        request: tuple[str, str, list[tuple[str, str]]],
    ) -> None:
        template, path, params = request
        response = _get(base, path, params)
        seen[response.status_code] += 1
        assert response.status_code in (200, 400, 404), (
            path,
            params,
            response.status_code,
            response.text,
        )
        if response.status_code == 400:
            body = response.json()
            assert body["error"] and body["field"] is not None, body
        if response.status_code == 200:
            # Not silently: an answer means every parameter was the view's, once.
            names = [name for name, _ in params]
            assert set(names) <= set(VIEWS[template]), (path, params)
            assert len(names) == len(set(names)), (path, params)

    answers_without_failing()
    print(f"answers to generated queries: {dict(seen)}")
    # The generator reaches both the parameter checks and the lookups behind them.
    assert seen[400] and seen[404], seen
