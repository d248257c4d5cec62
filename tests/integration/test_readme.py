"""The README says what runs: every command its console blocks show either runs here,
against an isolated deployment, or is listed below with the reason it cannot; the
demo's output and the HTTP examples' fields are compared with what really comes
back."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.local import postgres
from app.settings import Settings
from tests.readmodels import wait_caught_up
from tests.support import (
    README,
    console_commands,
    get_until,
    readme_block,
    run_cli,
    running_worker,
)

# Commands the service test below runs, by how they start; every README example that
# starts so must be run there (it checks that it ran them all).
RUN = (
    "bin/streamfold demo",
    "curl -s",
    "bin/streamfold send",
    "bin/streamfold history",
    "bin/streamfold state",
    "bin/streamfold status",
    "bin/streamfold audit",
    "bin/streamfold kafka-tool consumer-groups",
    "bin/streamfold worker stop",
    "bin/streamfold schemas check",
    "bin/streamfold import",
)

# Commands the README shows that cannot run in a test, exactly as shown, and why.
NOT_RUN = {
    "bin/streamfold test": "runs the whole test suite, this test included",
    "bin/streamfold up [--worker]": "the services are the test session's; the demo "
    "runs the same bring-up (app.local.stack.up) against the test's deployment",
    "bin/streamfold worker": "runs in the foreground until stopped; running_worker "
    "starts exactly this command in the background",
    "bin/streamfold down": "stops the broker, PostgreSQL and the registry that every "
    "test shares",
    "bin/streamfold soak --minutes 20": "20 minutes of faults, on a broker of its own",
    "bin/streamfold soak --minutes 20 --rate 200": "the same soak, at 200 commands/s",
    "bin/streamfold broker-kills --minutes 10": "ten minutes of broker SIGKILLs, on "
    "a broker of its own; it can stall on offsets Kafka holds (see the README)",
    "bin/streamfold kafka-tool consumer-groups --bootstrap-server 127.0.0.1:9092 "
    "--group streamfold.projection.orders --reset-offsets --to-earliest --all-topics "
    "--execute": "rewinds the default deployment's projection group with its worker "
    "stopped; tests/integration/test_replay.py does it to a test deployment's group",
    ".venv/bin/python -m bench.run": "the full benchmark, about 6 minutes",
    ".venv/bin/python -m bench.run --quick": "about 2 minutes; "
    "tests/integration/test_bench.py runs it",
    ".venv/bin/python -m bench.run --seed 7 --size e2e_orders=10000 --only "
    "end_to_end,peer": "several minutes of benchmark",
    ".venv/bin/python -m bench.recovery": "a million aggregates folded, minutes",
    ".venv/bin/python -m bench.recovery --quick": "a worker killed and started again "
    "in a burst, and 20,000 aggregates folded: over a minute of benchmark",
    ".venv/bin/python -m bench.push --subscribers 1000 --rounds 10 --interval 0.05 "
    "--batch 25": (
        "a benchmark with a worker of its own and 1,000 connections (about a "
        "minute); tests/integration/test_websocket.py checks what /ws delivers"
    ),
}


# Commands run by another test, by how they start, and where.
RUN_ELSEWHERE = {
    "bin/streamfold dlq": "the dead-letter commands: tests/integration/"
    "test_console.py (test_the_cli_lists_and_redrives) runs list, redrive and discard "
    "against dead letters of its own",
    "curl -s -i": "the HTTP commands example: tests/integration/test_rest_api.py "
    "(test_the_readme_example) runs it with curl against a worker with its token",
    "curl -s http://127.0.0.1:6066/graphql": "the GraphQL example: "
    "tests/integration/test_graphql.py (test_the_readme_example) runs it with curl "
    "against a worker with its token",
}


def console_examples() -> list[tuple[list[str], str]]:
    """(argv, output) for every ``$ `` line in the README's console blocks."""
    blocks = re.findall(r"^```console\n(.*?)^```", README.read_text(), re.M | re.S)
    return [example for block in blocks for example in console_commands(block)]


