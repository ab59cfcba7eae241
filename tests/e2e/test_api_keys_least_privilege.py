"""API keys on the least-privilege stack: the admin's command, the persister's write (I5).

Every service runs as its own NATS user and Postgres role; ``baton apikey`` runs as the admin.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid

import httpx
import pytest

from baton import permissions
from shared import subjects
from tests.e2e.conftest import SecurePipeline
from tests.e2e.test_least_privilege import NOT_POLICY, _connect, _stream_messages, _wait_for

pytestmark = pytest.mark.e2e


def _apikey(p: SecurePipeline, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "BATON_NATS_URL": p.nats_url,
        "BATON_NATS_USER": permissions.ADMIN,
        "BATON_NATS_PASSWORD": p.passwords[permissions.ADMIN],
        "BATON_DATABASE_URL": p.database_url,
    }
    return subprocess.run(
        [sys.executable, "-m", "baton", "apikey", *args, "--wait", "30"],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )


async def _no_service_may_publish_an_admin_command(p: SecurePipeline) -> None:
    """A forged key command would be a way in: every service's publish is refused."""
    before = await _stream_messages(p, subjects.STREAM_ADMIN)
    for user in (*NOT_POLICY, "policy"):
        errors: list[str] = []
        nc = await _connect(p, user, errors)
        try:
            with pytest.raises(TimeoutError):
                await nc.jetstream(timeout=1.0).publish(
                    subjects.admin_api_key("acme"), b"{}", headers={"Nats-Msg-Id": user}
                )
            await _wait_for(errors, "permissions violation")
        finally:
            await nc.close()
    assert await _stream_messages(p, subjects.STREAM_ADMIN) == before


def test_a_key_made_as_the_admin_is_written_by_the_persister_and_works(
    secure_pipeline: SecurePipeline,
) -> None:
    p = secure_pipeline
    made = _apikey(p, "create", "--project", "acme", "--name", "backend")
    assert made.returncode == 0, made.stderr + p.log_tail()
    key, key_id = made.stdout.strip(), made.stderr.split()[1]
    headers = {"X-API-Key": key, "X-Acting-User": "u1"}
    r = httpx.get(f"{p.gateway}/api/usage", headers=headers, timeout=5)
    assert r.status_code == 200, r.text  # the gateway's role may read api_keys
    assert r.json()["project_id"] == "acme"

    asyncio.run(_no_service_may_publish_an_admin_command(p))

    gone = _apikey(p, "revoke", "--project", "acme", key_id)
    assert gone.returncode == 0, gone.stderr
    deadline = time.monotonic() + 10
    while httpx.get(f"{p.gateway}/api/usage", headers=headers, timeout=5).status_code != 401:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert str(uuid.UUID(key_id)) in _apikey(p, "list", "--project", "acme").stdout
