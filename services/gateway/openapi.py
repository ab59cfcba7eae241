"""What ``/openapi.json`` says about each route: bodies, every status, headers, parameters.

Litestar documents a route from its signature; the gateway's routes read their bodies and
headers themselves (the accept path is not even Litestar's, ``fastpath.py``), so each route
decorator adds what it answers with ``**openapi.doc(...)``::

    @get("/api/conversations/{conversation_id:str}/messages",
         **openapi.doc(400, 404, 503, params={"conversation_id": openapi.UUID}))

Every documented error has the body every error has (``ERROR_SCHEMA``, inlined); ``401``
is added to every route with the bearer scheme. A status the route can answer that is not
listed here is a finding of the schema fuzz test (``tests/integration/test_openapi_fuzz.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from litestar.openapi.spec import Components, Operation, SecurityScheme

from services.gateway import pages
from shared import runs

BEARER = "bearer"
API_KEY = "apiKey"
ACTING_USER = "actingUser"
# A bearer token, or a project API key together with the user it acts for.
SECURITY: list[dict[str, list[str]]] = [{BEARER: []}, {API_KEY: [], ACTING_USER: []}]

# The one shape of every error (main.error_body, fastpath._error_body); a route may add fields.
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["status", "code", "message"],
            "properties": {
                "status": {"type": "integer", "description": "the HTTP status, repeated"},
                "code": {"type": "string", "description": "stable, machine-readable"},
                "message": {"type": "string", "description": "for people; may change"},
                "run_status": {
                    "type": "string",
                    "description": "409 run_finished only: the run's final status",
                },
                "limit": {"type": "integer", "description": "429 only: the window's quota"},
                "remaining": {"type": "integer", "description": "429 only: always 0"},
                "reset": {"type": "integer", "description": "429 only: s until it resets"},
                "retry_after": {"type": "integer", "description": "429 only: as Retry-After"},
                "window": {"type": "string", "description": "429 only: `minute` or `hour`"},
            },
        }
    },
}

UUID: dict[str, Any] = {
    "type": "string",
    "format": "uuid",
    "pattern": "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
    "description": "a UUID in its 36-character form; anything else is 400 invalid_id",
}


def limit(maximum: int) -> dict[str, Any]:
    """A page size query parameter (pages.py refuses anything else with 400 invalid_limit)."""
    return {"type": "integer", "minimum": 1, "maximum": maximum}


CURSOR: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": pages.MAX_CURSOR_CHARS,
    "pattern": f"^[A-Za-z0-9_-]{{1,{pages.MAX_CURSOR_CHARS}}}$",
    "description": (
        "an opaque cursor (unpadded base64url) from a previous page; one this API did not hand"
        " out is 400 invalid_cursor, and so are before and after together"
    ),
}

RUN_ID: dict[str, Any] = {
    "type": "string",
    "pattern": f"^{runs.RUN_PREFIX}[0-9a-f]{{8}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{12}}$",
    "description": f"{runs.RUN_PREFIX}<the user message's lower-case uuid>; anything else is 400 invalid_id",
}

_RETRY_AFTER = {
    "description": "seconds to wait before retrying",
    "schema": {"type": "string", "pattern": "^[0-9]+$"},
}

# draft-ietf-httpapi-ratelimit-headers-10: one item per policy window the user has sent in.
RATELIMIT_POLICY = {
    "description": 'the rate windows, e.g. `"minute";q=20;w=60, "hour";q=200;w=3600` (quota '
    "`q` messages per `w` seconds); only windows the user has sent in",
    "schema": {"type": "string"},
}
RATELIMIT = {
    "description": 'room left per window, e.g. `"minute";r=0;t=12` (`r` messages remaining, '
    "`t` seconds until the window resets); the gateway's view, policy counts authoritatively",
    "schema": {"type": "string"},
}

# status: (description, headers of that answer)
ERRORS: dict[int, tuple[str, dict[str, Any]]] = {
    400: (
        "Malformed request: `invalid_id` (a path or body id), `invalid_body`, `invalid_json`, "
        "`invalid_idempotency_key`, `invalid_limit`, `invalid_cursor`, `invalid_query` (a usage "
        "report's group_by, from or to)",
        {},
    ),
    401: (
        "`unauthenticated`: bad, expired or missing bearer token; unknown or revoked API key, "
        "or one without a valid `X-Acting-User`; both a token and a key",
        {},
    ),
    404: ("`not_found`: not the caller's, or no such thing (never 403: nothing leaks)", {}),
    409: (
        "`run_finished`: the run already has a final status (`error.run_status`); tool "
        "approvals: `not_waiting` (the run is not waiting for that call), `already_decided` "
        "(it was answered otherwise), `digest_mismatch` (other arguments than shown), "
        "`approval_expired`",
        {},
    ),
    413: ("`body_too_large` or `content_too_large`", {}),
    422: (
        "`empty_content`, `invalid_content`, or `idempotency_key_reused` (the key was used "
        "with another body); tool approvals: `invalid_decisions`, `duplicate_decision`, "
        "`invalid_reason`, `invalid_digest`; conversations: `invalid_metadata`, `invalid_title`, "
        "`invalid_system_prompt`, `nothing_to_change`",
        {},
    ),
    429: (
        "`rate_limited`: the user is over a rate limit; `error.limit`, `error.remaining`, "
        "`error.reset` (s), `error.retry_after` (s), `error.window`",
        {"Retry-After": _RETRY_AFTER, "RateLimit-Policy": RATELIMIT_POLICY, "RateLimit": RATELIMIT},
    ),
    503: (
        "`database_unavailable`, `broker_unavailable`, `owner_unknown`, `replay_pending`, "
        "`identity_unavailable` (the identity provider's keys cannot be fetched): "
        "nothing was done, retry (`Retry-After` when the gateway knows when)",
        {"Retry-After": _RETRY_AFTER},
    ),
}


def components() -> Components:
    """The schemes every secured route refers to (the error body is inlined in each response)."""
    return Components(
        security_schemes={
            BEARER: SecurityScheme(
                type="http",
                scheme="bearer",
                bearer_format="JWT",
                description="HS256 JWT with claims sub, project, exp (`baton token`), or an "
                "identity provider's RS256/ES256 JWT checked against its JWKS (issuer, audience "
                "and the user and project claims per the gateway's settings)",
            ),
            API_KEY: SecurityScheme(
                type="apiKey",
                name="X-API-Key",
                security_scheme_in="header",
                description="a project API key (`baton apikey create`), for server-to-server "
                "callers; always together with X-Acting-User",
            ),
            ACTING_USER: SecurityScheme(
                type="apiKey",
                name="X-Acting-User",
                security_scheme_in="header",
                description="the user an API key call acts for (`[A-Za-z0-9_-]{1,64}`); usage "
                "and rate limits count per acting user",
            ),
        },
    )


class _Documented(Operation):
    """An operation whose schema gets the route's ``doc(...)`` added to what Litestar found."""

    extra: ClassVar[dict[str, Any]] = {}

    def to_schema(self) -> dict[str, Any]:
        schema = super().to_schema()
        extra = self.extra
        if not extra["secured"]:
            schema["security"] = []  # public: overrides the document's bearer requirement
        responses: dict[str, Any] = schema.setdefault("responses", {})
        for status in extra["errors"]:
            description, headers = ERRORS[status]
            response: dict[str, Any] = {
                "description": description,
                "content": {"application/json": {"schema": ERROR_SCHEMA}},
            }
            if headers:
                response["headers"] = dict(headers)
            responses[str(status)] = response
        for status, override in extra["success"].items():
            responses[str(status)] = override
        if extra["body"] is not None:
            schema["requestBody"] = {
                "required": extra["body_required"],
                "content": {"application/json": {"schema": extra["body"]}},
            }
        parameters: list[dict[str, Any]] = schema.setdefault("parameters", [])
        for param in parameters:
            if param.get("in") in ("path", "query") and param.get("name") in extra["params"]:
                param["schema"] = extra["params"][param["name"]]
        parameters.extend(extra["headers"])
        if not parameters:
            del schema["parameters"]
        return schema


