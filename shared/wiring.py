"""The wiring between the services, declared once: what each consumes and what it publishes.

Every copy is derived from this table: the consumers each ``main.py`` binds
(``consumers``), the durables ``baton provision`` creates (``CONSUMERS``), the NATS user
grants ``baton/permissions.py`` renders, and — checked by ``tests/unit/test_wiring.py`` —
the consumes/publishes rows of each service's README.
"""

from __future__ import annotations

from typing import Any

import msgspec

from shared import messages, subjects
from shared.bus import Bus, Consumer
from shared.subjects import ConsumerSpec

_ANY = ("*", "*")  # project and conversation tokens

# ---- durable pull consumers (provisioned by the admin step; services only bind) ------------
PERSISTER_IN = ConsumerSpec(subjects.STREAM_CHAT_IN, "persister-in", "chat.in.>")
PERSISTER_VERDICTS = ConsumerSpec(subjects.STREAM_POLICY, "persister-verdicts", "policy.verdict.>")
PERSISTER_REPLIES = ConsumerSpec(subjects.STREAM_POLICY, "persister-replies", "policy.reply.>")
PERSISTER_RESULTS = ConsumerSpec(subjects.STREAM_RESULTS, "persister-results", "exec.result.>")
PERSISTER_FAILED = ConsumerSpec(subjects.STREAM_RESULTS, "persister-failed", "exec.failed.>")
# The agent's classification calls, billed by the persister (one row per call id).
PERSISTER_USAGE = ConsumerSpec(subjects.STREAM_DECISIONS, "persister-usage", "agent.usage.>")
# Answer calls that died with their executor and that policy settled at their deadline.
PERSISTER_ESTIMATES = ConsumerSpec(subjects.STREAM_POLICY, "persister-estimates", "policy.usage.>")
# Operators' API key commands (baton apikey), written by the persister alone (I5).
PERSISTER_API_KEYS = ConsumerSpec(subjects.STREAM_ADMIN, "persister-api-keys", "admin.apikey.>")
AGENT_IN = ConsumerSpec(
    subjects.STREAM_PERSISTED, "agent", "chat.persisted.user.>", ack_wait_s=60.0
)
# A redelivered message's classification calls, billed at a timer's due time if they died:
# handed back (nak with a delay) until due, as policy's deadlines.
AGENT_SETTLE = ConsumerSpec(
    subjects.STREAM_DECISIONS,
    "agent-settle",
    "agent.settle.>",
    max_deliver=100,
    max_ack_pending=100_000,
)
POLICY_DECISIONS = ConsumerSpec(subjects.STREAM_DECISIONS, "policy-decisions", "agent.decision.>")
POLICY_OUTCOMES = ConsumerSpec(
    subjects.STREAM_PERSISTED, "policy-outcomes", "chat.persisted.assistant.>"
)
POLICY_FAILURES = ConsumerSpec(subjects.STREAM_RESULTS, "policy-failures", "exec.failed.>")
POLICY_CANCELS = ConsumerSpec(subjects.STREAM_CANCELS, "policy-cancels", "chat.cancel.>")
# Deadline timers are handed back (nak with a delay) until due: one waits per run in flight.
POLICY_DEADLINES = ConsumerSpec(
    subjects.STREAM_POLICY,
    "policy-deadlines",
    "policy.deadline.>",
    max_deliver=100,
    max_ack_pending=100_000,
)
# Tool calls (the TOOLS stream): the executor's runner, the persister's stored results, and
# policy's three inputs of a tool phase (the model's calls stored, each result stored, the
# user's approvals).
EXECUTOR_TOOLS = subjects.EXECUTOR_TOOLS
PERSISTER_TOOL_RESULTS = subjects.PERSISTER_TOOL_RESULTS
POLICY_TOOL_TURNS = ConsumerSpec(
    subjects.STREAM_PERSISTED, "policy-tool-turns", "chat.persisted.tool_turn.>"
)
POLICY_TOOL_RESULTS = ConsumerSpec(
    subjects.STREAM_PERSISTED, "policy-tool-results", "chat.persisted.tool_result.>"
)
POLICY_APPROVALS = ConsumerSpec(subjects.STREAM_TOOLS, "policy-approvals", "tool.approval.>")
# A conversation's settings and deletion (the CONVERSATIONS stream), and policy's verdict on
# its model: the persister stores them, policy decides on the model and cancels runs.
PERSISTER_CONVERSATIONS = ConsumerSpec(
    subjects.STREAM_CONVERSATIONS, "persister-conversations", "conv.settings.>"
)
PERSISTER_DELETES = ConsumerSpec(
    subjects.STREAM_CONVERSATIONS, "persister-deletes", "conv.delete.>"
)
PERSISTER_MODEL_VERDICTS = ConsumerSpec(
    subjects.STREAM_POLICY, "persister-model-verdicts", "policy.conversation.>"
)
POLICY_CONVERSATIONS = ConsumerSpec(
    subjects.STREAM_CONVERSATIONS, "policy-conversations", "conv.settings.>"
)
POLICY_DELETES = ConsumerSpec(subjects.STREAM_CONVERSATIONS, "policy-deletes", "conv.delete.>")
# In-progress acks keep a healthy long stream alive; ack_wait only bounds a dead executor.
EXECUTOR_TASKS = ConsumerSpec(subjects.STREAM_TASKS, "executor", "exec.task.>", ack_wait_s=30.0)


