"""The OpenAPI 3.1 document of the HTTP commands, generated from the route table and
the commands' Avro schemas, and a self-contained HTML page that renders it.

Nothing here is written per route: each operation's parameters, body, headers and
responses come from its ``Endpoint`` (``app.rest.routes``) and the schemas in
``schemas/``; a new command with a route appears here without a change.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from app.adapters.catalog import SchemaCatalog, short_name
from app.rest.bodies import INT_RANGE, LONG_RANGE, named_types
from app.rest.routes import Endpoint

OPENAPI_VERSION = "3.1.0"
RESULT = "streamfold.CommandResult"
# What a rejection's code answers with; every other code is a 422.
STATUS_OF_CODE = {"ConcurrencyConflict": 409, "AlreadyExists": 409, "NotFound": 404}
# The fields of a command result the HTTP answers leave out (when the writer
# decided it is no part of the answer, as in app.client.CommandResult).
RESULT_LEFT_OUT = ("processed_at",)
MAX_WAIT_S = 120


def document(endpoints: Sequence[Endpoint], catalog: SchemaCatalog) -> dict[str, Any]:
    """The whole OpenAPI document."""
    components = _Components()
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in endpoints:
        route = endpoint.route
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(
            endpoint, components
        )
    result = catalog.parsed(RESULT)
    trimmed = {
        **result,
        "fields": [f for f in result["fields"] if f["name"] not in RESULT_LEFT_OUT],
    }
    components.add_record(trimmed, named_types(result))
    components.schemas[ERROR] = ERROR_SCHEMA
    paths["/commands/{command_id}"] = {"get": _lookup_operation()}
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Streamfold commands",
            "version": "1",
            "description": (
                "Commands over HTTP. Each request is produced to its aggregate's "
                "command topic like any Kafka client's, and answered with the "
                "command's result from command-results. Bodies are the commands' "
                "Avro schemas as plain JSON (a nullable field takes null or its "
                "value); the envelope (command id, user id, expected version) comes "
                "from the headers and the credential, never from the body."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": dict(sorted(components.schemas.items())),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token from STREAMFOLD_API_TOKENS; the "
                    "command's user id is the one the token stands for.",
                }
            },
            "parameters": _HEADERS,
        },
        "security": [{"bearer": []}],
    }


def _operation(endpoint: Endpoint, components: _Components) -> dict[str, Any]:
    route = endpoint.route
    schema = components.schema(endpoint.body, endpoint.named, name=route.name)
    fields = dict(_fields(endpoint))
    parameters: list[dict[str, Any]] = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": components.schema(fields[name], endpoint.named),
            "description": f"The command's {name}.",
        }
        for name in route.path_fields
    ]
    parameters += [{"$ref": f"#/components/parameters/{name}"} for name in _HEADERS]
    success = 201 if route.creates else 200
    operation: dict[str, Any] = {
        "operationId": route.name,
        "summary": route.summary,
        "description": (
            f"Sends {route.name} (Avro {endpoint.record_name}) to "
            f"{endpoint.area}.commands and answers with its result."
        ),
        "tags": [endpoint.area],
        "parameters": parameters,
        "responses": {
            str(success): {
                "description": "Accepted: the events are durable in the log.",
                "headers": {
                    "Location": _header("The aggregate's view."),
                    "ETag": _header('The aggregate\'s new version, e.g. "3".'),
                    "Streamfold-Position": _header(
                        "PARTITION:OFFSET of the last event, for the /query views' "
                        "?after= (read your writes)."
                    ),
                    "Streamfold-Command-Id": _header("The command's id."),
                },
                "content": _json_ref(short_name(RESULT)),
            },
            **_error_responses(),
        },
    }
    if _has_body(endpoint):
        operation["requestBody"] = {
            "required": bool(_required(endpoint.body, endpoint.named)),
            "content": {"application/json": {"schema": schema}},
        }
    return operation


def _lookup_operation() -> dict[str, Any]:
    return {
        "operationId": "GetCommandResult",
        "summary": "A command's result, by command id",
        "description": (
            "Any worker answers for any command whose result is among the newest "
            "STREAMFOLD_API_RESULTS_KEPT written to command-results, whoever sent "
            "it. With Prefer: wait=N it waits up to N seconds for one to arrive."
        ),
        "tags": ["commands"],
        "parameters": [
            {
                "name": "command_id",
                "in": "path",
                "required": True,
                "schema": {"type": "string"},
            },
            {"$ref": "#/components/parameters/Prefer"},
        ],
        "responses": {
            "200": {
                "description": "The result (accepted or rejected: see status).",
                "content": _json_ref(short_name(RESULT)),
            },
            "400": _error("A bad header or path parameter, named in field."),
            "401": _error("No bearer token, or a wrong one."),
            "403": _error("No token is configured: the API is off."),
            "404": _error("No result for this command id (yet)."),
        },
    }


_HEADERS: dict[str, dict[str, Any]] = {
    "IdempotencyKey": {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "minLength": 1, "maxLength": 200},
        "description": (
            "The command id. A request sent again with the same key and the same "
            "body gets the same answer and never a second set of events; with "
            "another body (another command payload, or another aggregate) it is "
            "refused, 422 IdempotencyKeyReused, and nothing is decided. Without it "
            "a new id is made."
        ),
    },
    "IfMatch": {
        "name": "If-Match",
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": (
            'The version the caller saw (an ETag, "3"): the command\'s expected '
            "version. A stale one is answered 409 and writes nothing."
        ),
    },
    "Prefer": {
        "name": "Prefer",
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": (
            f"wait=N (RFC 7240): wait up to N seconds (0 to {MAX_WAIT_S}) for the "
            "result instead of the worker's STREAMFOLD_COMMAND_TIMEOUT."
        ),
    },
}


def _error_responses() -> dict[str, Any]:
    decided = "The command was decided and refused; its result says why (code, "
    return {
        "400": _error(
            "The body, a header or a parameter does not fit; field names it."
        ),
        "401": _error("No bearer token, or a wrong one."),
        "403": _error("No token is configured on this worker: the API is off."),
        "404": _refused(f"{decided}NotFound: no such aggregate)."),
        "409": _refused(
            f"{decided}ConcurrencyConflict: If-Match is stale; or AlreadyExists)."
        ),
        "413": _error(
            "The body, or the command record made of it, is larger than the "
            "worker takes."
        ),
        "415": _error("The body is not sent as application/json."),
        "422": _refused(
            f"{decided}any other code); or the Idempotency-Key was already used "
            "with another body or for another aggregate (an error, code "
            "IdempotencyKeyReused)."
        ),
        "503": _error(
            "Kafka did not take the command, or not for sure: send it again with "
            "the same Idempotency-Key."
        ),
        "504": _error(
            "No result in time: the command may still be decided; "
            "GET /commands/{command_id} later."
        ),
    }


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": _json_ref(ERROR)}


def _refused(description: str) -> dict[str, Any]:
    refs = [{"$ref": f"#/components/schemas/{n}"} for n in (short_name(RESULT), ERROR)]
    return {
        "description": description,
        "content": {"application/json": {"schema": {"anyOf": refs}}},
    }


ERROR = "Error"
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "A request refused before any command was sent.",
    "properties": {
        "error": {"type": "string"},
        "field": {"type": ["string", "null"]},
        "code": {"type": "string"},
        "command_id": {"type": "string"},
    },
    "required": ["error"],
    "additionalProperties": False,
}


def _header(description: str) -> dict[str, Any]:
    return {"description": description, "schema": {"type": "string"}}


def _json_ref(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}


def _fields(endpoint: Endpoint) -> Iterable[tuple[str, Any]]:
    """(name, Avro type) of every field of the route's command, path ones included."""
    whole = endpoint.named[endpoint.record_name]
    return ((f["name"], f["type"]) for f in whole["fields"])


