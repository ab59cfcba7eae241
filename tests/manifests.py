"""The baton command lines in docker-compose.yml and the rendered Kubernetes overlays."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml

from tests import kustomize

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = ("dev", "prod")
# What the manifests put in a shell's environment, given a value to parse with.
SHELL_VARS = {'"$STREAM_REPLICAS"': "3"}


def _shell(line: str) -> list[list[str]]:
    """`baton a && baton b …` run by /bin/sh -c: each baton command's arguments."""
    for var, value in SHELL_VARS.items():
        line = line.replace(var, value)
    out = []
    for part in line.split("&&"):
        words = shlex.split(part)
        assert words and words[0] == "baton", f"not a baton command: {part!r}"
        out.append(words[1:])
    return out


def _container(entrypoint: list[str] | None, command: list[str]) -> list[list[str]]:
    if entrypoint in (None, ["baton"]):
        return [list(command)]
    assert entrypoint == ["/bin/sh", "-c"] and len(command) == 1, (entrypoint, command)
    return _shell(command[0])


def compose_commands() -> dict[str, list[list[str]]]:
    """Per compose service built from the image: the arguments `baton` is run with."""
    doc: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    out = {}
    for name, svc in doc["services"].items():
        if "build" in svc:
            out[f"compose/{name}"] = _container(svc.get("entrypoint"), svc["command"])
    return out


def k8s_commands() -> dict[str, list[list[str]]]:
    """Per container of the overlays that runs the baton image: `baton`'s arguments."""
    out = {}
    for overlay in OVERLAYS:
        for doc in kustomize.build(ROOT / "k8s" / "overlays" / overlay):
            spec = doc.get("spec", {})
            pod = spec.get("template", {}).get("spec", {})
            if doc["kind"] == "CronJob":
                pod = spec["jobTemplate"]["spec"]["template"]["spec"]
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                if c["image"].split(":")[0].rsplit("/", 1)[-1] != "baton":
                    continue
                key = f"k8s/{overlay}/{doc['kind']}/{doc['metadata']['name']}/{c['name']}"
                out[key] = _container(c.get("command"), c.get("args", []))
    return out


def all_commands() -> dict[str, list[list[str]]]:
    return {**compose_commands(), **k8s_commands()}
