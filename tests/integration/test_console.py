"""The operator console in Debian's headless Chromium against a real worker, broker,
registry and Postgres: an order's events and flow; dead letters re-driven (one, and
an aggregate's in order) until their commands are answered, discarded, refused
without the operator's credential; the same from the CLI; a replay's lag watched
falling to 0. Screenshots of each page go to docs/console/ (the README shows them)."""

from __future__ import annotations

import dataclasses
import itertools
import os
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    ElementNotInteractableException,
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from app.audit import new_codec, read_topic, results_by_command
from app.client import CommandClient
from app.domain import accounts
from app.domain.accounts import Deposit, OpenAccount
from app.domain.orders import CreateOrder, LineItem
from app.local import browser, deployments
from app.settings import ApiToken, Settings
from app.workload import charged_order, funded_account, new_order
from bench.harness import deposits, domain_events, encode_events, new_producer, produce
from tests.invariants import serving_worker
from tests.support import codec_for, get_until, run_cli

# One test process runs the whole module: its module-scoped deployment is set up
# once (bin/streamfold test runs with --dist loadgroup).
pytestmark = [pytest.mark.xdist_group(__name__), pytest.mark.slow]

SHOTS = Path(__file__).resolve().parents[2] / "docs" / "console"
GRACE = ApiToken("grace", "grace-0123456789abcdef01")
# The bound on every wait for the page: a worker on a busy 2-core machine.
WAIT_S = 90
SMALL_LIMIT = 1024
# Events appended for the ledger's replay: enough that folding them takes a few
# seconds on a 2-core machine (about 10,000 events/s), so the page shows it partly
# done several times over (a document a second) before it switches.
BULK_ACCOUNTS = 16
BULK_EVENTS_EACH = 2_000


@dataclasses.dataclass
class Seeded:
    """What the module's deployment holds."""

    settings: Settings
    paid_order: str
    paid_account: str
    big_order: str  # dead-lettered, to be re-driven alone
    big_order_command: str
    doomed_order: str  # dead-lettered, to be discarded
    refused_order: str  # dead-lettered, to be tried without the credential
    big_account: str  # opened and funded, both dead-lettered: re-driven together
    cli_order: str  # dead-lettered, re-driven from the CLI

    @property
    def base(self) -> str:
        return self.settings.web_url

    @property
    def order_dlq(self) -> str:
        topics = self.settings.topics
        return topics.dead_letter(topics.commands("orders"))

    @property
    def account_dlq(self) -> str:
        topics = self.settings.topics
        return topics.dead_letter(topics.commands("accounts"))


def _big_order(order_id: str) -> CreateOrder:
    # Sixty lines: well over SMALL_LIMIT bytes of Avro.
    items = [
        LineItem(product_id=f"sku-{n:03d}-large-line", quantity=1, unit_price_minor=100)
        for n in range(60)
    ]
    return new_order(order_id, "c-big", items, currency="EUR")


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def seeded(registry_settings: Settings) -> Iterator[Seeded]:
    """Dead letters made by a worker whose size limit is too low for them, then the
    same deployment served by a worker with the default limit (the fix an operator
    makes before re-driving), with an order paid by the saga."""
    small = dataclasses.replace(
        deployments.create(
            dataclasses.replace(registry_settings, max_message_bytes=SMALL_LIMIT)
        ),
        operator_tokens=(GRACE,),
    )
    big_account = _unique("acc-big")
    seeded = Seeded(
        settings=dataclasses.replace(small, max_message_bytes=1_048_576),
        paid_order=_unique("ord-paid"),
        paid_account=_unique("acc-paid"),
        big_order=_unique("ord-big"),
        big_order_command="",
        doomed_order=_unique("ord-doomed"),
        refused_order=_unique("ord-refused"),
        big_account=big_account,
        cli_order=_unique("ord-cli"),
    )
    try:
        with serving_worker(small, "console-small"), CommandClient(small) as client:
            command_id = client.submit(_big_order(seeded.big_order))
            for order in (seeded.doomed_order, seeded.refused_order, seeded.cli_order):
                client.submit(_big_order(order))
            # Over SMALL_LIMIT with ids and text of the longest lengths taken.
            longest = {
                "correlation_id": "c" * 200,
                "causation_id": "k" * 200,
                "user_id": "u" * 200,
            }
            client.submit(
                OpenAccount(account_id=big_account, owner_id="o" * 200, currency="EUR"),
                command_id=f"open-{big_account}".ljust(200, "-"),
                **longest,
            )
            client.submit(
                Deposit(
                    account_id=big_account,
                    transaction_id="t-1",
                    amount_minor=500,
                    currency="EUR",
                    source="bank",
                    reference="r" * 1000,
                ),
                **longest,
            )
            client.flush()
            _wait_for_records(small, seeded.order_dlq, 4)
            _wait_for_records(small, seeded.account_dlq, 2)
        seeded = dataclasses.replace(seeded, big_order_command=command_id)
        with serving_worker(seeded.settings, "console") as _:
            with CommandClient(seeded.settings) as client:
                for command in funded_account(seeded.paid_account, 5000):
                    assert client.send(command, timeout=60).accepted
                assert client.send(
                    charged_order(seeded.paid_order, seeded.paid_account, 900),
                    correlation_id=f"flow-{seeded.paid_order}",
                    timeout=60,
                ).accepted
            get_until(
                f"{seeded.base}/sagas/{seeded.paid_order}",
                lambda r: r.status_code == 200 and r.json()["settled"],
                timeout=WAIT_S,
            )
            yield seeded
    finally:
        deployments.remove(small)


