"""The bench's CPU sampler counts what a process does after the load's last answer
(a reader catching up) and stops once the process is idle, or says it never was."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.harness import CpuSampler

# Burns ``sys.argv[1]`` CPU seconds of its own (by its own clock, so a busy machine
# only makes it take longer), prints "done", then sleeps.
BURN = """
import sys, time
need = float(sys.argv[1])
while time.process_time() < need:
    sum(range(1000))
print("done", flush=True)
time.sleep(60)
"""


def _burner(cpu_seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", BURN, str(cpu_seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_stop_when_quiet_counts_the_work_after_the_load_and_not_the_idle_time() -> None:
    process = _burner(0.6)
    try:
        sampler = CpuSampler({"burner": lambda: [process.pid]}, interval=0.05)
        sampler.start()
        used = sampler.stop_when_quiet("burner", below=0.05, every=0.3, timeout=120)
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "done"  # it had finished
        # The burn itself (less what the interpreter spent before the sampler
        # started), and nothing like the 60 s of sleep after it.
        assert 0.3 <= used["burner"] <= 0.9, used
        assert sampler.seconds > 0
    finally:
        process.kill()
        process.wait()


def test_stop_when_quiet_names_a_process_that_never_goes_quiet() -> None:
    process = _burner(600)
    try:
        sampler = CpuSampler({"burner": lambda: [process.pid]}, interval=0.05)
        sampler.start()
        with pytest.raises(RuntimeError, match="burner was still busy"):
            sampler.stop_when_quiet("burner", below=0.05, every=0.3, timeout=1.5)
    finally:
        process.kill()
        process.wait()
