"""NATS accounts: the streams in one account, each service in an account of its own.

A reply subject is not a publish the server checks: JetStream answers a request (and acks a
publish) on whatever reply subject the client named, and a stream in the same account stores
that answer. So each service's connection lives in an account where only the subjects it may
publish reach the streams' account (``BATON``), through service imports; whatever the server
answers lands in the service's own account and reaches a stream only where the service could
have published itself. Permissions (baton/permissions.py) still apply inside each account.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from baton import permissions

STREAMS_ACCOUNT = "BATON"
JS_ACCOUNT_INFO = "$JS.API.INFO"


def account(service: str) -> str:
    """The account a service's NATS user lives in."""
    return service.upper()


def _within(inner: str, outer: str) -> bool:
    """Whether every subject ``inner`` matches is matched by ``outer`` (wildcards as tokens)."""
    want, got = outer.split("."), inner.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(got) > i
        if i >= len(got) or got[i] == ">" or (token != "*" and token != got[i]):
            return False
    return len(want) == len(got)


def requests(service: str) -> list[str]:
    """What the service sends to the streams' account: its whole publish allow list.

    Importing the account-info request too is what tells nats-server not to give the
    service's account a JetStream API of its own (that one would answer "not enabled"
    first); the user's permissions still refuse the request itself.
    """
    return [*permissions.permissions(service)["publish"]["allow"], JS_ACCOUNT_INFO]


def listens(service: str) -> list[tuple[str, str]]:
    """The core subjects it hears, as (publishing service, subject) stream imports.

    nats-server never passes a message that entered an account through a service import
    on to a stream export, so a listener imports straight from the publisher's account.
    """
    found = []
    for subject in permissions.GRANTS[service].listens:
        for publisher in permissions.SERVICES:
            if publisher == service:
                continue  # its own account's messages reach it without an import
            for published in permissions.GRANTS[publisher].publishes:
                if _within(published, subject):
                    found.append((publisher, published))
                elif _within(subject, published):
                    found.append((publisher, subject))
    return found


def _is_pull(subject: str) -> bool:
    # A pull is answered by many messages (a batch, heartbeats, a final status).
    return subject.startswith("$JS.API.CONSUMER.MSG.NEXT.")


def accounts_block(passwords: Mapping[str, str]) -> str:
    """The nats-server ``accounts`` block: the admin and the streams, then one per service."""
    return "accounts " + json.dumps(accounts_config(passwords), indent=2)


def accounts_config(passwords: Mapping[str, str]) -> dict[str, Any]:
    """The ``accounts`` object: the admin and the streams in ``BATON``, then one per service."""
    services: dict[str, list[str]] = {}
    streams: dict[str, dict[str, list[str]]] = {name: {} for name in permissions.SERVICES}
    for service in permissions.SERVICES:
        for subject in requests(service):
            services.setdefault(subject, []).append(account(service))
        for publisher, subject in listens(service):
            streams[publisher].setdefault(subject, []).append(account(service))
    exports: list[dict[str, Any]] = []
    for subject, takers in services.items():
        entry: dict[str, Any] = {"service": subject, "accounts": sorted(set(takers))}
        if _is_pull(subject):
            entry["response_type"] = "stream"
        exports.append(entry)
    block: dict[str, Any] = {
        STREAMS_ACCOUNT: {
            "jetstream": "enabled",
            "users": [{"user": permissions.ADMIN, "password": passwords[permissions.ADMIN]}],
            "exports": exports,
        }
    }
    for service in permissions.SERVICES:
        block[account(service)] = {
            "users": [
                {
                    "user": service,
                    "password": passwords[service],
                    "permissions": permissions.permissions(service),
                }
            ],
            "imports": [
                *(
                    {"service": {"account": STREAMS_ACCOUNT, "subject": s}}
                    for s in requests(service)
                ),
                *(
                    {"stream": {"account": account(publisher), "subject": s}}
                    for publisher, s in listens(service)
                ),
            ],
            "exports": [
                {"stream": s, "accounts": sorted(set(takers))}
                for s, takers in streams[service].items()
            ],
        }
    return block