def doc(
    *errors: int,
    params: Mapping[str, dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
    headers: list[dict[str, Any]] | None = None,
    success: Mapping[int, dict[str, Any]] | None = None,
    secured: bool = True,
    body_required: bool = True,
) -> dict[str, Any]:
    """Keyword arguments for a route decorator: its errors, path ids, body, request headers.

    ``errors``: the statuses it may answer besides its success (each with the error body;
    ``401`` is implied when ``secured``). ``params``: JSON Schemas of path parameters by name
    (``UUID``, ``RUN_ID``). ``body``: the JSON request body's schema. ``headers``: OpenAPI
    header parameter objects. ``success``: response objects that replace Litestar's own.
    """
    statuses = sorted({*errors, *([401] if secured else [])})
    unknown = [s for s in statuses if s not in ERRORS]
    if unknown:
        raise ValueError(f"no documented error for {unknown}; add it to openapi.ERRORS")
    extra = {
        "errors": statuses,
        "params": dict(params or {}),
        "body": body,
        "headers": list(headers or []),
        "success": dict(success or {}),
        "secured": secured,
        "body_required": body_required,
    }
    operation = type("DocumentedOperation", (_Documented,), {"extra": extra})
    kwargs: dict[str, Any] = {"operation_class": operation}
    # Security is declared per operation; a public one says so with an empty requirement list.
    kwargs["security"] = SECURITY if secured else []
    return kwargs


def json_success(description: str, schema: dict[str, Any], **headers: Any) -> dict[str, Any]:
    """A success response object with a JSON body (and optional response headers)."""
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if headers:
        response["headers"] = {name.replace("_", "-"): h for name, h in headers.items()}
    return response


EVENT_STREAM: dict[str, Any] = {
    "description": "Server-Sent Events (`message`, `token`, `run.status`, …) until the client "
    "leaves; resume with `Last-Event-ID`",
    # Each event as schemathesis (and any SSE parser) reads it: fields of one event block.
    "content": {
        "text/event-stream": {
            "schema": {
                "type": "object",
                "properties": {
                    "event": {"type": "string"},
                    "id": {"type": "string"},
                    "data": {"type": "string"},
                    "retry": {"type": "integer"},
                },
            }
        }
    },
}


# What Python's str.isspace() calls whitespace (parse_chat strips it), as a regex class.
_SPACE = r"\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


def chat_body(max_chars: int) -> dict[str, Any]:
    """``POST /api/chat``'s body, exactly as ``core.parse_chat`` accepts it."""
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["content"],
        "properties": {
            "content": {
                "type": "string",
                "minLength": 1,
                "maxLength": max_chars,
                # Not only whitespace (422 empty_content), no NUL (422 invalid_content).
                "pattern": rf"^[^\x00]*[^\x00{_SPACE}][^\x00]*$",
            },
            "conversation_id": {
                "anyOf": [UUID, {"type": "null"}],
                "description": "an existing conversation of the caller's, or a new one's id of "
                "the client's choosing; none: a new conversation",
            },
        },
    }