def _wait_for_records(settings: Settings, topic: str, count: int) -> None:
    from app.waiting import eventually

    if not eventually(
        lambda: len(read_topic(settings, topic)) >= count, timeout=WAIT_S, every=0.5
    ):
        raise AssertionError(f"{topic} never held {count} records")


@pytest.fixture(scope="module")
def chrome() -> Iterator[WebDriver]:
    chromium, chromedriver = browser.install()
    options = Options()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1500,1000",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: WebDriver, what: str, condition: Any, every: float = 0.5) -> Any:
    # The page re-renders its tables as answers arrive: an element found a moment
    # ago may be gone or not yet clickable; the condition is then tried again.
    return WebDriverWait(
        driver,
        WAIT_S,
        poll_frequency=every,
        ignored_exceptions=(
            StaleElementReferenceException,
            ElementNotInteractableException,
            NoSuchElementException,
        ),
    ).until(condition, message=what)


def _texts(driver: WebDriver, what: str, selector: str) -> list[str]:
    """The texts of the elements ``selector`` finds, once it finds any."""
    found: list[str] = _wait(
        driver,
        what,
        lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, selector)] or None,
    )
    return found


def _click(driver: WebDriver, aggregate_id: str, button: str) -> str:
    """Click ``button`` on the dead letter of ``aggregate_id``; its record id."""

    def clicked(d: WebDriver) -> str:
        row = _letter_row(d, aggregate_id)
        record = str(row.get_attribute("data-id"))
        row.find_element(By.CSS_SELECTOR, f"button.{button}").click()
        return record

    return _wait(driver, f"{button} of {aggregate_id}", clicked)  # type: ignore[no-any-return]


def _open(driver: WebDriver, seeded: Seeded, page: str, token: str | None) -> None:
    driver.get(f"{seeded.base}/console")
    driver.execute_script("sessionStorage.clear()")
    driver.get(f"{seeded.base}/console#{page}")
    driver.refresh()
    _wait(driver, "the console", lambda d: d.find_element(By.ID, "who").text)
    if token is not None:
        driver.find_element(By.ID, "token").send_keys(token)
        driver.find_element(By.CSS_SELECTOR, "#signin button[type=submit]").click()
        _wait(
            driver,
            "signed in",
            lambda d: d.find_element(By.ID, "who").text == "operator: grace",
        )


def _letter_row(driver: WebDriver, aggregate_id: str) -> WebElement:
    def found(d: WebDriver) -> WebElement | None:
        for row in d.find_elements(By.CSS_SELECTOR, "#dead-letters tr.letter"):
            if row.find_elements(By.XPATH, f"td[5][text()='{aggregate_id}']"):
                return row
        return None

    return _wait(driver, f"a dead letter of {aggregate_id}", found)  # type: ignore[no-any-return]


