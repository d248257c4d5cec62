"""Small process helpers shared by the local Kafka, Postgres and registry services."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from app.waiting import Backoff, eventually


class ServiceError(RuntimeError):
    """A local service could not be installed, started or reached."""


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still "exists"; /proc tells whether it is really running.
    try:
        status = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except (OSError, IndexError):
        return True
    return status != "Z"


def wait_for(
    check: Callable[[], bool], timeout: float, what: str, every: float | None = None
) -> None:
    """Returns once ``check()`` holds (polled every ``every`` seconds, by default
    ever less often up to once a second); raises ``ServiceError`` after ``timeout``."""
    pace = Backoff(0.1, 1.0, factor=1.5) if every is None else every
    if not eventually(check, timeout=timeout, every=pace):
        raise ServiceError(f"timed out after {timeout:.0f}s waiting for {what}")


class Daemon:
    """A detached background process of ours, tracked by a pid file, with its output
    appended to a log file and readiness decided by a probe, never a sleep."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        home: Path,
        ready: Callable[[], bool],
        env: dict[str, str] | None = None,
    ) -> None:
        self.name, self.argv, self.ready, self.env = name, argv, ready, env
        self.pid_file = home / f"{name}.pid"
        self.log_file = home / f"{name}.log"

    def pid(self) -> int | None:
        pid = read_pid(self.pid_file)
        return pid if pid is not None and pid_alive(pid) else None

    def start(self, timeout: float = 60.0) -> bool:
        """Start unless already running and ready; True if this call started it."""
        import subprocess

        if self.pid() is not None and self.ready():
            return False
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as out:
            process = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=self.env,
            )
        self.pid_file.write_text(str(process.pid))

        def check() -> bool:
            if process.poll() is not None:
                raise ServiceError(
                    f"{self.name} exited with code {process.returncode}; "
                    f"last lines of {self.log_file}:\n{tail(self.log_file)}"
                )
            return self.ready()

        wait_for(check, timeout, f"{self.name} (log: {self.log_file})")
        return True

    def stop(self, timeout: float = 30.0, *, kill: bool = False) -> bool:
        import signal

        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
            while pid_alive(pid):
                time.sleep(0.05)
        self.pid_file.unlink(missing_ok=True)
        return True


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def http_ok(url: str, timeout: float = 1.0) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            status: int = response.status  # typeshed leaves urlopen's result Any
            return 200 <= status < 300
    except (urllib.error.URLError, OSError):
        return False


def apt_install(packages: Sequence[str], missing: str) -> None:
    """``apt-get install`` ``packages`` (after an update), as root on Debian;
    ``missing`` says what is not installed and what to do instead, when this
    cannot be done here."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ServiceError(
            f"{missing} (not a root Debian shell: nothing installed here)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for args in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", *packages],
    ):
        result = subprocess.run(
            args, capture_output=True, text=True, env=env, check=False
        )
        if result.returncode != 0:
            raise ServiceError(f"{' '.join(args)} failed:\n{result.stderr[-2000:]}")
