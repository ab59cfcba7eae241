"""The scenarios: accept, pipeline, cost, fan-out, and the peers they are compared with."""

from __future__ import annotations

import asyncio
import json
import resource
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import nats
from nats.js.api import StorageType, StreamConfig

from baton import permissions
from baton.bench import procstat
from baton.bench.http import Connection, SseStream, summary_ms
from baton.bench.stack import SECRET, Stack
from baton.embedded import free_port
from baton.offline_model import ModelSettings
from shared import messages as m
from shared import subjects

Result = dict[str, Any]
PEER_STREAM = "BENCH_PEER"  # the broker peer's own stream, created and deleted by the bench
PEER_SUBJECT = "bench.peer"
_persisted = msgspec.json.Decoder(m.AssistantMessagePersisted)


# ---- accept ----------------------------------------------------------------------------------


def loadgen(url: str, token: str, concurrency: int, duration: float, keyed: bool) -> Result:
    """Run the load generator in its own process and return its JSON."""
    cmd = [sys.executable, "-m", "baton.bench.loadgen", "--url", url, "--token", token]
    cmd += ["--concurrency", str(concurrency), "--duration", str(duration)]
    cmd += ["--warmup", str(_warmup(duration))]
    if keyed:
        cmd.append("--keyed")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result: Result = json.loads(out.stdout.strip().splitlines()[-1])
    # The load generator shares the machine: its own CPU is part of what limits the figure.
    used = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    requests = result["requests"] * (duration + _warmup(duration)) / duration
    result["loadgen_cpu_us_per_request"] = round(used / requests * 1e6, 1) if requests else 0.0
    return result


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    return {n: procstat.tree_cpu(p, n == "postgres") for n, p in pids.items()}


def _cpu_per_request(
    before: dict[str, float], after: dict[str, float], result: Result, warmup: float
) -> dict[str, float]:
    """CPU microseconds per accepted request, by process (warm-up requests count too)."""
    total = result["requests"] * (result["seconds"] + warmup) / result["seconds"]
    if not total:
        return {}
    return {n: round((after[n] - before[n]) / total * 1e6, 1) for n in before}


def accept(stack: Stack, concurrency: int, duration: float) -> Result:
    """POST /api/chat on the gateway alone (downstream services stopped), unkeyed and keyed."""
    out: Result = {"concurrency": concurrency, "duration_s": duration}
    pids = {n: p for n, p in stack.pids().items() if n in ("gateway", "nats", "postgres")}
    for name, keyed in (("unkeyed", False), ("keyed", True)):
        load = procstat.machine()["loadavg"]
        cpu0 = _cpu(pids)
        result = loadgen(stack.gateway, stack.token, concurrency, duration, keyed)
        result["cpu_us_per_request"] = _cpu_per_request(cpu0, _cpu(pids), result, _warmup(duration))
        out[name] = result | {"loadavg_before": load}
    return out


def _warmup(duration: float) -> float:
    return min(2.0, max(0.2, duration / 5))


def usual(stack: Stack, concurrency: int, duration: float) -> Result:
    """Peer (a): Litestar+uvicorn, INSERT into Postgres, then 202, under the same load."""
    port = free_port()
    log = open(stack.logs / "usual.log", "ab")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "baton.bench.usual"),
            *("--port", str(port), "--dsn", stack.dsn, "--secret", SECRET),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_port(port, 30)
        pids = {"usual": proc.pid, "postgres": stack.pids()["postgres"]}
        load = procstat.machine()["loadavg"]
        cpu0 = _cpu(pids)
        result = loadgen(url, stack.token, concurrency, duration, False)
        result["cpu_us_per_request"] = _cpu_per_request(cpu0, _cpu(pids), result, _warmup(duration))
        return result | {"loadavg_before": load}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _wait_port(port: int, timeout: float) -> None:
    async def probe() -> bool:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        w.close()
        return True

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if asyncio.run(probe()):
            return
        time.sleep(0.1)
    raise TimeoutError(f"port {port} not listening")


# ---- peers: the broker's and the database's ceilings -------------------------------------------


def sample_event() -> m.UserMessageAccepted:
    mid = str(uuid.uuid4())
    return m.UserMessageAccepted(
        event_id=mid,
        message_id=mid,
        conversation_id=str(uuid.uuid4()),
        project_id="bench",
        user_id="bench",
        content="bench message 12345 from worker 7",
        content_hash="0" * 64,
        created_at=_utcnow(),
    )


def _utcnow() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


