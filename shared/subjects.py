"""The one place where stream, subject and bucket names are spelled (consumers: wiring.py)."""

from __future__ import annotations

import hashlib
import re

import msgspec

# Subject tokens come from JWT claims and client ids; anything else could inject wildcards.
TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def is_safe_token(value: str) -> bool:
    """Whether a value may stand as one token of a NATS subject."""
    return TOKEN_RE.fullmatch(value) is not None


# ---- streams -------------------------------------------------------------------------------
STREAM_CHAT_IN = "CHAT_IN"
STREAM_PERSISTED = "CHAT_PERSISTED"
STREAM_DECISIONS = "AGENT_DECISIONS"
STREAM_POLICY = "POLICY"
STREAM_TASKS = "EXEC_TASKS"
STREAM_RESULTS = "EXEC_RESULTS"
STREAM_TOKENS = "CHAT_STREAM"
STREAM_DLQ = "DEAD_LETTERS"
STREAM_CANCELS = "CHAT_CANCEL"
STREAM_TOOLS = "TOOLS"
STREAM_ADMIN = "ADMIN"  # operators' commands (baton apikey), which the persister writes
# Conversation settings (create, patch) and deletion requests (issue 16).
STREAM_CONVERSATIONS = "CONVERSATIONS"
# The agent's records of its classification calls (agent.call.*): a stream of their own, so
# the agent's read grant (a stream-message get, which NATS cannot narrow by subject) covers
# them and no conversation's answer deltas.
STREAM_AGENT_CALLS = "AGENT_CALLS"

# ---- subjects ------------------------------------------------------------------------------


def chat_in(project: str, conversation: str) -> str:
    return f"chat.in.{project}.{conversation}"


def persisted_user(project: str, conversation: str) -> str:
    return f"chat.persisted.user.{project}.{conversation}"


def persisted_assistant(project: str, conversation: str) -> str:
    return f"chat.persisted.assistant.{project}.{conversation}"


def agent_decision(project: str, conversation: str) -> str:
    return f"agent.decision.{project}.{conversation}"


def agent_usage(project: str, conversation: str) -> str:
    return f"agent.usage.{project}.{conversation}"


def agent_settle(project: str, conversation: str) -> str:
    """Where an agent handling a redelivered message asks itself, later, to bill the message's
    classification calls that died by then (``agent-settle``; the agent alone publishes here)."""
    return f"agent.settle.{project}.{conversation}"


def policy_verdict(project: str, conversation: str) -> str:
    return f"policy.verdict.{project}.{conversation}"


def policy_reply(project: str, conversation: str) -> str:
    return f"policy.reply.{project}.{conversation}"


def exec_task(project: str, conversation: str) -> str:
    return f"exec.task.{project}.{conversation}"


def policy_deadline(project: str, conversation: str) -> str:
    return f"policy.deadline.{project}.{conversation}"


SETTLE_TOKEN = "settle"


def policy_settle(project: str, conversation: str) -> str:
    """Where an executor running a redelivered task asks policy to settle that delivery's call
    at the attempt's deadline (policy's ``policy-deadlines`` consumer reads it; the executor may
    publish here and nowhere else under ``policy.``)."""
    return f"{policy_deadline(project, conversation)}.{SETTLE_TOKEN}"


def is_policy_settle(subject: str) -> bool:
    parts = subject.split(".")
    return len(parts) == 5 and parts[:2] == ["policy", "deadline"] and parts[4] == SETTLE_TOKEN


def policy_usage(project: str, conversation: str) -> str:
    """The usage of an answer call policy settled by estimate (it died on its last delivery)."""
    return f"policy.usage.{project}.{conversation}"


def chat_cancel(project: str, conversation: str) -> str:
    return f"chat.cancel.{project}.{conversation}"


def exec_abort(project: str, conversation: str) -> str:
    """Core NATS only (no stream keeps it): every executor replica subscribes to all of it."""
    return f"exec.abort.{project}.{conversation}"


EXEC_ABORT_ALL = "exec.abort.>"


def exec_result(project: str, conversation: str) -> str:
    return f"exec.result.{project}.{conversation}"


def exec_failed(project: str, conversation: str) -> str:
    return f"exec.failed.{project}.{conversation}"


def tool_task(project: str, conversation: str) -> str:
    """Policy alone publishes here (like exec.task): one authorized tool call to run."""
    return f"tool.task.{project}.{conversation}"


def tool_result(project: str, conversation: str) -> str:
    """The executor (a call ran) and policy (a call refused) publish here."""
    return f"tool.result.{project}.{conversation}"


def tool_requested(project: str, conversation: str) -> str:
    """Policy publishes here: a call waits for the user's approval (pushed to clients)."""
    return f"tool.requested.{project}.{conversation}"


