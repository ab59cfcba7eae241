"""The typical journey against docker-compose.yml's containers (tests/compose/conftest.py)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
import tomllib
import uuid
from datetime import datetime
from typing import Any

import httpx
import pytest

from baton.devtoken import make_token
from tests import conftest
from tests.compose.conftest import ROOT, SCRIPTS, SETUP_S, STACK, Stack
from tests.e2e.resume import feed
from tests.manifests import all_commands

pytestmark = [pytest.mark.compose, pytest.mark.timeout(SETUP_S + 600)]
SERVICES = ("gateway", "persister", "agent", "policy", "executor")

# Run inside the image: every manifest command line through the image's own parser, and --help.
CHECK = """
import contextlib, io, json, sys
from baton.cli import parser
bad = {}
for where, argvs in json.loads(sys.argv[1]).items():
    for argv in argvs:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                parser().parse_args(argv)
        except SystemExit as exc:
            bad[where] = [argv, exc.code, err.getvalue()]
print(json.dumps(bad))
"""


def _stamp(s: str) -> float:
    # Docker's nanosecond RFC 3339 times: keep microseconds for fromisoformat.
    day, _, rest = s.rstrip("Z").partition("T")
    clock, _, frac = rest.partition(".")
    return datetime.fromisoformat(f"{day}T{clock}.{(frac + '000000')[:6]}+00:00").timestamp()


def test_the_image_is_stamped_small_and_accepts_every_manifest_command(stack: Stack) -> None:
    meta = json.loads(stack.docker("image", "inspect", stack.image))[0]
    labels = meta["Config"]["Labels"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert labels["org.opencontainers.image.version"] == project["version"]
    assert len(labels["org.opencontainers.image.revision"].split("-")[0]) == 40
    assert meta["Size"] < 400_000_000, meta["Size"]
    assert meta["Config"]["User"] == "10001:10001"
    run = ["run", "--rm", "--read-only", "--network", "none", stack.image]
    assert labels["org.opencontainers.image.revision"] in stack.docker(*run, "--version")
    helped = stack.docker(*run, "--help")
    for sub in ("run", "model", "migrate", "roles", "provision"):
        assert sub in helped
    commands = json.dumps(all_commands())
    out = stack.docker(
        "run", "--rm", "--read-only", "--network", "none", "--entrypoint", "python",
        stack.image, "-c", CHECK, commands,
    )  # fmt: skip
    assert json.loads(out) == {}


def test_healthchecks_gate_the_start_and_setup_runs_once(stack: Stack) -> None:
    setup = stack.inspect("setup")["State"]
    assert setup["Status"] == "exited" and setup["ExitCode"] == 0
    assert len(stack.compose_run("ps", "-a", "-q", "setup").split()) == 1
    done = _stamp(setup["FinishedAt"])
    for s in SERVICES:
        assert _stamp(stack.inspect(s)["State"]["StartedAt"]) >= done, s
    began = _stamp(setup["StartedAt"])
    for s in ("nats", "postgres"):
        log = stack.inspect(s)["State"]["Health"]["Log"]
        # The first passing check came before setup started (service_healthy).
        passed = [_stamp(h["End"]) for h in log if h["ExitCode"] == 0]
        assert not passed or min(passed) <= began or len(log) >= 5, (s, log)


async def _chat(stack: Stack, project: str, prompt: str) -> dict[str, Any]:
    """One message through the gateway's port: SSE tokens, then the stored answer."""
    gateway = stack.url("gateway", 8000)
    token = make_token(stack.secrets["GATEWAY_JWT_SECRET"], project, "alice")
    auth = {"Authorization": f"Bearer {token}"}
    cid = str(uuid.uuid4())
    events: list[dict[str, Any]] = []
    ready = asyncio.Event()
    async with httpx.AsyncClient(timeout=10) as client:

        async def listen() -> None:
            headers = {**auth, "Accept": "text/event-stream"}
            url = f"{gateway}/api/conversations/{cid}/events"
            async with client.stream("GET", url, headers=headers, timeout=None) as resp:
                assert resp.status_code == 200
                event: dict[str, Any] = {}
                async for line in resp.aiter_lines():
                    if line.startswith(":"):
                        ready.set()
                    if not feed(event, line):
                        continue
                    if "event" in event:
                        events.append(event)
                        if event["event"] == "message.completed":
                            return
                    event = {}

        listener = asyncio.create_task(listen())
        await asyncio.wait_for(ready.wait(), 30)
        r = await client.post(
            f"{gateway}/api/chat",
            json={"conversation_id": cid, "content": prompt},
            headers={**auth, "Idempotency-Key": cid},
        )
        assert r.status_code == 202, r.text
        await asyncio.wait_for(listener, 120)
        for _ in range(600):
            got = await client.get(f"{gateway}/api/conversations/{cid}/messages", headers=auth)
            messages = got.json()["messages"]
            if [m["role"] for m in messages] == ["user", "assistant"]:
                break
            await asyncio.sleep(0.1)
    return {"events": events, "messages": messages, "accepted": r.json()["message"]}


