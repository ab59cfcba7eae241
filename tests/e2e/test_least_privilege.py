"""Least privilege (I5) as the servers enforce it: per-service NATS users and Postgres roles."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import asyncpg
import httpx
import msgspec
import nats
import nats.errors
import nats.js.errors
import pytest
import structlog
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig, StreamConfig

from baton import permissions, roles
from baton.embedded import PostgresServer, create_database
from baton.migrate import migrate
from baton.offline_model import ModelSettings
from services.agent.config import Settings as AgentSettings
from services.agent.handlers import Handlers as AgentHandlers
from shared import estimate, messages, subjects, wiring
from shared.bus import Bus
from shared.config import BaseSettings, Secret
from tests.conftest import ExternalPostgres, _drop_database
from tests.e2e.conftest import Pipeline, SecurePipeline, secure_running
from tests.support import service_metrics

pytestmark = pytest.mark.e2e

NOT_POLICY = ("gateway", "persister", "agent", "executor")


@pytest.fixture(scope="module")
def _one_secure_stack(
    postgres_server: PostgresServer | ExternalPostgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SecurePipeline]:
    """One least-privilege stack for this module, not one per test (six start-ups fewer).

    The tests do not disturb each other through it: they forge and probe on connections of
    their own, as each service's NATS user, so the services' own violation counters stay at 0;
    every forgery is refused; the ones that count (runs, open calls) use projects of their own.
    """
    admin_dsn = postgres_server.dsn()
    name = f"baton_test_{uuid.uuid4().hex}"
    database_url = asyncio.run(create_database(admin_dsn, name))
    try:
        with secure_running(database_url, tmp_path_factory.mktemp("least-privilege")) as p:
            yield p
    finally:
        asyncio.run(_drop_database(admin_dsn, name))


@pytest.fixture
def secure_pipeline(_one_secure_stack: SecurePipeline) -> SecurePipeline:
    """The module's stack with the model as a fresh one: default pace, no calls, no faults."""
    p = _one_secure_stack
    p.model.clear()
    pace = ModelSettings(
        tokens_per_second=400, style="hostile"
    )  # what _running starts the model with
    p.model.update_settings(
        ttft_ms=pace.ttft_ms,
        tokens_per_second=pace.tokens_per_second,
        words_per_reply=pace.words_per_reply,
        seed=pace.seed,
        style=pace.style,
    )
    return p


async def _connect(p: Pipeline, user: str, errors: list[str]) -> NATS:
    async def error_cb(exc: Exception) -> None:
        errors.append(str(exc))

    return await nats.connect(
        p.nats_url,
        user=user,
        password=p.passwords[user],
        inbox_prefix=subjects.inbox_prefix(user) if user != permissions.ADMIN else "_INBOX",
        error_cb=error_cb,
        allow_reconnect=False,
    )


async def _stream_messages(p: Pipeline, stream: str) -> int:
    nc = await _connect(p, permissions.ADMIN, [])
    try:
        return int((await nc.jetstream().stream_info(stream)).state.messages)
    finally:
        await nc.close()


