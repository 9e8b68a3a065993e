"""Static checks of the container image and the Kubernetes deployment (Dockerfile, deploy/).

Fast, offline, no cluster: PyYAML and the standard library only. The kustomize overlays are
rendered by a small renderer below that implements exactly the kustomize features deploy/ uses
(resources, components, namespace, images, strategic-merge and JSON 6902 patches, configMapGenerator with
kustomize's hash suffix, replacements, local-config objects); when a real
kustomize is on the machine (``kustomize`` or ``kubectl kustomize``) a test checks that both
renderings agree, so the renderer cannot drift from kustomize unnoticed.

scripts/lint-deploy.sh also runs this file as a script:

    python tests/test_deploy_manifests.py render DIR          # rendered multi-document YAML
    python tests/test_deploy_manifests.py split FILE OUT_DIR  # builtin.yaml + crds.yaml
    python tests/test_deploy_manifests.py check-crds FILE...  # structural check of CRD objects
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import yaml
except ModuleNotFoundError:  # pragma: no cover - PyYAML is part of the test and lint extras
    if __name__ == "__main__":
        raise
    import pytest

    yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
OVERLAYS = ("staging", "production")
APP_NAME = "rekognition-ingest-worker"
WORKER_IMAGE = "rekognition-ingest-worker"  # the name overlays rewrite with `images:`
UID = 10001
SECRET_NAME = "rekognition-worker-db"
MIGRATOR_SECRET_NAME = "rekognition-migrator-db"
# The Rekognition Get* TPS quota the example overlays are sized for (deploy/README.md, "Scaling").
ASSUMED_GET_TPS_QUOTA = 5.0
CRD_GROUPS = frozenset({"keda.sh", "monitoring.coreos.com"})
CLUSTER_SCOPED_KINDS = frozenset(
    {
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "PersistentVolume",
        "PriorityClass",
        "StorageClass",
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    }
)


# --------------------------------------------------------------------------------------------
# A minimal kustomize
# --------------------------------------------------------------------------------------------

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
RENDERER_FIELDS = frozenset({"apiVersion", "kind", "resources", "components", "namespace", "images", "patches",
                             "configMapGenerator", "replacements"})
# Marks a generated ConfigMap whose name takes the hash suffix when the top-level build ends (kustomize
# keeps the same mark internally); removed before the objects are returned.
_NEEDS_HASH = "internal.renderer/needs-hash"
_LOCAL_CONFIG = "config.kubernetes.io/local-config"


def load_yaml_docs(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def kustomization_file(directory: Path) -> Path | None:
    for name in KUSTOMIZATION_FILES:
        if (directory / name).is_file():
            return directory / name
    return None


def read_kustomization(directory: Path) -> dict[str, Any]:
    path = kustomization_file(directory)
    if path is None:
        raise FileNotFoundError(f"no kustomization file in {directory}")
    (doc,) = load_yaml_docs(path)
    unknown = set(doc) - RENDERER_FIELDS
    if unknown:
        raise ValueError(f"{path}: fields this renderer does not implement: {sorted(unknown)}")
    return doc


def render(directory: Path) -> list[dict[str, Any]]:
    """Render a Kustomization directory (like `kustomize build`), as a list of objects."""
    resources = _accumulate(directory)
    _add_hash_suffixes(resources)
    return resources


def _accumulate(directory: Path) -> list[dict[str, Any]]:
    """A Kustomization's objects before the top-level build names its generated ConfigMaps."""
    kind = read_kustomization(directory).get("kind", "Kustomization")
    if kind != "Kustomization":
        raise ValueError(f"{directory} is a {kind}, not a Kustomization")
    return _build(directory, [])


def _build(directory: Path, accumulated: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # The order of kustomize 5.x: resources, this kustomization's generators, components (in the order
    # listed), then transformers (patches, namespace, images, replacements); local-config objects are
    # dropped at the end of every level.
    spec = read_kustomization(directory)
    resources = [copy.deepcopy(doc) for doc in accumulated]
    for entry in spec.get("resources", []):
        target = (directory / entry).resolve()
        resources.extend(_accumulate(target) if target.is_dir() else load_yaml_docs(target))
    for generator in spec.get("configMapGenerator", []):
        _generate_config_map(resources, generator, directory)
    for entry in spec.get("components", []):
        component = (directory / entry).resolve()
        if read_kustomization(component).get("kind") != "Component":
            raise ValueError(f"{component} is listed under components but is not a Component")
        resources = _build(component, resources)
    for patch in spec.get("patches", []):
        _apply_patch(resources, patch, directory)
    if "namespace" in spec:
        for doc in resources:
            if doc["kind"] not in CLUSTER_SCOPED_KINDS:
                doc["metadata"]["namespace"] = spec["namespace"]
    if spec.get("images"):
        for doc in resources:
            _rewrite_images(doc, spec["images"])
    for replacement in spec.get("replacements", []):
        _replace(resources, replacement)
    return [doc for doc in resources
            if str(doc["metadata"].get("annotations", {}).get(_LOCAL_CONFIG, "")).lower() != "true"]


def _generator_data(generator: dict[str, Any], directory: Path) -> dict[str, str]:
    data: dict[str, str] = {}
    for env_file in generator.get("envs", []):
        for line in (directory / env_file).read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                key, sep, value = line.partition("=")
                if not sep:
                    raise ValueError(f"{directory / env_file}: line without '=': {line!r}")
                data[key.strip()] = value
    for literal in generator.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    for entry in generator.get("files", []):
        key, sep, path = entry.partition("=")
        key, path = (key, path) if sep else (Path(entry).name, entry)
        data[key] = (directory / path).read_text(encoding="utf-8")
    return data


def _generate_config_map(resources: list[dict[str, Any]], generator: dict[str, Any], directory: Path) -> None:
    data = _generator_data(generator, directory)
    options = generator.get("options", {})
    behavior = generator.get("behavior", "create")
    name = generator["name"]
    existing = [doc for doc in resources if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == name]
    if behavior == "create":
        if existing:
            raise ValueError(f"{directory}: ConfigMap {name} already exists; use behavior merge or replace")
        doc: dict[str, Any] = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {}}
        resources.append(doc)
    elif len(existing) == 1:
        doc = existing[0]
        if behavior == "replace":
            doc["data"] = {}
    else:
        raise ValueError(f"{directory}: ConfigMap {name} does not exist; cannot {behavior}")
    doc["data"].update(data)
    metadata = doc["metadata"]
    for field in ("labels", "annotations"):
        if options.get(field):
            metadata.setdefault(field, {}).update(options[field])
    if not options.get("disableNameSuffixHash"):
        metadata.setdefault("annotations", {})[_NEEDS_HASH] = "true"
    elif behavior == "create":
        metadata.get("annotations", {}).pop(_NEEDS_HASH, None)


