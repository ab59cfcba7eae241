"""Per-service NATS users and their narrowest permissions, derived from shared/wiring.py."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import msgspec

from baton import private
from shared import subjects, wiring

ADMIN = "admin"
SERVICES = tuple(wiring.WIRING)
PASSWORDS_FILE = "nats_passwords.json"

# Nobody but the admin may create, change or delete streams and consumers (I5): a user allowed
# these could route around its subject permissions, e.g. by adding a subject to a stream.
ADMIN_ONLY = (
    "$JS.API.STREAM.CREATE.>",
    "$JS.API.STREAM.UPDATE.>",
    "$JS.API.STREAM.DELETE.>",
    "$JS.API.STREAM.PURGE.>",
    "$JS.API.STREAM.MSG.DELETE.>",
    "$JS.API.CONSUMER.CREATE.>",
    "$JS.API.CONSUMER.DURABLE.CREATE.>",
    "$JS.API.CONSUMER.DELETE.>",
)
ANY = ("*", "*")  # project and conversation tokens


class Grant(msgspec.Struct, frozen=True):
    """What one service does on the bus, in the terms of shared/subjects.py."""

    publishes: tuple[str, ...] = ()
    consumers: tuple[subjects.ConsumerSpec, ...] = ()
    listens: tuple[str, ...] = ()  # core subscriptions
    reads_streams: tuple[str, ...] = ()  # get a stored message by sequence
    buckets: tuple[str, ...] = ()
    reads_buckets: tuple[str, ...] = ()  # get only: no put, create or update
    purges_streams: tuple[str, ...] = ()  # purge with a subject filter (deletion)


# Derived from the one table of the wiring, so the grants cannot drift from what runs.
GRANTS: dict[str, Grant] = {
    name: Grant(
        publishes=w.publishes,
        consumers=w.consumers,
        listens=w.listens,
        reads_streams=w.reads_streams,
        buckets=w.buckets,
        reads_buckets=w.reads_buckets,
        purges_streams=w.purges_streams,
    )
    for name, w in wiring.WIRING.items()
}


def permissions(service: str) -> dict[str, Any]:
    """The nats-server ``permissions`` object of one service's user."""
    grant = GRANTS[service]
    publish = list(grant.publishes)
    for spec in grant.consumers:
        stream, durable = spec.stream, spec.durable
        publish += [
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",  # fetch
            f"$JS.API.CONSUMER.INFO.{stream}.{durable}",  # the provisioned ack_wait
            f"$JS.ACK.{stream}.{durable}.>",  # ack, nak, in-progress, term
            subjects.dead_letter(stream, durable),
        ]
    for stream in grant.reads_streams:
        publish.append(f"$JS.API.STREAM.MSG.GET.{stream}")
    for bucket in (*grant.buckets, *grant.reads_buckets):
        kv = f"KV_{bucket}"
        if bucket in grant.buckets:
            publish.append(f"$KV.{bucket}.>")  # create and update: publishes with a revision
        publish += [
            f"$JS.API.STREAM.INFO.{kv}",  # js.key_value() looks the bucket up
            f"$JS.API.DIRECT.GET.{kv}",  # get by revision
            f"$JS.API.DIRECT.GET.{kv}.>",  # get the latest by key
            f"$JS.API.STREAM.MSG.GET.{kv}",  # get when direct get is off
        ]
    for stream in grant.purges_streams:
        publish.append(f"$JS.API.STREAM.PURGE.{stream}")
    # A deny always wins over an allow: a purging service is denied every other stream's purge.
    deny = [d for d in ADMIN_ONLY if not (grant.purges_streams and d == "$JS.API.STREAM.PURGE.>")]
    if grant.purges_streams:
        deny += [
            f"$JS.API.STREAM.PURGE.{s.name}"
            for s in subjects.STREAMS
            if s.name not in grant.purges_streams
        ]
    if subjects.exec_task(*ANY) not in grant.publishes:
        deny.append("exec.task.>")
    if subjects.exec_abort(*ANY) not in grant.publishes:
        deny.append("exec.abort.>")
    if subjects.tool_task(*ANY) not in grant.publishes:
        deny.append("tool.task.>")
    return {
        "publish": {"allow": publish, "deny": deny},
        "subscribe": {"allow": [*grant.listens, subjects.inbox_prefix(service) + ".>"]},
    }


def authorization(passwords: dict[str, str]) -> str:
    """nats-server's users: the admin with the streams, each service in an account of its own.

    The users and their permissions are the ones above; the accounts (baton/accounts.py) keep
    a server's answer to a reply subject out of the streams a service may not publish to.
    """
    from baton import accounts  # it builds on this module's grants

    return accounts.accounts_block(passwords)


def new_passwords() -> dict[str, str]:
    return {name: secrets.token_urlsafe(24) for name in (ADMIN, *SERVICES)}


def passwords_for(data_dir: Path) -> dict[str, str]:
    """The data dir's NATS passwords, created on first use and readable only by its owner."""
    path = data_dir / PASSWORDS_FILE
    if not path.exists():
        private.make_dir(data_dir)
        private.create_once(path, json.dumps(new_passwords()))
    stored: dict[str, str] = json.loads(path.read_text())
    missing = {n for n in (ADMIN, *SERVICES) if n not in stored}
    if missing:
        raise ValueError(f"{path} lacks passwords for {sorted(missing)}")
    return stored
