"""Full-text search over the order and customer read models (GET /query/search),
against a real worker, broker and Postgres: what it finds, in which order, how it
pages, what it refuses, and how an existing deployment gets its documents."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import pytest

from app import query
from app.adapters import migrations
from app.client import CommandClient
from app.domain.orders import AddItem, LineItem, RemoveItem
from app.local import deployments, postgres
from app.settings import Settings
from app.workload import LONDON, SPRINGFIELD, new_order
from tests.invariants import serving_worker
from tests.support import get_until, run_cli

# One test process runs the whole module: its module-scoped deployment is set up
# once (bin/streamfold test runs with --dist loadgroup).
pytestmark = pytest.mark.xdist_group(__name__)

ARLINGTON = dataclasses.replace(
    SPRINGFIELD,
    street="7 Lovelace Road",
    city="Arlington",
    state="VA",
    zip_code="22201",
)
# The named orders: id, customer, name, e-mail, address, items (SKU, quantity, price).
PEOPLE = [
    (
        "ord-ada",
        "cust-ada",
        "Ada Lovelace",
        "ada@analytical.org",
        LONDON,
        [("difference-engine", 1, 90000), ("punch-cards", 3, 250)],
    ),
    (
        "ord-grace",
        "cust-grace",
        "Grace Hopper",
        "grace@navy.mil",
        ARLINGTON,
        [("cobol-manual", 1, 1500)],
    ),
    (
        "ord-alan",
        "cust-alan",
        "Alan Turing",
        "alan@bletchley.uk",
        SPRINGFIELD,
        [("enigma-rotor", 2, 4000)],
    ),
]
# Where an order says its word (quasar_order): at weight A (the customer's name),
# B (a SKU) or C (the address). Within a weight such orders rank equal, so the order
# id breaks the ties.
WEIGHTS = ("name", "sku", "address")


@dataclass(frozen=True)
class Searching:
    settings: Settings
    base: str
    client: CommandClient

    def get(self, **params: Any) -> httpx.Response:
        return httpx.get(f"{self.base}/query/search", params=params, timeout=30)

    def ids(self, **params: Any) -> list[str]:
        response = self.get(**params)
        assert response.status_code == 200, response.text
        key = "customer_id" if params.get("type") == "customers" else "order_id"
        return [item[key] for item in response.json()["items"]]

    def until(self, expected: int, **params: Any) -> dict[str, Any]:
        """The answer, once the read model holds ``expected`` matches."""
        response = get_until(
            str(httpx.URL(f"{self.base}/query/search", params=params)),
            lambda r: r.status_code == 200 and r.json()["total_count"] == expected,
        )
        body: dict[str, Any] = response.json()
        assert body["total_count"] == expected, body
        return body


def word_order(order_id: str, word: str, weight: str) -> Any:
    """An order that says ``word`` once, in its customer's name, a SKU or its
    address (``weight``)."""
    return new_order(
        order_id,
        f"cust-{order_id}",
        (
            LineItem(
                product_id=f"{word}-lamp" if weight == "sku" else "plain-lamp",
                quantity=1,
                unit_price_minor=1000,
            ),
        ),
        name=f"{word.title()} Jones" if weight == "name" else "Pat Jones",
        email=f"{order_id}@example.com",
        address=(
            dataclasses.replace(SPRINGFIELD, street=f"3 {word.title()} Street")
            if weight == "address"
            else SPRINGFIELD
        ),
    )


@pytest.fixture(scope="module")
def searching(registry_settings: Settings) -> Iterator[Searching]:
    deployment = deployments.create(registry_settings)
    base = deployment.web_url
    try:
        with serving_worker(deployment), CommandClient(deployment) as client:
            sent = [
                client.send(
                    new_order(
                        order_id,
                        customer_id,
                        [
                            LineItem(product_id=p, quantity=q, unit_price_minor=m)
                            for p, q, m in items
                        ],
                        name=name,
                        email=email,
                        address=address,
                    )
                )
                for order_id, customer_id, name, email, address, items in PEOPLE
            ]
            sent += [
                client.send(word_order(f"pg-{n:02}", "quasar", WEIGHTS[n % 3]))
                for n in range(12)
            ]
            assert all(result.accepted for result in sent), sent
            searching = Searching(deployment, base, client)
            # Every order id holds the word "ord" or "pg": all 15 are folded.
            searching.until(3, q="ord")
            searching.until(12, q="pg")
            yield searching
    finally:
        deployments.remove(deployment)


def test_an_order_is_found_by_its_customers_name(searching: Searching) -> None:
    assert searching.ids(q="ada") == ["ord-ada"]
    assert searching.ids(q="Grace Hopper") == ["ord-grace"]
    # Words in any order; a phrase in quotes only in its own order.
    assert searching.ids(q="turing alan") == ["ord-alan"]
    assert searching.ids(q='"turing alan"') == []
    assert searching.ids(q="ada -lovelace") == []


def test_an_order_is_found_by_an_items_name_as_its_items_change(
    searching: Searching,
) -> None:
    assert searching.ids(q="difference-engine") == ["ord-ada"]
    assert searching.ids(q="punch cards") == ["ord-ada"]
    assert searching.ids(q="enigma") == ["ord-alan"]
    added = searching.client.send(
        AddItem(
            order_id="ord-alan",
            item=LineItem(product_id="bombe", quantity=1, unit_price_minor=10000),
        )
    )
    removed = searching.client.send(
        RemoveItem(order_id="ord-alan", product_id="enigma-rotor")
    )
    assert added.accepted and removed.accepted, (added, removed)
    searching.until(1, q="bombe", after=f"{removed.partition}:{removed.offset}")
    body = searching.until(0, q="enigma")
    assert body["items"] == []
    (alan,) = searching.until(1, q="alan")["items"]
    assert alan["product_ids"] == ["bombe"]
    assert alan["items_count"] == 1


def test_an_order_and_a_customer_are_found_by_email(searching: Searching) -> None:
    assert searching.ids(q="grace@navy.mil") == ["ord-grace"]
    # The address's parts too: its domain, and the words of either side.
    assert searching.ids(q="navy.mil") == ["ord-grace"]
    assert searching.ids(q="analytical") == ["ord-ada"]
    assert searching.ids(q="alan@bletchley.uk", type="customers") == ["cust-alan"]
    (customer,) = searching.get(q="bletchley", type="customers").json()["items"]
    assert customer["name"] == "Alan Turing"
    assert customer["email"] == "alan@bletchley.uk"
    assert customer["rank"] > 0


def test_an_order_is_found_by_its_shipping_address(searching: Searching) -> None:
    (order,) = searching.get(q="Analytical Way").json()["items"]
    assert order["order_id"] == "ord-ada"
    assert order["shipping_address"] == "1 Analytical Way, London, N1, UK"
    assert searching.ids(q="Arlington") == ["ord-grace"]


def test_the_better_match_ranks_first(searching: Searching) -> None:
    # Ada's name says Lovelace; Grace's street does: a name outranks an address.
    body = searching.get(q="lovelace").json()
    assert [i["order_id"] for i in body["items"]] == ["ord-ada", "ord-grace"]
    assert body["items"][0]["rank"] > body["items"][1]["rank"]
    # Name over SKU over address, ties in order id order.
    every = searching.get(q="quasar", page_size=100).json()["items"]
    expected = sorted(
        (f"pg-{n:02}" for n in range(12)),
        key=lambda order: (int(order[3:]) % 3, order),
    )
    assert [i["order_id"] for i in every] == expected
    ranks = [i["rank"] for i in every]
    assert ranks[0] == ranks[3] > ranks[4] == ranks[7] > ranks[8] == ranks[11]


def test_pages_concatenate_to_the_whole_result(searching: Searching) -> None:
    whole = searching.ids(q="quasar", page_size=100)
    assert len(whole) == 12
    pages = [searching.get(q="quasar", page=n, page_size=5).json() for n in range(3)]
    assert [i["order_id"] for p in pages for i in p["items"]] == whole
    assert [p["total_count"] for p in pages] == [12, 12, 12]
    assert [len(p["items"]) for p in pages] == [5, 5, 2]
    assert pages[-1]["next_cursor"] is None
    beyond = searching.get(q="quasar", page=3, page_size=5)
    assert beyond.status_code == 400
    assert beyond.json()["field"] == "page"


def test_cursor_pages_neither_repeat_nor_skip_while_orders_arrive(
    searching: Searching,
) -> None:
    client = searching.client
    for n in range(9):
        assert client.send(word_order(f"nb-{n}", "nebula", WEIGHTS[n % 3])).accepted
    whole = searching.until(9, q="nebula", page_size=100)["items"]
    first = searching.get(q="nebula", page_size=4).json()
    assert first["page"] == 0
    seen = [i["order_id"] for i in first["items"]]
    ranked = [(i["rank"], i["order_id"]) for i in first["items"]]
    # Orders at every weight arrive after the first page (the 3 names and one SKU):
    # the name ranks before the cursor, the SKU and the address after it.
    arrived = {weight: f"nb-new-{weight}" for weight in WEIGHTS}
    for weight, order_id in arrived.items():
        assert client.send(word_order(order_id, "nebula", weight)).accepted
    searching.until(len(whole) + len(arrived), q="nebula")
    cursor = first["next_cursor"]
    pages = 1
    while cursor is not None:
        page = searching.get(q="nebula", page_size=4, cursor=cursor)
        assert page.status_code == 200, page.text
        body = page.json()
        assert body["page"] is None
        seen += [i["order_id"] for i in body["items"]]
        ranked += [(i["rank"], i["order_id"]) for i in body["items"]]
        cursor = body["next_cursor"]
        pages += 1
    assert pages == 3
    assert len(seen) == len(set(seen)), seen
    assert {i["order_id"] for i in whole} <= set(seen)
    assert set(seen) - {i["order_id"] for i in whole} == {
        arrived["sku"],
        arrived["address"],
    }
    assert ranked == sorted(ranked, key=lambda r: (-r[0], r[1]))
    # Numbered pages, by contrast, shift when a better match arrives: the name
    # that arrived now sits on page 0 and pushes the rest back by one.
    numbered = searching.get(q="nebula", page_size=4).json()["items"]
    assert arrived["name"] in [i["order_id"] for i in numbered]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({}, "q"),
        *(({"q": bad}, "q") for bad in ("", " \t\n ", "ada\x00", "ada\x07", "a" * 257)),
        *(({"q": "ada", "type": bad}, "type") for bad in ("products", "Orders")),
        *(({"q": "ada", "page": bad}, "page") for bad in ("-1", "1")),
        *(({"q": "ada", "page_size": bad}, "page_size") for bad in ("0", "101")),
        *(
            ({"q": "ada", "cursor": bad}, "cursor")
            for bad in (
                "next",
                "0.5",
                "0.5:",
                "nan:ord-ada",
                "1e999:ord-ada",
                "-1:ord-ada",
                "0.5:ord\x01",
            )
        ),
        ({"q": "ada", "cursor": "0.5:ord-ada", "page": "0"}, "cursor"),
        ({"q": "ada", "after": "zero"}, "after"),
        ({"q": "ada", "query": "ada"}, "query"),
        ({"q": "ada", "limit": "5"}, "limit"),
    ],
)
def test_each_bad_parameter_is_a_400_naming_it(
    searching: Searching, params: dict[str, str], field: str
) -> None:
    response = searching.get(**params)
    assert response.status_code == 400, (params, response.text)
    assert response.json()["field"] == field
    assert response.json()["error"]


def test_a_parameter_given_twice_is_a_400_naming_it(searching: Searching) -> None:
    response = httpx.get(f"{searching.base}/query/search?q=ada&q=grace", timeout=30)
    assert response.status_code == 400
    assert response.json()["field"] == "q"


@pytest.mark.parametrize(
    ("q", "finds"),
    [
        ("'", []),
        ('"', []),
        ("&|!:*()", []),
        ("\\", []),
        ("<->", []),
        ('"" ""', []),
        ("😀", []),
        ("ü ß 東京", []),
        ("'; DROP TABLE order_summaries; --", []),
        ('"ada', ["ord-ada"]),
        ("(ada", ["ord-ada"]),
        ("ada)", ["ord-ada"]),
        ("ada:*", ["ord-ada"]),
        ("!!ada", ["ord-ada"]),
        ("--ada", ["ord-ada"]),
        ("ada & | lovelace", ["ord-ada"]),
        ("ada <-> lovelace", ["ord-ada"]),
        ("ada -grace", ["ord-ada"]),
        ("ada or grace", ["ord-ada", "ord-grace"]),
        ("  Ada\u00a0\tLOVELACE\n", ["ord-ada"]),
    ],
)
def test_odd_characters_are_searched_not_failed(
    searching: Searching, q: str, finds: list[str]
) -> None:
    response = searching.get(q=q)
    assert response.status_code == 200, (q, response.text)
    assert [i["order_id"] for i in response.json()["items"]] == finds
    customers = searching.get(q=q, type="customers")
    assert customers.status_code == 200, (q, customers.text)


def test_a_replay_rebuilds_the_documents_and_fills_old_orders_addresses(
    searching: Searching,
) -> None:
    """Orders folded before migration 0005 have no address (NULL): what a replay of
    the orders projection fills in, switching while search keeps answering."""
    settings = searching.settings
    with psycopg.connect(settings.database_url) as conn:
        conn.execute("UPDATE order_search SET shipping_address = NULL")
    assert searching.ids(q="Arlington") == []
    done = run_cli(settings, "replay", "orders")
    assert done.returncode == 0, done.stderr
    (order,) = searching.get(q="Arlington").json()["items"]
    assert order["order_id"] == "ord-grace"
    assert order["shipping_address"] == "7 Lovelace Road, Arlington, VA, 22201, US"
    assert searching.ids(q="lovelace")[:2] == ["ord-ada", "ord-grace"]


def test_migration_0005_indexes_what_an_existing_deployment_holds(
    session_settings: Settings,
) -> None:
    """A database at migration 0004 with read-model rows: after 0005, search finds
    them by name, e-mail and SKU at once; the address waits for a replay."""
    database = f"streamfold_search_{uuid.uuid4().hex[:8]}"
    old = deployments.new_database(session_settings, database)
    try:
        with psycopg.connect(old.database_url, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE schema_migrations (version integer PRIMARY KEY,"
                " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for version, name, text in migrations.available():
                if version < 5:
                    with conn.transaction():
                        conn.execute(text)  # our own migration files
                        conn.execute(
                            "INSERT INTO schema_migrations VALUES (%s, %s)",
                            (version, name),
                        )
            conn.execute(
                "INSERT INTO order_summaries (order_id, customer_id, customer_name,"
                " customer_email, status, currency, total_minor, items_count, version,"
                " created_at, updated_at) VALUES ('ord-old', 'cust-old', 'Edsger"
                " Dijkstra', 'ewd@utexas.edu', 'PAID', 'USD', 500, 2, 2, now(), now())"
            )
            conn.execute(
                "INSERT INTO order_items VALUES ('ord-old', 'semaphore', 1, 200, 0,"
                " 200), ('ord-old', 'mutex', 1, 300, 0, 300)"
            )
            conn.execute(
                "INSERT INTO customers VALUES ('cust-old', 'Edsger Dijkstra',"
                " 'ewd@utexas.edu', now(), now())"
            )
        assert migrations.migrate(old.database_url) == ["0005_search.sql"]

        async def search(**params: str) -> dict[str, Any]:
            async with await psycopg.AsyncConnection.connect(
                old.query_database_url, autocommit=True
            ) as conn:
                return await query.search(conn, params)

        for q in ("dijkstra", "ewd@utexas.edu", "utexas", "mutex", "semaphore"):
            (order,) = asyncio.run(search(q=q))["items"]
            assert order["order_id"] == "ord-old", q
        assert order["product_ids"] == ["mutex", "semaphore"]
        assert order["shipping_address"] is None
        (customer,) = asyncio.run(search(q="edsger", type="customers"))["items"]
        assert customer["customer_id"] == "cust-old"
    finally:
        port = postgres.Conninfo.parse(old.database_url).port
        postgres.drop_database(database, port=port)
