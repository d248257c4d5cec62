"""Streamfold's benchmarks in one command, against the real broker and Postgres.

    .venv/bin/python -m bench.run [--quick] [--seed N] [--size NAME=VALUE ...]

Every figure is a ratio to a baseline measured in the same run: the command pipeline
(``bench.commands``), end to end, projections and replay, the codec, a peer library,
aggregate loading and time travel, and the resources each process used. Each bench
runs in a deployment of its own (topic prefix, application id, database) that is
removed afterwards.

Writes ``<bench>.json``, ``summary.json`` and ``bench.png`` to ``bench/results/`` and
rewrites the README's table between ``<!-- bench:start -->`` and
``<!-- bench:end -->``. ``--quick`` (small sizes, under two minutes) writes to
``bench/results/quick/``; it and ``--only`` leave the README alone unless ``--readme``
is given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.local import stack
from app.local.process import pid_alive
from app.settings import Settings
from bench import api, codec, end_to_end, loading, peer, projections, resources
from bench.harness import RUN, deployment, figure, load_average, machine

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"

# commands_*: bench.commands' own sizes (0 keeps the ones it chose for the mode); the
# full run uses smaller ones than its own so the whole run stays under 15 minutes.
FULL: dict[str, float] = {
    "commands_timeout": 420,  # per partition count
    "commands_accounts": 1000,
    "commands_backlog": 20_000,
    "commands_latency_seconds": 10,
    "e2e_warmup_orders": 200,
    "e2e_orders": 3000,
    "e2e_latency_seconds": 10,
    "e2e_latency_rate": 0,  # commands/s; 0: half the sustained rate
    "sequential_orders": 10,
    "peer_threads": 4,
    "replay_orders": 15000,
    "codec_orders": 1000,
    "codec_repeats": 15,
    "loading_events": 10_000,
    "loading_repeats": 7,
    "api_commands": 300,
}
QUICK: dict[str, float] = {
    "commands_timeout": 300,  # on a busy machine (the suite beside it) 180 s was short
    "commands_accounts": 100,
    "commands_backlog": 1000,
    "commands_latency_seconds": 2,
    "e2e_warmup_orders": 10,
    "e2e_orders": 200,  # the raw pipeline, 800 commands, needs a few clock ticks
    "e2e_latency_seconds": 1.5,
    "e2e_latency_rate": 0,
    "sequential_orders": 1,
    "peer_threads": 4,
    "replay_orders": 400,
    "codec_orders": 50,
    "codec_repeats": 3,
    "loading_events": 1000,
    "loading_repeats": 3,
    "api_commands": 30,
}
BENCHES = ("commands", "end_to_end", "peer", "projections", "codec", "loading", "api")


def _sizes(args: argparse.Namespace) -> dict[str, float]:
    sizes = dict(QUICK if args.quick else FULL)
    for item in args.size:
        name, sep, value = item.partition("=")
        if not sep or name not in sizes:
            raise SystemExit(
                f"--size {item!r}: expected NAME=VALUE with NAME one of "
                f"{', '.join(sizes)}"
            )
        try:
            sizes[name] = float(value)
        except ValueError:
            raise SystemExit(f"--size {item!r}: {value!r} is not a number") from None
    return sizes


# -- the command pipeline (bench/commands.py, run as it is) ------------------------------


# Runs bench.commands' own main(); with sizes given, in place of the ones it chose.
_COMMANDS = """
import json, os, sys
from bench import commands
sizes = json.loads(os.environ["BENCH_COMMANDS_SIZE"])
if sizes:
    try:
        size = commands.Size(**sizes)
    except (AttributeError, TypeError) as error:
        print(f"bench.run: keeping bench.commands' sizes ({error})", file=sys.stderr)
    else:
        commands.QUICK = commands.FULL = size
