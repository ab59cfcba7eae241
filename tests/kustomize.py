"""The subset of kustomize that k8s/ uses, for machines without kubectl or kustomize.

Supported: `resources` (files and directories), `namespace`, `images`, `labels` (without
selectors), `configMapGenerator` / `secretGenerator` (files, literals, `behavior: merge`, labels)
with name suffix hashes turned off, and inline JSON 6902 `patches` selected by kind and name.
Anything else raises, so a new kustomize feature in k8s/ cannot be silently ignored;
tests/unit/test_k8s.py checks this renderer against `kubectl kustomize` where kubectl exists.
"""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import yaml

Doc = dict[str, Any]
KNOWN = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "images",
    "labels",
    "configMapGenerator",
    "secretGenerator",
    "generatorOptions",
    "patches",
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}


class Unsupported(Exception):
    """k8s/ uses a kustomize feature this subset does not implement."""


def build(directory: Path) -> list[Doc]:
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - KNOWN
    if unknown:
        raise Unsupported(f"{directory}: {sorted(unknown)}")
    docs: list[Doc] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        if path.is_dir():
            docs += build(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    options = spec.get("generatorOptions", {})
    for gen in spec.get("configMapGenerator", []):
        _generate(docs, directory, gen, options, "ConfigMap")
    for gen in spec.get("secretGenerator", []):
        _generate(docs, directory, gen, options, "Secret")
    for patch in spec.get("patches", []):
        _patch(docs, patch)
    for label in spec.get("labels", []):
        if label.get("includeSelectors") or label.get("includeTemplates"):
            raise Unsupported("labels with selectors or templates")
        for doc in docs:
            doc["metadata"].setdefault("labels", {}).update(label["pairs"])
    for image in spec.get("images", []):
        for doc in docs:
            _set_images(doc, image)
    if "namespace" in spec:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = spec["namespace"]
    return docs


def _generate(docs: list[Doc], directory: Path, gen: Doc, options: Doc, kind: str) -> None:
    opts = {**options, **gen.get("options", {})}
    if not opts.get("disableNameSuffixHash"):
        raise Unsupported(f"{kind} {gen['name']}: name suffix hashes")
    data: dict[str, str] = {}
    for literal in gen.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    for item in gen.get("files", []):
        key, _, path = item.rpartition("=")
        data[key or Path(path).name] = (directory / path).read_text()
    if kind == "Secret":
        data = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    if gen.get("behavior") == "merge":
        target = next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == gen["name"])
        target.setdefault("data", {}).update(data)
        return
    doc: Doc = {"apiVersion": "v1", "kind": kind, "metadata": {"name": gen["name"]}, "data": data}
    if opts.get("labels"):
        doc["metadata"]["labels"] = dict(opts["labels"])
    if kind == "Secret":
        doc["type"] = gen.get("type", "Opaque")
    docs.append(doc)


def _patch(docs: list[Doc], patch: Doc) -> None:
    target = patch.get("target", {})
    if set(target) - {"kind", "name"} or "path" in patch:
        raise Unsupported(f"patch target {target}")
    ops = yaml.safe_load(patch["patch"])
    for doc in docs:
        if target.get("kind", doc["kind"]) != doc["kind"]:
            continue
        if target.get("name", doc["metadata"]["name"]) != doc["metadata"]["name"]:
            continue
        for op in ops:
            _apply(doc, op)


def _apply(doc: Doc, op: Doc) -> None:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    parent: Any = doc
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    if op["op"] == "replace":
        key: Any = int(last) if isinstance(parent, list) else last
        if isinstance(parent, dict) and last not in parent:
            raise KeyError(f"replace of a missing {op['path']}")
        parent[key] = copy.deepcopy(op["value"])
    elif op["op"] == "add":
        if isinstance(parent, list):
            parent.insert(len(parent) if last == "-" else int(last), copy.deepcopy(op["value"]))
        else:
            parent[last] = copy.deepcopy(op["value"])
    elif op["op"] == "remove":
        del parent[int(last) if isinstance(parent, list) else last]
    else:
        raise Unsupported(f"patch op {op['op']}")


def _set_images(node: Any, image: Doc) -> None:
    if isinstance(node, list):
        for item in node:
            _set_images(item, image)
        return
    if not isinstance(node, dict):
        return
    for key in ("containers", "initContainers"):
        for container in node.get(key, []) or []:
            name, tag = _split(container.get("image", ""))
            if name == image["name"]:
                new_name = image.get("newName", name)
                new_tag = image.get("newTag", tag)
                container["image"] = f"{new_name}:{new_tag}" if new_tag else new_name
    for value in node.values():
        _set_images(value, image)


def _split(image: str) -> tuple[str, str]:
    last = image.rsplit("/", 1)[-1]
    if ":" in last:
        name, _, tag = image.rpartition(":")
        return name, tag
    return image, ""
