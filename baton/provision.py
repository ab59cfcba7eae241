"""The admin step: create streams, consumers and buckets that services only bind to."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from baton.embedded import STARTUP_S
from shared import retention, subjects, wiring
from shared.config import nats_servers

T = TypeVar("T")

DEFAULT_DEDUP_WINDOW_S = 120.0
# JetStream allows at most five replicas; an even count buys no extra failure tolerance.
MAX_REPLICAS = 5


# Streams a retention does not cap: the deletion tombstones must outlive what they delete.
UNCAPPED = frozenset({"CONVERSATIONS"})


# Requests in flight at once: enough to start a test stack quickly, few enough that a loaded
# three-node cluster answers each replicated create within the client's request timeout.
IN_FLIGHT = 8


async def _while_unavailable(bound_s: float, call: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``call(*args)`` (one JetStream API request), asked again while JetStream answers 503 or
    does not answer in time.

    A cluster that is starting (a meta leader not elected yet), or a stream just created whose
    group has no leader yet, answers "JetStream system temporarily unavailable": in a few
    seconds it will answer. A loaded cluster may take longer than the request timeout to create
    a replicated stream; asking again is safe, since every request here is idempotent (a create
    with the same configuration answers as the first one did). ``bound_s`` ends a wait that
    failed; the last error is raised then.
    """
    deadline = time.monotonic() + bound_s
    delay = 0.1
    while True:
        try:
            return await call(*args)
        except (nats.js.errors.ServiceUnavailableError, nats.errors.TimeoutError):
            if time.monotonic() + delay > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


def max_age_s(spec: subjects.StreamSpec, kept: retention.Retention) -> float:
    """The stream's own limit, never longer than the shortest retention of any project
    (a stream is shared by every project): nothing keeps content past what retention says."""
    if spec.name in UNCAPPED:
        return spec.max_age_s
    return retention.stream_max_age_s(spec.max_age_s, kept)


def stream_config(
    spec: subjects.StreamSpec,
    dedup_window_s: float,
    replicas: int,
    kept: retention.Retention | None = None,
) -> StreamConfig:
    age = max_age_s(spec, kept or retention.Retention())
    return StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.MEMORY if spec.memory else StorageType.FILE,
        max_age=age,
        # The dedup window may not exceed max_age; ids older than it are the database's job.
        duplicate_window=min(dedup_window_s, age),
        num_replicas=replicas,
        allow_direct=True,
    )


# How many deliveries the server allows past a consumer's own bound (see consumer_config).
SERVER_DELIVERIES_ABOVE = 10


def consumer_config(spec: subjects.ConsumerSpec, ack_wait_s: float | None = None) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=spec.durable,
        filter_subject=spec.filter_subject,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait_s or spec.ack_wait_s,
        # The server's bound is above the consumer's: one that ran out on a delivery whose
        # process died (no ack, nak or dead letter from it) dropped the message without a
        # trace. The consumer keeps ``spec.max_deliver`` and dead-letters the delivery past it
        # (``shared.bus.Consumer``, ``Exhausted``); the server's bound stays as a backstop
        # (code without that check, during a rolling deploy) and leaves room to try again a
        # dead letter that could not be written.
        max_deliver=spec.max_deliver + SERVER_DELIVERIES_ABOVE,
        max_ack_pending=spec.max_ack_pending,
    )


async def provision(
    nats_url: str,
    dedup_window_s: float = DEFAULT_DEDUP_WINDOW_S,
    replicas: int = 1,
    user: str = "",
    password: str = "",
    ack_wait_s: float | None = None,
    kept: retention.Retention | None = None,
    unavailable_s: float = STARTUP_S,
) -> list[str]:
    """Create or update everything; safe to run again. Returns what it did, one line each.

    ``replicas`` is the copies of every stream and KV bucket (consumers follow their
    stream): 1 on a single server, 3 on a 3-node cluster so one node may fail. ``kept``:
    the projects' retention (default: the policy file in ``BATON_POLICY_FILE``, if any), which
    caps every content stream's ``max_age``. A request JetStream answers with 503 (a cluster
    still electing its leaders) or not in time is asked again for up to ``unavailable_s``;
    at most ``IN_FLIGHT`` are in flight at once.
    """
    if kept is None:
        kept = retention.load(os.environ.get("BATON_POLICY_FILE"))
    if not 1 <= replicas <= MAX_REPLICAS:
        raise ValueError(f"replicas must be between 1 and {MAX_REPLICAS}, not {replicas}")
    options: dict[str, object] = {"servers": nats_servers(nats_url), "connect_timeout": 5}
    if user:
        options.update(user=user, password=password)
    nc = await nats.connect(**options)  # type: ignore[arg-type]
    done: list[str] = []
    try:
        js = nc.jetstream()
        slots = asyncio.Semaphore(IN_FLIGHT)

        async def again(call: Callable[..., Awaitable[T]], *args: Any) -> T:
            async with slots:
                return await _while_unavailable(unavailable_s, call, *args)

        async def exists(spec: subjects.StreamSpec) -> bool:
            try:
                await again(js.stream_info, spec.name)
                return True
            except nats.js.errors.NotFoundError:
                return False

        async def update(spec: subjects.StreamSpec) -> str:
            await again(js.update_stream, stream_config(spec, dedup_window_s, replicas, kept))
            return f"stream {spec.name} updated"

        async def create(spec: subjects.StreamSpec) -> str:
            await again(js.add_stream, stream_config(spec, dedup_window_s, replicas, kept))
            return f"stream {spec.name} created"

        async def consumer(cspec: subjects.ConsumerSpec) -> str:
            await again(js.add_consumer, cspec.stream, consumer_config(cspec, ack_wait_s))
            return f"consumer {cspec.stream}/{cspec.durable} ready"

        async def bucket(name: str, ttl: float) -> str:
            kv = KeyValueConfig(
                bucket=name, history=1, ttl=ttl or None, storage=StorageType.FILE, replicas=replicas
            )
            await again(js.create_key_value, kv)
            return f"bucket {name} ready"

        # Independent requests go at once (about 55 one after another took 0.1-0.3 s of every
        # test stack's start); consumers only after every stream exists. The lines keep the
        # order of the lists, whatever order the answers came in.
        # Streams that exist are updated before new ones are made: a subject that moved to a
        # new stream (agent.call.> left CHAT_STREAM for AGENT_CALLS) must leave the old one
        # first, or JetStream refuses the new one's overlapping subjects.
        found = await asyncio.gather(*(exists(spec) for spec in subjects.STREAMS))
        old = [spec for spec, there in zip(subjects.STREAMS, found, strict=True) if there]
        new = [spec for spec, there in zip(subjects.STREAMS, found, strict=True) if not there]
        lines = dict(zip(old, await asyncio.gather(*(update(spec) for spec in old)), strict=True))
        lines |= zip(new, await asyncio.gather(*(create(spec) for spec in new)), strict=True)
        done += [lines[spec] for spec in subjects.STREAMS]
        done += await asyncio.gather(
            *(consumer(cspec) for cspec in wiring.CONSUMERS),
            bucket(subjects.BUCKET_RUNS, 0.0),
            bucket(subjects.BUCKET_LIMITS, subjects.LIMITS_TTL_S),
            bucket(subjects.BUCKET_ABORTS, subjects.ABORTS_TTL_S),
        )
    finally:
        await nc.close()
    return done