async def _wait_for(errors: list[str], needle: str, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if any(needle in e.lower() for e in errors):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {needle!r} error in {errors}")


def _permission_errors(p: Pipeline, service: str) -> float:
    url = f"http://127.0.0.1:{p.child(service).env['BATON_METRICS_PORT']}/metrics"
    line = f'baton_{service}_nats_errors_total{{kind="permission"}} '
    for row in httpx.get(url, timeout=2).text.splitlines():
        if row.startswith(line):
            return float(row.removeprefix(line))
    return 0.0


async def test_the_journey_works_with_every_service_as_its_own_user(
    secure_pipeline: SecurePipeline,
) -> None:
    p = secure_pipeline
    auth = {"Authorization": f"Bearer {p.token('acme', 'alice')}"}
    async with httpx.AsyncClient(timeout=10) as client:
        body = {"content": "What is least privilege?"}
        key = {"Idempotency-Key": uuid.uuid4().hex}
        r = await client.post(f"{p.gateway}/api/chat", json=body, headers={**auth, **key})
        assert r.status_code == 202, r.text
        cid = r.json()["message"]["conversation_id"]
        # A retry reads the original back from CHAT_IN (the gateway's one stream read).
        again = await client.post(f"{p.gateway}/api/chat", json=body, headers={**auth, **key})
        assert again.status_code == 202 and again.json()["duplicate"] is True, again.text
        roles_seen: list[str] = []
        for _ in range(400):
            got = await client.get(f"{p.gateway}/api/conversations/{cid}/messages", headers=auth)
            if got.status_code == 200:  # 404 until the persister stored the conversation
                roles_seen = [m["role"] for m in got.json()["messages"]]
            if roles_seen == ["user", "assistant"]:
                break
            await asyncio.sleep(0.05)
        assert roles_seen == ["user", "assistant"], p.log_tail()
        usage = (await client.get(f"{p.gateway}/api/usage", headers=auth)).json()
        assert usage["runs"] == 1 and usage["output_tokens"] > 0
        # A resuming SSE client reads the tokens back from CHAT_STREAM (no consumer needed).
        resume = {**auth, "Last-Event-ID": "unknown"}
        tokens: list[str] = []
        url = f"{p.gateway}/api/conversations/{cid}/events"
        async with client.stream("GET", url, headers=resume) as events:
            assert events.status_code == 200
            async for line in events.aiter_lines():
                tokens += [line] if line.startswith("event: token") else []
                if line.startswith("event: message.completed"):
                    break
        assert tokens, "no tokens replayed from CHAT_STREAM"
    # Permissions wide enough: no service hit a single violation on the way.
    for service in permissions.SERVICES:
        assert _permission_errors(p, service) == 0, f"{service}\n{p.log_tail()}"


async def test_only_policy_may_emit_executor_tasks(secure_pipeline: SecurePipeline) -> None:
    p = secure_pipeline
    before = await _stream_messages(p, subjects.STREAM_TASKS)
    forged = subjects.exec_task("acme", str(uuid.uuid4()))
    for user in NOT_POLICY:
        errors: list[str] = []
        nc = await _connect(p, user, errors)
        try:
            with pytest.raises(TimeoutError):
                await nc.jetstream(timeout=1.0).publish(
                    forged, b"{}", headers={"Nats-Msg-Id": user}
                )
            await _wait_for(errors, "permissions violation")
            # A core publish looks like success to the client; the server drops it all the same.
            await nc.publish(forged, b"{}")
            await nc.flush()
        finally:
            await nc.close()
    await asyncio.sleep(0.5)
    assert await _stream_messages(p, subjects.STREAM_TASKS) == before


async def test_the_executor_may_ask_for_a_settle_and_start_no_other_policy_timer(
    secure_pipeline: SecurePipeline,
) -> None:
    """A redelivered task's executor publishes its call's settle timer on
    ``policy.deadline.<p>.<c>.settle`` (policy checks it against the run's record); the
    executor's user may not publish an attempt's deadline itself, nor usage on policy's
    subject, and no other service but policy may publish on the settle subject."""
    p = secure_pipeline
    conversation = str(uuid.uuid4())
    settle = subjects.policy_settle("acme", conversation)
    before = await _stream_messages(p, subjects.STREAM_POLICY)
    errors: list[str] = []
    nc = await _connect(p, "executor", errors)
    try:
        js = nc.jetstream(timeout=2.0)  # for the refused calls
        # A call that must succeed gets a generous bound; only refused ones wait a short one.
        ok = nc.jetstream(timeout=10.0)
        ack = await ok.publish(settle, b"{}", headers={"Nats-Msg-Id": f"lp-settle-{conversation}"})
        assert ack.stream == subjects.STREAM_POLICY
        for forged in (
            subjects.policy_deadline("acme", conversation),
            subjects.policy_usage("acme", conversation),
        ):
            errors.clear()
            with pytest.raises((TimeoutError, nats.errors.Error)):
                await js.publish(forged, b"{}")
            await _wait_for(errors, "permissions violation")
    finally:
        await nc.close()
    for user in ("gateway", "persister", "agent"):
        errors = []
        nc = await _connect(p, user, errors)
        try:
            with pytest.raises((TimeoutError, nats.errors.Error)):
                await nc.jetstream(timeout=1.0).publish(settle, b"{}")
            await _wait_for(errors, "permissions violation")
        finally:
            await nc.close()
    assert await _stream_messages(p, subjects.STREAM_POLICY) == before + 1


async def test_no_service_may_create_change_or_delete_streams_and_consumers(
    secure_pipeline: SecurePipeline,
) -> None:
    p = secure_pipeline
    for user in permissions.SERVICES:
        errors: list[str] = []
        nc = await _connect(p, user, errors)
        js = nc.jetstream(timeout=1.0)
        try:
            attempts = (
                js.add_stream(StreamConfig(name="EVIL", subjects=["evil.>"])),
                js.update_stream(
                    StreamConfig(name=subjects.STREAM_TASKS, subjects=["exec.task.>", "evil.>"])
                ),
                js.delete_stream(subjects.STREAM_TASKS),
                js.purge_stream(subjects.STREAM_TASKS),
                js.add_consumer(subjects.STREAM_TASKS, ConsumerConfig(durable_name="evil")),
                js.delete_consumer(subjects.STREAM_TASKS, wiring.EXECUTOR_TASKS.durable),
            )
            # Each is refused: the server drops the request and the client times out. Waited
            # for together (one second, not six per user).
            results = await asyncio.gather(*attempts, return_exceptions=True)
            assert all(isinstance(r, TimeoutError) for r in results), results
            await _wait_for(errors, "permissions violation")
        finally:
            await nc.close()
    admin = await _connect(p, permissions.ADMIN, [])
    try:
        js = admin.jetstream()
        names = {s.config.name for s in await js.streams_info()}
        assert "EVIL" not in names and subjects.STREAM_TASKS in names
        info = await js.stream_info(subjects.STREAM_TASKS)
        assert info.config.subjects == ["exec.task.>"]
        durables = {c.name for c in await js.consumers_info(subjects.STREAM_TASKS)}
        assert durables == {wiring.EXECUTOR_TASKS.durable}
    finally:
        await admin.close()


async def test_a_violation_is_counted_in_the_services_metrics(
    secure_pipeline: SecurePipeline,
) -> None:
    p = secure_pipeline
    metrics = service_metrics("agent")
    settings = BaseSettings(
        nats_url=p.nats_url, nats_user="agent", nats_password=Secret(p.passwords["agent"])
    )
    bus = await Bus.connect(settings, "agent", metrics, structlog.get_logger())
    try:
        with pytest.raises(TimeoutError):
            await bus.publish(
                subjects.exec_task("acme", "c1"), _Forged(), msg_id="forged", timeout=1.0
            )
        sample = 0.0
        for _ in range(100):
            sample = (
                metrics.registry.get_sample_value(
                    "baton_agent_nats_errors_total", {"kind": "permission"}
                )
                or 0.0
            )
            if sample:
                break
            await asyncio.sleep(0.05)
        assert sample == 1.0
    finally:
        await bus.close()


class _Forged(msgspec.Struct):
    pass


async def test_only_the_persisters_role_writes_the_database(database_url: str) -> None:
    # The roles need no running service: a fresh database, migrated and granted as _running
    # does it for a least-privilege stack (the module's stack has stored messages by now).
    await migrate(database_url)
    await roles.ensure_roles(database_url)
    url = database_url
    for service in roles.READS:
        con = await asyncpg.connect(roles.dsn_for(url, service))
        try:
            assert await con.fetchval("SELECT count(*) FROM messages") == 0
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await con.execute(
                    "INSERT INTO conversations (id, project_id, user_id, created_at) "
                    "VALUES ($1, 'acme', 'mallory', now())",
                    uuid.uuid4(),
                )
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await con.execute("UPDATE project_usage SET runs = 0")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await con.execute("CREATE TABLE evil (id int)")
        finally:
            await con.close()
    con = await asyncpg.connect(roles.dsn_for(url, "agent"))
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await con.fetchval("SELECT count(*) FROM usage")
    finally:
        await con.close()
    con = await asyncpg.connect(roles.dsn_for(url, roles.WRITER))
    try:
        await con.execute(
            "INSERT INTO conversations (id, project_id, user_id, created_at) "
            "VALUES ($1, 'acme', 'alice', now())",
            uuid.uuid4(),
        )
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await con.execute("DROP TABLE messages")
    finally:
        await con.close()


async def test_only_policy_writes_the_limits_bucket_and_the_gateway_only_reads_it(
    secure_pipeline: SecurePipeline,
) -> None:
    """A forged budget or rate window would lift a limit: only policy may write them."""
    p = secure_pipeline
    key = subjects.rate_key("m", 0, "acme", "mallory")
    policy_nc = await _connect(p, "policy", [])
    try:
        kv = await policy_nc.jetstream().key_value(subjects.BUCKET_LIMITS)
        await kv.put(key, b'{"start":0,"length":60,"limit":1,"ids":["x"]}')
    finally:
        await policy_nc.close()
    errors: list[str] = []
    gateway_nc = await _connect(p, "gateway", errors)
    try:
        reader = await gateway_nc.jetstream(timeout=10.0).key_value(subjects.BUCKET_LIMITS)
        assert (await reader.get(key)).value is not None  # reading works
        kv = await gateway_nc.jetstream(timeout=1.0).key_value(subjects.BUCKET_LIMITS)
        with pytest.raises(TimeoutError):
            await kv.put(key, b'{"start":0,"length":60,"limit":1000,"ids":[]}')
        await _wait_for(errors, "permissions violation")
    finally:
        await gateway_nc.close()
    for user in ("persister", "agent", "executor"):
        nc = await _connect(p, user, [])
        try:
            with pytest.raises((TimeoutError, nats.errors.Error)):
                await nc.jetstream(timeout=1.0).key_value(subjects.BUCKET_LIMITS)
        finally:
            await nc.close()


async def test_cancel_works_as_its_own_users_and_only_policy_may_abort_calls(
    secure_pipeline: SecurePipeline,
) -> None:
    p = secure_pipeline
    p.model.update_settings(tokens_per_second=8, words_per_reply=400)
    auth = {"Authorization": f"Bearer {p.token('initech', 'alice')}"}
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"{p.gateway}/api/chat", json={"content": "A long one"}, headers=auth)
        assert r.status_code == 202, r.text
        cid, mid = r.json()["message"]["conversation_id"], r.json()["message"]["id"]
        run_id = f"run-{mid}"

        def open_calls() -> list[str]:
            # The executor's answer call (the agent's classification is tagged too).
            calls = p.model.calls().items()
            return [k for k, v in calls if v["outcome"] == "open" and k.startswith("task:")]

        for _ in range(400):
            if open_calls():
                break
            await asyncio.sleep(0.05)
        [call] = open_calls()
        # A forged abort from any other service's user is refused by the server.
        abort = messages.RunAbort(event_id="x", message_id=mid, conversation_id=cid,
                                  project_id="initech", run_id=run_id, attempt=1,
                                  reason="cancelled")  # fmt: skip
        for user in NOT_POLICY:
            errors: list[str] = []
            nc = await _connect(p, user, errors)
            try:
                await nc.publish(subjects.exec_abort("initech", cid), messages.encode(abort))
                await _wait_for(errors, "permissions violation")
            finally:
                await nc.close()
        await asyncio.sleep(0.5)
        assert p.model.calls()[call]["outcome"] == "open"
        # The real path: gateway → policy → executors, with each service's own rights.
        url = f"{p.gateway}/api/conversations/{cid}/runs/{run_id}/cancel"
        assert (await client.post(url, headers=auth)).status_code == 202
        status = ""
        for _ in range(400):
            state = await client.get(f"{p.gateway}/api/conversations/{cid}/state", headers=auth)
            status = state.json()["runs"][0]["status"]
            if status == "cancelled":
                break
            await asyncio.sleep(0.05)
        assert status == "cancelled", p.log_tail()
    assert p.model.calls()[call]["outcome"] == "client_disconnected"
    for service in permissions.SERVICES:
        assert _permission_errors(p, service) == 0, f"{service}\n{p.log_tail()}"


