"""The worker's way to Kafka for commands sent over HTTP, and back to their results.

One ``CommandGateway`` per worker, started with it when ``STREAMFOLD_API_TOKENS`` is
set. It holds one producer, which sends commands framed by
``app.client.frame_command`` exactly as any client's, and one read_committed consumer
of ``command-results`` in a thread of its own, which resolves the asyncio futures of
the requests waiting for a result and keeps the newest results by command id for
``GET /commands/{id}``. The event loop never makes a Kafka call: framing (which may
ask the registry), producing and decoding run in threads.

Why the listener reads every partition: a result is keyed by its command id but
written to the partition of its *aggregate* (murmur2 of the aggregate id), beside
the aggregate's events, so a command id alone names no partition. Each worker
therefore follows all partitions of ``command-results`` (no consumer group, so no
rebalance and no shared offsets) and knows every result written while it runs,
whichever worker or client sent the command. At start it reads back the newest
``STREAMFOLD_API_RESULTS_KEPT`` results (that many divided among the partitions),
so a worker that was restarted still answers for recent commands. The index holds
the raw bytes (the record's key is the command id, so nothing is decoded unless
asked for) with the fingerprint header of the command answered, at most that many,
the oldest dropped first.

An id sent again is answered only if it is the same request: the same aggregate
and, where the result names one, the same fingerprint (``mapper.fingerprint``), which
the writer puts on every result it writes or sends again; else ``KeyReused``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from app.adapters import mapper
from app.adapters.codec import Codec, DecodeError, RegistryError
from app.adapters.eventlog import CommandResult, fingerprint_in
from app.adapters.topics import headers_of, partitions_of, take, watermarks
from app.client import (
    AREAS,
    CommandTimeout,
    FramedCommand,
    aggregate_id_of,
    frame_command,
)
from app.settings import Settings

log = logging.getLogger("streamfold.gateway")

# How long a lookup waits for the listener to have read back what it keeps.
CATCH_UP_WAIT_S = 30.0
# A result as the gateway keeps it: its value (undecoded) and its fingerprint.
Kept = tuple[bytes, str | None]


class GatewayError(Exception):
    """The command could not be handed to Kafka (not delivered, the producer's
    queue full, the gateway not running); nothing was sent, or not for sure."""


class CommandTooLarge(ValueError):
    """The command's record would be over ``STREAMFOLD_MAX_MESSAGE_BYTES``: the
    write side would dead-letter it, so it is not sent."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"the command's record would be {size} bytes, over the limit of {limit} "
            "(STREAMFOLD_MAX_MESSAGE_BYTES)"
        )


class KeyReused(Exception):
    """The command id already has a result for another aggregate, or for another
    payload (its fingerprint differs): an idempotency key sent again with a
    different request."""

    def __init__(self, result: CommandResult, *, other_body: bool = False) -> None:
        super().__init__(
            f"command id {result.command_id} was already used for "
            f"{result.aggregate_type} {result.aggregate_id}"
            + (" with another body" if other_body else "")
        )
        self.result = result


def check_reuse(
    result: CommandResult, aggregate: tuple[str, str], fingerprint: str
) -> CommandResult:
    """``result``, if it answers this request: the same aggregate and, where the
    result says which command it answers, the same payload; else ``KeyReused``."""
    if (result.aggregate_type, result.aggregate_id) != aggregate:
        raise KeyReused(result)
    if result.fingerprint is not None and result.fingerprint != fingerprint:
        raise KeyReused(result, other_body=True)
    return result


@dataclass(slots=True)
class _Waiter:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[CommandResult]
    # (aggregate type, aggregate id) the result must be for; None takes any.
    aggregate: tuple[str, str] | None


