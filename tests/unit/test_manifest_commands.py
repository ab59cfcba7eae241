"""Every command line compose and the Kubernetes overlays give `baton` is one it accepts."""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
from pathlib import PurePosixPath

import pytest

from baton.cli import parser
from baton.embedded import free_port
from tests.manifests import ROOT, all_commands, compose_commands, k8s_commands

COMMANDS = all_commands()


def test_the_manifests_run_every_service_and_the_model() -> None:
    runs = {tuple(a) for argv in COMMANDS.values() for a in argv}
    for service in ("gateway", "persister", "agent", "policy", "executor"):
        assert ("run", service) in runs
    assert any(a[0] == "model" for a in runs)
    assert {"compose/setup", "compose/model"} <= set(compose_commands())
    assert any("/Job/baton-setup/" in k for k in k8s_commands())
    assert any("/Deployment/baton-model/" in k for k in k8s_commands())


@pytest.mark.parametrize("where", sorted(COMMANDS))
def test_baton_accepts_the_command_line(where: str) -> None:
    for argv in COMMANDS[where]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                args = parser().parse_args(argv)
            except SystemExit as exc:
                pytest.fail(f"{where}: baton {' '.join(argv)} exits {exc.code}: {err.getvalue()}")
        assert isinstance(args, argparse.Namespace) and callable(args.func)


def test_the_model_command_line_of_the_manifests_serves() -> None:
    """compose's `baton model …` exactly, but on a free port of 127.0.0.1 rather than 0.0.0.0:8100."""
    [argv] = COMMANDS["compose/model"]
    assert argv[:3] == ["model", "--host", "0.0.0.0"]
    port = free_port()
    args = list(argv)
    args[args.index("--host") + 1] = "127.0.0.1"
    args[args.index("--port") + 1] = str(port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "baton", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once it listens (or empty when it exits)
        assert f"listening on http://127.0.0.1:{port}" in line, (line, proc.poll())
        import httpx

        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()


def test_compose_mounts_the_policy_file_as_a_directory_policy_reads() -> None:
    import yaml

    from services.policy import policyfile

    policy = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["policy"]
    path = PurePosixPath(policy["environment"]["BATON_POLICY_FILE"])
    [mount] = [v for v in policy["volumes"] if v.split(":")[1] == str(path.parent)]
    source, _, mode = mount.split(":")
    # A directory: an edit that replaces the file is seen (a file mount keeps the old inode).
    assert (ROOT / source).is_dir() and mode == "ro"
    book = policyfile.parse((ROOT / source / path.name).read_bytes(), "compose")
    assert book == policyfile.parse((ROOT / "policy.example.toml").read_bytes())
