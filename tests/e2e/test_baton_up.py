"""`baton up` as a person runs it: it answers over HTTP, stops cleanly, and keeps its data."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from baton import roles
from baton.embedded import STARTUP_S
from tests.e2e.conftest import SETTLE_S

pytestmark = pytest.mark.e2e


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def data_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="baton-up-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Up:
    """One `baton up` process and what it wrote to endpoints.json."""

    def __init__(self, data_dir: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
        self.log = data_dir.parent / f"{data_dir.name}.out"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "baton", "up", "--port", "0", "--data-dir", str(data_dir)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        endpoints = data_dir / "endpoints.json"
        deadline = time.monotonic() + STARTUP_S  # the whole start: it times nothing checked here
        while not endpoints.exists():
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.2)
        self.info: dict[str, Any] = json.loads(endpoints.read_text())
        self.auth = {"Authorization": f"Bearer {self.info['token']}"}

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        os.kill(self.proc.pid, signal.SIGTERM)
        assert self.proc.wait(60) == 0, self.output()


async def _create_task(url: str, title: str) -> None:
    from mcp import Client

    async with Client(url) as client:
        result = await client.call_tool("create_task", {"title": title})
    assert not result.is_error


def _answered(up: Up, cid: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        r = httpx.get(f"{up.info['gateway']}/api/conversations/{cid}/messages", headers=up.auth)
        if r.status_code == 200 and len(r.json()["messages"]) == 2:
            return list(r.json()["messages"])
        time.sleep(0.2)
    raise AssertionError(f"no answer in time\n{up.output()}")


def test_baton_up_answers_stops_cleanly_and_keeps_conversations(data_dir: Path) -> None:
    up = Up(data_dir)
    try:
        out = up.output()
        assert "offline model" in out and "curl" in out and up.info["token"] in out
        assert set(up.info["metrics"]) == {"gateway", "agent", "policy", "executor", "persister"}
        for url in up.info["metrics"].values():
            assert "baton_" in httpx.get(url).text
        r = httpx.post(
            f"{up.info['gateway']}/api/chat",
            json={"content": "Hello baton, what can you do?"},
            headers={**up.auth, "Idempotency-Key": "first"},
        )
        assert r.status_code == 202, r.text
        cid = r.json()["message"]["conversation_id"]
        first = _answered(up, cid)
        assert [m["role"] for m in first] == ["user", "assistant"]
        # Billed token for token as the model served it: the agent's call and the answer's.
        served: dict[str, int] = {}
        billed: dict[str, Any] = {}
        deadline = time.monotonic() + SETTLE_S
        while time.monotonic() < deadline:
            served = httpx.get(f"{up.info['model']}/_control/stats").json()
            billed = httpx.get(f"{up.info['gateway']}/api/usage", headers=up.auth).json()
            if all(billed[k] == served[k] for k in ("input_tokens", "output_tokens")):
                break
            time.sleep(0.2)
        assert (billed["input_tokens"], billed["output_tokens"]) == (
            served["input_tokens"],
            served["output_tokens"],
        )
        assert served["calls"] == 2 and billed["runs"] == 1
        # The demo MCP server runs beside it, its URL printed; its ledger is in the data dir.
        assert up.info["mcp"] in out and "mcp-tools" in up.info["pids"]
        asyncio.run(_create_task(up.info["mcp"], "from baton up"))
        assert "from baton up" in (data_dir / "mcp-ledger.jsonl").read_text()
    finally:
        pids = dict(up.info["pids"]) if hasattr(up, "info") else {}
        up.stop()
    assert "nothing left running" in up.output()
    assert pids and not [name for name, pid in pids.items() if _alive(pid)]
    assert not (data_dir / "endpoints.json").exists()

    again = Up(data_dir)
    try:
        r = httpx.get(
            f"{again.info['gateway']}/api/conversations/{cid}/messages", headers=again.auth
        )
        assert r.status_code == 200
        assert r.json()["messages"] == first
    finally:
        again.stop()


def test_baton_up_refuses_a_bad_policy_file_before_starting_anything(
    data_dir: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "policy.toml"
    bad.write_text('[defaults]\nallowed_models = ["gpt-9"]\n')
    baton = Path(sys.executable).parent / "baton"
    done = subprocess.run(
        [str(baton), "up", "--data-dir", str(data_dir), "--port", "0", "--policy", str(bad)],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert b"allowed_models" in done.stderr and b"not in any [tiers.*]" in done.stderr
    assert not (data_dir / "endpoints.json").exists()  # nothing was started


def _refused(dsn: str, **kwargs: Any) -> bool:
    """Whether Postgres refuses this connection for want of the right password."""

    async def attempt() -> bool:
        try:
            con = await asyncpg.connect(dsn, timeout=5, **kwargs)
        except asyncpg.InvalidAuthorizationSpecificationError:
            return True
        await con.close()
        return False

    return asyncio.run(attempt())


def _as(dsn: str, user: str, password: str | None) -> str:
    parts = urllib.parse.urlsplit(dsn)
    auth = user if password is None else f"{user}:{urllib.parse.quote(password, safe='')}"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{auth}@{parts.hostname}:{parts.port}"))


def test_baton_up_keeps_its_secrets_and_its_database_from_other_local_users(
    data_dir: Path,
) -> None:
    old = os.umask(0o022)  # a common umask: the modes below must not come from it
    try:
        up = Up(data_dir)
    finally:
        os.umask(old)
    try:
        mode = {p: stat.S_IMODE(p.stat().st_mode) for p in [data_dir, *data_dir.rglob("*")]}
        secrets = [
            data_dir / name
            for name in (
                "nats/nats-server.conf",
                "endpoints.json",
                "jwt_secret",
                "postgres.password",
            )
        ]
        logs = sorted((data_dir / "logs").glob("*.log"))
        assert {p.name for p in logs} >= {"nats.log", "postgres.log", "gateway.log", "policy.log"}
        for path in [*secrets, *logs, data_dir / "nats_passwords.json"]:
            assert mode.get(path) == 0o600, f"{path} is {mode.get(path)}"
        for name in ("logs", "nats", "postgres"):
            assert mode[data_dir / name] == 0o700, f"{name} is {mode[data_dir / name]:o}"
        # As root, Postgres runs as its own user, who must pass through the data dir: its group
        # may search it (no listing, no reading); nobody else may even do that.
        expected = 0o710 if os.geteuid() == 0 else 0o700
        assert mode[data_dir] == expected, f"{data_dir} is {mode[data_dir]:o}"
        # Whatever else lies there, nothing is open to users outside the owner and its group.
        assert not [p for p, m in mode.items() if m & 0o007], "world-accessible paths"

        database = up.info["database"]
        assert ":" not in (urllib.parse.urlsplit(database).netloc.split("@")[0])  # no password
        admin = (data_dir / "postgres.password").read_text().strip()
        con_dsn = _as(database, "postgres", admin)
        assert not _refused(con_dsn)
        socket_dir = asyncio.run(_show(con_dsn, "unix_socket_directories"))
        port = urllib.parse.urlsplit(database).port
        for user in ("postgres", *(roles.role(s) for s in roles.SERVICES_WITH_DB)):
            for password in (None, "", "wrong-password"):
                assert _refused(_as(database, user, password)), (user, password)
                assert _refused(_as(database, user, password), host=socket_dir, port=port), (
                    user,
                    password,
                )
    finally:
        up.stop()


async def _show(dsn: str, setting: str) -> str:
    con = await asyncpg.connect(dsn)
    try:
        value: str = await con.fetchval(f"SHOW {setting}")
        return value
    finally:
        await con.close()