def config_map_hash(doc: dict[str, Any]) -> str:
    """kustomize's name suffix of a generated ConfigMap (api/hasher): the first 10 hex digits of the SHA-256
    of a JSON encoding of kind, name and data (Go's encoding/json: sorted keys, HTML characters escaped), with
    0, 1, 3, a and e swapped for letters so the suffix never looks like a number or a word.

    kustomize 5 looks the name up as one field called "metadata/name", finds none and encodes "": the suffix
    depends on the data alone. test_python_renderer_agrees_with_kustomize keeps this honest."""
    import hashlib

    fields: dict[str, Any] = {"kind": "ConfigMap", "name": "", "data": doc.get("data") or {}}
    if doc.get("binaryData"):
        fields["binaryData"] = doc["binaryData"]
    encoded = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                         ("\u2029", "\\u2029")):
        encoded = encoded.replace(char, escape)
    digest = hashlib.sha256(encoded.encode("utf-8")).hexdigest()[:10]
    return digest.translate(str.maketrans({"0": "g", "1": "h", "3": "k", "a": "m", "e": "t"}))


def _add_hash_suffixes(resources: list[dict[str, Any]]) -> None:
    renamed: dict[tuple[str | None, str], str] = {}
    for doc in resources:
        annotations = doc["metadata"].get("annotations", {})
        if doc["kind"] == "ConfigMap" and annotations.pop(_NEEDS_HASH, None):
            if not annotations:
                del doc["metadata"]["annotations"]
            old = doc["metadata"]["name"]
            doc["metadata"]["name"] = f"{old}-{config_map_hash(doc)}"
            renamed[doc["metadata"].get("namespace"), old] = doc["metadata"]["name"]
    for doc in resources:
        if doc["kind"] != "ConfigMap":
            _rename_config_map_references(doc, doc["metadata"].get("namespace"), renamed)


