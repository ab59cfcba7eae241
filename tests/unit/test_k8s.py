"""k8s/: every overlay renders, validates against Kubernetes schemas (CRDs included), and is wired
the way docs/operations.md promises (probes, limits, hardening, scaling on each consumer's lag)."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from baton import deploy, permissions, roles
from services.policy import policyfile
from tests import kustomize

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
CRDS = ROOT / "tests" / "schemas" / "crds"
KUBERNETES_VERSION = "1.33"
OVERLAYS = ("dev", "prod")
WORKERS = tuple(s for s in permissions.SERVICES if s != "gateway")
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda-v1alpha1.json",
    ("postgresql.cnpg.io/v1", "Cluster"): "cluster-postgresql.cnpg.io-v1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor-monitoring.coreos.com-v1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring.coreos.com-v1.json",
}


def _kustomize() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


def _real_render(overlay: str) -> tuple[dict[str, Any], ...]:
    command = _kustomize()
    assert command is not None
    out = subprocess.run(
        [*command, str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    """kubectl's (or kustomize's) rendering; without either, tests/kustomize.py's subset."""
    if _kustomize() is not None:
        return _real_render(overlay)
    return tuple(kustomize.build(K8S / "overlays" / overlay))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_kustomize_subset_renders_exactly_what_kubectl_does(overlay: str) -> None:
    if _kustomize() is None:
        pytest.skip("no kubectl or kustomize to compare tests/kustomize.py with")

    def keyed(docs: Any) -> dict[tuple[str, str], Any]:
        return {(d["kind"], d["metadata"]["name"]): d for d in docs}

    real = keyed(_real_render(overlay))
    assert keyed(kustomize.build(K8S / "overlays" / overlay)) == real
    assert len(real) == len(_real_render(overlay))  # no two documents share a kind and name


def test_the_kustomize_subset_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\nreplicas: [{name: x, count: 2}]\n")
    with pytest.raises(kustomize.Unsupported, match="replicas"):
        kustomize.build(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "configMapGenerator: [{name: c, literals: [a=b]}]\n"
    )
    with pytest.raises(kustomize.Unsupported, match="hash"):
        kustomize.build(tmp_path)


