"""baton's own small MCP server (streamable HTTP): a clock, a calculator and a side-effecting
``create_task`` whose every execution is appended to a ledger file, so tests count executions
on the tool's side.

``create_task`` honours an idempotency key in the call's ``_meta`` (``idempotency_key``): a key
seen before returns the first execution's result and executes nothing. The ledger is the
source of truth, also for keys, so a restarted server still knows them.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import json
import operator
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

# The bound on the server's start (as baton.embedded's for nats-server and Postgres): a start
# measures nothing, and a loaded machine took more than 20 s (session 29, three suites' load).
STARTUP_S = 120.0

IDEMPOTENCY_META_KEY = "idempotency_key"
PATH = "/mcp"

_OPS: dict[type, Any] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def calculate(expression: str) -> float | int:
    """Arithmetic only (numbers, + - * / // % ** and parentheses); anything else is refused."""
    if len(expression) > 200:
        raise ValueError("expression longer than 200 characters")
    tree = ast.parse(expression, mode="eval")

    def walk(node: ast.AST) -> float | int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            if isinstance(node.value, bool):
                raise ValueError("not a number: a boolean")
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](left, right)  # type: ignore[no-any-return]
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.operand))  # type: ignore[no-any-return]
        raise ValueError(f"not arithmetic: {ast.dump(node)[:60]}")

    return walk(tree)


class Ledger:
    """Append-only JSON lines, one per execution of a side-effecting tool."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = asyncio.Lock()
        self.by_key: dict[str, dict[str, Any]] = {}
        for entry in read_ledger(path):
            if entry.get("idempotency_key"):
                self.by_key.setdefault(entry["idempotency_key"], entry)

    async def execute(self, tool: str, key: str, make: Any) -> tuple[dict[str, Any], bool]:
        """Run ``make()`` once per key (an empty key: every time) and record the execution;
        the result, and whether it ran now (False: the key's first result, nothing ran)."""
        async with self.lock:
            if key and key in self.by_key:
                return dict(self.by_key[key]["result"]), False
            # As stored (sorted keys), so a repeat of the key answers byte for byte the same.
            result: dict[str, Any] = json.loads(json.dumps(make(), sort_keys=True))
            entry = {"tool": tool, "idempotency_key": key, "result": result, "at": _now()}
            line = json.dumps(entry, sort_keys=True) + "\n"
            # One write per line with O_APPEND, flushed before the caller hears of it.
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            if key:
                self.by_key[key] = entry
            return result, True


def read_ledger(path: Path) -> list[dict[str, Any]]:
    """Every recorded execution, oldest first (a missing file: none yet)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def build(ledger_path: Path) -> MCPServer[Any]:
    """The MCP server with its tools."""
    server: MCPServer[Any] = MCPServer(
        "baton-tools", instructions="baton's demo tools.", log_level="WARNING"
    )
    ledger = Ledger(ledger_path)

    @server.tool(description="The current date and time (ISO 8601) in an IANA time zone.")
    def current_time(timezone: str = "UTC") -> str:
        try:
            zone = ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ToolError(f"unknown time zone {timezone!r}") from None
        return datetime.now(zone).isoformat(timespec="seconds")

    @server.tool(description="Evaluate an arithmetic expression, e.g. '(2 + 3) * 4'.")
    def calculator(expression: str) -> str:
        try:
            return str(calculate(expression))
        except (SyntaxError, ValueError, ZeroDivisionError, OverflowError) as exc:
            raise ToolError(f"cannot calculate {expression!r}: {exc}") from None

    @server.tool(
        description="Create a task or reminder for the user, e.g. 'call John'. "
        "Side effect: the task is recorded."
    )
    async def create_task(
        title: str, ctx: Context[Any, Any], due: str = "", reply_after_s: float = 0.0
    ) -> dict[str, Any]:
        meta = ctx.request_context.meta or {}
        key = str(meta.get(IDEMPOTENCY_META_KEY) or "")[:200]
        if not title.strip():
            raise ToolError("title must not be empty")

        def make() -> dict[str, Any]:
            return {"task_id": "task_" + uuid.uuid4().hex[:12], "title": title[:500], "due": due}

        result, ran = await ledger.execute("create_task", key, make)
        if ran:
            # Done, but slow to say so: how tests cut a caller off after the side effect.
            await asyncio.sleep(max(0.0, min(reply_after_s, 3600.0)))
        return result

    @server.tool(description="Wait the given seconds (at most 3600), then say so. For tests.")
    async def wait(seconds: float) -> str:
        await asyncio.sleep(max(0.0, min(seconds, 3600.0)))
        return f"waited {seconds} s"

    return server


def serve(host: str, port: int, ledger: Path, port_file: Path | None = None) -> None:
    """Serve until SIGINT/SIGTERM (bound before the port file is written)."""
    import uvicorn

    app = build(ledger).streamable_http_app(streamable_http_path=PATH, host=host)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(256)
    bound = sock.getsockname()[1]
    if port_file is not None:
        tmp = port_file.with_name(port_file.name + ".tmp")
        tmp.write_text(str(bound))
        tmp.replace(port_file)
    print(f"MCP server listening on http://{host}:{bound}{PATH}", flush=True)
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])


def serve_stdio(ledger: Path) -> None:
    """Serve one client over stdin/stdout (the client starts this process)."""
    build(ledger).run("stdio")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="baton mcp", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--ledger", type=Path, required=True, help="append-only executions file")
    parser.add_argument("--port-file", type=Path, default=None)
    parser.add_argument("--stdio", action="store_true", help="speak MCP over stdin/stdout")
    args = parser.parse_args(argv)
    if args.stdio:
        serve_stdio(args.ledger)
    else:
        serve(args.host, args.port, args.ledger, args.port_file)


class MCPServerProcess:
    """Runs ``python -m baton.mcp_server`` as a child process; a context manager for tests."""

    def __init__(self, ledger: Path | None = None, timeout: float = STARTUP_S) -> None:
        self._dir = tempfile.mkdtemp(prefix="baton-mcp-")
        self.ledger = ledger or Path(self._dir) / "ledger.jsonl"
        self._timeout = timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self.port, self.url = 0, ""

    def __enter__(self) -> MCPServerProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self) -> None:
        import httpx

        port_file = Path(self._dir) / "port"
        port_file.unlink(missing_ok=True)
        path = [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]
        env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in path if p)}
        args = [f"--port={self.port}", f"--ledger={self.ledger}", f"--port-file={port_file}"]
        cmd = [sys.executable, "-m", "baton.mcp_server", *args]
        self._proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + self._timeout
        try:
            while True:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"MCP server exited early with {self._proc.returncode}")
                if time.monotonic() > deadline:
                    raise TimeoutError("MCP server did not start in time")
                with contextlib.suppress(httpx.TransportError, FileNotFoundError, ValueError):
                    self.port = int(port_file.read_text())
                    self.url = f"http://127.0.0.1:{self.port}{PATH}"
                    # Any HTTP answer means it serves (a bare GET without a session is a 4xx).
                    httpx.get(self.url, timeout=1)
                    break
                time.sleep(0.02)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM by pid, then SIGKILL after 5 s."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def executions(self, tool: str = "create_task") -> list[dict[str, Any]]:
        return [e for e in read_ledger(self.ledger) if e["tool"] == tool]


if __name__ == "__main__":
    main()
