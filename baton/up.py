"""``baton up``: embedded NATS and Postgres, provisioning, migrations, five supervised services."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import FrameType
from typing import Any

import asyncpg

from baton import devtoken, permissions, private, roles
from baton.embedded import STARTUP_S, NatsServer, PostgresServer, free_port
from baton.migrate import migrate
from baton.provision import provision
from baton.supervisor import Child, Supervisor, service_env

SERVICES = ("persister", "policy", "agent", "executor", "gateway")
DATABASE = "baton"


async def ensure_database(admin_dsn: str, name: str) -> None:
    con = await asyncpg.connect(admin_dsn)
    try:
        if not await con.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await con.execute(f'CREATE DATABASE "{name}"')
    finally:
        await con.close()


def _without_password(dsn: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    netloc = f"{parts.username}@{parts.hostname}:{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def wait_http(url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    return False


def wait_http_any(url: str, timeout: float) -> bool:
    """Whether ``url`` answers HTTP at all within ``timeout`` (an MCP endpoint GET is a 4xx)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return True
        except urllib.error.HTTPError:
            return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    return False


def say(line: str) -> None:
    print(f"[baton] {line}", flush=True)


# The policy ``baton up`` runs with when given none: built-in rules, plus the demo MCP server's
# tools — the time and a calculator run at once, ``create_task`` asks the user first.
DEMO_POLICY = """# Written by baton up (no policy file was given); docs/tools.md explains every key.
[defaults.tools]
max_rounds = 5
approval_timeout_s = 600

[defaults.tools.servers.demo]
url = "{url}"

[defaults.tools.servers.demo.tools.current_time]
approval = "auto"
idempotent = true

[defaults.tools.servers.demo.tools.create_task]
approval = "ask"
idempotent = false
per_user_daily = 10
timeout_s = 30
"""