def _confirm(driver: WebDriver, reason: str) -> None:
    def confirmed(d: WebDriver) -> bool:
        field = d.find_element(By.ID, "confirm-reason")
        field.clear()
        field.send_keys(reason)
        d.find_element(By.ID, "confirm-ok").click()
        return True

    _wait(
        driver, "the dialog", lambda d: d.find_element(By.ID, "confirm").is_displayed()
    )
    _wait(driver, "confirmed", confirmed)


def _standing(driver: WebDriver, aggregate_id: str) -> str:
    row = _letter_row(driver, aggregate_id)
    return str(row.find_element(By.CSS_SELECTOR, "td.standing").text)


def _table(driver: WebDriver, rows: str) -> list[list[str]]:
    """The cells' text of ``rows``, read at once: the live page redraws its tables
    every second, faster than a cell-by-cell read."""
    found = driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map("
        "(r) => [...r.querySelectorAll('td')].map((c) => c.innerText))",
        rows,
    )
    return [[str(c) for c in row] for row in found]


def _look_up(driver: WebDriver, aggregate_id: str) -> list[WebElement]:
    field = driver.find_element(By.ID, "aggregate-id")
    field.clear()
    field.send_keys(aggregate_id)
    driver.find_element(By.CSS_SELECTOR, "#find-aggregate button").click()
    _wait(
        driver,
        f"events of {aggregate_id}",
        lambda d: aggregate_id in d.find_element(By.ID, "events-title").text,
    )
    return list(driver.find_elements(By.CSS_SELECTOR, "#events tr.event"))


def test_an_order_its_events_state_and_flow(chrome: WebDriver, seeded: Seeded) -> None:
    _open(chrome, seeded, "events", None)
    rows = _look_up(chrome, seeded.paid_order)
    cells = [[c.text for c in row.find_elements(By.TAG_NAME, "td")] for row in rows]
    assert [c[0] for c in cells] == [str(n) for n in range(1, len(cells) + 1)]
    assert cells[0][1] == "OrderCreated"
    assert cells[0][2].startswith("streamfold.orders.OrderCreated v")
    assert cells[0][4].startswith(seeded.settings.topics.events("orders") + "[")
    assert "PaymentProcessed" in [c[1] for c in cells], cells

    found = httpx.get(
        f"{seeded.base}/console/api/events/{seeded.paid_order}", timeout=60
    ).json()
    # The headers are read back from Kafka at each event's offset.
    assert [e["headers"]["aggregate-id"] for e in found["events"]] == [
        seeded.paid_order
    ] * len(rows)
    assert [e["headers"]["stream-version"] for e in found["events"]] == [
        str(n) for n in range(1, len(rows) + 1)
    ]

    rows[0].click()
    _wait(
        chrome,
        "the state at version 1",
        lambda d: "as of version 1" in d.find_element(By.ID, "state").text,
    )
    state = chrome.find_element(By.ID, "state").text
    assert seeded.paid_order in state and '"version": 1' in state
    rows[-1].click()
    last = len(rows)
    _wait(
        chrome,
        "the state at the last version",
        lambda d: f"as of version {last}" in d.find_element(By.ID, "state").text,
    )

    rows[0].find_element(By.CSS_SELECTOR, "a.flow-link").click()
    steps = _texts(chrome, "the flow", "#flow li.step")
    assert any("OrderCreated" in s and seeded.paid_order in s for s in steps), steps
    # The saga's withdrawal from the account is part of the order's flow.
    assert any("MoneyWithdrawn" in s and seeded.paid_account in s for s in steps), steps
    SHOTS.mkdir(parents=True, exist_ok=True)
    chrome.save_screenshot(str(SHOTS / "events.png"))


def test_no_action_without_the_operator_credential(
    chrome: WebDriver, seeded: Seeded
) -> None:
    _open(chrome, seeded, "dead-letters", None)
    assert "read-only" in chrome.find_element(By.ID, "who").text
    record = _click(chrome, seeded.refused_order, "discard")
    _confirm(chrome, "tried without a token")
    notice = _wait(
        chrome,
        "the refusal",
        lambda d: (n := d.find_element(By.ID, "notice")).is_displayed() and n.text,
    )
    assert notice.startswith("discard refused (401)"), notice
    assert _standing(chrome, seeded.refused_order) == "open"

    url = f"{seeded.base}/console/api/dead-letters/redrive"
    body = {"record": record, "confirmed": True, "operator": "grace"}
    wrong = httpx.post(
        url, json=body, headers={"Authorization": "Bearer not-a-token-at-all"}
    )
    assert wrong.status_code == 401
    assert wrong.headers["WWW-Authenticate"].startswith('Bearer realm="streamfold"')
    unconfirmed = httpx.post(
        url,
        json={"record": record},
        headers={"Authorization": f"Bearer {GRACE.token}"},
    )
    assert unconfirmed.status_code == 400
    assert "confirmed" in unconfirmed.json()["error"]
    listed = httpx.get(f"{seeded.base}/console/api/dead-letters").json()
    assert [a for a in listed["actions"] if a["record"] == record] == []


