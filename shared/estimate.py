"""The usage of a model call cut by its executor's death, estimated from what it left behind.

A call that dies with its process (SIGKILL, OOM, a lost node) cannot report its usage, but the
provider billed it. Two things of it survive in ``CHAT_STREAM``:

- its **started record** (``ModelCallRecord``, on ``exec.call.<digest>``), written when the
  stream's ``message_start`` arrived: the input, cache-read and cache-write tokens the provider
  counted for the call, exactly;
- its **token pushes** (``TokenDelta``, message id ``delta:<call id>:<seq>``), published after
  that record, each carrying how many model deltas it joined (``pieces``).

The estimate is the record's input tokens as they are, and as output the model deltas that
reached the stream (one text or tool-input delta is about one token; a push without a count
falls back to four characters a token). The output can only be low: what the model sent but the
executor had not yet pushed (one coalescing window, ``coalesce_chars``/``coalesce_ms``) and what
was in flight when the process died are missing. Everything here is pure; the reads are
shared/deadcalls.py's, for its two callers: the executor (a redelivered task settles its earlier
deliveries' calls) and policy (an attempt whose deadline passed settles all its task's calls).
Either way a call's row is keyed by its call id, so the second settlement of one is a duplicate.

The agent's classification calls are estimated the same way from their started record on
``agent.call.<digest>`` (they push nothing, so these live in a stream of their own,
``AGENT_CALLS``): input exact, output what ``message_start``
reported (the API says 1), when the message is delivered to an agent again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import datetime
from typing import Literal

import msgspec

from shared import messages as m
from shared import subjects
from shared.history import estimate_tokens

# The name of the method, stored with nothing else: docs/guarantees.md (I4) describes it.
METHOD = "message_start input + streamed deltas"
# The outcome a usage row of an estimated call carries: an executor's answer call, and an
# agent's classification call (``classify:<message id>#<delivery>``).
OUTCOME = "died_with_executor"
AGENT_OUTCOME = "died_with_agent"
CLASSIFY_PREFIX = "classify:"


class ModelCallRecord(msgspec.Struct, kw_only=True, frozen=True):
    """A service's own record of one model call on ``exec.call.<digest>`` (an executor's, in
    CHAT_STREAM next to the call's token pushes) or ``agent.call.<digest>`` (an agent's, in
    AGENT_CALLS):
    ``started`` when ``message_start`` arrived (create-only), ``finished`` once the call's
    outcome was published (the executor's; the agent writes one only for a redelivered
    message's call, which its settle timer reads: on the hot path its usage is its outcome,
    and an estimate never replaces an exact row)."""

    v: int = m.SCHEMA_VERSION
    call_id: str
    task_id: str
    state: Literal["started", "finished"]
    at: datetime
    usage: m.Usage = m.Usage()  # from message_start: input and cache tokens, exact


def record_subject(call_id: str) -> str:
    """The subject of one call's records: its call id hashed into one safe token, under the
    prefix of the service that makes such calls (``agent.call`` for classifications)."""
    prefix = "agent.call" if call_id.startswith(CLASSIFY_PREFIX) else "exec.call"
    return f"{prefix}.{hashlib.sha256(call_id.encode()).hexdigest()[:40]}"


def record_stream(call_id: str) -> str:
    """The stream that holds one call's records (what ``record_subject`` names)."""
    return (
        subjects.STREAM_AGENT_CALLS
        if call_id.startswith(CLASSIFY_PREFIX)
        else subjects.STREAM_TOKENS
    )


def delta_prefix(call_id: str) -> str:
    """The message id prefix of one call's token pushes (``delta:<call id>:<seq>``)."""
    return f"delta:{call_id}:"


# A copy of a message that `baton dlq replay` republished is a new stream message, whose
# deliveries count from 1 again. So that its calls do not take the ids of its first life's calls
# (an exact usage would replace such a call's estimate, and one provider call go unbilled), the
# replay writes how many deliveries came before it in this header, and a call's delivery
# number is that base plus the copy's own delivery count (docs/decisions.md).
DELIVERY_BASE_HEADER = "Baton-Delivery-Base"
# No base above this is believed (a life has at most the server's bound of deliveries, about
# 30; `baton dlq replay` refuses a copy past it). A copy's first delivery reads the records of
# every earlier call, so the bound also bounds those reads; policy's settle timers take no call
# numbered above it plus the consumer's bound.
MAX_DELIVERY_BASE = 1_000


