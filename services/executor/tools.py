"""The executor's tool runner: one authorized ``ToolTask`` → at most one invocation over MCP →
one ``ToolResult``; a redelivered task never runs a non-idempotent tool a second time (I8)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from services.executor import core
from shared import messages as m
from shared import subjects
from shared.bus import Bus
from shared.errors import Transient
from shared.metrics import ServiceMetrics

EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
WRONG_LAST_SEQUENCE = 10071  # JetStream's error code for a failed expected-sequence check
_record = msgspec.json.Decoder(m.ToolCallRecord)


class Unreachable(Exception):
    """The MCP server could not be reached before the call was sent: the tool did not run."""


class ToolCallError(Exception):
    """The MCP request failed after it was sent (the tool may or may not have run)."""


class McpTools:
    """Calls tools on MCP servers with the official ``mcp`` client (streamable HTTP or stdio).

    ``servers`` maps a server's name (as policy names it in the task) to its URL, or to a
    stdio command line (``envs``: extra environment per stdio server). A session per call:
    simple, and no state survives a crash.
    """

    def __init__(
        self,
        servers: dict[str, str | list[str]],
        envs: dict[str, dict[str, str]] | None = None,
        list_ttl_s: float = 300.0,
    ) -> None:
        self.servers = servers
        self.envs = envs or {}
        self.list_ttl_s = list_ttl_s
        # The servers' own tool descriptions (tools/list), by server: (fetched at, by name).
        self._listed: dict[str, tuple[float, dict[str, tuple[str, dict[str, Any]]]]] = {}

    async def described(self, server: str) -> dict[str, tuple[str, dict[str, Any]]]:
        """The server's tools as it describes them (``tools/list``): name -> (description,
        input schema), cached ``list_ttl_s``; empty when the server cannot be asked."""
        now = time.monotonic()
        cached = self._listed.get(server)
        if cached is not None and now - cached[0] < self.list_ttl_s:
            return cached[1]
        from mcp import Client

        found: dict[str, tuple[str, dict[str, Any]]] = {}
        try:
            async with asyncio.timeout(10):
                async with Client(self._target(server), read_timeout_seconds=10) as client:
                    listed = await client.list_tools()
            for tool in listed.tools:
                schema = tool.input_schema if isinstance(tool.input_schema, dict) else {}
                found[tool.name] = (tool.description or "", schema)
        except Exception:
            return cached[1] if cached is not None else {}  # asked again at the next call
        self._listed[server] = (now, found)
        return found

    async def complete(self, specs: tuple[m.ToolSpec, ...]) -> tuple[m.ToolSpec, ...]:
        """The granted tools with the description and schema the policy file left out taken
        from their server (a spec with a description of its own is sent as policy wrote it)."""
        out = []
        for spec in specs:
            if spec.description:
                out.append(spec)
                continue
            own = (await self.described(spec.server)).get(spec.name)
            if own is None:
                out.append(spec)
                continue
            description, schema = own
            default_schema = spec.input_schema == {"type": "object"}
            out.append(
                msgspec.structs.replace(
                    spec,
                    description=description,
                    input_schema=schema if default_schema and schema else spec.input_schema,
                )
            )
        return tuple(out)

    def _target(self, server: str) -> Any:
        from mcp import StdioServerParameters

        where = self.servers.get(server)
        if where is None:
            raise Unreachable(f"no MCP server {server!r} is configured")
        if isinstance(where, list):
            env = self.envs.get(server)
            return StdioServerParameters(command=where[0], args=where[1:], env=env or None)
        return where

    async def call(
        self, server: str, name: str, arguments: dict[str, Any], key: str, timeout_s: float
    ) -> tuple[bool, str]:
        """``(is_error, text)`` of one call; ``key`` goes in ``_meta`` as its idempotency key.

        Raises ``Unreachable`` when nothing was sent (within ``CONNECT_S``), ``TimeoutError``
        when the tool did not answer within ``timeout_s`` of the call going out,
        ``ToolCallError`` for a protocol failure after the call went out.
        """
        from mcp import Client, MCPError

        target = self._target(server)
        # The SDK's own per-request bound stays past both of ours, so a slow answer is always
        # our TimeoutError (outcome timeout), never the SDK's request-timeout error.
        client = Client(target, read_timeout_seconds=max(timeout_s, CONNECT_S) + 5.0)
        try:
            async with asyncio.timeout(CONNECT_S):
                await client.__aenter__()
        except Exception as exc:
            # Connecting and the handshake come before the call: nothing ran yet.
            raise Unreachable(f"MCP server {server!r} unreachable: {exc!r}"[:300]) from exc
        try:
            async with asyncio.timeout(timeout_s):
                meta = {IDEMPOTENCY_KEY: key} if key else None
                result = await client.call_tool(name, arguments, meta=meta)  # type: ignore[arg-type]
        except TimeoutError:
            raise
        except MCPError as exc:
            raise ToolCallError(f"MCP error: {exc}"[:2000]) from exc
        except Exception as exc:
            raise ToolCallError(f"MCP call failed: {exc!r}"[:2000]) from exc
        finally:
            try:
                async with asyncio.timeout(5):
                    await client.__aexit__(None, None, None)
            except BaseException as exc:  # closing a broken session must not hide the outcome
                if isinstance(exc, asyncio.CancelledError):
                    raise
        return bool(result.is_error), core.tool_result_text(
            result.content, result.structured_content
        )


IDEMPOTENCY_KEY = "idempotency_key"  # the _meta key baton's MCP server honours (docs/tools.md)
# The bound on reaching a server and its handshake (a stdio server's start included), apart
# from the tool's own timeout_s: a slow start is "unreachable" (nothing ran), never a tool that
# timed out, and a loaded machine's slow start does not eat a short tool's budget.
CONNECT_S = 10.0


def _state(last: tuple[m.ToolCallRecord, int] | None) -> Literal["none", "started", "finished"]:
    """The call's record as ``core.tool_step`` reads it (a finished record without its result
    counts as started only: nothing to republish)."""
    if last is None:
        return "none"
    return "finished" if last[0].state == "finished" and last[0].result is not None else "started"


class ToolRunner:
    """The inbound edge for ``tool.task.>`` (durable ``executor-tools``)."""

    def __init__(self, bus: Bus, tools: McpTools, metrics: ServiceMetrics) -> None:
        self.bus = bus
        self.tools = tools
        self.calls = metrics.counter(
            "tool_calls_total", "Tool tasks handled, by tool and outcome.", ("tool", "outcome")
        )
        self.executions = metrics.counter(
            "tool_executions_total",
            "Tool invocations sent to MCP servers, by tool and outcome (ok, error, timeout).",
            ("tool", "outcome"),
        )
        self.seconds = metrics.histogram(
            "tool_seconds", "Duration of a tool invocation, by tool.", ("tool",)
        )

    async def task(self, t: m.ToolTask, msg: Msg) -> str:
        delivery = msg.metadata.num_delivered
        subject = subjects.tool_call_record(t.run_id, t.call.id)
        valid = m.input_digest(t.call.input) == t.call.input_digest and isinstance(
            t.call.input, dict
        )
        last = await self._last_record(subject) if valid else None
        expired = t.deadline is not None and datetime.now(UTC) > t.deadline
        step = core.tool_step(_state(last), t.idempotent, valid, expired)
        if step == "start":
            seq = await self._mark_started(t, subject, delivery)
            if seq is None:
                # Another delivery wrote ``started`` between our read and our write.
                last = await self._last_record(subject)
                if last is None:
                    raise Transient("the call's started record was not readable")
                step = core.tool_step(_state(last), t.idempotent, valid, expired)
            else:
                last = (
                    m.ToolCallRecord(
                        call_id=t.call.id, state="started", delivery=delivery, at=datetime.now(UTC)
                    ),
                    seq,
                )
        if step == "invalid":
            # Never run arguments other than the ones authorized (I8).
            bad = "the call's input does not match its authorized digest (or is not an object)"
            await self._publish(t, self._result(t, "invalid", bad))
        elif step == "expired":
            await self._publish(t, self._result(t, "timeout", "not started: the deadline passed"))
        elif step == "republish":
            # Finished before (the ack of that delivery was lost): the same result again.
            assert last is not None and last[0].result is not None
            await self._publish(t, last[0].result)
        elif step == "unknown":
            assert last is not None
            unknown = self._result(
                t,
                "unknown",
                "the outcome of this call is unknown: it was started once and interrupted; "
                "it was not run again because the tool is not idempotent",
            )
            await self._finish(t, subject, last[1], delivery, unknown)
        else:  # start (this delivery wrote ``started``) or rerun (idempotent, with its key)
            assert last is not None
            await self._finish(t, subject, last[1], delivery, await self._invoke(t))
        return step

    async def _invoke(self, t: m.ToolTask) -> m.ToolResult:
        started = time.perf_counter()
        executions = 1
        try:
            # Only an idempotent tool gets a key: it is what makes running it again safe.
            key = t.call.id if t.idempotent else ""
            is_error, text = await self.tools.call(
                t.server, t.call.name, t.call.input, key, t.timeout_s
            )
            outcome: m.ToolOutcome = "error" if is_error else "ok"
        except Unreachable as exc:
            outcome, text, executions = "error", str(exc), 0
        except TimeoutError:
            outcome = "timeout"
            text = f"the tool did not answer within {t.timeout_s:g} s; it may have run"
        except ToolCallError as exc:
            outcome, text = "error", str(exc)
        elapsed = time.perf_counter() - started
        self.seconds.labels(t.call.name).observe(elapsed)
        if executions:
            self.executions.labels(t.call.name, outcome).inc()
        return self._result(t, outcome, text, executions=executions, duration_s=elapsed)

    def _result(
        self,
        t: m.ToolTask,
        outcome: m.ToolOutcome,
        content: str,
        executions: int = 0,
        duration_s: float = 0.0,
    ) -> m.ToolResult:
        return m.ToolResult(
            event_id=f"toolresult:{m.call_key(t.run_id, t.call.id)}",
            message_id=t.message_id,
            conversation_id=t.conversation_id,
            project_id=t.project_id,
            causation_id=t.event_id,
            run_id=t.run_id,
            round=t.round,
            call_id=t.call.id,
            name=t.call.name,
            outcome=outcome,
            is_error=outcome != "ok",
            content=content[:100_000],
            input_digest=t.call.input_digest,
            executions=executions,
            duration_s=round(duration_s, 6),
        )

    async def _last_record(self, subject: str) -> tuple[m.ToolCallRecord, int] | None:
        try:
            raw = await self.bus.js.get_last_msg(subjects.STREAM_TOOLS, subject)
        except nats.js.errors.NotFoundError:
            return None
        assert raw.data is not None and raw.seq is not None
        return _record.decode(raw.data), raw.seq

    async def _mark_started(self, t: m.ToolTask, subject: str, delivery: int) -> int | None:
        """The started record's sequence when this delivery wrote it; None when one existed."""
        record = m.ToolCallRecord(
            call_id=t.call.id, state="started", delivery=delivery, at=datetime.now(UTC)
        )
        try:
            ack = await self.bus.publish(
                subject,
                record,
                # Per delivery: a retried publish of this delivery is a duplicate (ours), while
                # an earlier delivery's record fails the expected-sequence check.
                msg_id=f"started:{m.call_key(t.run_id, t.call.id)}:{delivery}",
                headers={EXPECTED_LAST_SUBJECT_SEQ: "0"},
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code == WRONG_LAST_SEQUENCE:
                return None
            raise
        return int(ack.seq)

    async def _finish(
        self, t: m.ToolTask, subject: str, started_seq: int, delivery: int, result: m.ToolResult
    ) -> None:
        """Record the result on the call's subject, then publish it for policy and the persister.

        In this order, a crash between the two republishes the same result on redelivery.
        """
        record = m.ToolCallRecord(
            call_id=t.call.id,
            state="finished",
            delivery=delivery,
            at=datetime.now(UTC),
            result=result,
        )
        try:
            await self.bus.publish(
                subject,
                record,
                msg_id=f"finished:{m.call_key(t.run_id, t.call.id)}",
                headers={EXPECTED_LAST_SUBJECT_SEQ: str(started_seq)},
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code != WRONG_LAST_SEQUENCE:
                raise
            last = await self._last_record(subject)
            if last is not None and last[0].result is not None:
                result = last[0].result  # another delivery finished first: its result stands
        await self._publish(t, result)

    async def _publish(self, t: m.ToolTask, result: m.ToolResult) -> None:
        self.calls.labels(t.call.name, result.outcome).inc()
        try:
            await self.bus.publish(
                subjects.tool_result(t.project_id, t.conversation_id),
                result,
                msg_id=result.event_id,
            )
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            raise Transient(f"tool result not published: {exc!r}") from exc