def classify(argv: list[str]) -> str | None:
    """The RUN prefix a command runs under, "not run", or None if unclassified."""
    command = " ".join(argv)
    if command in NOT_RUN:
        return "not run"
    if any(command.startswith(prefix + " ") for prefix in RUN_ELSEWHERE):
        return "run elsewhere"
    return next((p for p in RUN if command == p or command.startswith(p + " ")), None)


def test_every_console_command_is_run_or_excused() -> None:
    commands = [argv for argv, _ in console_examples()]
    assert len(commands) > 10, "the README's console blocks were not found"
    unclassified = [" ".join(c) for c in commands if classify(c) is None]
    assert not unclassified, (
        "README console commands neither run by test_the_readme_examples_work nor "
        f"listed in NOT_RUN with a reason: {unclassified}"
    )
    shown = {" ".join(c) for c in commands}
    assert not set(NOT_RUN) - shown, "NOT_RUN lists commands the README lost"
    for prefix in RUN_ELSEWHERE:
        assert any(c.startswith(prefix + " ") for c in shown), (
            f"RUN_ELSEWHERE's {prefix!r} matches no README command"
        )
    assert {classify(c) for c in commands} >= set(RUN), "a RUN entry matches nothing"


class Examples:
    """Hands out the README's runnable examples and remembers which were run."""

    def __init__(self) -> None:
        self.examples = console_examples()
        self.taken: set[str] = set()

    def take(self, prefix: str) -> list[tuple[list[str], str]]:
        """(argv, shown output) of each example that runs under ``prefix``."""
        taken = [
            (argv, output) for argv, output in self.examples if classify(argv) == prefix
        ]
        assert taken, f"the README shows no {prefix!r} example"
        self.taken.add(prefix)
        return taken

    def cli(self, prefix: str) -> list[str]:
        """The arguments after ``bin/streamfold`` of the one example under ``prefix``."""
        [(argv, _)] = self.take(prefix)
        return argv[1:]


def as_shown(output: str, settings: Settings, tag: str, shown_tag: str) -> str:
    """The demo's output with ``settings``' deployment written as the defaults, its
    ids as ``shown_tag``'s, and what differs between runs (partitions, offsets,
    timings, whether a service was started or found running) evened out."""
    default = Settings()
    for port, default_port in (
        (settings.registry_port, default.registry_port),
        (settings.web_port, default.web_port),
    ):
        output = re.sub(rf"127\.0\.0\.1:{port}\b", f"127.0.0.1:{default_port}", output)
    database = postgres.Conninfo.parse(settings.database_url).database
    output = output.replace(f"/{database}", "/streamfold")
    if settings.topics.prefix:
        output = output.replace(settings.topics.prefix, "")
    # The tracking number is the tag in capitals, told apart by its prefix: a tag
    # of digits alone is the same in capitals.
    output = output.replace(f"1Z{tag.upper()}", f"1Z{shown_tag.upper()}")
    output = output.replace(tag, shown_tag)
    output = re.sub(r"events@\d+:\d+", "events@P:O", output)
    output = re.sub(r"ready in [\d.]+s", "ready in Ns", output)
    return re.sub(r"\b(started|running)\b", "up", output).strip()


def field_differences(shown: Any, real: Any, where: str = "") -> list[str]:
    """Where the fields of a README example's JSON and a real response differ."""
    if isinstance(shown, dict) and isinstance(real, dict):
        found = [
            f"{where or 'top level'}: {key!r} {side}"
            for keys, others, side in (
                (shown, real, "shown but not in the response"),
                (real, shown, "in the response but not shown"),
            )
            for key in keys
            if key not in others
        ]
        for key in shown.keys() & real.keys():
            found += field_differences(shown[key], real[key], f"{where}.{key}")
        return found
    if isinstance(shown, list) and isinstance(real, list):
        if shown and not real:
            return [f"{where}: the response's list is empty"]
        return [
            problem
            for index, (one, other) in enumerate(zip(shown, real, strict=False))
            for problem in field_differences(one, other, f"{where}[{index}]")
        ]
    if isinstance(shown, dict | list) or isinstance(real, dict | list):
        return [f"{where}: shown {type(shown).__name__}, got {type(real).__name__}"]
    return []