class Stack:
    """Everything on one machine, stopped in reverse order on SIGINT or SIGTERM."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port or free_port()
        self.logs = self.data_dir / "logs"
        self.stop_requested = False

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stop_requested = True

    def run(self) -> int:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        # Secrets, logs and data live here: for this user only (0700, files 0600).
        private.make_dir(self.data_dir)
        private.make_dir(self.logs)
        secret = devtoken.secret_for(self.data_dir)
        passwords = permissions.passwords_for(self.data_dir)
        nats = NatsServer(
            self.data_dir / "nats",
            config_text=permissions.authorization(passwords),
            log_file=self.logs / "nats.log",
        )
        pg = PostgresServer(self.data_dir / "postgres", log_file=self.logs / "postgres.log")
        supervisor: Supervisor | None = None
        model: Child | None = None
        tools: Child | None = None
        endpoints = self.data_dir / "endpoints.json"
        try:
            say(f"data dir {self.data_dir}")
            nats.start()
            say(f"NATS JetStream at {nats.url} (pid {nats.pid})")
            pg.start()
            say(f"Postgres at 127.0.0.1:{pg.port} (pid {pg.pid})")
            asyncio.run(ensure_database(pg.dsn(), DATABASE))
            dsn = pg.dsn(DATABASE)
            for name in asyncio.run(migrate(dsn)):
                say(f"migration {name} applied")
            asyncio.run(roles.ensure_roles(dsn))
            say("database roles ready (only baton_persister writes)")
            asyncio.run(provision(nats.url, user=permissions.ADMIN, password=passwords["admin"]))
            say("streams, consumers and buckets provisioned; one NATS user per service")

            model_url = ""
            if not os.environ.get("ANTHROPIC_API_KEY"):
                model_port = free_port()
                model_url = f"http://127.0.0.1:{model_port}"
                model = Child(
                    "offline-model",
                    [sys.executable, "-m", "baton.offline_model", "--port", str(model_port)],
                    dict(os.environ),
                    self.logs / "offline-model.log",
                )
                model.start()
                if not wait_http(f"{model_url}/healthz", STARTUP_S):
                    raise RuntimeError(f"offline model did not start; see {model.log_path}")
                say(f"ANTHROPIC_API_KEY is not set: using the offline model at {model_url}")
            else:
                say("using the Anthropic API (ANTHROPIC_API_KEY is set)")

            # baton's demo MCP server (docs/tools.md); its ledger of executions survives restarts.
            tools_port = free_port()
            tools_url = f"http://127.0.0.1:{tools_port}/mcp"
            tools = Child(
                "mcp-tools",
                [
                    *(sys.executable, "-m", "baton.mcp_server", "--port", str(tools_port)),
                    *("--ledger", str(self.data_dir / "mcp-ledger.jsonl")),
                ],
                dict(os.environ),
                self.logs / "mcp-tools.log",
            )
            tools.start()
            if not wait_http_any(tools_url, STARTUP_S):
                raise RuntimeError(f"MCP server did not start; see {tools.log_path}")
            say(f"demo MCP server (tools) at {tools_url}")

            metrics = {name: free_port() for name in SERVICES}
            children = [
                Child.service(
                    name,
                    service_env(
                        name,
                        nats_url=nats.url,
                        database_url=(
                            roles.dsn_for(dsn, name) if name in roles.SERVICES_WITH_DB else ""
                        ),
                        metrics_port=metrics[name],
                        jwt_secret=secret,
                        http_port=self.port,
                        model_url=model_url,
                        nats_user=name,
                        nats_password=passwords[name],
                        extra=self._extra(name, tools_url),
                    ),
                    self.logs,
                )
                for name in SERVICES
            ]
            supervisor = Supervisor(children, say)
            supervisor.start_all()
            gateway = f"http://127.0.0.1:{self.port}"
            if not wait_http(f"{gateway}/readyz", STARTUP_S):
                raise RuntimeError(f"gateway did not start; see {self.logs / 'gateway.log'}")
            for name, mport in metrics.items():
                # A service serves /metrics once its settings loaded; the banner waits for all five.
                if not wait_http(f"http://127.0.0.1:{mport}/metrics", STARTUP_S):
                    raise RuntimeError(f"{name} did not start; see {self.logs / (name + '.log')}")
            token = devtoken.make_token(secret, "demo", "alice")
            info: dict[str, Any] = {
                "gateway": gateway,
                "token": token,
                "project": "demo",
                "user": "alice",
                "metrics": {n: f"http://127.0.0.1:{p}/metrics" for n, p in metrics.items()},
                "nats": nats.url,
                "nats_passwords": str(self.data_dir / permissions.PASSWORDS_FILE),
                # Without its password, which stays in its own file (DSNs get pasted around).
                "database": _without_password(dsn),
                "database_password_file": str(pg.password_file),
                "model": model_url or "https://api.anthropic.com",
                "mcp": tools_url,
                "pids": {
                    **{c.name: c.pid for c in children},
                    "nats": nats.pid,
                    "postgres": pg.pid,
                    **({"offline-model": model.pid} if model is not None else {}),
                    "mcp-tools": tools.pid,
                },
                "logs": str(self.logs),
            }
            # The banner first: the endpoints file is what scripts wait for, so once it exists
            # everything baton up announces has been printed. It holds a 30-day token: 0600
            # from the first byte, and never seen half-written.
            self._banner(info)
            private.write_file(endpoints, json.dumps(info, indent=2))
            while not self.stop_requested:
                supervisor.poll()
                if model is not None and model.exit_code() is not None:
                    say("offline model exited; restarting it")
                    model.start()
                if tools.exit_code() is not None:
                    say("MCP server exited; restarting it")
                    tools.start()
                time.sleep(0.2)
            say("stopping")
            return 0
        except Exception as exc:
            say(f"error: {exc}")
            return 1
        finally:
            if supervisor is not None:
                supervisor.stop_all()
            if model is not None:
                model.signal(signal.SIGTERM)
                if not model.wait(5):
                    model.signal(signal.SIGKILL)
                    model.wait(5)
            if tools is not None:
                tools.signal(signal.SIGTERM)
                if not tools.wait(5):
                    tools.signal(signal.SIGKILL)
                    tools.wait(5)
            endpoints.unlink(missing_ok=True)
            pg.stop()
            nats.stop()
            say("stopped; nothing left running")

    def _extra(self, name: str, tools_url: str) -> dict[str, str] | None:
        if name == "gateway":
            return self._gateway_extra()
        if name == "executor":
            # The executor's allow-list of MCP servers: the demo server, as the policy file names it.
            return {"EXECUTOR_MCP_SERVERS": json.dumps({"demo": tools_url})}
        if name == "policy" and not os.environ.get("BATON_POLICY_FILE"):
            # No policy file of the user's: one that grants the demo server's tools, so a
            # message such as "remind me to call John" shows the approval flow (docs/tools.md).
            path = self.data_dir / "policy-demo-tools.toml"
            private.write_file(path, DEMO_POLICY.format(url=tools_url))
            return {"BATON_POLICY_FILE": str(path)}
        if name == "persister":
            # Retention's archives stay in the data dir (a sweep runs only if the policy file
            # given to `baton up --policy` sets retention_days).
            archive = f"file://{self.data_dir / 'archive'}"
            return {"PERSISTER_ARCHIVE_URL": os.environ.get("PERSISTER_ARCHIVE_URL", archive)}
        return None

    def _gateway_extra(self) -> dict[str, str]:
        """``baton up`` lets a page served from its own address call it (unless told otherwise)."""
        own = f"http://127.0.0.1:{self.port},http://localhost:{self.port}"
        return {"GATEWAY_CORS_ORIGINS": os.environ.get("GATEWAY_CORS_ORIGINS", own)}

    def _banner(self, info: dict[str, Any]) -> None:
        gateway, token = info["gateway"], info["token"]
        metrics: dict[str, str] = info["metrics"]
        print(
            f"""
baton is up.

  page      {gateway}/#token={token}
  gateway   {gateway}
  token     {token}
            (project "demo", user "alice"; more: baton token --data-dir {self.data_dir} --project P --user U)

Try it:

  curl -s -X POST {gateway}/api/chat \\
    -H "Authorization: Bearer {token}" \\
    -H "Content-Type: application/json" \\
    -H "Idempotency-Key: $(date +%s%N)" \\
    -d '{{"content": "Hello baton, what can you do?"}}'

  # then, with the conversation_id it returns:
  curl -s {gateway}/api/conversations/<conversation_id>/messages -H "Authorization: Bearer {token}"

Tools (MCP, streamable HTTP): {info["mcp"]}

Metrics:
"""
            + "\n".join(f"  {name:<10}{url}" for name, url in metrics.items())
            + f"\n\nEndpoints as JSON: {self.data_dir / 'endpoints.json'}\nLogs: {self.logs}\nCtrl-C stops everything.\n",
            flush=True,
        )