def _rename_config_map_references(node: Any, namespace: str | None,
                                  renamed: dict[tuple[str | None, str], str]) -> None:
    """Pods name a ConfigMap in envFrom[].configMapRef, env[].valueFrom.configMapKeyRef, volumes[].configMap
    and projected sources; kustomize rewrites exactly those."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("configMapRef", "configMapKeyRef", "configMap") and isinstance(value, dict):
                new = renamed.get((namespace, value.get("name", "")))
                if new:
                    value["name"] = new
            _rename_config_map_references(value, namespace, renamed)
    elif isinstance(node, list):
        for item in node:
            _rename_config_map_references(item, namespace, renamed)


def _field_path(path: str) -> list[str]:
    """`a.b.[x.y/z].0.*` -> ["a", "b", "[x.y/z]", "0", "*"]: a bracket may hold dots."""
    parts, current, depth = [], "", 0
    for char in path:
        if char == "." and depth == 0:
            parts.append(current)
            current = ""
            continue
        depth += {"[": 1, "]": -1}.get(char, 0)
        current += char
    return [*parts, current]


def _children(node: Any, part: str) -> list[tuple[Any, Any]]:
    """(container, key) pairs a field path segment selects in `node`."""
    if part == "*":
        return list(enumerate(node)) if isinstance(node, list) else list(node.items())
    if part.startswith("[") and part.endswith("]"):
        inner = part[1:-1]
        if isinstance(node, list):  # [name=value] selects list items
            field, _, wanted = inner.partition("=")
            return [(i, item) for i, item in enumerate(node) if str(item.get(field)) == wanted]
        part = inner
    if isinstance(node, list):
        return [(int(part), node[int(part)])]
    return [(part, node[part])] if isinstance(node, dict) and part in node else []


def _locate(doc: Any, path: str) -> list[tuple[Any, Any]]:
    """(parent, key) of every field `path` reaches in `doc`."""
    parents: list[tuple[Any, Any]] = [(None, doc)]
    parts = _field_path(path)
    found: list[tuple[Any, Any]] = []
    for depth, part in enumerate(parts):
        following = []
        for _, node in parents:
            for key, child in _children(node, part):
                if depth == len(parts) - 1:
                    found.append((node, key))
                else:
                    following.append((key, child))
        parents = following
    return found


def _replace(resources: list[dict[str, Any]], replacement: dict[str, Any]) -> None:
    source = replacement["source"]
    selector = {k: source[k] for k in ("group", "version", "kind", "name", "namespace") if k in source}
    (origin,) = _select(resources, selector, replacement)
    locations = _locate(origin, source.get("fieldPath", "metadata.name"))
    if len(locations) != 1:
        raise ValueError(f"replacement source {source} selects {len(locations)} fields")
    parent, key = locations[0]
    value = parent[key]
    if "delimiter" in source.get("options", {}):
        value = str(value).split(source["options"]["delimiter"])[source["options"].get("index", 0)]
    for target in replacement["targets"]:
        options = target.get("options", {})
        for doc in _select(resources, target["select"], replacement):
            for field_path in target["fieldPaths"]:
                places = _locate(doc, field_path)
                if not places:
                    raise ValueError(f"replacement target {field_path} not found in {doc['metadata']['name']}")
                for parent, key in places:
                    if "delimiter" in options:
                        pieces = str(parent[key]).split(options["delimiter"])
                        pieces[options.get("index", 0)] = str(value)
                        parent[key] = options["delimiter"].join(pieces)
                    else:
                        parent[key] = copy.deepcopy(value)


def _group_version(doc: dict[str, Any]) -> tuple[str, str]:
    group, _, version = doc["apiVersion"].rpartition("/")
    return group, version


def _matches(doc: dict[str, Any], target: dict[str, Any]) -> bool:
    group, version = _group_version(doc)
    actual = {
        "group": group,
        "version": version,
        "kind": doc["kind"],
        "name": doc["metadata"]["name"],
        "namespace": doc["metadata"].get("namespace"),
    }
    return all(actual[key] == value for key, value in target.items())


def _apply_patch(resources: list[dict[str, Any]], patch: dict[str, Any], directory: Path) -> None:
    text = (directory / patch["path"]).read_text(encoding="utf-8") if "path" in patch else patch["patch"]
    docs = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    target = patch.get("target")
    if len(docs) == 1 and isinstance(docs[0], list):  # JSON 6902
        if not target:
            raise ValueError(f"JSON 6902 patch {patch} needs a target")
        selected = _select(resources, target, patch)
        for doc in selected:
            _json6902(doc, docs[0])
        return
    for patch_doc in docs:  # strategic merge patch(es)
        selector = target or {"kind": patch_doc["kind"], "name": patch_doc["metadata"]["name"]}
        for doc in _select(resources, selector, patch):
            merged = strategic_merge(doc, patch_doc)
            if target:  # the patch's own name must not rename the selected resources
                merged["metadata"]["name"] = doc["metadata"]["name"]
            resources[resources.index(doc)] = merged


def _select(resources: list[dict[str, Any]], target: dict[str, Any], patch: Any) -> list[dict[str, Any]]:
    selected = [doc for doc in resources if _matches(doc, target)]
    if not selected:
        raise ValueError(f"patch {patch} matches no resource")
    return selected


def _is_named_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, dict) and "name" in item for item in value)


def strategic_merge(base: Any, patch: Any) -> Any:
    """Strategic merge as kustomize applies it to the fields deploy/ patches.

    Maps merge recursively (a null deletes a key); lists of named objects (containers, env,
    volumes) merge by `name`; any other list is replaced.
    """
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = strategic_merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    if _is_named_list(base) and _is_named_list(patch) and base and patch:
        merged_list = [copy.deepcopy(item) for item in base]
        positions = {item["name"]: index for index, item in enumerate(merged_list)}
        for item in patch:
            if item["name"] in positions:
                index = positions[item["name"]]
                merged_list[index] = strategic_merge(merged_list[index], item)
            else:
                merged_list.append(copy.deepcopy(item))
        return merged_list
    return copy.deepcopy(patch)


def _json6902(doc: dict[str, Any], operations: list[dict[str, Any]]) -> None:
    for operation in operations:
        keys = [part.replace("~1", "/").replace("~0", "~") for part in operation["path"].split("/")[1:]]
        parent: Any = doc
        for key in keys[:-1]:
            parent = parent[int(key)] if isinstance(parent, list) else parent[key]
        last, kind = keys[-1], operation["op"]
        if isinstance(parent, list):
            _list_op(parent, last, kind, operation.get("value"))
        elif kind in ("add", "replace"):
            if kind == "replace" and last not in parent:
                raise KeyError(f"replace of missing path {operation['path']}")
            parent[last] = copy.deepcopy(operation["value"])
        elif kind == "remove":
            del parent[last]
        else:
            raise ValueError(f"JSON 6902 op {kind!r} is not implemented by this renderer")


def _list_op(parent: list[Any], key: str, kind: str, value: Any) -> None:
    if kind == "add":
        parent.insert(len(parent) if key == "-" else int(key), copy.deepcopy(value))
    elif kind == "replace":
        parent[int(key)] = copy.deepcopy(value)
    elif kind == "remove":
        del parent[int(key)]
    else:
        raise ValueError(f"JSON 6902 op {kind!r} is not implemented by this renderer")


def _split_image(reference: str) -> tuple[str, str | None, str | None]:
    name, _, digest = reference.partition("@")
    tag = None
    head, sep, tail = name.rpartition(":")
    if sep and "/" not in tail:
        name, tag = head, tail
    return name, tag, digest or None


def _new_image(reference: str, images: list[dict[str, Any]]) -> str:
    name, tag, digest = _split_image(reference)
    for image in images:
        if image["name"] != name:
            continue
        name = image.get("newName", name)
        tag = str(image["newTag"]) if "newTag" in image else tag
        digest = image.get("digest", digest)
        break
    if digest:
        return f"{name}@{digest}"
    return f"{name}:{tag}" if tag else name


def _rewrite_images(node: Any, images: list[dict[str, Any]]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    if isinstance(container, dict) and "image" in container:
                        container["image"] = _new_image(container["image"], images)
            _rewrite_images(value, images)
    elif isinstance(node, list):
        for item in node:
            _rewrite_images(item, images)


# --------------------------------------------------------------------------------------------
# Structural checks for the custom resources kubernetes-validate has no schema for
# --------------------------------------------------------------------------------------------

DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DURATION = re.compile(r"^([0-9]+(ms|s|m|h))+$")


def is_crd_object(doc: dict[str, Any]) -> bool:
    return _group_version(doc)[0] in CRD_GROUPS


def check_crd(doc: dict[str, Any]) -> list[str]:
    """Problems found in one custom resource (empty when it looks right)."""
    kind = doc.get("kind")
    name = doc.get("metadata", {}).get("name", "")
    problems = [] if DNS_1123.match(name) else [f"{kind}: bad metadata.name {name!r}"]
    unknown = set(doc) - {"apiVersion", "kind", "metadata", "spec"}
    if unknown:
        problems.append(f"{kind}/{name}: unexpected top-level fields {sorted(unknown)}")
    checker = {
        ("keda.sh/v1alpha1", "ScaledObject"): _check_scaled_object,
        ("keda.sh/v1alpha1", "TriggerAuthentication"): _check_trigger_authentication,
        ("monitoring.coreos.com/v1", "ServiceMonitor"): _check_service_monitor,
        ("monitoring.coreos.com/v1", "PrometheusRule"): _check_prometheus_rule,
    }.get((doc.get("apiVersion"), kind))
    if checker is None:
        return [*problems, f"no structural check for {doc.get('apiVersion')} {kind}"]
    return problems + [f"{kind}/{name}: {problem}" for problem in checker(doc.get("spec") or {})]


def _check_scaled_object(spec: dict[str, Any]) -> Iterator[str]:
    if not isinstance(spec.get("scaleTargetRef", {}).get("name"), str):
        yield "spec.scaleTargetRef.name is required"
    low, high = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    if not (isinstance(low, int) and isinstance(high, int) and 0 <= low <= high):
        yield f"need integers 0 <= minReplicaCount <= maxReplicaCount (got {low}, {high})"
    for field in ("pollingInterval", "cooldownPeriod"):
        if field in spec and not isinstance(spec[field], int):
            yield f"spec.{field} must be an integer"
    triggers = spec.get("triggers")
    if not isinstance(triggers, list) or not triggers:
        yield "spec.triggers must be a non-empty list"
        return
    for index, trigger in enumerate(triggers):
        if not isinstance(trigger.get("type"), str):
            yield f"triggers[{index}].type is required"
        metadata = trigger.get("metadata", {})
        if not all(isinstance(value, str) for value in metadata.values()):
            yield f"triggers[{index}].metadata values must all be strings (KEDA reads map[string]string)"
        auth = trigger.get("authenticationRef")
        if auth is not None and not isinstance(auth.get("name"), str):
            yield f"triggers[{index}].authenticationRef.name is required"


def _check_trigger_authentication(spec: dict[str, Any]) -> Iterator[str]:
    identity = spec.get("podIdentity")
    if identity is None:
        yield "spec.podIdentity is required (this deployment authenticates with pod identity)"
        return
    if identity.get("provider") not in {"aws", "aws-eks", "azure-workload", "gcp", "none"}:
        yield f"unknown podIdentity.provider {identity.get('provider')!r}"
    if identity.get("identityOwner") not in (None, "keda", "workload"):
        yield "podIdentity.identityOwner must be keda or workload"
    if "roleArn" in identity and "identityOwner" in identity:
        yield "podIdentity.roleArn and podIdentity.identityOwner are mutually exclusive"


def _check_prometheus_rule(spec: dict[str, Any]) -> Iterator[str]:
    groups = spec.get("groups")
    if not isinstance(groups, list) or not groups:
        yield "spec.groups must be a non-empty list"
        return
    for g, group in enumerate(groups):
        if not isinstance(group.get("name"), str):
            yield f"groups[{g}].name is required"
        for r, rule in enumerate(group.get("rules") or []):
            if not isinstance(rule.get("expr"), str | int):
                yield f"groups[{g}].rules[{r}].expr is required"
            if ("alert" in rule) == ("record" in rule):
                yield f"groups[{g}].rules[{r}] needs exactly one of alert and record"
            if "for" in rule and not DURATION.match(str(rule["for"])):
                yield f"groups[{g}].rules[{r}].for is not a duration"


def _check_service_monitor(spec: dict[str, Any]) -> Iterator[str]:
    if not isinstance(spec.get("selector", {}).get("matchLabels"), dict):
        yield "spec.selector.matchLabels is required"
    endpoints = spec.get("endpoints")
    if not isinstance(endpoints, list) or not endpoints:
        yield "spec.endpoints must be a non-empty list"
        return
    for index, endpoint in enumerate(endpoints):
        if "port" not in endpoint and "targetPort" not in endpoint:
            yield f"endpoints[{index}] needs port or targetPort"
        if not str(endpoint.get("path", "/metrics")).startswith("/"):
            yield f"endpoints[{index}].path must start with /"
        for field in ("interval", "scrapeTimeout"):
            if field in endpoint and not DURATION.match(str(endpoint[field])):
                yield f"endpoints[{index}].{field} is not a duration"


# --------------------------------------------------------------------------------------------
# Helpers for the tests
# --------------------------------------------------------------------------------------------


def kustomization_dirs() -> list[Path]:
    """Every directory under deploy/ holding a Kustomization (components excluded)."""
    found = []
    for path in sorted(DEPLOY.rglob("kustomization.yaml")):
        if load_yaml_docs(path)[0].get("kind", "Kustomization") == "Kustomization":
            found.append(path.parent)
    return found


@functools.cache
def rendered(relative: str) -> tuple[dict[str, Any], ...]:
    return tuple(render(DEPLOY / relative))


def only(docs: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected exactly one {kind} {name or ''}, found {len(found)}"
    return found[0]


CONFIG_NAME = "rekognition-worker-config"


def worker_config_map(docs: Any) -> dict[str, Any]:
    """The generated ConfigMap of the worker's settings: its name carries the hash of its data."""
    found = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith(f"{CONFIG_NAME}-")]
    assert len(found) == 1, [d["metadata"]["name"] for d in found]
    assert found[0]["metadata"]["name"] == f"{CONFIG_NAME}-{config_map_hash(found[0])}"
    return found[0]


