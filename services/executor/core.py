"""Pure executor logic: the prompt from history, delta coalescing, failure classes."""

from __future__ import annotations

from typing import Any

import anthropic

from shared.history import Turn, estimate_tokens, newest_within
from shared.messages import ErrorClass

__all__ = ["Turn", "estimate_tokens"]


def build_messages(history: list[Turn], budget_tokens: int) -> list[dict[str, Any]]:
    """Recent history that fits the budget, oldest dropped first, as alternating API turns.

    The API wants turns that alternate and start with the user, so neighbours with the same
    role are merged and a leading assistant turn is dropped.
    """
    kept = newest_within(history, budget_tokens)
    merged: list[dict[str, Any]] = []
    for turn in kept:
        if merged and merged[-1]["role"] == turn.role:
            merged[-1]["content"] += "\n\n" + turn.content
        else:
            merged.append({"role": turn.role, "content": turn.content})
    while merged and merged[0]["role"] != "user":
        merged.pop(0)
    return merged


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