def _matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, a trailing ``>`` one or more."""
    want, got = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(got) > i
        if i >= len(got) or (token != "*" and token != got[i]):
            return False
    return len(want) == len(got)


def _may_publish(user: str, subject: str) -> bool:
    publish = permissions.permissions(user)["publish"]
    allowed = any(_matches(p, subject) for p in publish["allow"])
    return allowed and not any(_matches(p, subject) for p in publish["deny"])


def _concrete(pattern: str) -> str:
    return ".".join("acme" if t == "*" else t for t in pattern.split(".")).replace(">", "x.y")


# Streams the services consume; the dead letters are left out: every service may add to them.
_TARGET_STREAMS = [s for s in subjects.STREAMS if s.name != subjects.STREAM_DLQ]


def _requests(user: str) -> list[tuple[str, bytes]]:
    """The JetStream API requests the user is allowed, each with a body that gets an answer."""
    bodies = {
        "$JS.API.CONSUMER.MSG.NEXT.": b'{"batch":1,"no_wait":true}',
        "$JS.API.STREAM.MSG.GET.": b'{"seq":1}',
        "$JS.API.DIRECT.GET.": b'{"seq":1}',
    }
    # A purge (the persister's, of a deleted conversation) by a filter that matches nothing.
    nobody = dict(subjects.content_filters("nobody", "nobody"))
    found = []
    for subject in permissions.permissions(user)["publish"]["allow"]:
        if subject.startswith("$JS.API.") and "*" not in subject and ">" not in subject:
            body = next((b for prefix, b in bodies.items() if subject.startswith(prefix)), b"")
            if subject.startswith("$JS.API.STREAM.PURGE."):
                body = msgspec.json.encode({"filter": nobody[subject.rsplit(".", 1)[1]]})
            found.append((subject, body))
    return found


async def _counts(p: Pipeline) -> dict[str, int]:
    nc = await _connect(p, permissions.ADMIN, [])
    try:
        js = nc.jetstream()
        return {s.name: int((await js.stream_info(s.name)).state.messages) for s in _TARGET_STREAMS}
    finally:
        await nc.close()


def _own_stream_subjects(user: str) -> list[str]:
    """One subject of each kind the user publishes that a stream stores."""
    own = [_concrete(pattern) for pattern in permissions.GRANTS[user].publishes]
    return [
        subject
        for subject in own
        if any(_matches(pattern, subject) for s in _TARGET_STREAMS for pattern in s.subjects)
    ]


async def test_no_service_gets_the_server_to_write_into_a_stream_it_may_not_publish_to(
    secure_pipeline: SecurePipeline,
) -> None:
    """A reply subject is where the server answers: it must not be a way around a denial (I5).

    Every JetStream request a service is allowed (consumer info, pull, message and direct
    gets, bucket info) and the PubAck of its own publishes are sent with a reply subject in a
    stream it may not publish to: the server answers there, and nothing may store that.
    """
    p = secure_pipeline
    # Each service's own publishes, stored once now, so the attack below only repeats them
    # (a duplicate id is not stored again, but its PubAck still goes to the reply subject).
    for user in permissions.SERVICES:
        nc = await _connect(p, user, [])
        try:
            for subject in _own_stream_subjects(user):
                await nc.jetstream(timeout=5).publish(subject, b"{}", headers={"Nats-Msg-Id": user})
        finally:
            await nc.close()
    before = await _counts(p)
    attempts = 0
    for user in permissions.SERVICES:
        targets = [
            _concrete(pattern)
            for stream in _TARGET_STREAMS
            for pattern in stream.subjects
            if not _may_publish(user, _concrete(pattern))
        ]
        assert targets and _requests(user) and _own_stream_subjects(user), user
        nc = await _connect(p, user, [])
        try:
            for target in targets:
                for subject, body in _requests(user):
                    await nc.publish(subject, body, reply=target)
                    attempts += 1
                for subject in _own_stream_subjects(user):
                    await nc.publish(subject, b"{}", reply=target, headers={"Nats-Msg-Id": user})
                    attempts += 1
            # A request of its own answered: the server has read everything sent before it.
            info = next(r for r in _requests(user) if ".INFO." in r[0])
            await nc.request(*info, timeout=5)
        finally:
            await nc.close()
    assert attempts > 50
    after = before
    for _ in range(10):  # answers pass through the server's internal queues: give them time
        await asyncio.sleep(0.1)
        after = await _counts(p)
    assert after == before, {n: after[n] - before[n] for n in before if after[n] != before[n]}


async def test_policy_reads_a_calls_records_and_bills_a_dead_call_for_the_persister_to_store(
    secure_pipeline: SecurePipeline,
) -> None:
    """The deadline path of I4 as policy's own user: a call's record in CHAT_STREAM is read by
    subject, its estimate is published on policy.usage, and the persister stores the row."""
    p = secure_pipeline
    call_id = f"task:run-{uuid.uuid4()}:1#1"
    errors: list[str] = []
    nc = await _connect(p, "policy", errors)
    try:
        js = nc.jetstream(timeout=5.0)
        with pytest.raises(nats.js.errors.NotFoundError):  # allowed, and nothing there
            await js.get_last_msg(subjects.STREAM_TOKENS, estimate.record_subject(call_id))
        usage = messages.ModelUsage(
            event_id=estimate.estimate_id(call_id),
            message_id=str(uuid.uuid4()),
            conversation_id=str(uuid.uuid4()),
            project_id="lp-estimates",
            call_id=call_id,
            run_id=call_id.split(":1#")[0].removeprefix("task:"),
            user_id="alice",
            purpose="answer",
            model="claude-sonnet-4-6",
            outcome=estimate.OUTCOME,
            usage=messages.Usage(input_tokens=40, output_tokens=3),
            prices=messages.Prices(input=3.0, output=15.0),
            task_id=call_id.removesuffix("#1"),
            attempt=1,
            estimated=True,
        )
        subject = subjects.policy_usage(usage.project_id, usage.conversation_id)
        ack = await js.publish(
            subject, messages.encode(usage), headers={"Nats-Msg-Id": usage.event_id}
        )
        assert ack.stream == subjects.STREAM_POLICY
    finally:
        await nc.close()
    assert not errors, errors
    con = await asyncpg.connect(p.database_url)
    try:
        row = None
        for _ in range(400):
            row = await con.fetchrow("SELECT * FROM usage WHERE call_id = $1", call_id)
            if row is not None:
                break
            await asyncio.sleep(0.05)
        assert row is not None, p.log_tail()
        assert (row["estimated"], row["outcome"], row["input_tokens"]) == (
            True,
            "died_with_executor",
            40,
        )
    finally:
        await con.close()


async def test_the_agent_writes_and_reads_its_own_call_records_and_cannot_forge_an_executors(
    secure_pipeline: SecurePipeline,
) -> None:
    """The agent's user may write a classification call's record (``agent.call.*``) and read
    records back from their own stream (AGENT_CALLS); it may not write an executor's record,
    whose forgery would make a redelivered task bill a call that never ran, nor read a
    conversation's answer deltas in CHAT_STREAM (a stream-message get is not narrowed by
    subject, so the agent's records are kept out of that stream)."""
    p = secure_pipeline
    call_id = f"classify:{uuid.uuid4()}#1"
    forged_id = f"task:run-{uuid.uuid4()}:1#1"
    answer = subjects.token_stream("lp-agent", str(uuid.uuid4()))
    admin = await _connect(p, permissions.ADMIN, [])
    try:
        await admin.jetstream(timeout=5.0).publish(answer, b'{"text": "a secret answer"}')
    finally:
        await admin.close()
    errors: list[str] = []
    nc = await _connect(p, "agent", errors)
    try:
        js = nc.jetstream(timeout=2.0)  # for the refused calls; those that must work: ok
        ok = nc.jetstream(timeout=10.0)
        record = estimate.ModelCallRecord(
            call_id=call_id,
            task_id=call_id.removesuffix("#1"),
            state="started",
            at=datetime.now(UTC),
            usage=messages.Usage(input_tokens=30),
        )
        ack = await ok.publish(estimate.record_subject(call_id), msgspec.json.encode(record))
        assert ack.stream == subjects.STREAM_AGENT_CALLS == estimate.record_stream(call_id)
        stored = await ok.get_last_msg(
            subjects.STREAM_AGENT_CALLS, estimate.record_subject(call_id)
        )
        assert msgspec.json.decode(stored.data or b"", type=estimate.ModelCallRecord) == record
        forged = msgspec.structs.replace(record, call_id=forged_id, task_id=forged_id[:-2])
        with pytest.raises((TimeoutError, nats.errors.Error)):
            await js.publish(estimate.record_subject(forged_id), msgspec.json.encode(forged))
        assert any("permissions violation" in e.lower() for e in errors), errors
        errors.clear()
        with pytest.raises((TimeoutError, nats.errors.Error)):
            await js.get_last_msg(subjects.STREAM_TOKENS, answer)
    finally:
        await nc.close()
    assert any("permissions violation" in e.lower() for e in errors), errors
    admin = await _connect(p, permissions.ADMIN, [])
    try:
        with pytest.raises(nats.js.errors.NotFoundError):
            await admin.jetstream(timeout=5.0).get_last_msg(
                subjects.STREAM_TOKENS, estimate.record_subject(forged_id)
            )
    finally:
        await admin.close()