def config(overlay: str) -> dict[str, str]:
    return worker_config_map(rendered(f"overlays/{overlay}"))["data"]


def pod_specs(docs: tuple[dict[str, Any], ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]


def all_renders() -> dict[str, tuple[dict[str, Any], ...]]:
    return {str(d.relative_to(DEPLOY)): rendered(str(d.relative_to(DEPLOY))) for d in kustomization_dirs()}


def env_var(container: dict[str, Any], name: str) -> dict[str, Any]:
    matches = [e for e in container.get("env", []) if e["name"] == name]
    assert len(matches) == 1, f"{container['name']}: env {name} defined {len(matches)} times"
    return matches[0]


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return [shutil.which("kustomize") or "kustomize", "build"]
    for candidate in (ROOT / ".venv" / "bin" / "kubectl", shutil.which("kubectl")):
        if candidate and Path(candidate).is_file():
            return [str(candidate), "kustomize"]
    return None


def _sorted_docs(docs: Any) -> list[dict[str, Any]]:
    return sorted(docs, key=lambda d: (d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]))


# --------------------------------------------------------------------------------------------
# Tests: kustomize structure
# --------------------------------------------------------------------------------------------


def test_every_file_in_deploy_parses() -> None:
    yaml_files = sorted(DEPLOY.rglob("*.y*ml"))
    assert yaml_files, "deploy/ has no YAML"
    for path in yaml_files:
        if path.name == "alerts-test.yaml":  # promtool's unit tests of the alerts, not a Kubernetes object
            assert {"rule_files", "tests"} <= set(yaml.safe_load(path.read_text(encoding="utf-8"))), path
            continue
        for doc in load_yaml_docs(path):
            if isinstance(doc, list):  # a JSON 6902 patch
                assert all({"op", "path"} <= set(op) for op in doc), path
            else:
                assert {"apiVersion", "kind"} <= set(doc), f"{path}: object without apiVersion/kind"
    for path in sorted(DEPLOY.rglob("*.json")):
        json.loads(path.read_text(encoding="utf-8"))


def test_every_kustomization_renders_unique_named_objects() -> None:
    expected = {"."} | {f"{where}/{o}" for o in OVERLAYS for where in ("overlays", "argocd")}
    expected |= {f"overlays/{o}/{job}" for o in OVERLAYS for job in ("migrate", "backfill")}
    renders = all_renders()
    assert expected <= set(renders), sorted(renders)
    for where, docs in renders.items():
        assert docs, f"{where} renders nothing"
        keys = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
        assert len(keys) == len(set(keys)), f"{where}: duplicate objects"
        for doc in docs:
            assert DNS_1123.match(doc["metadata"]["name"]), f"{where}: bad name {doc['metadata']['name']}"


