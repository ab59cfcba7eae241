"""The supervisor restarts crashed children with backoff and stops the rest by pid."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from baton.supervisor import Child, Supervisor


def _child(tmp_path: Path, name: str, code: str) -> Child:
    return Child(name, [sys.executable, "-c", code], {}, tmp_path / f"{name}.log")


def test_a_crashed_child_is_restarted_and_the_restart_is_reported(tmp_path: Path) -> None:
    said: list[str] = []
    crasher = _child(tmp_path, "crasher", "import sys; sys.exit(3)")
    sleeper = _child(tmp_path, "sleeper", "import time; time.sleep(60)")
    sup = Supervisor([crasher, sleeper], said.append)
    sup.start_all()
    first_pid = crasher.pid
    deadline = time.monotonic() + 10
    while crasher.restarts < 2 and time.monotonic() < deadline:
        sup.poll()
        time.sleep(0.05)
    sleeper_pid = sleeper.pid
    sup.stop_all(grace_s=5)
    assert crasher.restarts >= 2 and crasher.pid != first_pid
    assert "crasher exited with code 3; restarting in 0.5s" in said
    assert "crasher exited with code 3; restarting in 1.0s" in said
    assert sleeper.restarts == 0 and sleeper.pid == sleeper_pid
    assert sleeper.exit_code() == -signal.SIGTERM


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    said: list[str] = []
    stubborn = _child(
        tmp_path,
        "stubborn",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)",
    )
    sup = Supervisor([stubborn], said.append)
    sup.start_all()
    deadline = time.monotonic() + 10
    while "ready" not in stubborn.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    sup.stop_all(grace_s=1)
    assert stubborn.exit_code() == -signal.SIGKILL
    assert time.monotonic() - started < 5
    assert any("did not stop" in line for line in said)
    # Stopped children are not restarted.
    sup.poll()
    assert stubborn.restarts == 0
