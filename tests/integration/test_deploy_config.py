"""The generated NATS configs (compose, Helm) carry the per-service users; role passwords are set."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import nats
import pytest

from baton import accounts, deploy, permissions
from baton.embedded import _nats_binary, free_port
from baton.migrate import migrate
from baton.provision import provision
from shared import subjects

ROOT = Path(__file__).resolve().parents[2]


def test_the_committed_nats_configs_match_the_permissions() -> None:
    assert (ROOT / "deploy" / "nats.conf").read_text() == deploy.nats_conf(), (
        "deploy/nats.conf is stale: make deploy-configs"
    )
    values = json.loads((ROOT / "k8s" / "nats" / "values.yaml").read_text())
    assert values == deploy.helm_values(), "k8s/nats/values.yaml is stale: make deploy-configs"


def test_helm_values_take_every_password_from_the_secret() -> None:
    values = deploy.helm_values()
    merged = values["config"]["merge"]["accounts"]
    assert merged == accounts.accounts_config(
        {u: f"<< ${deploy.password_var(u)} >>" for u in (permissions.ADMIN, *permissions.SERVICES)}
    )
    users = [user for account in merged.values() for user in account["users"]]
    assert [u["user"] for u in users] == [permissions.ADMIN, *permissions.SERVICES]
    for user in users:
        var = deploy.helm_var(user["password"])
        assert var == deploy.password_var(user["user"])
        ref = values["container"]["env"][var]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "baton-nats-users", "key": var}
        if user["user"] != permissions.ADMIN:
            assert user["permissions"] == permissions.permissions(user["user"])
    assert values["config"]["cluster"] == {"enabled": True, "replicas": 3}
    assert values["config"]["jetstream"]["fileStore"]["enabled"] is True


@pytest.fixture
def compose_nats(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """nats-server running deploy/nats.conf as committed (ports and store moved for the test)."""
    # Passwords as docs/operations.md asks for them: a letter, then letters and digits.
    passwords = {u: "p" + secrets.token_hex(24) for u in (permissions.ADMIN, *permissions.SERVICES)}
    port, http_port = free_port(), free_port()
    conf = (ROOT / "deploy" / "nats.conf").read_text()
    conf = conf.replace("port: 4222", f"port: {port}\nhost: 127.0.0.1")
    conf = conf.replace("http_port: 8222", f"http_port: {http_port}")
    conf = conf.replace(deploy.NATS_STORE_DIR, str(tmp_path / "js"))
    path = tmp_path / "nats.conf"
    path.write_text(conf)
    env = {**os.environ, **{deploy.password_var(u): p for u, p in passwords.items()}}
    proc = subprocess.Popen(
        [_nats_binary(), "-c", str(path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "nats.log", "wb"),  # noqa: SIM115 -- closed with the process
    )
    try:
        url = f"nats://127.0.0.1:{port}"

        async def ready() -> None:
            # Generous: a loaded machine may take a while to start nats-server.
            deadline = asyncio.get_running_loop().time() + 60
            while asyncio.get_running_loop().time() < deadline:
                if proc.poll() is not None:
                    break
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.close()
                    return
                except OSError:
                    await asyncio.sleep(0.2)
            raise AssertionError(f"nats-server not ready: {(tmp_path / 'nats.log').read_text()}")

        asyncio.run(ready())
        yield url, passwords
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_the_compose_nats_config_runs_with_least_privilege(
    compose_nats: tuple[str, dict[str, str]],
) -> None:
    url, passwords = compose_nats
    await provision(url, user=permissions.ADMIN, password=passwords[permissions.ADMIN])
    errors: list[str] = []

    async def error_cb(exc: Exception) -> None:
        errors.append(str(exc))

    gateway = await nats.connect(
        url,
        user="gateway",
        password=passwords["gateway"],
        inbox_prefix=subjects.inbox_prefix("gateway"),
        error_cb=error_cb,
    )
    ack = await gateway.jetstream().publish(
        subjects.chat_in("p1", str(uuid.uuid4())), b"{}", headers={"Nats-Msg-Id": "x"}
    )
    assert ack.stream == subjects.STREAM_CHAT_IN
    await gateway.publish(subjects.exec_task("p1", "c1"), b"{}")  # only policy may
    await gateway.flush()
    for _ in range(100):
        if any("permissions violation" in e.lower() for e in errors):
            break
        await asyncio.sleep(0.05)
    assert any("exec.task" in e for e in errors), errors
    await gateway.close()
    with pytest.raises(Exception, match=r"(?i)authorization"):
        await nats.connect(
            url, user="executor", password="wrong", allow_reconnect=False, max_reconnect_attempts=0
        )


def _check_config(password: str) -> subprocess.CompletedProcess[str]:
    env = {deploy.password_var(u): "p0" for u in (permissions.ADMIN, *permissions.SERVICES)}
    env[deploy.password_var("agent")] = password
    return subprocess.run(
        [_nats_binary(), "-c", str(ROOT / "deploy" / "nats.conf"), "-t"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_passwords_must_be_plain_words_for_nats_to_read_them_from_the_environment() -> None:
    """nats-server parses a variable's value as config: why the docs ask for [A-Za-z][A-Za-z0-9_]*."""
    assert _check_config("p" + secrets.token_hex(24)).returncode == 0
    for hostile in ("-Kx1", "a b", "pw;x", "a}b"):
        out = _check_config(hostile)
        assert out.returncode != 0, hostile
        assert deploy.password_var("agent") in out.stdout + out.stderr, hostile


def test_nats_refuses_to_start_without_a_password_variable(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_PASSWORD_")}
    env.update({deploy.password_var(u): "x" for u in permissions.SERVICES})  # admin's missing
    out = subprocess.run(
        [_nats_binary(), "-c", str(ROOT / "deploy" / "nats.conf"), "-t"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0
    assert deploy.password_var(permissions.ADMIN) in out.stdout + out.stderr


async def test_roles_get_their_passwords_also_hostile_ones(database_url: str) -> None:
    await migrate(database_url)
    hostile = "it's\"; DROP TABLE messages; --"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "baton",
        "roles",
        "--database-url",
        database_url,
        env={**os.environ, deploy.db_password_var("persister"): hostile},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert "role baton_persister password set" in out.decode()
    con = await asyncpg.connect(database_url)
    try:
        stored = dict(
            await con.fetch(
                "SELECT rolname, rolpassword IS NOT NULL FROM pg_authid"
                " WHERE rolname = 'baton_persister'"
            )
        )
        assert await con.fetchval("SELECT count(*) FROM messages") == 0  # the table survived
    finally:
        await con.close()
    assert stored["baton_persister"] is True
    # Run twice (a re-run of the setup Job) is fine and changes nothing else.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "baton", "roles", "--database-url", database_url,
        env={**os.environ, deploy.db_password_var("persister"): hostile},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
