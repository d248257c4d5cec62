"""The operator console's routes on the worker's web server.

Reads are open, as the worker's other views are. An action (re-drive, discard)
needs an operator's bearer token from ``STREAMFOLD_OPERATOR_TOKENS`` in the
``Authorization`` header, JSON (``Content-Type: application/json``) and
``"confirmed": true`` in the body; the operator recorded with it is the token's
user id, never anything the body says. Without a configured token the console is
read-only. No cookie is read: a page on another origin cannot make a browser send
the header (nor the JSON without a CORS preflight this server never answers).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import faust
from aiohttp.web import HTTPRequestEntityTooLarge, StreamResponse
from faust.web import View

from app import params as checked
from app.adapters.codec import Codec, ConfluentRegistry, RegistryError
from app.adapters.deadletters import (
    DeadLetterError,
    Operations,
    read_overview,
    utc_now,
)
from app.adapters.topics import GroupOffsets, records_at
from app.console import live, render, schemas
from app.deadletters import Action, ActionRefused, Verb, checked_reason
from app.history import HistoricEvent
from app.projections import PROJECTIONS
from app.readside import ReadSide, status_document
from app.rest import requests
from app.rest.auth import Credentials, Unauthorized
from app.rest.bodies import BodyError
from app.settings import Settings
from app.writeside import WriteProcess

log = logging.getLogger("streamfold.console")

STATIC = Path(__file__).parent / "static"
# How often the processors page is pushed a new document.
LIVE_S = 1.0
# The console's assets: served from the worker, nothing from elsewhere.
ASSETS = {
    "console.js": "text/javascript",
    "console.css": "text/css",
}
# No script, style, image or connection but the worker's own.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class Refused(Exception):
    def __init__(
        self, status: int, error: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(error)
        self.status, self.error, self.headers = status, error, headers or {}


class Console:
    """What the console's handlers share."""

    def __init__(
        self,
        settings: Settings,
        codec: Codec,
        read: ReadSide | None = None,
        write: WriteProcess | None = None,
    ) -> None:
        self.settings = settings
        self.codec = codec
        self.read = read
        self.write = write
        self.credentials = Credentials(settings.operator_tokens)
        self.operations = Operations(settings, utc_now)
        self.replays = live.Replays(settings)
        self._registry: ConfluentRegistry | None = None
        self._groups: dict[str, GroupOffsets] = {}
        self._live_lock = threading.Lock()
        self._live: tuple[float, dict[str, Any]] | None = None

    def operator(self, authorization: str | None) -> str:
        """The operator's id from the request's credential; refuses when none is
        configured (403) or it is missing or wrong (401)."""
        if not self.credentials.enabled:
            raise Refused(
                403,
                "the console is read-only on this worker: no operator credential is "
                "configured (STREAMFOLD_OPERATOR_TOKENS=user_id:token,...)",
            )
        try:
            return self.credentials.user_id(authorization)
        except Unauthorized as error:
            raise Refused(
                401, error.message, {"WWW-Authenticate": error.challenge}
            ) from None

    def session(self, authorization: str | None) -> dict[str, Any]:
        operator = self.operator(authorization) if authorization else None
        return {"operator": operator, "actions_enabled": self.credentials.enabled}

    def _decode(self, value: bytes) -> dict[str, Any]:
        decoded = self.codec.decode(value)
        return {
            "record_name": decoded.record_name,
            "writer_version": decoded.writer_version,
            "schema_id": decoded.schema_id,
            "data": decoded.data,
        }

    def dead_letters(self) -> dict[str, Any]:
        seen = read_overview(self.settings)
        decided = seen.decided()
        return {
            "topics": seen.topics,
            "letters": [
                render.dead_letter(x, decided, self._decode) for x in seen.letters
            ],
            "actions": [a.to_dict() for a in reversed(seen.actions)],
        }

    def act(self, verb: Verb, operator: str, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ActionRefused(400, "expected a JSON object")
        if body.get("confirmed") is not True:
            raise ActionRefused(400, 'confirmed: send "confirmed": true to act')
        reason = checked_reason(body.get("reason", ""), required=verb == "discard")
        record, topic, aggregate_id = (
            body.get(k) for k in ("record", "topic", "aggregate_id")
        )
        for name, value in (("record", record), ("topic", topic)):
            if value is not None and not isinstance(value, str):
                raise ActionRefused(400, f"{name}: expected a string")
        if aggregate_id is not None and not isinstance(aggregate_id, str):
            raise ActionRefused(400, "aggregate_id: expected a string")
        if (record is None) == (aggregate_id is None):
            raise ActionRefused(400, "give either record or topic and aggregate_id")
        if aggregate_id is not None and topic is None:
            raise ActionRefused(400, "topic: an aggregate's records are in one topic")
        actions = self.operations.act(
            verb,
            operator,
            reason,
            record=record,
            topic=topic,
            aggregate_id=aggregate_id,
        )
        return {"actions": [a.to_dict() for a in actions]}

    def registry(self) -> ConfluentRegistry:
        if self._registry is None:
            self._registry = ConfluentRegistry(self.settings.schema_registry_url)
        return self._registry

    def schema_subjects(self) -> dict[str, Any]:
        return {
            "subjects": schemas.subjects(
                self.settings.topics, self.codec.catalog, self.registry()
            )
        }

    def schema_diff(self, subject: str, old: int, new: int) -> dict[str, Any]:
        return schemas.diff(
            self.settings.topics, self.codec.catalog, self.registry(), subject, old, new
        )

    def live_document(self) -> dict[str, Any]:
        """Every processor's, saga's and projection's partitions, and the replays;
        built at most once a second, whoever asks (blocking)."""
        with self._live_lock:
            if self._live is not None and time.monotonic() - self._live[0] < LIVE_S:
                return self._live[1]
            owner = live.owner_name()
            rows = []
            if self.write is not None:
                reports = list(self.write.reports)
                owned: dict[str, list[tuple[str, int]]] = {}
                for report in reports:
                    for group, state in report.items():
                        if isinstance(state, dict) and "assignment" in state:
                            owned.setdefault(group, []).extend(
                                (t, p) for t, p in state["assignment"]
                            )
                offsets: dict[tuple[str, int], tuple[int | None, int]] = {}
                for group, partitions in owned.items():
                    if group not in self._groups:
                        self._groups[group] = GroupOffsets(self.settings, group)
                    offsets.update(self._groups[group].read(partitions))
                rows += live.processor_rows(reports, offsets, owner)
            if self.read is not None:
                status = status_document(self.settings, self.read)
                rows += live.projection_rows(status["projections"], owner)
            document = {
                "at": utc_now().isoformat(),
                "rows": rows,
                "projections": list(PROJECTIONS),
                "replays": self.replays.to_list(),
            }
            self._live = (time.monotonic(), document)
            return document

    def start_replay(self, operator: str, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ActionRefused(400, "expected a JSON object")
        if body.get("confirmed") is not True:
            raise ActionRefused(400, 'confirmed: send "confirmed": true to act')
        name = body.get("projection")
        if name not in PROJECTIONS:
            raise ActionRefused(
                400, f"projection: one of {', '.join(PROJECTIONS)}, got {name!r}"
            )
        reason = checked_reason(body.get("reason", ""), required=False)
        action = Action(
            action_id=str(uuid.uuid4()),
            at=utc_now(),
            operator=operator,
            verb="replay",
            record=f"projection:{name}",
            reason=reason,
        )
        try:
            # Recorded first: a replay never runs without its action on record.
            replay = self.replays.start(
                name, operator, first=lambda: self.operations.record(action)
            )
        except RuntimeError as error:
            raise ActionRefused(409, str(error)) from None
        return {"actions": [action.to_dict()], "replay": replay.to_dict()}

    def events(self, aggregate_id: str, kind: str | None) -> dict[str, Any]:
        """One aggregate's events, upcast, with where each lies and its headers."""
        from app.history import EventStore
        from app.readside import store_work

        def work(store: EventStore) -> dict[str, Any]:
            resolved = store.aggregate_type(aggregate_id, kind)
            return {
                "aggregate_type": resolved,
                "events": store.read_stream(resolved, aggregate_id),
            }

        found = store_work(self.settings, work)
        located: dict[tuple[str, int], set[int]] = {}
        for event in found["events"]:
            located.setdefault((event.topic, event.partition), set()).add(event.offset)
        records = {
            (topic, partition, offset): record
            for (topic, partition), offsets in located.items()
            for offset, record in records_at(
                self.settings, topic, partition, offsets
            ).items()
        }
        return {
            "aggregate_type": found["aggregate_type"],
            "aggregate_id": aggregate_id,
            "events": [
                {
                    **_event(event),
                    "headers": render.headers_dict(
                        records[key].headers if key in records else {}
                    ),
                }
                for event in found["events"]
                for key in [(event.topic, event.partition, event.offset)]
            ],
        }

    def flow(self, correlation_id: str) -> dict[str, Any]:
        from app.history import EventStore
        from app.readside import store_work

        def work(store: EventStore) -> dict[str, Any]:
            return {"events": store.read_correlation(correlation_id)}

        events = store_work(self.settings, work)["events"]
        if not events:
            raise Refused(404, f"no events with correlation id {correlation_id}")
        return {
            "correlation_id": correlation_id,
            "events": [_event(e) for e in events],
        }


def _event(event: HistoricEvent) -> dict[str, Any]:
    shown: dict[str, Any] = render.jsonable(
        {
            "aggregate_type": event.aggregate_type,
            "aggregate_id": event.aggregate_id,
            "stream_version": event.stream_version,
            "event_type": event.event_type,
            "record_name": event.record_name,
            "schema_version": event.schema_version,
            "occurred_at": event.occurred_at,
            "event_id": event.event_id,
            "correlation_id": event.correlation_id,
            "causation_id": event.causation_id,
            "user_id": event.user_id,
            "topic": event.topic,
            "partition": event.partition,
            "offset": event.offset,
            "data": event.data,
        }
    )
    return shown


async def answer(view: View, work: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``work`` and turn what it returned or raised into the response."""
    from app import query
    from app.history import AmbiguousAggregate, UnknownAggregate

    headers: dict[str, str] = {}
    try:
        status, body = 200, await work()
    except Refused as refused:
        status, body, headers = (
            refused.status,
            {"error": refused.error},
            refused.headers,
        )
    except ActionRefused as refused:
        status, body = refused.status, {"error": refused.message}
    except (checked.BadParameter, BodyError, AmbiguousAggregate) as error:
        status, body = 400, {"error": str(error)}
    except requests.UnsupportedMediaType as error:
        status, body = 415, {"error": str(error)}
    except HTTPRequestEntityTooLarge as error:
        status, body = 413, {"error": f"the body is too large: {error.text}"}
    except (UnknownAggregate, query.NotFound) as error:
        status, body = 404, {"error": str(error).strip("'\"")}
    except DeadLetterError as error:
        status, body = 503, {"error": f"Kafka: {error}; nothing was done"}
    except RegistryError as error:
        status, body = 503, {"error": f"schema registry: {error}"}
    except Exception:
        reference = str(uuid.uuid4())
        log.exception("console request failed (correlation id %s)", reference)
        status, body = 500, {"error": "internal error", "correlation_id": reference}
    return view.json(body, status=status, headers=headers)


def register(
    app: faust.App,
    settings: Settings,
    codec: Codec,
    read: ReadSide | None = None,
    write: WriteProcess | None = None,
) -> Console:
    """The console's page, assets and JSON routes, on ``app``."""
    console = Console(settings, codec, read, write)
    page = (STATIC / "index.html").read_text()

    @app.page("/console")
    async def console_page(web: View, request: Any) -> Any:
        return web.html(page, headers=dict(SECURITY_HEADERS))

    @app.page("/console/static/{name}")
    async def console_asset(web: View, request: Any, name: str) -> Any:
        if name not in ASSETS:
            return web.json({"error": f"no asset {name}"}, status=404)
        return web.text(
            (STATIC / name).read_text(),
            content_type=ASSETS[name],
            headers=dict(SECURITY_HEADERS),
        )

    @app.page("/console/api/session")
    async def console_session(web: View, request: Any) -> Any:
        authorization = request.headers.get("Authorization")
        return await answer(web, lambda: _now(console.session(authorization)))

    @app.page("/console/api/events/{aggregate_id}")
    async def console_events(web: View, request: Any, aggregate_id: str) -> Any:
        async def work() -> Any:
            params = checked.accepted(request.query.items(), ("type",))
            checked.identifier(aggregate_id, "aggregate_id")
            kind = checked.choice(params, "type", ("order", "account"))
            return await asyncio.to_thread(console.events, aggregate_id, kind)

        return await answer(web, work)

    @app.page("/console/api/flows/{correlation_id}")
    async def console_flow(web: View, request: Any, correlation_id: str) -> Any:
        async def work() -> Any:
            checked.identifier(correlation_id, "correlation_id")
            return await asyncio.to_thread(console.flow, correlation_id)

        return await answer(web, work)

    @app.page("/console/api/schemas")
    async def console_schemas(web: View, request: Any) -> Any:
        return await answer(web, lambda: asyncio.to_thread(console.schema_subjects))

    @app.page("/console/api/schemas/diff")
    async def console_schema_diff(web: View, request: Any) -> Any:
        async def work() -> Any:
            params = checked.accepted(request.query.items(), ("subject", "from", "to"))
            subject = params.get("subject", "")
            checked.identifier(subject, "subject")
            old = checked.integer(params, "from", 1, 1, 10_000)
            new = checked.integer(params, "to", 2, 1, 10_000)
            return await asyncio.to_thread(console.schema_diff, subject, old, new)

        return await answer(web, work)

    @app.page("/console/api/dead-letters")
    async def console_dead_letters(web: View, request: Any) -> Any:
        return await answer(web, lambda: asyncio.to_thread(console.dead_letters))

    def action_view(verb: Verb) -> type[View]:
        async def post(self: View, request: Any) -> Any:
            async def work() -> Any:
                operator = console.operator(request.headers.get("Authorization"))
                body = requests.json_body(
                    await request.read(), request.headers.get("Content-Type")
                )
                return await asyncio.to_thread(console.act, verb, operator, body)

            return await answer(self, work)

        return type(f"console_{verb}", (View,), {"post": post})

    app.page("/console/api/dead-letters/redrive")(action_view("redrive"))
    app.page("/console/api/dead-letters/discard")(action_view("discard"))

    async def post_replay(self: View, request: Any) -> Any:
        async def work() -> Any:
            operator = console.operator(request.headers.get("Authorization"))
            body = requests.json_body(
                await request.read(), request.headers.get("Content-Type")
            )
            return await asyncio.to_thread(console.start_replay, operator, body)

        return await answer(self, work)

    app.page("/console/api/replays")(
        type("console_replay", (View,), {"post": post_replay})
    )

    @app.page("/console/api/live")
    async def console_live(web: View, request: Any) -> Any:
        """Server-Sent Events: the processors document, once a second, until the
        browser goes away."""
        response = StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                **SECURITY_HEADERS,
            }
        )
        await response.prepare(request)
        try:
            while True:
                document = await asyncio.to_thread(console.live_document)
                await response.write(f"data: {json.dumps(document)}\n\n".encode())
                await asyncio.sleep(LIVE_S)
        except (ConnectionResetError, RuntimeError):
            # The browser went away (aiohttp raises RuntimeError on a closed
            # transport's write): this stream ends.
            pass
        return response

    return console


async def _now(value: Any) -> Any:
    return value
