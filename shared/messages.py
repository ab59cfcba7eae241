"""Every event that crosses the bus, as msgspec Structs (new fields get defaults; types never change)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

SCHEMA_VERSION = 1

Intent = Literal["question", "code", "creative", "greeting", "other"]
Complexity = Literal["low", "medium", "high"]
Action = Literal["answer", "clarify", "refuse"]
Executor = Literal["chat", "code"]
Verdict = Literal["approve", "downgrade", "override", "clarify", "stop"]
RunStatus = Literal["queued", "running", "completed", "refused", "clarified", "failed", "cancelled"]
ReplyKind = Literal["answer", "refusal", "clarify", "failure"]
# What a model call was for (the usage table's ``purpose``): reports split spend by it.
Purpose = Literal["classification", "answer"]
ErrorClass = Literal[
    "rate_limited",
    "overloaded",
    "timeout",
    "bad_request",
    "cut_stream",
    "cancelled",
    "server_error",
]


class Event(msgspec.Struct, kw_only=True, frozen=True):
    """Ids that every event carries, so any hop can be traced and deduplicated."""

    v: int = SCHEMA_VERSION
    event_id: str
    message_id: str
    conversation_id: str
    project_id: str
    causation_id: str = ""


class UserMessageAccepted(Event, kw_only=True, frozen=True):
    """Published by the gateway on chat.in; the PubAck is the 202."""

    user_id: str
    content: str
    content_hash: str
    created_at: datetime
    idempotency_key: str | None = None


class UserMessagePersisted(UserMessageAccepted, kw_only=True, frozen=True):
    """Published by the persister once the user message is committed."""

    position: int = 0  # 1, 2, 3, … within the conversation; runs happen in this order


class Decision(msgspec.Struct, kw_only=True, frozen=True):
    """What the agent's model says a message needs; only advice, bounded by this schema."""

    intent: Intent
    complexity: Complexity
    action: Action
    executor: Executor
    model_hint: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    estimated_tokens: Annotated[int, msgspec.Meta(ge=1, le=8192)]
    ambiguous: bool = False


class Prices(msgspec.Struct, kw_only=True, frozen=True):
    """USD per million tokens, snapshotted into the task so billing never looks anything up."""

    input: float = 0.0
    output: float = 0.0
    cache_read: float = 0.0
    cache_write: float = 0.0


class Usage(msgspec.Struct, kw_only=True, frozen=True):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0

    def cost_usd(self, prices: Prices) -> float:
        return (
            self.input_tokens * prices.input
            + self.output_tokens * prices.output
            + self.cache_read_tokens * prices.cache_read
            + self.cache_write_tokens * prices.cache_write
        ) / 1_000_000


class AgentDecision(Event, kw_only=True, frozen=True):
    """Published by the agent on agent.decision."""

    user_id: str
    decision: Decision
    fallback: bool = False
    fallback_reason: str = ""
    position: int = 0  # the message's place in its conversation, passed through
    # The classification call this decision came from (its usage row is written from the
    # ModelUsage the agent published before it); policy counts it against the run's budgets.
    call_id: str = ""
    usage: Usage = Usage()
    cost_usd: float = 0.0


class Limits(msgspec.Struct, kw_only=True, frozen=True):
    """A project's limits as policy applied them (None: no limit). Daily means the UTC day."""

    project_daily_tokens: int | None = None
    project_daily_cost_usd: float | None = None
    user_daily_tokens: int | None = None
    user_daily_cost_usd: float | None = None
    user_messages_per_minute: int | None = None
    user_messages_per_hour: int | None = None
    max_concurrent_runs: int | None = None


class ModelUsage(Event, kw_only=True, frozen=True):
    """Published by the agent on agent.usage: what one of its model calls used, for the
    persister to record once (by ``call_id``); failed calls too, with what they used."""

    call_id: str
    run_id: str  # the run the message gets (its usage rows are reported with the run)
    user_id: str
    purpose: Purpose
    model: str
    outcome: str  # "completed" or the error's class
    usage: Usage
    prices: Prices


