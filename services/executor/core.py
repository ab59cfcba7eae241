"""Pure executor logic: the prompt from history, tool_use parsing, delta coalescing, failure classes."""

from __future__ import annotations

from typing import Any, Literal

import anthropic
import msgspec

from shared.history import Turn, assistant_blocks, estimate_tokens, newest_within
from shared.messages import ErrorClass, ToolCall, ToolSpec, input_digest

__all__ = ["Turn", "assistant_blocks", "estimate_tokens"]


def build_messages(history: list[Turn], budget_tokens: int) -> list[dict[str, Any]]:
    """Recent history that fits the budget, oldest dropped first, as alternating API turns.

    The API wants turns that alternate and start with the user, so neighbours with the same
    role are merged and a leading assistant turn is dropped.
    """
    kept = newest_within(history, budget_tokens)
    merged: list[dict[str, Any]] = []
    for turn in kept:
        content: str | list[dict[str, Any]] = list(turn.blocks) if turn.blocks else turn.content
        if merged and merged[-1]["role"] == turn.role:
            before = merged[-1]["content"]
            if isinstance(before, str) and isinstance(content, str):
                merged[-1]["content"] = before + "\n\n" + content
            else:
                merged[-1]["content"] = _as_blocks(before) + _as_blocks(content)
        else:
            merged.append({"role": turn.role, "content": content})
    while merged and merged[0]["role"] != "user":
        merged.pop(0)
    # A window that starts inside a tool exchange would begin with tool_result blocks whose
    # tool_use was cut off, which the API refuses: such a leading user turn is dropped too.
    while merged and _has_tool_results(merged[0]["content"]):
        merged.pop(0)
        while merged and merged[0]["role"] != "user":
            merged.pop(0)
    return merged


