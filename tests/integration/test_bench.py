"""The benchmark harness works: ``bench.run --quick`` against the real services
produces every figure — a positive value beside a positive baseline from the same
run — writes its JSON and chart, rewrites only the README's marked region, and
removes its deployments. No thresholds: speed is for the full run to report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from app.adapters import topics
from app.local import postgres
from app.local.kafka import KafkaNode
from app.settings import Settings
from bench.run import BENCHES, END, START

ROOT = Path(__file__).resolve().parents[2]
GROUPS = {*BENCHES, "resources"}


@pytest.mark.slow
def test_quick_run_produces_every_figure(
    tmp_path: Path,
    kafka: KafkaNode,
    postgres_server: postgres.Conninfo,
    base_settings: Settings,
) -> None:
    out = tmp_path / "results"
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n\n{START}\nstale table\n{END}\n\nafter\n")

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--quick",
            "--out",
            str(out),
            "--readme",
            str(readme),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )

    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "quick"
    assert set(summary["sections"]) == set(BENCHES)
    assert {s["status"] for s in summary["sections"].values()} == {"ok"}
    assert set(summary["figures"]) == GROUPS
    for group, figures in summary["figures"].items():
        assert figures, f"{group} produced no figure"
        for figure in figures:
            assert figure["value"] is not None, figure
            assert figure["value"] > 0, figure
            assert figure["baseline"] is not None, figure
            assert figure["baseline"] > 0, figure
            assert figure["ratio"] > 0, figure
    # The write side is measured against both baselines: Python's ceiling and a
    # peer's (an exactly-once Quix Streams application with per-key RocksDB state).
    keys = {figure["key"] for figure in summary["figures"]["commands"]}
    assert "commands.throughput.p4" in keys
    assert "commands.throughput.p4.quix_peer" in keys
    machine = summary["machine"]
    assert machine["cores"] > 0
    assert machine["memory_gib"] > 0
    assert machine["kafka"]
    for name in (*GROUPS, "summary"):
        assert json.loads((out / f"{name}.json").read_text())
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    text = readme.read_text()
    assert text.startswith("# Title\n\nbefore\n\n")
    assert text.endswith(f"{END}\n\nafter\n")
    assert "stale table" not in text
    assert "| figure | Streamfold | baseline (same run) | ratio | better |" in text

    run = summary["run"]
    with psycopg.connect(base_settings.database_url) as conn:
        left = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s",
            (f"streamfold_bench_{run}%",),
        ).fetchall()
    assert left == []
    names = topics.admin_client(base_settings).list_topics(timeout=15).topics
    assert [n for n in names if n.startswith(f"bench-{run}-")] == []
