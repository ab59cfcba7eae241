"""Write k8s/monitoring/prometheusrule.yaml from rules.yaml (one source for both Prometheus setups)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

MONITORING = Path(__file__).resolve().parents[1] / "k8s" / "monitoring"
HEADER = "# Generated from rules.yaml by `make monitoring`; edit rules.yaml, not this file.\n"


class _Dumper(yaml.SafeDumper):
    """Multi-line PromQL stays a readable block scalar."""


def _str(dumper: yaml.SafeDumper, value: str) -> Any:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render() -> str:
    groups = yaml.safe_load((MONITORING / "rules.yaml").read_text())["groups"]
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "baton",
            # kube-prometheus-stack selects rules by its release label.
            "labels": {"app.kubernetes.io/part-of": "baton", "release": "prometheus"},
        },
        "spec": {"groups": groups},
    }
    return HEADER + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=120)


if __name__ == "__main__":
    target = MONITORING / "prometheusrule.yaml"
    if sys.argv[1:] == ["--check"]:
        sys.exit(
            0 if target.read_text() == render() else "prometheusrule.yaml is stale: make monitoring"
        )
    target.write_text(render())
