"""The monitoring files are well-formed: rules pass promtool, alerts fire in their unit tests,
the Prometheus Operator copy matches, every alert has a runbook section, the dashboard is sane."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "k8s" / "monitoring"


def promtool() -> str:
    local = Path(sys.executable).parent / "promtool"
    found = str(local) if local.exists() else shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (`make tools` fetches it where apt exists)")
    return found


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((MONITORING / "rules.yaml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_promtool_accepts_the_rules() -> None:
    out = subprocess.run(
        [promtool(), "check", "rules", "rules.yaml"],
        cwd=MONITORING,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_alerts_fire_on_the_series_that_should_trigger_them() -> None:
    out = subprocess.run(
        [promtool(), "test", "rules", "rules_test.yaml"],
        cwd=MONITORING,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_prometheus_operator_rule_is_generated_from_rules_yaml() -> None:
    spec = importlib.util.spec_from_file_location(
        "render_prometheusrule", ROOT / "scripts" / "render_prometheusrule.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (MONITORING / "prometheusrule.yaml").read_text() == module.render(), (
        "k8s/monitoring/prometheusrule.yaml is stale: run `make monitoring`"
    )


def _anchors(markdown: str) -> set[str]:
    # GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes.
    out = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^a-z0-9 _-]", "", title).replace(" ", "-"))
    return out


def test_every_alert_links_a_runbook_section_that_exists() -> None:
    anchors = _anchors((ROOT / "docs" / "operations.md").read_text())
    for rule in rules():
        page, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert page == "docs/operations.md", rule["alert"]
        assert anchor in anchors, f"{rule['alert']}: no section #{anchor} in docs/operations.md"
        assert rule["labels"]["severity"] in {"page", "warning", "info"}, rule["alert"]


def test_the_issue_s_alerts_are_all_there() -> None:
    names = {r["alert"] for r in rules()}
    assert {
        "BatonConsumerLagGrowing",
        "BatonDeadLetters",
        "BatonHandlerErrors",
        "BatonGateway5xxRatio",
        "BatonBudgetExhausted",
        "BatonConsumerWithoutWorkers",
        "BatonPermissionViolation",
    } <= names


def test_the_dashboard_has_unique_panels_each_with_a_query() -> None:
    dash = json.loads((MONITORING / "dashboard.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    titles = {p["title"] for p in dash["panels"] if p["type"] == "row"}
    assert {"Consumer lag", "Tokens and cost", "Errors and dead letters"} <= titles
    assert {
        f"Golden signals: {s}" for s in ("gateway", "persister", "agent", "policy", "executor")
    } <= titles
