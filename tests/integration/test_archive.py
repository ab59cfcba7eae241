"""Retention and archival against real NATS, Postgres and a real S3 server (moto in server
mode, a process of its own): archive, delete, restore, compare; once per period across
replicas; an owner's deletion is never archived; a sweep killed mid-batch completes on the
next run without a duplicate or a loss."""

from __future__ import annotations

import asyncio
import gzip
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import pytest_asyncio

from baton import roles
from baton.embedded import STARTUP_S, free_port
from services.gateway import adapters
from services.persister import archive, sweep
from services.persister.adapters import Store
from services.persister.conversations import ConversationStore, Purger
from services.persister.s3 import S3
from services.persister.sweep import Sweeper
from shared import deletion, retention, subjects
from shared import messages as m
from shared.bus import Bus
from shared.db import create_pool
from tests.integration.conftest import Infra
from tests.support import connect_bus, exec_result, read_subject, service_metrics, user_event

KEPT = retention.parse(b"[defaults]\nretention_days = 90\n[projects.brief]\nretention_days = 7\n")
OLD = timedelta(days=100)


class Env(msgspec.Struct):
    pool: Any
    bus: Bus
    store: Store
    infra: Infra


@pytest_asyncio.fixture
async def env(infra: Infra) -> AsyncIterator[Env]:
    pool = await create_pool(infra.database_url)
    bus = await connect_bus(infra.nats_url, "persister")
    yield Env(pool, bus, Store(pool), infra)
    await bus.close()
    await pool.close()


@pytest.fixture
def s3_server(tmp_path: Path) -> Iterator[str]:
    """A real S3 server (moto's server mode) on a free port, stopped by its pid."""
    port = free_port()
    log = (tmp_path / "moto.log").open("wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_S
    while True:
        try:
            httpx.get(url, timeout=1)
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


async def _conversation(env: Env, project: str = "p1", user: str = "u1", turns: int = 3) -> str:
    """A conversation as the pipeline leaves it: messages, runs, answers, usage rows."""
    cid = str(uuid.uuid4())
    for i in range(turns):
        e = user_event(
            f"question {i} about retention", project=project, user=user, conversation_id=cid
        )
        await env.store.insert_user_message(e)
        run_id = f"run-{e.message_id}"
        await env.store.upsert_run(
            m.RunVerdict(
                event_id=f"verdict:{run_id}",
                message_id=e.message_id,
                conversation_id=cid,
                project_id=project,
                run_id=run_id,
                user_id=user,
                verdict="approve",
                status="running",
                reason="within limits",
                model="claude-sonnet-4-6",
                executor="chat",
                attempt=1,
            )
        )
        await env.store.store_result(exec_result(e, 1, text=f"answer {i}"))
    return cid


async def _age(env: Env, cid: str, by: timedelta = OLD) -> None:
    await env.pool.execute(
        "UPDATE conversations SET last_activity_at = last_activity_at - $2::interval WHERE id = $1",
        uuid.UUID(cid),
        by,
    )


async def _rows(env: Env, cid: str) -> list[tuple[str, str]]:
    async with env.pool.acquire() as con:
        return await archive.dump(con, cid)


async def _delete(env: Env, tomb: m.ConversationDeleteRequested) -> None:
    """What the persister does with the sweep's deletion request (its own handler's two steps):
    the content rows go, the row stays as the tombstone, the streams are purged."""
    records = await ConversationStore(env.pool).delete(tomb)
    await Purger(env.bus).purge(tomb.project_id, tomb.conversation_id, records)


def _sweeper(env: Env, target: archive.Target, prefix: str = "", **kw: Any) -> Sweeper:
    return Sweeper(env.pool, env.bus, target, prefix, KEPT, service_metrics("persister"), **kw)


def _cli(env: Env, *args: str, extra: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    environ = {
        **os.environ,
        "BATON_DATABASE_URL": env.infra.database_url,
        "BATON_NATS_URL": env.infra.nats_url,
        **(extra or {}),
    }
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "baton"), "archive", *args],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _run(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-3000:]
    result: dict[str, Any] = msgspec.json.decode(out.splitlines()[-1])
    return result


async def _tombstones(env: Env, at_least: int) -> list[m.ConversationDeleteRequested]:
    msgs = await read_subject(env.bus, subjects.STREAM_CONVERSATIONS, "conv.delete.>", at_least)
    return [msgspec.json.decode(x.data, type=m.ConversationDeleteRequested) for x in msgs]


# ---- archive, delete, restore, compare ---------------------------------------------------


