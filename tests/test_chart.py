"""The Helm chart, the Ray cluster launcher config and the image's health probe, checked offline.

The chart is rendered by the real Helm engine (helm-python-sdk) with the default values, the value files
under charts/lloco/ci/, and a matrix of operator overrides given as `--set` expressions (parsed by Helm's
own parser). Core resources are validated by kubernetes-validate, KubeRay resources by the
openAPIV3Schema of the KubeRay CRDs (with unknown fields refused, because the API server would silently
prune them) and by the checks the KubeRay operator makes at reconcile time, the Serve config by Ray
Serve's own schema, and the settings the pods read by lloco's own Settings class. A change of settings
(limits, engine, LoRA slots, jobs, model) must leave the RayService's rayClusterConfig as it was, so
KubeRay applies it to the running cluster.
"""

from __future__ import annotations

import base64
import copy
import gzip
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "lloco"
CLUSTER_YAML = REPO / "cluster.yaml"
KUBERAY_SCHEMAS = REPO / "tests" / "data" / "kuberay"  # vendored v1 schemas (scripts/vendor-kuberay-crds)
KUBE_VERSION = "1.35.0"
RELEASE, NAMESPACE = "demo", "lloco"
VALUE_FILES = {
    "default": None,
    "cpu": CHART / "ci" / "cpu-values.yaml",
    "gpu-autoscaling": CHART / "ci" / "gpu-autoscaling-values.yaml",
    "operator": CHART / "ci" / "operator-values.yaml",
}
KUBERAY_KINDS = {
    "RayService": "rayservices",
    "RayJob": "rayjobs",
    "RayCronJob": "raycronjobs",
    "RayCluster": "rayclusters",
}
EXPECTED_KINDS = {
    "default": [
        "ConfigMap",
        "NetworkPolicy",
        "Pod",
        "PodDisruptionBudget",
        "PodDisruptionBudget",
        "RayService",
        "Secret",
        "Service",
        "ServiceAccount",
    ],
    "cpu": [
        "ConfigMap",
        "NetworkPolicy",
        "Pod",
        "PodDisruptionBudget",
        "RayJob",
        "RayService",
        "Service",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    ],
    "gpu-autoscaling": [
        "ConfigMap",
        "NetworkPolicy",
        "Pod",
        "PodDisruptionBudget",
        "PodDisruptionBudget",
        "RayCronJob",
        "RayJob",
        "RayService",
        "Secret",
        "Service",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    ],
    "operator": [
        "ConfigMap",
        "ConfigMap",
        "NetworkPolicy",
        "Pod",
        "PodDisruptionBudget",
        "PodDisruptionBudget",
        "PrometheusRule",
        "RayCluster",
        "RayService",
        "Service",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    ],
}
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def load_values(name: str) -> dict[str, Any]:
    path = VALUE_FILES[name]
    return yaml.safe_load(path.read_text()) if path else {}


def render(values: dict[str, Any], release: str = RELEASE) -> list[dict[str, Any]]:
    """Every manifest the chart renders, parsed, NOTES.txt left out."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=release, namespace=NAMESPACE)
    return [
        doc
        for path, text in sorted(manifests.items())
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


@pytest.fixture(scope="module", params=list(VALUE_FILES))
def case(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """(value file name, its values, the rendered manifests)."""
    values = load_values(request.param)
    return request.param, values, render(values)


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def ray_job_specs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The RayJob specs, whether a RayJob's or a RayCronJob's job template."""
    return [d["spec"] for d in of_kind(docs, "RayJob")] + [
        d["spec"]["jobTemplate"] for d in of_kind(docs, "RayCronJob")
    ]


def ray_cluster_specs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every Ray cluster: the RayService's, the jobs cluster's, the RayJobs'."""
    clusters = [d["spec"]["rayClusterConfig"] for d in of_kind(docs, "RayService")]
    clusters += [d["spec"] for d in of_kind(docs, "RayCluster")]
    return clusters + [spec["rayClusterSpec"] for spec in ray_job_specs(docs)]