async def broker(nats_url: str, password: str, duration: float, window: int = 256) -> Result:
    """Raw nats-py JetStream publishes with acks: sequential, then pipelined (publish_async)."""
    nc = await nats.connect(nats_url, user=permissions.ADMIN, password=password)
    js = nc.jetstream()
    payload = m.encode(sample_event())
    await js.add_stream(
        StreamConfig(
            name=PEER_STREAM,
            subjects=[f"{PEER_SUBJECT}.>"],
            storage=StorageType.FILE,
            duplicate_window=120.0,
        )
    )
    out: Result = {"payload_bytes": len(payload)}
    try:
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < duration:
            n += 1
            await js.publish(
                f"{PEER_SUBJECT}.sync", payload, headers={"Nats-Msg-Id": f"s{n}-{uuid.uuid4()}"}
            )
        out["sync_per_s"] = round(n / (time.perf_counter() - start), 1)

        sem = asyncio.Semaphore(window)
        n, start = 0, time.perf_counter()
        pending: set[asyncio.Task[Any]] = set()

        async def one(i: int) -> None:
            try:
                await js.publish(
                    f"{PEER_SUBJECT}.conc", payload, headers={"Nats-Msg-Id": f"c{i}-{uuid.uuid4()}"}
                )
            finally:
                sem.release()

        while time.perf_counter() - start < duration:
            await sem.acquire()
            n += 1
            t = asyncio.create_task(one(n))
            pending.add(t)
            t.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
        out["concurrent_per_s"] = round(n / (time.perf_counter() - start), 1)
        out["concurrent_window"] = window

        n, start = 0, time.perf_counter()
        futures = []
        while time.perf_counter() - start < duration:
            n += 1
            futures.append(
                await js.publish_async(
                    f"{PEER_SUBJECT}.async",
                    payload,
                    headers={"Nats-Msg-Id": f"a{n}-{uuid.uuid4()}"},
                )
            )
            if len(futures) >= 4000:
                await asyncio.gather(*futures)
                futures.clear()
        await asyncio.gather(*futures)
        out["async_per_s"] = round(n / (time.perf_counter() - start), 1)
    finally:
        await js.delete_stream(PEER_STREAM)
        await nc.close()
    return out


async def database(dsn: str, duration: float) -> Result:
    """Raw batched inserts on one connection: executemany (100/batch) and COPY (1000/batch)."""
    con = await asyncpg.connect(dsn)
    out: Result = {}
    try:
        await con.execute(
            "CREATE TABLE IF NOT EXISTS bench_peer_messages (id uuid PRIMARY KEY, "
            "conversation_id uuid NOT NULL, project_id text NOT NULL, user_id text NOT NULL, "
            "content text NOT NULL, created_at timestamptz NOT NULL)"
        )

        def rows(k: int) -> list[tuple[Any, ...]]:
            now = _utcnow()
            return [
                (uuid.uuid4(), uuid.uuid4(), "bench", "bench", "bench message 12345", now)
                for _ in range(k)
            ]

        for name, batch, write in (
            ("executemany_100_per_s", 100, "many"),
            ("copy_1000_per_s", 1000, "copy"),
        ):
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < duration:
                batch_rows = rows(batch)
                if write == "many":
                    await con.executemany(
                        "INSERT INTO bench_peer_messages VALUES ($1, $2, $3, $4, $5, $6)",
                        batch_rows,
                    )
                else:
                    await con.copy_records_to_table("bench_peer_messages", records=batch_rows)
                n += batch
            out[name] = round(n / (time.perf_counter() - start), 1)
    finally:
        await con.execute("DROP TABLE IF EXISTS bench_peer_messages")
        await con.close()
    return out


# ---- pipeline and cost -----------------------------------------------------------------------


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
    deadline = t_submitted + max(60.0, duration * 4)
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


# ---- fan-out ---------------------------------------------------------------------------------


async def fanout(stack: Stack, clients: int, hz: float, duration: float) -> Result:
    """``clients`` SSE streams (one conversation each); token deltas published to each at ``hz``."""
    headers = {"Authorization": f"Bearer {stack.token}"}
    cids = [str(uuid.uuid4()) for _ in range(clients)]
    latencies: list[float] = []
    received = 0
    streams: list[SseStream] = []
    sem = asyncio.Semaphore(50)

    async def opener(cid: str) -> SseStream:
        async with sem:
            s = SseStream(stack.gateway, f"/api/conversations/{cid}/events", headers)
            await s.open()
            return s

    streams = list(await asyncio.gather(*(opener(c) for c in cids)))

    async def reader(s: SseStream) -> None:
        nonlocal received
        async for event, data in s.events():
            if event == "token":
                now = time.perf_counter()
                received += 1
                latencies.append(now - float(msgspec.json.decode(data)["text"]))

    readers = [asyncio.create_task(reader(s)) for s in streams]
    nc = await nats.connect(stack.nats.url, user=permissions.ADMIN, password=stack.admin_password)
    ticks = int(duration * hz)
    sent = 0
    load0 = procstat.machine()["loadavg"]
    start = time.perf_counter()
    for k in range(ticks):
        due = start + k / hz
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        for cid in cids:
            delta = m.TokenDelta(
                conversation_id=cid,
                run_id=f"run-{cid}",
                attempt=1,
                seq=k + 1,
                text=repr(time.perf_counter()),
            )
            await nc.publish(subjects.token_stream("bench", cid), m.encode(delta))
            sent += 1
    await nc.flush()
    deadline = time.perf_counter() + 10
    while received < sent and time.perf_counter() < deadline:  # noqa: ASYNC110 - a counter, not an event
        await asyncio.sleep(0.05)
    await nc.close()
    for t in readers:
        t.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    for s in streams:
        await s.close()
    return {
        "clients": clients,
        "tokens_per_client_per_s": hz,
        "sent": sent,
        "delivered": received,
        "events_per_s": round(received / max(time.perf_counter() - start, 1e-9), 1),
        "latency": summary_ms(latencies),
        "loadavg_before": load0,
    }


def base_dir() -> Path:
    return Path(__file__).resolve().parent