def persisted_tool_turn(project: str, conversation: str) -> str:
    return f"chat.persisted.tool_turn.{project}.{conversation}"


def persisted_tool_result(project: str, conversation: str) -> str:
    return f"chat.persisted.tool_result.{project}.{conversation}"


def tool_approval(project: str, conversation: str) -> str:
    """The gateway publishes the user's decisions here."""
    return f"tool.approval.{project}.{conversation}"


def tool_call_record(run_id: str, call_id: str) -> str:
    """One call's own record: ``started`` written create-only (expected last subject sequence
    0) before the tool is invoked, then ``finished`` with its result (expected: the started
    sequence). Keyed by run and tool_use id, hashed into one safe token."""
    digest = hashlib.sha256(f"{run_id}\0{call_id}".encode()).hexdigest()[:40]
    return f"tool.call.{digest}"


def admin_api_key(project: str) -> str:
    """``baton apikey`` publishes a project's key commands here (the admin user only)."""
    return f"admin.apikey.{project}"


def conversation_settings(project: str, conversation: str) -> str:
    """The gateway publishes a conversation's creation and every change of its settings here."""
    return f"conv.settings.{project}.{conversation}"


def conversation_delete(project: str, conversation: str) -> str:
    """A conversation's deletion request, published create-only (expected last subject
    sequence 0, ``Nats-Msg-Id`` ``delete:<conversation id>``): the first one is the tombstone
    the gateway checks before every read; a second publish fails with 10071 and means
    "already deleted" (success). Never purged: it is how a deleted id stays deleted."""
    return f"conv.delete.{project}.{conversation}"


def conversation_verdict(project: str, conversation: str) -> str:
    """Policy's verdict on a conversation's requested model (in the POLICY stream)."""
    return f"policy.conversation.{project}.{conversation}"


def delete_event_id(conversation: str) -> str:
    """The one event id of a conversation's deletion (the gateway's and the retention sweep's)."""
    return f"delete:{conversation}"


def content_filters(project: str, conversation: str) -> tuple[tuple[str, str], ...]:
    """(stream, filter subject) of every stream message that may carry the conversation's
    content: what a deletion purges (``$JS.API.STREAM.PURGE.<stream>`` with ``filter``). The
    tombstone (``conversation_delete``) is not among them. Tool call records
    (``tool_call_record``) are keyed by run and call, not by conversation: a deletion purges
    them one by one from the stored tool results."""
    p, c = project, conversation
    # Only these carry what users wrote or models answered: decisions, verdicts, policy's
    # canned replies, tasks and cancels hold ids, numbers and policy's own words, so their
    # streams stay out of the persister's purge grant (a purge grant cannot be narrowed to a
    # subject, so every stream in it is one the persister could empty).
    return (
        (STREAM_CHAT_IN, chat_in(p, c)),
        (STREAM_PERSISTED, f"chat.persisted.*.{p}.{c}"),
        (STREAM_RESULTS, f"exec.*.{p}.{c}"),
        (STREAM_TOKENS, token_stream(p, c)),
        (STREAM_TOOLS, f"tool.*.{p}.{c}"),
        (STREAM_CONVERSATIONS, conversation_settings(p, c)),
    )


def token_stream(project: str, conversation: str) -> str:
    return f"chat.stream.{project}.{conversation}"


def dead_letter(stream: str, consumer: str) -> str:
    return f"dlq.{stream}.{consumer}"


def inbox_prefix(service: str) -> str:
    """Where a service's replies arrive; its NATS user may subscribe to this prefix only."""
    return f"_INBOX_{service}"


# The streams ``content_filters`` names (the persister's purge grant).
CONTENT_STREAMS: tuple[str, ...] = tuple(s for s, _ in content_filters("p", "c"))


# Prefixes of the subject families the gateway pushes to clients.
PREFIX_TOKENS = "chat.stream."
PREFIX_PERSISTED_USER = "chat.persisted.user."
PREFIX_PERSISTED_ASSISTANT = "chat.persisted.assistant."
PREFIX_VERDICT = "policy.verdict."
PREFIX_TOOL_REQUESTED = "tool.requested."
PREFIX_PERSISTED_TOOL_RESULT = "chat.persisted.tool_result."

# What the gateway listens to (one subscription each per process, fanned out in memory); a
# stored tool result arrives with ``chat.persisted.>``.
PUSH_SUBJECTS = (
    "chat.persisted.>",
    PREFIX_TOKENS + ">",
    PREFIX_VERDICT + ">",
    PREFIX_TOOL_REQUESTED + ">",
)

# ---- consumers -----------------------------------------------------------------------------


class ConsumerSpec(msgspec.Struct, frozen=True):
    """A durable pull consumer that provisioning creates and a service binds to."""

    stream: str
    durable: str
    filter_subject: str
    ack_wait_s: float = 30.0
    max_deliver: int = 20
    max_ack_pending: int = 1000


