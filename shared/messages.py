"""Every event that crosses the bus, as msgspec Structs (new fields get defaults; types never change)."""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

SCHEMA_VERSION = 1

Intent = Literal["question", "code", "creative", "greeting", "other"]
Complexity = Literal["low", "medium", "high"]
Action = Literal["answer", "clarify", "refuse"]
Executor = Literal["chat", "code"]
Verdict = Literal["approve", "downgrade", "override", "clarify", "stop"]
# ``requires_action``: a running run waits for the user's answer to a tool call (same rank as
# running: a run goes running -> requires_action -> running as its calls are decided).
RunStatus = Literal[
    "queued",
    "running",
    "requires_action",
    "completed",
    "refused",
    "clarified",
    "failed",
    "cancelled",
]
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
    # The client request this event descends from (X-Request-ID at the gateway); "" for work no
    # request started, and in events older than the field.
    request_id: str = ""


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
    # An executor's answer call that died with its process, settled by policy when its attempt's
    # deadline passed (shared/estimate.py): its task and attempt, and the usage estimated.
    task_id: str = ""
    attempt: int = 0
    estimated: bool = False


class ClassificationSettle(Event, kw_only=True, frozen=True):
    """Published by the agent on agent.settle, for itself: at ``due``, the message's
    classification calls named here that started and never billed (their agent died) are
    billed by estimate. A redelivered message's agent sends one before its own call (deliveries
    can overlap: docs/decisions.md, "An agent's overlapping deliveries")."""

    user_id: str
    due: datetime
    calls: tuple[str, ...]  # ``classify:<message id>#<n>``: the delivery's own and earlier ones


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


ToolApproval = Literal["auto", "ask", "deny"]
# How a tool call ended: ``ok`` / ``error`` (the tool said so) / ``timeout`` ran (or may have);
# ``unknown``: a crash cut a started call of a non-idempotent tool, so it is never run again;
# ``denied`` / ``over_limit`` / ``invalid``: policy never let it run (set by policy).
# "expired": policy's own, for a call still waiting for the user's answer when its run's approval
# timeout ended the run (it never ran).
ToolOutcome = Literal[
    "ok", "error", "timeout", "unknown", "denied", "over_limit", "invalid", "expired"
]
ToolName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class ToolSpec(msgspec.Struct, kw_only=True, frozen=True):
    """A tool policy grants a run, as offered to the model (``server`` names its MCP server)."""

    name: ToolName
    description: str = ""
    input_schema: dict[str, Any] = msgspec.field(default_factory=lambda: {"type": "object"})
    server: str  # the MCP server's name in the policy file

    def api(self) -> dict[str, Any]:
        """The Messages API's shape of this tool."""
        return {
            "name": self.name,
            "description": self.description,
            "input_schema": self.input_schema,
        }


def call_key(run_id: str, call_id: str) -> str:
    """What ids of a tool call derive from: its run and the model's tool_use id, so a model that
    repeated an id in another run could never reach that run's call, result or approval."""
    return f"{run_id}:{call_id}"


def input_digest(value: Any) -> str:
    """sha256 (hex) of the canonical JSON of a tool call's input: sorted keys, no spaces."""
    return hashlib.sha256(canonical_json(value)).hexdigest()


def canonical_json(value: Any) -> bytes:
    return msgspec.json.encode(value, order="sorted")


class ToolCall(msgspec.Struct, kw_only=True, frozen=True):
    """One ``tool_use`` block of a model's answer; ``id`` is the model's, stable through every hop."""

    id: str  # the model's tool_use id (toolu_…)
    name: str  # as the model wrote it: policy checks it against the granted tools
    input: Any  # as the model wrote it (untrusted, I7): normally a JSON object
    input_digest: str  # input_digest(input); an approval binds to it


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
    tools: tuple[ToolSpec, ...] = ()  # exactly the tools policy grants this run; none: text only
    round: int = 0  # the tool round: 0 first, n after the model's n-th tool_use turn
    # The project's hot window (policy file ``context_messages``): at most this many messages
    # of history, within the executor's token budget; 0: the executor's own setting.
    context_messages: int = 0
    # The run's user. Also the sign that policy checks a redelivered call's own settle timer
    # (subjects.policy_settle): an executor publishes one only for a task that carries it.
    user_id: str = ""


