"""Resources over the end-to-end backlog: CPU seconds per 1,000 commands for each
process (the worker with all its processes, the broker, the Postgres backends of the
deployment's database) and the worker's peak memory, beside the raw pipeline's under
the same workload. The window runs from the first command produced until the worker
is idle, not only until the last read model is visible in Postgres: the worker's
Faust views go on folding the backlog's events after that.

CPU is read from /proc/<pid>/stat; Postgres' client backends are found by the title
Postgres gives them (user, database). "Cores busy" is CPU seconds over the wall
seconds of that window, for information rather than better or worse: a process that
is the bottleneck yet stays well below one core (Python's GIL allows about one) is
waiting on something, not computing.
"""

from __future__ import annotations

from typing import Any

from bench.harness import figure

RAW = "raw pipeline, same workload"


def _per_thousand(row: dict[str, Any], name: str) -> float | None:
    seconds = row["cpu_seconds"].get(name)
    return None if seconds is None else 1000 * seconds / row["commands"]


def _busy(row: dict[str, Any], name: str) -> float | None:
    seconds = row["cpu_seconds"].get(name)
    window = row["window_seconds"]
    return None if seconds is None or not window else seconds / window


def figures(e2e: dict[str, Any]) -> list[dict[str, Any]]:
    ours, raw = e2e["streamfold"], e2e["raw"]
    out = []
    for name, label in (
        ("process", "Worker (all its processes)"),
        ("broker", "Kafka broker"),
        ("postgres", "Postgres backends"),
    ):
        value, baseline = _per_thousand(ours, name), _per_thousand(raw, name)
        out.append(
            figure(
                f"resources.cpu.{name}",
                f"{label} CPU per 1,000 commands",
                "CPU s",
                value or None,
                baseline,
                RAW,
                better="lower",
                reason=None if value else f"no CPU time was recorded for {name}",
            )
        )
    out.append(
        figure(
            "resources.busy.process",
            "Worker (all its processes) cores busy from the backlog until it is idle",
            "cores",
            _busy(ours, "process"),
            _busy(raw, "process"),
            RAW,
            better="neither",
            digits=2,
        )
    )
    out.append(
        figure(
            "resources.peak_memory",
            "Worker peak memory (VmHWM, summed over its processes)",
            "MiB",
            ours["peak_memory_mib"],
            raw["peak_memory_mib"],
            RAW,
            better="lower",
            digits=1,
        )
    )
    return out
