"""Accept scenario and peer (a): HTTP load from a generator in its own process, CPU per request."""

from __future__ import annotations

import asyncio
import json
import resource
import subprocess
import sys
import time
from typing import Any

from baton.bench import procstat, wrk
from baton.bench.stack import SECRET, Stack
from baton.embedded import STARTUP_S, free_port

Result = dict[str, Any]


GENERATORS = ("auto", "python", "wrk")


def generator(choice: str) -> str:
    """``auto``: wrk when it is installed, else the Python generator."""
    if choice == "auto":
        return "wrk" if wrk.available() else "python"
    if choice == "wrk" and not wrk.available():
        raise SystemExit("--loadgen wrk: wrk is not installed (apt-get install wrk)")
    return choice


def loadgen(
    url: str, token: str, concurrency: int, duration: float, keyed: bool, gen: str = "python"
) -> Result:
    """Run the load generator in its own process and return its result."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    if gen == "wrk":
        result = wrk.run(url, token, concurrency, duration, _warmup(duration), keyed)
    else:
        cmd = [sys.executable, "-m", "baton.bench.loadgen", "--url", url, "--token", token]
        cmd += ["--concurrency", str(concurrency), "--duration", str(duration)]
        cmd += ["--warmup", str(_warmup(duration))]
        if keyed:
            cmd.append("--keyed")
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=duration + 120, check=True
        )
        result = json.loads(out.stdout.strip().splitlines()[-1]) | {"generator": "python"}
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # The load generator shares the machine: its own CPU is part of what limits the figure.
    used = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    requests = result["requests"] * (duration + _warmup(duration)) / duration
    result["loadgen_cpu_us_per_request"] = round(used / requests * 1e6, 1) if requests else 0.0
    return result


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    return {n: procstat.tree_cpu(p, n == "postgres") for n, p in pids.items()}


def _cpu_per_request(
    before: dict[str, float], after: dict[str, float], result: Result, warmup: float
) -> dict[str, float]:
    """CPU microseconds per accepted request, by process (warm-up requests count too)."""
    total = result["requests"] * (result["seconds"] + warmup) / result["seconds"]
    if not total:
        return {}
    return {n: round((after[n] - before[n]) / total * 1e6, 1) for n in before}


def accept(stack: Stack, concurrency: int, duration: float, gen: str = "python") -> Result:
    """POST /api/chat on the gateway alone (downstream services stopped), unkeyed and keyed."""
    out: Result = {"concurrency": concurrency, "duration_s": duration}
    pids = {n: p for n, p in stack.pids().items() if n in ("gateway", "nats", "postgres")}
    for name, keyed in (("unkeyed", False), ("keyed", True)):
        load = procstat.machine()["loadavg"]
        cpu0 = _cpu(pids)
        result = loadgen(stack.gateway, stack.token, concurrency, duration, keyed, gen)
        result["cpu_us_per_request"] = _cpu_per_request(cpu0, _cpu(pids), result, _warmup(duration))
        out[name] = result | {"loadavg_before": load}
    return out


def _warmup(duration: float) -> float:
    return min(2.0, max(0.2, duration / 5))


def usual(stack: Stack, concurrency: int, duration: float, gen: str = "python") -> Result:
    """Peer (a): Litestar+uvicorn, INSERT into Postgres, then 202, under the same load."""
    port = free_port()
    log = open(stack.logs / "usual.log", "ab")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "baton.bench.usual"),
            *("--port", str(port), "--dsn", stack.dsn, "--secret", SECRET),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_port(port, STARTUP_S)
        pids = {"usual": proc.pid, "postgres": stack.pids()["postgres"]}
        load = procstat.machine()["loadavg"]
        cpu0 = _cpu(pids)
        result = loadgen(url, stack.token, concurrency, duration, False, gen)
        result["cpu_us_per_request"] = _cpu_per_request(cpu0, _cpu(pids), result, _warmup(duration))
        return result | {"loadavg_before": load}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _wait_port(port: int, timeout: float) -> None:
    async def probe() -> bool:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        w.close()
        return True

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if asyncio.run(probe()):
            return
        time.sleep(0.1)
    raise TimeoutError(f"port {port} not listening")
