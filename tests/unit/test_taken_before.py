"""A write process skips command records below the last one it took only on a cache
that notes the topics it was filled from (``runtime.CommandHandler``)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from app.adapters.catalog import SchemaCatalog
from app.adapters.codec import Codec, ConfluentRegistry
from app.runtime import TOPICS_MARKER, CommandHandler
from app.settings import Settings
from tests.support import Consumed


class _Batch:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def send(self, topic: str, value: Any, **options: Any) -> None:
        self.sent.append(topic)


def test_a_cache_without_its_topics_note_takes_every_record(tmp_path: Path) -> None:
    settings = replace(Settings(), home=tmp_path)
    codec = Codec(ConfluentRegistry("http://127.0.0.1:1"), SchemaCatalog.load())
    cache = tmp_path / "write-state"
    handler = CommandHandler(settings, "accounts", codec, cache)
    commands = settings.topics.commands("accounts")
    try:
        handler.store.commit(taken={(commands, 0): 5})
        handler.assigned([(commands, 0)])
        assert not (cache / TOPICS_MARKER).exists()
        batch = _Batch()
        # Below the noted offset, but the cache cannot say of which topic: an empty
        # record is dead-lettered, not skipped.
        for offset in (3, 4):
            handler.handle(Consumed(commands, 0, offset, b""), batch)  # type: ignore[arg-type]
        assert batch.sent == [settings.topics.dead_letter(commands)] * 2
        assert handler.stats["taken_again"] == 0
    finally:
        handler.close()