def pod_templates(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod template) of every head and worker group of every Ray cluster."""
    for index, cluster in enumerate(ray_cluster_specs(docs)):
        yield f"cluster{index}.head", cluster["headGroupSpec"]["template"]
        for group in cluster.get("workerGroupSpecs", []):
            yield f"cluster{index}.{group['groupName']}", group["template"]


def serve_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (service,) = of_kind(docs, "RayService")
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def settings_file(docs: list[dict[str, Any]]) -> str:
    """The settings file every Ray pod mounts (the settings ConfigMap's settings.yaml)."""
    (config_map,) = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-settings")]
    return config_map["data"]["settings.yaml"]


def rendered(expression: str) -> list[dict[str, Any]]:
    """The chart rendered as `helm template --set EXPRESSION` would (Helm's own --set parser)."""
    return render(helm.parse_set_string(expression))


def merged_worker_groups(values: dict[str, Any], groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Worker groups as the chart documents them: `workerDefaults`, each group's fields put over it, a
    name from the index when there is none."""
    merged = []
    for index, group in enumerate(groups):
        fields = {**copy.deepcopy(values["workerDefaults"]), **group}
        fields.setdefault("name", f"{'gpu' if fields['gpus'] > 0 else 'cpu'}-{index}")
        merged.append(fields)
    return merged


# ---------------------------------------------------------------- rendering, lint, schemas


def test_lint_strict_passes(case: tuple[str, dict[str, Any], list[dict[str, Any]]]) -> None:
    _, values, _ = case
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["total_charts_linted"] == 1
    assert not problems and not report["errors"], problems or report["errors"]


def test_renders_the_expected_resources(case: tuple[str, dict[str, Any], list[dict[str, Any]]]) -> None:
    name, _, docs = case
    assert sorted(doc["kind"] for doc in docs) == EXPECTED_KINDS[name]
    for doc in docs:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["helm.sh/chart"] == "lloco-0.1.0"


def validate_against_kubernetes(docs: list[dict[str, Any]]) -> None:
    """Core resources, and the Ray pod template of every group of every cluster, as Kubernetes 1.35 sees
    them (kubernetes-validate, unknown fields refused)."""
    core = [doc for doc in docs if not doc["apiVersion"].startswith(("ray.io/", "monitoring.coreos.com/"))]
    assert core
    for doc in core:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    for where, template in pod_templates(docs):
        pod_template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": where.replace(".", "-")},
        }
        kubernetes_validate.validate({**pod_template, "template": template}, KUBE_VERSION, strict=True)


def test_core_resources_pass_kubernetes_validate(
    case: tuple[str, dict[str, Any], list[dict[str, Any]]],
) -> None:
    _, _, docs = case
    validate_against_kubernetes(docs)


def _refuse_unknown_fields(schema: Any) -> Any:
    """The API server prunes fields a structural schema does not name; here they are errors instead."""
    if isinstance(schema, dict):
        schema = {key: _refuse_unknown_fields(value) for key, value in schema.items()}
        if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        if schema.pop("nullable", False) and "type" in schema:
            schema["type"] = [schema["type"], "null"]
        return schema
    if isinstance(schema, list):
        return [_refuse_unknown_fields(item) for item in schema]
    return schema


@pytest.fixture(scope="module")
def kuberay_validators() -> dict[str, jsonschema.Draft7Validator]:
    validators = {}
    for kind, plural in KUBERAY_KINDS.items():
        with gzip.open(KUBERAY_SCHEMAS / f"ray.io_{plural}.v1.json.gz", "rt", encoding="utf-8") as file:
            schema = _refuse_unknown_fields(json.load(file))
        validators[kind] = jsonschema.Draft7Validator(schema)
    return validators


def crd_errors(docs: list[dict[str, Any]], validators: dict[str, Any]) -> list[str]:
    """What the KubeRay CRD schemas (v1.7.0, vendored) refuse in the rendered ray.io resources."""
    resources = [doc for doc in docs if doc["apiVersion"] == "ray.io/v1"]
    assert of_kind(resources, "RayService")
    return [
        f"{doc['kind']} {doc['metadata']['name']}: {'/'.join(map(str, e.absolute_path))}: {e.message}"
        for doc in resources
        for e in validators[doc["kind"]].iter_errors(doc)
    ]


def test_kuberay_resources_match_the_crds(
    case: tuple[str, dict[str, Any], list[dict[str, Any]]], kuberay_validators: dict[str, Any]
) -> None:
    _, _, docs = case
    errors = crd_errors(docs, kuberay_validators)
    assert not errors, errors[:5]


def test_every_ray_pod_comes_from_the_shared_template(
    case: tuple[str, dict[str, Any], list[dict[str, Any]]],
) -> None:
    _, values, docs = case
    with helm.Chart.load(CHART) as chart:
        merged = chart.merge_values(values)
    templates = list(pod_templates(docs))
    clusters = ray_cluster_specs(docs)
    assert len(templates) == len(clusters) + sum(len(c.get("workerGroupSpecs", [])) for c in clusters)
    for where, template in templates:
        (container,) = template["spec"]["containers"]
        role = "head" if where.endswith(".head") else "worker"
        assert container["name"] == f"ray-{role}", where
        assert template["spec"]["serviceAccountName"] == "demo-lloco"
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True
        assert {"name": "cache", "mountPath": "/cache"} in container["volumeMounts"]
        assert {"name": "settings", "mountPath": "/etc/lloco/config", "readOnly": True} in container[
            "volumeMounts"
        ]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["LLOCO_CONFIG"] == "/etc/lloco/config/settings.yaml" and env["HF_HUB_OFFLINE"] == "1"
        # the settings are in the file, never in a pod's spec (that is what keeps upgrades in place)
        assert not [name for name in env if name.startswith("LLOCO_") and name not in POD_ENV_SETTINGS], where
    (service,) = of_kind(docs, "RayService")
    expected = merged_worker_groups(merged, merged["workerGroups"])
    groups = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == [g["name"] for g in expected]
    for group, want in zip(groups, expected, strict=True):
        spec = group["template"]["spec"]
        limits = spec["containers"][0]["resources"]["limits"]
        assert limits.get("nvidia.com/gpu", 0) == want["gpus"]
        assert group["minReplicas"] == group["replicas"] == want["minReplicas"]
        assert group["maxReplicas"] == want["maxReplicas"]
        assert spec.get("runtimeClassName", "") == want["runtimeClassName"]
        assert spec.get("tolerations", []) == want["tolerations"]
        if want["gpuProduct"]:
            assert spec["nodeSelector"]["nvidia.com/gpu.product"] == want["gpuProduct"]


# The only LLOCO_* variables a pod's spec carries: where the settings file is, and secrets by reference.
POD_ENV_SETTINGS = {
    "LLOCO_CONFIG",
    "LLOCO_ADMIN_KEY",
    "LLOCO_STORE__ACCESS_KEY_ID",
    "LLOCO_STORE__SECRET_ACCESS_KEY",
}


def kuberay_pod_labels(docs: list[dict[str, Any]]) -> list[tuple[dict[str, str], dict[str, Any]]]:
    """(labels, pod template) of every Ray pod, with the labels KubeRay adds: `ray.io/node-type`,
    `ray.io/cluster`, and on a RayService's pods `ray.io/serve` (workers always, the head once its Serve
    proxy is healthy, which is the state that matters here)."""
    pods = []
    owners = [
        ("RayService", d["metadata"]["name"], d["spec"]["rayClusterConfig"])
        for d in of_kind(docs, "RayService")
    ]
    owners += [("RayCluster", d["metadata"]["name"], d["spec"]) for d in of_kind(docs, "RayCluster")]
    owners += [("RayJob", f"job{i}", spec["rayClusterSpec"]) for i, spec in enumerate(ray_job_specs(docs))]
    for kind, name, cluster in owners:
        cluster_name = f"{name}-abcde" if kind == "RayService" else name  # KubeRay's random suffix
        serve = {"ray.io/serve": "true"} if kind == "RayService" else {}
        head = cluster["headGroupSpec"]["template"]
        labels = {**head["metadata"]["labels"], "ray.io/node-type": "head", "ray.io/cluster": cluster_name}
        pods.append(({**labels, **serve}, head))
        for group in cluster.get("workerGroupSpecs", []):
            labels = {**group["template"]["metadata"]["labels"], "ray.io/node-type": "worker"}
            pods.append(({**labels, "ray.io/cluster": cluster_name, **serve}, group["template"]))
    return pods


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_services_and_policies_select_the_ray_pods(
    case: tuple[str, dict[str, Any], list[dict[str, Any]]],
) -> None:
    """Selectors and named ports line up with the pods KubeRay will create (plus the labels it adds)."""
    _, _, docs = case
    pods = kuberay_pod_labels(docs)
    serving = [(labels, t) for labels, t in pods if labels["app.kubernetes.io/component"] == "serve"]
    serve_args = serve_config(docs)["applications"][0]["args"]["serve"]
    grpc_port, http_port = serve_args["grpc_port"], serve_args["http_port"]
    (rayservice,) = of_kind(docs, "RayService")
    grpc_service = next(d for d in of_kind(docs, "Service") if d["metadata"]["name"] == "demo-lloco-grpc")
    if grpc_service["spec"]["type"] == "ExternalName":
        # An alias of the RayService's head Service ("<rayservice>-head-svc"), which KubeRay builds from the
        # head's container ports and whose selector it pins to the serving cluster's ray.io/cluster.
        target = f"{rayservice['metadata']['name']}-head-svc.{NAMESPACE}.svc.cluster.local"
        assert grpc_service["spec"]["externalName"] == target
        assert "selector" not in grpc_service["spec"]
        assert [p["port"] for p in grpc_service["spec"]["ports"]] == [grpc_port, http_port]
        heads = [t for labels, t in serving if labels["ray.io/node-type"] == "head"]
    else:
        heads = [t for labels, t in serving if matches(grpc_service["spec"]["selector"], labels)]
        assert grpc_service["spec"]["selector"]["ray.io/serve"] == "true"
        assert not [
            labels
            for labels, _ in pods
            if matches(grpc_service["spec"]["selector"], labels) and labels["ray.io/node-type"] != "head"
        ], "the gRPC Service selects a worker"
    assert len(heads) == 1, "the gRPC API is not on exactly the serving head"
    ports = {p["name"]: p["containerPort"] for p in heads[0]["spec"]["containers"][0]["ports"]}
    assert ports["grpc"] == grpc_port and ports["openai"] == http_port
    assert {p["targetPort"] for p in grpc_service["spec"]["ports"] if "targetPort" in p} <= set(ports)
    for policy in of_kind(docs, "NetworkPolicy"):
        assert all(matches(policy["spec"]["podSelector"]["matchLabels"], labels) for labels, _ in pods)
        open_ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule.get("ports", [])}
        assert {"grpc", "openai"} <= open_ports
    budgets = {d["metadata"]["name"]: d for d in of_kind(docs, "PodDisruptionBudget")}
    for name, budget in budgets.items():
        selected = [
            labels for labels, _ in pods if matches(budget["spec"]["selector"]["matchLabels"], labels)
        ]
        node_type = "head" if name.endswith("-serve-head") else "worker"
        assert selected and all(labels["ray.io/node-type"] == node_type for labels in selected), name
        assert all(labels["app.kubernetes.io/component"] == "serve" for labels in selected), name
    if "demo-lloco-serve-head" in budgets:
        assert budgets["demo-lloco-serve-head"]["spec"]["maxUnavailable"] == 0
    for monitor in of_kind(docs, "ServiceMonitor"):
        metrics = next(
            d
            for d in of_kind(docs, "Service")
            if matches(monitor["spec"]["selector"]["matchLabels"], d["metadata"]["labels"])
        )
        assert all(matches(metrics["spec"]["selector"], labels) for labels, _ in pods)


# What the KubeRay operator's own validation (ValidateRayServiceSpec, ValidateClusterUpgradeOptions,
# ValidateRayClusterSpec, ValidateRayJobSpec, ValidateRayCronJobSpec in
# ray-operator/controllers/ray/utils/validation.go, v1.7) refuses at reconcile time, beyond the CRD schema.
KUBERAY_NAME_LIMITS = {"RayService": 47, "RayJob": 47, "RayCronJob": 30, "RayCluster": 53}
UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
CRON = re.compile(r"^(@(annually|yearly|monthly|weekly|daily|midnight|hourly)|(\S+\s+){4}\S+)$")


def kuberay_refusals(docs: list[dict[str, Any]]) -> list[str]:
    problems = []
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind not in KUBERAY_NAME_LIMITS:
            continue
        if len(name) > KUBERAY_NAME_LIMITS[kind] or not DNS_1035.match(name):
            problems.append(f"{kind} name {name!r} is not a DNS-1035 label of <= {KUBERAY_NAME_LIMITS[kind]}")
        if kind == "RayCronJob":
            spec = doc["spec"]
            if "TZ" in spec["schedule"] or not CRON.match(spec["schedule"]):
                problems.append(f"{name}: schedule {spec['schedule']!r}")
            if spec.get("timeZone", "unset") == "":
                problems.append(f"{name}: empty timeZone")
        if kind == "RayService":
            problems += [f"{name}: {problem}" for problem in _rayservice_refusals(doc["spec"])]
    for spec in ray_job_specs(docs):
        if spec.get("activeDeadlineSeconds", 1) <= 0 or spec.get("backoffLimit", 0) < 0:
            problems.append("RayJob deadline or backoffLimit out of range")
        if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
            problems.append("ttlSecondsAfterFinished without shutdownAfterJobFinishes")
    for cluster in ray_cluster_specs(docs):
        v2 = cluster.get("autoscalerOptions", {}).get("version") == "v2"
        groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
        for group in groups:
            if any(not isinstance(v, str) for v in group.get("rayStartParams", {}).values()):
                problems.append("rayStartParams values must be strings")
            if group.get("resources") and {"num-cpus", "num-gpus", "memory", "resources"} & set(
                group["rayStartParams"]
            ):
                problems.append("resources in both rayStartParams and the group's resources")
            if v2 and group["template"]["spec"].get("restartPolicy", "Never") != "Never":
                problems.append("restartPolicy must be Never or unset with autoscaler v2")
        for group in cluster.get("workerGroupSpecs", []):
            if "idleTimeoutSeconds" in group and not v2:
                problems.append(f"group {group['groupName']}: idleTimeoutSeconds needs autoscaler v2")
            if not 0 <= group["minReplicas"] <= group["maxReplicas"]:
                problems.append(f"group {group['groupName']}: minReplicas > maxReplicas")
        head_params = cluster["headGroupSpec"]["rayStartParams"]
        head_env = {e["name"] for e in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
        if "gcsFaultToleranceOptions" in cluster:
            if "redis-password" in head_params or "redis-username" in head_params:
                problems.append("redis credentials in rayStartParams with gcsFaultToleranceOptions")
            if head_env & {"REDIS_PASSWORD", "RAY_REDIS_ADDRESS", "RAY_external_storage_namespace"}:
                problems.append("Redis settings in the head's env with gcsFaultToleranceOptions")
        elif "RAY_REDIS_ADDRESS" in head_env:
            problems.append("RAY_REDIS_ADDRESS without gcsFaultToleranceOptions")
    return problems


def _rayservice_refusals(spec: dict[str, Any]) -> list[str]:
    problems = []
    strategy = spec.get("upgradeStrategy", {})
    if strategy.get("type", "NewCluster") not in UPGRADE_TYPES:
        problems.append(f"upgradeStrategy.type {strategy['type']!r}")
    if spec.get("rayClusterDeletionDelaySeconds", 0) < 0:
        problems.append("negative rayClusterDeletionDelaySeconds")
    if spec["rayClusterConfig"]["headGroupSpec"].get("headService", {}).get("metadata", {}).get("name"):
        problems.append("headService name set")
    if strategy.get("type") == "NewClusterWithIncrementalUpgrade":
        options = strategy.get("clusterUpgradeOptions")
        if not spec["rayClusterConfig"].get("enableInTreeAutoscaling"):
            problems.append("incremental upgrade without the Ray autoscaler")
        if options is None:
            return [*problems, "incremental upgrade without clusterUpgradeOptions"]
        surge = options.get("maxSurgePercent", 100)
        if not 0 <= surge <= 100 or not 0 <= options.get("stepSizePercent", -1) <= surge:
            problems.append("stepSizePercent / maxSurgePercent out of range")
        if options.get("intervalSeconds", 0) <= 0 or not options.get("gatewayClassName"):
            problems.append("intervalSeconds or gatewayClassName missing")
    return problems


def test_kuberay_operator_would_accept_the_resources(
    case: tuple[str, dict[str, Any], list[dict[str, Any]]],
) -> None:
    _, _, docs = case
    assert not kuberay_refusals(docs)


@pytest.mark.parametrize("values_file", ["gpu-autoscaling", "operator"])
def test_resource_names_fit_for_a_long_release_name(values_file: str) -> None:
    release = "a-release-name-that-is-as-long-as-helm-allows-it-53ch"
    assert len(release) == 53
    docs = render(load_values(values_file), release=release)
    for doc in docs:
        name = doc["metadata"]["name"]
        assert DNS_LABEL.match(name) and len(name) <= 63, name
    assert not kuberay_refusals(docs)
    assert len({(d["kind"], d["metadata"]["name"]) for d in docs}) == len(docs)
    # names KubeRay derives: the RayService's head Service (the gRPC alias's target), the jobs cluster's
    for service in of_kind(docs, "RayService"):
        assert len(f"{service['metadata']['name']}-head-svc") <= 63
    for cluster in of_kind(docs, "RayCluster"):
        assert len(f"{cluster['metadata']['name']}-head-svc") <= 63


def test_notes_tell_how_to_reach_the_api_and_the_jobs() -> None:
    with helm.Chart.load(CHART) as chart:
        notes = chart.render(load_values("gpu-autoscaling"), name=RELEASE, namespace=NAMESPACE)[
            "lloco/templates/NOTES.txt"
        ]
        plain = chart.render({}, name=RELEASE, namespace=NAMESPACE)["lloco/templates/NOTES.txt"]
    assert "demo-lloco-grpc.lloco.svc:50051" in notes
    assert "kubectl -n lloco get rayservice demo-lloco-serve" in notes
    assert "get secret demo-lloco-admin" in notes and "helm test demo -n lloco" in notes
    assert 'compress: RayCronJob, schedule "15 * * * *"' in notes
    assert "finetune: RayJob, runs once" in notes and "get rayjob demo-lloco-finetune" in notes
    assert "Jobs:" not in plain
    # in-cluster the Service is an alias: port-forward the head Service KubeRay keeps on the serving cluster
    assert "port-forward svc/demo-lloco-serve-head-svc 50051" in plain
    assert "lloco model push smollm2-135m-instruct" in plain
    with helm.Chart.load(CHART) as chart:
        operator = chart.render(load_values("operator"), name=RELEASE, namespace=NAMESPACE)[
            "lloco/templates/NOTES.txt"
        ]
    assert "port-forward svc/demo-lloco-grpc 50051" in operator and "model push" not in operator
    assert "get raycluster demo-lloco-jobs" in operator


# ---------------------------------------------------------------- values schema


def _chart_schema() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text())


def _resolved(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """A schema node with its local `$ref` (`#/$defs/x`) followed; its own keywords win."""
    if "$ref" not in node:
        return node
    return {
        **schema["$defs"][node["$ref"].rsplit("/", 1)[-1]],
        **{k: v for k, v in node.items() if k != "$ref"},
    }


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"serve": {"grpcPort": "50051"}}, "/serve/grpcPort"),
        ({"lora": {"gpuSlots": 8.5}}, "/lora/gpuSlots"),
        ({"lora": {"maxRank": 0}}, "/lora/maxRank"),
        ({"s3": {"bucketName": "x"}}, "bucketName"),
        (
            {
                "workerGroups": [
                    {"name": "gpu", "minReplicas": 0, "maxReplicas": "4", "gpus": 1, "resources": {}}
                ]
            },
            "maxReplicas",
        ),
        (
            {
                "workerGroups": [
                    {
                        "name": "gpu",
                        "minReplicas": 0,
                        "maxReplicas": 1,
                        "gpus": 1,
                        "resources": {"limits": {"nvidia.com/gpu": 1}},
                    }
                ]
            },
            "nvidia.com/gpu",
        ),
        ({"head": {"rayStartParams": {"num-cpus": 0}}}, "/head/rayStartParams/num-cpus"),
        ({"jobs": {"compress": {"schedule": "every hour"}}}, "/jobs/compress/schedule"),
        ({"jobs": {"finetune": {"enabled": True, "dataset": "qa"}}}, "/jobs/finetune/tenants"),
        ({"jobs": {"finetune": {"tenants": ["../other"]}}}, "/jobs/finetune/tenants/0"),
        ({"serviceAccount": {"irsaRoleArn": "my-role"}}, "/serviceAccount/irsaRoleArn"),
        ({"model": {"dtype": "float16"}}, "/model/dtype"),
        ({"jobs": {"finetune": {"learningRate": "fast"}}}, "/jobs/finetune/learningRate"),
        ({"jobs": {"finetune": {"learningRate": "0"}}}, "/jobs/finetune/learningRate"),
        ({"jobs": {"finetune": {"dropout": "1.5"}}}, "/jobs/finetune/dropout"),
        ({"serve": {"upgradeStrategy": "Incremental"}}, "/serve/upgradeStrategy"),
        (
            {"serve": {"upgradeStrategy": "NewClusterWithIncrementalUpgrade"}},
            "/serve/incrementalUpgrade/gatewayClassName",
        ),
        ({"gcsFaultTolerance": {"enabled": True}}, "/gcsFaultTolerance/redisAddress"),
        ({"image": {"digest": "latest"}}, "/image/digest"),
        ({"volumes": [{"name": "cache", "emptyDir": {}}]}, "/volumes/0/name"),
        ({"volumeMounts": [{"name": "x", "mountPath": "/models"}]}, "/volumeMounts/0/mountPath"),
        ({"workerDefaults": {"runtimeClassName": "Not A Name"}}, "/workerDefaults/runtimeClassName"),
        ({"model": {"volume": {"subPath": "../other"}}}, "/model/volume/subPath"),
        ({"serve": {"service": {"type": "Ingress"}}}, "/serve/service/type"),
    ],
)
def test_schema_refuses_bad_values(values: dict[str, Any], complaint: str) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError) as refused:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert complaint in str(refused.value)


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        (
            {
                "workerGroups": [
                    {"name": "a", "minReplicas": 0, "maxReplicas": 1, "gpus": 0, "resources": {}}
                ]
                * 2
            },
            "used twice",
        ),
        (
            {"workerGroups": [{"name": "a", "minReplicas": 3, "maxReplicas": 1, "gpus": 0, "resources": {}}]},
            "minReplicas 3 > maxReplicas 1",
        ),
        (
            {"jobsCluster": {"enabled": True, "workerGroups": [{"minReplicas": 9}]}},
            "minReplicas 9 > maxReplicas 4",
        ),
        (
            {
                "serve": {
                    "upgradeStrategy": "NewClusterWithIncrementalUpgrade",
                    "incrementalUpgrade": {
                        "gatewayClassName": "istio",
                        "stepSizePercent": 50,
                        "maxSurgePercent": 25,
                    },
                }
            },
            "stepSizePercent 50 > maxSurgePercent 25",
        ),
        ({"model": {"hfCache": "hub"}}, "set model.volume.existingClaim"),
    ],
)
def test_templates_refuse_what_the_schema_cannot_express(values: dict[str, Any], complaint: str) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmError) as refused:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert complaint in str(refused.value)


def _documented_keys(
    root: dict[str, Any], schema: dict[str, Any], values: Any, path: str = ""
) -> Iterator[str]:
    """Dotted paths of the values the chart owns (descends only where the schema names properties)."""
    for key, child_schema in schema.get("properties", {}).items():
        if key not in values:
            continue
        yield f"{path}{key}"
        if key == "workerDefaults":  # a $ref whose fields values.yaml documents one by one
            child_schema = _resolved(root, child_schema)
        if "properties" in child_schema and isinstance(values[key], dict):
            yield from _documented_keys(root, child_schema, values[key], f"{path}{key}.")


def test_schema_and_comments_cover_every_value() -> None:
    schema = _chart_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    with helm.Chart.load(CHART) as chart:
        for name in VALUE_FILES:
            jsonschema.Draft202012Validator(schema).validate(chart.merge_values(load_values(name)))

    def walk(node: dict[str, Any], values: dict[str, Any], path: str) -> None:
        properties = node.get("properties", {})
        for key, value in values.items():
            assert key in properties, f"{path}{key} is in values.yaml but not in values.schema.json"
            assert properties[key].get("description"), f"{path}{key} has no description in the schema"
            child = _resolved(schema, properties[key])
            if "properties" in child and isinstance(value, dict):
                walk(child, value, f"{path}{key}.")
        for key in properties:
            assert key in values or key == "global", f"{path}{key} is in the schema but not in values.yaml"

    walk(schema, defaults, "")

    # helm-docs style: every chart-owned key has a `# --` comment right above it.
    missing = sorted(set(_documented_keys(schema, schema, defaults)) - set(value_comments()))
    assert not missing, f"values without a `# --` comment: {missing}"


def value_comments() -> dict[str, str]:
    """Dotted key -> its helm-docs `# --` comment in values.yaml (keys of mappings, not list items)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)(- )?([A-Za-z][\w.-]*):", line)
        if not match:
            continue
        indent = len(match.group(1))
        if match.group(2):  # a list item: its keys sit one level below the list's "[]"
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, "[]"))
            indent += 2
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group(3)))
        above = number - 1
        while (
            above >= 0
            and lines[above].strip().startswith("#")
            and not lines[above].strip().startswith("# --")
        ):
            above -= 1
        if above >= 0 and lines[above].strip().startswith("# --") and "[]" not in (s for _, s in stack):
            text = [lines[above].strip().removeprefix("# --").strip()]
            text += [line.strip().removeprefix("#").strip() for line in lines[above + 1 : number]]
            comments[".".join(s for _, s in stack)] = " ".join(text)
    return comments


