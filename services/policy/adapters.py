"""Policy's state: run records in a JetStream KV bucket, created once and changed by compare-and-set."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Callable
from datetime import datetime
from typing import Any

import msgspec
import nats.js.errors

from services.policy import budget, core
from services.policy.core import ConvState, RunState
from shared import messages as m
from shared import ratelimit, subjects
from shared.errors import BadData, RetryLater
from shared.subjects import abort_key

_conv_decoder = msgspec.json.Decoder(ConvState)
_counter_decoder = msgspec.json.Decoder(budget.Counter)
_encoder = msgspec.json.Encoder()


class Runs:
    """Create-only run records; every change names the revision it read (safe across replicas)."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv

    async def create(self, state: RunState) -> tuple[RunState, int, bool]:
        """Store a new run, or return the one a previous trigger created (and False); with the
        stored revision."""
        try:
            revision = await self.kv.create(state.run_id, core.encode_run(state))
            return state, int(revision), True
        except nats.js.errors.KeyWrongLastSequenceError:
            existing, revision = await self.get(state.run_id)
            return existing, revision, False

    async def find(self, run_id: str) -> RunState | None:
        """The run if a previous trigger created it (None: this is the first)."""
        try:
            entry = await self.kv.get(run_id)
        except nats.js.errors.KeyNotFoundError:
            return None
        return None if entry.value is None else core.decode_run(entry.value)

    async def get(self, run_id: str) -> tuple[RunState, int]:
        try:
            entry = await self.kv.get(run_id)
        except nats.js.errors.KeyNotFoundError as exc:
            raise BadData(f"no run {run_id}") from exc
        if entry.value is None:
            raise BadData(f"run {run_id} was deleted")
        return core.decode_run(entry.value), int(entry.revision or 0)

    async def update(self, state: RunState, revision: int) -> int:
        """Store ``state`` if nobody changed it since ``revision``; return its new revision."""
        try:
            return int(await self.kv.update(state.run_id, core.encode_run(state), last=revision))
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            # Another replica changed the run since we read it: read again and decide again.
            raise RetryLater(f"run {state.run_id} changed concurrently", delay=0.05) from exc


class Conversations:
    """Per-conversation turn-taking records in the same bucket, changed by compare-and-set."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv

    @staticmethod
    def key(conversation_id: str) -> str:
        return f"conv-{conversation_id}"

    async def get(self, conversation_id: str) -> tuple[ConvState, int]:
        """The conversation's record and its revision (0: not stored yet)."""
        try:
            entry = await self.kv.get(self.key(conversation_id))
        except nats.js.errors.KeyNotFoundError:
            return ConvState(conversation_id=conversation_id), 0
        if entry.value is None:
            return ConvState(conversation_id=conversation_id), 0
        return _conv_decoder.decode(entry.value), int(entry.revision or 0)

    async def put(self, conv: ConvState, revision: int) -> int:
        """Store ``conv`` if nobody changed it since ``revision`` (0: create-only); return its
        new revision, so the next change need not read it again."""
        value = _encoder.encode(conv)
        try:
            if revision == 0:
                return int(await self.kv.create(self.key(conv.conversation_id), value))
            return int(await self.kv.update(self.key(conv.conversation_id), value, last=revision))
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise RetryLater(
                f"conversation {conv.conversation_id} changed concurrently", delay=0.05
            ) from exc


Change = Callable[[Any], tuple[Any, Any]]  # value (None: absent) -> (new value or None, result)