def test_default_kustomization_is_the_staging_overlay() -> None:
    assert _sorted_docs(rendered(".")) == _sorted_docs(rendered("overlays/staging"))


def test_overlays_set_namespace_and_pinned_image_everywhere() -> None:
    for overlay in OVERLAYS:
        images = set()
        for where in (f"overlays/{overlay}", f"overlays/{overlay}/migrate", f"overlays/{overlay}/backfill"):
            docs = rendered(where)
            namespaces = {d["metadata"].get("namespace") for d in docs}
            assert len(namespaces) == 1 and None not in namespaces, f"{where}: namespaces {namespaces}"
            for name, spec in pod_specs(docs):
                for container in spec["containers"]:
                    images.add(container["image"])
                    _, tag, digest = _split_image(container["image"])
                    assert digest or (tag and tag != "latest"), f"{where} {name}: unpinned image"
        assert len(images) == 1, f"{overlay}: worker, migrate and backfill must run one image, got {images}"


def test_python_renderer_agrees_with_kustomize() -> None:
    import pytest

    command = kustomize_command()
    if command is None:
        pytest.skip("no kustomize or kubectl binary on this machine")
    for directory in kustomization_dirs():
        result = subprocess.run([*command, str(directory)], capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        theirs = [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]
        ours = render(directory)
        assert _sorted_docs(ours) == _sorted_docs(theirs), f"renderers disagree on {directory}"


# --------------------------------------------------------------------------------------------
# Tests: workloads
# --------------------------------------------------------------------------------------------


def test_every_pod_is_locked_down() -> None:
    for where, docs in all_renders().items():
        for name, spec in pod_specs(docs):
            label = f"{where} {name}"
            pod = spec["securityContext"]
            assert pod["runAsNonRoot"] is True and pod["runAsUser"] == UID, label
            assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, label
            assert spec.get("automountServiceAccountToken") is False, label
            volumes = {v["name"]: v for v in spec["volumes"]}
            for container in spec["containers"]:
                ctx = container["securityContext"]
                assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == UID, label
                assert ctx["readOnlyRootFilesystem"] is True, label
                assert ctx["allowPrivilegeEscalation"] is False, label
                assert ctx.get("privileged", False) is False, label
                assert ctx["capabilities"] == {"drop": ["ALL"]}, label
                assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, label
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                assert "emptyDir" in volumes[mounts["/tmp"]], f"{label}: /tmp must be an emptyDir"
                if container.get("args", ["run"])[0] in ("run", "backfill"):
                    # Pages cross to the decoding process in /dev/shm: memory-backed and bounded.
                    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
                    assert shm["medium"] == "Memory" and "sizeLimit" in shm, label
                assert {"requests", "limits"} <= set(container["resources"]), label
                for part in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(container["resources"][part]), label
                assert container["command"] == ["python", "-m", "worker"], label


def test_worker_deployment() -> None:
    for overlay in OVERLAYS:
        docs = rendered(f"overlays/{overlay}")
        settings = config(overlay)
        deployment = only(docs, "Deployment", "rekognition-worker")
        spec = deployment["spec"]
        pod = spec["template"]["spec"]
        (container,) = pod["containers"]
        assert "replicas" not in spec, "KEDA owns the replica count"
        assert spec["strategy"] == {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
        }
        assert container["args"] == ["run"]
        assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert {"name": "metrics", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
        assert int(settings["HEALTH_PORT"]) == 8080
        assert container["resources"] == {
            "requests": {"cpu": "500m", "memory": "512Mi"},
            "limits": {"cpu": "2", "memory": "1Gi"},
        }
        grace = float(settings["SHUTDOWN_GRACE_S"])
        assert pod["terminationGracePeriodSeconds"] >= grace + 10, "grace period must outlast SHUTDOWN_GRACE_S"
        assert float(settings["HEARTBEAT_INTERVAL_S"]) < float(settings["VISIBILITY_TIMEOUT_S"])
        assert pod["serviceAccountName"] == only(docs, "ServiceAccount")["metadata"]["name"]
        env_from = [e["configMapRef"]["name"] for e in container["envFrom"]]
        assert env_from == [worker_config_map(docs)["metadata"]["name"]]
        database_url = env_var(container, "DATABASE_URL")["valueFrom"]["secretKeyRef"]
        assert database_url == {"name": SECRET_NAME, "key": "DATABASE_URL"}


def test_service_account_uses_irsa() -> None:
    base = only(rendered("base"), "ServiceAccount")
    assert base["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == (
        "arn:aws:iam::123456789012:role/REPLACE_ME"
    )
    for overlay in OVERLAYS:
        account = only(rendered(f"overlays/{overlay}"), "ServiceAccount")
        arn = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
        assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@/-]+", arn), arn


def test_keda_scales_on_the_queue_within_the_rekognition_budget() -> None:
    for overlay in OVERLAYS:
        docs = rendered(f"overlays/{overlay}")
        settings = config(overlay)
        scaled = only(docs, "ScaledObject")["spec"]
        assert scaled["scaleTargetRef"]["name"] == only(docs, "Deployment")["metadata"]["name"]
        (trigger,) = scaled["triggers"]
        assert trigger["type"] == "aws-sqs-queue"
        meta = trigger["metadata"]
        assert int(meta["queueLength"]) == int(settings["MAX_CONCURRENT_JOBS"]), overlay
        assert meta["scaleOnInFlight"] == "true"
        # One place for the queue URL: KEDA reads the container's QUEUE_URL (from the ConfigMap).
        assert meta["queueURLFromEnv"] == "QUEUE_URL" and "queueURL" not in meta, overlay
        (container,) = only(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
        assert {"configMapRef": {"name": worker_config_map(docs)["metadata"]["name"]}} in container["envFrom"]
        assert settings["QUEUE_URL"].startswith("https://sqs."), overlay
        assert meta["awsRegion"] == settings["AWS_REGION"], overlay
        fallback = scaled["fallback"]
        assert fallback["failureThreshold"] >= 1 and 1 <= fallback["replicas"] <= scaled["maxReplicaCount"], overlay
        auth = only(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
        assert auth["spec"]["podIdentity"]["provider"] == "aws"
        low, high = scaled["minReplicaCount"], scaled["maxReplicaCount"]
        assert 1 <= low <= high, overlay
        tps = float(settings["REKOGNITION_TPS"])
        scope = settings["RATE_LIMIT_SCOPE"]
        assert scope in ("process", "fleet")
        fleet_calls_per_s = tps * high if scope == "process" else tps
        assert fleet_calls_per_s <= ASSUMED_GET_TPS_QUOTA, f"{overlay}: Get* budget {fleet_calls_per_s}/s"


def test_migration_job_runs_migrate_with_only_the_database_secret() -> None:
    for overlay in OVERLAYS:
        job = only(rendered(f"overlays/{overlay}/migrate"), "Job")
        pod = job["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["args"] == ["migrate"]
        assert pod["restartPolicy"] == "Never"
        assert "serviceAccountName" not in pod, "migrate must not depend on the worker's ServiceAccount"
        assert "envFrom" not in container, "migrate must run before the worker's ConfigMap exists"
        # DDL runs as the migration role; the worker's own secret holds the DML-only role.
        secret = env_var(container, "DATABASE_URL")["valueFrom"]["secretKeyRef"]
        assert secret == {"name": MIGRATOR_SECRET_NAME, "key": "DATABASE_URL"}
        assert job["metadata"]["annotations"]["argocd.argoproj.io/hook"] == "PreSync"


def test_backfill_job_reads_the_file_from_a_read_only_configmap() -> None:
    for overlay in OVERLAYS:
        job = only(rendered(f"overlays/{overlay}/backfill"), "Job")
        pod = job["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["args"] == ["backfill", "--from-file", "/jobs/jobs.txt"]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/jobs"]
        assert mount["readOnly"] is True
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["configMap"]["items"] == [{"key": "jobs.txt", "path": "jobs.txt"}]
        assert pod["serviceAccountName"] == "rekognition-worker"
        # The worker's settings: the very ConfigMap the worker overlay renders (same name, same data), so
        # applying the backfill changes nothing the worker runs with.
        config_map = worker_config_map(rendered(f"overlays/{overlay}/backfill"))
        assert config_map == worker_config_map(rendered(f"overlays/{overlay}"))
        assert container["envFrom"] == [{"configMapRef": {"name": config_map["metadata"]["name"]}}]


MONITORING_GROUP = "monitoring.coreos.com"


def _groups(docs: Any) -> set[str]:
    return {_group_version(doc)[0] for doc in docs}


def _copy_of_deploy(tmp_path: Path) -> Path:
    copy_root = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy_root)
    return copy_root


def _set_env_value(path: Path, name: str, value: str) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert any(line.startswith(f"{name}=") for line in lines), (path, name)
    path.write_text("\n".join(f"{name}={value}" if line.startswith(f"{name}=") else line for line in lines) + "\n",
                    encoding="utf-8")


def test_the_base_applies_on_a_cluster_with_only_keda() -> None:
    docs = rendered("base")
    assert MONITORING_GROUP not in _groups(docs)
    assert _groups(docs) - {"", "apps", "policy", "networking.k8s.io"} == {"keda.sh"}
    assert (DEPLOY / "base" / "servicemonitor.yaml").exists() is False


def test_the_monitoring_component_adds_the_service_monitor_rules_and_dashboard(tmp_path: Path) -> None:
    (component,) = load_yaml_docs(DEPLOY / "monitoring" / "kustomization.yaml")
    assert (component["apiVersion"], component["kind"]) == ("kustomize.config.k8s.io/v1alpha1", "Component")
    # The base plus the component alone: it adds exactly the monitoring objects.
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [str(DEPLOY / "base")], "components": [str(DEPLOY / "monitoring")]}))
    added = {(d["kind"], d["metadata"]["name"]) for d in render(tmp_path)} - {
        (d["kind"], d["metadata"]["name"]) for d in rendered("base")}
    assert added == {("ServiceMonitor", "rekognition-worker"), ("PrometheusRule", "rekognition-worker"),
                     ("ConfigMap", "rekognition-worker-dashboard")}
    for overlay in OVERLAYS:  # both overlays opt in, in their own namespace
        docs = rendered(f"overlays/{overlay}")
        assert MONITORING_GROUP in _groups(docs)
        dashboard = only(docs, "ConfigMap", "rekognition-worker-dashboard")
        assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(dashboard["data"]["rekognition-worker.json"]) == json.loads(
            (DEPLOY / "monitoring" / "grafana-dashboard.json").read_text(encoding="utf-8"))
        assert not any(d["metadata"].get("annotations", {}).get(_LOCAL_CONFIG) for d in docs)
        assert len({d["metadata"].get("namespace") for d in docs}) == 1


