"""Pipeline and cost: messages through the five services to the stored answer, CPU and RSS."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgspec
import nats

from baton import permissions
from baton.bench import procstat
from baton.bench.http import Connection, SseStream, summary_ms
from baton.bench.stack import DRAIN_S, Stack
from baton.offline_model import ModelSettings
from shared import messages as m
from shared import subjects

Result = dict[str, Any]


_persisted = msgspec.json.Decoder(m.AssistantMessagePersisted)


class Sampler:
    """CPU seconds and peak RSS of the stack's processes between start() and stop()."""

    TREES = frozenset({"postgres"})  # the postmaster's backends do the work

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.cpu0: dict[str, float] = {}
        self.cpu1: dict[str, float] = {}
        self.rss_idle = self.rss()
        self.rss_peak: dict[str, int] = dict(self.rss_idle)
        self._task: asyncio.Task[None] | None = None

    def cpu(self) -> dict[str, float]:
        return {n: procstat.tree_cpu(p, n in self.TREES) for n, p in self.pids.items()}

    def rss(self) -> dict[str, int]:
        return {n: procstat.tree_rss(p, n in self.TREES) for n, p in self.pids.items()}

    async def _watch(self) -> None:
        while True:
            for name, value in self.rss().items():
                self.rss_peak[name] = max(self.rss_peak.get(name, 0), value)
            await asyncio.sleep(0.5)

    def start(self) -> None:
        self.cpu0 = self.cpu()
        self._task = asyncio.create_task(self._watch())

    def stop(self) -> None:
        self.cpu1 = self.cpu()
        if self._task is not None:
            self._task.cancel()

    def report(self, messages: int) -> Result:
        mb = 1024 * 1024
        out: Result = {}
        for name in self.pids:
            used = self.cpu1.get(name, 0.0) - self.cpu0.get(name, 0.0)
            out[name] = {
                "cpu_s": round(used, 2),
                "cpu_s_per_1000": round(used / messages * 1000, 3) if messages else 0.0,
                "rss_idle_mb": round(self.rss_idle.get(name, 0) / mb, 1),
                "rss_load_mb": round(self.rss_peak.get(name, 0) / mb, 1),
            }
        return out


def model_seconds_per_message(stats: Result, settings: ModelSettings, messages: int) -> float:
    """The pace the offline model imposed on one message: ttft + tokens/rate, summed over calls."""
    if not messages:
        return 0.0
    total = 0.0
    for row in stats.get("by_model", {}).values():
        calls = row.get("completed", 0)
        if not calls:
            continue
        per_call = settings.ttft_ms / 1000
        if settings.tokens_per_second > 0:
            per_call += row.get("output_tokens", 0) / calls / settings.tokens_per_second
        total += per_call * calls / messages
    return total


async def _submitter(
    stack: Stack,
    rate: float,
    duration: float,
    connections: int,
    sent: dict[str, float],
    on_error: Callable[[str], None],
) -> int:
    """Open-loop submits at ``rate``/s for ``duration`` s over a pool of keep-alive connections."""
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(Connection(stack.gateway))
    headers = {"Authorization": f"Bearer {stack.token}", "Content-Type": "application/json"}
    tasks: set[asyncio.Task[None]] = set()

    async def one(i: int) -> None:
        conn = await pool.get()
        body = b'{"content": "pipeline message %d: what can you do?"}' % i
        t0 = time.perf_counter()
        try:
            status, data = await conn.request("POST", "/api/chat", headers, body)
            if status == 202:
                sent[msgspec.json.decode(data)["message"]["id"]] = t0
            else:
                on_error(str(status))
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            on_error(type(exc).__name__)
            await conn.close()
        finally:
            pool.put_nowait(conn)

    start, n = time.perf_counter(), 0
    while True:
        due = start + n / rate
        if due - start >= duration:
            break
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        n += 1
        t = asyncio.create_task(one(n))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    while not pool.empty():
        await pool.get_nowait().close()
    return n


async def _ttft_probe(stack: Stack, samples: int, spacing: float) -> list[float]:
    """Time from POST to the first token event on an SSE stream opened before it."""
    out: list[float] = []
    headers = {"Authorization": f"Bearer {stack.token}"}
    conn = Connection(stack.gateway)
    for _ in range(samples):
        cid = str(uuid.uuid4())
        sse = SseStream(stack.gateway, f"/api/conversations/{cid}/events", headers)
        await sse.open()
        try:
            body = msgspec.json.encode(
                {"content": "how fast is the first token?", "conversation_id": cid}
            )
            t0 = time.perf_counter()
            status, _ = await conn.request(
                "POST", "/api/chat", headers | {"Content-Type": "application/json"}, body
            )
            if status != 202:
                continue
            async with asyncio.timeout(60):
                async for event, _data in sse.events():
                    if event == "token":
                        out.append(time.perf_counter() - t0)
                        break
        except TimeoutError:
            pass
        finally:
            await sse.close()
        await asyncio.sleep(spacing)
    await conn.close()
    return out


