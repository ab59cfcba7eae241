"""The JetStream bus: connect, bind to provisioned consumers, fetch, ack policy, publish with ids."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
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

from shared import messages, tracing
from shared.config import BaseSettings, nats_servers
from shared.errors import BadData, Deferred, DependencyDown, SchemaError, Transient
from shared.metrics import ServiceMetrics
from shared.subjects import ConsumerSpec, dead_letter, inbox_prefix

T = TypeVar("T")

# Redelivery delays for transient trouble: bounded, growing with the delivery count.
BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
# How often each replica reads its consumer's backlog into the pending gauges (one request).
LAG_REFRESH_S = 5.0


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

    @classmethod
    async def connect(
        cls,
        settings: BaseSettings,
        service: str,
        metrics: ServiceMetrics,
        log: structlog.stdlib.BoundLogger,
        attempts: int = 60,
    ) -> Bus:
        """Connect, retrying the first connection too; later drops reconnect forever."""

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
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.5,
            "connect_timeout": 2,
        }
        if settings.nats_user:
            options["user"] = settings.nats_user
            options["password"] = str(settings.nats_password)
        last: Exception | None = None
        for attempt in range(attempts):
            try:
                nc = await nats.connect(**options)
                return cls(nc, service, metrics, log)
            except (OSError, nats.errors.Error, TimeoutError) as exc:
                last = exc
                log.warning("nats_connect_failed", attempt=attempt + 1, error=str(exc))
                await asyncio.sleep(min(0.2 * (attempt + 1), 2.0))
        raise ConnectionError(f"could not connect to NATS at {settings.nats_url}: {last}")

    async def publish(
        self,
        subject: str,
        event: msgspec.Struct,
        msg_id: str,
        headers: dict[str, str] | None = None,
        timeout: float = 5.0,
    ) -> PubAck:
        """Publish with ``Nats-Msg-Id`` and wait for the PubAck (a duplicate is not an error)."""
        with tracing.producer_span(subject, msg_id):
            hdrs = tracing.inject(dict(headers or {}))
            hdrs["Nats-Msg-Id"] = msg_id
            ack = await self.js.publish(
                subject, messages.encode(event), timeout=timeout, headers=hdrs
            )
        family = ".".join(subject.split(".", 2)[:2])
        self.metrics.published.labels(family, str(bool(ack.duplicate)).lower()).inc()
        return ack

    async def close(self) -> None:
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


class Consumer(Generic[T]):
    """Fetches from one provisioned durable and runs a handler per message, acking after it.

    Outcomes: the handler returns → ack; ``BadData`` (or an undecodable payload) → the
    message is copied into the dead-letter stream with its reason and terminated;
    ``Transient`` → nak with a bounded backoff; anything else is a bug → logged, nak, and
    after ``max_deliver`` deliveries it is dead-lettered rather than silently dropped.
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
        lag_refresh_s: float = LAG_REFRESH_S,
    ) -> None:
        self.bus = bus
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

    async def run(self, stop: asyncio.Event, grace_s: float = 20.0) -> None:
        """Fetch and handle until ``stop`` is set, then let in-flight work finish."""
        sub = await self._bind(stop)
        heartbeat = asyncio.create_task(self._heartbeat(stop))
        lag = asyncio.create_task(self._watch_lag())
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
                try:
                    msgs = await sub.fetch(min(self.batch, free), timeout=1.0)
                except TimeoutError:
                    # No message within the fetch window (nats' own and asyncio's timeouts alike).
                    continue
                except (nats.errors.Error, OSError) as exc:
                    self.log.warning("fetch_failed", error=repr(exc))
                    await asyncio.sleep(0.5)
                    continue
                for msg in msgs:
                    task = asyncio.create_task(self._handle(msg))
                    self.inflight[task] = msg
                    task.add_done_callback(self.inflight.pop)
        finally:
            if self.inflight:
                # Unacked work past the grace period is redelivered elsewhere, never lost.
                await asyncio.wait(list(self.inflight), timeout=grace_s)
            heartbeat.cancel()
            lag.cancel()
            try:
                await sub.unsubscribe()
            except Exception as exc:  # the connection may already be gone at shutdown
                self.log.debug("unsubscribe_failed", error=str(exc))

    async def _bind(self, stop: asyncio.Event) -> Any:
        # Services only bind: creating consumers is provisioning's job (and its permission).
        while True:
            try:
                sub = await self.bus.js.pull_subscribe_bind(
                    durable=self.spec.durable, stream=self.spec.stream
                )
                await self._learn_ack_wait()
                return sub
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

    async def _watch_lag(self) -> None:
        # Backlog per consumer for dashboards and alerts; a failed read keeps the last value.
        durable = self.spec.durable
        metrics = self.bus.metrics
        while True:
            try:
                info = await self.bus.js.consumer_info(self.spec.stream, durable)
            except Exception as exc:  # a failed read only leaves the gauges a little stale
                self.log.debug("consumer_info_failed", error=repr(exc))
            else:
                metrics.consumer_pending.labels(durable).set(info.num_pending or 0)
                metrics.consumer_ack_pending.labels(durable).set(info.num_ack_pending or 0)
            await asyncio.sleep(self.lag_refresh_s)

    async def _heartbeat(self, stop: asyncio.Event) -> None:
        # Long handlers (a model stream) must not be redelivered while they are healthy.
        while True:
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
                if getattr(event, "v", 1) > messages.SCHEMA_VERSION:
                    raise SchemaError(f"unknown schema version {getattr(event, 'v', None)}")
                outcome = await self.handler(event, msg)
                await msg.ack_sync()
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
        metrics.handled.labels(durable, outcome).inc()
        metrics.handle_seconds.labels(durable).observe(elapsed)
        self.log.info("handled", outcome=outcome, duration_ms=round(elapsed * 1000, 2), **ids)

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
            await msg.nak(delay=5.0)
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