def test_redrive_one_dead_letter_until_the_command_is_answered(
    chrome: WebDriver, seeded: Seeded
) -> None:
    _open(chrome, seeded, "dead-letters", GRACE.token)
    reason = _wait(
        chrome,
        "the reason",
        lambda d: (
            _letter_row(d, seeded.big_order)
            .find_element(By.CSS_SELECTOR, "td.reason")
            .text
        ),
    )
    assert "exceeds the limit of 1024" in reason
    record = _click(chrome, seeded.big_order, "redrive")
    _confirm(chrome, "limit raised")
    _wait(
        chrome,
        "re-driven",
        lambda d: _standing(d, seeded.big_order) == "redriven",
    )
    actions = [
        [c.text for c in r.find_elements(By.TAG_NAME, "td")]
        for r in chrome.find_elements(By.CSS_SELECTOR, "#actions tr.action")
    ]
    mine = [a for a in actions if a[3] == record]
    assert len(mine) == 1 and mine[0][1:3] == ["grace", "redrive"], actions
    assert mine[0][4] == "limit raised"
    assert mine[0][5].startswith(seeded.settings.topics.commands("orders") + ":")

    chrome.get(f"{seeded.base}/console#events")
    rows = _wait(
        chrome,
        "the re-driven order's events",
        lambda d: _look_up(d, seeded.big_order) or None,
    )
    assert rows[0].find_elements(By.TAG_NAME, "td")[1].text == "OrderCreated"
    results = results_by_command(seeded.settings, new_codec(seeded.settings))
    answered = results[seeded.big_order_command]
    assert [r["status"] for r in answered] == ["ACCEPTED"], answered