def _check_answer(res: dict[str, Any], prompt: str) -> None:
    user, answer = res["messages"]
    assert user["content"] == prompt and user["id"] == res["accepted"]["id"]
    assert answer["kind"] == "answer" and answer["content"]
    tokens = [e["data"] for e in res["events"] if e["event"] == "token"]
    assert tokens, res["events"]
    latest = max(t["attempt"] for t in tokens)
    text = "".join(
        t["text"] for t in sorted(tokens, key=lambda t: t["seq"]) if t["attempt"] == latest
    )
    assert text == answer["content"]


async def test_a_chat_round_trip_through_the_gateway_streams_and_stores_the_answer(
    stack: Stack,
) -> None:
    prompt = "hello from the compose test"
    res = await _chat(stack, "acme", prompt)
    _check_answer(res, prompt)


def test_prometheus_in_the_stack_scrapes_every_service(stack: Stack) -> None:
    url = stack.url("prometheus", 9090) + "/api/v1/targets"
    deadline = time.monotonic() + 90
    targets: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        targets = httpx.get(url, timeout=5).json()["data"]["activeTargets"]
        if len(targets) == 5 and all(t["health"] == "up" for t in targets):
            break
        time.sleep(1)
    assert sorted(t["labels"]["service"] for t in targets) == sorted(SERVICES), targets
    assert all(t["health"] == "up" for t in targets), targets
    for s in SERVICES:  # and the same /metrics answers from here
        assert "# TYPE" in httpx.get(stack.url(s, 9100) + "/metrics", timeout=5).text


def test_policy_reads_the_mounted_policy_file(stack: Stack) -> None:
    logs = stack.compose_run("logs", "--no-color", "policy")
    events = [json.loads(x.partition("| ")[2]) for x in logs.splitlines() if "| {" in x]
    [loaded] = [e for e in events if e["event"] == "policy file loaded"]
    # policy.example.toml's two projects, read from the mounted directory.
    assert loaded["path"] == "/etc/baton/policy/policy.toml" and loaded["projects"] == 2


async def test_a_crashed_service_is_restarted_by_its_policy_and_nothing_is_lost(
    stack: Stack,
) -> None:
    """The persister's process killed (a crash: `docker kill` would count as stopped by hand,
    which no restart policy undoes); a message sent meanwhile is answered and stored once."""
    before = stack.inspect("persister")
    os.kill(before["State"]["Pid"], signal.SIGKILL)
    prompt = "are you still there after the crash?"
    res = await _chat(stack, "acme", prompt)
    _check_answer(res, prompt)
    after = stack.inspect("persister")
    assert after["RestartCount"] >= before["RestartCount"] + 1
    assert after["Id"] == before["Id"]
    deadline = time.monotonic() + 120
    while stack.inspect("persister")["State"].get("Health", {}).get("Status") != "healthy":
        assert time.monotonic() < deadline, stack.inspect("persister")["State"]
        await asyncio.sleep(1)
    assert set(stack.health().values()) == {"healthy", "exited 0"}, STACK


def test_the_fixtures_keep_embedded_servers_when_an_engine_answers_but_cannot_pull(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The private engine's socket stays out of os.environ (other tests never see it); and even
    when it is seen, an engine that cannot pull postgres:16-alpine is not chosen."""
    host = stack.env["DOCKER_HOST"]
    assert os.environ.get("DOCKER_HOST") != host
    if not (stack.run_dir / "docker.pid").exists():
        return  # an engine of the machine's, which may well pull: nothing more to show here
    # The private engine: no registry, postgres:16-alpine not there.
    assert not stack.docker("image", "ls", "-q", conftest.POSTGRES_IMAGE).strip()
    monkeypatch.setenv("DOCKER_HOST", host)
    assert conftest._docker_can_run(conftest.POSTGRES_IMAGE) is False


def test_containers_of_a_test_run_that_is_gone_are_removed_and_the_live_stack_kept(
    stack: Stack,
) -> None:
    """A run killed before its `compose down` leaves its stack in the engine's data root, and
    their restart policy brings the containers back in the next engine (a whole stack's load, as
    a killed run once left for the next one). `engine.sh` removes those of test processes that
    are gone, on start, stop and `clean`; the live stack (this process's) stays."""
    live = set(stack.docker("ps", "-q").split())  # the stack's own containers
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid no process has now
    name = f"leftover-{uuid.uuid4().hex[:8]}"
    stack.docker(
        "run", "-d", "--name", name, "--restart", "always", "--network", "none",
        "--label", f"com.docker.compose.project=batontest{gone.pid}",
        "--entrypoint", "sleep", stack.image, "3600",
    )  # fmt: skip
    assert stack.docker("ps", "-q", "--filter", f"name={name}").strip()
    cleaned = subprocess.run(
        [str(SCRIPTS / "engine.sh"), "clean", stack.env["DOCKER_HOST"]],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert cleaned.returncode == 0, cleaned.stderr
    assert re.search(r"removing [0-9]+ test containers", cleaned.stderr), cleaned.stderr
    assert stack.docker("ps", "-aq", "--filter", f"name={name}").strip() == ""
    assert live - {""} <= set(stack.docker("ps", "-q").split())
    assert set(stack.health().values()) == {"healthy", "exited 0"}, STACK