async def test_an_archived_conversation_is_restored_identical_from_a_directory(
    env: Env, tmp_path: Path
) -> None:
    cid = await _conversation(env)
    keep = await _conversation(env)  # recent: stays
    await _age(env, cid)
    before = await _rows(env, cid)
    assert {t for t, _ in before} == {"conversations", "messages", "runs", "usage"}

    result = await _sweeper(env, archive.Directory(tmp_path)).run_once()
    assert (result.ran, result.archived, result.backlog) == (True, 1, 0)
    path = tmp_path / "p1" / f"{cid}.jsonl.gz"
    header, rows = archive.decode(path.read_bytes())
    assert rows == before and header.counts["messages"] == 6
    # One JSON object per line, gzipped: readable by anyone with zcat and jq.
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    assert all(msgspec.json.decode(line) for line in lines)
    [tomb] = await _tombstones(env, 1)
    assert (tomb.conversation_id, tomb.reason, tomb.requested_by) == (cid, "retention", "retention")

    await _delete(env, tomb)
    gone = await _rows(env, cid)
    assert not [t for t, _ in gone if t == "messages"]
    assert msgspec.json.decode(gone[0][1])["deleted_at"] is not None  # the tombstone row
    restored = _run(_cli(env, "restore", "--conversation", cid))
    assert restored["tombstone_lifted"] is True
    assert await _rows(env, cid) == before
    assert await deletion.tombstone(env.bus, "p1", cid) is None
    assert (await _rows(env, keep))[0][0] == "conversations"


async def test_an_archive_goes_to_a_real_s3_bucket_and_comes_back(env: Env, s3_server: str) -> None:
    client = S3(s3_server, "test-key", "test-secret")
    await client.create_bucket("baton-archive")
    place = archive.Place(
        url="s3://baton-archive/retention",
        s3_endpoint=s3_server,
        s3_access_key_id="test-key",
        s3_secret_access_key="test-secret",  # type: ignore[arg-type]
    )
    target, prefix = archive.target(place)
    cid = await _conversation(env, project="brief", turns=2)
    await _age(env, cid, timedelta(days=8))  # past brief's 7 days, not the default 90
    other = await _conversation(env, project="p1", turns=1)
    await _age(env, other, timedelta(days=8))
    before = await _rows(env, cid)
    result = await _sweeper(env, target, prefix).run_once()
    assert result.archived == 1
    stored = await client.get("baton-archive", f"retention/brief/{cid}.jsonl.gz")
    assert stored is not None and archive.decode(stored)[1] == before
    [tomb] = await _tombstones(env, 1)
    await _delete(env, tomb)
    _run(
        _cli(
            env,
            "restore",
            "--conversation",
            cid,
            extra={
                "PERSISTER_ARCHIVE_S3_ENDPOINT": s3_server,
                "PERSISTER_ARCHIVE_S3_ACCESS_KEY_ID": "test-key",
                "PERSISTER_ARCHIVE_S3_SECRET_ACCESS_KEY": "test-secret",
            },
        )
    )
    assert await _rows(env, cid) == before


async def test_a_restore_refuses_a_live_conversation_and_a_foreign_file(
    env: Env, tmp_path: Path
) -> None:
    cid = await _conversation(env, turns=1)
    await _age(env, cid)
    await _sweeper(env, archive.Directory(tmp_path)).run_once()
    live = _cli(env, "restore", "--conversation", cid)
    live.communicate(timeout=60)
    assert live.returncode == 2  # the rows are still there: nothing is overwritten
    other = str(uuid.uuid4())
    wrong = _cli(
        env, "restore", "--conversation", other, "--from", f"file://{tmp_path}/p1/{cid}.jsonl.gz"
    )
    _, err = wrong.communicate(timeout=60)
    assert wrong.returncode == 2 and b"holds conversation" in err
    truncated = gzip.compress(
        gzip.decompress((tmp_path / "p1" / f"{cid}.jsonl.gz").read_bytes())[:-200]
    )
    with pytest.raises(archive.ArchiveError):
        archive.decode(truncated)


# ---- once per period, never what the owner deleted ---------------------------------------


async def test_replicas_sweep_once_per_period(env: Env, tmp_path: Path) -> None:
    for _ in range(4):
        await _age(env, await _conversation(env, turns=1))
    a = _sweeper(env, archive.Directory(tmp_path), batch=1, pause_s=0.05, instance="a")
    b = _sweeper(env, archive.Directory(tmp_path), batch=1, pause_s=0.05, instance="b")
    first, second = await asyncio.gather(a.run_once(), b.run_once())
    assert sorted([first.ran, second.ran]) == [False, True]
    assert first.archived + second.archived == 4
    later = await b.run_once()
    assert (later.ran, later.reason) == (False, "a sweep finished this period")
    sweeps = await env.pool.fetchval("SELECT count(*) FROM retention_sweeps")
    assert sweeps == 1


async def test_a_conversation_its_owner_deleted_is_never_archived(env: Env, tmp_path: Path) -> None:
    cid = await _conversation(env, turns=1)
    await _age(env, cid)
    await deletion.request_delete(env.bus, deletion.delete_request("p1", cid, "u1", "u1"))
    result = await _sweeper(env, archive.Directory(tmp_path / "archive")).run_once()
    assert (result.archived, result.skipped_deleted) == (0, 1)
    assert not (tmp_path / "archive").exists()  # not a byte of it was written


