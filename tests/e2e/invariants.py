"""Invariant checks shared by the fault suites: a retrying client, settling, and I1-I4 (+ I6).

The chaos suite (one NATS, every service killed and restarted) and the cluster suite (three
NATS nodes, two replicas of each service, one of each killed) assert the same invariants here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
import httpx

from baton.devtoken import make_token
from baton.offline_model import OfflineModelProcess
from shared import estimate

EXECUTOR_MODEL = "claude-sonnet-4-6"
CLASSIFY_PREFIX = "classify:"  # the agent's call ids: classify:<message id>#<delivery>


class Client:
    """A well-behaved client: every message has an Idempotency-Key and is retried until 202.

    Given several gateways (replicas behind a load balancer), a retry goes to the next one.
    """

    def __init__(self, http: httpx.AsyncClient, gateways: Sequence[str], secret: str) -> None:
        self.http = http
        self.gateways = list(gateways)
        self.secret = secret
        self.accepted: dict[str, str] = {}  # idempotency key -> message id
        self.replays = 0
        self.mismatches: list[str] = []
        # Accept availability: every POST tried and how long each submit took to get its 202.
        self.posts = 0
        self.waits: list[float] = []

    async def submit(self, project: str, user: str, cid: str, key: str, content: str) -> str:
        headers = {
            "Authorization": f"Bearer {make_token(self.secret, project, user)}",
            "Idempotency-Key": key,
        }
        body = {"conversation_id": cid, "content": content}
        first = time.monotonic()
        deadline = first + 120
        turn = hash(key)
        # What its tries met, for the failure message: the answers that kept it from a 202.
        seen: dict[str, int] = {}
        while True:
            gateway = self.gateways[turn % len(self.gateways)]
            turn += 1
            try:
                self.posts += 1
                r = await self.http.post(f"{gateway}/api/chat", json=body, headers=headers)
                if r.status_code == 202:
                    self.waits.append(time.monotonic() - first)
                    mid = str(r.json()["message"]["id"])
                    known = self.accepted.setdefault(key, mid)
                    if known != mid:
                        self.mismatches.append(key)
                    self.replays += bool(r.json()["duplicate"])
                    return mid
                assert r.status_code in (503, 502), r.text
                what = f"{r.status_code} {r.text[:200]}"
            except httpx.TransportError as exc:
                what = type(exc).__name__  # down or restarting: retry, as a client would
            seen[what] = seen.get(what, 0) + 1
            assert time.monotonic() < deadline, f"submit {key} never accepted: {seen}"
            await asyncio.sleep(0.2)


def availability(client: Client, within_s: float = 15.0) -> str:
    """Accept availability as clients saw it: the share of POSTs answered 202, the share of
    submits accepted within ``within_s`` of their first try, and the longest wait for a 202."""
    waits = client.waits
    accepted = sum(1 for w in waits if w <= within_s)
    posts = max(client.posts, 1)
    return (
        f"accept_posts={len(waits)}/{client.posts}({100 * len(waits) / posts:.1f}%) "
        f"accepted_within_{within_s:.0f}s={accepted}/{len(waits)} "
        f"accept_wait_max={max(waits, default=0.0):.1f}s"
    )


async def settled(dsn: str, expected: int, timeout: float = 180) -> None:
    """Wait until every stored user message has its one final reply."""
    deadline = time.monotonic() + timeout
    users = replies = -1
    while True:
        try:
            con = await asyncpg.connect(dsn)
            try:
                users = await con.fetchval("SELECT count(*) FROM messages WHERE role = 'user'")
                replies = await con.fetchval(
                    "SELECT count(*) FROM messages WHERE role = 'assistant'"
                )
            finally:
                await con.close()
            if users >= expected and replies >= users:
                return
        except (OSError, asyncpg.PostgresError):
            pass
        assert time.monotonic() < deadline, f"not settled: {users} users, {replies} replies"
        await asyncio.sleep(0.5)


async def check(
    con: Any,
    client: Client,
    model: OfflineModelProcess,
    messages: int,
    executor_model: str = EXECUTOR_MODEL,
    recorded: Callable[[str], Awaitable[bool]] | None = None,
) -> str:
    """Assert I1-I4 (and I6's order) over the database and the model's ledger; a summary line.

    ``recorded``: whether a model call (an executor's or an agent's) left its ``started`` record
    (shared/estimate.py).
    Given, a model call without a usage row is allowed when it has no record and its work was
    delivered again: it died before its ``message_start`` was read, the limit
    docs/guarantees.md (I4) names; such calls are counted in the summary."""
    accepted = set(client.accepted.values())
    # I2: a retried submit always got the same message id back.
    assert not client.mismatches, client.mismatches
    users = {str(r["id"]) for r in await con.fetch("SELECT id FROM messages WHERE role = 'user'")}
    # I1 + I2: every 202'd message is stored, and nothing else is.
    assert users == accepted, (len(users - accepted), len(accepted - users))
    assert len(accepted) == messages
    # I3: exactly one final outcome per message (one run, one reply).
    outcomes = await con.fetch(
        "SELECT u.id, count(a.id) AS replies, count(DISTINCT r.run_id) AS runs "
        "FROM messages u LEFT JOIN messages a ON a.reply_to = u.id AND a.role = 'assistant' "
        "LEFT JOIN runs r ON r.message_id = u.id "
        "WHERE u.role = 'user' GROUP BY u.id"
    )
    bad = [
        (str(r["id"]), r["replies"], r["runs"])
        for r in outcomes
        if (r["replies"], r["runs"]) != (1, 1)
    ]
    assert not bad, bad[:10]
    # I6: within each conversation, replies were written in message order, one run at a time.
    pairs = await con.fetch(
        "SELECT u.conversation_id, u.position, a.created_at FROM messages u "
        "JOIN messages a ON a.reply_to = u.id AND a.role = 'assistant' "
        "WHERE u.role = 'user' ORDER BY u.conversation_id, u.position"
    )
    by_conv: dict[str, list[Any]] = {}
    for r in pairs:
        by_conv.setdefault(str(r["conversation_id"]), []).append(r["created_at"])
    out_of_order = [c for c, times in by_conv.items() if times != sorted(times)]
    assert not out_of_order, out_of_order
    kinds = dict(
        await con.fetch(
            "SELECT kind, count(*) FROM messages WHERE role = 'assistant' GROUP BY kind"
        )
    )
    # I4: every usage row is a real model call with exactly the tokens the model served — the
    # executor's answer attempts and the agent's classifications alike — or, for a call cut by
    # its executor's death, flagged estimated (input exact, output what reached the stream)...
    ledger, rows = await _billed(con, model, executor_model, recorded)
    by_call = {r["call_id"]: r for r in rows}
    estimated = {c: r for c, r in by_call.items() if r["estimated"]}
    for call_id, r in by_call.items():
        served = ledger.get(call_id)
        assert served is not None, f"usage for a call the model never served: {call_id}"
        assert (r["input_tokens"], r["cache_read_tokens"], r["cache_write_tokens"]) == (
            served["input_tokens"],
            served["cache_read_input_tokens"],
            served["cache_creation_input_tokens"],
        ), call_id
        if call_id in estimated:
            # Only pushed deltas (an agent's call: message_start's count) are counted: never
            # more than the model sent.
            assert r["output_tokens"] <= served["output_tokens"], call_id
            dead = estimate.AGENT_OUTCOME if _classify(call_id) else estimate.OUTCOME
            assert r["outcome"] == dead, call_id
        else:
            assert r["output_tokens"] == served["output_tokens"], call_id
        purpose = "classification" if call_id.startswith(CLASSIFY_PREFIX) else "answer"
        assert r["purpose"] == purpose, call_id
    # Every model call the model served, answer or classification, has its one row (exact or
    # estimated). Two kinds have none: a call cut before the model counted anything (all zeros
    # in its ledger: the model billed nothing), and, where ``recorded`` can tell, a call the
    # model counted whose process died before it read ``message_start`` (no started record to
    # estimate from: I4's limit, docs/guarantees.md), only if its work was delivered again.
    # Without ``recorded`` a classification call is allowed no row if its work was delivered
    # again (its agent died with it), as before its record existed.
    unbilled = sorted(c for c in ledger if c not in by_call)
    before_start = [c for c in unbilled if not _served_any(ledger[c])]
    before_read = []
    for c in (c for c in unbilled if c not in before_start):
        if recorded is None:
            cut = _classify(c) and _delivered_again(c, ledger)
        else:
            cut = await _cut_before_read(c, ledger, recorded)
        if cut:
            before_read.append(c)
    missing = [c for c in unbilled if c not in (*before_start, *before_read)]
    if missing and recorded is not None:
        # Whether each left a started record: an unbilled call with one is a billing bug (a
        # timer or a redelivery should have read it); without one, a window the check missed.
        seen = {c: await recorded(c) for c in missing[:10]}
        raise AssertionError([(c, ledger[c], {"recorded": seen[c]}) for c in missing[:10]])
    assert not missing, [(c, ledger[c]) for c in missing[:10]]
    estimate_served = sum(ledger[c]["output_tokens"] for c in estimated)
    estimate_billed = sum(int(r["output_tokens"]) for r in estimated.values())
    # Every accepted message was classified, and each of its classification calls billed.
    classified = {
        c.removeprefix(CLASSIFY_PREFIX).rsplit("#", 1)[0]
        for c, r in by_call.items()
        if r["purpose"] == "classification"
    }
    assert classified >= accepted, len(accepted - classified)
    # Project totals are exactly the sum of the usage rows.
    totals = await con.fetch(
        "SELECT p.project_id, p.input_tokens = s.i AND p.output_tokens = s.o "
        "AND p.cache_read_tokens = s.cr AND p.cache_write_tokens = s.cw AND p.cost_usd = s.c AS ok "
        "FROM project_usage p JOIN (SELECT project_id, sum(input_tokens) i, sum(output_tokens) o, "
        "sum(cache_read_tokens) cr, sum(cache_write_tokens) cw, sum(cost_usd) c FROM usage "
        "GROUP BY project_id) s USING (project_id)"
    )
    assert totals and all(r["ok"] for r in totals), [dict(r) for r in totals]
    runs_total = await con.fetchval("SELECT sum(runs) FROM project_usage")
    assert runs_total == kinds.get("answer", 0)
    return (
        f"accepted={len(accepted)} replayed={client.replays} stored={len(users)} "
        f"outcomes={len(outcomes)} kinds={kinds} usage_rows={len(rows)} "
        f"model_calls={len(ledger)} classification_calls="
        f"{sum(1 for c in ledger if c.startswith(CLASSIFY_PREFIX))} "
        f"died_with_executor={sum(1 for c in estimated if not _classify(c))}(estimated) "
        f"died_with_agent={sum(1 for c in estimated if _classify(c))}(estimated) "
        f"estimate_output={estimate_billed}/{estimate_served}"
        f"(error {estimate_billed - estimate_served} tokens, "
        f"{_share(estimate_served - estimate_billed, estimate_served)} of served; "
        f"{_share(estimate_served - estimate_billed, _ledger_total(ledger))} of all tokens) "
        f"died_before_start={len(before_start)}(billed nothing) "
        f"died_before_read={len(before_read)}(unbilled"
        f"{'' if recorded else ', classifications delivered again'}) totals=ok "
        f"ordered_conversations={len(by_conv)}"
    )


async def _cut_before_read(
    call_id: str, ledger: dict[str, Any], recorded: Callable[[str], Awaitable[bool]]
) -> bool:
    """Whether a call was cut before its process read ``message_start``, or while the broker
    refused its record: no started record, and its work delivered again, or (deliveries that
    overlapped: another delivery's outcome acked the work) the call cut (the model saw its
    client go) while another delivery of the work was served. ``check`` accepts such a call
    without a usage row, and ``_billed`` does not wait for one (it never comes). A call that
    ran to its end and left no row is never accepted: that would be a live process that did
    not bill."""
    if await recorded(call_id):
        return False
    if _delivered_again(call_id, ledger):
        return True
    return ledger[call_id].get("outcome") != "completed" and _other_delivery(call_id, ledger)


def _other_delivery(call_id: str, ledger: dict[str, Any]) -> bool:
    """Whether the model served another delivery of the call's work, earlier or later."""
    task = call_id.rsplit("#", 1)[0]
    return any(c.startswith(task + "#") and c != call_id for c in ledger)


def _delivered_again(call_id: str, ledger: dict[str, Any]) -> bool:
    """Whether the model served a later delivery of the call's task (``<task>#<n>``)."""
    task, delivery = call_id.rsplit("#", 1)
    return any(
        c.startswith(task + "#") and int(c.rsplit("#", 1)[1]) > int(delivery) for c in ledger
    )


def _classify(call_id: str) -> bool:
    return call_id.startswith(CLASSIFY_PREFIX)


def _served_any(call: dict[str, Any]) -> bool:
    """Whether the model counted any token of a call (it counts input at message_start)."""
    keys = ("input_tokens", "output_tokens", "cache_read_input_tokens")
    return any(call[k] for k in (*keys, "cache_creation_input_tokens"))


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "0%"


def _ledger_total(ledger: dict[str, Any]) -> int:
    return sum(
        v["input_tokens"]
        + v["output_tokens"]
        + v["cache_read_input_tokens"]
        + v["cache_creation_input_tokens"]
        for v in ledger.values()
    )


async def _billed(
    con: Any,
    model: OfflineModelProcess,
    executor_model: str,
    recorded: Callable[[str], Awaitable[bool]] | None = None,
    timeout: float = 120.0,
) -> tuple[dict[str, Any], list[Any]]:
    """The model's ledger and the usage rows, once every model call has its row: a call cut
    by its executor's (or agent's) death is billed when its work is redelivered (after
    ``ack_wait``), which can be after its run was answered by a later attempt. A call ``check``
    accepts without a row (no started record, its work delivered again: nothing to estimate
    from) is not waited for: waiting for it ran out the whole bound, two minutes of a chaos run
    that measured nothing. Without ``recorded``, classifications are not waited for. The bound
    only ends a failed wait."""
    deadline = time.monotonic() + timeout
    while True:
        ledger = {
            k: v for k, v in model.calls().items() if v["model"] == executor_model or _classify(k)
        }
        rows = await con.fetch("SELECT * FROM usage")
        billed = {r["call_id"] for r in rows}
        waiting = [c for c in ledger if _served_any(ledger[c]) and c not in billed]
        if recorded is None:  # a classification's row can only be told apart with records
            waiting = [c for c in waiting if not _classify(c)]
        if recorded is not None:
            waiting = [c for c in waiting if not await _cut_before_read(c, ledger, recorded)]
        if not waiting or time.monotonic() > deadline:
            return ledger, rows
        await asyncio.sleep(0.5)