class CommandGateway:
    """Sends commands and waits for their results without blocking the event loop;
    one per worker (see the module's docstring)."""

    def __init__(self, settings: Settings, codec: Codec) -> None:
        self.settings = settings
        self.codec = codec
        self.topic = settings.topics.results
        self.kept = settings.api_results_kept
        self._lock = threading.Lock()
        # Each kept result's value and the fingerprint it was sent with.
        self._index: OrderedDict[str, Kept] = OrderedDict()
        self._waiters: dict[str, list[_Waiter]] = {}
        self._caught_up = threading.Event()
        # Lookups waiting for the read-back at start: (their loop, a future).
        self._reading_back: list[
            tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]
        ] = []
        self._stopping = threading.Event()
        self._behind: set[int] = set()
        self._producer: Producer | None = None
        self._consumer: Consumer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        """Connect, read back the newest results, and start listening (blocking:
        call it before the event loop runs, or in a thread)."""
        settings = self.settings
        self._producer = Producer({**settings.producer_config(), "linger.ms": 1})
        consumer = Consumer(
            {
                **settings.consumer_config(),
                "group.id": f"{settings.app_id}.http-results",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "fetch.wait.max.ms": 100,
            }
        )
        partitions = partitions_of(consumer, self.topic)
        each = math.ceil(self.kept / len(partitions))
        starts = []
        for partition in partitions:
            low, high = watermarks(consumer, self.topic, partition)
            starts.append(TopicPartition(self.topic, partition, max(low, high - each)))
        self._behind = set(partitions)
        consumer.assign(starts)
        self._consumer = consumer
        self._thread = threading.Thread(
            target=self._listen, name="sf-http-results", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._producer is not None:
            self._producer.flush(timeout)
        if self._consumer is not None:
            self._consumer.close()

    # -- what the web handlers call ---------------------------------------------------

    async def send(
        self, command: Any, envelope: Mapping[str, Any], *, wait: float
    ) -> CommandResult:
        """Produce ``command`` with ``envelope`` and wait up to ``wait`` seconds
        for its result. A command id that already has a result gets that result
        back and nothing is produced (the writer would answer the same).

        Raises ``CommandTimeout`` (it may still be decided later: look it up by its
        id), ``KeyReused``, ``CommandTooLarge``, ``GatewayError``, and the codec's ``EncodeError`` or
        ``RegistryError``."""
        command_id = str(envelope["command_id"])
        [kind] = [t for t, (_, m) in AREAS.items() if type(command) in m.COMMANDS]
        aggregate = (kind, aggregate_id_of(command))
        fingerprint = mapper.fingerprint(command)
        waiter = self._waiter(aggregate)
        known = self._known_or_wait(command_id, waiter)
        if known is not None:
            result = await asyncio.to_thread(self._decode, known)
            return check_reuse(result, aggregate, fingerprint)
        try:
            framed = await asyncio.to_thread(
                frame_command, self.settings, self.codec, command, envelope
            )
            if len(framed.value) > self.settings.max_message_bytes:
                raise CommandTooLarge(
                    len(framed.value), self.settings.max_message_bytes
                )
            await asyncio.to_thread(self._produce, framed, command_id, waiter)
            try:
                # The writer answers an id it answered before with that answer,
                # which names the payload it was for.
                result = await asyncio.wait_for(waiter.future, wait)
                return check_reuse(result, aggregate, fingerprint)
            except TimeoutError:
                raise CommandTimeout(
                    f"no result for command {command_id} within {wait:g}s; it "
                    "may still be decided"
                ) from None
        finally:
            self._forget(command_id, waiter)

    async def result(
        self, command_id: str, *, wait: float = 0.0
    ) -> CommandResult | None:
        """The result of ``command_id`` if one was written among the newest this
        worker keeps; waits up to ``wait`` seconds for one to arrive, then None."""
        await self._read_back()
        waiter = self._waiter(None) if wait > 0 else None
        known = self._known_or_wait(command_id, waiter)
        if known is not None:
            return await asyncio.to_thread(self._decode, known)
        if waiter is None:
            return None
        try:
            return await asyncio.wait_for(waiter.future, wait)
        except TimeoutError:
            return None
        finally:
            self._forget(command_id, waiter)

    async def _read_back(self) -> None:
        """Until the listener has read back what it keeps (at most
        ``CATCH_UP_WAIT_S``)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._caught_up.is_set():
                return
            future: asyncio.Future[None] = loop.create_future()
            self._reading_back.append((loop, future))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(future, CATCH_UP_WAIT_S)

    # -- between the event loop and the listener -------------------------------------

    def _waiter(self, aggregate: tuple[str, str] | None) -> _Waiter:
        loop = asyncio.get_running_loop()
        return _Waiter(loop, loop.create_future(), aggregate)

    def _known_or_wait(self, command_id: str, waiter: _Waiter | None) -> Kept | None:
        """The kept result of ``command_id``; else ``waiter`` is registered for it,
        in the same step, so a result arriving in between is not missed."""
        with self._lock:
            known = self._index.get(command_id)
            if known is None and waiter is not None:
                self._waiters.setdefault(command_id, []).append(waiter)
            return known

    def _forget(self, command_id: str, waiter: _Waiter) -> None:
        with self._lock:
            waiting = self._waiters.get(command_id, [])
            if waiter in waiting:
                waiting.remove(waiter)
            if not waiting:
                self._waiters.pop(command_id, None)

    def _produce(self, framed: FramedCommand, command_id: str, waiter: _Waiter) -> None:
        if (
            self._producer is None
            or self._thread is None
            or not self._thread.is_alive()
        ):
            raise GatewayError("the command gateway is not running")

        def delivered(error: KafkaError | None, _: Message) -> None:
            if error is not None:
                _settle(
                    waiter,
                    GatewayError(
                        f"command {command_id} was not delivered: {error.str()}"
                    ),
                )

        try:
            framed.send_with(self._producer.produce, on_delivery=delivered)
        except BufferError:
            raise GatewayError(
                "the producer's queue is full; try again in a moment"
            ) from None

    def _decode(self, kept: Kept) -> CommandResult:
        value, fingerprint = kept
        result = CommandResult.from_record(self.codec.decode(value).data)
        return dataclasses.replace(result, fingerprint=fingerprint)

    # -- the listener thread ---------------------------------------------------------

    def _listen(self) -> None:
        producer, consumer = self._producer, self._consumer
        assert producer is not None
        assert consumer is not None
        while not self._stopping.is_set():
            try:
                producer.poll(0)  # delivery reports
                for message in take(consumer, 501, 0.1):
                    self._take(message)
            except Exception:  # the listener must outlive any one bad record
                log.exception("command-results listener: going on after an error")
                self._stopping.wait(1.0)

    def _read_back_done(self) -> None:
        with self._lock:
            self._caught_up.set()
            waiting, self._reading_back = self._reading_back, []
        for loop, future in waiting:
            _wake(loop, future)

    def _take(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                self._behind.discard(message.partition() or 0)
                if not self._behind and not self._caught_up.is_set():
                    self._read_back_done()
            else:
                log.warning("command-results listener: %s", error.str())
            return
        key = (message.key() or b"").decode(errors="replace")
        value = (message.value() or b"", fingerprint_in(dict(headers_of(message))))
        with self._lock:
            self._index[key] = value
            self._index.move_to_end(key)
            if len(self._index) > self.kept:
                self._index.popitem(last=False)
            waiting = list(self._waiters.get(key, ()))
        if not waiting:
            return
        try:
            result = self._decode(value)
        except (DecodeError, RegistryError, LookupError, ValueError) as failure:
            log.warning(
                "command-results listener: result of %s unreadable: %s", key, failure
            )
            return
        for waiter in waiting:
            wanted = waiter.aggregate
            if wanted is None or wanted == (result.aggregate_type, result.aggregate_id):
                _settle(waiter, result)


def _wake(loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> None:
    """Resolve a future from any thread, once."""

    def wake() -> None:
        if not future.done():
            future.set_result(None)

    loop.call_soon_threadsafe(wake)


def _settle(waiter: _Waiter, outcome: CommandResult | Exception) -> None:
    """Resolve a waiter's future from any thread, once."""

    def settle() -> None:
        if waiter.future.done():
            return
        if isinstance(outcome, Exception):
            waiter.future.set_exception(outcome)
        else:
            waiter.future.set_result(outcome)

    waiter.loop.call_soon_threadsafe(settle)
