"""Runs services as separate OS processes, restarts crashed ones with backoff, stops them by pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from baton import private

BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
# A child that ran this long was healthy: its next crash starts the backoff from the beginning.
HEALTHY_AFTER_S = 10.0
# Each stretch this long that a child ran before dying forgives one step of its backoff, so a
# process killed from outside every few seconds restarts at once, and only a process that dies
# right after starting (a crash loop: bad config, a dependency it cannot reach) waits longer.
FORGIVE_EVERY_S = 2.0


def backoff_level(level: int, ran_s: float, healthy_after_s: float, forgive_every_s: float) -> int:
    """The backoff step for the next restart, after a run that lasted ``ran_s``."""
    if ran_s >= healthy_after_s:
        return 0
    return max(0, level - int(ran_s // forgive_every_s)) if forgive_every_s > 0 else level


def service_env(
    name: str,
    *,
    nats_url: str,
    database_url: str,
    metrics_port: int,
    jwt_secret: str,
    http_port: int = 0,
    model_url: str = "",
    nats_user: str = "",
    nats_password: str = "",
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment one service process gets (everything else it reads has defaults)."""
    env = dict(os.environ)
    env.update(
        {
            "BATON_NATS_URL": nats_url,
            "BATON_DATABASE_URL": database_url,
            "BATON_METRICS_PORT": str(metrics_port),
            "BATON_INSTANCE": name,
            "PYTHONUNBUFFERED": "1",
        }
    )
    if nats_user:
        env["BATON_NATS_USER"] = nats_user
        env["BATON_NATS_PASSWORD"] = nats_password
    if name == "gateway":
        env["GATEWAY_JWT_SECRET"] = jwt_secret
        env["GATEWAY_HTTP_PORT"] = str(http_port)
    if model_url:
        # The offline model: the SDK reads these two, exactly as it would for the real API.
        env["ANTHROPIC_BASE_URL"] = model_url
        env["ANTHROPIC_API_KEY"] = env.get("ANTHROPIC_API_KEY") or "offline"
    env.update(extra or {})
    return env


class Child:
    """One supervised process; its pid is the only handle used to signal it."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.restarts = 0  # ever, for reports
        self.level = 0  # the backoff step its next crash waits (see ``backoff_level``)
        self.next_start = 0.0

    @classmethod
    def service(cls, name: str, env: dict[str, str], log_dir: Path) -> Child:
        return cls(name, [sys.executable, "-m", f"services.{name}"], env, log_dir / f"{name}.log")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        if not self.log_path.parent.exists():
            private.make_dir(self.log_path.parent)
        # Logs may hold ids and errors of every user: owner only (0600), also when appended.
        with private.open_log(self.log_path) as log:
            # Own session: a terminal's Ctrl-C reaches the supervisor, which stops children in order.
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.started_at = time.monotonic()

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> bool:
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False


class Supervisor:
    """Keeps a set of children running until told to stop."""

    def __init__(
        self,
        children: list[Child],
        say: Callable[[str], None] = print,
        *,
        healthy_after_s: float = HEALTHY_AFTER_S,
        forgive_every_s: float = FORGIVE_EVERY_S,
    ) -> None:
        self.children = children
        self.say = say
        self.healthy_after_s = healthy_after_s
        self.forgive_every_s = forgive_every_s
        self.stopping = False

    def start_all(self) -> None:
        for child in self.children:
            child.start()

    def poll(self) -> None:
        """Restart children that died, with a backoff that reflects how long each one ran."""
        now = time.monotonic()
        for child in self.children:
            code = child.exit_code()
            if self.stopping or code is None:
                continue
            if child.next_start == 0.0:
                child.level = backoff_level(
                    child.level, now - child.started_at, self.healthy_after_s, self.forgive_every_s
                )
                delay = BACKOFF_S[min(child.level, len(BACKOFF_S) - 1)]
                child.next_start = now + delay
                self.say(f"{child.name} exited with code {code}; restarting in {delay:.1f}s")
            elif now >= child.next_start:
                child.restarts += 1
                child.level += 1
                child.next_start = 0.0
                child.start()
                self.say(f"{child.name} restarted (pid {child.pid}, restart #{child.restarts})")

    def stop_all(self, grace_s: float = 15.0) -> None:
        """SIGTERM every child by pid, wait for the grace period, then SIGKILL what is left."""
        self.stopping = True
        for child in self.children:
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in self.children:
            if not child.wait(max(0.0, deadline - time.monotonic())):
                self.say(f"{child.name} did not stop in {grace_s:.0f}s; killing pid {child.pid}")
                child.signal(signal.SIGKILL)
                child.wait(5.0)
