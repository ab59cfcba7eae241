"""Test helpers shared by the integration and end-to-end tiers (real NATS, Postgres, model)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
import msgspec
import structlog
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry

from shared import messages as m
from shared import runs as vocab
from shared.bus import Bus, Consumer
from shared.config import BaseSettings
from shared.metrics import ServiceMetrics

T = TypeVar("T")

# One TLS context for every poll of a local server: a bare ``httpx.get`` builds a client, and
# with it a context that loads the CA bundle, each call (26 ms of CPU; with one given, 0.3 ms).
# A stack's start polled ~70 times: 1.4 CPU s of the test process while the five services
# started beside it (docs/benchmarks.md, "Stack start-up"). The URLs are plain http.
_TLS = ssl.create_default_context()


def port_taken(log: str) -> bool:
    """Whether a service's log says a port it was given was taken (Python's errno 98 message):
    a port ``free_port`` found was only free a moment ago, and another process bound it first."""
    return "address already in use" in log.lower()


def http_get(url: str, timeout: float) -> httpx.Response:
    """``httpx.get`` without the per-call TLS set-up, for polls of local http servers."""
    return httpx.get(url, timeout=timeout, verify=_TLS)


def service_metrics(service: str) -> ServiceMetrics:
    """Metrics on a private registry, so one process can host many test services."""
    return ServiceMetrics(service, registry=CollectorRegistry())


async def connect_bus(nats_url: str, service: str = "test") -> Bus:
    log = structlog.get_logger().bind(service=service)
    return await Bus.connect(
        BaseSettings(nats_url=nats_url), service, service_metrics(service), log
    )


@contextlib.asynccontextmanager
async def running(*consumers: Consumer[Any]) -> AsyncIterator[None]:
    """Run consumers in the background for the duration of the block."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(c.run(stop, grace_s=5)) for c in consumers]
    try:
        yield
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)


async def read_subject(
    bus: Bus, stream: str, subject: str, at_least: int, timeout: float = 15.0, settle: float = 0.3
) -> list[Msg]:
    """Everything in ``stream`` on ``subject`` once at least ``at_least`` messages are there.

    Read once more after ``settle`` s, to catch copies that should not exist. Each read is a
    fresh ephemeral consumer whose fetches time out after 0.3 s; on a loaded machine a read can
    come back short, so a read with fewer than ``at_least`` is retried until ``timeout``.
    """
    deadline = asyncio.get_running_loop().time() + timeout

    async def read_all() -> list[Msg]:
        sub = await bus.js.pull_subscribe(subject, stream=stream)
        found: list[Msg] = []
        with contextlib.suppress(Exception):
            while True:
                found.extend(await sub.fetch(256, timeout=0.3))
        await sub.unsubscribe()
        return found

    settled = False
    while True:
        found = await read_all()
        if len(found) >= at_least:
            if settled:
                return found
            settled = True
            await asyncio.sleep(settle)
            continue
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"expected {at_least} on {subject}, found {len(found)}")
        await asyncio.sleep(0.1)


def decode_all(msgs: list[Msg], kind: type[T]) -> list[T]:
    return [msgspec.json.decode(x.data, type=kind) for x in msgs]


async def eventually(check: Callable[[], Awaitable[T | None]], timeout: float = 60.0) -> T:
    """Poll ``check`` until it returns something truthy (the bound only ends a wait that
    failed; it is generous so that a busy machine is not a failure)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def blocked_on_a_lock(pool: Any, timeout: float = 60.0) -> None:
    """Wait until a statement of this database waits for a row lock (a racing write is parked)."""
    await eventually(
        lambda: pool.fetchval(
            "SELECT count(*) > 0 FROM pg_stat_activity "
            "WHERE wait_event_type = 'Lock' AND datname = current_database()"
        ),
        timeout,
    )


def user_event(
    content: str = "What is a JetStream consumer?",
    project: str = "p1",
    user: str = "u1",
    conversation_id: str | None = None,
) -> m.UserMessageAccepted:
    mid = str(uuid.uuid4())
    return m.UserMessageAccepted(
        event_id=mid,
        message_id=mid,
        conversation_id=conversation_id or str(uuid.uuid4()),
        project_id=project,
        user_id=user,
        content=content,
        content_hash="h",
        created_at=datetime.now(UTC),
    )


def agent_decision(
    project: str = "p1",
    user: str = "u1",
    message: m.UserMessageAccepted | None = None,
    position: int = 1,
) -> m.AgentDecision:
    """The agent's advice to answer a message, a small task: ``message``'s, or a new one's in a
    new conversation of ``project`` and ``user``."""
    if message is None:
        mid, conversation = str(uuid.uuid4()), str(uuid.uuid4())
    else:
        mid, conversation = message.message_id, message.conversation_id
        project, user = message.project_id, message.user_id
    return m.AgentDecision(
        event_id=f"decision:{mid}",
        message_id=mid,
        conversation_id=conversation,
        project_id=project,
        user_id=user,
        position=position,
        decision=m.Decision(
            intent="question",
            complexity="low",
            action="answer",
            executor="chat",
            estimated_tokens=200,
        ),
    )


SONNET_PRICES = m.Prices(input=3.0, output=15.0, cache_read=0.3, cache_write=3.75)


def exec_result(
    e: m.UserMessageAccepted,
    call: int,
    text: str = "the answer",
    usage: m.Usage | None = None,
    model: str = "claude-sonnet-4-6",
) -> m.ExecResult:
    """The executor's report of call ``call`` of the first attempt of the run for ``e``."""
    run_id = f"run-{e.message_id}"
    return m.ExecResult(
        event_id=f"result:{call}",
        message_id=e.message_id,
        conversation_id=e.conversation_id,
        project_id=e.project_id,
        task_id=f"task:{run_id}:1",
        call_id=f"task:{run_id}:1#{call}",
        run_id=run_id,
        attempt=1,
        model=model,
        text=text,
        usage=usage or m.Usage(input_tokens=1000, output_tokens=500),
        prices=SONNET_PRICES,
    )


def run_verdict(
    e: m.UserMessageAccepted, status: str, attempt: int = 1, verdict: str = "approve"
) -> m.RunVerdict:
    """Policy's verdict on the run of ``e``, as it publishes it on policy.verdict."""
    rid = vocab.run_id(e.message_id)
    return m.RunVerdict(
        event_id=vocab.verdict_id(rid, attempt, status),
        message_id=e.message_id,
        conversation_id=e.conversation_id,
        project_id=e.project_id,
        run_id=rid,
        user_id=e.user_id,
        verdict=verdict,  # type: ignore[arg-type]
        status=status,  # type: ignore[arg-type]
        reason="",
        attempt=attempt,
    )


async def lock_waiters_at_least(con: Any, n: int) -> bool:
    """Whether at least ``n`` sessions of this database wait for a lock (a test holding a row
    watches its writers queue behind it)."""
    waiting = await con.fetchval(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE wait_event_type = 'Lock' AND datname = current_database()"
    )
    return int(waiting) >= n
