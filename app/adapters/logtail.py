"""Reading the logs a processor's state is derived from, and the local cache of it.

``LogTail`` follows partitions of the topics a handler folds (an aggregate type's
events and command results, the saga's state changelog) with read_committed and no
consumer group: it catches a partition up to its last stable offset before the
handler decides on it, and hands over whatever arrives later, including records
someone else appended.

``StateCache`` keeps what was folded in a local RocksDB database together with the
offsets it reflects, so a restart folds only the tail. It is a cache: deleting it
costs a fold of the whole log, nothing more.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import cast

import orjson
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from rocksdict import Options, Rdict, WriteBatch

from app.adapters.topics import OPEN_TRANSACTION_WAIT_S, TP, describe, take
from app.settings import Settings

log = logging.getLogger("streamfold.processor")


class LogTail:
    """Follows partitions of some topics from given offsets and folds each record
    with ``fold``; remembers the offset after the last record folded."""

    def __init__(
        self, settings: Settings, fold: Callable[[Message], None], *, name: str
    ) -> None:
        self.fold = fold
        self.name = name
        self.consumer = Consumer(
            {
                **settings.consumer_config(),
                "group.id": f"{settings.app_id}.{name}-tail",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "isolation.level": "read_committed",
                "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": 100,
                # Bounds what is fetched ahead of folding, per partition.
                "queued.max.messages.kbytes": 4096,
            }
        )
        self.offsets: dict[TP, int] = {}
        # Topics whose metadata this consumer asked for (see ``describe``).
        self._described: set[str] = set()
        # A fold failed: what the consumer handed over past ``offsets`` was not
        # folded, so the followed partitions are read again from ``offsets``.
        self._dirty = False

    def follow(self, starts: dict[TP, int]) -> None:
        """Start following these partitions at these offsets and fold each up to
        its last stable offset before returning."""
        fresh = {tp: o for tp, o in starts.items() if tp not in self.offsets}
        new_topics = {t for t, _ in fresh} - self._described
        describe(self.consumer, new_topics)
        self._described |= new_topics
        if fresh:
            self.consumer.incremental_assign(
                [TopicPartition(t, p, o) for (t, p), o in fresh.items()]
            )
            self.offsets.update(fresh)
        self.catch_up(starts)

    def catch_up(self, tps: Iterable[TP], timeout: float = 60.0) -> None:
        """Fold followed partitions up to their last stable offset: what a
        read_committed reader sees as the end right now. Raises a ``KafkaException``
        when nothing arrives for ``timeout`` seconds."""
        waiting = set(tps)
        if not waiting:
            return
        self._reseek()
        # Asked again from where it is, a partition reports its end once more; a
        # paused one stays paused through that, so it is resumed.
        listed = [TopicPartition(t, p) for t, p in waiting]
        self.consumer.incremental_unassign(listed)
        self.consumer.incremental_assign(
            [TopicPartition(t, p, self.offsets[(t, p)]) for t, p in waiting]
        )
        self.consumer.resume(listed)
        deadline = time.monotonic() + timeout
        while waiting:
            if time.monotonic() > deadline:
                raise KafkaException(
                    KafkaError(
                        KafkaError._TIMED_OUT,
                        f"{self.name}: could not read {sorted(waiting)} to its end",
                    )
                )
            messages = take(self.consumer, 1000, 0.2)
            if messages:
                deadline = time.monotonic() + timeout
            for message in messages:
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        waiting.discard(
                            (message.topic() or "", message.partition() or 0)
                        )
                        continue
                    raise KafkaException(error)
                self._fold(message)
        self._past_open_transactions(listed)

    def _past_open_transactions(self, listed: list[TopicPartition]) -> None:
        """A read_committed reader's end is the last stable offset: a transaction
        still open there (its writer just committed and the marker is on its way,
        or its writer is gone and the broker will abort it) may yet add records.
        Read on until the position reaches the high watermark, for at most the
        longest a transaction of Streamfold's stays open."""
        deadline = time.monotonic() + OPEN_TRANSACTION_WAIT_S
        while True:
            behind = []
            for tp in self.consumer.position(listed):
                # No position yet: nothing was fetched, the fold's offset stands.
                at = (
                    tp.offset
                    if tp.offset >= 0
                    else self.offsets[(tp.topic, tp.partition)]
                )
                high = self._high_watermark(tp.topic, tp.partition)
                if at < high:
                    behind.append(tp)
            if not behind:
                return
            if time.monotonic() > deadline:
                log.warning(
                    "%s: %s still below the high watermark (a transaction left "
                    "open); going on from the last stable offset",
                    self.name,
                    [(tp.topic, tp.partition) for tp in behind],
                )
                return
            # What has arrived, all of it: a transaction just committed may hold
            # many records, and each round asks the broker for every watermark.
            messages = take(self.consumer, 1000, 0.05)
            for message in messages:
                error = message.error()
                if error is None:
                    self._fold(message)
                elif error.code() != KafkaError._PARTITION_EOF:
                    raise KafkaException(error)

    def _high_watermark(self, topic: str, partition: int) -> int:
        """As the last fetch response reported it (every response carries it): a
        query of its own waits on the broker behind this consumer's long poll,
        about 50 ms a partition. Asked for only when no fetch reported it yet."""
        tp = TopicPartition(topic, partition)
        _, high = self.consumer.get_watermark_offsets(tp, cached=True)
        if high < 0:
            _, high = self.consumer.get_watermark_offsets(tp, timeout=10, cached=False)
        return int(high)

    def _reseek(self) -> None:
        if not self._dirty or not self.offsets:
            self._dirty = False
            return
        listed = [TopicPartition(t, p) for t, p in self.offsets]
        self.consumer.incremental_unassign(listed)
        self.consumer.incremental_assign(
            [TopicPartition(t, p, o) for (t, p), o in self.offsets.items()]
        )
        self._dirty = False

    def poll(self) -> int:
        """Fold what has arrived since; never waits."""
        self._reseek()
        count = 0
        while True:
            messages = self.consumer.consume(1000, 0)
            for message in messages:
                error = message.error()
                if error is None:
                    self._fold(message)
                    count += 1
                elif error.code() != KafkaError._PARTITION_EOF:
                    raise KafkaException(error)
            if len(messages) < 1000:
                return count

    def pause(self, tps: Iterable[TP]) -> None:
        """Stop fetching these until the next ``catch_up``."""
        self.consumer.pause([TopicPartition(t, p) for t, p in tps])

    def drop(self, tps: Iterable[TP]) -> None:
        gone = [tp for tp in tps if tp in self.offsets]
        if gone:
            self.consumer.incremental_unassign([TopicPartition(t, p) for t, p in gone])
            for tp in gone:
                del self.offsets[tp]

    def close(self) -> None:
        self.consumer.close()

    def _fold(self, message: Message) -> None:
        tp = (message.topic() or "", message.partition() or 0)
        try:
            self.fold(message)
        except BaseException:
            self._dirty = True
            raise
        self.offsets[tp] = (message.offset() or 0) + 1


