"""docker-compose.yml run for real: a container engine, the image, the stack, then all removed.

The engine is the one answering, else a private dockerd (scripts/containers/engine.sh) with its
own socket, started here and stopped by its pid. Its DOCKER_HOST goes only to the commands run
here, never into os.environ: other tests must not pick an engine that cannot pull images.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from baton.embedded import free_ports

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts" / "containers"
# What the journey needs; grafana and jaeger have no offline source here, so they stay out.
STACK = ("nats", "postgres", "setup", "model", "gateway", "persister", "agent", "policy")
STACK += ("executor", "prometheus")
NOT_ONE_SHOT = tuple(s for s in STACK if s != "setup")
SETUP_S = 900.0  # a cold cache: debootstrap, the image's dependencies, the stand-ins
HEALTH_EVERY = "2s"


@dataclass
class Stack:
    """The running stack: its engine's environment, compose's command line, the secrets."""

    run_dir: Path
    env: dict[str, str]  # os.environ plus DOCKER_HOST, for docker and docker-compose only
    compose: list[str]
    secrets: dict[str, str]
    image: str
    ids: dict[str, str] = field(default_factory=dict)

    def docker(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        out = subprocess.run(
            ["docker", *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and out.returncode:
            raise AssertionError(f"docker {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def compose_run(self, *args: str, timeout: float = 300, check: bool = True) -> str:
        out = subprocess.run(
            [*self.compose, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and out.returncode:
            raise AssertionError(f"docker-compose {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def container(self, service: str) -> str:
        """The service's container id (kept: a restart keeps it; docker-compose v1 is slow)."""
        if service not in self.ids:
            self.ids[service] = self.compose_run("ps", "-q", service).strip()
        return self.ids[service]

    def inspect(self, service: str) -> dict[str, Any]:
        doc: list[dict[str, Any]] = json.loads(self.docker("inspect", self.container(service)))
        return doc[0]

    def ip(self, service: str) -> str:
        """The container's address on the stack's network: reached from here without any
        published port (the private engine publishes none: no iptables, no proxy)."""
        nets = self.inspect(service)["NetworkSettings"]["Networks"]
        return str(next(iter(nets.values()))["IPAddress"])

    def url(self, service: str, port: int) -> str:
        return f"http://{self.ip(service)}:{port}"

    def health(self) -> dict[str, str]:
        out = {}
        for s in STACK:
            state = self.inspect(s)["State"]
            if s == "setup":
                out[s] = f"{state['Status']} {state['ExitCode']}"
            else:
                out[s] = state.get("Health", {}).get("Status", state["Status"])
        return out

    def wait_healthy(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        seen: dict[str, str] = {}
        while time.monotonic() < deadline:
            seen = self.health()
            if seen.pop("setup") == "exited 0" and set(seen.values()) == {"healthy"}:
                return
            time.sleep(1)
        raise AssertionError(f"the stack is not healthy after {timeout:.0f} s: {seen}")


def _script(name: str, *args: str, env: dict[str, str], timeout: float) -> str:
    out = subprocess.run(
        [str(SCRIPTS / name), *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    if out.returncode:
        raise AssertionError(f"{name} failed ({out.returncode}): {out.stderr.strip()}")
    if out.stderr.strip():
        print(out.stderr.strip())  # what was built and how long it took (pytest -s shows it)
    return out.stdout.strip()


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """The compose stack, healthy; compose down -v, image tag removed, engine stopped after the
    module. Not kept for the session: the worker goes on to other files, and the stack's health
    checks (a fresh Python process in each of six containers every HEALTH_EVERY) kept running
    beside them to the end of the suite."""
    if shutil.which("docker") is None or shutil.which("docker-compose") is None:
        pytest.skip("no docker client or docker-compose here (make container-tools installs them)")
    run_dir = Path(tempfile.mkdtemp(prefix="baton-ctr-", dir="/tmp"))
    started = subprocess.run(
        [str(SCRIPTS / "engine.sh"), "start", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=SETUP_S,
    )
    if started.returncode == 77:
        shutil.rmtree(run_dir, ignore_errors=True)
        pytest.skip(f"no container engine can start here: {started.stderr.strip()}")
    assert started.returncode == 0, started.stderr
    # A tag of its own, kept afterwards: its layers are the next run's build cache.
    tag = "baton:compose-test"
    env = {**os.environ, "DOCKER_HOST": started.stdout.strip(), "BATON_IMAGE": tag}
    project = f"batontest{os.getpid()}"
    stack = None
    try:
        # The image and the stand-ins at once: on a cold cache each waits on the network and
        # pip for minutes (base-image.sh, which both need, is made once under a lock).
        override = run_dir / "compose.standins.yml"
        with ThreadPoolExecutor(2) as pool:
            builds = [
                pool.submit(_script, "image.sh", env=env, timeout=SETUP_S),
                pool.submit(_script, "standins.sh", str(override), env=env, timeout=SETUP_S),
            ]
            for build in builds:
                build.result()
        # Fresh secrets in deploy/env.example's shape (a letter first, then hex).
        secret_env = {}
        for line in (ROOT / "deploy" / "env.example").read_text().splitlines():
            if line and not line.startswith("#") and "=" in line:
                secret_env[line.partition("=")[0]] = "p" + secrets.token_hex(24)
        env_file = run_dir / "env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in secret_env.items()))
        # Published ports on free ones, should the engine publish them (a system dockerd).
        env["BATON_HTTP_PORT"], env["BATON_PROMETHEUS_PORT"] = map(str, free_ports(2))
        # The same health checks, probed every HEALTH_EVERY instead of every 5-10 s: each start
        # waits on the one before it being healthy (nats and postgres, then setup, then the
        # services), and the first probe came only after a whole interval.
        fast = run_dir / "compose.health.yml"
        every = f"    healthcheck:\n      interval: {HEALTH_EVERY}\n"
        fast.write_text("services:\n" + "".join(f"  {s}:\n{every}" for s in NOT_ONE_SHOT))
        compose = ["docker-compose", "--env-file", str(env_file), "-p", project]
        compose += ["-f", str(ROOT / "docker-compose.yml"), "-f", str(override), "-f", str(fast)]
        stack = Stack(run_dir, env, compose, secret_env, tag)
        t0 = time.monotonic()
        stack.compose_run("up", "-d", "--no-build", *STACK)
        try:
            stack.wait_healthy()
        except AssertionError:
            print(stack.compose_run("logs", "--no-color", "--tail=30", check=False))
            raise
        print(f"compose: the stack healthy in {time.monotonic() - t0:.0f} s")
        yield stack
    finally:
        t0 = time.monotonic()
        if stack is not None:
            stack.compose_run("down", "-v", "--remove-orphans", "--timeout", "10", check=False)
        t1 = time.monotonic()
        subprocess.run([str(SCRIPTS / "engine.sh"), "stop", str(run_dir)], timeout=120)
        print(
            f"compose: down in {t1 - t0:.0f} s, the engine stopped in {time.monotonic() - t1:.0f} s"
        )