def test_a_settings_change_renames_the_config_map_and_rolls_the_pods(tmp_path: Path) -> None:
    copy_root = _copy_of_deploy(tmp_path)
    before = render(copy_root / "overlays" / "staging")
    _set_env_value(copy_root / "overlays" / "staging" / "settings" / "worker.env", "LOG_LEVEL", "warning")
    after = render(copy_root / "overlays" / "staging")
    old, new = worker_config_map(before), worker_config_map(after)
    assert new["data"]["LOG_LEVEL"] == "warning" and new["metadata"]["name"] != old["metadata"]["name"]

    def pod_template(docs: Any) -> dict[str, Any]:
        return only(docs, "Deployment")["spec"]["template"]

    # A new pod template is what makes the Deployment roll.
    assert pod_template(after) != pod_template(before)
    assert pod_template(after)["spec"]["containers"][0]["envFrom"] == [
        {"configMapRef": {"name": new["metadata"]["name"]}}]
    # The backfill Job follows the same change.
    assert worker_config_map(render(copy_root / "overlays" / "staging" / "backfill")) == new


def test_keda_queue_length_and_region_come_from_the_settings(tmp_path: Path) -> None:
    copy_root = _copy_of_deploy(tmp_path)
    settings = copy_root / "overlays" / "production" / "settings" / "worker.env"
    _set_env_value(settings, "MAX_CONCURRENT_JOBS", "7")
    _set_env_value(settings, "AWS_REGION", "eu-west-1")
    docs = render(copy_root / "overlays" / "production")
    metadata = only(docs, "ScaledObject")["spec"]["triggers"][0]["metadata"]
    assert (metadata["queueLength"], metadata["awsRegion"]) == ("7", "eu-west-1")
    assert worker_config_map(docs)["data"]["MAX_CONCURRENT_JOBS"] == "7"
    # Nothing else repeats the value: it is written in one place per environment.
    written = json.dumps([load_yaml_docs(p) for p in (copy_root / "overlays" / "production").rglob("*.yaml")])
    assert "queueLength" not in written and "awsRegion" not in written