class StateCache:
    """Values by key and the log offsets they reflect, in a local RocksDB database;
    a batch of changes is written atomically.

    ``shape`` names the shape of what is cached (see ``runtime.state_format``): a
    cache written in another shape, by an older or newer release, is dropped when
    opened and rebuilt from the log."""

    def __init__(self, path: Path, shape: str = "") -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = self._open()
        found = self.db.get(FORMAT_KEY)
        if found is not None and bytes(found) != shape.encode():
            log.warning(
                "%s: cached in another format (%r, now %r); rebuilding it",
                path,
                bytes(found).decode(errors="replace"),
                shape,
            )
            self.db.close()
            Rdict.destroy(str(path))
            self.db = self._open()
        self.db[FORMAT_KEY] = shape.encode()

    def _open(self) -> Rdict:
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        return Rdict(str(self.path), options)

    def get(self, key: str) -> object | None:
        raw = self.db.get(key.encode())
        return None if raw is None else orjson.loads(raw)

    def get_raw(self, key: str) -> bytes | None:
        value = self.db.get(key.encode())
        return None if value is None else bytes(value)

    def offset(self, tp: TP) -> int:
        found = self.get(_offset_key(tp))
        return int(found) if isinstance(found, int) else 0

    def known(self, tp: TP) -> bool:
        """Whether this cache has folded ``tp`` before (an offset is kept for it)."""
        return self.db.get(_offset_key(tp).encode()) is not None

    def items(self) -> Iterator[tuple[str, bytes]]:
        """Every key held and its raw value; offsets and the format are among them
        (their keys start with NUL)."""
        for key, value in self.db.items():
            # In raw mode every key is bytes; rocksdict's stubs give the union of
            # the key types of its other modes.
            yield cast(bytes, key).decode(), bytes(value)

    def keys(self, prefix: str, limit: int) -> list[str]:
        """Up to ``limit`` keys that start with ``prefix``, in order."""
        start = prefix.encode()
        found: list[str] = []
        rows = self.db.iter()
        rows.seek(start)
        while rows.valid() and len(found) < limit:
            key = bytes(rows.key())
            if not key.startswith(start):
                break
            found.append(key.decode())
            rows.next()
        return found

    def write(
        self,
        values: dict[str, object],
        raw: dict[str, bytes],
        offsets: dict[TP, int],
        deleted: Iterable[str] = (),
    ) -> None:
        """Delete ``deleted``, then put the rest, in one atomic batch."""
        batch = WriteBatch(raw_mode=True)
        for key in deleted:
            batch.delete(key.encode())
        for key, value in values.items():
            batch.put(key.encode(), orjson.dumps(value))
        for key, data in raw.items():
            batch.put(key.encode(), data)
        for tp, offset in offsets.items():
            batch.put(_offset_key(tp).encode(), orjson.dumps(offset))
        self.db.write(batch)

    def close(self) -> None:
        self.db.close()

    @staticmethod
    def destroy(path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)


FORMAT_KEY = b"\x00format"


def _offset_key(tp: TP) -> str:
    return f"\x00offset/{tp[0]}/{tp[1]}"