def validate(doc: dict[str, Any]) -> list[str]:
    """Schema errors of one manifest: Kubernetes' own kinds strictly, CRDs with tests/schemas/crds."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CRD_SCHEMAS:
        schema = json.loads((CRDS / CRD_SCHEMAS[key]).read_text())
        validator = jsonschema.Draft7Validator(schema)
        return [f"{key} {list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{key} {doc['metadata'].get('name')}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{key}: no schema (add one to tests/schemas/crds)"]
    return []


def by_kind(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_overlay_renders_and_every_manifest_matches_its_schema(overlay: str) -> None:
    docs = render(overlay)
    errors = [e for d in docs for e in validate(d)]
    assert not errors, "\n".join(errors)
    kinds = {d["kind"] for d in docs}
    assert {
        "Deployment",
        "Service",
        "ConfigMap",
        "Job",
        "Cluster",
        "ScaledObject",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "PodMonitor",
        "PrometheusRule",
    } <= kinds


def test_the_base_files_validate_without_kustomize() -> None:
    """On a machine without kubectl: the base's plain files are the manifests, minus kustomize's edits."""
    for path in sorted((K8S / "base").glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                assert not validate(doc), (path.name, validate(doc))


def test_the_validation_rejects_broken_manifests() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in render("prod")}
    deployment = copy.deepcopy(docs[("Deployment", "persister")])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = {
        "x": 1
    }
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 30  # misspelt field
    assert validate(deployment)
    scaled = copy.deepcopy(docs[("ScaledObject", "executor")])
    del scaled["spec"]["triggers"][0]["metadata"]["consumer"]
    assert validate(scaled)
    cluster = copy.deepcopy(docs[("Cluster", "baton-postgres")])
    cluster["spec"]["instances"] = "three"
    assert validate(cluster)
    rule = copy.deepcopy(docs[("PrometheusRule", "baton")])
    rule["spec"]["groups"][0]["rules"][0]["for"] = "ten minutes"
    assert validate(rule)


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployment_is_hardened_probed_and_drains_within_its_grace(overlay: str) -> None:
    docs = render(overlay)
    for name, deployment in by_kind(docs, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["automountServiceAccountToken"] is False, name
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], name
            assert c["readinessProbe"]["httpGet"]["path"] in ("/readyz", "/healthz"), name
            assert c["livenessProbe"]["httpGet"]["path"] == "/healthz", name
            grace = _env(c).get("BATON_SHUTDOWN_GRACE_S")
            if grace is not None:
                assert pod["terminationGracePeriodSeconds"] > float(grace["value"]) + 5, name
        if name in permissions.SERVICES:
            assert pod["containers"][0]["args"] == ["run", name]
            assert _env(pod["containers"][0])["BATON_NATS_USER"]["value"] == name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_policy_reads_a_valid_policy_file_from_a_mount_that_sees_updates(overlay: str) -> None:
    docs = render(overlay)
    pod = by_kind(docs, "Deployment")["policy"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    path = Path(_env(container)["BATON_POLICY_FILE"]["value"])
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent)]
    # A subPath mount is a copy made at start: the kubelet never updates it, so no hot reload.
    assert "subPath" not in mount and mount.get("readOnly") is True
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    config = by_kind(docs, "ConfigMap")[volume["configMap"]["name"]]
    book = policyfile.parse(config["data"][path.name].encode(), "k8s ConfigMap")
    assert book == policyfile.parse((ROOT / "policy.example.toml").read_bytes())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_worker_scales_on_its_own_consumers_and_the_gateway_on_cpu(overlay: str) -> None:
    docs = render(overlay)
    namespace = next(d for d in docs if d["kind"] == "Namespace")["metadata"]["name"]
    scaled = by_kind(docs, "ScaledObject")
    assert set(scaled) == set(WORKERS)
    for service in WORKERS:
        spec = scaled[service]["spec"]
        assert spec["scaleTargetRef"]["name"] == service
        assert spec["minReplicaCount"] >= 1, "a worker at zero replicas stops its consumers"
        wanted = {(c.stream, c.durable) for c in permissions.GRANTS[service].consumers}
        got = {(t["metadata"]["stream"], t["metadata"]["consumer"]) for t in spec["triggers"]}
        assert got == wanted, service
        for t in spec["triggers"]:
            assert t["type"] == "nats-jetstream"
            host = t["metadata"]["natsServerMonitoringEndpoint"]
            assert host == f"nats-headless.{namespace}.svc.cluster.local:8222"
    hpa = by_kind(docs, "HorizontalPodAutoscaler")["gateway"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "gateway" and hpa["minReplicas"] >= 1
    assert "gateway" in by_kind(docs, "Service")
    pdbs = by_kind(docs, "PodDisruptionBudget")
    for service in permissions.SERVICES:
        labels = by_kind(docs, "Deployment")[service]["spec"]["template"]["metadata"]["labels"]
        assert pdbs[service]["spec"]["selector"]["matchLabels"].items() <= labels.items()


def _secret_refs(node: Any, optional: bool = False) -> list[tuple[str, str]]:
    """(Secret, key) of every reference: the required ones, or (``optional``) the optional ones."""
    if isinstance(node, dict):
        ref = node.get("secretKeyRef")
        found = (
            [(ref["name"], ref["key"])]
            if isinstance(ref, dict) and bool(ref.get("optional")) == optional
            else []
        )
        return found + [r for v in node.values() for r in _secret_refs(v, optional)]
    if isinstance(node, list | tuple):
        return [r for v in node for r in _secret_refs(v, optional)]
    return []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_optional_secret_is_documented_with_its_keys(overlay: str) -> None:
    """An optional Secret (the archive's) is made by the operator: operations.md names it and
    every key the manifests read from it."""
    refs = set(_secret_refs(render(overlay), optional=True))
    assert ("baton-archive", "url") in refs
    operations = (ROOT / "docs" / "operations.md").read_text()
    for name, key in refs:
        assert f"`{name}`" in operations, f"docs/operations.md must say how to create {name}"
        assert f"`{key}`" in operations, f"docs/operations.md must name {name}'s key {key}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_secret_reference_is_provided_or_documented(overlay: str) -> None:
    docs = render(overlay)
    refs = set(_secret_refs(docs))
    assert refs
    generated = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    operations = (ROOT / "docs" / "operations.md").read_text()
    for name, key in refs:
        if name == "baton-postgres-superuser":
            continue  # made by CloudNativePG (enableSuperuserAccess)
        if overlay == "dev":
            assert key in generated[name]["data"], (name, key)
        else:
            assert f"`{name}`" in operations, f"docs/operations.md must say how to create {name}"
    # NATS passwords: the same Secret keys the NATS chart's values read.
    nats_env = deploy.helm_values()["container"]["env"]
    for name, key in refs:
        if name == "baton-nats-users":
            assert nats_env[key]["valueFrom"]["secretKeyRef"]["name"] == name
    # One basic-auth Secret per database role, the one the CNPG Cluster manages.
    cluster = by_kind(docs, "Cluster")["baton-postgres"]["spec"]
    managed = {r["name"]: r["passwordSecret"]["name"] for r in cluster["managed"]["roles"]}
    assert managed == {roles.role(s): f"baton-db-{s}" for s in roles.SERVICES_WITH_DB}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_dashboard_and_rules_ship_with_the_manifests(overlay: str) -> None:
    docs = render(overlay)
    dashboard = by_kind(docs, "ConfigMap")["baton-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["baton.json"]) == json.loads(
        (K8S / "monitoring" / "dashboard.json").read_text()
    )
    rule = by_kind(docs, "PrometheusRule")["baton"]
    rules = yaml.safe_load((K8S / "monitoring" / "rules.yaml").read_text())
    assert rule["spec"]["groups"] == rules["groups"]


def test_network_policies_deny_by_default_and_open_only_what_is_needed() -> None:
    policies = by_kind(render("prod"), "NetworkPolicy")
    deny = policies["baton-default-deny"]["spec"]
    assert (
        deny["policyTypes"] == ["Ingress", "Egress"]
        and "ingress" not in deny
        and "egress" not in deny
    )
    ingress_ports = {
        (name, p["port"])
        for name, pol in policies.items()
        for rule in pol["spec"].get("ingress", [])
        for p in rule.get("ports", [])
    }
    assert ingress_ports == {("gateway-ingress-http", 8000), ("baton-ingress-metrics", 9100)}
    egress_ports = {
        p["port"]
        for pol in policies.values()
        for rule in pol["spec"].get("egress", [])
        for p in rule.get("ports", [])
    }
    assert egress_ports == {53, 4222, 4318, 5432, 443}