raise SystemExit(commands.main(sys.argv[1:]))
"""


def run_commands(
    quick: bool,
    out: Path,
    partitions: list[int],
    timeout: float,
    size: dict[str, float],
) -> dict[str, Any]:
    """bench.commands once per partition count, so one that fails still leaves the
    others' figures; the rows are merged into ``commands.json``."""
    if not (ROOT / "bench" / "commands.py").exists():
        raise RuntimeError("bench/commands.py is not in this checkout")
    chosen = {}
    if all(size.values()):
        chosen = {
            "accounts": int(size["accounts"]),
            "backlog": int(size["backlog"]),
            "latency_s": size["latency_seconds"],
        }
    merged: dict[str, Any] = {"rows": [], "runs": {}, "sizes_given": chosen}
    for count in partitions:
        target = out / f"commands-p{count}.json"
        try:
            report = _commands_once(quick, target, count, timeout, chosen)
        except RuntimeError as error:
            merged["runs"][str(count)] = {"error": str(error)}
            continue
        finally:
            target.unlink(missing_ok=True)
        merged["runs"][str(count)] = {k: v for k, v in report.items() if k != "rows"}
        merged["rows"] += report.get("rows", [])
    if not merged["rows"]:
        raise RuntimeError(
            "; ".join(
                f"{p} partition(s): {r['error']}" for p, r in merged["runs"].items()
            )
        )
    _write(out / "commands.json", merged)
    return merged


