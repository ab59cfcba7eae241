"""The wrk driver of ``baton bench accept``: its script, its command and its result."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from baton.bench import wrk

LINE = (
    '{"requests": 1200, "duration_us": 2000000, "errors": 7, "status_errors": 5, '
    '"p50_us": 2100, "p95_us": 3500, "p99_us": 5150, "max_us": 12380}'
)


def test_the_result_has_the_python_generators_shape_and_counts_only_accepted_requests() -> None:
    r = wrk.parse("Running 2s test @ http://x\n  1 threads\n" + LINE + "\n", 32, True)
    assert r["requests"] == 1195 and r["errors"] == 7
    assert r["requests_per_s"] == 597.5 and r["seconds"] == 2.0
    assert r["latency"] == {"p50_ms": 2.1, "p95_ms": 3.5, "p99_ms": 5.15, "max_ms": 12.38}
    assert r["statuses"] == {"non_2xx_3xx": 5} and r["generator"] == "wrk"
    assert (r["concurrency"], r["keyed"]) == (32, True)


def test_only_the_keyed_script_builds_each_request() -> None:
    # wrk sends one pre-built request unless the script defines request(): keep that fast path.
    assert "function request()" not in wrk.script(False)
    assert "function request()" in wrk.script(True)
    cmd = wrk.command("http://127.0.0.1:1", wrk.Path("s.lua"), "tok", 16, 0.4, True, 3)
    assert cmd[:3] == ["wrk", "-t1", "-c16"] and "-d1s" in cmd
    assert cmd[-5:] == ["http://127.0.0.1:1/api/chat", "--", "tok", "1", "3"]


@pytest.mark.skipif(not wrk.available(), reason="wrk is not installed (apt-get install wrk)")
def test_wrk_posts_the_body_with_the_token_and_a_fresh_key_per_request() -> None:
    seen: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append({"path": self.path, "body": body, **dict(self.headers)})
            self.send_response(202)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        result = wrk.run(url, "the-token", 2, 1.0, 0.2, keyed=True)
    finally:
        server.shutdown()
        server.server_close()
    assert result["requests"] > 0 and result["errors"] == 0
    assert {s["path"] for s in seen} == {"/api/chat"}
    assert {s["Authorization"] for s in seen} == {"Bearer the-token"}
    assert {s["Content-Type"] for s in seen} == {"application/json"}
    assert all(b'"content"' in s["body"] for s in seen)
    keys = [s["Idempotency-Key"] for s in seen]
    assert len(set(keys)) == len(keys)
