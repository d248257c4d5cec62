"""``/graphql`` on the worker's web server: strawberry's aiohttp view behind a Faust
page (Faust's aiohttp driver hands its handlers aiohttp's own request, and passes
back what they return, a WebSocket response included).

POST (and GET, for queries) speak GraphQL over HTTP; a WebSocket upgrade speaks
graphql-transport-ws for the subscription. No GraphQL IDE is served: it would load
its scripts from elsewhere, which the worker's pages never do.
"""

from __future__ import annotations

import json
from typing import Any

import faust
from aiohttp import web
from faust.web import View
from strawberry.aiohttp.views import GraphQLView
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL

from app import params as checked
from app.adapters.codec import Codec
from app.graphql.schema import Context, Services, build
from app.readside import ReadSide
from app.rest.routes import Endpoint
from app.rest.web import CommandApi
from app.settings import Settings

PATH = "/graphql"
# Each subscription holds a Kafka consumer and a thread of its own.
MAX_SUBSCRIPTIONS_PER_CONNECTION = 10


class StreamfoldGraphQLView(GraphQLView[Context, None]):
    """Strawberry's view with Streamfold's context: the worker's services and the
    request's ``Authorization`` header (a mutation checks it, as HTTP commands do)."""

    def __init__(self, services: Services, endpoints: tuple[Endpoint, ...]) -> None:
        super().__init__(
            build(endpoints),
            graphql_ide=None,
            subscription_protocols=(GRAPHQL_TRANSPORT_WS_PROTOCOL,),
            max_subscriptions_per_connection=MAX_SUBSCRIPTIONS_PER_CONNECTION,
        )
        self.services = services

    def decode_json(self, data: str | bytes) -> object:
        return decode_request(data)

    def parse_query_params(self, params: Any) -> dict[str, Any]:
        return super().parse_query_params(without_nulls(params))

    async def get_context(
        self, request: web.Request, response: web.Response | web.WebSocketResponse
    ) -> Context:
        return Context(self.services, request.headers.get("Authorization"))


def without_nulls(params: Any) -> dict[str, Any]:
    """A GET's query parameters with ``variables=null`` (or ``extensions``) taken
    as none given: ``decode_request`` takes objects only, as a body must be."""
    return {
        name: value
        for name, value in dict(params).items()
        if not (name in ("variables", "extensions") and value == "null")
    }


def decode_request(data: str | bytes) -> object:
    """A request's JSON as strawberry reads it: an object, or a list of them (a
    batch). Anything else is refused as not JSON, which strawberry answers with 400
    over HTTP and by closing a WebSocket (4400), never by failing on it later."""
    try:
        value = checked.client_json(data)
    except checked.NotJson as error:
        raise json.JSONDecodeError(f"the request {error}", "", 0) from None
    if not isinstance(value, dict | list):
        raise json.JSONDecodeError("not a JSON object", "", 0)
    return value


def register(
    app: faust.App,
    settings: Settings,
    read: ReadSide,
    api: CommandApi,
    codec: Codec,
    endpoints: tuple[Endpoint, ...],
) -> None:
    """``/graphql`` on ``app``."""
    services = Services(settings=settings, read=read, api=api, codec=codec)
    graphql = StreamfoldGraphQLView(services, endpoints)

    class GraphQLPage(View):
        """GraphQL over HTTP and graphql-transport-ws."""

        async def get(self, request: Any) -> Any:
            return await graphql(request)

        async def post(self, request: Any) -> Any:
            return await graphql(request)

    app.page(PATH)(GraphQLPage)
