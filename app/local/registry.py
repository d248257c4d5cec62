"""The embedded schema registry as a background process, one per port."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import urllib.request
from pathlib import Path

from app.local.process import Daemon, http_ok
from app.settings import Settings

log = logging.getLogger("streamfold.local")


def _digest(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


class RegistryProcess:
    """``python -m app.adapters.registry_server`` for one settings' topic and port,
    with its pid and log files under ``settings.home / "registry"``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = f"http://127.0.0.1:{settings.registry_port}"
        self.daemon = Daemon(
            f"registry-{settings.registry_port}",
            [sys.executable, "-m", "app.adapters.registry_server"],
            settings.home / "registry",
            ready=self.answers,
            # as_env carries the broker, topic prefix, port and Kafka security settings.
            env={**os.environ, **settings.as_env()},
        )

    @property
    def pid_file(self) -> Path:
        return self.daemon.pid_file

    @property
    def log_file(self) -> Path:
        return self.daemon.log_file

    def answers(self) -> bool:
        """Whether a registry answers ``GET /subjects`` on this port."""
        return http_ok(f"{self.url}/subjects", timeout=2.0)

    def start(self, timeout: float = 60.0) -> bool:
        """Start unless a registry already answers on the port; True if this call did.
        A registry of ours that runs code since changed on disk (an upgrade) is
        restarted.

        Raises ``ServiceError`` with the log's last lines if the process exits early.
        """
        if self.answers():
            if self.daemon.pid() is None or self.current():
                return False
            log.warning("restarting the registry: its code changed since it started")
            self.daemon.stop()
        return self.daemon.start(timeout)

    def current(self) -> bool:
        """Whether the registry on the port runs the sources on disk (one that does
        not say, another implementation, counts as current)."""
        try:
            with urllib.request.urlopen(  # noqa: S310 - our own local URL
                f"{self.url}/v1/metadata/version", timeout=5
            ) as response:
                sources = json.loads(response.read()).get("sources", {})
        except (OSError, ValueError):
            return True
        return all(_digest(path) == digest for path, digest in sources.items())

    def running(self) -> bool:
        """Whether our process is alive and answering."""
        return self.daemon.pid() is not None and self.answers()

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop our process (SIGTERM, then SIGKILL); True if there was one."""
        return self.daemon.stop(timeout)