class Limiter:
    """Budgets, runs in flight and rate windows in the limits bucket, changed by compare-and-set.

    Every change reads a counter, decides with the pure functions of ``budget`` and writes it
    back naming the revision it read; a conflict (another replica was faster) reads and decides
    again. That is what makes a cap hold with any number of policy replicas.

    Within one replica, changes to one key are combined: while a write is in flight, the next
    changes queue up and go together in the following write (each still gets its own result,
    decided in arrival order). A hot project key costs one read and one write per batch, not per
    message, and our own handlers never conflict with each other.
    """

    def __init__(self, kv: Any, max_tries: int = 200) -> None:
        self.kv = kv
        self.max_tries = max_tries
        self._queues: dict[str, list[tuple[Change, asyncio.Future[Any]]]] = {}
        self._decoders: dict[str, Any] = {}
        self._draining: set[str] = set()

    async def _get(self, key: str, decoder: Any) -> tuple[Any, int]:
        try:
            entry = await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None, 0
        if entry.value is None:
            return None, 0
        return decoder.decode(entry.value), int(entry.revision or 0)

    async def _put(self, key: str, value: Any, revision: int) -> bool:
        """Write if unchanged since ``revision`` (0: create-only); False on a conflict."""
        try:
            if revision == 0:
                await self.kv.create(key, _encoder.encode(value))
            else:
                await self.kv.update(key, _encoder.encode(value), last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        return True

    async def _conflict(self, tries: int) -> None:
        if tries >= self.max_tries:
            raise RetryLater("limits bucket too contended", delay=0.2)
        # Jitter spreads replicas that collided, so the next round does not collide again.
        await asyncio.sleep(random.uniform(0, 0.001 * min(tries, 10)))

    async def counter(self, key: str) -> tuple[budget.Counter, int]:
        value, revision = await self._get(key, _counter_decoder)
        return (value or budget.Counter()), revision

    async def apply(self, key: str, change: Change, decoder: Any = _counter_decoder) -> Any:
        """Run ``change`` on the key's value by compare-and-set, combined with concurrent ones."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(key, []).append((change, future))
        self._decoders[key] = decoder
        if key not in self._draining:
            self._draining.add(key)
            asyncio.get_running_loop().create_task(self._drain(key))
        return await future

    async def _drain(self, key: str) -> None:
        try:
            while self._queues.get(key):
                batch = self._queues.pop(key)
                try:
                    results = await self._apply_batch(key, [c for c, _ in batch])
                except BaseException as exc:  # every caller of the batch learns of it
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._draining.discard(key)
            self._decoders.pop(key, None)

    async def _apply_batch(self, key: str, changes: list[Change]) -> list[Any]:
        decoder = self._decoders[key]
        for tries in range(1, self.max_tries + 1):
            value, revision = await self._get(key, decoder)
            results, changed = [], False
            for change in changes:
                new, result = change(value)
                if new is not None:
                    value, changed = new, True
                results.append(result)
            if not changed or await self._put(key, value, revision):
                return results
            await self._conflict(tries)
        raise RetryLater(f"{key} too contended", delay=0.2)

    async def _change(
        self, key: str, change: Callable[[budget.Counter], budget.Counter | None]
    ) -> bool:
        """Apply ``change`` to a counter; False when it changed nothing."""

        def step(value: budget.Counter | None) -> tuple[budget.Counter | None, bool]:
            new = change(value or budget.Counter())
            return new, new is not None

        return bool(await self.apply(key, step))

    async def count_message(
        self, project: str, user: str, message_id: str, limits: m.Limits, now: datetime
    ) -> RateCheck:
        """Count the message in the user's minute and hour windows (once per message id)."""
        ts = now.timestamp()
        counts: dict[str, int] = {}
        for window, limit in (
            ("m", limits.user_messages_per_minute),
            ("h", limits.user_messages_per_hour),
        ):
            if limit is None:
                continue
            length = ratelimit.WINDOWS[window]
            start = ratelimit.window_start(ts, length)
            key = subjects.rate_key(window, start, project, user)

            def count(
                w: ratelimit.RateWindow | None,
                start: int = start,
                length: int = length,
                limit: int = limit,
            ) -> tuple[ratelimit.RateWindow | None, tuple[bool, int]]:
                new, allowed, n = budget.count_message(w, message_id, start, length, limit)
                return new, (allowed, n)

            allowed, counts[window] = await self.apply(key, count, ratelimit.decoder)
            if not allowed:
                retry = max(1, int(start + length - ts + 0.999))
                return RateCheck(False, window, limit, retry, counts)
        return RateCheck(True, "", 0, 0, counts)

    async def reserve(
        self,
        state: core.RunState,
        rules: core.Rules,
        now: datetime,
    ) -> tuple[budget.Plan, core.Reservation | None] | None:
        """Hold the run's estimate in its day budgets and a slot of the runs in flight.

        None when no cap or concurrency limit applies (nothing is counted then). Otherwise the
        plan (fits, or the exhausted scope) and, when it fits, the reservation to record.
        """
        limits = rules.limits
        counting, concurrent = budget.has_budget(limits), limits.max_concurrent_runs is not None
        if not (counting or concurrent):
            return None
        day = budget.day_of(now)
        pk = subjects.budget_key(day, state.project_id)
        uk = subjects.budget_key(day, state.project_id, state.user_id)
        ak = subjects.active_key(state.project_id)
        expire_s = rules.run_deadline_s * (rules.max_attempts + 1) + 3600
        ts = now.timestamp()
        # The user's counter and the runs in flight are read for the plan (and the snapshot);
        # each is checked again by its own compare-and-set below.
        u, _ = (await self.counter(uk)) if counting else (budget.Counter(), 0)
        a, _ = (await self.counter(ak)) if concurrent else (budget.Counter(), 0)
        live = sum(1 for h in a.open.values() if ts - h.at < expire_s)
        active = live - (1 if state.run_id in a.open else 0)

        def hold_in_project(p: budget.Counter | None) -> tuple[budget.Counter | None, budget.Plan]:
            """Decided on the project counter as it is at write time: plan, then hold."""
            p = p or budget.Counter()
            plan = budget.plan(
                state.run_id,
                limits,
                p,
                u,
                active,
                state.model,
                rules.downgrade_model,
                rules.downgrade_at,
                rules.models,
                rules.estimated_input_tokens,
                state.max_tokens,
                day,
            )
            if not plan.fits or not counting:
                return None, plan
            hold = budget.Hold(plan.estimate.tokens, plan.estimate.cost_usd, ts)
            new, fits = budget.reserve(
                p, state.run_id, hold, limits.project_daily_tokens, limits.project_daily_cost_usd
            )
            if not fits:  # cannot differ from the plan made on the same value; never pass
                return None, msgspec.structs.replace(plan, fits=False, scope="project_tokens")
            return new, plan

        plan: budget.Plan = await self.apply(pk, hold_in_project)
        if not plan.fits:
            return plan, None
        hold = budget.Hold(plan.estimate.tokens, plan.estimate.cost_usd, ts)
        keys: list[str] = []
        if counting:
            keys.append(pk)
            ok = await self._reserve_in(
                uk, state.run_id, hold, limits.user_daily_tokens, limits.user_daily_cost_usd
            )
            if not ok:
                await self.release(state.run_id, keys)
                scope = budget.exhausted(
                    limits, budget.Counter(), (await self.counter(uk))[0], plan.estimate
                )
                return msgspec.structs.replace(plan, fits=False, scope=scope or "user_tokens"), None
            keys.append(uk)
        if concurrent:
            taken = await self._take_slot(
                ak, state.run_id, limits.max_concurrent_runs, ts, expire_s
            )
            if not taken:
                await self.release(state.run_id, keys)
                return msgspec.structs.replace(plan, fits=False, scope="concurrency"), None
            keys.append(ak)
        return plan, core.Reservation(
            keys=tuple(keys), tokens=plan.estimate.tokens, cost_usd=plan.estimate.cost_usd
        )

    async def _reserve_in(
        self,
        key: str,
        run_id: str,
        hold: budget.Hold,
        cap_tokens: int | None,
        cap_cost: float | None,
    ) -> bool:
        def step(c: budget.Counter | None) -> tuple[budget.Counter | None, bool]:
            return budget.reserve(c or budget.Counter(), run_id, hold, cap_tokens, cap_cost)

        return bool(await self.apply(key, step))

    async def _take_slot(
        self, key: str, run_id: str, limit: int | None, ts: float, expire_s: float
    ) -> bool:
        def step(c: budget.Counter | None) -> tuple[budget.Counter | None, bool]:
            return budget.admit_active(c or budget.Counter(), run_id, limit, ts, expire_s)

        return bool(await self.apply(key, step))

    async def release(self, run_id: str, keys: list[str] | tuple[str, ...]) -> None:
        """Take a run's holds back uncounted (it never ran)."""
        for key in keys:
            await self._change(key, lambda c: budget.drop(c, run_id))

    async def settle(self, run_id: str, r: core.Reservation, tokens: int, cost: float) -> bool:
        """Replace the run's holds by its real usage; False when it was settled already."""
        changed = False
        for key in r.keys:
            if key.startswith("budget."):
                changed |= await self._change(key, lambda c: budget.settle(c, run_id, tokens, cost))
            else:
                await self._change(key, lambda c: budget.drop(c, run_id))
        return changed

    async def charge(self, keys: tuple[str, ...], call_id: str, tokens: int, cost: float) -> bool:
        """Count a call in day budgets after its run settled; False when it was counted already."""
        changed = False
        for key in keys:
            changed |= await self._change(key, lambda c: budget.charge(c, call_id, tokens, cost))
        return changed


class RateCheck(msgspec.Struct, frozen=True):
    allowed: bool
    window: str
    limit: int
    retry_after_s: int
    counts: dict[str, int]


class Aborts:
    """Aborted attempts (``<run id>.<attempt>``) that executors check before calling the model."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv

    async def mark(self, run_id: str, attempt: int) -> None:
        # A put, not a create: marking twice is the same fact.
        await self.kv.put(abort_key(run_id, attempt), b"1")


class ToolUses(msgspec.Struct):
    """One user's authorized calls of one tool on one UTC day (hashes of their call keys)."""

    calls: list[str] = msgspec.field(default_factory=list)


_tool_uses = msgspec.json.Decoder(ToolUses)


class ToolQuota:
    """``per_user_daily`` of a tool, counted in the limits bucket by compare-and-set.

    The value holds the calls it counted, so counting a call again (a redelivery, a second
    replica) answers as the first time and never takes a second slot: once per call.
    """

    def __init__(self, kv: Any, max_tries: int = 50) -> None:
        self.kv = kv
        self.max_tries = max_tries

    @staticmethod
    def key(project: str, user: str, tool: str, day: str) -> str:
        who = hashlib.sha256(user.encode()).hexdigest()[:24]  # any user id, as a safe token
        return f"toolq.{project}.{who}.{tool}.{day}"

    async def take(
        self, project: str, user: str, tool: str, now: datetime, call_key: str, limit: int
    ) -> bool:
        """Whether the call is within the day's limit (counting it if it is new)."""
        key = self.key(project, user, tool, now.strftime("%Y-%m-%d"))
        mark = hashlib.sha256(call_key.encode()).hexdigest()[:32]
        for _ in range(self.max_tries):
            try:
                entry = await self.kv.get(key)
                uses, revision = _tool_uses.decode(entry.value or b"{}"), int(entry.revision or 0)
            except nats.js.errors.KeyNotFoundError:
                uses, revision = ToolUses(), 0
            if mark in uses.calls:
                return True
            if len(uses.calls) >= limit:
                return False
            value = _encoder.encode(ToolUses([*uses.calls, mark]))
            try:
                if revision == 0:
                    await self.kv.create(key, value)
                else:
                    await self.kv.update(key, value, last=revision)
                return True
            except nats.js.errors.KeyWrongLastSequenceError:
                await asyncio.sleep(random.uniform(0, 0.005))
        raise RetryLater(f"tool quota {key} too contended", delay=0.2)