def values_table() -> str:
    """The README's table of values, generated from values.yaml comments, defaults and the schema."""
    schema, defaults = _chart_schema(), yaml.safe_load((CHART / "values.yaml").read_text())
    rows = ["| Key | Type | Default | Description |", "| --- | --- | --- | --- |"]
    for dotted, comment in value_comments().items():
        node, value = schema, defaults
        for part in dotted.split("."):
            node, value = _resolved(schema, _resolved(schema, node)["properties"][part]), value[part]
        kind = node.get("type", "string or number")
        shown = "" if "properties" in node else f"`{json.dumps(value)}`"
        description = comment.replace("|", "\\|")
        rows.append(f"| `{dotted}` | {kind} | {shown} | {description} |")
    return "\n".join(rows) + "\n"


def test_chart_readme_lists_every_value() -> None:
    """charts/lloco/README.md carries the table generated from values.yaml (helm-docs style)."""
    readme = (CHART / "README.md").read_text()
    begin, end = "<!-- values:begin -->\n", "<!-- values:end -->"
    assert begin in readme and end in readme
    current = readme.split(begin, 1)[1].split(end, 1)[0]
    assert current == values_table(), (
        "charts/lloco/README.md is stale; regenerate its table with:\n"
        '  .venv/bin/python -c \'import sys; sys.path[:0] = ["tests", "platform"]; '
        "import test_chart; test_chart.write_readme_table()'"
    )