def test_every_alert_takes_its_runbook_url_from_the_one_setting(tmp_path: Path) -> None:
    copy_root = _copy_of_deploy(tmp_path)
    kustomization = copy_root / "monitoring" / "kustomization.yaml"
    text = kustomization.read_text(encoding="utf-8")
    old = "url=https://github.com/REPLACE_ME/rekognition-ingest-worker/blob/main/docs/runbook.md"
    assert old in text
    kustomization.write_text(text.replace(old, "url=https://wiki.example.org/ops/rekognition"), encoding="utf-8")
    for overlay in OVERLAYS:
        rule = only(render(copy_root / "overlays" / overlay), "PrometheusRule")
        urls = [r["annotations"]["runbook_url"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
        assert len(urls) >= 10
        assert all(re.fullmatch(r"https://wiki\.example\.org/ops/rekognition#[a-z0-9-]+", url) for url in urls), urls


def test_the_migrate_job_is_reachable_from_every_overlay() -> None:
    for overlay in OVERLAYS:
        # kubectl: its own kustomization beside the overlay; Argo CD: argocd/<env> = the overlay + the Job.
        job = only(rendered(f"overlays/{overlay}/migrate"), "Job")
        argo = rendered(f"argocd/{overlay}")
        assert only(argo, "Job") == job
        assert job["metadata"]["annotations"]["argocd.argoproj.io/hook"] == "PreSync"
        assert _sorted_docs([d for d in argo if d["kind"] != "Job"]) == _sorted_docs(rendered(f"overlays/{overlay}"))


def test_disruption_budget_network_policy_and_monitoring() -> None:
    for overlay in OVERLAYS:
        docs = rendered(f"overlays/{overlay}")
        pod_labels = only(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
        pdb = only(docs, "PodDisruptionBudget")["spec"]
        assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
        assert "minAvailable" not in pdb, "minAvailable would block drains of a single replica"

        policy = only(docs, "NetworkPolicy")["spec"]
        assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
        assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
        open_egress = {(p["protocol"], p["port"]) for rule in policy["egress"] if "to" not in rule
                       for p in rule["ports"]}
        assert open_egress == {("UDP", 53), ("TCP", 53), ("TCP", 443), ("TCP", 5432)}
        # Port 80 only to the EKS Pod Identity agent's link-local addresses, never to instance metadata.
        (agent,) = [rule for rule in policy["egress"] if "to" in rule]
        assert agent["ports"] == [{"protocol": "TCP", "port": 80}]
        assert sorted(peer["ipBlock"]["cidr"] for peer in agent["to"]) == ["169.254.170.23/32", "fd00:ec2::23/128"]
        (ingress,) = policy["ingress"]
        assert ingress["ports"] == [{"protocol": "TCP", "port": 8080}]
        assert ingress["from"] == [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        ]

        service = only(docs, "Service")
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert service["spec"]["ports"] == [
            {"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}
        ]
        monitor = only(docs, "ServiceMonitor")["spec"]
        assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert [(e["port"], e["path"]) for e in monitor["endpoints"]] == [("metrics", "/metrics")]


def test_custom_resources_are_structurally_valid() -> None:
    seen = set()
    for where, docs in all_renders().items():
        for doc in docs:
            if is_crd_object(doc):
                seen.add(doc["kind"])
                assert check_crd(doc) == [], where
    assert seen == {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"}
    broken = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "x"}, "spec": {}}
    assert check_crd(broken), "the structural check must reject an empty ScaledObject"


# --------------------------------------------------------------------------------------------
# Tests: secrets and IAM
# --------------------------------------------------------------------------------------------

SECRETISH_ENV = re.compile(r"PASSWORD|SECRET|TOKEN|CREDENTIAL|DATABASE_URL|ACCESS_KEY", re.IGNORECASE)
URL_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^@\s/]+@", re.IGNORECASE)
AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def test_no_secrets_in_manifests() -> None:
    for path in sorted([*DEPLOY.rglob("*.y*ml"), *DEPLOY.rglob("*.json")]):
        text = path.read_text(encoding="utf-8")
        assert not URL_WITH_PASSWORD.search(text), f"{path}: URL with credentials"
        assert not AWS_KEY_ID.search(text), f"{path}: AWS access key id"
    for where, docs in all_renders().items():
        for doc in docs:
            assert doc["kind"] != "Secret", f"{where}: Secrets are created by the operator, not shipped"
            if doc["kind"] == "ConfigMap":
                assert not any(SECRETISH_ENV.search(key) for key in doc.get("data", {})), where
            for node in _walk(doc):
                if "name" in node and "value" in node and SECRETISH_ENV.search(str(node["name"])):
                    raise AssertionError(f"{where}: literal value for {node['name']}")


def _statements(name: str) -> list[dict[str, Any]]:
    policy = json.loads((DEPLOY / name).read_text(encoding="utf-8"))
    assert policy["Version"] == "2012-10-17"
    assert all(s["Effect"] == "Allow" for s in policy["Statement"])
    return policy["Statement"]


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def test_worker_iam_policy_is_least_privilege() -> None:
    granted: dict[str, set[str]] = {}
    for statement in _statements("iam-policy.json"):
        assert "NotAction" not in statement and "NotResource" not in statement
        for action in _as_list(statement["Action"]):
            granted.setdefault(action, set()).update(_as_list(statement["Resource"]))
    assert set(granted) == {
        "rekognition:GetFaceDetection",
        "rekognition:GetFaceSearch",
        "rekognition:StartFaceDetection",
        "rekognition:StartFaceSearch",
        "iam:PassRole",
        "s3:GetObject",
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:ChangeMessageVisibility",
        "sqs:GetQueueAttributes",
        "sqs:SendMessage",
        "sqs:GetQueueUrl",
        "sns:Publish",
        "events:PutEvents",
    }
    for action, resources in granted.items():
        if action == "rekognition:StartFaceSearch":  # only the collections the deployment searches
            assert resources == {"arn:aws:rekognition:REGION:ACCOUNT:collection/COLLECTION"}
        elif action.startswith("rekognition:"):
            # StartFaceDetection, GetFaceDetection and GetFaceSearch take no resource (AWS's Service
            # Authorization Reference): "*" is the only value that works.
            assert resources == {"*"}, action
        elif action == "iam:PassRole":  # only the role of the jobs' NotificationChannel, only to Rekognition
            assert resources == {"arn:aws:iam::ACCOUNT:role/REKOGNITION_SNS_ROLE"}
        elif action == "s3:GetObject":  # Rekognition reads the videos with the caller's rights
            assert resources == {"arn:aws:s3:::VIDEO_BUCKET/*"}
        elif action == "sqs:GetQueueAttributes":  # the queue and the depth of its dead-letter queue
            assert resources == {"arn:aws:sqs:REGION:ACCOUNT:QUEUE", "arn:aws:sqs:REGION:ACCOUNT:QUEUE-dlq"}
        elif action == "sqs:GetQueueUrl":  # the redrive policy names the dead-letter queue by ARN
            assert resources == {"arn:aws:sqs:REGION:ACCOUNT:QUEUE-dlq"}
        elif action == "sns:Publish":  # job events: EVENTS_SNS_TOPIC_ARN only
            assert resources == {"arn:aws:sns:REGION:ACCOUNT:EVENTS_TOPIC"}
        elif action == "events:PutEvents":  # job events: EVENTS_EVENT_BUS_NAME only
            assert resources == {"arn:aws:events:REGION:ACCOUNT:event-bus/EVENTS_BUS"}
        else:
            assert resources == {"arn:aws:sqs:REGION:ACCOUNT:QUEUE"}, action


def test_keda_iam_policy_only_reads_queue_attributes() -> None:
    (statement,) = _statements("keda-iam-policy.json")
    assert _as_list(statement["Action"]) == ["sqs:GetQueueAttributes"]
    assert _as_list(statement["Resource"]) == ["arn:aws:sqs:REGION:ACCOUNT:QUEUE"]


# --------------------------------------------------------------------------------------------
# Tests: image
# --------------------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    logical = re.sub(r"\\\n", " ", text)
    instructions = []
    for line in logical.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_is_multi_stage_pinned_and_non_root() -> None:
    instructions = _dockerfile_instructions()
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert len(froms) >= 2 and any(f.lower().endswith(" as builder") for f in froms)
    for image in froms:
        assert re.match(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?( |$)", image), image
    final_stage = instructions[max(i for i, (k, _) in enumerate(instructions) if k == "FROM") :]
    users = [rest for keyword, rest in final_stage if keyword == "USER"]
    assert users, "the runtime stage needs a USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric, non-root UID"
    assert int(uid) == UID
    directives = dict((k, rest) for k, rest in final_stage if k in ("ENTRYPOINT", "CMD", "EXPOSE"))
    assert json.loads(directives["ENTRYPOINT"]) == ["python", "-m", "worker"]
    assert json.loads(directives["CMD"]) == ["run"]
    assert directives["EXPOSE"] == "8080"
    runs = " ".join(rest for keyword, rest in final_stage if keyword == "RUN")
    assert "--require-hashes" in runs and "--no-index" in runs and "--no-deps" in runs
    assert not re.search(r"apt-get install[^&]*\b(gcc|build-essential)\b", runs), "no compilers at run time"
    envs = " ".join(rest for keyword, rest in final_stage if keyword == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in envs
    # The migrations travel inside the wheel: the runtime stage copies no source files at all.
    copies = [rest for keyword, rest in final_stage if keyword == "COPY"]
    assert copies == [], copies


def _dockerignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        bare = pattern[3:] if pattern.startswith("**/") else pattern
        if fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], bare):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_context_small() -> None:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    for path in (".venv", ".git", "tests", "bench", ".pytest_cache", "worker/__pycache__", ".env"):
        assert _dockerignored(path, patterns), f"{path} would be sent to the builder"
    for path in ("worker", "migrations", "pyproject.toml", "README.md", "requirements.lock"):
        assert not _dockerignored(path, patterns), f"{path} is needed by the Dockerfile"


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_requirements_lock_pins_every_runtime_dependency_with_hashes() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lock = (ROOT / "requirements.lock").read_text(encoding="utf-8")
    entries = re.split(r"\n(?=[A-Za-z0-9])", lock)
    pinned = {}
    for entry in entries:
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", entry)
        if match:
            assert "--hash=sha256:" in entry, f"{match.group(1)} has no hash"
            pinned[_normalize(match.group(1))] = match.group(2)
        else:
            assert entry.lstrip().startswith("#") or not entry.strip(), f"unexpected lock line {entry[:60]!r}"
    assert "--index-url" not in lock and "--find-links" not in lock and "-e " not in lock
    for dependency in project["dependencies"]:
        name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", dependency)
        assert name and _normalize(name.group(0)) in pinned, f"{dependency} is not in requirements.lock"


def test_deploy_readme_documents_operations() -> None:
    text = (DEPLOY / "README.md").read_text(encoding="utf-8")
    for needle in (
        "create secret generic rekognition-worker-db",
        "kubectl apply -k deploy/overlays/",
        "overlays/production/migrate",
        "queueLength",
        "MAX_CONCURRENT_JOBS",
        "REKOGNITION_TPS",
        "benchmark",
        "7 days",
        "dead-letter",
    ):
        assert needle in text, f"deploy/README.md does not mention {needle!r}"


# --------------------------------------------------------------------------------------------
# Command line for scripts/lint-deploy.sh
# --------------------------------------------------------------------------------------------


def _main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "render":
        yaml.safe_dump_all(render(Path(argv[1])), sys.stdout, sort_keys=False)
        return 0
    if len(argv) == 3 and argv[0] == "split":
        docs = [doc for doc in load_yaml_docs(Path(argv[1])) if isinstance(doc, dict)]
        out = Path(argv[2])
        out.mkdir(parents=True, exist_ok=True)
        for name, keep in (("builtin.yaml", False), ("crds.yaml", True)):
            selected = [doc for doc in docs if is_crd_object(doc) == keep]
            (out / name).write_text(yaml.safe_dump_all(selected, sort_keys=False), encoding="utf-8")
        return 0
    if len(argv) >= 2 and argv[0] == "check-crds":
        problems = [
            f"{path}: {problem}"
            for path in argv[1:]
            for doc in load_yaml_docs(Path(path))
            if is_crd_object(doc)
            for problem in check_crd(doc)
        ]
        print("\n".join(problems) if problems else "custom resources: structure OK")
        return 1 if problems else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