def delivery_base(headers: dict[str, str] | None) -> int:
    """The deliveries earlier lives of this message had (0 for a message never replayed, or a
    header that is not a plain number within ``MAX_DELIVERY_BASE``)."""
    raw = (headers or {}).get(DELIVERY_BASE_HEADER, "")
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 4:
        return 0
    base = int(raw)
    return base if base <= MAX_DELIVERY_BASE else 0


def delivery(num_delivered: int | None, headers: dict[str, str] | None) -> int:
    """The number a call of this delivery carries in its id (``#<n>``): the copy's own delivery
    count (1 when the broker gave none) after every delivery of its earlier lives."""
    return delivery_base(headers) + (num_delivered or 1)


def is_delivery_of(task_id: str, call_id: str, max_deliver: int) -> bool:
    """Whether ``call_id`` names a delivery's call of ``task_id`` (``<task id>#<n>``) that a
    consumer bounded at ``max_deliver`` could have made: a copy replayed from a dead letter counts
    on from its earlier lives' deliveries (``delivery``), so ``n`` may pass the bound by the
    replay's base."""
    task, sep, n = call_id.rpartition("#")
    return (
        bool(sep)
        and task == task_id
        and n.isascii()
        and n.isdigit()
        and len(n) <= 9
        and 1 <= int(n) <= MAX_DELIVERY_BASE + max_deliver
    )


def earlier_calls(task_id: str, delivery: int) -> list[str]:
    """The call ids of the deliveries of a task before ``delivery`` (``<task id>#<n>``)."""
    return [f"{task_id}#{n}" for n in range(1, delivery)]


def task_calls(task_id: str, max_deliver: int) -> list[str]:
    """The call ids every delivery of a task may have made (``<task id>#1`` … ``#max_deliver``)."""
    return earlier_calls(task_id, max_deliver + 1)


def usage_id(call_id: str) -> str:
    """The message id of a call's exact usage when it goes out on its own (an agent's
    classification call; an executor's rides in its result, ``result:<call id>``)."""
    return f"usage:{call_id}"


def estimate_id(call_id: str) -> str:
    """The message id of an estimate of a call, whichever service makes it: one per call (a
    second estimate is a duplicate), and never the exact usage's. A service cut off from the
    broker past ``ack_wait`` publishes its exact usage late, after another estimated the call;
    under one id JetStream would drop it within the dedup window, and the estimate would stand.
    The persister keeps one row per call id: the exact usage replaces an estimate, never the
    reverse."""
    return f"estimate:{call_id}"


def settled_usage(timer: m.RunDeadline, call: m.EstimatedCall) -> m.ModelUsage:
    """The usage row policy publishes for a dead call of the task ``timer.settle`` names."""
    assert timer.settle is not None
    return m.ModelUsage(
        event_id=estimate_id(call.call_id),
        message_id=timer.message_id,
        conversation_id=timer.conversation_id,
        project_id=timer.project_id,
        causation_id=timer.event_id,
        call_id=call.call_id,
        run_id=timer.run_id,
        user_id=timer.settle.user_id,
        purpose="answer",
        model=timer.settle.model,
        outcome=OUTCOME,
        usage=call.usage,
        prices=timer.settle.prices,
        task_id=timer.settle.task_id,
        attempt=timer.attempt,
        estimated=True,
    )


def output_of(pushes: Iterable[m.TokenDelta]) -> int:
    """The output tokens a call's pushes show: their model deltas (text length without them)."""
    return sum(d.pieces if d.pieces > 0 else estimate_tokens(d.text) for d in pushes)


def estimate(record: ModelCallRecord, pushes: Iterable[m.TokenDelta]) -> m.Usage | None:
    """The usage to bill for a call from its last record and its pushes; None: nothing to
    settle (the call finished, so its own outcome carries its exact usage)."""
    if record.state != "started":
        return None
    start = record.usage
    return m.Usage(
        input_tokens=start.input_tokens,
        output_tokens=max(start.output_tokens, output_of(pushes)),
        cache_read_tokens=start.cache_read_tokens,
        cache_write_tokens=start.cache_write_tokens,
    )
