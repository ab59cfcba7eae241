"""Offline Anthropic-compatible Messages API server with pacing, fault injection and counters."""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import hashlib
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

Scope = MutableMapping[str, Any]
AsgiMessage = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[AsgiMessage]]
Send = Callable[[AsgiMessage], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


class FaultRule(msgspec.Struct, forbid_unknown_fields=True):
    """One injected failure; each matching request consumes one `count` (< 0 = unlimited)."""

    # Two kinds are no errors: "slow" sends the reply's deltas `stall_seconds` apart (a very slow
    # stream); "tool_input" answers a forced tool call with `tool_input` verbatim (hostile output),
    # and with tools offered (tool_choice auto) makes the model call `tool_name` (any name, also
    # one not offered) with `tool_input` verbatim.
    kind: Literal["400", "429", "500", "529", "midstream_error", "stall", "slow", "tool_input"]
    count: int = 1
    match: str = ""  # substring of the last user message; "" matches every request
    model: str = ""  # only requests for this model; "" matches every model
    after_tokens: int = 3  # deltas sent before a midstream error or stall; stall < 0 = no headers
    stall_seconds: float = 3600.0
    retry_after: int = 1
    tool_input: Any = None
    tool_name: str = ""


Fault = FaultRule | None


Style = Literal["readable", "hostile"]


class ModelSettings(msgspec.Struct):
    """Pace, reply shape and initial faults of the offline model.

    ``style``: "readable" (the default, what a person trying baton without a key sees) answers
    sentences: that this is baton's offline model, what it understood, how to set a real key;
    ``words_per_reply`` pads it with more plain sentences. "hostile" answers the test mix:
    exactly ``words_per_reply`` words of typographic quotes, accents and emoji.
    """

    ttft_ms: float = 0
    tokens_per_second: float = 0
    words_per_reply: int = 24
    seed: str = ""
    faults: list[FaultRule] = msgspec.field(default_factory=list)
    max_body_bytes: int = 32 * 1024 * 1024
    style: Style = "readable"


class _SettingsUpdate(msgspec.Struct, forbid_unknown_fields=True):
    ttft_ms: float | None = None
    tokens_per_second: float | None = None
    words_per_reply: int | None = None
    seed: str | None = None
    style: Style | None = None


class _FaultList(msgspec.Struct, forbid_unknown_fields=True):
    faults: list[FaultRule]


# Request shapes used only for validation; the raw dict is kept so extra fields survive.
class _Block(msgspec.Struct):
    type: str


class _Msg(msgspec.Struct):
    role: Literal["user", "assistant"]
    content: str | list[_Block]


class _Tool(msgspec.Struct):
    name: str


class _ToolChoice(msgspec.Struct):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None


class _CountRequest(msgspec.Struct, kw_only=True):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    messages: Annotated[list[_Msg], msgspec.Meta(min_length=1)]
    system: str | list[_Block] | None = None
    tools: list[_Tool] = []
    tool_choice: _ToolChoice | None = None


class _Request(_CountRequest, kw_only=True):
    max_tokens: Annotated[int, msgspec.Meta(ge=1)]
    stream: bool = False


# A client may tag a call so the ledger (GET /_control/calls) can be reconciled call by call.
CALL_ID_HEADER = "x-baton-call-id"
_INPUT_KEYS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
# Reply vocabulary; the typographic and multi-byte entries make clients exercise UTF-8 handling.
_WORDS = (
    "the", "quiet", "river", "carries", "light", "across", "old", "stones", "and", "every",
    "answer", "folds", "into", "another", "question", "while", "patient", "systems", "keep",
    "their", "promises", "café", "naïve", "déjà", "vu", "—", "“steady”", "signals", "travel",
    "far", "beyond", "the", "horizon", "of", "careful", "design", "🙂", "small", "steps",
)  # fmt: skip
_PLAIN = ("alpha", "bravo", "cedar", "delta", "ember", "fjord", "grove", "harbor", "island")
_LEVELS = (
    ("low", "simple", "easy", "trivial", "small"),
    ("medium", "moderate", "normal", "average"),
    ("high", "complex", "hard", "large"),
)
_FORMATS = {
    "date-time": "2024-01-01T00:00:00Z", "date": "2024-01-01", "time": "00:00:00",
    "uuid": "00000000-0000-4000-8000-000000000000", "email": "user@example.com",
    "uri": "https://example.com/", "duration": "PT1S", "decimal": "0",
}  # fmt: skip
_CODE_HINTS = ("```", "def ", "code", "python", "function", "bug", "compile", "script", "regex")
_GREETINGS = {"hi", "hello", "hey", "howdy", "greetings", "yo", "hiya"}
_QUESTION_WORDS = {"what", "why", "how", "who", "when", "where", "which", "can", "could", "is"}
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_FAULT_ERRORS = {
    "400": "invalid_request_error",
    "429": "rate_limit_error",
    "500": "api_error",
    "529": "overloaded_error",
}


class _BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.kind = message, status, kind


def _error_body(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


def _digest(*parts: Any) -> bytes:
    return hashlib.sha256(repr(parts).encode()).digest()


def _block_text(block: Any) -> str:
    if not isinstance(block, dict):
        return ""
    if isinstance(block.get("text"), str):
        return str(block["text"])
    if block.get("type") == "tool_use":
        return f"{block.get('name', '')} {block.get('input', '')}"
    content = block.get("content")
    if isinstance(content, list):
        return " ".join(_block_text(b) for b in content)
    return content if isinstance(content, str) else ""


def _segments(body: dict[str, Any]) -> list[tuple[str, bool]]:
    """Prompt text in order, each piece flagged when it carries `cache_control`."""
    out: list[tuple[str, bool]] = []
    for part in [body.get("system"), *(m["content"] for m in body["messages"])]:
        if isinstance(part, str):
            out.append((part, False))
        elif isinstance(part, list):
            out += [(_block_text(b), bool(b.get("cache_control"))) for b in part]
    return out


def count_input_tokens(body: dict[str, Any]) -> int:
    """Deterministic token count (words + punctuation) of a request's system + messages."""
    return max(1, sum(_tokens(text) for text, _ in _segments(body)))


@functools.lru_cache(maxsize=4096)
def _tokens(text: str) -> int:
    """Words and punctuation in ``text``; cached, as system prompts and history repeat."""
    return len(_TOKEN_RE.findall(text))


_REMIND_RE = re.compile(r"\b(?:remind me|create a task|add a task)(?: to)?\s+(.+)", re.I | re.S)
_ARITHMETIC_RE = re.compile(r"[-+(]*\d[\d.\s]*(?:[-+*/%]+[\s(]*\d[\d.\s)]*)+")


def _wanted_tool(text: str, offered: set[str]) -> tuple[str, dict[str, Any]] | None:
    """The tool call a user's message asks for, when that tool is offered (deterministic):
    "remind me to …" → ``create_task``, "what time …" → ``current_time``, arithmetic →
    ``calculator``; anything else is answered with text."""
    low = text.lower()
    remind = _REMIND_RE.search(text)
    if remind and "create_task" in offered:
        title = remind.group(1).strip().rstrip(".!?").strip()[:200] or "a task"
        return "create_task", {"title": title}
    if ("what time" in low or "the time" in low) and "current_time" in offered:
        return "current_time", {"timezone": "UTC"}
    arithmetic = _ARITHMETIC_RE.search(text)
    if arithmetic and "calculator" in offered:
        return "calculator", {"expression": arithmetic.group(0).strip()}
    return None


def _tool_results(message: dict[str, Any]) -> list[str]:
    """The texts of a user turn's tool_result blocks (none: it is not a tool_result turn)."""
    content = message.get("content")
    if message.get("role") != "user" or not isinstance(content, list):
        return []
    if content and isinstance(content[-1], dict) and content[-1].get("type") == "text":
        return []  # a new question after them (a later message): answered as a question
    out = []
    for block in content:
        if isinstance(block, dict) and block.get("type") == "tool_result":
            prefix = "(error) " if block.get("is_error") else ""
            out.append(prefix + _block_text(block))
    return out


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message["role"] == "user":
            return _block_text({"content": message["content"]})
    return ""


def _validate(body: Any, kind: type[_CountRequest]) -> dict[str, Any]:
    try:
        request = msgspec.convert(body, kind)
    except msgspec.ValidationError as exc:
        raise _BadRequest(f"invalid request: {exc}") from None
    choice, names = request.tool_choice, {t.name for t in request.tools}
    if choice is not None and choice.type == "tool" and choice.name not in names:
        raise _BadRequest(f"tool_choice: tool {choice.name!r} not found in tools")
    if choice is not None and choice.type == "any" and not names:
        raise _BadRequest("tool_choice: type 'any' requires at least one tool")
    assert isinstance(body, dict)  # convert() above only accepts JSON objects
    return body


class _Ctx:
    """What the schema filler knows about the prompt, so classifiers get sensible values."""

    def __init__(self, text: str, rng: random.Random) -> None:
        low = text.lower()
        first = (re.findall(r"[a-z']+", low) or [""])[0]
        self.rng = rng
        self.words = len(text.split())
        self.level = 0 if self.words < 12 else 1 if self.words < 60 else 2
        self.ambiguous = "?" in text and self.words < 3
        self.intent = "other"
        if any(hint in low for hint in _CODE_HINTS):
            self.intent = "code"
        elif first in _GREETINGS:
            self.intent = "greeting"
        elif "?" in text or first in _QUESTION_WORDS:
            self.intent = "question"


def _nullable(schema: Any) -> bool:
    if not isinstance(schema, dict):
        return False
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    options = schema.get("anyOf") or schema.get("oneOf") or []
    return "null" in kinds or any(isinstance(o, dict) and o.get("type") == "null" for o in options)


def _pick_enum(name: str, options: list[Any], ctx: _Ctx) -> Any:
    wanted: list[Any] = []
    if "action" in name:
        wanted = ["clarify", "answer"] if ctx.ambiguous else ["answer"]
    elif "complexity" in name:
        wanted = list(_LEVELS[ctx.level])
    elif "intent" in name:
        wanted = [ctx.intent, "other"]
    wanted.append(ctx.intent)  # lets e.g. an `executor` enum pick "code" for coding requests
    return next((w for w in wanted if w in options), options[0])


def _number(schema: dict[str, Any], name: str, ctx: _Ctx, integer: bool) -> int | float:
    def num(key: str, shift: float = 0) -> list[float]:
        value = schema.get(key)
        return [value + shift] if isinstance(value, int | float) else []

    step = 1 if integer else 0  # integers turn exclusive bounds into inclusive ones
    low = max(num("minimum") + num("exclusiveMinimum", step), default=None)
    high = min(num("maximum") + num("exclusiveMaximum", -step), default=None)
    want = min(512, 64 + 8 * ctx.words) if name.endswith("tokens") else [*num("default"), 1][0]
    if not integer:  # strictly inside the bounds satisfies both inclusive and exclusive ones
        if low is not None and high is not None and not low < want < high:
            return (low + high) / 2
        if low is not None and want <= low:
            return low + 1.0
        return high - 1.0 if high is not None and want >= high else float(want)
    multiple = [*num("multipleOf"), 1][0]
    want = math.ceil(max(want, low if low is not None else want) / multiple) * multiple
    if high is not None and want > high:
        want = math.floor(high / multiple) * multiple
    return int(want)


def _string(schema: dict[str, Any], name: str, ctx: _Ctx) -> str:
    if schema.get("format") in _FORMATS:
        return _FORMATS[schema["format"]]
    if schema.get("contentEncoding"):
        return ""  # empty base64 is valid bytes
    text = " ".join(ctx.rng.choice(_PLAIN) for _ in range(3))
    # msgspec emits datetimes as bare strings, so names are the only hint a timestamp is wanted.
    if name == "when" or name.endswith(("_at", "timestamp", "datetime")):
        text = _FORMATS["date-time"]
    elif "intent" in name:
        text = ctx.intent
    elif "complexity" in name:
        text = _LEVELS[ctx.level][0]
    elif "action" in name:
        text = "clarify" if ctx.ambiguous else "answer"
    limit, floor = schema.get("maxLength"), schema.get("minLength")
    text = text[:limit] if isinstance(limit, int) else text
    return text.ljust(floor, "x") if isinstance(floor, int) else text


def fill_schema(schema: Any, defs: dict[str, Any], name: str, ctx: _Ctx, depth: int = 0) -> Any:
    """A value conforming to a msgspec-style JSON Schema, shaped by field-name heuristics."""
    name = name.lower()
    if not isinstance(schema, dict) or depth > 24:
        return None
    if isinstance(schema.get("$ref"), str):
        target = defs.get(schema["$ref"].rsplit("/", 1)[-1])
        return fill_schema(target, defs, name, ctx, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return _pick_enum(name, schema["enum"], ctx)
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list):
            options = [o for o in schema[key] if isinstance(o, dict) and o.get("type") != "null"]
            return fill_schema(options[0], defs, name, ctx, depth + 1) if options else None
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        required = set(schema.get("required") or ())
        out: dict[str, Any] = {}
        for field, sub in (schema.get("properties") or {}).items():
            # Optional fields are filled only while shallow, which also ends recursive schemas.
            if field in required or (not _nullable(sub) and depth < 8):
                keep = field not in required and isinstance(sub, dict) and "default" in sub
                value = sub["default"] if keep else fill_schema(sub, defs, field, ctx, depth + 1)
                out[field] = value
        return out
    if kind == "array":
        prefix = schema.get("prefixItems") or []
        items = schema["items"] if isinstance(schema.get("items"), dict) else {}
        count = max(int(schema.get("minItems", 0)), len(prefix), 1 if depth < 8 else 0)
        count = min(count, schema["maxItems"]) if isinstance(schema.get("maxItems"), int) else count
        parts = [prefix[i] if i < len(prefix) else items for i in range(count)]
        return [fill_schema(part, defs, name, ctx, depth + 1) for part in parts]
    if kind in ("integer", "number"):
        return _number(schema, name, ctx, kind == "integer")
    if kind == "boolean":
        return schema.get("default") is True
    return None if kind == "null" else _string(schema, name, ctx)


@dataclass
class _Plan:
    """Everything one reply will contain, decided before any byte is sent."""

    model: str
    tool: dict[str, Any] | None
    chunks: list[str]
    stop_reason: str
    usage: dict[str, int]


class _Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        keys = ("calls", "completed", *_INPUT_KEYS, "output_tokens")
        self.in_flight: dict[str, int] = {}
        self.max_in_flight: dict[str, int] = {}
        self.totals: dict[str, int] = dict.fromkeys(keys, 0)
        self.errors: dict[str, int] = {}
        self.by_model: dict[str, dict[str, int]] = {}

    def bump(self, model: str | None, **deltas: int) -> None:
        blank = dict.fromkeys([*self.totals, "errors"], 0)
        row = self.by_model.setdefault(model, blank) if model else {}
        for key, n in deltas.items():
            self.totals[key] += n
            row[key] = row.get(key, 0) + n

    def error(self, model: str | None, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if model:
            self.bump(model)
            self.by_model[model]["errors"] += 1

    def enter(self, model: str) -> None:
        """One more call in flight; the most ever at once is kept per model."""
        self.in_flight[model] = self.in_flight.get(model, 0) + 1
        self.max_in_flight[model] = max(self.max_in_flight.get(model, 0), self.in_flight[model])

    def leave(self, model: str) -> None:
        self.in_flight[model] -= 1

    def snapshot(self) -> dict[str, Any]:
        return {
            **self.totals,
            "errors": dict(self.errors),
            "by_model": self.by_model,
            "max_in_flight": dict(self.max_in_flight),
        }


class _State:
    def __init__(self, settings: ModelSettings) -> None:
        # Copies so consuming fault counts never mutates the caller's settings object.
        self.settings = msgspec.structs.replace(settings, faults=[])
        self.faults = [msgspec.structs.replace(f) for f in settings.faults]
        self.cache: set[bytes] = set()
        self.stats = _Stats()
        self.ledger: dict[str, dict[str, Any]] = {}
        # The latest request bodies, so a test can check what a service put in its prompts.
        self.requests: collections.deque[dict[str, Any]] = collections.deque(maxlen=256)

    def take_fault(self, text: str, model: str = "") -> FaultRule | None:
        rule = next(
            (r for r in self.faults if r.count != 0 and r.match in text and r.model in ("", model)),
            None,
        )
        if rule is not None and rule.count > 0:
            rule.count -= 1
            self.faults = [r for r in self.faults if r.count != 0]
        return rule

    def plan(self, body: dict[str, Any], user_text: str, fault: Fault = None) -> _Plan:
        model, settings = body["model"], self.settings
        segments = _segments(body)
        counts = [_tokens(text) for text, _ in segments]
        usage = dict.fromkeys(_INPUT_KEYS, 0) | {"input_tokens": max(1, sum(counts))}
        marked = [i for i, (_, cached) in enumerate(segments) if cached]
        if marked:  # the real API bills the prefix up to the last cache_control block separately
            prefix = sum(counts[: marked[-1] + 1])
            key = _digest(model, [text for text, _ in segments[: marked[-1] + 1]])
            usage["input_tokens"] -= prefix
            hit = key in self.cache
            self.cache.add(key)
            usage["cache_read_input_tokens" if hit else "cache_creation_input_tokens"] = prefix
        rng = random.Random(_digest(model, body.get("system"), body["messages"], settings.seed))
        choice, tools = body.get("tool_choice") or {}, body.get("tools") or []
        if choice.get("type") in ("tool", "any"):
            tool = next(t for t in tools if choice["type"] == "any" or t["name"] == choice["name"])
            schema = tool.get("input_schema") or {}
            defs = schema.get("$defs", {}) if isinstance(schema, dict) else {}
            value = fill_schema(schema, defs, tool["name"], _Ctx(user_text, rng))
            if fault is not None and fault.kind == "tool_input":
                value = fault.tool_input
            tool_id = "toolu_" + os.urandom(12).hex()
            block = {"type": "tool_use", "id": tool_id, "name": tool["name"], "input": value}
            text = msgspec.json.encode(value).decode()
            chunks = [text[i : i + 12] for i in range(0, len(text), 12)]
            return _Plan(model, block, chunks, "tool_use", usage)
        if tools and choice.get("type", "auto") == "auto":
            results = _tool_results(body["messages"][-1])
            if fault is not None and fault.kind == "tool_input" and not results:
                name = fault.tool_name or tools[0]["name"]
                tool_id = "toolu_" + os.urandom(12).hex()
                block = {"type": "tool_use", "id": tool_id, "name": name, "input": fault.tool_input}
                text = msgspec.json.encode(fault.tool_input).decode()
                chunks = [text[i : i + 12] for i in range(0, len(text), 12)]
                return _Plan(model, block, chunks, "tool_use", usage)
            if results:
                # The turn after tool_result blocks: a final answer that uses the results.
                words = " ".join(results).split()[:60] or ["(no", "output)"]
                chunks = [w + " " for w in ["Done.", "The", "tool", "said:", *words[:-1]]]
                chunks.append(words[-1])
                stop = "end_turn" if len(chunks) <= body["max_tokens"] else "max_tokens"
                return _Plan(model, None, chunks[: body["max_tokens"]], stop, usage)
            wanted = _wanted_tool(user_text, {t["name"] for t in tools})
            if wanted is not None:
                name, value = wanted
                tool_id = "toolu_" + os.urandom(12).hex()  # unique like the API's, never reused
                block = {"type": "tool_use", "id": tool_id, "name": name, "input": value}
                text = msgspec.json.encode(value).decode()
                chunks = [text[i : i + 12] for i in range(0, len(text), 12)]
                return _Plan(model, block, chunks, "tool_use", usage)
        if settings.style == "readable":
            words = readable_reply(user_text, settings.words_per_reply)
            chunks = [w + " " for w in words[:-1]] + [words[-1]]
            if len(chunks) > body["max_tokens"]:
                return _Plan(model, None, chunks[: body["max_tokens"]], "max_tokens", usage)
            return _Plan(model, None, chunks, "end_turn", usage)
        echo = [word[:40] for word in user_text.split()[:5]]
        if echo:
            echo = ["You", "asked", "about", *echo[:-1], (echo[-1].rstrip(".?!,;:") or "it") + "."]
        target = max(1, settings.words_per_reply)
        words = (echo + [rng.choice(_WORDS) for _ in range(target)])[:target]
        chunks = [w + " " for w in words[:-1]] + [words[-1]]
        if len(chunks) > body["max_tokens"]:
            return _Plan(model, None, chunks[: body["max_tokens"]], "max_tokens", usage)
        return _Plan(model, None, chunks, "end_turn", usage)


_SEEN_AS = {
    "greeting": "a greeting",
    "question": "a question",
    "code": "a question about code",
    "other": "a message",
}
_MORE = (
    "This reply is a stand-in so you can try the page, the streams and the history end to end.",
    "Every word you see arrived as a streamed token, exactly as a real model's would.",
    "Your messages and these replies are stored like real ones, so reloading shows them again.",
)


def readable_reply(user_text: str, words_per_reply: int) -> list[str]:
    """The readable style's words: who answers, what it understood, how to get a real model.

    At least those three sentences; more plain sentences while ``words_per_reply`` asks for
    more words (a long stream that still reads as sentences).
    """
    kind = _SEEN_AS[_Ctx(user_text, random.Random(0)).intent]
    quoted = " ".join(user_text.split()[:12])
    quoted = quoted if len(quoted) <= 80 else quoted[:79].rstrip() + "…"
    if len(user_text.split()) > 12 or len(quoted) < len(" ".join(user_text.split())):
        quoted += " …"
    understood = f"I understood {kind}: “{quoted}”." if quoted else "Your message was empty."
    text = (
        "Hello! I am baton's offline model, a stand-in that answers when no API key is set, "
        f"so I cannot really answer yet. {understood} To talk to a real model, set "
        "ANTHROPIC_API_KEY in the environment and run baton up again."
    )
    words = text.split()
    i = 0
    while len(words) < words_per_reply:
        words += _MORE[i % len(_MORE)].split()
        i += 1
    return words


class _Watch:
    """Watches for the client hanging up so sleeps end early and tokens sent are exact."""

    def __init__(self, receive: Receive) -> None:
        self.gone = asyncio.Event()
        self._receive = receive
        # Started at the first real wait: a reply sent without waiting never needs it.
        self._task: asyncio.Future[None] | None = None

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone.set()

    async def sleep(self, seconds: float) -> bool:
        """Sleeps up to `seconds`; True when the client is gone."""
        if seconds > 0 and not self.gone.is_set():
            if self._task is None:
                self._task = asyncio.ensure_future(self._watch(self._receive))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.gone.wait(), seconds)
        return self.gone.is_set()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


def _headers(content_type: str, extra: dict[str, str] | None = None) -> list[tuple[bytes, bytes]]:
    headers = {
        "content-type": content_type,
        "request-id": "req_" + os.urandom(12).hex(),
        "anthropic-ratelimit-requests-limit": "4000",
        "anthropic-ratelimit-requests-remaining": "3999",
    } | (extra or {})
    return [(k.encode(), v.encode()) for k, v in headers.items()]


async def _send_json(
    send: Send, status: int, payload: Any, extra: dict[str, str] | None = None
) -> None:
    headers = _headers("application/json", extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": msgspec.json.encode(payload)})


def _frame(event: str, data: dict[str, Any]) -> bytes:
    payload = msgspec.json.encode({"type": event} | data)
    return b"event: %s\ndata: %s\n\n" % (event.encode(), payload)


# Frames that never change, encoded once; a delta is its prefix, the JSON string, the suffix.
_PING = _frame("ping", {})
_TEXT_START = _frame(
    "content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}
)
_BLOCK_STOP = _frame("content_block_stop", {"index": 0})
_MESSAGE_STOP = _frame("message_stop", {})
_DELTA_PREFIX = {
    kind: _frame("content_block_delta", {"index": 0, "delta": {"type": kind, field: ""}})[:-6]
    for kind, field in (("text_delta", "text"), ("input_json_delta", "partial_json"))
}
_DELTA_SUFFIX = b"}}\n\n"


def _message(plan: _Plan, streaming: bool) -> dict[str, Any]:
    text_block = {"type": "text", "text": "".join(plan.chunks)}
    content = [] if streaming else [plan.tool or text_block]
    return {
        "id": "msg_" + os.urandom(12).hex(), "type": "message", "role": "assistant",
        "model": plan.model, "content": content, "stop_sequence": None,
        "stop_reason": None if streaming else plan.stop_reason,
        # Like the real API, message_start reports 1 output token; message_delta has the total.
        "usage": plan.usage | {"output_tokens": 1 if streaming else len(plan.chunks)},
    }  # fmt: skip


async def _read_json(receive: Receive, limit: int) -> Any:
    chunks: list[bytes] = []
    size, more = 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionResetError("client went away while sending the body")
        size += len(message.get("body", b""))
        chunks += [message.get("body", b"")] if size <= limit else []
        more = bool(message.get("more_body"))
    if size > limit:
        raise _BadRequest(f"request body exceeds {limit} bytes", 413, "request_too_large")
    try:
        return msgspec.json.decode(b"".join(chunks))
    except (msgspec.MsgspecError, RecursionError) as exc:
        raise _BadRequest(f"request body is not valid JSON: {exc}") from None


async def _stream(
    state: _State, plan: _Plan, fault: Fault, watch: _Watch, send: Send, entry: dict[str, Any]
) -> None:
    settings, loop = state.settings, asyncio.get_running_loop()
    sent, done = 0, False
    # Frames due at the same moment go out in one write (same bytes, fewer syscalls on both
    # ends); whatever is pending is written before every wait, so pacing is what it was.
    pending: list[bytes] = []

    async def flush(more: bool = True) -> None:
        if pending or not more:
            body = b"".join(pending)
            pending.clear()
            await send({"type": "http.response.body", "body": body, "more_body": more})

    try:
        before_headers = fault is not None and fault.kind == "stall" and fault.after_tokens < 0
        if before_headers and fault is not None and await watch.sleep(fault.stall_seconds):
            return
        headers = _headers("text/event-stream; charset=utf-8", {"cache-control": "no-cache"})
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        pending.append(_frame("message_start", {"message": _message(plan, True)}))
        state.stats.bump(plan.model, **plan.usage)
        entry.update(plan.usage)
        if plan.tool:
            block = plan.tool | {"input": {}}
            pending.append(_frame("content_block_start", {"index": 0, "content_block": block}))
        else:
            pending.append(_TEXT_START)
        pending.append(_PING)
        prefix = _DELTA_PREFIX["input_json_delta" if plan.tool else "text_delta"]
        slow = fault is not None and fault.kind == "slow"
        cuts = fault is not None and fault.kind in ("midstream_error", "stall")
        cut = min(fault.after_tokens, len(plan.chunks)) if fault and cuts else -1
        gap = 1 / settings.tokens_per_second if settings.tokens_per_second > 0 else 0
        if slow and fault is not None:
            gap = fault.stall_seconds
        due = loop.time() + settings.ttft_ms / 1000
        for i in range(len(plan.chunks) + 1):
            if i == cut and fault is not None and fault.kind == "midstream_error":
                message = "Overloaded (injected mid-stream fault)"
                pending.append(_frame("error", _error_body("overloaded_error", message)))
                return await flush(more=False)
            if i == cut and fault is not None:  # a stall nobody timed out on resumes the pace
                await flush()
                if await watch.sleep(fault.stall_seconds):
                    return
                due = max(due, loop.time())
            if i == len(plan.chunks):
                break
            wait = due - loop.time()
            if wait > 0:
                await flush()
            if await watch.sleep(wait):
                break
            pending.append(prefix + msgspec.json.encode(plan.chunks[i]) + _DELTA_SUFFIX)
            if not slow:
                # The pace of now: a change through /_control/settings applies to a stream
                # under way too (tests hold a call open slowly, then let it finish).
                tps = state.settings.tokens_per_second
                gap = 1 / tps if tps > 0 else 0
            sent, due = sent + 1, due + gap
        if sent < len(plan.chunks):
            return await flush()
        pending.append(_BLOCK_STOP)
        stop = {"stop_reason": plan.stop_reason, "stop_sequence": None}
        usage = plan.usage | {"output_tokens": sent}
        pending += [_frame("message_delta", {"delta": stop, "usage": usage}), _MESSAGE_STOP]
        await flush(more=False)
        done = True
    finally:
        state.stats.bump(plan.model, output_tokens=sent, completed=int(done))
        entry["output_tokens"] = sent
        entry["outcome"] = "completed" if done else fault.kind if fault else "client_disconnected"
        if not done and fault is None:
            state.stats.error(plan.model, "client_disconnected")


async def _reply(
    state: _State, plan: _Plan, fault: Fault, watch: _Watch, send: Send, entry: dict[str, Any]
) -> None:
    tps = state.settings.tokens_per_second
    delay = state.settings.ttft_ms / 1000 + (len(plan.chunks) / tps if tps > 0 else 0)
    stalls = fault is not None and fault.kind in ("stall", "slow")
    if await watch.sleep(delay + (fault.stall_seconds if fault and stalls else 0)):
        if fault is None:
            state.stats.error(plan.model, "client_disconnected")
        entry["outcome"] = fault.kind if fault else "client_disconnected"
        return
    await _send_json(send, 200, _message(plan, False))
    state.stats.bump(plan.model, **plan.usage, output_tokens=len(plan.chunks), completed=1)
    entry.update(plan.usage, output_tokens=len(plan.chunks), outcome="completed")


def _ledger_entry(state: _State, call_id: str, model: str) -> dict[str, Any]:
    """What one tagged call used, so a caller can reconcile its own bookkeeping call by call."""
    entry: dict[str, Any] = dict.fromkeys((*_INPUT_KEYS, "output_tokens"), 0)
    entry.update(model=model, outcome="open")
    if call_id:
        state.ledger[call_id] = entry
    return entry


async def _messages(state: _State, receive: Receive, send: Send, call_id: str = "") -> None:
    try:
        body = _validate(await _read_json(receive, state.settings.max_body_bytes), _Request)
    except _BadRequest as exc:
        state.stats.bump(None, calls=1)
        state.stats.error(None, exc.kind)
        raise
    model, user_text = body["model"], _last_user_text(body["messages"])
    state.stats.bump(model, calls=1)
    fault, streaming = state.take_fault(user_text, model), body.get("stream") is True
    entry = _ledger_entry(state, call_id, model)
    state.requests.append({"call_id": call_id, "model": model, "body": body})
    if fault is not None and fault.kind not in ("slow", "tool_input"):
        state.stats.error(model, fault.kind)
        entry["outcome"] = fault.kind
        if fault.kind in _FAULT_ERRORS or (fault.kind == "midstream_error" and not streaming):
            status = 529 if fault.kind == "midstream_error" else int(fault.kind)
            extra = {"retry-after": str(fault.retry_after)} if status == 429 else {}
            error = _error_body(_FAULT_ERRORS[str(status)], f"injected {fault.kind} fault")
            return await _send_json(send, status, error, extra)
    watch = _Watch(receive)
    state.stats.enter(model)
    try:
        plan = state.plan(body, user_text, fault)
        await (_stream if streaming else _reply)(state, plan, fault, watch, send, entry)
    finally:
        state.stats.leave(model)
        watch.close()


async def _control(state: _State, method: str, path: str, receive: Receive, send: Send) -> None:
    route = (method, path)
    if route == ("GET", "/healthz"):
        return await _send_json(send, 200, {"status": "ok"})
    if route == ("GET", "/_control/stats"):
        return await _send_json(send, 200, state.stats.snapshot())
    if route == ("GET", "/_control/calls"):
        return await _send_json(send, 200, {"calls": state.ledger})
    if route == ("GET", "/_control/requests"):
        return await _send_json(send, 200, {"requests": list(state.requests)})
    if route in (("POST", "/_control/faults"), ("POST", "/_control/settings")):
        raw = await _read_json(receive, state.settings.max_body_bytes)
        try:
            if path.endswith("faults"):
                state.faults += msgspec.convert(raw, _FaultList).faults
            else:
                update = msgspec.structs.asdict(msgspec.convert(raw, _SettingsUpdate))
                changes = {k: v for k, v in update.items() if v is not None}
                state.settings = msgspec.structs.replace(state.settings, **changes)
        except msgspec.ValidationError as exc:
            raise _BadRequest(str(exc)) from None
    if route == ("DELETE", "/_control/faults"):
        state.faults = []
    if path == "/_control/faults" and method in ("GET", "POST", "DELETE"):
        return await _send_json(send, 200, {"faults": state.faults})
    if path == "/_control/settings" and method in ("GET", "POST"):
        return await _send_json(send, 200, state.settings)
    if route == ("POST", "/_control/reset"):
        state.stats.reset()
        state.faults, state.cache, state.ledger = [], set(), {}
        state.requests.clear()
        return await _send_json(send, 200, {"status": "reset"})
    raise _BadRequest(f"{method} {path} not found", 404, "not_found_error")


def create_app(settings: ModelSettings) -> App:
    """The ASGI app; all state (faults, counters, prompt cache) lives in this closure."""
    state = _State(settings)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            return await send({"type": "lifespan.shutdown.complete"})
        if scope["type"] != "http":
            return None
        started = False

        async def tracked(message: AsgiMessage) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        method, path = scope["method"], scope["path"].rstrip("/") or "/"
        try:
            if (method, path) == ("POST", "/v1/messages"):
                call_id = dict(scope["headers"]).get(CALL_ID_HEADER.encode(), b"").decode()
                await _messages(state, receive, tracked, call_id)
            elif (method, path) == ("POST", "/v1/messages/count_tokens"):
                raw = await _read_json(receive, state.settings.max_body_bytes)
                body = _validate(raw, _CountRequest)
                await _send_json(tracked, 200, {"input_tokens": count_input_tokens(body)})
            else:
                await _control(state, method, path, receive, tracked)
        except _BadRequest as exc:
            await _send_json(tracked, exc.status, _error_body(exc.kind, exc.message))
        except ConnectionResetError:
            return None
        except Exception:
            if not started:
                await _send_json(tracked, 500, _error_body("api_error", "internal server error"))
            raise
        return None

    return app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's options: `python -m baton.offline_model` and `baton model` take the same."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    parser.add_argument("--tokens-per-second", type=float, default=0.0)
    parser.add_argument("--words-per-reply", type=int, default=24)
    parser.add_argument("--seed", default="")
    parser.add_argument(
        "--style",
        choices=("readable", "hostile"),
        default="readable",
        help="readable: sentences a person can follow (default); hostile: the test mix",
    )
    parser.add_argument("--port-file", type=Path, default=None)


def main(argv: list[str] | None = None) -> None:
    """Serve the offline model until SIGINT/SIGTERM, then exit 0."""
    parser = argparse.ArgumentParser(prog="python -m baton.offline_model", description=__doc__)
    add_arguments(parser)
    serve(parser.parse_args(argv))


def serve(args: argparse.Namespace) -> None:
    """Serve with parsed `add_arguments` options until SIGINT/SIGTERM."""
    import uvicorn  # here so importing the module for create_app stays light

    settings = ModelSettings(
        args.ttft_ms, args.tokens_per_second, args.words_per_reply, args.seed, style=args.style
    )
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(1024)  # listening before the port file exists lets early clients queue
    port = sock.getsockname()[1]
    if args.port_file is not None:
        tmp = args.port_file.with_name(args.port_file.name + ".tmp")
        tmp.write_text(str(port))
        tmp.replace(args.port_file)  # atomic so a poller never reads a half-written port
    print(f"offline model listening on http://{args.host}:{port}", flush=True)
    # uvicorn re-raises the signal it caught after shutdown; no-op handlers turn that into exit 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    app = create_app(settings)
    # Keep idle connections longer than the client's pool does (httpx: 5 s), as the real API
    # does: with uvicorn's default of 5 s, a retry sent ~5 s after the last call raced the
    # server closing the pooled connection and failed as a connection error (server_error).
    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=2,
        timeout_keep_alive=75,
        proxy_headers=False,  # nothing here reads the client address; saves a wrapper per request
    )
    uvicorn.Server(config).run(sockets=[sock])


@functools.cache
def _tls() -> Any:
    """One TLS context for the control calls: a bare ``httpx.request`` builds one per call,
    loading the CA bundle (26 ms of CPU, where the call itself takes 0.3 ms). The model's URL
    is plain http, so the context only has to exist."""
    import ssl

    return ssl.create_default_context()


class OfflineModelProcess:
    """Runs `python -m baton.offline_model` as a child process; a context manager for tests."""

    def __init__(self, settings: ModelSettings | None = None, timeout: float | None = None) -> None:
        # The start-up bound all embedded parts share (imported here, not at the top: the child
        # that serves the model needs none of baton.embedded).
        from baton.embedded import STARTUP_S

        self.settings = settings or ModelSettings()
        self._timeout = STARTUP_S if timeout is None else timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None
        self.port, self.url = 0, ""

    def __enter__(self) -> OfflineModelProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        """The server process's pid while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self) -> None:
        import httpx

        s, self._dir = self.settings, tempfile.mkdtemp(prefix="offline-model-")
        port_file = Path(self._dir) / "port"
        args = [f"--port-file={port_file}", f"--ttft-ms={s.ttft_ms}", f"--seed={s.seed}"]
        args += [f"--tokens-per-second={s.tokens_per_second}"]
        args += [f"--words-per-reply={s.words_per_reply}", f"--style={s.style}"]
        # The repo root goes on PYTHONPATH so the child imports this same checkout.
        path = [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]
        env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in path if p)}
        cmd = [sys.executable, "-m", "baton.offline_model", "--port=0", *args]
        self._proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + self._timeout
        try:
            while True:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"offline model exited early with {self._proc.returncode}")
                if time.monotonic() > deadline:
                    raise TimeoutError("offline model did not become healthy in time")
                with contextlib.suppress(httpx.TransportError, FileNotFoundError):
                    self.port = int(port_file.read_text())
                    self.url = f"http://127.0.0.1:{self.port}"
                    healthz = httpx.get(f"{self.url}/healthz", timeout=1, verify=_tls())
                    if healthz.status_code == 200:
                        break
                time.sleep(0.01)
            if s.faults:
                self.add_faults([msgspec.to_builtins(f) for f in s.faults])
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM by pid, then SIGKILL if it has not exited after 5 s."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        import httpx

        response = httpx.request(
            method, f"{self.url}{path}", json=payload, timeout=5, verify=_tls()
        )
        return response.raise_for_status().json()

    def calls(self) -> dict[str, dict[str, Any]]:
        """Per-call ledger of calls tagged with the ``x-baton-call-id`` header."""
        result: dict[str, dict[str, Any]] = self._call("GET", "/_control/calls")["calls"]
        return result

    def stats(self) -> dict[str, Any]:
        return dict(self._call("GET", "/_control/stats"))

    def requests(self) -> list[dict[str, Any]]:
        """The latest request bodies (up to 256), oldest first: ``{call_id, model, body}``."""
        result: list[dict[str, Any]] = self._call("GET", "/_control/requests")["requests"]
        return result

    def set_faults(self, faults: list[dict[str, Any]]) -> None:
        """Replaces all fault rules; each dict has the fields of `FaultRule`."""
        self._call("DELETE", "/_control/faults")
        self._call("POST", "/_control/faults", {"faults": faults})

    def add_faults(self, faults: list[dict[str, Any]]) -> None:
        self._call("POST", "/_control/faults", {"faults": faults})

    def update_settings(self, **changes: Any) -> dict[str, Any]:
        """Changes pace fields (ttft_ms, tokens_per_second, words_per_reply, seed, style) at runtime."""
        return dict(self._call("POST", "/_control/settings", changes))

    def clear(self) -> None:
        """Zeroes counters and drops faults and the prompt cache."""
        self._call("POST", "/_control/reset")


if __name__ == "__main__":
    main()