class EstimatedCall(msgspec.Struct, kw_only=True, frozen=True):
    """An earlier delivery's model call of the same task that died with its executor: its usage
    as estimated (shared/estimate.py), billed once by ``call_id`` with the outcome carrying it."""

    call_id: str
    usage: Usage


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
    # With stop_reason "tool_use": the calls the model asks for (text is what it wrote besides).
    tool_calls: tuple[ToolCall, ...] = ()
    round: int = 0  # the task's round, passed through
    # Calls of earlier deliveries of this task cut by their executor's death (estimated usage).
    estimated: tuple[EstimatedCall, ...] = ()


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
    estimated: tuple[EstimatedCall, ...] = ()  # as on ExecResult


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
    # The call ids ``usage`` sums (None: not said, by a persister older than the field).
    calls: tuple[str, ...] | None = None


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


class DeadCalls(msgspec.Struct, kw_only=True, frozen=True):
    """The task whose dead calls a settle timer bills, with what their usage rows need."""

    task_id: str
    user_id: str
    model: str
    prices: Prices
    # Only these calls of the task (a redelivery's own, ``<task id>#<n>``, on the timer its
    # executor publishes: ``subjects.policy_settle``); empty: every delivery the task may have had.
    calls: tuple[str, ...] = ()


class RunDeadline(Event, kw_only=True, frozen=True):
    """Published by policy on policy.deadline with each task: check the attempt at ``due``."""

    run_id: str
    attempt: int
    due: datetime
    # Set on the timer policy publishes when an attempt's deadline passed: at ``due`` the calls
    # of that task still only ``started`` died with their executor and are billed by estimate.
    settle: DeadCalls | None = None


class ToolTask(Event, kw_only=True, frozen=True):
    """Published by policy alone on tool.task: run one authorized tool call once.

    ``event_id`` is ``tooltask:<call key>``; ``input`` is exactly what was authorized (its digest
    is checked again by the executor before it runs anything).
    """

    run_id: str
    user_id: str
    round: int
    call: ToolCall
    server: str  # the MCP server's name in the policy file
    # May a redelivered, already started call run again (with its call id as key)?
    idempotent: bool = False
    timeout_s: float = 30.0
    deadline: datetime | None = None  # past it the executor does not start the call


class ToolResult(Event, kw_only=True, frozen=True):
    """Published on tool.result by the executor (a call ran, or its outcome is unknown) or by
    policy (``denied`` / ``over_limit`` / ``invalid``): what goes back to the model as the
    ``tool_result`` block of ``call_id``. ``event_id`` is ``toolresult:<call key>``."""

    run_id: str
    round: int
    call_id: str  # the ToolCall's id (the model's tool_use id)
    name: str
    outcome: ToolOutcome
    is_error: bool
    content: str  # the tool's text (or the reason it did not run), as the model will see it
    input_digest: str = ""
    executions: int = 0  # invocations this delivery made (0 when it did not run the tool)
    duration_s: float = 0.0


class ToolCallRecord(msgspec.Struct, kw_only=True, frozen=True):
    """The executor's own record of one call on tool.call.<call id>: ``started`` (create-only,
    before the tool is invoked), then ``finished`` carrying the result that was published."""

    v: int = SCHEMA_VERSION
    call_id: str
    state: Literal["started", "finished"]
    delivery: int  # the task delivery that wrote it
    at: datetime
    result: ToolResult | None = None  # with ``finished``


class ToolTurnPersisted(Event, kw_only=True, frozen=True):
    """Published by the persister on chat.persisted.tool_turn once the model's tool_use turn of a
    round is stored: the calls as stored (the first model call's, if a redelivered task made a
    second one) are the ones policy decides on. ``event_id`` is ``persisted:toolturn:<run>:<round>``."""

    run_id: str
    user_id: str = ""
    round: int
    call_id: str  # the model call whose turn was stored
    text: str = ""
    tool_calls: tuple[ToolCall, ...]
    usage: Usage = Usage()  # of every call of the run so far
    # The tool_use ids of the run's earlier rounds, as stored: a call that repeats one is
    # refused (its id is the key of the earlier call's task, result and approval).
    earlier_call_ids: tuple[str, ...] = ()