async def pipeline_run(
    stack: Stack, settings: ModelSettings, rate: float, duration: float, ttft_samples: int = 20
) -> Result:
    """Messages through all five services to the stored answer, at an offered rate."""
    assert stack.model is not None
    stack.model.update_settings(
        ttft_ms=settings.ttft_ms,
        tokens_per_second=settings.tokens_per_second,
        words_per_reply=settings.words_per_reply,
    )
    stack.model.clear()
    sent: dict[str, float] = {}
    done: dict[str, float] = {}
    kinds: dict[str, int] = {}
    errors: dict[str, int] = {}

    def on_error(kind: str) -> None:
        errors[kind] = errors.get(kind, 0) + 1

    async def on_persisted(msg: Any) -> None:
        a = _persisted.decode(msg.data)
        if a.reply_to not in done:
            done[a.reply_to] = time.perf_counter()
            kinds[a.kind] = kinds.get(a.kind, 0) + 1

    nc = await nats.connect(stack.nats.url, user=permissions.ADMIN, password=stack.admin_password)
    sub = await nc.subscribe(subjects.PREFIX_PERSISTED_ASSISTANT + ">", cb=on_persisted)
    sampler = Sampler(stack.pids())
    sampler.start()
    nats0 = stack.nats_counters()
    load0 = procstat.machine()["loadavg"]
    t_start = time.perf_counter()
    probe = asyncio.create_task(_ttft_probe(stack, ttft_samples, max(duration / ttft_samples, 0.1)))
    submitted = await _submitter(stack, rate, duration, 64, sent, on_error)
    t_submitted = time.perf_counter()
    # Drain: wait until every accepted message has its stored answer (or give up).
    deadline = t_submitted + max(DRAIN_S, duration * 4)
    while time.perf_counter() < deadline and any(mid not in done for mid in sent):  # noqa: ASYNC110 - polls two dicts filled by callbacks
        await asyncio.sleep(0.05)
    ttft = await probe
    sampler.stop()
    nats1 = stack.nats_counters()
    await sub.unsubscribe()
    await nc.close()
    completed = [mid for mid in sent if mid in done]
    e2e = [done[mid] - sent[mid] for mid in completed]
    last = max((done[mid] for mid in completed), default=t_submitted)
    stats = stack.model.stats()
    model_s = model_seconds_per_message(stats, settings, len(completed) + len(ttft))
    first_token_model_s = settings.ttft_ms / 1000 + _agent_share(stats, settings)
    span = last - t_start
    return {
        "pace": {
            "ttft_ms": settings.ttft_ms,
            "tokens_per_second": settings.tokens_per_second,
            "words_per_reply": settings.words_per_reply,
        },
        "offered_per_s": rate,
        "duration_s": duration,
        "submitted": submitted,
        "accepted": len(sent),
        "completed": len(completed),
        "submit_errors": errors,
        "outcomes": kinds,
        "accepted_per_s": round(len(sent) / max(t_submitted - t_start, 1e-9), 1),
        "sustained_per_s": round(len(completed) / max(span, 1e-9), 1),
        "drain_s": round(last - t_submitted, 2),
        "end_to_end": summary_ms(e2e),
        "model_ms_per_message": round(model_s * 1000, 2),
        "overhead": summary_ms([max(0.0, x - model_s) for x in e2e]),
        "ttft": summary_ms(ttft) | {"samples": len(ttft)},
        "ttft_overhead": summary_ms([max(0.0, x - first_token_model_s) for x in ttft]),
        "model_calls": stats.get("calls", 0),
        # Protocol messages through the broker per completed message: the round trips it costs.
        "nats_per_message": {
            k: round((nats1[k] - nats0[k]) / max(len(completed), 1), 1)
            for k in ("in_msgs", "out_msgs")
            if k in nats0 and k in nats1
        },
        "cost": sampler.report(len(completed)),
        "loadavg_before": load0,
        "loadavg_after": procstat.machine()["loadavg"],
    }


def _agent_share(stats: Result, settings: ModelSettings) -> float:
    """Model time of the classification call that comes before the answer's first token."""
    agent_model = "claude-haiku-4-5"
    row = stats.get("by_model", {}).get(agent_model, {})
    calls = row.get("completed", 0)
    if not calls:
        return 0.0
    per_call = settings.ttft_ms / 1000
    if settings.tokens_per_second > 0:
        per_call += row.get("output_tokens", 0) / calls / settings.tokens_per_second
    return per_call


async def purge(stack: Stack) -> None:
    """Empty every stream so a later scenario does not work through an earlier one's backlog."""
    nc = await nats.connect(stack.nats.url, user=permissions.ADMIN, password=stack.admin_password)
    js = nc.jetstream()
    for spec in subjects.STREAMS:
        await js.purge_stream(spec.name)
    await nc.close()