def test_the_readme_examples_work(deployment: Settings, tmp_path: Path) -> None:
    examples = Examples()
    web = deployment.web_url
    with running_worker(deployment):
        # The demo, in the test's deployment: the README shows its whole output.
        demo = run_cli(deployment, *examples.cli("bin/streamfold demo"))
        assert demo.returncode == 0, demo.stdout + demo.stderr
        shown = readme_block("What the demo printed", "text")
        shown_tag = re.findall(r"ids end in (\w+)", shown)[0]
        tag = re.findall(r"ids end in (\w+)", demo.stdout)[0]
        assert as_shown(demo.stdout, deployment, tag, shown_tag) == as_shown(
            shown, Settings(), shown_tag, shown_tag
        ), "the README's demo output is not what the demo prints; run it again"

        # The HTTP examples ask about the demo's ids: the same fields come back.
        # (Fetched with httpx; the README's `| python3 -m json.tool` only indents.)
        for argv, output in examples.take("curl -s"):
            url = next(a for a in argv if a.startswith("http"))
            url = url.replace(shown_tag, tag).replace("http://127.0.0.1:6066", web)
            response = get_until(url, lambda r: r.status_code == 200)
            assert response.status_code == 200, (url, response.text)
            differences = field_differences(json.loads(output), response.json())
            assert not differences, (url, differences)

        for argv, _ in examples.take("bin/streamfold send"):
            done = run_cli(deployment, *argv[1:])
            assert done.returncode == 0, (argv, done.stdout, done.stderr)
            assert '"accepted": true' in done.stdout
        history = examples.cli("bin/streamfold history")
        deadline = time.monotonic() + 60
        shown_history = run_cli(deployment, *history)
        while (
            "MoneyDeposited" not in shown_history.stdout and time.monotonic() < deadline
        ):
            time.sleep(0.3)
            shown_history = run_cli(deployment, *history)
        assert "AccountOpened" in shown_history.stdout
        assert "MoneyDeposited" in shown_history.stdout
        then = run_cli(deployment, *examples.cli("bin/streamfold state"))
        assert then.returncode == 0, then.stderr
        assert '"version": 1' in then.stdout and '"balance_minor": 0' in then.stdout

        # The audit reads every topic and compares Postgres with a fold of the log.
        wait_caught_up(deployment)
        status = run_cli(deployment, *examples.cli("bin/streamfold status"))
        assert status.returncode == 0, status.stdout + status.stderr
        assert "worker    up" in status.stdout and "orders" in status.stdout
        audited = run_cli(deployment, *examples.cli("bin/streamfold audit"))
        assert audited.returncode == 0, audited.stdout + audited.stderr
        assert "ok   answers" in audited.stdout and "FAIL" not in audited.stdout
        assert "ok   read models" in audited.stdout, audited.stdout
        assert "ok   payments" in audited.stdout, audited.stdout

        groups = run_cli(
            deployment, *examples.cli("bin/streamfold kafka-tool consumer-groups")
        )
        assert groups.returncode == 0, groups.stderr
        assert f"{deployment.app_id}.commands" in groups.stdout.split()

        stopped = run_cli(deployment, *examples.cli("bin/streamfold worker stop"))
        assert stopped.returncode == 0, stopped.stderr
        assert "worker    stopped" in stopped.stdout
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{web}/ready", timeout=5)
    checked = run_cli(deployment, *examples.cli("bin/streamfold schemas check"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The import example, with the README's own line as its file.
    import_example = examples.cli("bin/streamfold import")
    history_file = tmp_path / "history.jsonl"
    history_file.write_text(readme_block("### Importing history", "json"))
    imported = run_cli(
        deployment,
        *[str(history_file) if a == "history.jsonl" else a for a in import_example],
    )
    assert imported.returncode == 0, imported.stdout + imported.stderr
    assert "imported 1 events" in imported.stdout
    assert examples.taken == set(RUN), set(RUN) - examples.taken