def idempotency_key(max_chars: int) -> dict[str, Any]:
    return {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": "a retry with the same key and body gets the original answer "
        "(`Idempotent-Replayed: true`); another body under it is 422",
        "schema": {"type": "string", "pattern": rf"^[\x21-\x7e]{{1,{max_chars}}}$"},
    }


LAST_EVENT_ID: list[dict[str, Any]] = [
    {
        "name": "Last-Event-ID",
        "in": "header",
        "required": False,
        "description": "the last event id seen: replay what came after it",
        "schema": {"type": "string"},
    },
    {
        "name": "last_event_id",
        "in": "query",
        "required": False,
        "description": "as Last-Event-ID, for clients that cannot set headers",
        "schema": {"type": "string"},
    },
]

_MESSAGE: dict[str, Any] = {
    "type": "object",
    "required": ["id", "conversation_id", "role", "content", "created_at"],
    "properties": {
        "id": UUID,
        "conversation_id": UUID,
        "role": {"type": "string"},
        "content": {"type": "string"},
        "created_at": {"type": "string", "format": "date-time"},
        "run_id": RUN_ID,
    },
}

ACCEPTED = json_success(
    "Accepted: the message is in JetStream (a duplicate: the original)",
    {
        "type": "object",
        "required": ["status", "duplicate", "message"],
        "properties": {
            "status": {"type": "string", "enum": ["accepted"]},
            "duplicate": {"type": "boolean"},
            "message": _MESSAGE,
        },
    },
    Idempotent_Replayed={
        "description": "`true` when this answers a retry with the original",
        "schema": {"type": "string", "enum": ["true"]},
    },
    RateLimit_Policy=RATELIMIT_POLICY,
    RateLimit=RATELIMIT,
)

CANCELLING = json_success(
    "The cancel request is in JetStream; policy decides",
    {
        "type": "object",
        "required": ["status", "run_id", "run_status", "duplicate"],
        "properties": {
            "status": {"type": "string", "enum": ["cancelling"]},
            "run_id": RUN_ID,
            "run_status": {"type": "string"},
            "duplicate": {"type": "boolean"},
        },
    },
)


_TOOL_CALL_ID: dict[str, Any] = {
    "type": "string",
    "pattern": "^[A-Za-z0-9_-]{1,128}$",
    "description": "the call's id (the model's tool_use id), as `tool.requested` and `/state` "
    "show it; anything else is 400 invalid_id",
}
_DIGEST: dict[str, Any] = {"type": "string", "pattern": "^[0-9a-f]{64}$"}

APPROVALS_BODY: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["decisions"],
    "properties": {
        "decisions": {
            "type": "array",
            "minItems": 1,
            "maxItems": 64,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["tool_call_id", "approve"],
                "properties": {
                    "tool_call_id": _TOOL_CALL_ID,
                    "approve": {"type": "boolean"},
                    "reason": {
                        "type": "string",
                        "maxLength": 1000,
                        "pattern": "^[^\\x00]*$",
                        "description": "why (kept with the decision; a denial's reason "
                        "reaches the model)",
                    },
                    "input_digest": {
                        **_DIGEST,
                        "description": "the digest of the arguments shown (optional): "
                        "another one is 409 digest_mismatch",
                    },
                },
            },
        }
    },
}

