"""The README's CLI examples run as written, against an isolated deployment."""

from __future__ import annotations

import re
import shlex
import time
from pathlib import Path

from app.settings import Settings
from tests.readmodels import wait_caught_up
from tests.support import run_cli, running_worker

README = Path(__file__).resolve().parents[2] / "README.md"


def _examples(command: str) -> list[list[str]]:
    found = []
    for line in README.read_text().splitlines():
        match = re.match(rf"^\$ bin/streamfold ({command}\b.*?)(\s+#.*)?$", line)
        if match:
            found.append(shlex.split(match.group(1)))
    return found


def _block_after(heading: str, language: str) -> str:
    text = README.read_text()
    after = text[text.index(heading) :]
    return after.split(f"```{language}\n", 1)[1].split("```", 1)[0]


def test_the_readme_cli_examples_work(deployment: Settings, tmp_path: Path) -> None:
    sends = _examples("send")
    assert len(sends) >= 2, "the README lost its send examples"
    with running_worker(deployment):
        for args in sends:
            done = run_cli(deployment, *args)
            assert done.returncode == 0, (args, done.stdout, done.stderr)
            assert '"accepted": true' in done.stdout
        [history] = _examples("history")
        deadline = time.monotonic() + 60
        shown = run_cli(deployment, *history)
        while "MoneyDeposited" not in shown.stdout and time.monotonic() < deadline:
            time.sleep(0.3)
            shown = run_cli(deployment, *history)
        assert "AccountOpened" in shown.stdout and "MoneyDeposited" in shown.stdout
        [state] = _examples("state")
        then = run_cli(deployment, *state)
        assert then.returncode == 0, then.stderr
        assert '"version": 1' in then.stdout and '"balance_minor": 0' in then.stdout
        # The audit reads every topic and compares Postgres with a fold of the log;
        # the history above showed the projections have the deposit.
        wait_caught_up(deployment)
        [check_all] = _examples("audit")
        audited = run_cli(deployment, *check_all)
        assert audited.returncode == 0, audited.stdout + audited.stderr
        assert "ok   answers" in audited.stdout and "FAIL" not in audited.stdout
        assert "ok   read models" in audited.stdout, audited.stdout
    [check] = _examples("schemas check")
    checked = run_cli(deployment, *check)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The import example, with the README's own line as its file.
    [import_example] = _examples("import")
    history = tmp_path / "history.jsonl"
    history.write_text(_block_after("### Importing history", "json"))
    imported = run_cli(
        deployment,
        *[str(history) if arg == "history.jsonl" else arg for arg in import_example],
    )
    assert imported.returncode == 0, imported.stdout + imported.stderr
    assert "imported 1 events" in imported.stdout
