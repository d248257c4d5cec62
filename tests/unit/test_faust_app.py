"""The Faust application's consumer: what Streamfold sets that Faust does not."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from app.faust_app import FETCH_MAX_WAIT_MS, create_app
from app.settings import Settings


def test_the_worker_consumer_lets_the_broker_hold_an_empty_fetch_briefly(
    tmp_path: Path,
) -> None:
    """Faust builds its consumer with fetch_max_wait_ms=1500; the worker's is
    FETCH_MAX_WAIT_MS, which aiokafka's fetcher reads when the consumer starts."""
    settings = dataclasses.replace(Settings.from_env({}), home=tmp_path)

    async def fetch_max_wait() -> int:
        app = create_app(settings)
        consumer = app.consumer._thread._create_worker_consumer(app.transport)
        try:
            return int(consumer._fetch_max_wait_ms)
        finally:
            await consumer.stop()

    assert FETCH_MAX_WAIT_MS < 1500
    assert asyncio.run(fetch_max_wait()) == FETCH_MAX_WAIT_MS