def test_redrive_an_aggregate_in_order_and_discard(
    chrome: WebDriver, seeded: Seeded
) -> None:
    _open(chrome, seeded, "dead-letters", GRACE.token)
    _click(chrome, seeded.big_account, "redrive-aggregate")
    _confirm(chrome, "both, in order")
    _wait(
        chrome,
        "the aggregate re-driven",
        lambda d: (
            [
                r.find_element(By.CSS_SELECTOR, "td.standing").text
                for r in d.find_elements(By.CSS_SELECTOR, "#dead-letters tr.letter")
                if r.find_elements(By.XPATH, f"td[5][text()='{seeded.big_account}']")
            ]
            == ["redriven", "redriven"]
        ),
    )
    # The deposit is accepted only after the opening: they went in their order.
    chrome.get(f"{seeded.base}/console#events")
    rows = _wait(
        chrome,
        "the account's events",
        lambda d: (
            (found := _look_up(d, seeded.big_account)) and len(found) == 2 and found
        ),
    )
    assert [r.find_elements(By.TAG_NAME, "td")[1].text for r in rows] == [
        "AccountOpened",
        "MoneyDeposited",
    ]

    # A discard over HTTP: the operator is the token's, whatever the body says.
    listed = httpx.get(f"{seeded.base}/console/api/dead-letters", timeout=60).json()
    [doomed] = [
        x for x in listed["letters"] if x["aggregate_id"] == seeded.doomed_order
    ]
    answer = httpx.post(
        f"{seeded.base}/console/api/dead-letters/discard",
        json={
            "record": doomed["id"],
            "reason": "customer cancelled",
            "confirmed": True,
            "operator": "mallory",
        },
        headers={"Authorization": f"Bearer {GRACE.token}"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    [action] = answer.json()["actions"]
    assert (action["operator"], action["verb"], action["produced"]) == (
        "grace",
        "discard",
        None,
    )
    again = httpx.post(
        f"{seeded.base}/console/api/dead-letters/redrive",
        json={"record": doomed["id"], "confirmed": True},
        headers={"Authorization": f"Bearer {GRACE.token}"},
        timeout=60,
    )
    assert again.status_code == 409
    assert "discarded by grace" in again.json()["error"]
    # Only a dead-letter topic's records are acted on, never another topic's.
    events = seeded.settings.topics.events("orders")
    for verb, body in (
        ("discard", {"record": f"{events}:0:0", "reason": "no"}),
        ("redrive", {"topic": events, "aggregate_id": seeded.doomed_order}),
    ):
        stray = httpx.post(
            f"{seeded.base}/console/api/dead-letters/{verb}",
            json={**body, "confirmed": True},
            headers={"Authorization": f"Bearer {GRACE.token}"},
            timeout=60,
        )
        assert stray.status_code == 404, stray.text
        assert "not a dead-letter topic" in stray.json()["error"]
    chrome.get(f"{seeded.base}/console#dead-letters")
    _wait(
        chrome,
        "the discard shown",
        lambda d: _standing(d, seeded.doomed_order) == "discarded",
    )
    SHOTS.mkdir(parents=True, exist_ok=True)
    chrome.save_screenshot(str(SHOTS / "dead-letters.png"))


def test_the_cli_lists_and_redrives(seeded: Seeded) -> None:
    listed = run_cli(seeded.settings, "dlq", "list", "--open")
    assert listed.returncode == 0, listed.stderr
    [line] = [x for x in listed.stdout.splitlines() if seeded.cli_order in x]
    record = line.split()[0]
    assert "open" in line and "exceeds the limit" in line

    refused = run_cli(seeded.settings, "dlq", "redrive", record, "--yes")
    assert refused.returncode == 2
    assert "STREAMFOLD_OPERATOR_TOKEN" in refused.stderr

    os.environ["STREAMFOLD_OPERATOR_TOKEN"] = GRACE.token
    try:
        done = run_cli(seeded.settings, "dlq", "redrive", record, "--yes")
    finally:
        del os.environ["STREAMFOLD_OPERATOR_TOKEN"]
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"redrive {record} → ") and "by grace" in done.stdout
    answered = get_until(
        f"{seeded.base}/console/api/events/{seeded.cli_order}",
        lambda r: r.status_code == 200,
        timeout=WAIT_S,
    )
    assert answered.json()["events"][0]["event_type"] == "OrderCreated"
    [refused_line] = [
        x for x in listed.stdout.splitlines() if seeded.refused_order in x
    ]
    other = refused_line.split()[0]
    os.environ["STREAMFOLD_OPERATOR_TOKEN"] = GRACE.token
    try:
        unexplained = run_cli(seeded.settings, "dlq", "discard", other, "--yes")
        discarded = run_cli(
            seeded.settings, "dlq", "discard", other, "--reason", "duplicate", "--yes"
        )
    finally:
        del os.environ["STREAMFOLD_OPERATOR_TOKEN"]
    assert unexplained.returncode == 3 and "say why" in unexplained.stderr
    assert discarded.returncode == 0, discarded.stderr
    assert discarded.stdout.strip() == f"discard {other} by grace"

    after = run_cli(seeded.settings, "dlq", "list")
    standing = {x.split()[0]: x.split()[1] for x in after.stdout.splitlines()}
    assert (standing[record], standing[other]) == ("redriven", "discarded")


def _append_account_events(settings: Settings) -> int:
    """Accounts opened and deposited into many times, appended straight to the
    accounts' events topic as the write side would (no commands: quicker than a
    worker deciding them one by one). Returns how many events."""
    commands = [
        command
        for n in range(BULK_ACCOUNTS)
        for command in deposits(n, _unique(f"acc-bulk-{n}"), BULK_EVENTS_EACH)
    ]
    events = domain_events(
        accounts,
        accounts.AGGREGATE_TYPE,
        commands,
        start=datetime.now(UTC) - timedelta(minutes=1),
        step=timedelta(milliseconds=1),
    )
    topic = settings.topics.events("accounts")
    framed = encode_events(codec_for(settings), topic, events)
    # The seeding worker made the topics for its small limit: the producer's batches
    # must fit that (the broker refuses a larger batch whole).
    small = dataclasses.replace(settings, max_message_bytes=SMALL_LIMIT)
    sent = produce(new_producer(small), topic, framed)
    assert len(sent.position) == len(framed), "the broker refused some events"
    return len(events)


def _replay_watcher(
    name: str, seen: list[list[str]]
) -> Callable[[WebDriver], list[str] | None]:
    """A wait condition that notes replay ``name``'s row in ``seen`` each time the
    page is pushed a new document (the page redraws the row and the document's time
    together), and gives the row once the replay is partly folded or over."""
    at = ""

    def watched(d: WebDriver) -> list[str] | None:
        nonlocal at
        pushed, rows = d.execute_script(
            "return [document.getElementById('stream-state').textContent, "
            "[...document.querySelectorAll('#replays tr.replay')].map("
            "(r) => [...r.querySelectorAll('td')].map((c) => c.innerText))]"
        )
        mine = [[str(c) for c in row] for row in rows if row[0] == name]
        if not mine or pushed == at:
            return None
        at = pushed
        seen.append(mine[0])
        progress = _done_of_total(mine[0])
        if mine[0][3] != "running" or (progress is not None and progress[0] > 0):
            return mine[0]
        return None

    return watched


def _done_of_total(cells: list[str]) -> tuple[int, int] | None:
    """A replay row's progress; None before its first progress line ("—")."""
    if "/" not in cells[4]:
        return None
    done, total = (int(x) for x in cells[4].split("/"))
    return done, total


def test_processors_live_and_a_replay_watched_as_its_lag_falls(
    chrome: WebDriver, seeded: Seeded
) -> None:
    appended = _append_account_events(seeded.settings)
    _open(chrome, seeded, "processors", GRACE.token)

    def rows(d: WebDriver) -> list[list[str]] | None:
        found = _table(d, "#processors tr.processor")
        names = {r[0] for r in found}
        wanted = (
            f"processor {seeded.settings.app_id}.commands",
            "projection orders",
            "projection event_log",
        )
        return found if all(w in names for w in wanted) else None

    shown = _wait(chrome, "the processors' partitions", rows)
    orders = [r for r in shown if r[0] == "projection orders"]
    events_topic = seeded.settings.topics.events("orders")
    assert {r[1] for r in orders} == {
        f"{events_topic}[{p}]" for p in range(seeded.settings.partitions)
    }
    assert all(r[2] and r[3].isdigit() and r[5].isdigit() for r in orders), orders
    first = chrome.find_element(By.ID, "stream-state").text
    # Pushed, not polled by the page: a newer document arrives by itself.
    _wait(
        chrome,
        "a newer document",
        lambda d: d.find_element(By.ID, "stream-state").text not in ("", first),
    )

    chrome.find_element(
        By.CSS_SELECTOR, "#replay-projection option[value=ledger]"
    ).click()
    chrome.find_element(By.CSS_SELECTOR, "#start-replay button").click()
    _confirm(chrome, "rebuild after a fix")

    # The replay's row as each document arrives: first until it is partly folded
    # (the page as it goes, for the README), then until it is over.
    seen: list[list[str]] = []
    watched = _replay_watcher("ledger", seen)
    cells = _wait(chrome, "the replay partly folded", watched, every=0.1)
    SHOTS.mkdir(parents=True, exist_ok=True)
    if cells[3] == "running":
        chrome.save_screenshot(str(SHOTS / "processors.png"))
    while cells[3] == "running":
        cells = _wait(chrome, "the replay's next document", watched, every=0.1)

    assert cells[1] == "grace" and cells[3] == "done", (cells, seen)
    progress = [p for p in map(_done_of_total, seen) if p is not None]
    lags = [int(row[5]) for row in seen if row[5] != "—"]
    # The lag shown is the replay's own, and unknown ("—") only before its first
    # progress line.
    assert lags == [total - done for done, total in progress], seen
    done, total = progress[-1]
    assert done == total >= appended and lags[-1] == 0, seen
    assert cells[6].startswith(f"ledger: replayed {total:,} events"), cells
    # Watched as it went: pushed partly folded (0 < done < total, a lag above 0 that
    # then fell to 0), the replay never going back from one document to the next,
    # and its lag rising only by what the live deployment appended meanwhile (a
    # saga's deadline may fire during the replay). With a line every 5 s (the
    # default off a terminal) the page showed 0 of the total, then all of it. One
    # partial reading is asked for, not two: a faster machine may fold the events
    # within two of the page's one-second pushes.
    partly = {total - done for done, total in progress if 0 < done < total}
    assert partly, seen
    for (done_before, total_before), (done_after, total_after) in itertools.pairwise(
        progress
    ):
        assert done_after >= done_before and total_after >= total_before, seen
    listed = httpx.get(f"{seeded.base}/console/api/dead-letters", timeout=60).json()
    replays = [a for a in listed["actions"] if a["record"] == "projection:ledger"]
    assert [(a["operator"], a["verb"]) for a in replays] == [("grace", "replay")]


def test_schemas_subjects_modes_and_a_diff_with_its_upcaster(
    chrome: WebDriver, seeded: Seeded
) -> None:
    _open(chrome, seeded, "schemas", None)
    subject = (
        f"{seeded.settings.topics.events('orders')}-streamfold.orders.OrderCreated"
    )
    rows = _wait(
        chrome,
        "the subjects",
        lambda d: {r[0]: r for r in _table(d, "#subjects tr.subject")} or None,
    )
    mode = httpx.get(
        f"{seeded.settings.schema_registry_url}/config/{subject}",
        params={"defaultToGlobal": "true"},
        timeout=30,
    ).json()["compatibilityLevel"]
    assert rows[subject][1:5] == [
        "event",
        "3 registered (schemas/: v1, v2, v3)",
        mode,
        "v1→v2 upcast_v1_to_v2; v2→v3 upcast_v2_to_v3",
    ]
    assert len(rows) > 20

    for field, value in (("diff-from", "1"), ("diff-to", "3")):
        box = chrome.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    box = chrome.find_element(By.ID, "diff-subject")
    box.clear()
    box.send_keys(subject)
    chrome.find_element(By.CSS_SELECTOR, "#schema-diff-form button").click()
    bridges = _texts(chrome, "the bridges", "li.bridge")
    assert bridges == [
        "v1→v2: upcaster upcast_v1_to_v2",
        "v2→v3: upcaster upcast_v2_to_v3",
    ]
    diff = chrome.find_element(By.ID, "schema-diff").text.splitlines()
    assert diff[:2] == ["--- v1", "+++ v3"]
    added = [x for x in diff if x.startswith("+") and not x.startswith("+++")]
    assert added, diff
    title = chrome.find_element(By.ID, "diff-title").text
    assert title == f"streamfold.orders.OrderCreated: v1 → v3 ({mode})"
    SHOTS.mkdir(parents=True, exist_ok=True)
    chrome.save_screenshot(str(SHOTS / "schemas.png"))

    wrong = httpx.get(
        f"{seeded.base}/console/api/schemas/diff",
        params={"subject": subject, "from": "3", "to": "9"},
        timeout=30,
    )
    assert wrong.status_code == 400 and "versions 1..3" in wrong.json()["error"]


def test_an_orders_saga_as_a_timeline(chrome: WebDriver, seeded: Seeded) -> None:
    _open(chrome, seeded, "sagas", None)
    # The view's form may not take keys yet right after it is shown.
    _wait(
        chrome,
        "the saga form",
        lambda d: (
            d.find_element(By.ID, "saga-order").send_keys(seeded.paid_order) or True
        ),
    )
    chrome.find_element(By.CSS_SELECTOR, "#find-saga button").click()
    steps = _texts(chrome, "the saga's steps", "li.saga-step")
    saga = httpx.get(f"{seeded.base}/sagas/{seeded.paid_order}", timeout=30).json()
    assert len(steps) == len(saga["history"]) >= 2
    for shown, entry in zip(steps, saga["history"], strict=True):
        assert shown.startswith(f"{entry['at']} {entry['message_type']} → ")
        for sent in entry["sent"]:
            assert f"sent {sent['command_type']} {sent['command_id']}" in shown
    assert any("sent Withdraw" in s for s in steps), steps
    summary = chrome.find_element(By.ID, "saga-summary").text
    assert summary.startswith("PAID") and "settled" in summary
    assert seeded.paid_account in summary
    SHOTS.mkdir(parents=True, exist_ok=True)
    chrome.save_screenshot(str(SHOTS / "sagas.png"))
