"""A service started while NATS is unreachable gives up after its connect timeout and exits."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from baton.embedded import free_port


def test_a_service_exits_non_zero_when_nats_never_answers() -> None:
    # Nothing listens on this port: without a bound, nats-py's first connect retries forever.
    env = {
        **os.environ,
        "BATON_NATS_URL": f"nats://127.0.0.1:{free_port()}",
        "BATON_NATS_CONNECT_TIMEOUT_S": "1",
        "BATON_METRICS_PORT": "0",
    }
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.policy"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert "could not connect to NATS" in err
    # It ran its shutdown path (the exit stack) rather than being stopped from outside.
    assert time.monotonic() - started < 60
