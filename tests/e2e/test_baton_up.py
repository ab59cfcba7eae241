"""`baton up` as a person runs it: it answers over HTTP, stops cleanly, and keeps its data."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

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
        deadline = time.monotonic() + 90
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
    deadline = time.monotonic() + 30
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
