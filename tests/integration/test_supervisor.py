"""The supervisor restarts crashed children with backoff and stops the rest by pid."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from baton.supervisor import Child, Supervisor, backoff_level


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


def _run_until(sup: Supervisor, done: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "supervisor did not get there in time"
        sup.poll()
        time.sleep(0.02)


def _delays(said: list[str], name: str) -> list[str]:
    return [line.rsplit(" ", 1)[1] for line in said if line.startswith(f"{name} exited")]


@pytest.mark.parametrize(
    ("level", "ran_s", "expected"),
    [
        (0, 0.1, 0),  # first crash: the first step
        (4, 0.1, 4),  # died right after starting: a crash loop keeps climbing
        (4, 2.5, 3),  # ran one forgiving stretch: one step back
        (4, 7.9, 1),
        (6, 10.0, 0),  # ran healthy long enough: from the beginning
    ],
)
def test_the_backoff_step_reflects_how_long_the_child_ran(
    level: int, ran_s: float, expected: int
) -> None:
    assert backoff_level(level, ran_s, healthy_after_s=10.0, forgive_every_s=2.0) == expected


def test_a_child_killed_from_outside_every_few_seconds_is_restarted_at_once(tmp_path: Path) -> None:
    # The gateway killed again and again after running a while: that is not a crash loop.
    said: list[str] = []
    victim = _child(tmp_path, "victim", "import time; time.sleep(60)")
    crasher = _child(tmp_path, "crasher", "import sys; sys.exit(3)")
    sup = Supervisor([victim, crasher], said.append, healthy_after_s=30.0, forgive_every_s=0.5)
    sup.start_all()
    try:
        for kills in range(1, 6):
            _run_until(sup, lambda: victim.exit_code() is None)
            started = victim.started_at
            _run_until(sup, lambda s=started: time.monotonic() - s > 0.6)
            victim.signal(signal.SIGKILL)
            _run_until(sup, lambda k=kills: len(_delays(said, "victim")) == k)
        _run_until(sup, lambda: len(_delays(said, "crasher")) >= 4)
    finally:
        sup.stop_all(grace_s=5)
    assert _delays(said, "victim") == ["0.5s"] * 5
    assert _delays(said, "crasher")[:4] == ["0.5s", "1.0s", "2.0s", "4.0s"]


def test_a_child_that_ran_healthy_long_enough_starts_its_backoff_again(tmp_path: Path) -> None:
    said: list[str] = []
    healthy = tmp_path / "healthy"
    # Crashes at once until the flag file exists, then runs until killed.
    code = f"import os, sys, time\nif not os.path.exists({str(healthy)!r}): sys.exit(3)\ntime.sleep(60)"
    flaky = _child(tmp_path, "flaky", code)
    sup = Supervisor([flaky], said.append, healthy_after_s=1.0, forgive_every_s=0.0)
    sup.start_all()
    try:
        _run_until(sup, lambda: len(_delays(said, "flaky")) == 3)
        healthy.touch()
        _run_until(sup, lambda: flaky.restarts == 3 and flaky.exit_code() is None)
        started = flaky.started_at
        _run_until(sup, lambda: time.monotonic() - started > 1.2)
        flaky.signal(signal.SIGKILL)
        _run_until(sup, lambda: len(_delays(said, "flaky")) == 4)
    finally:
        sup.stop_all(grace_s=5)
    assert _delays(said, "flaky") == ["0.5s", "1.0s", "2.0s", "0.5s"]