class LimitsSnapshot(msgspec.Struct, kw_only=True, frozen=True):
    """The limits a verdict was checked against and what was used of them at that moment."""

    limits: Limits = Limits()
    day: str = ""  # the UTC day (YYYY-MM-DD) whose budgets were counted
    project_tokens_used: int = 0  # reserved + settled before this run
    project_cost_used_usd: float = 0.0
    user_tokens_used: int = 0
    user_cost_used_usd: float = 0.0
    concurrent_runs: int = 0
    user_messages_minute: int = 0
    user_messages_hour: int = 0


class RunVerdict(Event, kw_only=True, frozen=True):
    """Published by policy on policy.verdict: every verdict and status change of a run."""

    run_id: str
    user_id: str
    verdict: Verdict
    status: RunStatus
    reason: str
    model: str = ""
    executor: str = ""
    attempt: int = 0
    estimated_tokens: int = 0
    limits: LimitsSnapshot | None = None
    reserved_tokens: int = 0
    reserved_cost_usd: float = 0.0


class ExecTask(Event, kw_only=True, frozen=True):
    """Published by policy alone on exec.task: one attempt at answering one message."""

    task_id: str
    run_id: str
    attempt: int
    model: str
    executor: Executor
    max_tokens: int
    prices: Prices
    deadline: datetime


class ExecResult(Event, kw_only=True, frozen=True):
    """Published by the executor on exec.result: the answer of one model call."""

    task_id: str
    call_id: str
    run_id: str
    attempt: int
    model: str
    text: str
    usage: Usage
    prices: Prices
    stop_reason: str = ""


class ExecFailed(Event, kw_only=True, frozen=True):
    """Published by the executor on exec.failed: a classified failure, with partial usage."""

    task_id: str
    call_id: str
    run_id: str
    attempt: int
    model: str
    error_class: ErrorClass
    error: str
    usage: Usage
    prices: Prices


class PolicyReply(Event, kw_only=True, frozen=True):
    """Published by policy on policy.reply: a refusal, clarifying question or failure notice."""

    run_id: str
    user_id: str
    kind: ReplyKind
    text: str
    status: RunStatus


class AssistantMessagePersisted(Event, kw_only=True, frozen=True):
    """Published by the persister once an assistant message (any kind) is committed."""

    run_id: str
    reply_to: str
    kind: ReplyKind
    content: str
    created_at: datetime
    status: RunStatus
    usage: Usage = Usage()  # every attempt of the run, failed and cut ones included
    cost_usd: float = 0.0  # of ``usage``, at each call's own prices


class CancelRequested(Event, kw_only=True, frozen=True):
    """Published by the gateway on chat.cancel: a user asks to stop a run; policy decides."""

    run_id: str
    user_id: str
    requested_at: datetime


class RunAbort(Event, kw_only=True, frozen=True):
    """Published by policy on exec.abort (core NATS, every executor hears it): stop a call.

    Aborts the calls of ``run_id`` at ``attempt`` or earlier; the executor reports each as an
    ``ExecFailed`` of class ``cancelled`` with its partial usage.
    """

    run_id: str
    attempt: int
    reason: Literal["cancelled", "deadline"]


class RunDeadline(Event, kw_only=True, frozen=True):
    """Published by policy on policy.deadline with each task: check the attempt at ``due``."""

    run_id: str
    attempt: int
    due: datetime


class TokenDelta(msgspec.Struct, kw_only=True, frozen=True):
    """Published by the executor on chat.stream: ordered pieces of an answer being written."""

    v: int = SCHEMA_VERSION
    conversation_id: str
    run_id: str
    attempt: int
    seq: int
    text: str


class DeadLetter(msgspec.Struct, kw_only=True, frozen=True):
    """What a poison message becomes: the original, untouched, and why it was refused."""

    stream: str
    consumer: str
    subject: str
    stream_seq: int
    deliveries: int
    reason: str
    headers: dict[str, str]
    payload: bytes
    failed_at: datetime


_encoder = msgspec.json.Encoder()


def encode(value: msgspec.Struct) -> bytes:
    return _encoder.encode(value)