def write_readme_table() -> None:
    """Rewrite the values table of charts/lloco/README.md from values.yaml."""
    path = CHART / "README.md"
    head, rest = path.read_text().split("<!-- values:begin -->\n", 1)
    tail = rest.split("<!-- values:end -->", 1)[1]
    path.write_text(f"{head}<!-- values:begin -->\n{values_table()}<!-- values:end -->{tail}")


# ---------------------------------------------------------------- what the pods receive


def test_pods_read_the_settings_from_the_mounted_file(
    case: tuple[str, dict[str, Any], list[dict[str, Any]]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Settings.load() in a Ray container (its env, and the settings ConfigMap where LLOCO_CONFIG says)."""
    from lloco.config import Settings

    name, values, docs = case
    with helm.Chart.load(CHART) as chart:
        merged = chart.merge_values(values)
    (service,) = of_kind(docs, "RayService")
    (container,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"][
        "containers"
    ]
    env = {e["name"]: e for e in container["env"]}
    (config_map,) = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"] == "demo-lloco-settings"]
    volume = next(
        v
        for v in service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["volumes"]
        if v["name"] == "settings"
    )
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    mounted = tmp_path / "settings.yaml"
    mounted.write_text(config_map["data"]["settings.yaml"])
    for key in [k for k in os.environ if k.startswith("LLOCO_")]:
        monkeypatch.delenv(key)
    for variable in env.values():
        if "value" in variable:
            monkeypatch.setenv(variable["name"], variable["value"])
    assert os.environ["LLOCO_CONFIG"] == "/etc/lloco/config/settings.yaml"
    monkeypatch.setenv("LLOCO_CONFIG", str(mounted))
    settings = Settings.load()
    assert settings.store.bucket == merged["s3"]["bucket"]
    assert settings.store.region == merged["s3"]["region"]
    assert settings.store.endpoint_url == (merged["s3"]["endpointUrl"] or None)
    assert settings.model.base_model == merged["model"]["base"]
    assert settings.model.dtype == merged["model"]["dtype"]
    assert settings.lora.gpu_slots == merged["lora"]["gpuSlots"]
    assert settings.engine.context_cache_cpu_bytes == merged["engine"]["contextCacheCpuBytes"]
    assert settings.limits.max_document_bytes == merged["limits"]["maxDocumentBytes"]
    assert settings.serve.grpc_port == merged["serve"]["grpcPort"]
    assert settings.serve.http_port == merged["serve"]["httpPort"]
    assert settings.serve.engine_num_gpus == merged["serve"]["engine"]["numGpus"]
    assert settings.compress.actor_num_gpus == merged["jobs"]["compress"]["actorNumGpus"]
    assert settings.finetune.learning_rate == pytest.approx(merged["jobs"]["finetune"]["learningRate"])
    assert settings.finetune.target_modules == tuple(merged["jobs"]["finetune"]["targetModules"])
    assert str(settings.model.cache_dir).startswith("/cache/")
    assert (settings.jobs.ray_address is not None) == merged["jobsCluster"]["enabled"]
    assert (os.environ.get("PIP_NO_INDEX") == "1") != merged["model"]["allowPackageIndex"]

    secret_refs = {k: v["valueFrom"]["secretKeyRef"] for k, v in env.items() if "valueFrom" in v}
    admin_secret = merged["adminKey"]["existingSecret"] or "demo-lloco-admin"
    assert secret_refs["LLOCO_ADMIN_KEY"] == {"name": admin_secret, "key": merged["adminKey"]["secretKey"]}
    if merged["s3"]["existingSecret"]:
        assert secret_refs["LLOCO_STORE__SECRET_ACCESS_KEY"] == {
            "name": merged["s3"]["existingSecret"],
            "key": merged["s3"]["secretAccessKeyKey"],
        }
        assert secret_refs["AWS_ACCESS_KEY_ID"]["key"] == merged["s3"]["accessKeyIdKey"]
    else:
        assert not {"LLOCO_STORE__ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"} & set(env)
    (account,) = of_kind(docs, "ServiceAccount")
    role = merged["serviceAccount"]["irsaRoleArn"]
    assert account["metadata"].get("annotations", {}).get("eks.amazonaws.com/role-arn") == (role or None)
    # The admin key reaches serving pods only, never the jobs cluster or the batch jobs' clusters.
    for where, template in pod_templates(docs):
        serving = template["metadata"]["labels"]["app.kubernetes.io/component"] == "serve"
        names = {e["name"] for e in template["spec"]["containers"][0]["env"]}
        assert ("LLOCO_ADMIN_KEY" in names) == serving, where
    secrets = of_kind(docs, "Secret")
    if merged["adminKey"]["existingSecret"]:
        assert not secrets
    else:
        (secret,) = secrets
        assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert len(base64.b64decode(secret["data"]["admin-key"])) == 48


# ---------------------------------------------------------------- Serve config and jobs


def test_serve_config_is_a_valid_ray_serve_config(
    case: tuple[str, dict[str, Any], list[dict[str, Any]]],
) -> None:
    from lloco.config import Settings
    from ray.serve.schema import ServeDeploySchema

    _, values, docs = case
    config = serve_config(docs)
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "lloco.serve.app:app"
    # the Ingress replicas serve gRPC themselves, on the head (the only node with the edge resource)
    assert "grpc_options" not in config and app["route_prefix"] is None
    settings = Settings.model_validate(app["args"])
    assert settings.serve.host == "0.0.0.0"
    ingress = next(d for d in app["deployments"] if d["name"] == "Ingress")
    (cluster,) = [d["spec"]["rayClusterConfig"] for d in of_kind(docs, "RayService")]
    # as KubeRay documents it: JSON inside literal double quotes (it goes through a shell)
    head_resources = cluster["headGroupSpec"]["rayStartParams"]["resources"]
    assert head_resources.startswith('"') and head_resources.endswith('"')
    edge = json.loads(head_resources[1:-1].replace('\\"', '"'))
    assert ingress["ray_actor_options"]["resources"] == {"lloco_edge": 1}
    assert edge == {"lloco_edge": ingress["num_replicas"]}
    assert not any(
        "lloco_edge" in g["rayStartParams"].get("resources", "") for g in cluster["workerGroupSpecs"]
    )
    engine = next(d for d in app["deployments"] if d["name"] == "EngineDeployment")
    expected = {"numGpus": 1, **values.get("serve", {}).get("engine", {})}
    assert engine["ray_actor_options"]["num_gpus"] == expected["numGpus"]
    assert engine["autoscaling_config"]["max_replicas"] == expected.get("maxReplicas", 4)


def test_serve_config_names_code_that_exists(case: tuple[str, dict[str, Any], list[dict[str, Any]]]) -> None:
    """Every import path and servicer function of serveConfigV2 imports, and the app builds from its args."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app

    _, _, docs = case
    config = serve_config(docs)
    (app,) = config["applications"]
    application = call_user_app_builder_with_args_if_necessary(import_attr(app["import_path"]), app["args"])
    built = build_app(application, name=app["name"])
    names = {deployment.name for deployment in built.deployments}
    assert {d["name"] for d in app["deployments"]} <= names


def test_jobs_run_the_lloco_commands() -> None:
    entrypoints = {
        name: sorted(spec["entrypoint"] for spec in ray_job_specs(render(load_values(name))))
        for name in VALUE_FILES
    }
    assert entrypoints == {
        "default": [],
        "cpu": ["lloco compress --tenant acme --tenant globex"],
        "gpu-autoscaling": [
            "lloco compress --all",
            "lloco finetune --tenant acme --tenant globex --tenant initech --dataset support-qa --adapter support",
        ],
        "operator": [],
    }
    (cron,) = of_kind(render(load_values("gpu-autoscaling")), "RayCronJob")
    assert cron["spec"]["schedule"] == "15 * * * *"


def test_job_entrypoints_parse_with_the_lloco_cli() -> None:
    """The flags the RayJobs pass exist on the real `lloco` command (parsed, not run)."""
    import typer
    from lloco.cli import app

    command = typer.main.get_command(app)
    for spec in ray_job_specs(render(load_values("gpu-autoscaling"))) + ray_job_specs(
        render(load_values("cpu"))
    ):
        program, *args = spec["entrypoint"].split()
        assert program == "lloco"
        with command.make_context(program, list(args), resilient_parsing=False) as context:
            subcommand = command.get_command(context, args[0])
            assert subcommand is not None, args[0]
            subcommand.make_context(args[0], args[1:], parent=context)


# ---------------------------------------------------------------- operator overrides, as `--set` gives them

DIGEST = "sha256:" + "ab" * 32


def serving_workers(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    (service,) = of_kind(docs, "RayService")
    return service["spec"]["rayClusterConfig"]["workerGroupSpecs"]


def _check_node_selector(docs: list[dict[str, Any]]) -> None:
    # Helm replaces the whole list: one group with only a nodeSelector, completed from workerDefaults
    (group,) = serving_workers(docs)
    spec = group["template"]["spec"]
    assert group["groupName"] == "gpu-0" and group["maxReplicas"] == 4
    assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"


def _check_gpu_product(docs: list[dict[str, Any]]) -> None:
    for where, template in pod_templates(docs):
        selector = template["spec"].get("nodeSelector", {})
        if where.endswith(".head"):
            assert "nvidia.com/gpu.product" not in selector, where
        else:
            assert selector["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-80GB", where


def _check_groups(docs: list[dict[str, Any]]) -> None:
    a10g, cpu = serving_workers(docs)
    assert a10g["groupName"] == "a10g" and cpu["groupName"] == "cpu"
    assert a10g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert "nvidia.com/gpu" not in cpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "tolerations" not in cpu["template"]["spec"]


def _check_pull_secrets(docs: list[dict[str, Any]]) -> None:
    (test_pod,) = of_kind(docs, "Pod")
    templates = [t for _, t in pod_templates(docs)] + [{"spec": test_pod["spec"]}]
    for template in templates:
        assert template["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
        assert template["spec"]["containers"][0]["image"] == f"registry.example.com/lloco@{DIGEST}"


def _check_existing_secrets(docs: list[dict[str, Any]]) -> None:
    assert not of_kind(docs, "Secret")
    (service,) = of_kind(docs, "RayService")
    options = service["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert options == {
        "redisAddress": "redis.redis.svc:6379",
        "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "redis", "key": "redis-password"}}},
    }
    assert all("gcsFaultToleranceOptions" not in spec["rayClusterSpec"] for spec in ray_job_specs(docs))
    for where, template in pod_templates(docs):
        env = {
            e["name"]: e.get("valueFrom", {}).get("secretKeyRef")
            for e in template["spec"]["containers"][0]["env"]
        }
        assert env["LLOCO_STORE__ACCESS_KEY_ID"] == {"name": "s3-keys", "key": "AWS_ACCESS_KEY_ID"}, where
        if template["metadata"]["labels"]["app.kubernetes.io/component"] == "serve":
            assert env["LLOCO_ADMIN_KEY"] == {"name": "admin", "key": "admin-key"}
            secrets = [v["secret"]["secretName"] for v in template["spec"]["volumes"] if "secret" in v]
            assert secrets == ["tls"], where


def _check_model_volume(docs: list[dict[str, Any]]) -> None:
    for where, template in pod_templates(docs):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}, where
        container = template["spec"]["containers"][0]
        mount = next(m for m in container["volumeMounts"] if m["name"] == "models")
        assert mount == {"name": "models", "mountPath": "/models", "readOnly": True, "subPath": "hf"}
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["HF_HUB_CACHE"] == "/models/hub" and env["HF_HUB_OFFLINE"] == "1"
    assert yaml.safe_load(settings_file(docs))["model"]["base_model"] == "meta-llama/Llama-2-7b-hf"


def _check_extra_volumes(docs: list[dict[str, Any]]) -> None:
    for where, template in pod_templates(docs):
        assert {"name": "scratch", "emptyDir": {"medium": "Memory"}} in template["spec"]["volumes"], where
        container = template["spec"]["containers"][0]
        assert {"name": "scratch", "mountPath": "/dev/shm"} in container["volumeMounts"], where
        assert container["envFrom"] == [{"secretRef": {"name": "proxy"}}], where


def _check_runtime_class(docs: list[dict[str, Any]]) -> None:
    for where, template in pod_templates(docs):
        spec = template["spec"]
        head = where.endswith(".head")
        assert spec["runtimeClassName"] == ("kata" if head else "nvidia"), where
        assert spec.get("priorityClassName") == (None if head else "lloco-serving"), where
        if not head:
            assert spec["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"


def _check_incremental_upgrade(docs: list[dict[str, Any]]) -> None:
    (service,) = of_kind(docs, "RayService")
    assert service["spec"]["upgradeStrategy"] == {
        "type": "NewClusterWithIncrementalUpgrade",
        "clusterUpgradeOptions": {
            "gatewayClassName": "istio",
            "stepSizePercent": 25,
            "intervalSeconds": 60,
            "maxSurgePercent": 100,
        },
    }
    (policy,) = of_kind(docs, "NetworkPolicy")
    http = [r for r in policy["spec"]["ingress"] if r.get("ports") == [{"port": "serve", "protocol": "TCP"}]]
    assert http and http[0]["from"] == [{"namespaceSelector": {"matchLabels": {"gateway": "true"}}}]


def _check_floats(docs: list[dict[str, Any]]) -> None:
    settings = yaml.safe_load(settings_file(docs))
    assert settings["finetune"]["learning_rate"] == pytest.approx(2e-5)
    assert settings["finetune"]["dropout"] == 0.1 and settings["compress"]["actor_num_gpus"] == 0.5
    (app,) = serve_config(docs)["applications"]
    engine = next(d for d in app["deployments"] if d["name"] == "EngineDeployment")
    assert engine["ray_actor_options"]["num_gpus"] == 0.5
    assert engine["autoscaling_config"]["target_ongoing_requests"] == 12.5
    assert app["args"]["serve"]["engine_num_gpus"] == 0.5


def _check_jobs_cluster(docs: list[dict[str, Any]]) -> None:
    (cluster,) = of_kind(docs, "RayCluster")
    assert cluster["metadata"]["name"] == "demo-lloco-jobs"
    address = "http://demo-lloco-jobs-head-svc.lloco.svc.cluster.local:8265"
    assert yaml.safe_load(settings_file(docs))["jobs"] == {"ray_address": address}
    assert serve_config(docs)["applications"][0]["args"]["jobs"] == {"ray_address": address}
    head = cluster["spec"]["headGroupSpec"]["template"]
    assert {"name": "dashboard", "containerPort": 8265} in head["spec"]["containers"][0]["ports"]
    assert head["metadata"]["labels"]["app.kubernetes.io/component"] == "jobs"
    (group,) = cluster["spec"]["workerGroupSpecs"]
    assert group["minReplicas"] == 0 and group["idleTimeoutSeconds"] == 300


def _check_load_balancer(docs: list[dict[str, Any]]) -> None:
    service = next(d for d in of_kind(docs, "Service") if d["metadata"]["name"] == "demo-lloco-grpc")
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["ports"] == [
        {"name": "grpc", "port": 443, "targetPort": "grpc", "protocol": "TCP"},
        {"name": "openai", "port": 8443, "targetPort": "openai", "protocol": "TCP"},
    ]
    (pod,) = of_kind(docs, "Pod")
    assert {"name": "GRPC_TARGET", "value": "demo-lloco-grpc:443"} in pod["spec"]["containers"][0]["env"]


def _check_monitoring(docs: list[dict[str, Any]]) -> None:
    (rule,) = of_kind(docs, "PrometheusRule")
    alerts = {r["alert"] for group in rule["spec"]["groups"] for r in group["rules"]}
    readme = (CHART / "README.md").read_text()
    assert all(f"| `{alert}` |" in readme for alert in alerts), "charts/lloco/README.md lists every alert"
    assert alerts == {
        "LlocoApiDown",
        "LlocoEngineDown",
        "LlocoSlowFirstToken",
        "LlocoEngineBacklog",
        "LlocoEngineErrors",
        "LlocoAdapterThrashing",
        "LlocoSlotThrashing",
    }
    (dashboard,) = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"] == "demo-lloco-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["lloco.json"]) == json.loads(
        (CHART / "dashboards" / "lloco.json").read_text()
    )


# (id, `helm template --set` expression, `--set-json` expressions, what the override must do)
OVERRIDES = [
    (
        "node-selector",
        r"workerGroups[0].nodeSelector.cloud\.google\.com/gke-accelerator=nvidia-h100-80gb",
        [],
        _check_node_selector,
    ),
    (
        "gpu-product",
        "workerDefaults.gpuProduct=NVIDIA-A100-SXM4-80GB,jobs.compress.enabled=true",
        [],
        _check_gpu_product,
    ),
    (
        "groups",
        "",
        ['workerGroups=[{"name": "a10g", "gpus": 4}, {"name": "cpu", "gpus": 0, "tolerations": []}]'],
        _check_groups,
    ),
    (
        "pull-secrets",
        f"image.repository=registry.example.com/lloco,image.digest={DIGEST},imagePullSecrets[0].name=regcred",
        [],
        _check_pull_secrets,
    ),
    (
        "existing-secrets",
        "s3.existingSecret=s3-keys,adminKey.existingSecret=admin,serve.tls.existingSecret=tls,"
        "gcsFaultTolerance.enabled=true,gcsFaultTolerance.redisAddress=redis.redis.svc:6379,"
        "gcsFaultTolerance.existingSecret=redis,jobs.finetune.enabled=true,jobs.finetune.tenants={acme},"
        "jobs.finetune.dataset=qa",
        [],
        _check_existing_secrets,
    ),
    (
        "pvc-model",
        "model.volume.existingClaim=models,model.volume.subPath=hf,model.hfCache=hub,"
        "model.base=meta-llama/Llama-2-7b-hf,jobsCluster.enabled=true",
        [],
        _check_model_volume,
    ),
    (
        "volumes",
        "",
        [
            'volumes=[{"name": "scratch", "emptyDir": {"medium": "Memory"}}]',
            'volumeMounts=[{"name": "scratch", "mountPath": "/dev/shm"}]',
            'envFrom=[{"secretRef": {"name": "proxy"}}]',
        ],
        _check_extra_volumes,
    ),
    (
        "runtime-class",
        "workerDefaults.runtimeClassName=nvidia,workerDefaults.priorityClassName=lloco-serving,head.runtimeClassName=kata",
        [
            'workerDefaults.topologySpreadConstraints=[{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",'
            ' "whenUnsatisfiable": "ScheduleAnyway"}]'
        ],
        _check_runtime_class,
    ),
    (
        "incremental-upgrade",
        "serve.upgradeStrategy=NewClusterWithIncrementalUpgrade,serve.incrementalUpgrade.gatewayClassName=istio",
        ['networkPolicy.serveHttpFrom=[{"namespaceSelector": {"matchLabels": {"gateway": "true"}}}]'],
        _check_incremental_upgrade,
    ),
    (
        "floats",
        "jobs.finetune.learningRate=2e-5,jobs.finetune.dropout=0.1,jobs.compress.actorNumGpus=0.5,"
        "serve.engine.numGpus=0.5,serve.engine.targetOngoingRequests=12.5",
        [],
        _check_floats,
    ),
    ("jobs-cluster", "jobsCluster.enabled=true", [], _check_jobs_cluster),
    (
        "load-balancer",
        "serve.service.type=LoadBalancer,serve.service.port=443,serve.service.httpPort=8443",
        [],
        _check_load_balancer,
    ),
    (
        "monitoring",
        "monitoring.enabled=true,monitoring.rules.enabled=true,monitoring.dashboard.enabled=true",
        [],
        _check_monitoring,
    ),
]


@pytest.mark.parametrize(
    ("expression", "json_expressions", "check"), [o[1:] for o in OVERRIDES], ids=[o[0] for o in OVERRIDES]
)
def test_operator_overrides_render_valid_resources(
    expression: str, json_expressions: list[str], check: Any, kuberay_validators: dict[str, Any]
) -> None:
    """Each override as `helm template --set/--set-json` passes the schema, lint --strict, Kubernetes'
    validation, the KubeRay CRDs and the operator's own checks, and does what it says."""
    values = helm.parse_set_string(expression) if expression else {}
    for json_expression in json_expressions:
        values = _deep_merge(values, helm.parse_set_json(json_expression))
    docs = render(values)
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
    assert not [m for m in report["messages"] if m["severity"] >= 2] and not report["errors"]
    validate_against_kubernetes(docs)
    errors = crd_errors(docs, kuberay_validators)
    assert not errors, errors[:5]
    assert not kuberay_refusals(docs)
    check(docs)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        both_maps = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _deep_merge(merged[key], value) if both_maps else value
    return merged


# ---------------------------------------------------------------- upgrades in place


SETTINGS_CHANGES = (
    "limits.maxNewTokens=1024,limits.maxDocumentBytes=8388608,limits.maxInflightRequests=8,"
    "engine.maxBatchSize=64,engine.maxSeqLen=8192,engine.contextCacheGpuBytes=4294967296,engine.compile=false,"
    "engine.prefillChunkTokens=512,engine.outputTokenCost=3.5,engine.fairPreemption=true,"
    "engine.tenantWeights.acme=2,"
    "serve.edgeCache.authTtlSeconds=5,serve.edgeCache.metadataTtlSeconds=0,limits.maxNamesPerCall=50,"
    "lora.gpuSlots=16,lora.cpuAdapters=256,lora.maxRank=32,"
    "serve.engine.maxReplicas=12,serve.engine.targetOngoingRequests=16,serve.engine.maxOngoingRequests=64,"
    "model.base=s3://acme-lloco/models/llama-2-7b/,model.dtype=bfloat16,"
    "jobs.compress.batchSize=128,jobs.compress.poolSize=8,jobs.finetune.epochs=1.5,"
    "jobs.finetune.learningRate=1e-4,jobs.finetune.rank=16,jobs.finetune.workerGroups[0].maxReplicas=8,"
    "jobsCluster.enabled=true"
)


def test_settings_changes_leave_the_ray_cluster_alone() -> None:
    """An upgrade that changes only settings (limits, engine tunables, LoRA slots, Serve autoscaling, the
    model, jobs) renders the same rayClusterConfig, so KubeRay updates the Serve application on the running
    cluster instead of building a second GPU cluster; a pod change (the image) does build one."""
    base = load_values("gpu-autoscaling")
    before = render(base)
    after = render(_deep_merge(base, helm.parse_set_string(SETTINGS_CHANGES)))
    (old,), (new,) = of_kind(before, "RayService"), of_kind(after, "RayService")
    assert new["spec"]["rayClusterConfig"] == old["spec"]["rayClusterConfig"]
    assert new["spec"]["upgradeStrategy"] == old["spec"]["upgradeStrategy"]
    # the change itself arrives: through the Serve config and the settings file
    (app,) = yaml.safe_load(new["spec"]["serveConfigV2"])["applications"]
    args = app["args"]
    # Serve replaces Engine replicas in place, starting replacements before stopping old ones
    assert next(d for d in app["deployments"] if d["name"] == "EngineDeployment")["max_surge_percent"] == 25
    assert args["limits"]["max_new_tokens"] == 1024 and args["engine"]["max_batch_size"] == 64
    assert args["engine"]["prefill_chunk_tokens"] == 512 and args["engine"]["tenant_weights"] == {"acme": 2}
    assert args["serve"]["auth_cache_ttl_s"] == 5 and args["serve"]["metadata_cache_ttl_s"] == 0
    assert args["model"]["base_model"] == "s3://acme-lloco/models/llama-2-7b/"
    assert yaml.safe_load(settings_file(after))["finetune"]["epochs"] == 1.5
    # a change of the batch jobs alone restarts no Serve replica: the Serve config stays as it was
    jobs_only = render(
        _deep_merge(base, helm.parse_set_string("jobs.finetune.epochs=1.5,jobs.compress.batchSize=8"))
    )
    assert of_kind(jobs_only, "RayService")[0]["spec"] == old["spec"]
    # the negative control: a new image is a new cluster
    image = render(_deep_merge(base, helm.parse_set_string("image.tag=0.1.1")))
    assert of_kind(image, "RayService")[0]["spec"]["rayClusterConfig"] != old["spec"]["rayClusterConfig"]


def test_every_serving_setting_is_a_chart_value() -> None:
    """Each setting of the sections a serving replica reads can be set from the values: the rendered
    settings name every field, except the few rendered only when their value is given."""
    from lloco.config import Settings

    rendered_only_when_set = {"limits": {"max_message_bytes"}, "serve": {"tls_cert_file", "tls_key_file"}}
    settings = yaml.safe_load(settings_file(render({})))
    for section in ("limits", "lora", "engine", "serve"):
        fields = set(type(getattr(Settings(), section)).model_fields)
        missing = fields - set(settings[section]) - rendered_only_when_set.get(section, set())
        assert not missing, f"{section}: no chart value renders {sorted(missing)}"
    whole = yaml.safe_load(
        settings_file(rendered("engine.prefillChunkTokens=0,limits.maxMessageBytes=9000000"))
    )
    assert whole["engine"]["prefill_chunk_tokens"] is None and whole["limits"]["max_message_bytes"] == 9000000
    loaded = Settings.model_validate(whole)
    assert loaded.engine.prefill_chunk_tokens is None and loaded.serve.metadata_cache_entries == 65536


def test_admin_key_is_stable_under_helm_template_with_an_existing_secret() -> None:
    """GitOps renders with `helm template`, where `lookup` sees no cluster: with adminKey.existingSecret the
    output is the same on every render (no generated key); without it the chart generates one, which only
    `helm install/upgrade` (lookup) keeps."""
    values = {"adminKey": {"existingSecret": "lloco-admin"}}
    with helm.Chart.load(CHART) as chart:
        first = chart.render(values, name=RELEASE, namespace=NAMESPACE)
        second = chart.render(values, name=RELEASE, namespace=NAMESPACE)
        generated = [chart.render({}, name=RELEASE, namespace=NAMESPACE) for _ in range(2)]
    assert first == second
    manifests = [
        d for path, text in first.items() if path.endswith(".yaml") for d in yaml.safe_load_all(text) if d
    ]
    assert not of_kind(manifests, "Secret")
    assert (
        generated[0]["lloco/templates/secret-admin.yaml"] != generated[1]["lloco/templates/secret-admin.yaml"]
    )


# ---------------------------------------------------------------- metrics: alerts and dashboard


def _engine_metric_names() -> dict[str, str]:
    """lloco's own metrics (`lloco.serve.engine.PrometheusObserver`) -> their kind, read from the source."""
    import ast

    import lloco.serve.engine as engine

    names = {}
    for node in ast.walk(ast.parse(Path(engine.__file__).read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            first = node.args[0]
            if node.func.attr in ("Counter", "Histogram", "Gauge") and isinstance(first, ast.Constant):
                names[first.value] = node.func.attr
    return names


def _exported(name: str, kind: str) -> set[str]:
    """The Prometheus series names Ray 2.60 exports for a metric (prefix `ray_`; counters get `_total`)."""
    base = f"ray_{name}"
    return {
        "Counter": {f"{base}_total"},
        "Gauge": {base},
        "Histogram": {f"{base}_bucket", f"{base}_sum", f"{base}_count"},
    }[kind]


def test_alerts_and_dashboard_query_metrics_that_are_exported() -> None:
    """Every series the PrometheusRule and the Grafana dashboard query is one lloco's engine exports, or one
    Ray (Serve, node metrics) defines in the installed ray package."""
    import ray

    docs = render(load_values("operator"))
    (rule,) = of_kind(docs, "PrometheusRule")
    expressions = [r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]]
    dashboard = json.loads((CHART / "dashboards" / "lloco.json").read_text())
    expressions += [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    expressions += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    used = {name for expr in expressions for name in re.findall(r"\bray_[a-z_]+", expr)}
    ours = {series for name, kind in _engine_metric_names().items() for series in _exported(name, kind)}
    ray_root = Path(ray.__file__).parent
    ray_sources = "\n".join(
        path.read_text(errors="ignore")
        for folder in ("serve", "dashboard/modules/reporter")
        for path in (ray_root / folder).rglob("*.py")
    )
    unknown = []
    for series in sorted(used - ours):
        stem = re.sub(r"_(total|bucket|sum|count)$", "", series.removeprefix("ray_"))
        if f'"{stem}"' not in ray_sources:
            unknown.append(series)
    assert not unknown, f"queried but never exported: {unknown}"
    # Every metric lloco's engine exports is on the dashboard or in an alert.
    missing = {name for name in _engine_metric_names() if not any(f"ray_{name}" in series for series in used)}
    assert not missing, f"exported but neither charted nor alerted on: {sorted(missing)}"
    assert all(
        t["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"] for t in p.get("targets", [])
    )


# ---------------------------------------------------------------- the `helm test` pod, for real


@pytest.fixture
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    """A real grpc.health.v1 server on loopback."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(grace=None)


def test_helm_test_pod_checks_grpc_health(health_server: tuple[str, health.HealthServicer]) -> None:
    target, servicer = health_server
    (pod,) = [d for d in render({}) if d["kind"] == "Pod"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["GRPC_TARGET"] == "demo-lloco-grpc:50051"
    command = container["command"] + container["args"]
    assert command[:2] == ["python", "-c"]

    def run(timeout_s: str) -> subprocess.CompletedProcess[str]:
        run_env = {"GRPC_TARGET": target, "TIMEOUT_SECONDS": timeout_s, "PATH": "/usr/bin:/bin"}
        return subprocess.run(
            [sys.executable, *command[1:]], env=run_env, capture_output=True, text=True, timeout=60
        )

    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    serving = run(env["TIMEOUT_SECONDS"])
    assert serving.returncode == 0, serving.stdout + serving.stderr
    assert "SERVING" in serving.stdout
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    not_serving = run("0.5")
    assert not_serving.returncode == 1, not_serving.stdout + not_serving.stderr
    assert "NOT_SERVING" in not_serving.stdout


def test_tls_secret_reaches_the_serving_pods_and_the_probe() -> None:
    """With serve.tls.existingSecret the serving pods mount it and the settings point the server at it;
    job clusters do not get it; the `helm test` probe trusts its ca.crt."""
    from lloco.config import Settings

    docs = render(
        {"serve": {"tls": {"existingSecret": "lloco-tls"}}, "jobs": {"compress": {"enabled": True}}}
    )
    settings = Settings.model_validate(serve_config(docs)["applications"][0]["args"])
    assert settings.serve.tls and str(settings.serve.tls_cert_file) == "/etc/lloco/tls/tls.crt"
    for where, template in pod_templates(docs):
        mounts = {m["name"]: m["mountPath"] for m in template["spec"]["containers"][0]["volumeMounts"]}
        secrets = [v["secret"]["secretName"] for v in template["spec"]["volumes"] if "secret" in v]
        serving = template["metadata"]["labels"]["app.kubernetes.io/component"] == "serve"
        assert (mounts.get("tls") == "/etc/lloco/tls") == serving, where
        assert secrets == (["lloco-tls"] if serving else []), where
    (pod,) = of_kind(docs, "Pod")
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    assert env["GRPC_CA_FILE"] == "/etc/lloco/tls/ca.crt"
    assert pod["spec"]["volumes"][0]["secret"] == {
        "secretName": "lloco-tls",
        "items": [{"key": "ca.crt", "path": "ca.crt"}],
    }
    plain = render({})
    assert "GRPC_CA_FILE" not in {e["name"] for e in of_kind(plain, "Pod")[0]["spec"]["containers"][0]["env"]}


# ---------------------------------------------------------------- cluster.yaml (ray up)


def test_cluster_yaml_is_a_valid_ray_cluster_config() -> None:
    import ray.autoscaler
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load(CLUSTER_YAML.read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(copy.deepcopy(config))

    assert config["provider"]["type"] == "aws"
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    assert "IamInstanceProfile" in head["node_config"]
    workers = {name: t for name, t in node_types.items() if name != config["head_node_type"]}
    instance_types = {t["node_config"]["InstanceType"] for t in workers.values()}
    assert {"g5.12xlarge", "p4d.24xlarge", "p5.48xlarge"} <= instance_types
    for name, node_type in workers.items():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"], name
        assert "IamInstanceProfile" in node_type["node_config"], name
        assert node_type["resources"].get("GPU", 0) > 0, name
    assert config["idle_timeout_minutes"] > 0
    setup = " ".join(config["setup_commands"])
    assert "lloco[gpu]" in setup
    head_start = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in head_start and "serve deploy" in head_start
    # The settings file every node's Ray processes read (LLOCO_CONFIG) is valid for lloco's Settings.
    from lloco.config import Settings

    settings_file = re.search(r"<<'LLOCO'\n(.*?)\nLLOCO", "\n".join(config["setup_commands"]), re.DOTALL)
    assert settings_file and "LLOCO_CONFIG=$HOME/lloco.yaml" in setup
    settings = Settings.model_validate(yaml.safe_load(settings_file.group(1)))
    assert settings.serve.grpc_port == 50051 and settings.serve.engine_num_gpus == 1


def test_cluster_yaml_deploys_the_same_serve_app_as_the_chart() -> None:
    """The Serve config `ray up` deploys names the same app and places the gRPC edge as the chart's."""
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(CLUSTER_YAML.read_text())
    files = " ".join(
        config["head_start_ray_commands"] + config["setup_commands"] + config["head_setup_commands"]
    )
    match = re.search(r"<<'SERVE'\n(.*?)\nSERVE", files, re.DOTALL)
    assert match, "cluster.yaml writes no Serve config"
    vm_config = yaml.safe_load(match.group(1))
    ServeDeploySchema.model_validate(vm_config)
    chart_config = serve_config(render({}))
    assert "grpc_options" not in vm_config and "grpc_options" not in chart_config
    vm_ingress, chart_ingress = (
        next(d for d in c["applications"][0]["deployments"] if d["name"] == "Ingress")
        for c in (vm_config, chart_config)
    )
    assert vm_ingress["ray_actor_options"]["resources"] == chart_ingress["ray_actor_options"]["resources"]
    assert [a["import_path"] for a in vm_config["applications"]] == [
        a["import_path"] for a in chart_config["applications"]
    ]
    assert {d["name"] for d in vm_config["applications"][0]["deployments"]} == {
        d["name"] for d in chart_config["applications"][0]["deployments"]
    }


# ---------------------------------------------------------------- versions the deployment files pin


def test_deployment_files_agree_with_the_package() -> None:
    """Chart appVersion, the chart's Ray version, and the image's Python and torch match pyproject."""
    import tomllib

    import lloco
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = {Requirement(r).name: Requirement(r) for r in project["dependencies"]}
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert chart["appVersion"] == project["version"] == lloco.__version__
    assert requirements["ray"].specifier == SpecifierSet(f"=={defaults['rayVersion']}")

    dockerfile = (REPO / "Dockerfile").read_text()
    build_args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.MULTILINE))
    assert SpecifierSet(project["requires-python"]).contains(build_args["PYTHON_VERSION"] + ".0")
    assert requirements["torch"].specifier.contains(build_args["TORCH_VERSION"])
    assert 'uv pip install --no-build-isolation ".[gpu]"' in dockerfile
    final_user = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)[-1]
    assert final_user.split(":")[0] not in {"0", "root"}
    assert defaults["podSecurityContext"]["runAsUser"] == int(final_user.split(":")[0])