class Consumes(msgspec.Struct, frozen=True):
    """One durable a service binds: what arrives on it and which handler method takes it."""

    spec: ConsumerSpec
    schema: type[Any]
    handler: str  # the name of a method of the service's ``Handlers``
    # A method run for a delivery past the consumer's bound, before its dead letter: what
    # the dead deliveries spent is billed there (``Consumer(on_exhausted=...)``).
    exhausted: str | None = None


class Wiring(msgspec.Struct, frozen=True):
    """What one service does on the bus, in the terms of shared/subjects.py."""

    consumes: tuple[Consumes, ...] = ()
    publishes: tuple[str, ...] = ()  # subject patterns
    listens: tuple[str, ...] = ()  # core subscriptions (no durable)
    reads_streams: tuple[str, ...] = ()  # get a stored message by sequence
    buckets: tuple[str, ...] = ()
    reads_buckets: tuple[str, ...] = ()  # get only: no put, create or update
    # Purge by subject filter (a conversation's deletion); every other purge stays admin-only.
    purges_streams: tuple[str, ...] = ()

    @property
    def consumers(self) -> tuple[ConsumerSpec, ...]:
        return tuple(c.spec for c in self.consumes)


# Services in the order the deploy configs list their NATS users.
WIRING: dict[str, Wiring] = {
    "gateway": Wiring(
        publishes=(
            subjects.chat_in(*_ANY),
            subjects.chat_cancel(*_ANY),
            subjects.tool_approval(*_ANY),  # the user's answer to an "ask" call
            subjects.conversation_settings(*_ANY),  # POST / PATCH /api/conversations
            subjects.conversation_delete(*_ANY),  # DELETE /api/conversations/{id}: the tombstone
        ),
        # Pushes (tool.requested among them; stored tool results arrive on chat.persisted),
        # and every deletion tombstone, which ends the deleted conversation's open streams.
        listens=(*subjects.PUSH_SUBJECTS, subjects.conversation_delete(*_ANY)),
        # A duplicate submit answers with the original message, read back by its sequence;
        # a resuming SSE client gets the tokens it missed, read back the same way; a run's
        # tool calls (what waits for the user, what was decided) are read back from TOOLS;
        # every read of a conversation first looks for its deletion tombstone; a resume reads
        # policy's verdicts the persister has not stored yet from POLICY.
        reads_streams=(
            subjects.STREAM_CHAT_IN,
            subjects.STREAM_TOKENS,
            subjects.STREAM_TOOLS,
            subjects.STREAM_CONVERSATIONS,
            subjects.STREAM_POLICY,
        ),
        # An early 429 reads the rate windows policy keeps; policy alone writes them.
        reads_buckets=(subjects.BUCKET_LIMITS,),
    ),
    "persister": Wiring(
        consumes=(
            Consumes(PERSISTER_IN, messages.UserMessageAccepted, "user_message"),
            Consumes(PERSISTER_VERDICTS, messages.RunVerdict, "verdict"),
            Consumes(PERSISTER_REPLIES, messages.PolicyReply, "reply"),
            Consumes(PERSISTER_RESULTS, messages.ExecResult, "result"),
            Consumes(PERSISTER_FAILED, messages.ExecFailed, "failed_usage"),
            Consumes(PERSISTER_USAGE, messages.ModelUsage, "model_usage"),
            Consumes(PERSISTER_ESTIMATES, messages.ModelUsage, "model_usage"),
            Consumes(PERSISTER_TOOL_RESULTS, messages.ToolResult, "tool_result"),
            Consumes(PERSISTER_API_KEYS, messages.ApiKeyCommand, "api_key"),
            Consumes(PERSISTER_CONVERSATIONS, messages.ConversationChanged, "conversation_changed"),
            Consumes(
                PERSISTER_DELETES, messages.ConversationDeleteRequested, "conversation_deleted"
            ),
            Consumes(
                PERSISTER_MODEL_VERDICTS, messages.ConversationModelVerdict, "conversation_verdict"
            ),
        ),
        publishes=(
            subjects.persisted_user(*_ANY),
            subjects.persisted_assistant(*_ANY),
            subjects.persisted_tool_turn(*_ANY),
            subjects.persisted_tool_result(*_ANY),
            # The retention sweep deletes what it archived the one way there is (the tombstone).
            subjects.conversation_delete(*_ANY),
        ),
        # The sweep skips a conversation its owner deleted already (its tombstone, by subject).
        reads_streams=(subjects.STREAM_CONVERSATIONS,),
        # A deleted conversation's content leaves every stream that holds it (the persister
        # deletes it from Postgres, then purges these by subject).
        purges_streams=subjects.CONTENT_STREAMS,
    ),
    "agent": Wiring(
        consumes=(
            Consumes(
                AGENT_IN,
                messages.UserMessagePersisted,
                "user_message",
                exhausted="user_message_exhausted",
            ),
            Consumes(AGENT_SETTLE, messages.ClassificationSettle, "settle"),
        ),
        publishes=(
            subjects.agent_decision(*_ANY),
            subjects.agent_usage(*_ANY),
            subjects.agent_settle(*_ANY),  # its own timer (a redelivered message's calls)
            "agent.call.*",  # a classification call's started record: shared/estimate.py
        ),
        # A redelivered message reads its earlier classification calls' records (to bill the
        # ones its agent died in by estimate): their stream alone, no conversation's deltas.
        reads_streams=(subjects.STREAM_AGENT_CALLS,),
    ),
    "policy": Wiring(
        consumes=(
            Consumes(POLICY_DECISIONS, messages.AgentDecision, "decision"),
            Consumes(POLICY_OUTCOMES, messages.AssistantMessagePersisted, "reply_persisted"),
            Consumes(POLICY_FAILURES, messages.ExecFailed, "failure"),
            Consumes(POLICY_CANCELS, messages.CancelRequested, "cancel"),
            Consumes(POLICY_DEADLINES, messages.RunDeadline, "deadline"),
            Consumes(POLICY_TOOL_TURNS, messages.ToolTurnPersisted, "tool_turn"),
            Consumes(POLICY_TOOL_RESULTS, messages.ToolResultPersisted, "tool_result"),
            Consumes(POLICY_APPROVALS, messages.ToolApprovalDecided, "tool_approval"),
            Consumes(POLICY_CONVERSATIONS, messages.ConversationChanged, "conversation_settings"),
            Consumes(POLICY_DELETES, messages.ConversationDeleteRequested, "conversation_deleted"),
        ),
        publishes=(
            subjects.policy_verdict(*_ANY),
            subjects.policy_reply(*_ANY),
            subjects.exec_task(*_ANY),  # policy alone (I5)
            subjects.policy_deadline(*_ANY),
            subjects.exec_abort(*_ANY),  # policy alone: only the authority stops a call
            subjects.tool_task(*_ANY),  # policy alone (I5): an authorized tool call
            subjects.tool_requested(*_ANY),  # an "ask" call waits for the user
            subjects.tool_result(*_ANY),  # a call policy refused (deny, limits, unknown tool)
            subjects.conversation_verdict(*_ANY),  # the verdict on a conversation's model
            subjects.policy_usage(*_ANY),  # a dead call settled at its deadline, by estimate
        ),
        # At an attempt's deadline, its calls' records and pushes (shared/deadcalls.py).
        reads_streams=(subjects.STREAM_TOKENS,),
        buckets=(subjects.BUCKET_RUNS, subjects.BUCKET_LIMITS, subjects.BUCKET_ABORTS),
    ),
    "executor": Wiring(
        consumes=(
            Consumes(EXECUTOR_TASKS, messages.ExecTask, "task"),
            Consumes(EXECUTOR_TOOLS, messages.ToolTask, "tool_task"),
        ),
        publishes=(
            subjects.token_stream(*_ANY),
            subjects.exec_result(*_ANY),
            subjects.exec_failed(*_ANY),
            subjects.tool_result(*_ANY),
            "tool.call.*",  # the call's own record (started, finished): subjects.tool_call_record
            "exec.call.*",  # a model call's own record (started, finished): shared/estimate.py
            # A redelivered call's settle timer, due at its attempt's deadline (policy checks it
            # against the run's record; no other policy subject).
            subjects.policy_settle(*_ANY),
        ),
        # A redelivered tool task reads its call's last record before running anything; a
        # redelivered task reads its earlier calls' records and pushes (to estimate dead ones).
        reads_streams=(subjects.STREAM_TOOLS, subjects.STREAM_TOKENS),
        # Every replica hears every abort (a plain subscription, no queue group).
        listens=(subjects.EXEC_ABORT_ALL,),
        reads_buckets=(subjects.BUCKET_ABORTS,),
    ),
}

# Every durable, in the order provisioning creates them.
CONSUMERS: tuple[ConsumerSpec, ...] = tuple(s for w in WIRING.values() for s in w.consumers)


def consumers(bus: Bus, service: str, handlers: object, **options: Any) -> list[Consumer[Any]]:
    """The service's consumers, each bound to the ``handlers`` method its entry names.

    ``options`` (batch, concurrency, ready, ...) are the same for all of a service's consumers.
    """
    built: list[Consumer[Any]] = []
    for entry in WIRING[service].consumes:
        handler = getattr(handlers, entry.handler, None)
        if not callable(handler):
            raise TypeError(f"{type(handlers).__name__} has no handler {entry.handler!r}")
        hook = None
        if entry.exhausted is not None:
            hook = getattr(handlers, entry.exhausted, None)
            if not callable(hook):
                raise TypeError(f"{type(handlers).__name__} has no handler {entry.exhausted!r}")
        built.append(Consumer(bus, entry.spec, entry.schema, handler, on_exhausted=hook, **options))
    return built
