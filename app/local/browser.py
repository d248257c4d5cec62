"""Debian's headless Chromium and its chromedriver, for the operator console's
browser tests: installed with apt-get as PostgreSQL is, never downloaded by a
test at run time."""

from __future__ import annotations

import os

from app.local.process import ServiceError, apt_install

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def install() -> tuple[str, str]:
    """The browser's and the driver's paths, installing both first if needed."""
    if os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER):
        return CHROMIUM, CHROMEDRIVER
    apt_install(
        ["chromium", "chromium-driver"],
        "Chromium is not installed; install the chromium and chromium-driver "
        "packages yourself",
    )
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        raise ServiceError("apt-get installed chromium but it is not at /usr/bin")
    return CHROMIUM, CHROMEDRIVER
