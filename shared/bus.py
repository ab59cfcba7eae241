"""The JetStream bus: connect, bind to provisioned consumers, fetch, ack policy, publish with ids."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import PubAck
from opentelemetry import trace

from shared import messages, requests, tracing
from shared.acks import Acks
from shared.config import BaseSettings, nats_servers
from shared.errors import BadData, Deferred, DependencyDown, Exhausted, SchemaError, Transient
from shared.metrics import ServiceMetrics
from shared.subjects import ConsumerSpec, dead_letter, inbox_prefix

T = TypeVar("T")

# Redelivery delays for transient trouble: bounded, growing with the delivery count.
BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
# How often each replica reads its consumer's backlog into the pending gauges (one request).
LAG_REFRESH_S = 5.0
STALL_S = 1.0  # publish_async: longest wait for a free slot in the unacked window
# Consumer(on_exhausted=...): longest a delivery past the bound waits for its hook (the agent's
# reads its calls' records and publishes their estimates: a few round trips) before its letter.
EXHAUSTED_HOOK_S = 30.0


class _PubAckReply(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    domain: str | None = None
    duplicate: bool | None = None
    error: dict[str, Any] | None = None


_pub_ack = msgspec.json.Decoder(_PubAckReply)


@contextlib.contextmanager
def _producing(
    subject: str, msg_id: str, headers: dict[str, str] | None
) -> Iterator[dict[str, str]]:
    """The headers of one publish: ``Nats-Msg-Id`` and the trace context.

    When spans are recorded the publish runs under a PRODUCER span the headers point at; when
    they are not, an unrecorded span would only cost time, the context travels all the same,
    and a ``traceparent`` the caller passes is kept as it is.
    """
    hdrs = dict(headers) if headers else {}
    hdrs["Nats-Msg-Id"] = msg_id
    if tracing.recording():
        with tracing.producer_span(subject, msg_id):
            yield tracing.inject(hdrs)
        return
    if "traceparent" not in hdrs:
        tracing.inject(hdrs)
    yield hdrs


def _stamped(event: msgspec.Struct) -> msgspec.Struct:
    """The event with the current request id (shared/requests.py), unless it names one."""
    rid = requests.REQUEST_ID.get()
    if rid and getattr(event, "request_id", None) == "":
        return msgspec.structs.replace(event, request_id=rid)
    return event


def backoff_for(delivery: int) -> float:
    return BACKOFF_S[min(max(delivery - 1, 0), len(BACKOFF_S) - 1)]


class Bus:
    """One NATS connection with JetStream, the service's metrics and logger."""

    def __init__(
        self, nc: NATS, service: str, metrics: ServiceMetrics, log: structlog.stdlib.BoundLogger
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.service = service
        self.metrics = metrics
        self.log = log
        self.tracer = trace.get_tracer(f"baton.{service}")
        self.acks = Acks(nc)
        self._published: dict[tuple[str, bool], Any] = {}

    @classmethod
    async def connect(
        cls,
        settings: BaseSettings,
        service: str,
        metrics: ServiceMetrics,
        log: structlog.stdlib.BoundLogger,
    ) -> Bus:
        """Connect, retrying the first connection for ``nats_connect_timeout_s``, then giving up
        with ``ConnectionError``; once connected, drops reconnect forever."""

        async def error_cb(exc: Exception) -> None:
            kind = "permission" if "permissions violation" in str(exc).lower() else "other"
            metrics.nats_errors.labels(kind).inc()
            log.warning("nats_error", error=str(exc), kind=kind)

        async def disconnected_cb() -> None:
            log.warning("nats_disconnected")

        async def reconnected_cb() -> None:
            log.info("nats_reconnected")

        options: dict[str, Any] = {
            # One URL or a cluster's list: a dropped node's clients move to another.
            "servers": nats_servers(settings.nats_url),
            # The instance tells replicas apart in the server's connection list.
            "name": f"baton-{service}"
            + (f"@{settings.instance}" if settings.instance not in ("", service) else ""),
            # Its own inbox prefix: its user may not read another service's replies.
            "inbox_prefix": inbox_prefix(service),
            "error_cb": error_cb,
            "disconnected_cb": disconnected_cb,
            "reconnected_cb": reconnected_cb,
            # With no limit, nats-py's first connect retries forever when nothing listens: the
            # first connect tries each server twice per attempt (the loop below bounds the
            # attempts); once connected, drops reconnect without limit.
            "max_reconnect_attempts": 1,
            "reconnect_time_wait": 0.5,
            "connect_timeout": 2,
        }
        if settings.nats_user:
            options["user"] = settings.nats_user
            options["password"] = str(settings.nats_password)
        deadline = time.monotonic() + settings.nats_connect_timeout_s
        attempt = 0
        while True:
            attempt += 1
            nc: NATS | None = None
            try:
                nc = await nats.connect(**options)
                # nats-py reads the option at each drop: from now on it reconnects forever.
                nc.options["max_reconnect_attempts"] = -1
                bus = cls(nc, service, metrics, log)
                await bus.acks.open()
                return bus
            except (OSError, nats.errors.Error, TimeoutError) as exc:
                if nc is not None:
                    await nc.close()
                log.warning("nats_connect_failed", attempt=attempt, error=str(exc))
                wait = min(0.2 * attempt, 2.0)
                if time.monotonic() + wait > deadline:
                    raise ConnectionError(
                        f"could not connect to NATS at {settings.nats_url}: {exc}"
                    ) from exc
                await asyncio.sleep(wait)

    async def publish(
        self,
        subject: str,
        event: msgspec.Struct,
        msg_id: str,
        headers: dict[str, str] | None = None,
        timeout: float = 5.0,
    ) -> PubAck:
        """Publish with ``Nats-Msg-Id`` and wait for the PubAck (a duplicate is not an error).

        The current trace context goes into the headers, under a PRODUCER span when spans are
        recorded; when they are not, a ``traceparent`` the caller passes is kept as it is.
        """
        event = _stamped(event)
        with _producing(subject, msg_id, headers) as hdrs:
            ack = await self._js_publish(subject, messages.encode(event), hdrs, timeout)
        self._count(subject, ack)
        return ack

    async def publish_async(
        self,
        subject: str,
        event: msgspec.Struct,
        msg_id: str,
        headers: dict[str, str] | None = None,
    ) -> asyncio.Future[PubAck]:
        """Publish with ``Nats-Msg-Id`` without waiting: the PubAck comes in the returned future.

        Publishes from one connection reach the server in call order, so a run of them keeps
        its order in the stream without a round trip each. The future has no timeout of its
        own: the caller must await it with one (see ``settle``) so a lost ack frees its slot.
        """
        event = _stamped(event)
        with _producing(subject, msg_id, headers) as hdrs:
            # With the connection's window of unacked publishes full, give up after a second
            # (TooManyStalledMsgsError) instead of waiting for a slot for ever.
            future = await self.js.publish_async(
                subject, messages.encode(event), headers=hdrs, wait_stall=STALL_S
            )

        def counted(f: asyncio.Future[PubAck]) -> None:
            if not f.cancelled() and f.exception() is None:
                self._count(subject, f.result())

        future.add_done_callback(counted)
        return future

    async def publish_all(
        self, events: list[tuple[str, msgspec.Struct, str]], timeout: float = 5.0
    ) -> None:
        """Publish ``(subject, event, msg_id)`` in order and wait for their PubAcks together.

        One round trip for all of them instead of one each. Raises if any was not acked (the
        first error, a ``TimeoutError`` if one never was): the caller naks, its redelivery
        publishes the same ids again and JetStream keeps one copy of each.
        """
        acks: list[asyncio.Future[PubAck]] = []
        try:
            for subject, event, msg_id in events:
                acks.append(await self.publish_async(subject, event, msg_id=msg_id))
        except BaseException:
            for ack in acks:
                ack.cancel()  # nobody will wait for them: free their slots
            raise
        errors = await self.settle(acks, timeout)
        if errors:
            raise errors[0]

    @staticmethod
    async def settle(futures: list[asyncio.Future[PubAck]], timeout: float) -> list[BaseException]:
        """Wait for PubAcks together; return what failed (a timed-out one is cancelled)."""
        if not futures:
            return []
        done, late = await asyncio.wait(futures, timeout=timeout)
        errors: list[BaseException] = []
        for f in late:
            f.cancel()
            errors.append(TimeoutError("no PubAck in time"))
        for f in done:
            exc = f.exception()
            if exc is not None:
                errors.append(exc)
        return errors

    def _count(self, subject: str, ack: PubAck) -> None:
        key = (".".join(subject.split(".", 2)[:2]), bool(ack.duplicate))
        child = self._published.get(key)
        if child is None:
            # A label lookup costs more than the increment: once per (family, duplicate).
            child = self.metrics.published.labels(key[0], str(key[1]).lower())
            self._published[key] = child
        child.inc()

    async def _js_publish(
        self, subject: str, payload: bytes, headers: dict[str, str], timeout: float
    ) -> PubAck:
        """``js.publish`` over ``Acks``, with the PubAck read by msgspec.

        nats-py's ``json.loads`` and reflective dataclass building cost more per publish than
        the rest of the request; errors are nats-py's own.
        """
        try:
            msg = await self.acks.request(subject, payload, headers, timeout)
        except nats.errors.NoRespondersError:
            raise nats.js.errors.NoStreamResponseError from None
        reply = _pub_ack.decode(msg.data)
        if reply.error is not None:
            nats.js.errors.APIError.from_error(reply.error)  # raises the matching error
        return PubAck(
            stream=reply.stream, seq=reply.seq, domain=reply.domain, duplicate=reply.duplicate
        )

    async def close(self) -> None:
        await self.acks.close()
        if self.nc.is_closed:
            return
        if self.nc.is_connected:
            try:
                await self.nc.drain()
                return
            except Exception as exc:
                self.log.warning("nats_drain_failed", error=repr(exc))
        try:
            await self.nc.close()
        except Exception as exc:  # a dead transport at exit must not turn a clean stop into exit 1
            self.log.warning("nats_close_failed", error=repr(exc))


Handler = Callable[[T, Msg], Awaitable[str]]


class Pull:
    """Pull requests to one durable; each message is handed over the moment it arrives.

    Instead of nats-py's ``fetch(n)`` (a no-wait request, then a lingering one, a JSON body
    built per call and a ``wait_for`` per message), one request is open at a time, asks for
    at most the free slots, and ends when they are filled, when the server says it expired
    (status 408) or had nothing (404), or after ``expires_s``. Every request has its own
    reply subject, so a late status of an old one is ignored; deliveries keep their stream
    subject and count against the open request.
    """

    def __init__(
        self,
        nc: NATS,
        stream: str,
        durable: str,
        dispatch: Callable[[Msg], None],
        expires_s: float = 1.0,
    ) -> None:
        self.nc = nc
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.dispatch = dispatch
        self.expires_s = expires_s
        self.prefix = ""
        self.sub: Any = None
        self.seq = 0
        self.left = 0
        self.done: asyncio.Future[None] | None = None

    async def open(self) -> None:
        self.prefix = self.nc.new_inbox()
        self.sub = await self.nc.subscribe(f"{self.prefix}.*", cb=self._on_msg)

    async def close(self) -> None:
        if self.sub is not None:
            await self.sub.unsubscribe()

    async def request(self, n: int) -> int:
        """Ask for up to ``n`` messages; return how many came, once the request is over."""
        self.seq += 1
        self.left = n
        self.done = asyncio.get_running_loop().create_future()
        expires_ns = int(self.expires_s * 1e9)
        body = b'{"batch":%d,"expires":%d}' % (n, expires_ns)
        await self.nc.publish(self.subject, body, reply=f"{self.prefix}.{self.seq}")
        # The server ends the request itself at expiry; the margin covers a lost 408.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.done), self.expires_s + 0.5)
        return n - max(self.left, 0)

    async def _on_msg(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status is None and msg.reply:
            # Deliveries keep their stream subject, so they count against the open request;
            # one of an older request is rare (a lost 408) and is handled all the same.
            self.dispatch(msg)
            self.left -= 1
            if self.left <= 0:
                self._finish()
        elif msg.subject == f"{self.prefix}.{self.seq}":
            # Statuses come on the request's own reply subject: a late one of an old request
            # must not end the current request.
            self._finish()

    def _finish(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(None)


class Consumer(Generic[T]):
    """Fetches from one provisioned durable and runs a handler per message, acking after it.

    Outcomes: the handler returns → ack; ``BadData`` (or an undecodable payload) → the
    message is copied into the dead-letter stream with its reason and terminated;
    ``Transient`` → nak with a bounded backoff; anything else is a bug → logged, nak, and
    after ``max_deliver`` deliveries it is dead-lettered rather than silently dropped. A
    delivery past ``max_deliver`` (every allowed one died with its process) is dead-lettered
    without being handled (``Exhausted``), after ``on_exhausted`` if there is one: it bills
    what the dead deliveries spent, best effort (its failure is logged, the letter still goes).
    """

    def __init__(
        self,
        bus: Bus,
        spec: ConsumerSpec,
        schema: type[T],
        handler: Handler[T],
        *,
        batch: int = 32,
        concurrency: int = 16,
        ready: Callable[[], Awaitable[bool]] | None = None,
        on_dependency_down: Callable[[], None] | None = None,
        on_exhausted: Callable[[T, Msg], Awaitable[None]] | None = None,
        lag_refresh_s: float = LAG_REFRESH_S,
    ) -> None:
        self.bus = bus
        self.on_exhausted = on_exhausted
        self.lag_refresh_s = lag_refresh_s
        self.ready = ready
        self.on_dependency_down = on_dependency_down
        self.spec = spec
        self.decoder = msgspec.json.Decoder(schema)
        self.handler = handler
        self.batch = batch
        self.concurrency = max(1, concurrency)
        self.inflight: dict[asyncio.Task[None], Msg] = {}
        self.ack_wait_s = spec.ack_wait_s
        self.log = bus.log.bind(consumer=spec.durable)
        # Labelled metric children looked up once, not per handled message.
        self._handled: dict[str, Any] = {}
        self._handle_seconds = bus.metrics.handle_seconds.labels(spec.durable)

    async def run(self, stop: asyncio.Event, grace_s: float = 20.0) -> None:
        """Fetch and handle until ``stop`` is set, then let in-flight work finish."""
        pull = await self._bind(stop)
        # Heartbeats go on through the grace period (in-flight work must not be redelivered);
        # both loops end on ``over`` as well as on their cancel, which an await inside them can
        # lose (Python 3.11's ``wait_for``, under nats-py's requests, drops a cancel that lands
        # in the turn its reply does).
        over = asyncio.Event()
        heartbeat = asyncio.create_task(self._heartbeat(over))
        lag = asyncio.create_task(self._watch_lag(over))
        # Requests grow while they come back full and shrink to what arrived when they do not:
        # an idle consumer holds one message at a time, so a closed readiness gate stops it
        # after at most one more delivery, while a backlog is pulled in batches.
        want = 1
        try:
            while not stop.is_set():
                if self.ready is not None and not await self.ready():
                    # A dependency is down: leave messages in the stream rather than burning
                    # their deliveries on naks until max_deliver dead-letters them.
                    await asyncio.sleep(0.5)
                    continue
                free = self.concurrency - len(self.inflight)
                if free <= 0:
                    await asyncio.wait(list(self.inflight), return_when=asyncio.FIRST_COMPLETED)
                    continue
                n = min(self.batch, free, want)
                try:
                    got = await pull.request(n)
                    want = min(self.batch, want * 2) if got >= n else max(1, got)
                except (nats.errors.Error, OSError) as exc:
                    self.log.warning("fetch_failed", error=repr(exc))
                    await asyncio.sleep(0.5)
        finally:
            if self.inflight:
                # Unacked work past the grace period is redelivered elsewhere, never lost.
                await asyncio.wait(list(self.inflight), timeout=grace_s)
            over.set()
            heartbeat.cancel()
            lag.cancel()
            try:
                await pull.close()
            except Exception as exc:  # the connection may already be gone at shutdown
                self.log.debug("unsubscribe_failed", error=str(exc))

    def _dispatch(self, msg: Msg) -> None:
        task = asyncio.create_task(self._handle(msg))
        self.inflight[task] = msg
        task.add_done_callback(self.inflight.pop)

    async def _bind(self, stop: asyncio.Event) -> Pull:
        # Services only bind: creating consumers is provisioning's job (and its permission).
        while True:
            try:
                pull = Pull(self.bus.nc, self.spec.stream, self.spec.durable, self._dispatch)
                await pull.open()
                await self._learn_ack_wait()
                return pull
            except (nats.errors.Error, OSError) as exc:
                if stop.is_set():
                    raise
                self.log.warning("bind_failed", error=str(exc))
                await asyncio.sleep(1.0)

    async def _learn_ack_wait(self) -> None:
        # The provisioned ack_wait is the truth (operators may tune it); heartbeats follow it.
        try:
            info = await self.bus.js.consumer_info(self.spec.stream, self.spec.durable)
        except (nats.errors.Error, OSError) as exc:
            self.log.warning("consumer_info_failed", error=repr(exc))
            return
        if info.config.ack_wait:
            self.ack_wait_s = float(info.config.ack_wait)

    async def _watch_lag(self, over: asyncio.Event) -> None:
        # Backlog per consumer for dashboards and alerts; a failed read keeps the last value.
        durable = self.spec.durable
        metrics = self.bus.metrics
        while not over.is_set():
            try:
                info = await self.bus.js.consumer_info(self.spec.stream, durable)
            except Exception as exc:  # a failed read only leaves the gauges a little stale
                self.log.debug("consumer_info_failed", error=repr(exc))
            else:
                metrics.consumer_pending.labels(durable).set(info.num_pending or 0)
                metrics.consumer_ack_pending.labels(durable).set(info.num_ack_pending or 0)
            await asyncio.sleep(self.lag_refresh_s)

    async def _heartbeat(self, over: asyncio.Event) -> None:
        # Long handlers (a model stream) must not be redelivered while they are healthy.
        while not over.is_set():
            interval = max(self.ack_wait_s / 3, 0.2)
            await asyncio.sleep(interval)
            for msg in list(self.inflight.values()):
                try:
                    await msg.in_progress()
                except Exception as exc:  # a lost heartbeat only risks a redelivery
                    self.log.debug("in_progress_failed", error=str(exc))

    async def _handle(self, msg: Msg) -> None:
        started = time.perf_counter()
        meta = msg.metadata
        delivered = meta.num_delivered
        durable = self.spec.durable
        metrics = self.bus.metrics
        if delivered > 1:
            metrics.redeliveries.labels(durable).inc()
        ctx = tracing.extract(msg.headers)
        ids: dict[str, Any] = {"subject": msg.subject, "delivery": delivered}
        with self.bus.tracer.start_as_current_span(
            f"{self.bus.service} {durable}",
            context=ctx,
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "messaging.system": "nats",
                "messaging.operation.type": "process",
                "messaging.destination.name": msg.subject,
                "messaging.consumer.group.name": durable,
                "messaging.message.delivery_count": delivered,
            },
        ) as span:
            ids["trace_id"] = tracing.current_trace_id()
            try:
                try:
                    event = self.decoder.decode(msg.data)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    raise SchemaError(f"undecodable payload: {exc}") from exc
                for key in ("event_id", "message_id", "conversation_id", "run_id"):
                    value = getattr(event, key, None)
                    if value:
                        ids[key] = value
                rid = getattr(event, "request_id", "")
                if rid:
                    # This task's own context: what it publishes carries the id, what it
                    # logs names it.
                    ids["request_id"] = rid
                    requests.REQUEST_ID.set(rid)
                    structlog.contextvars.bind_contextvars(request_id=rid)
                if getattr(event, "v", 1) > messages.SCHEMA_VERSION:
                    raise SchemaError(f"unknown schema version {getattr(event, 'v', None)}")
                if delivered > self.spec.max_deliver:
                    # The server's bound is above the consumer's (``provision.consumer_config``):
                    # the consumer's is kept here, where a delivery past it can still be
                    # dead-lettered. Only a message whose every allowed delivery died with its
                    # process gets here (a handled failure is dead-lettered on the last one), or
                    # one whose dead letter could not be written then; with the bound at the
                    # server, such a message was dropped without a trace.
                    await self._exhausted(event, msg, ids)
                    raise Exhausted(
                        f"delivered {delivered} times without an outcome: the process handling "
                        "each delivery died or lost it before it could answer, or the dead "
                        "letter of the last one could not be written"
                    )
                outcome = await self.handler(event, msg)
                # Fire-and-forget: a lost ack only means a redelivery, which every handler absorbs.
                await msg.ack()
            except Deferred as exc:
                # A timer, not trouble: the server hands the message back when it is due, so no
                # worker waits and a restart loses nothing.
                outcome = "deferred"
                ids["reason"] = exc.reason
                await self._nak_or_bury(msg, max(exc.delay, 0.01), exc.reason)
            except BadData as exc:
                outcome = "dead_lettered"
                await self._dead_letter(msg, exc.reason)
            except Transient as exc:
                outcome = "retry"
                if isinstance(exc, DependencyDown) and self.on_dependency_down is not None:
                    # Close the readiness gate at once rather than at its next check.
                    self.on_dependency_down()
                delay = exc.delay if exc.delay is not None else backoff_for(delivered)
                self.log.warning("transient", reason=exc.reason, delay=delay, **ids)
                await self._nak_or_bury(msg, delay, exc.reason)
            except (nats.errors.Error, TimeoutError, ConnectionError) as exc:
                # The broker went away under the handler (a publish timed out): not a bug.
                outcome = "retry"
                delay = backoff_for(delivered)
                self.log.warning("broker_unavailable", error=repr(exc), delay=delay, **ids)
                await self._nak_or_bury(msg, delay, f"broker unavailable: {exc!r}")
            except Exception as exc:
                outcome = "error"
                self.log.exception("handler_failed", **ids)
                await self._nak_or_bury(msg, backoff_for(delivered), f"handler error: {exc!r}")
            span.set_attribute("baton.outcome", outcome)
            for key in ("message_id", "conversation_id", "run_id"):
                if key in ids:
                    span.set_attribute(f"baton.{key}", str(ids[key]))
            if outcome in ("error", "dead_lettered"):
                span.set_status(trace.Status(trace.StatusCode.ERROR, outcome))
        elapsed = time.perf_counter() - started
        handled = self._handled.get(outcome)
        if handled is None:
            handled = self._handled[outcome] = metrics.handled.labels(durable, outcome)
        handled.inc()
        self._handle_seconds.observe(elapsed)
        self.log.info("handled", outcome=outcome, duration_ms=round(elapsed * 1000, 2), **ids)

    async def _exhausted(self, event: T, msg: Msg, ids: dict[str, Any]) -> None:
        """Run ``on_exhausted`` before the dead letter, for at most ``EXHAUSTED_HOOK_S``. Best
        effort, like the estimate a redelivery makes: a hook that fails or hangs is logged and
        the dead letter goes anyway."""
        if self.on_exhausted is None:
            return
        try:
            await asyncio.wait_for(self.on_exhausted(event, msg), EXHAUSTED_HOOK_S)
        except Exception as exc:  # TimeoutError included: the letter must not wait for ever
            self.log.warning("exhausted_hook_failed", error=repr(exc), **ids)

    async def _nak_or_bury(self, msg: Msg, delay: float, reason: str) -> None:
        if msg.metadata.num_delivered >= self.spec.max_deliver:
            await self._dead_letter(msg, f"max deliveries reached; last error: {reason}")
            return
        try:
            await msg.nak(delay=delay)
        except Exception as exc:  # without the nak, ack_wait redelivers it anyway
            self.log.warning("nak_failed", error=str(exc))

    async def _dead_letter(self, msg: Msg, reason: str) -> None:
        meta = msg.metadata
        letter = messages.DeadLetter(
            stream=meta.stream,
            consumer=self.spec.durable,
            subject=msg.subject,
            stream_seq=meta.sequence.stream,
            deliveries=meta.num_delivered,
            reason=reason[:2000],
            headers={k: v for k, v in (msg.headers or {}).items()},
            payload=msg.data,
            failed_at=datetime.now(UTC),
        )
        try:
            await self.bus.publish(
                dead_letter(meta.stream, self.spec.durable),
                letter,
                msg_id=f"dlq:{meta.stream}:{self.spec.durable}:{meta.sequence.stream}",
            )
        except Exception as exc:
            # Without a copy in the dead-letter stream, terminating would lose the message.
            self.log.error("dead_letter_publish_failed", error=str(exc))
            try:
                await msg.nak(delay=5.0)
            except Exception as nak_exc:  # without the nak, ack_wait redelivers it anyway
                self.log.warning("nak_failed", error=str(nak_exc))
            return
        self.bus.metrics.dead_letters.labels(self.spec.durable).inc()
        self.log.error("dead_lettered", reason=reason[:500], subject=msg.subject)
        await msg.term()


async def run_consumers(
    consumers: list[Consumer[Any]], stop: asyncio.Event, grace_s: float
) -> None:
    """Run consumers until stop; if one crashes, stop all so the supervisor restarts the process."""
    tasks = [asyncio.create_task(c.run(stop, grace_s)) for c in consumers]
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    stopper.cancel()
    for task in done:
        if task is not stopper and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
