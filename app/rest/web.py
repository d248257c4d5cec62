"""The HTTP commands on the worker's web server: one handler serves every route of
``app.rest.routes``; ``GET /commands/{command_id}``, ``/openapi.json`` and ``/docs``.

A command request is checked in this order, and the first problem answers: the API
is on (a token is configured: else 403), the caller's token (401), the query string,
headers and body (400, 415), then the command goes to Kafka through the worker's
``CommandGateway`` and its result answers (see ``status_and_headers``). A decided command is
answered with its result, accepted or refused; anything refused before it was sent
with ``{"error", "field"}``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import faust
from aiohttp.web import HTTPRequestEntityTooLarge
from faust.web import View

from app import params as checked
from app.adapters.catalog import SchemaCatalog
from app.adapters.codec import EncodeError, RegistryError
from app.adapters.eventlog import CommandResult, result_fields
from app.adapters.gateway import (
    CommandGateway,
    CommandTooLarge,
    GatewayError,
    KeyReused,
)
from app.client import CommandTimeout, new_envelope
from app.domain.errors import MAX_REFERENCE_LENGTH
from app.rest import openapi, requests
from app.rest.auth import Credentials, Unauthorized
from app.rest.bodies import BodyError
from app.rest.routes import Endpoint, endpoints
from app.settings import Settings

log = logging.getLogger("streamfold.rest")

COMMAND_ID_HEADER = "Streamfold-Command-Id"
POSITION_HEADER = "Streamfold-Position"


class Refused(Exception):
    """A request answered before any command is sent: ``status`` and a body."""

    def __init__(
        self,
        status: int,
        error: str,
        *,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
        **more: str,
    ) -> None:
        super().__init__(error)
        self.status = status
        self.body: dict[str, Any] = {"error": error, "field": field, **more}
        self.headers = dict(headers or {})


def result_body(result: CommandResult) -> dict[str, Any]:
    """A command result as the HTTP answers carry it: the fields of the Avro
    ``CommandResult`` but when it was processed."""
    return result_fields(result, result.partition, result.offset)


def result_headers(result: CommandResult) -> dict[str, str]:
    headers = {COMMAND_ID_HEADER: result.command_id}
    if result.accepted and result.version is not None:
        headers["ETag"] = f'"{result.version}"'
    if result.partition is not None and result.offset is not None:
        headers[POSITION_HEADER] = f"{result.partition}:{result.offset}"
    return headers


def status_and_headers(
    endpoint: Endpoint, result: CommandResult
) -> tuple[int, dict[str, str]]:
    """The status and headers a decided command is answered with."""
    headers = result_headers(result)
    if not result.accepted:
        return openapi.STATUS_OF_CODE.get(result.code or "", 422), headers
    headers["Location"] = endpoint.location(result.aggregate_id)
    return (201 if endpoint.route.creates else 200), headers


class CommandApi:
    """What the handlers share: the settings, the credentials and the gateway."""

    def __init__(self, settings: Settings, gateway: CommandGateway | None) -> None:
        self.settings = settings
        self.credentials = Credentials(settings.api_tokens)
        self.gateway = gateway

    def caller(self, request: Any) -> str:
        """The user id of the request's credential; refuses when the API is off
        (no token configured) or the credential is missing or wrong."""
        return self.user_of(request.headers.get("Authorization"))

    def user_of(self, authorization: str | None) -> str:
        """The user id of an ``Authorization`` header's bearer token; ``Refused``
        (403, 401) as ``caller`` says."""
        if not self.credentials.enabled or self.gateway is None:
            raise Refused(
                403,
                "commands over HTTP are off on this worker: no token is configured "
                "(set STREAMFOLD_API_TOKENS=user_id:token,...); the read views are "
                "open",
            )
        try:
            return self.credentials.user_id(authorization)
        except Unauthorized as error:
            raise Refused(
                401,
                error.message,
                field="Authorization",
                headers={"WWW-Authenticate": error.challenge},
            ) from None

    async def command(
        self, endpoint: Endpoint, request: Any
    ) -> tuple[int, Any, dict[str, str]]:
        user_id = self.caller(request)
        assert self.gateway is not None  # caller() refuses without one
        headers = request.headers
        checked.accepted(request.query.items(), ())
        command_id = requests.idempotency_key(headers.get("Idempotency-Key"))
        expected = requests.expected_version(headers.get("If-Match"))
        wait = requests.prefer_wait(headers.get("Prefer"))
        try:
            raw = await request.read()
        except HTTPRequestEntityTooLarge as error:
            raise Refused(413, f"the body is too large: {error.text}") from None
        try:
            body = requests.json_body(raw, headers.get("Content-Type"))
        except requests.UnsupportedMediaType as error:
            raise Refused(415, str(error), field="Content-Type") from None
        result = await self.send(
            endpoint,
            request.match_info,
            body,
            user_id=user_id,
            command_id=command_id,
            expected_version=expected,
            wait=wait,
        )
        status, extra = status_and_headers(endpoint, result)
        return status, result_body(result), extra

    async def send(
        self,
        endpoint: Endpoint,
        path_params: Mapping[str, str],
        body: Any,
        *,
        user_id: str,
        command_id: str | None,
        expected_version: int | None,
        wait: float | None,
    ) -> CommandResult:
        """Send ``endpoint``'s command, made of ``path_params`` and ``body``, as
        ``user_id`` (whose credential the caller checked), and wait for its result:
        the one way a command goes from a request to Kafka (HTTP routes and GraphQL
        mutations). Raises ``Refused``, ``BadParameter`` or ``BodyError`` when
        nothing was decided."""
        assert self.gateway is not None  # user_of() refuses without one
        command = endpoint.command(path_params, body)
        envelope = new_envelope(
            command_id=command_id, user_id=user_id, expected_version=expected_version
        )
        command_id = str(envelope["command_id"])
        try:
            return await self.gateway.send(
                command,
                envelope,
                wait=self.settings.command_timeout_s if wait is None else wait,
            )
        except CommandTimeout as error:
            raise Refused(
                504,
                f"{error}; GET /commands/{command_id} for it later",
                headers={COMMAND_ID_HEADER: command_id},
                command_id=command_id,
            ) from None
        except KeyReused as error:
            raise Refused(
                422,
                str(error),
                field="Idempotency-Key",
                code="IdempotencyKeyReused",
                command_id=command_id,
            ) from None
        except EncodeError as error:
            raise Refused(400, str(error)) from None
        except CommandTooLarge as error:
            raise Refused(413, str(error), command_id=command_id) from None
        except (GatewayError, RegistryError) as error:
            raise Refused(
                503,
                f"{error}; send it again with Idempotency-Key: {command_id}",
                command_id=command_id,
            ) from None

    async def lookup(
        self, command_id: str, request: Any
    ) -> tuple[int, Any, dict[str, str]]:
        self.caller(request)
        assert self.gateway is not None
        checked.accepted(request.query.items(), ())
        # A command id may be one the saga made, longer than a client's.
        checked.identifier(command_id, "command_id", MAX_REFERENCE_LENGTH)
        wait = requests.prefer_wait(request.headers.get("Prefer")) or 0
        result = await self.gateway.result(command_id, wait=wait)
        if result is None:
            raise Refused(
                404,
                f"no result for command {command_id} among the newest "
                f"{self.settings.api_results_kept} this worker keeps: it may not be "
                "decided yet, or be older",
                field="command_id",
                command_id=command_id,
            )
        return 200, result_body(result), result_headers(result)


async def respond(
    view: View, handled: Awaitable[tuple[int, Any, dict[str, str]]]
) -> Any:
    """Turn what a handler returned or raised into the response."""
    try:
        status, body, headers = await handled
    except Refused as refused:
        status, body, headers = refused.status, refused.body, refused.headers
    except (checked.BadParameter, BodyError) as error:
        # The whole sentence ("items[0].quantity: expected a whole number, got
        # 'two'") and the field on its own, for a program.
        status, body, headers = 400, {"error": str(error), "field": error.field}, {}
    except Exception:
        reference = str(uuid.uuid4())
        log.exception("HTTP command failed (correlation id %s)", reference)
        status = 500
        body = {"error": "internal error", "correlation_id": reference}
        headers = {}
    return view.json(body, status=status, headers=headers)


def register(
    app: faust.App,
    settings: Settings,
    gateway: CommandGateway | None,
    catalog: SchemaCatalog,
) -> tuple[CommandApi, tuple[Endpoint, ...]]:
    """The command routes, the result lookup and the API's documents, on ``app``;
    the API and its endpoints, for the GraphQL mutations to send commands the same
    way."""
    api = CommandApi(settings, gateway)
    table = endpoints(catalog)
    by_path: dict[str, dict[str, Endpoint]] = {}
    for endpoint in table:
        by_path.setdefault(endpoint.route.path, {})[endpoint.route.method] = endpoint
    for path, methods in by_path.items():
        app.page(path)(_view(api, path, methods))

    @app.page("/commands/{command_id}")
    async def get_command_result(web: View, request: Any, command_id: str) -> Any:
        return await respond(web, api.lookup(command_id, request))

    document = openapi.document(table, catalog)
    page = openapi.render_html(document)

    @app.page("/openapi.json")
    async def openapi_json(web: View, request: Any) -> Any:
        return web.json(document)

    @app.page("/docs")
    async def docs(web: View, request: Any) -> Any:
        return web.html(page)

    return api, table


def _view(api: CommandApi, path: str, methods: Mapping[str, Endpoint]) -> type[View]:
    """A Faust view serving ``methods`` (HTTP method → endpoint) on ``path``."""

    def handler(endpoint: Endpoint) -> Callable[..., Awaitable[Any]]:
        async def serve(self: View, request: Any, **_: str) -> Any:
            return await respond(self, api.command(endpoint, request))

        serve.__doc__ = endpoint.route.summary
        return serve

    name = "_".join(endpoint.route.name for endpoint in methods.values())
    attributes: dict[str, Any] = {
        method.lower(): handler(endpoint) for method, endpoint in methods.items()
    }
    return type(name, (View,), attributes)