def _commands_once(
    quick: bool, target: Path, partitions: int, timeout: float, size: dict[str, Any]
) -> dict[str, Any]:
    target.unlink(missing_ok=True)
    argv = [sys.executable, "-c", _COMMANDS, "--output", str(target)]
    argv += [*(["--quick"] if quick else []), "--partitions", str(partitions)]
    process = subprocess.Popen(
        argv,
        cwd=ROOT,
        env={**os.environ, "BENCH_COMMANDS_SIZE": json.dumps(size)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # The whole output of a failed run stays beside the results: two lines rarely
    # say which system failed, or what it was doing.
    log = target.with_suffix(".log")
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # Its worker runs in a session of its own: stop every descendant, not just
        # the child, or the worker outlives the run.
        stop_tree(process.pid)
        stdout, stderr = process.communicate()
        log.write_text(f"{stdout}\n--- stderr ---\n{stderr}")
        raise RuntimeError(
            f"bench.commands did not finish within {timeout:.0f}s (output in {log})"
        ) from None
    if process.returncode != 0 or not target.exists():
        log.write_text(f"{stdout}\n--- stderr ---\n{stderr}")
        lines = (stderr or stdout).strip().splitlines()[-2:]
        raise RuntimeError(
            f"bench.commands exited with {process.returncode} (output in {log}): "
            + " | ".join(lines)
        )
    return dict(json.loads(target.read_text()))


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(parent, []).append(int(entry.name))
    return tree


def stop_tree(pid: int, grace: float = 30.0) -> None:
    """SIGTERM ``pid`` and its descendants (found before any exits), then SIGKILL
    whatever is left after ``grace`` seconds."""
    tree = _children()
    family, queue = [], [pid]
    while queue:
        current = queue.pop()
        family.append(current)
        queue += tree.get(current, [])
    for member in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(pid_alive(m) for m in family):
        time.sleep(0.2)
    for member in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)


def command_figures(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = report.get("rows") or []
    out = []
    for partitions in sorted({row["partitions"] for row in rows}):
        pair = {row["system"]: row for row in rows if row["partitions"] == partitions}
        ours, raw = pair.get("worker"), pair.get("raw loop")
        if ours is None or raw is None:
            continue
        suffix = f"{partitions} partition{'s' if partitions > 1 else ''}"
        out += [
            figure(
                f"commands.throughput.p{partitions}.{system.replace(' ', '_')}",
                f"Command pipeline, command → result ({suffix}, {system})",
                "commands/s",
                row["commands_per_s"],
                ours["commands_per_s"],
                "1 worker, same run",
                better="higher",
                digits=1,
            )
            for system, row in pair.items()
            if system.endswith(" workers")
        ]
        if (peer := pair.get("quix peer")) is not None:
            out.append(
                figure(
                    f"commands.throughput.p{partitions}.quix_peer",
                    f"Command pipeline vs a Quix Streams peer ({suffix})",
                    "commands/s",
                    ours["commands_per_s"],
                    peer["commands_per_s"],
                    "Quix peer: exactly-once, one state read and write per command",
                    better="higher",
                    digits=1,
                )
            )
        out += [
            figure(
                f"commands.throughput.p{partitions}",
                f"Command pipeline, command → result ({suffix})",
                "commands/s",
                ours["commands_per_s"],
                raw["commands_per_s"],
                "raw consume→produce loop",
                better="higher",
                digits=1,
            ),
            figure(
                f"commands.p99.p{partitions}",
                f"Command pipeline p99 at half max load ({suffix})",
                "ms",
                ours["p99_ms"],
                raw["p99_ms"],
                "raw loop at half its max load",
                better="lower",
                digits=1,
            ),
        ]
    for partitions, run in sorted(report.get("runs", {}).items()):
        if "error" in run:
            out.append(
                figure(
                    f"commands.throughput.p{partitions}",
                    f"Command pipeline, command → result ({partitions} partition(s))",
                    "commands/s",
                    None,
                    None,
                    "raw consume→produce loop",
                    better="higher",
                    reason=run["error"],
                )
            )
    if not out:
        out.append(
            figure(
                "commands.throughput",
                "Command pipeline",
                "commands/s",
                None,
                None,
                "raw consume→produce loop",
                better="higher",
                reason="bench.commands wrote no worker/raw-loop pair",
            )
        )
    return out


# -- the run -----------------------------------------------------------------------------


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    began = time.monotonic()
    sizes = _sizes(args)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    base = Settings.from_env()
    stack.up(base, say=lambda line: None)
    print(f"bench: services up in {time.monotonic() - began:.1f}s", file=sys.stderr)
    seed = args.seed
    chosen = [b for b in BENCHES if not args.only or b in args.only]
    e2e_sizes = end_to_end.Sizes(
        warmup_orders=int(sizes["e2e_warmup_orders"]),
        orders=int(sizes["e2e_orders"]),
        latency_seconds=sizes["e2e_latency_seconds"],
        sequential_orders=int(sizes["sequential_orders"]),
        latency_rate=sizes["e2e_latency_rate"],
    )
    steps: dict[str, Callable[[], dict[str, Any]]] = {
        "commands": lambda: run_commands(
            args.quick,
            out,
            args.command_partitions or ([4] if args.quick else [1, 4]),
            sizes["commands_timeout"],
            {
                k: sizes[f"commands_{k}"]
                for k in ("accounts", "backlog", "latency_seconds")
            },
        ),
        "end_to_end": lambda: end_to_end.run(base, e2e_sizes, seed, deployment),
        "peer": lambda: peer.run(
            base,
            peer.Sizes(
                warmup_orders=e2e_sizes.warmup_orders,
                orders=e2e_sizes.orders,
                sequential_orders=e2e_sizes.sequential_orders,
                threads=int(sizes["peer_threads"]),
            ),
            seed,
            deployment,
        ),
        "projections": lambda: projections.run(
            base,
            projections.Sizes(orders=int(sizes["replay_orders"])),
            seed,
            deployment,
        ),
        "codec": lambda: codec.run(
            base,
            codec.Sizes(
                orders=int(sizes["codec_orders"]), repeats=int(sizes["codec_repeats"])
            ),
            seed,
            deployment,
        ),
        "loading": lambda: loading.run(
            base,
            loading.Sizes(
                events=int(sizes["loading_events"]),
                repeats=int(sizes["loading_repeats"]),
            ),
            seed,
            deployment,
        ),
        "api": lambda: api.run(
            base,
            api.Sizes(commands=int(sizes["api_commands"]), warmup=10),
            seed,
            deployment,
        ),
    }
    data: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    for name in chosen:
        started = time.monotonic()
        load = load_average()
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        try:
            data[name] = steps[name]()
            sections[name] = {"status": "ok"}
        except Exception as error:  # noqa: BLE001 - one bench failing must not hide the others
            sections[name] = {
                "status": "failed",
                "reason": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc().splitlines()[-12:],
            }
        sections[name]["seconds"] = round(time.monotonic() - started, 1)
        sections[name]["load_average_before"] = load
        print(
            f"bench: {name} {sections[name]['status']} in {sections[name]['seconds']}s",
            file=sys.stderr,
            flush=True,
        )

    figures: dict[str, list[dict[str, Any]]] = {}
    builders: dict[str, tuple[tuple[str, ...], Callable[[], list[dict[str, Any]]]]] = {
        "commands": (("commands",), lambda: command_figures(data["commands"])),
        "end_to_end": (("end_to_end",), lambda: end_to_end.figures(data["end_to_end"])),
        "peer": (
            ("peer", "end_to_end"),
            lambda: peer.figures(data["peer"], data["end_to_end"]),
        ),
        "projections": (
            ("projections",),
            lambda: projections.figures(data["projections"]),
        ),
        "codec": (("codec",), lambda: codec.figures(data["codec"])),
        "loading": (("loading",), lambda: loading.figures(data["loading"])),
        "api": (("api",), lambda: api.figures(data["api"])),
        "resources": (
            ("end_to_end",),
            lambda: resources.figures(data["end_to_end"]),
        ),
    }
    for name, (needs, build) in builders.items():
        if not all(n in chosen for n in needs):
            continue
        missing = [n for n in needs if n not in data]
        if missing:
            reasons = "; ".join(f"{n}: {sections[n]['reason']}" for n in missing)
            figures[name] = [
                figure(
                    f"{name}.unavailable",
                    name,
                    "",
                    None,
                    None,
                    "",
                    better="higher",
                    reason=reasons,
                )
            ]
            continue
        figures[name] = build()

    summary = {
        "benchmark": "bench.run",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "seed": seed,
        "run": RUN,
        "sizes": sizes,
        "machine": machine(base),
        "load_average_after": load_average(),
        "sections": sections,
        "figures": figures,
        "seconds": round(time.monotonic() - began, 1),
    }
    for name, result in data.items():
        if name != "commands":  # run_commands wrote its own file
            _write(out / f"{name}.json", result)
    if "end_to_end" in data:
        _write(
            out / "resources.json",
            {
                "figures": figures.get("resources", []),
                "processes": {
                    system: {
                        key: data["end_to_end"][system][key]
                        for key in (
                            "commands",
                            "window_seconds",
                            "cpu_seconds",
                            "peak_memory_mib",
                        )
                    }
                    for system in ("streamfold", "raw")
                },
            },
        )
    _write(out / "summary.json", summary)
    chart(summary, out / "bench.png")
    print(f"bench: written in {time.monotonic() - began:.1f}s", file=sys.stderr)
    # The README shows a whole full run; a quick or partial one only when asked.
    readme = (
        args.readme
        if args.readme is not None
        else (None if args.quick or args.only else README)
    )
    if readme is not None:
        rewrite_readme(readme, summary, out)
    return summary


def _write(path: Path, document: Any) -> None:
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


# -- the chart and the README table ------------------------------------------------------


def _all(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [f for group in summary["figures"].values() for f in group]


def chart(summary: dict[str, Any], path: Path) -> None:
    """One bar per figure: its ratio to its baseline, on a log scale, green where
    Streamfold is ahead of the baseline and orange where behind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [f for f in _all(summary) if f["ratio"]]
    colours = {True: "#4c9a5b", False: "#d9822b", None: "#8c8c8c"}
    height = max(3.0, 0.36 * len(rows) + 1.4)
    fig, ax = plt.subplots(figsize=(15, height))
    ratios = [f["ratio"] for f in rows]
    ahead = [
        None if f["better"] == "neither" else (r >= 1) == (f["better"] == "higher")
        for r, f in zip(ratios, rows, strict=True)
    ]
    ax.barh(
        range(len(rows)),
        ratios,
        color=[colours[a] for a in ahead],
    )
    ax.set_xscale("log")
    # Room on the right for the annotations.
    ax.set_xlim(min([*ratios, 1.0]) / 2, max([*ratios, 1.0]) * 400)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(
        range(len(rows)),
        [f"{f['label'][:72]} [{f['unit']}]" for f in rows],
        fontsize=7,
    )
    ax.invert_yaxis()
    for i, f in enumerate(rows):
        ax.annotate(
            f" {f['ratio']:g}×  ({_fmt(f['value'])} vs {_fmt(f['baseline'])}: "
            f"{f['baseline_label']}"
            + ("" if f["better"] == "neither" else f"; {f['better']} is better")
            + ")",
            (f["ratio"], i),
            va="center",
            fontsize=6.5,
        )
    m = summary["machine"]
    ax.set_title(
        f"Streamfold / baseline, same run ({summary['mode']}, seed {summary['seed']}): "
        f"{m['cores']} cores, {m['memory_gib']} GiB, Kafka {m['kafka']}, "
        f"{summary['when']}",
        fontsize=9,
    )
    ax.set_xlabel(
        "ratio to the baseline (log scale; green: Streamfold ahead; grey: for information)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:,.1f}"
    return f"{value:.3g}"


def table(summary: dict[str, Any], out: Path) -> str:
    m = summary["machine"]
    sections = summary["sections"]
    failed = [n for n, s in sections.items() if s["status"] != "ok"]
    relative = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    loads = [s["load_average_before"][0] for s in sections.values()]
    loads.append(summary["load_average_after"][0])
    low, high = min(loads), max(loads)
    lines = [
        f"Latest {summary['mode']} run, {summary['when'][:16].replace('T', ' ')} UTC, "
        f"on {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, "
        f"Apache Kafka {m['kafka']}, PostgreSQL {m['postgres']}, "
        f"Python {m['python']}; broker {m.get('kafka_bootstrap')} holding "
        f"{m.get('broker_partitions', '?')} partitions; seed {summary['seed']}; "
        f"{summary['seconds']:.0f} s; 1-minute load average {low:g}–{high:g} "
        "across the benches (other work on the machine). "
        f"Data: `{relative}/*.json`; chart: `{relative}/bench.png`.",
        "",
        "| figure | Streamfold | baseline (same run) | ratio | better |",
        "|---|---|---|---|---|",
    ]
    for f in _all(summary):
        if f["value"] is None:
            reason = str(f["reason"]).replace("|", "/").replace("\n", " ")
            lines.append(
                f"| {f['label']} | not measured: {reason} | "
                f"{f['baseline_label']} | — | {f['better']} |"
            )
            continue
        lines.append(
            f"| {f['label']} | {_fmt(f['value'])} {f['unit']} | "
            f"{_fmt(f['baseline'])} {f['unit']} ({f['baseline_label']}) | "
            f"{'—' if f['ratio'] is None else format(f['ratio'], 'g') + '×'} | "
            f"{f['better']} |"
        )
    if failed:
        lines += ["", f"Failed: {', '.join(failed)} (reasons in summary.json)."]
    return "\n".join(lines)


def rewrite_readme(path: Path, summary: dict[str, Any], out: Path) -> None:
    """Replace only the text between the markers."""
    text = path.read_text()
    head, start, rest = text.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise SystemExit(f"{path} has no {START} … {END} markers")
    path.write_text(f"{head}{START}\n{table(summary, out)}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="sizes (full / quick): "
        + ", ".join(f"{k}={FULL[k]:g}/{QUICK[k]:g}" for k in FULL),
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, < 2 min")
    parser.add_argument("--seed", type=int, default=1, help="workload seed")
    parser.add_argument(
        "--size", action="append", default=[], metavar="NAME=VALUE", help="override"
    )
    parser.add_argument(
        "--only", type=lambda s: s.split(","), help=f"a comma list of {BENCHES}"
    )
    parser.add_argument(
        "--command-partitions",
        type=lambda text: [int(p) for p in text.split(",")],
        help="partition counts for bench.commands (full: 1,4; quick: 4)",
    )
    parser.add_argument("--out", type=Path, help="results directory")
    parser.add_argument("--readme", type=Path, help="the README to rewrite")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = RESULTS / "quick" if args.quick else RESULTS
    unknown = set(args.only or ()) - set(BENCHES)
    if unknown:
        parser.error(f"--only: unknown {', '.join(sorted(unknown))}")
    summary = run_all(args)
    print(table(summary, args.out.resolve()))
    failed = [n for n, s in summary["sections"].items() if s["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
