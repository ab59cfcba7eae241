"""``POST /api/conversations``, ``PATCH`` and ``DELETE /api/conversations/{id}``.

Each answers ``202`` once JetStream has the request (the persister stores it, policy decides
on a requested model); reads show it at once. A deleted conversation is ``404`` on every
route from the moment its ``DELETE`` is answered, for good: its id is never taken again.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec
import nats.errors
from litestar import Request, Response, delete, patch, post, route
from litestar.params import FromPath
from litestar.routes import HTTPRoute

from services.gateway import core, lifecycle, openapi, pages
from services.gateway.adapters import topic
from services.gateway.handlers import Api
from shared import deletion
from shared import messages as m

_TRANSPORT = (nats.errors.Error, TimeoutError, OSError)


def _unavailable() -> core.ApiError:
    return core.ApiError(
        503, "broker_unavailable", "message broker unavailable, retry", {"Retry-After": "1"}
    )


async def _body(request: Request[Any, Any, Any], api: Api) -> bytes:
    body = await request.body()
    if len(body) > api.settings.max_body_bytes:
        raise core.ApiError(413, "body_too_large", "the body is too large")
    return body


async def create(api: Api, request: Request[Any, Any, Any]) -> Response[Any]:
    p = await api.principal(request)
    key = core.check_idempotency_key(
        request.headers.get("idempotency-key"), api.settings.max_idempotency_key_chars
    )
    body = lifecycle.parse_create(await _body(request, api))
    cid = lifecycle.conversation_id_for(p, key, api.id_key)
    event = m.ConversationChanged(
        event_id=f"convcreate:{cid}",
        message_id="",
        conversation_id=cid,
        project_id=p.project,
        user_id=p.user,
        op="create",
        title=body.title,
        metadata=body.metadata,
        model=body.model,
        system_prompt=body.system_prompt,
        at=datetime.now(UTC),
    )
    if key is not None:
        # A retry (its id is the first one's): the same conversation, or a reused key.
        owner = await api.owners.of(cid)
        if owner.deleted or (owner.owner is not None and owner.owner != p):
            raise core.ApiError(404, "not_found", core.NOT_FOUND)
    if not api.publisher.bus.nc.is_connected:
        raise _unavailable()
    try:
        duplicate = await api.publisher.change(event, create=True)
        first = await api.log.creation(cid) if duplicate else None
    except _TRANSPORT as exc:
        raise _unavailable() from exc
    if first is not None and not lifecycle.same_create(first[0], event):
        raise core.ApiError(
            422,
            "idempotency_key_reused",
            "this Idempotency-Key was already used with a different request body",
        )
    view = await api.view(p, cid) if duplicate else _created(event)
    headers = {"Idempotent-Replayed": "true"} if duplicate else {}
    return Response(
        {"status": "accepted", "duplicate": duplicate, "conversation": msgspec.to_builtins(view)},
        status_code=202,
        headers=headers,
    )


def _created(e: m.ConversationChanged) -> pages.Conversation:
    return msgspec.convert(lifecycle.created_row(e, e.at), pages.Conversation)


async def change(api: Api, request: Request[Any, Any, Any], conversation_id: str) -> Response[Any]:
    p = await api.principal(request)
    cid = await api.own(p, conversation_id)
    body = lifecycle.parse_patch(await _body(request, api))
    event = m.ConversationChanged(
        event_id=f"convupdate:{cid}:{uuid.uuid4()}",
        message_id="",
        conversation_id=cid,
        project_id=p.project,
        user_id=p.user,
        op="update",
        title=body.title,
        metadata=body.metadata,
        at=datetime.now(UTC),
    )
    if not api.publisher.bus.nc.is_connected:
        raise _unavailable()
    try:
        await api.publisher.change(event, create=False)
    except _TRANSPORT as exc:
        raise _unavailable() from exc
    view = await api.view(p, cid)
    return Response(
        {"status": "accepted", "conversation": msgspec.to_builtins(view)}, status_code=202
    )


async def remove(api: Api, request: Request[Any, Any, Any], conversation_id: str) -> Response[Any]:
    p = await api.principal(request)
    cid = pages.path_id(conversation_id)
    owner = await api.owners.of(cid)
    if owner.owner != p:
        core.may_read(owner, p)  # 404 (someone else's, or nobody's), or 503 (cannot tell)
    duplicate = owner.deleted
    if not duplicate:
        if not api.publisher.bus.nc.is_connected:
            raise _unavailable()
        request_ = deletion.delete_request(p.project, cid, owner=p.user, requested_by=p.user)
        try:
            duplicate = await api.publisher.delete(request_)
        except _TRANSPORT as exc:
            raise _unavailable() from exc
    # This replica's open streams end before the answer (the others' as the tombstone reaches
    # them): none of them sends anything after the 202.
    api.hub.end_conversation(topic(p.project, cid))
    return Response(
        {"status": "deleting", "conversation_id": cid, "duplicate": duplicate}, status_code=202
    )


def _options(path: str) -> Any:
    """An OPTIONS answer listing every method of ``path`` as the app has it. Litestar builds
    its own when a path's first handler is registered and keeps it when more handlers join,
    with the first handler's methods only; this one is registered first, so it is the one."""

    @route(path, http_method=["OPTIONS"], include_in_schema=False, name=f"options {path}")
    async def options(request: Request[Any, Any, Any]) -> Response[None]:
        methods = {
            method
            for r in request.app.routes
            if isinstance(r, HTTPRoute) and r.path == path
            for method in r.methods
        }
        return Response(None, status_code=204, headers={"Allow": ", ".join(sorted(methods))})

    return options


def routes(api: Api) -> list[Any]:
    """Litestar route handlers bound to one Api instance (registered before the other routes
    of their paths: see ``_options``)."""
    cid = {"conversation_id": openapi.UUID}

    @post(
        "/api/conversations",
        status_code=202,
        summary="Create a conversation with its settings (202: JetStream has it)",
        **openapi.doc(
            400,
            404,
            413,
            422,
            503,
            body=openapi.CREATE_CONVERSATION,
            headers=[openapi.idempotency_key(api.settings.max_idempotency_key_chars)],
            success={202: openapi.CONVERSATION_ACCEPTED},
            body_required=False,  # no body: a conversation with the defaults
        ),
    )
    async def create_conversation(request: Request[Any, Any, Any]) -> Response[Any]:
        return await create(api, request)

    @patch(
        "/api/conversations/{conversation_id:str}",
        status_code=202,
        summary="Change a conversation's title or metadata (202: JetStream has it)",
        **openapi.doc(
            400,
            404,
            413,
            422,
            503,
            params=cid,
            body=openapi.PATCH_CONVERSATION,
            success={202: openapi.CONVERSATION_CHANGED},
        ),
    )
    async def patch_conversation(
        request: Request[Any, Any, Any], conversation_id: FromPath[str]
    ) -> Response[Any]:
        return await change(api, request, conversation_id)

    @delete(
        "/api/conversations/{conversation_id:str}",
        status_code=202,
        summary="Delete a conversation for good (202: JetStream has it; idempotent)",
        **openapi.doc(400, 404, 503, params=cid, success={202: openapi.DELETING}),
    )
    async def delete_conversation(
        request: Request[Any, Any, Any], conversation_id: FromPath[str]
    ) -> Response[Any]:
        return await remove(api, request, conversation_id)

    return [
        _options("/api/conversations"),
        _options("/api/conversations/{conversation_id:str}"),
        create_conversation,
        patch_conversation,
        delete_conversation,
    ]