def _as_blocks(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    return content


def _has_tool_results(content: str | list[dict[str, Any]]) -> bool:
    return isinstance(content, list) and any(b.get("type") == "tool_result" for b in content)


def api_tools(tools: tuple[ToolSpec, ...]) -> list[dict[str, Any]]:
    """The ``tools`` parameter of a call: exactly the tools policy granted the task."""
    return [t.api() for t in tools]


class ToolUses:
    """Assembles ``tool_use`` content blocks from a stream's events (``content_block_start``
    names the call, ``input_json_delta`` pieces carry its input as partial JSON).

    The input is the model's output, so it is not trusted (I7): text that does not parse as
    JSON is kept as a string, for policy to refuse (``invalid``); nothing here raises.
    """

    def __init__(self) -> None:
        self.open: dict[int, tuple[str, str, list[str], Any]] = {}
        self.done: list[ToolCall] = []

    def start(self, index: int, block_id: str, name: str, initial: Any = None) -> None:
        self.open[index] = (block_id, name, [], initial)

    def delta(self, index: int, partial_json: str) -> None:
        if index in self.open:
            self.open[index][2].append(partial_json)

    def stop(self, index: int) -> None:
        opened = self.open.pop(index, None)
        if opened is None:
            return
        block_id, name, parts, initial = opened
        raw = "".join(parts)
        value: Any
        if not raw.strip():
            # No deltas: the start block's input is the whole input (the non-streamed shape).
            value = initial if initial is not None else {}
        else:
            try:
                value = msgspec.json.decode(raw)
            except (msgspec.DecodeError, RecursionError):
                value = raw
        self.done.append(
            ToolCall(id=block_id, name=name, input=value, input_digest=input_digest(value))
        )

    def calls(self) -> tuple[ToolCall, ...]:
        """The finished calls in stream order (a block never stopped is not a call)."""
        return tuple(self.done)


ToolStep = Literal["invalid", "republish", "expired", "start", "rerun", "unknown"]


def tool_step(
    recorded: Literal["none", "started", "finished"],
    idempotent: bool,
    digest_matches: bool,
    expired: bool,
) -> ToolStep:
    """What one delivery of a tool task does, from the call's own record (I8).

    ``invalid``: the input is not what was authorized, never run. ``republish``: it finished
    before, send that result again. ``expired``: not started and past its deadline. ``start``:
    never started, write ``started`` and run it. ``rerun``: started, never finished, and
    idempotent: run again with the call id as key. ``unknown``: started, never finished, not
    idempotent: it may have run, so it is not run again.
    """
    if not digest_matches:
        return "invalid"
    if recorded == "finished":
        return "republish"
    if recorded == "started":
        return "rerun" if idempotent else "unknown"
    return "expired" if expired else "start"


def tool_result_text(content: Any, structured: Any = None) -> str:
    """What a tool returned, as the text of a ``tool_result`` block: its text parts joined;
    structured content (JSON) when it has no text; other parts (images, …) named only."""
    texts: list[str] = []
    for part in content or ():
        kind = getattr(part, "type", None)
        text = getattr(part, "text", None)
        if kind == "text" and isinstance(text, str):
            texts.append(text)
        elif kind:
            texts.append(f"[{kind} content]")
    if not texts and structured is not None:
        return msgspec.json.encode(structured).decode()
    return "\n".join(texts)


def system_blocks(prompt: str) -> list[dict[str, Any]]:
    """The stable prefix, marked for prompt caching so long conversations cost less."""
    return [{"type": "text", "text": prompt, "cache_control": {"type": "ephemeral"}}]


class Coalescer:
    """Groups tiny deltas so a fast model does not flood the bus with one message per token."""

    def __init__(self, max_chars: int, max_age_s: float) -> None:
        self.max_chars = max_chars
        self.max_age_s = max_age_s
        self.buffer: list[str] = []
        self.size = 0
        self.first_at = 0.0
        self.taken = 0  # how many added pieces the last batch joined

    def add(self, text: str, now: float) -> str | None:
        """Buffer ``text``; return the batch to publish when it is big or old enough."""
        if not self.buffer:
            self.first_at = now
        self.buffer.append(text)
        self.size += len(text)
        if self.size >= self.max_chars or now - self.first_at >= self.max_age_s:
            return self.flush()
        return None

    def flush(self) -> str | None:
        if not self.buffer:
            return None
        out = "".join(self.buffer)
        self.taken = len(self.buffer)
        self.buffer.clear()
        self.size = 0
        return out


class CallAborted(Exception):
    """Policy stopped this call (a cancel, or its deadline passed); not a model failure."""


def _is_transport_timeout(exc: BaseException) -> bool:
    """A read that stalls mid-stream surfaces as the HTTP library's timeout, not the SDK's.

    The SDK's transport (httpx or its fork) is matched by class name, so an SDK upgrade that
    swaps the transport does not silently turn stalls into cut streams.
    """
    seen: BaseException | None = exc
    while seen is not None:
        names = {cls.__name__ for cls in type(seen).__mro__}
        if "TimeoutException" in names or isinstance(seen, TimeoutError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def classify(exc: BaseException) -> ErrorClass:
    """The failure class policy decides retries on."""
    if isinstance(exc, CallAborted):
        return "cancelled"
    if isinstance(exc, anthropic.APITimeoutError) or _is_transport_timeout(exc):
        return "timeout"
    if isinstance(exc, anthropic.APIConnectionError):
        return "server_error"
    if isinstance(exc, anthropic.APIStatusError):
        if exc.status_code == 200:
            # An error event mid-stream arrives with the 200 of the stream that carried it.
            body = exc.body if isinstance(exc.body, dict) else {}
            err = body.get("error", {}) if isinstance(body.get("error"), dict) else {}
            kind = err.get("type", "")
            if kind == "overloaded_error":
                return "overloaded"
            if kind == "rate_limit_error":
                return "rate_limited"
            return "cut_stream"
        if exc.status_code == 429:
            return "rate_limited"
        if exc.status_code == 529:
            return "overloaded"
        if exc.status_code == 408:
            return "timeout"
        if exc.status_code >= 500:
            return "server_error"
        return "bad_request"
    return "cut_stream"
