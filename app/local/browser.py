"""Debian's headless Chromium and its chromedriver, for the operator console's
browser tests: installed with apt-get as PostgreSQL is, never downloaded by a
test at run time."""

from __future__ import annotations

import os
import shutil
import subprocess

from app.local.process import ServiceError

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def install() -> tuple[str, str]:
    """The browser's and the driver's paths, installing both first if needed."""
    if os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER):
        return CHROMIUM, CHROMEDRIVER
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ServiceError(
            "Chromium is not installed and this is not a root Debian shell; install "
            "the chromium and chromium-driver packages yourself"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for args in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"],
    ):
        result = subprocess.run(
            args, capture_output=True, text=True, env=env, check=False
        )
        if result.returncode != 0:
            raise ServiceError(f"{' '.join(args)} failed:\n{result.stderr[-2000:]}")
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        raise ServiceError("apt-get installed chromium but it is not at /usr/bin")
    return CHROMIUM, CHROMEDRIVER
