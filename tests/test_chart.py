"""The Helm chart, the Ray cluster launcher config and the image's health probe, checked offline.

The chart is rendered by the real Helm engine (helm-python-sdk) with the default values and the two
value files under charts/lloco/ci/. Core resources are validated by kubernetes-validate, KubeRay
resources by the openAPIV3Schema of the KubeRay CRDs (with unknown fields refused, because the API
server would silently prune them), the Serve config by Ray Serve's own schema, and the settings the
pods receive by lloco's own Settings class.
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
}
KUBERAY_KINDS = {"RayService": "rayservices", "RayJob": "rayjobs", "RayCronJob": "raycronjobs"}
EXPECTED_KINDS = {
    "default": [
        "NetworkPolicy",
        "Pod",
        "PodDisruptionBudget",
        "RayService",
        "Secret",
        "Service",
        "ServiceAccount",
    ],
    "cpu": [
        "NetworkPolicy",
        "Pod",
        "RayJob",
        "RayService",
        "Service",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    ],
    "gpu-autoscaling": [
        "NetworkPolicy",
        "Pod",
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
    clusters = [d["spec"]["rayClusterConfig"] for d in of_kind(docs, "RayService")]
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


def test_core_resources_pass_kubernetes_validate(
    case: tuple[str, dict[str, Any], list[dict[str, Any]]],
) -> None:
    _, _, docs = case
    core = [doc for doc in docs if not doc["apiVersion"].startswith(("ray.io/", "monitoring.coreos.com/"))]
    assert core
    for doc in core:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    # The shared Ray pod template, as Kubernetes itself would see it in every group of every cluster.
    for where, template in pod_templates(docs):
        pod_template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": where.replace(".", "-")},
        }
        kubernetes_validate.validate({**pod_template, "template": template}, KUBE_VERSION, strict=True)


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


def test_kuberay_resources_match_the_crds(
    case: tuple[str, dict[str, Any], list[dict[str, Any]]], kuberay_validators: dict[str, Any]
) -> None:
    _, _, docs = case
    resources = [doc for doc in docs if doc["apiVersion"] == "ray.io/v1"]
    assert of_kind(resources, "RayService")
    for doc in resources:
        errors = [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in kuberay_validators[doc["kind"]].iter_errors(doc)
        ]
        assert not errors, f"{doc['kind']} {doc['metadata']['name']}: {errors[:5]}"


def test_every_ray_pod_comes_from_the_shared_template(
    case: tuple[str, dict[str, Any], list[dict[str, Any]]],
) -> None:
    _, values, docs = case
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
        assert any(env["name"] == "LLOCO_STORE__BUCKET" for env in container["env"])
    gpu_groups = {g["name"]: g["gpus"] for g in values.get("workerGroups", [{"name": "gpu", "gpus": 1}])}
    (service,) = of_kind(docs, "RayService")
    for group in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits.get("nvidia.com/gpu", 0) == gpu_groups[group["groupName"]]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_services_and_policies_select_the_ray_pods(
    case: tuple[str, dict[str, Any], list[dict[str, Any]]],
) -> None:
    """Selectors and named ports line up with the pods KubeRay will create (plus the labels it adds)."""
    _, _, docs = case
    serving_pods = []
    for cluster in [d["spec"]["rayClusterConfig"] for d in of_kind(docs, "RayService")]:
        head_labels = {
            **cluster["headGroupSpec"]["template"]["metadata"]["labels"],
            "ray.io/node-type": "head",
        }
        serving_pods.append((head_labels, cluster["headGroupSpec"]["template"]))
        for group in cluster["workerGroupSpecs"]:
            labels = {
                **group["template"]["metadata"]["labels"],
                "ray.io/node-type": "worker",
                "ray.io/serve": "true",
            }
            serving_pods.append((labels, group["template"]))
    all_pods = [template["metadata"]["labels"] for _, template in pod_templates(docs)]

    def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
        return all(labels.get(key) == value for key, value in selector.items())

    grpc_service = next(d for d in of_kind(docs, "Service") if d["metadata"]["name"] == "demo-lloco-grpc")
    grpc_targets = [t for labels, t in serving_pods if matches(grpc_service["spec"]["selector"], labels)]
    assert grpc_targets, "the gRPC Service selects no serving pod"
    for template in grpc_targets:
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert ports["grpc"] == serve_config(docs)["applications"][0]["args"]["serve"]["grpc_port"]
    for policy in of_kind(docs, "NetworkPolicy"):
        assert all(matches(policy["spec"]["podSelector"]["matchLabels"], labels) for labels in all_pods)
    for budget in of_kind(docs, "PodDisruptionBudget"):
        selected = [
            labels for labels, _ in serving_pods if matches(budget["spec"]["selector"]["matchLabels"], labels)
        ]
        assert selected and all(labels["ray.io/node-type"] == "worker" for labels in selected)
    for monitor in of_kind(docs, "ServiceMonitor"):
        metrics = next(
            d
            for d in of_kind(docs, "Service")
            if matches(monitor["spec"]["selector"]["matchLabels"], d["metadata"]["labels"])
        )
        assert all(matches(metrics["spec"]["selector"], labels) for labels in all_pods)


# What the KubeRay operator's own validation (ValidateRayServiceSpec, ValidateRayJobSpec,
# ValidateRayCronJobSpec in ray-operator/controllers/ray/utils/validation.go, v1.7) refuses at reconcile
# time, beyond the CRD schema.
KUBERAY_NAME_LIMITS = {"RayService": 47, "RayJob": 47, "RayCronJob": 30}
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
    return problems


def test_kuberay_operator_would_accept_the_resources(
    case: tuple[str, dict[str, Any], list[dict[str, Any]]],
) -> None:
    _, _, docs = case
    assert not kuberay_refusals(docs)


def test_resource_names_fit_for_a_long_release_name() -> None:
    release = "a-release-name-that-is-as-long-as-helm-allows-it-53ch"
    assert len(release) == 53
    docs = render(load_values("gpu-autoscaling"), release=release)
    for doc in docs:
        name = doc["metadata"]["name"]
        assert DNS_LABEL.match(name) and len(name) <= 63, name
    assert not kuberay_refusals(docs)
    assert len({(d["kind"], d["metadata"]["name"]) for d in docs}) == len(docs)


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


# ---------------------------------------------------------------- values schema


def _chart_schema() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text())


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
    ],
)
def test_templates_refuse_what_the_schema_cannot_express(values: dict[str, Any], complaint: str) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmError) as refused:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert complaint in str(refused.value)


def _documented_keys(schema: dict[str, Any], values: Any, path: str = "") -> Iterator[str]:
    """Dotted paths of the values the chart owns (descends only where the schema names properties)."""
    for key, child_schema in schema.get("properties", {}).items():
        if key not in values:
            continue
        yield f"{path}{key}"
        if "properties" in child_schema and isinstance(values[key], dict):
            yield from _documented_keys(child_schema, values[key], f"{path}{key}.")


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
            child = properties[key]
            assert child.get("description"), f"{path}{key} has no description in the schema"
            if "properties" in child and isinstance(value, dict):
                walk(child, value, f"{path}{key}.")
        for key in properties:
            assert key in values or key == "global", f"{path}{key} is in the schema but not in values.yaml"

    walk(schema, defaults, "")

    # helm-docs style: every chart-owned key has a `# --` comment right above it.
    missing = sorted(set(_documented_keys(schema, defaults)) - set(value_comments()))
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
            node, value = node["properties"][part], value[part]
        if "$ref" in node:
            node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
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


def test_pods_receive_the_settings_as_lloco_env(
    case: tuple[str, dict[str, Any], list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from lloco.config import Settings

    name, values, docs = case
    with helm.Chart.load(CHART) as chart:
        merged = chart.merge_values(values)
    (service,) = of_kind(docs, "RayService")
    (container,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"][
        "containers"
    ]
    env = {e["name"]: e for e in container["env"]}
    for key in [k for k in os.environ if k.startswith("LLOCO_")]:
        monkeypatch.delenv(key)
    for variable in env.values():
        if "value" in variable:
            monkeypatch.setenv(variable["name"], variable["value"])
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
    assert settings.serve.engine_num_gpus == merged["serve"]["engine"]["numGpus"]
    assert settings.compress.actor_num_gpus == merged["jobs"]["compress"]["actorNumGpus"]
    assert settings.finetune.learning_rate == pytest.approx(merged["jobs"]["finetune"]["learningRate"])
    assert settings.finetune.target_modules == tuple(merged["jobs"]["finetune"]["targetModules"])
    assert str(settings.model.cache_dir).startswith("/cache/")

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
    # The admin key reaches serving pods only, never the batch jobs' clusters.
    for spec in ray_job_specs(docs):
        job_env = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
        assert "LLOCO_ADMIN_KEY" not in {e["name"] for e in job_env}
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
