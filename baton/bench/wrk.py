"""The accept load from ``wrk`` when it is installed: the same requests, a C load generator.

The Python generator (``loadgen.py``) costs 15 to 20 µs of CPU per request on the same two cores
as the server it measures; wrk costs a fraction of that. A Lua script sets the method, body and
headers (a fresh ``Idempotency-Key`` per request when keyed) and prints one JSON line at the end.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

Result = dict[str, Any]

_SETUP = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"content": "bench message from wrk"}'
local keyed = false
local prefix = ""
local n = 0

function init(args)
  wrk.headers["Authorization"] = "Bearer " .. args[1]
  keyed = args[2] == "1"
  prefix = "wrk-" .. args[3] .. "-" .. tostring(math.random(1, 2000000000)) .. "-"
end
"""

# Defined only when keyed: wrk calls request() for every request once it exists. Headers given
# to wrk.format replace wrk.headers, so the key is added to them.
_KEYED = """
function request()
  n = n + 1
  wrk.headers["Idempotency-Key"] = prefix .. n
  return wrk.format()
end
"""

_DONE = """
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "errors": %d, "status_errors": %d, '
      .. '"p50_us": %d, "p95_us": %d, "p99_us": %d, "max_us": %d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout + e.status,
    e.status, latency:percentile(50), latency:percentile(95), latency:percentile(99),
    latency.max))
end
"""


def available() -> bool:
    return shutil.which("wrk") is not None


def script(keyed: bool) -> str:
    return _SETUP + (_KEYED if keyed else "") + _DONE


def command(
    url: str, script_path: Path, token: str, concurrency: int, seconds: float, keyed: bool, run: int
) -> list[str]:
    return [
        *("wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "5s"),
        *("-s", str(script_path), f"{url}/api/chat", "--", token, "1" if keyed else "0", str(run)),
    ]


def parse(stdout: str, concurrency: int, keyed: bool) -> Result:
    """The loadgen-shaped result from the script's JSON line (the last line wrk prints)."""
    line = [x for x in stdout.strip().splitlines() if x.startswith("{")][-1]
    raw = json.loads(line)
    seconds = raw["duration_us"] / 1e6
    ok = raw["requests"] - raw["status_errors"]
    return {
        "requests": ok,
        "errors": raw["errors"],
        "statuses": {"non_2xx_3xx": raw["status_errors"]} if raw["status_errors"] else {},
        "seconds": round(seconds, 3),
        "requests_per_s": round(ok / seconds, 1) if seconds else 0.0,
        "latency": {
            f"{k}_ms": round(raw[f"{k}_us"] / 1000, 2) for k in ("p50", "p95", "p99", "max")
        },
        "concurrency": concurrency,
        "keyed": keyed,
        "generator": "wrk",
    }


def run(
    url: str, token: str, concurrency: int, duration: float, warmup: float, keyed: bool
) -> Result:
    """A warm-up run (discarded), then the measured one; wrk's percentiles are per request."""
    with tempfile.TemporaryDirectory(prefix="baton-wrk-") as tmp:
        path = Path(tmp) / "accept.lua"
        path.write_text(script(keyed))
        for i, seconds in enumerate((warmup, duration)):
            out = subprocess.run(
                command(url, path, token, concurrency, seconds, keyed, i),
                capture_output=True,
                text=True,
                timeout=seconds + 60,
                check=True,
            )
    return parse(out.stdout, concurrency, keyed)
