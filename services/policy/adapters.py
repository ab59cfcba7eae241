"""Policy's state: run records in a JetStream KV bucket, created once and changed by compare-and-set."""

from __future__ import annotations

import asyncio
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

_decoder = msgspec.json.Decoder(RunState)
_conv_decoder = msgspec.json.Decoder(ConvState)
_counter_decoder = msgspec.json.Decoder(budget.Counter)
_encoder = msgspec.json.Encoder()


class Runs:
    """Create-only run records; every change names the revision it read (safe across replicas)."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv

    async def create(self, state: RunState) -> tuple[RunState, bool]:
        """Store a new run, or return the one a previous trigger created (and False)."""
        try:
            await self.kv.create(state.run_id, _encoder.encode(state))
            return state, True
        except nats.js.errors.KeyWrongLastSequenceError:
            existing, _ = await self.get(state.run_id)
            return existing, False

    async def find(self, run_id: str) -> RunState | None:
        """The run if a previous trigger created it (None: this is the first)."""
        try:
            entry = await self.kv.get(run_id)
        except nats.js.errors.KeyNotFoundError:
            return None
        return None if entry.value is None else _decoder.decode(entry.value)

    async def get(self, run_id: str) -> tuple[RunState, int]:
        try:
            entry = await self.kv.get(run_id)
        except nats.js.errors.KeyNotFoundError as exc:
            raise BadData(f"no run {run_id}") from exc
        if entry.value is None:
            raise BadData(f"run {run_id} was deleted")
        return _decoder.decode(entry.value), int(entry.revision or 0)

    async def update(self, state: RunState, revision: int) -> None:
        try:
            await self.kv.update(state.run_id, _encoder.encode(state), last=revision)
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

    async def put(self, conv: ConvState, revision: int) -> None:
        """Store ``conv`` if nobody changed it since ``revision`` (0: create-only)."""
        value = _encoder.encode(conv)
        try:
            if revision == 0:
                await self.kv.create(self.key(conv.conversation_id), value)
            else:
                await self.kv.update(self.key(conv.conversation_id), value, last=revision)
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise RetryLater(
                f"conversation {conv.conversation_id} changed concurrently", delay=0.05
            ) from exc


class Limiter:
    """Budgets, runs in flight and rate windows in the limits bucket, changed by compare-and-set.

    Every change reads a counter, decides with the pure functions of ``budget`` and writes it
    back naming the revision it read; a conflict (another replica was faster) reads and decides
    again. That is what makes a cap hold with any number of policy replicas.
    """

    def __init__(self, kv: Any, max_tries: int = 200) -> None:
        self.kv = kv
        self.max_tries = max_tries

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
        await asyncio.sleep(random.uniform(0, 0.002 * min(tries, 10)))

    async def counter(self, key: str) -> tuple[budget.Counter, int]:
        value, revision = await self._get(key, _counter_decoder)
        return (value or budget.Counter()), revision

    async def _change(
        self, key: str, change: Callable[[budget.Counter], budget.Counter | None]
    ) -> bool:
        """Apply ``change`` to a counter by compare-and-set; False when it changed nothing."""
        for tries in range(1, self.max_tries + 1):
            c, revision = await self.counter(key)
            new = change(c)
            if new is None:
                return False
            if await self._put(key, new, revision):
                return True
            await self._conflict(tries)
        raise RetryLater(f"{key} too contended", delay=0.2)

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
            for tries in range(1, self.max_tries + 1):
                w, revision = await self._get(key, ratelimit.decoder)
                new, allowed, count = budget.count_message(w, message_id, start, length, limit)
                if new is None or await self._put(key, new, revision):
                    break
                await self._conflict(tries)
            else:
                raise RetryLater(f"{key} too contended", delay=0.2)
            counts[window] = count
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
        day, ts = budget.day_of(now), now.timestamp()
        pk = subjects.budget_key(day, state.project_id)
        uk = subjects.budget_key(day, state.project_id, state.user_id)
        ak = subjects.active_key(state.project_id)
        expire_s = rules.run_deadline_s * (rules.max_attempts + 1) + 3600
        for tries in range(1, self.max_tries + 1):
            p, p_rev = (await self.counter(pk)) if counting else (budget.Counter(), 0)
            u, _ = (await self.counter(uk)) if counting else (budget.Counter(), 0)
            a, _ = (await self.counter(ak)) if concurrent else (budget.Counter(), 0)
            live = sum(1 for h in a.open.values() if ts - h.at < expire_s)
            plan = budget.plan(
                state.run_id,
                limits,
                p,
                u,
                live - (1 if state.run_id in a.open else 0),
                state.model,
                rules.downgrade_model,
                rules.downgrade_at,
                rules.models,
                rules.estimated_input_tokens,
                state.max_tokens,
                day,
            )
            if not plan.fits:
                return plan, None
            hold = budget.Hold(plan.estimate.tokens, plan.estimate.cost_usd, ts)
            keys: list[str] = []
            if counting:
                new, fits = budget.reserve(
                    p,
                    state.run_id,
                    hold,
                    limits.project_daily_tokens,
                    limits.project_daily_cost_usd,
                )
                if not fits:
                    continue  # changed between the reads: plan again
                if new is not None and not await self._put(pk, new, p_rev):
                    await self._conflict(tries)
                    continue
                keys.append(pk)
                ok = await self._reserve_in(
                    uk, state.run_id, hold, limits.user_daily_tokens, limits.user_daily_cost_usd
                )
                if not ok:
                    await self.release(state.run_id, keys)
                    scope = budget.exhausted(
                        limits, budget.Counter(), (await self.counter(uk))[0], plan.estimate
                    )
                    return msgspec.structs.replace(
                        plan, fits=False, scope=scope or "user_tokens"
                    ), None
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
        raise RetryLater("limits bucket too contended", delay=0.2)

    async def _reserve_in(
        self,
        key: str,
        run_id: str,
        hold: budget.Hold,
        cap_tokens: int | None,
        cap_cost: float | None,
    ) -> bool:
        fitted: list[bool] = []

        def change(c: budget.Counter) -> budget.Counter | None:
            new, fits = budget.reserve(c, run_id, hold, cap_tokens, cap_cost)
            fitted.append(fits)
            return new

        await self._change(key, change)
        return fitted[-1]

    async def _take_slot(
        self, key: str, run_id: str, limit: int | None, ts: float, expire_s: float
    ) -> bool:
        taken: list[bool] = []

        def change(c: budget.Counter) -> budget.Counter | None:
            new, fits = budget.admit_active(c, run_id, limit, ts, expire_s)
            taken.append(fits)
            return new

        await self._change(key, change)
        return taken[-1]

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


class RateCheck(msgspec.Struct, frozen=True):
    allowed: bool
    window: str
    limit: int
    retry_after_s: int
    counts: dict[str, int]