def _has_body(endpoint: Endpoint) -> bool:
    body = endpoint.body
    return not (isinstance(body, dict) and body.get("fields") == [])


def _required(schema: Any, named: Mapping[str, Any]) -> list[str]:
    resolved = named.get(schema, schema) if isinstance(schema, str) else schema
    if isinstance(resolved, dict) and resolved.get("type") == "record":
        return [f["name"] for f in resolved["fields"] if "default" not in f]
    return ["(value)"]


class _Components:
    """The schemas section, filled as operations refer to named types."""

    def __init__(self) -> None:
        self.schemas: dict[str, dict[str, Any]] = {}

    def schema(
        self, avro: Any, named: Mapping[str, Any], *, name: str | None = None
    ) -> dict[str, Any]:
        """The JSON Schema of an Avro type: named types become references."""
        if isinstance(avro, str):
            if avro in named:
                return self.schema(named[avro], named)
            return _primitive(avro)
        if isinstance(avro, list):
            branches = [self.schema(b, named) for b in avro]
            return {"anyOf": branches}
        kind = avro["type"]
        if kind in ("record", "error"):
            return self.add_record(avro, named, name=name)
        if kind == "enum":
            key = short_name(avro["name"])
            self.schemas[key] = {"type": "string", "enum": list(avro["symbols"])}
            return {"$ref": f"#/components/schemas/{key}"}
        if kind == "array":
            return {"type": "array", "items": self.schema(avro["items"], named)}
        if kind == "map":
            return {
                "type": "object",
                "additionalProperties": self.schema(avro["values"], named),
            }
        if avro.get("logicalType") == "timestamp-millis":
            return {"type": "string", "format": "date-time"}
        return self.schema(kind, named)

    def add_record(
        self, avro: dict[str, Any], named: Mapping[str, Any], *, name: str | None = None
    ) -> dict[str, Any]:
        key = name or short_name(avro["name"])
        if key not in self.schemas:
            self.schemas[key] = {}  # a placeholder: a record may refer to itself
            properties: dict[str, Any] = {}
            for field in avro["fields"]:
                prop = self.schema(field["type"], named)
                if "doc" in field:
                    prop = {**prop, "description": field["doc"]}
                if "default" in field:
                    prop = {**prop, "default": field["default"]}
                properties[field["name"]] = prop
            record: dict[str, Any] = {
                "type": "object",
                "properties": properties,
                "required": [f["name"] for f in avro["fields"] if "default" not in f],
                "additionalProperties": False,
            }
            if "doc" in avro:
                record["description"] = avro["doc"]
            if name:
                record["description"] = (
                    f"{short_name(avro['name'])}'s fields that the path does not "
                    "give (Avro " + str(avro["name"]) + ")"
                )
            self.schemas[key] = record
        return {"$ref": f"#/components/schemas/{key}"}