class ToolResultPersisted(Event, kw_only=True, frozen=True):
    """Published by the persister on chat.persisted.tool_result once a call's result is stored
    (the first one for the call wins). ``event_id`` is ``persisted:toolresult:<call key>``."""

    result: ToolResult


class ToolApprovalRequested(Event, kw_only=True, frozen=True):
    """Published by policy on tool.requested with the run's ``requires_action`` status: one
    call waits for the user. ``event_id`` is ``approval-requested:<call key>``."""

    run_id: str
    user_id: str
    round: int
    call: ToolCall
    server: str
    expires_at: datetime


class ToolApprovalDecided(Event, kw_only=True, frozen=True):
    """Published by the gateway on tool.approval: the user's answer for one call. It authorizes
    only the arguments whose digest it carries. ``event_id`` is ``approval:<call key>``, so a
    repeat is a duplicate, never a second decision."""

    run_id: str
    user_id: str
    call_id: str
    approve: bool
    input_digest: str
    reason: str = ""
    decided_at: datetime


ConversationOp = Literal["create", "update"]
DeleteReason = Literal["user", "retention"]


class ConversationChanged(Event, kw_only=True, frozen=True):
    """Published by the gateway on conv.settings: a conversation created with its settings
    (``op`` create: ``event_id`` ``convcreate:<conversation id>``) or its title / metadata
    changed (``op`` update: ``event_id`` ``convupdate:<conversation id>:<change id>``). Fields
    left ``None`` are unchanged. ``message_id`` is empty: no message is involved."""

    user_id: str
    op: ConversationOp
    title: str | None = None
    metadata: dict[str, Any] | None = None
    model: str | None = None  # create only: policy decides whether the project allows it
    system_prompt: str | None = None  # create only: the executor sends it as the system prompt
    at: datetime


class ConversationModelVerdict(Event, kw_only=True, frozen=True):
    """Published by policy on policy.conversation: whether a conversation's requested model is
    allowed for its project (``event_id`` ``convverdict:<conversation id>``). Runs of the
    conversation use ``model`` when ``allowed``, policy's usual choice otherwise."""

    user_id: str
    requested_model: str
    allowed: bool
    model: str  # the model its runs will use ("" when not allowed: policy's usual choice)
    reason: str


class ConversationDeleteRequested(Event, kw_only=True, frozen=True):
    """Published on conv.delete by the gateway (``DELETE /api/conversations/{id}``) or by the
    retention sweep: delete a conversation, for good.

    Contract: ``event_id`` = ``subjects.delete_event_id(conversation_id)`` (also the
    ``Nats-Msg-Id``), published create-only with ``Nats-Expected-Last-Subject-Sequence: 0`` on
    ``subjects.conversation_delete(project, conversation)``; a 10071 answer means it was
    already deleted (treat as success). ``message_id`` is empty. Then policy cancels the
    conversation's runs in flight, and the persister (the only writer) deletes its messages,
    tool turns and results and its settings' content, keeps the run and usage rows' numbers,
    records the tombstone, and purges ``subjects.content_filters(...)`` from every stream.
    """

    user_id: str  # the conversation's owner
    requested_by: str  # the user who asked, or "retention"
    reason: DeleteReason = "user"
    requested_at: datetime


class TokenDelta(msgspec.Struct, kw_only=True, frozen=True):
    """Published by the executor on chat.stream: ordered pieces of an answer being written."""

    v: int = SCHEMA_VERSION
    conversation_id: str
    run_id: str
    attempt: int
    seq: int
    text: str
    pieces: int = 0  # the model's deltas this push joins (about one token each): for estimates


class ApiKeyCommand(msgspec.Struct, kw_only=True, frozen=True):
    """``baton apikey create|revoke``, published on admin.apikey; the persister writes it (I5).

    A create carries the key's SHA-256 and its first characters, never the key.
    """

    v: int = SCHEMA_VERSION
    event_id: str
    op: Literal["create", "revoke"]
    key_id: str  # a UUID
    project_id: str
    name: str = ""
    key_hash: str = ""
    prefix: str = ""
    at: datetime


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