async def test_new_activity_after_the_cutoff_keeps_a_conversation(env: Env, tmp_path: Path) -> None:
    cid = await _conversation(env, turns=1)
    await _age(env, cid, timedelta(days=89))
    result = await _sweeper(env, archive.Directory(tmp_path)).run_once()
    assert (result.ran, result.archived) == (True, 0)


# ---- killed mid-batch ---------------------------------------------------------------------


async def test_a_sweep_killed_mid_batch_completes_on_the_next_run_without_duplicate_or_loss(
    env: Env, tmp_path: Path
) -> None:
    n = 24
    cids = [await _conversation(env, turns=2) for _ in range(n)]
    for cid in cids:
        await _age(env, cid)
    expected = {cid: await _rows(env, cid) for cid in cids}
    policy = tmp_path / "policy.toml"
    policy.write_text("[defaults]\nretention_days = 90\n")
    archive_dir = tmp_path / "archive"
    settings = {
        "PERSISTER_ARCHIVE_URL": f"file://{archive_dir}",
        "BATON_POLICY_FILE": str(policy),
        "PERSISTER_RETENTION_BATCH": "10",
        "PERSISTER_RETENTION_PAUSE_S": "0.1",
    }
    proc = _cli(env, "sweep", extra=settings)

    async def some_archived() -> int | None:
        done = await env.pool.fetchval("SELECT count(*) FROM archived_conversations")
        return done if done >= 3 else None

    deadline = time.monotonic() + 60
    while (await some_archived()) is None:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # mid-batch: the first batch is 10
    proc.wait(timeout=10)
    at_kill = await env.pool.fetchval("SELECT count(*) FROM archived_conversations")
    assert 3 <= at_kill < 10, at_kill
    # The killed sweep never finished: the next one runs at once, whatever the period.
    again = _run(_cli(env, "sweep", extra={**settings, "PERSISTER_RETENTION_PAUSE_S": "0"}))
    assert again["ran"] is True and again["backlog"] == 0

    rows = await env.pool.fetch(
        "SELECT conversation_id, delete_requested_at FROM archived_conversations"
    )
    assert sorted(str(r["conversation_id"]) for r in rows) == sorted(cids)
    assert all(r["delete_requested_at"] is not None for r in rows)
    files = sorted(archive_dir.rglob("*.jsonl.gz"))
    assert [f.name for f in files] == sorted(f"{c}.jsonl.gz" for c in cids)
    assert not list(archive_dir.rglob(".part-*"))  # no half-written file left behind
    for f in files:
        header, got = archive.decode(f.read_bytes())
        assert got == expected[header.conversation_id]
    tombs = await _tombstones(env, n)
    assert sorted(t.conversation_id for t in tombs) == sorted(cids)  # one each, none twice
    assert datetime.now(UTC)  # (the sweeps ran with the real clock)


async def test_the_sweep_scans_its_own_index_and_the_list_route_keeps_its_own(env: Env) -> None:
    for _ in range(3):
        await _conversation(env, turns=1)
    cutoff = datetime.now(UTC)
    async with env.pool.acquire() as con:
        # Small tables: the question is which index each query can use, not whether it pays.
        await con.execute("SET plan_cache_mode = force_generic_plan")
        await con.execute("SET enable_seqscan = off")

        async def plan(sql: str, *args: Any) -> str:
            return "\n".join(r[0] for r in await con.fetch(f"EXPLAIN {sql}", *args))

        sweep_plans = [
            await plan(sweep.IDLE_IN_PROJECT, "p1", cutoff, 100, []),
            await plan(sweep.IDLE_ELSEWHERE, cutoff, ["brief"], 100, []),
        ]
        listing = await plan(adapters.CONVERSATIONS_NEWEST, "p1", "u1", 21)
    # Every project without rules of its own (the big scan) goes by conversations_idle; one
    # named project may equally start from its own rows (project_id leads other indexes).
    assert "conversations_idle" in sweep_plans[1], sweep_plans[1]
    assert not any("Seq Scan on conversations" in p for p in sweep_plans), sweep_plans
    assert "conversations_recent" in listing and "conversations_idle" not in listing, listing


async def test_the_sweep_runs_with_the_persisters_own_database_role(
    env: Env, tmp_path: Path
) -> None:
    await roles.ensure_roles(env.infra.database_url)
    cid = await _conversation(env, turns=1)
    await _age(env, cid)
    pool = await create_pool(roles.dsn_for(env.infra.database_url, "persister"))
    try:
        sweeper = Sweeper(
            pool, env.bus, archive.Directory(tmp_path / "a"), "", KEPT, service_metrics("persister")
        )
        result = await sweeper.run_once()
    finally:
        await pool.close()
    assert (result.ran, result.archived) == (True, 1)
