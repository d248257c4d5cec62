"""The Streamfold worker as a background process (for `up --worker` and the demo)."""

from __future__ import annotations

import os
import sys

from app.local.process import Daemon, http_ok
from app.settings import Settings


def WorkerProcess(settings: Settings, name: str = "worker") -> Daemon:  # noqa: N802 - reads as a class
    url = f"{settings.web_url}/status"
    return Daemon(
        f"{name}-{settings.web_port}",
        [sys.executable, "-m", "app.cli", "worker"],
        settings.home / "worker",
        ready=lambda: http_ok(url),
        env={**os.environ, **settings.as_env()},
    )