APPROVALS_ACCEPTED = json_success(
    "Every decision is in JetStream (a repeat of a recorded one: `duplicate`); policy acts",
    {
        "type": "object",
        "required": ["status", "run_id", "decisions"],
        "properties": {
            "status": {"type": "string", "enum": ["accepted"]},
            "run_id": RUN_ID,
            "decisions": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["tool_call_id", "approve", "input_digest", "duplicate"],
                    "properties": {
                        "tool_call_id": _TOOL_CALL_ID,
                        "approve": {"type": "boolean"},
                        "input_digest": _DIGEST,
                        "duplicate": {"type": "boolean"},
                    },
                },
            },
        },
    },
)


# ---- conversations: create, change, delete (services/gateway/conversation_routes.py) -------
_NULL = {"type": "null"}
_TITLE = {
    "anyOf": [
        {"type": "string", "maxLength": 200, "pattern": "^[^\\x00-\\x1f\\x7f]*$"},
        _NULL,
    ],
    "description": "at most 200 characters, no control characters (null: unchanged / none)",
}
_METADATA = {
    "anyOf": [{"type": "object", "maxProperties": 32}, _NULL],
    "description": "any JSON object of at most 32 keys and 4096 bytes (else 422 "
    "invalid_metadata); replaced whole by a PATCH (null: unchanged / none)",
}

CREATE_CONVERSATION: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "title": _TITLE,
        "model": {
            "anyOf": [{"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,64}$"}, _NULL],
            "description": "the model its runs should use; policy decides whether the project "
            "allows it (`settings.model_allowed`, `settings.model_reason`); null: policy's choice",
        },
        "system_prompt": {
            "anyOf": [
                {"type": "string", "minLength": 1, "maxLength": 8000, "pattern": "^[^\\x00]*$"},
                _NULL,
            ],
            "description": "sent as the system prompt of every answer in this conversation "
            "(null: the deployment's default)",
        },
        "metadata": _METADATA,
    },
}

PATCH_CONVERSATION: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "minProperties": 1,
    "properties": {"title": _TITLE, "metadata": _METADATA},
    "description": "a title, metadata (replaced whole), or both; nothing to change (`{}`, or "
    "only nulls) is 422 nothing_to_change",
}

CONVERSATION: dict[str, Any] = {
    "type": "object",
    "required": [
        "id",
        "title",
        "created_at",
        "last_activity_at",
        "message_count",
        "metadata",
        "settings",
        "pending",
    ],
    "properties": {
        "id": UUID,
        "title": {"type": "string"},
        "created_at": {"type": "string", "format": "date-time"},
        "last_activity_at": {"type": "string", "format": "date-time"},
        "message_count": {"type": "integer"},
        "metadata": {"type": "object"},
        "settings": {
            "type": "object",
            "properties": {
                "model": {"type": ["string", "null"]},
                "system_prompt": {"type": ["string", "null"]},
                "model_allowed": {"type": ["boolean", "null"]},
                "model_reason": {"type": "string"},
            },
        },
        "pending": {"type": "boolean", "description": "not stored yet (read your writes)"},
    },
}

CONVERSATION_ACCEPTED = json_success(
    "Accepted: the creation is in JetStream (a retry with the same Idempotency-Key: the original)",
    {
        "type": "object",
        "required": ["status", "duplicate", "conversation"],
        "properties": {
            "status": {"type": "string", "enum": ["accepted"]},
            "duplicate": {"type": "boolean"},
            "conversation": CONVERSATION,
        },
    },
    Idempotent_Replayed={
        "description": "`true` when this answers a retry with the original",
        "schema": {"type": "string", "enum": ["true"]},
    },
)

CONVERSATION_CHANGED = json_success(
    "Accepted: the change is in JetStream; the conversation as it now reads",
    {
        "type": "object",
        "required": ["status", "conversation"],
        "properties": {
            "status": {"type": "string", "enum": ["accepted"]},
            "conversation": CONVERSATION,
        },
    },
)

DELETING = json_success(
    "Accepted: the deletion is in JetStream; every read is 404 from now on, the content is "
    "removed from Postgres and every stream in the background (`duplicate`: deleted before)",
    {
        "type": "object",
        "required": ["status", "conversation_id", "duplicate"],
        "properties": {
            "status": {"type": "string", "enum": ["deleting"]},
            "conversation_id": UUID,
            "duplicate": {"type": "boolean"},
        },
    },
)
