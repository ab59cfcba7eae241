"""docker-compose.yml and the Dockerfile: valid against the Compose schema, wired as documented."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from baton import permissions, roles

ROOT = Path(__file__).resolve().parents[2]
SERVICES = permissions.SERVICES
VAR = re.compile(r"\$\{([A-Z0-9_]+)(?::?([-?])([^}]*))?\}")


def env_example() -> dict[str, str]:
    out = {}
    for line in (ROOT / "deploy" / "env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, applied to every string."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op == "?":
            raise KeyError(f"{name}: {arg}")
        return arg or ""

    return VAR.sub(one, value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def test_compose_file_matches_the_compose_schema(compose: dict[str, Any]) -> None:
    schema = json.loads((ROOT / "tests" / "schemas" / "compose-spec.json").read_text())
    validator = jsonschema.Draft201909Validator(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, errors
    resolved = interpolate(compose, env_example())
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(resolved)]
    assert not errors, errors


def test_the_schema_rejects_a_broken_compose_file(compose: dict[str, Any]) -> None:
    schema = json.loads((ROOT / "tests" / "schemas" / "compose-spec.json").read_text())
    broken = json.loads(json.dumps(compose))
    broken["services"]["gateway"]["depends_on"]["setup"]["condition"] = "whenever"
    broken["services"]["nats"]["healthcheck"]["interval"] = 5
    broken["services"]["policy"]["restart_policy"] = "always"  # not a compose key
    errors = list(jsonschema.Draft201909Validator(schema).iter_errors(broken))
    assert len(errors) >= 3


def test_a_missing_secret_stops_compose_with_its_name(compose: dict[str, Any]) -> None:
    env = env_example()
    del env["NATS_PASSWORD_EXECUTOR"]
    with pytest.raises(KeyError, match="NATS_PASSWORD_EXECUTOR"):
        interpolate(compose, env)


def test_every_required_variable_is_in_env_example() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    required = {m.group(1) for m in VAR.finditer(text) if m.group(2) == "?"}
    assert required <= set(env_example()), required - set(env_example())


def test_each_service_runs_as_its_own_nats_user_and_database_role(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in SERVICES:
        svc = services[name]
        assert svc["command"] == ["run", name]
        env = svc["environment"]
        assert env["BATON_NATS_USER"] == name
        assert env["BATON_NATS_PASSWORD"].startswith(f"${{NATS_PASSWORD_{name.upper()}")
        dsn = env.get("BATON_DATABASE_URL", "")
        if name in roles.SERVICES_WITH_DB:
            assert dsn.startswith(f"postgresql://{roles.role(name)}:${{DB_PASSWORD_{name.upper()}")
        else:
            assert dsn == ""  # policy never touches the database
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"]
        assert svc["depends_on"]["setup"]["condition"] == "service_completed_successfully"
        assert svc["depends_on"]["nats"]["condition"] == "service_healthy"
        assert "test" in svc["healthcheck"]
    # nats-server gets every password variable its generated config references.
    nats_env = services["nats"]["environment"]
    conf = (ROOT / "deploy" / "nats.conf").read_text()
    assert set(re.findall(r"\$(NATS_PASSWORD_[A-Z]+)", conf)) == set(nats_env)


def test_start_order_and_mounts(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
        if name != "setup":
            assert "healthcheck" in svc or name in SERVICES, name
    setup = services["setup"]
    assert "baton migrate" in setup["command"][0] and "baton provision" in setup["command"][0]
    assert setup["environment"]["BATON_NATS_USER"] == permissions.ADMIN
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    targets = {
        t
        for job in prometheus["scrape_configs"]
        for c in job["static_configs"]
        for t in c["targets"]
    }
    assert targets == {f"{s}:9100" for s in SERVICES}
    assert any("dashboard.json" in v for v in services["grafana"]["volumes"])
    assert services["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"


def test_docker_compose_config_accepts_it(tmp_path: Path) -> None:
    docker = shutil.which("docker")
    command = [docker, "compose"] if docker else []
    if not command or subprocess.run([*command, "version"], capture_output=True).returncode:
        legacy = shutil.which("docker-compose")  # v1, Debian's (make container-tools)
        command = [legacy] if legacy else []
    if not command:
        pytest.skip("docker compose is not installed here; the schema test above stands in for it")
    env_file = tmp_path / ".env"
    env_file.write_text((ROOT / "deploy" / "env.example").read_text())
    out = subprocess.run(
        [
            *command,
            "--env-file",
            str(env_file),
            "-f",
            str(ROOT / "docker-compose.yml"),
            "config",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr


def _dockerfile() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            lines.append((word.upper(), rest.strip()))
    return lines


def test_the_image_is_multi_stage_non_root_and_picks_the_service_by_command() -> None:
    lines = _dockerfile()
    stages = [rest for word, rest in lines if word == "FROM"]
    assert len(stages) >= 2
    final = lines[max(i for i, (w, _) in enumerate(lines) if w == "FROM") :]
    users = [rest for word, rest in final if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert ("ENTRYPOINT", '["baton"]') in final
    assert any(w == "COPY" and r.startswith("--from=build") for w, r in final)
    # Tooling and embedded servers stay out of the runtime image.
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "tests"} <= set(ignored)


def test_the_image_layout_runs_the_cli_and_finds_the_migrations(tmp_path: Path) -> None:
    """What the runtime stage does: code in /app on PYTHONPATH, no installed project."""
    app = tmp_path / "app"
    for part in ("baton", "shared", "services", "migrations"):
        shutil.copytree(ROOT / part, app / part, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(app), "PYTHONDONTWRITEBYTECODE": "1"}
    probe = (
        "import baton.migrate, services.gateway.main;"
        "print(baton.migrate.DEFAULT_DIRECTORY);print(services.gateway.main.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    migrations, gateway = out.stdout.split()
    assert Path(migrations) == app / "migrations" and any(Path(migrations).glob("0001_*.sql"))
    assert Path(gateway).is_relative_to(app)
    run = subprocess.run(
        [sys.executable, "-m", "baton", "run", "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0 and "gateway" in run.stdout


def test_the_wheel_directory_holds_the_dockerfiles_dependency_list() -> None:
    """image.sh downloads wheels for the list the Dockerfile installs (--no-index: a wheel
    missing fails the build), and the Dockerfile installs from them only when they are there."""
    left_out = re.compile(r"startswith\(\((\"[^)]*\")\)\)")
    dockerfile = (ROOT / "Dockerfile").read_text()
    script = (ROOT / "scripts" / "containers" / "image.sh").read_text()
    assert left_out.findall(dockerfile) == left_out.findall(script) != []
    assert "COPY pyproject.toml .wheel[s] /ctx/" in dockerfile
    assert "--no-index --find-links /src/wheels" in dockerfile
    assert ".wheels/" in (ROOT / ".gitignore").read_text().split()
    assert ".wheels" not in (ROOT / ".dockerignore").read_text().split()