# The durables themselves, and which service binds each, are declared in shared/wiring.py.
# Tool calls: few deliveries on purpose (a redelivered started call is reported, not rerun).
EXECUTOR_TOOLS = ConsumerSpec(STREAM_TOOLS, "executor-tools", "tool.task.>", ack_wait_s=30.0)


class StreamSpec(msgspec.Struct, frozen=True):
    """A stream that provisioning creates."""

    name: str
    subjects: tuple[str, ...]
    max_age_s: float = 7 * 24 * 3600.0
    memory: bool = False


STREAMS: tuple[StreamSpec, ...] = (
    StreamSpec(STREAM_CHAT_IN, ("chat.in.>",)),
    StreamSpec(STREAM_PERSISTED, ("chat.persisted.>",)),
    StreamSpec(STREAM_DECISIONS, ("agent.decision.>", "agent.usage.>", "agent.settle.>")),
    StreamSpec(STREAM_POLICY, ("policy.>",)),
    StreamSpec(STREAM_TASKS, ("exec.task.>",)),
    StreamSpec(STREAM_RESULTS, ("exec.result.>", "exec.failed.>")),
    # Token deltas only matter while a run streams and shortly after (resume).
    # An executor's model call's own records (exec.call.*: shared/estimate.py) sit next to its
    # deltas, so the sequence of its started record is where the scan for its pushes begins.
    StreamSpec(STREAM_TOKENS, ("chat.stream.>", "exec.call.>"), max_age_s=3600.0),
    # A classification call pushes nothing: its records live apart, as long as the deltas.
    StreamSpec(STREAM_AGENT_CALLS, ("agent.call.>",), max_age_s=3600.0),
    StreamSpec(STREAM_DLQ, ("dlq.>",), max_age_s=30 * 24 * 3600.0),
    StreamSpec(STREAM_CANCELS, ("chat.cancel.>",), max_age_s=24 * 3600.0),
    # Tool tasks, results, approvals and each call's record (started, finished), kept as long
    # as a task could be redelivered, and then some.
    StreamSpec(
        STREAM_TOOLS,
        ("tool.task.>", "tool.result.>", "tool.requested.>", "tool.approval.>", "tool.call.>"),
        max_age_s=7 * 24 * 3600.0,
    ),
    # Operators' commands wait here for the persister (a key made while it is down is written
    # when it is back); a day is long enough to notice.
    StreamSpec(STREAM_ADMIN, ("admin.>",), max_age_s=24 * 3600.0),
    # Settings changes and deletion tombstones: a tombstone must outlive any message that could
    # still arrive for its conversation (the persister's table keeps it for good).
    StreamSpec(STREAM_CONVERSATIONS, ("conv.>",), max_age_s=30 * 24 * 3600.0),
)
# The tools stream alone, for tests that provision only the tool part of the bus.
TOOL_STREAMS: tuple[StreamSpec, ...] = tuple(s for s in STREAMS if s.name == STREAM_TOOLS)

PERSISTER_TOOL_RESULTS = ConsumerSpec(STREAM_TOOLS, "persister-tool-results", "tool.result.>")
TOOL_CONSUMERS: tuple[ConsumerSpec, ...] = (EXECUTOR_TOOLS, PERSISTER_TOOL_RESULTS)

# ---- key-value buckets ---------------------------------------------------------------------
BUCKET_RUNS = "baton_runs"
# Budgets, concurrency and rate counters, changed by compare-and-set (policy writes; the gateway
# only reads the rate windows for an early 429). Keys name the UTC day or window they count.
BUCKET_LIMITS = "baton_limits"
LIMITS_TTL_S = 3 * 24 * 3600.0  # a day's counters outlive the day (late settlements land)


def budget_key(day: str, project: str, user: str | None = None) -> str:
    """The counter of one UTC day (``YYYYMMDD``) for a project, or for one user in it."""
    return f"budget.{day}.p.{project}" if user is None else f"budget.{day}.u.{project}.{user}"


def active_key(project: str) -> str:
    """The project's runs in flight (approved, not yet finished)."""
    return f"active.{project}"


def rate_key(window: str, start: int, project: str, user: str) -> str:
    """A user's messages in one fixed window (``m`` minute, ``h`` hour) starting at ``start``."""
    return f"rate.{window}.{start}.{project}.{user}"


# Aborted attempts (key ``<run id>.<attempt>``), written by policy, read by executors before a
# call starts, so an abort also wins over a task no executor had picked yet.
BUCKET_ABORTS = "baton_aborts"
ABORTS_TTL_S = 24 * 3600.0


def abort_key(run_id: str, attempt: int) -> str:
    return f"{run_id}.{attempt}"