async def test_a_refused_read_of_call_records_does_not_hold_up_a_redelivered_message(
    secure_pipeline: SecurePipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """During a rolling deploy an agent and the NATS config may disagree on where call records
    live (an agent of sessions 27 and 28 reads them in CHAT_STREAM, which the agent's user may no
    longer read). The refused read is counted and skipped: the message is classified, not
    failed on every delivery until it is dead-lettered."""
    p = secure_pipeline
    metrics = service_metrics("agent")
    settings = BaseSettings(
        nats_url=p.nats_url, nats_user="agent", nats_password=Secret(p.passwords["agent"])
    )
    bus = await Bus.connect(settings, "agent", metrics, structlog.get_logger())
    monkeypatch.setattr(estimate, "record_stream", lambda call_id: subjects.STREAM_TOKENS)
    e = messages.UserMessagePersisted(
        event_id="persisted:user:m1",
        message_id=str(uuid.uuid4()),
        conversation_id=str(uuid.uuid4()),
        project_id="lp-agent",
        user_id="alice",
        content="hi",
        content_hash="h",
        created_at=datetime.now(UTC),
    )
    try:
        # Only the record read is used: no history, no model.
        agent = AgentHandlers(bus, None, None, AgentSettings(), metrics)  # type: ignore[arg-type]
        assert await agent._unsettled(e, delivery=3) == []
        assert agent.unread._value.get() == 1
        assert agent.estimated._value.get() == 0
    finally:
        await bus.close()