def _primitive(kind: str) -> dict[str, Any]:
    if kind == "int":
        low, high = INT_RANGE
        return {"type": "integer", "format": "int32", "minimum": low, "maximum": high}
    if kind == "long":
        low, high = LONG_RANGE
        return {"type": "integer", "format": "int64", "minimum": low, "maximum": high}
    simple = {
        "null": "null",
        "boolean": "boolean",
        "float": "number",
        "double": "number",
        "string": "string",
    }
    if kind not in simple:
        raise TypeError(f"{kind} has no JSON form in request bodies")
    return {"type": simple[kind]}


# -- the page at /docs --------------------------------------------------------------------


def render_html(doc: Mapping[str, Any]) -> str:
    """A self-contained HTML page of the document: no script, no outside asset."""
    e = html.escape
    schemas = doc["components"]["schemas"]
    parameters = doc["components"]["parameters"]
    out = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{e(doc['info']['title'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(doc['info']['title'])}</h1>",
        f"<p>{e(doc['info']['description'])}</p>",
        "<p>Authenticate with <code>Authorization: Bearer &lt;token&gt;</code>. "
        "The machine-readable document: <a href='/openapi.json'>/openapi.json</a>."
        "</p><h2>Operations</h2>",
    ]
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            anchor = e(op["operationId"])
            out.append(
                f"<section id='{anchor}'><h3><span class='m {e(method)}'>"
                f"{e(method.upper())}</span> <code>{e(path)}</code> "
                f"— {e(op['summary'])}</h3><p>{e(op['description'])}</p>"
            )
            rows = []
            for param in op["parameters"]:
                if "$ref" in param:
                    param = parameters[param["$ref"].rpartition("/")[2]]
                rows.append(
                    (
                        e(param["name"]),
                        e(param["in"]),
                        "yes" if param.get("required") else "",
                        _type_of(param["schema"]),
                        e(param.get("description", "")),
                    )
                )
            out.append(_table(("parameter", "in", "required", "type", ""), rows))
            body = op.get("requestBody")
            if body is not None:
                schema = body["content"]["application/json"]["schema"]
                out.append(f"<p>Body (application/json): {_type_of(schema)}</p>")
            out.append(
                _table(
                    ("status", "meaning"),
                    [
                        (e(code), e(r["description"]))
                        for code, r in op["responses"].items()
                    ],
                )
            )
            out.append("</section>")
    out.append("<h2>Schemas</h2>")
    for name, schema in schemas.items():
        out.append(f"<section id='schema-{e(name)}'><h3>{e(name)}</h3>")
        if "description" in schema:
            out.append(f"<p>{e(schema['description'])}</p>")
        if "properties" in schema:
            required = set(schema.get("required", ()))
            out.append(
                _table(
                    ("field", "type", "required", "default"),
                    [
                        (
                            e(field),
                            _type_of(prop),
                            "yes" if field in required else "",
                            e(json.dumps(prop["default"])) if "default" in prop else "",
                        )
                        for field, prop in schema["properties"].items()
                    ],
                )
            )
        elif "enum" in schema:
            out.append(f"<p>one of {e(', '.join(schema['enum']))}</p>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out)


def _type_of(schema: Mapping[str, Any]) -> str:
    """A schema in a few words of HTML, named types linked to their section."""
    if "$ref" in schema:
        name = html.escape(str(schema["$ref"]).rpartition("/")[2])
        return f"<a href='#schema-{name}'>{name}</a>"
    if "anyOf" in schema:
        return " or ".join(_type_of(b) for b in schema["anyOf"])
    kind = schema.get("type")
    if kind == "array":
        return f"list of {_type_of(schema['items'])}"
    if isinstance(kind, list):
        return " or ".join(html.escape(str(k)) for k in kind)
    text = str(kind)
    if "format" in schema:
        text += f" ({schema['format']})"
    return html.escape(text)


def _table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A table of ``head`` (plain text) and ``rows`` (HTML, escaped by the caller)."""
    lines = ["<table><tr>", *(f"<th>{html.escape(h)}</th>" for h in head), "</tr>"]
    for row in rows:
        lines.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>")
    lines.append("</table>")
    return "".join(lines)


_CSS = """
body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;
color:#222;line-height:1.4}
code{background:#f3f3f3;padding:0 .2em}
table{border-collapse:collapse;margin:.5rem 0 1rem}
td,th{border:1px solid #ccc;padding:.2rem .5rem;text-align:left;vertical-align:top}
th{background:#f6f6f6}
.m{display:inline-block;min-width:4.5em;text-align:center;color:#fff;border-radius:3px;
font-size:.85em;padding:.1em .3em}
.m.post{background:#2a7}.m.get{background:#27a}.m.delete{background:#a33}
section{border-top:1px solid #eee;padding-top:.5rem}
"""
