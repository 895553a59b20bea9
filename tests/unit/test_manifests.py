"""The KubeRay manifests in cluster_configs/, checked without Kubernetes and without starting Ray.

- Every `ray.io/v1` manifest validates against the v1 schema of KubeRay's CRD (from ../shared/kuberay/crds),
  strictly: like `kubectl apply`'s default field validation, an unknown field is an error, not dropped.
- serveConfigV2 is serve.yaml; the RayCluster is the RayService's rayClusterConfig.
- The ragfan config that serveConfigV2 names loads, matches the embedded default but for placement and
  scaling, and its replicas fit the worker groups: custom resources offered, pods big enough, enough pods.
- Every Ray pod group (the head too) and the ingest Job mount the shared volume where RAGFAN_CACHE_DIR
  points, so the writes directory (log, merged versions, pins) is one that every replica shares.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from serve_app.config import AppConfig, check_files, load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster_configs"
# RAGFAN_KUBERAY_CRDS moves it (the test below points it at nothing to see the skip reported).
CRDS = Path(os.environ.get("RAGFAN_KUBERAY_CRDS") or ROOT.parent / "shared" / "kuberay" / "crds")
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
VOLUME_PATH = "/data/ragfan"


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def ray_manifests() -> list[tuple[str, int, dict[str, Any]]]:
    return [
        (path.name, i, doc)
        for path in sorted(CLUSTER.glob("*.yaml"))
        for i, doc in enumerate(documents(path))
        if doc.get("apiVersion") == "ray.io/v1"
    ]


def manifest(name: str, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in documents(CLUSTER / name) if d.get("kind") == kind]
    return doc


@pytest.fixture(scope="module")
def rayservice() -> dict[str, Any]:
    return manifest("rayservice.yaml", "RayService")


@pytest.fixture(scope="module")
def cluster_spec(rayservice) -> dict[str, Any]:
    return rayservice["spec"]["rayClusterConfig"]


@pytest.fixture(scope="module")
def serve_config(rayservice) -> dict[str, Any]:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


@pytest.fixture(scope="module")
def ragfan_config(serve_config) -> AppConfig:
    (app,) = serve_config["applications"]
    # Relative to the workers' working directory: the repository root here, /home/ray/ragfan in the image.
    return load_config(ROOT / app["args"]["config"])


# -- the CRD schemas -------------------------------------------------------------------------------
def strict(schema: Any) -> Any:
    """Forbid unknown fields wherever the schema lists an object's fields, as the API server's
    strict field validation (kubectl's default) does; `metadata` and free-form maps stay open."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@functools.cache
def _validator(kind: str) -> jsonschema.Draft4Validator:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1 MB each: the C loader when there is one
    crd = yaml.load((CRDS / CRD_FILES[kind]).read_text(encoding="utf-8"), Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict(v1["schema"]["openAPIV3Schema"])
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


@pytest.fixture(scope="module")
def validator():
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {CRDS} (the shared folder beside the checkout)")
    return _validator


def test_without_the_crds_the_check_is_skipped_and_the_run_says_so(tmp_path):
    """No CRD schemas: the check must show up as skipped, with its reason, in the run's summary
    (pyproject's `-ra`), never pass silently."""
    env = {**os.environ, "RAGFAN_KUBERAY_CRDS": str(tmp_path / "absent")}
    check = f"{__file__}::test_every_ray_manifest_validates_against_its_crd"
    run = subprocess.run([sys.executable, "-m", "pytest", check, "-p", "no:cacheprovider"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    summary = run.stdout.split("short test summary info")[-1]
    assert run.returncode == 0 and " passed" not in run.stdout.splitlines()[-1], run.stdout[-2000:]
    assert "SKIPPED" in summary and f"KubeRay CRD schemas not found at {tmp_path / 'absent'}" in summary


def schema_errors(validator, doc: dict[str, Any]) -> list[str]:
    errors = validator(doc["kind"]).iter_errors(doc)
    return sorted(f"{'.'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}" for e in errors)


def test_the_manifests_are_there():
    kinds = {(name, doc["kind"]) for name, _, doc in ray_manifests()}
    assert {("rayservice.yaml", "RayService"), ("raycluster.yaml", "RayCluster")} <= kinds


@pytest.mark.parametrize(
    ("name", "index", "doc"), [pytest.param(*m, id=f"{m[0]}#{m[1]}:{m[2]['kind']}") for m in ray_manifests()]
)
def test_every_ray_manifest_validates_against_its_crd(validator, name, index, doc):
    assert doc["kind"] in CRD_FILES, f"{name}: no CRD schema here for kind {doc['kind']}"
    assert schema_errors(validator, doc) == [], f"{name} document {index}"


def _parent(doc: dict[str, Any], path: str) -> tuple[Any, str]:
    *parents, last = path.split(".")
    node: Any = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node, last


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    node, key = _parent(doc, path)
    if value is _DELETE:
        del node[key]
    else:
        node[key] = value


def _rename(doc: dict[str, Any], path: str, new: str) -> None:
    node, key = _parent(doc, path)
    node[new] = node.pop(key)


_DELETE = object()
WORKERS = "spec.rayClusterConfig.workerGroupSpecs"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: _rename(d, f"{WORKERS}.0.groupName", "groupname"), "'groupName' is a required property"),
        (lambda d: _rename(d, "spec.rayClusterConfig.enableInTreeAutoscaling", "enableInTreeAutoscalling"),
         "'enableInTreeAutoscalling' was unexpected"),
        (lambda d: _set(d, f"{WORKERS}.0.maxReplicas", "three"), f"{WORKERS}.0.maxReplicas: 'three' is not of type"),
        (lambda d: _set(d, "spec.rayClusterConfig.headGroupSpec.rayStartParams.num-cpus", 0),
         "rayStartParams.num-cpus: 0 is not of type 'string'"),
        (lambda d: _set(d, "spec.rayClusterConfig.autoscalerOptions.upscalingMode", "Fast"), "'Fast' is not one of"),
        (lambda d: _set(d, "spec.rayClusterConfig.headGroupSpec", _DELETE), "'headGroupSpec' is a required property"),
        (lambda d: _set(d, "spec.serveConfigV2", {"applications": []}), "serveConfigV2: {'applications': []} is not"),
        (lambda d: _set(d, f"{WORKERS}.0.template.spec.containers.0.resources.limits.memory", "6 gigs"),
         "does not match"),
    ],
    ids=["misspelled-required", "misspelled-optional", "wrong-type", "number-for-string", "enum", "missing-required",
         "serveConfigV2-not-a-string", "bad-quantity"],
)
def test_the_validation_rejects_a_broken_manifest(validator, rayservice, change, expected):
    broken = copy.deepcopy(rayservice)
    change(broken)
    errors = schema_errors(validator, broken)
    assert any(expected in e for e in errors), errors


def test_the_validation_rejects_a_broken_raycluster(validator):
    broken = copy.deepcopy(manifest("raycluster.yaml", "RayCluster"))
    broken["spec"]["workerGroupSpecs"][1]["minReplicas"] = -1.5
    assert any("minReplicas: -1.5 is not of type 'integer'" in e for e in schema_errors(validator, broken))


# -- one application config ------------------------------------------------------------------------
def test_serve_config_v2_is_serve_yaml(serve_config):
    assert serve_config == yaml.safe_load((CLUSTER / "serve.yaml").read_text(encoding="utf-8"))


def test_serve_config_v2_is_a_serve_deploy_config(serve_config):
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema  # a pydantic model: starts no Ray

    ServeDeploySchema.model_validate(serve_config)
    # Serve's schema ignores unknown keys; a misspelled one would silently do nothing
    assert set(serve_config) <= set(ServeDeploySchema.model_fields)
    (app,) = serve_config["applications"]
    assert set(app) <= set(ServeApplicationSchema.model_fields)
    assert (app["name"], app["route_prefix"], app["import_path"]) == ("ragfan", "/", "serve_app.app:build_app")
    # resources and scaling come from the ragfan config alone, not from Serve-level overrides
    assert "deployments" not in app


def test_the_raycluster_is_the_rayservice_cluster(cluster_spec):
    assert manifest("raycluster.yaml", "RayCluster")["spec"] == cluster_spec


# -- the ragfan config it names ---------------------------------------------------------------------
def _comparable(config: AppConfig) -> dict[str, Any]:
    """What must not differ from the embedded default: all but placement and scaling."""
    dump = config.model_dump()
    for r in [*dump["retrievers"], dump["gateway"], dump["encoder"]]:
        r["ray_actor_options"].pop("resources")
        for key in ("num_replicas", "autoscaling_config"):
            r.pop(key)
    dump["encoder"].pop("placement")  # a cluster gives the encoder replicas, pods and a GPU of its own
    return dump


def test_the_cluster_config_is_the_default_but_for_placement_and_scaling(ragfan_config):
    check_files(ragfan_config)
    assert _comparable(ragfan_config) == _comparable(load_config())


def _offered(group: dict[str, Any]) -> dict[str, float]:
    """Custom resources a group advertises: rayStartParams `resources` is a quoted JSON string for the shell."""
    raw = group.get("rayStartParams", {}).get("resources")
    return json.loads(json.loads(raw)) if raw else {}


def test_dense_retrievers_require_what_only_the_dense_group_offers(ragfan_config, cluster_spec):
    groups = {g["groupName"]: g for g in cluster_spec["workerGroupSpecs"]}
    assert _offered(groups["dense"]) == {"dense": 4}
    assert groups["dense"]["template"]["metadata"]["labels"]["ragfan/retrievers"] == "dense"
    assert [n for n, g in groups.items() if "dense" in _offered(g)] == ["dense"]
    for r in ragfan_config.retrievers:
        assert (r.ray_actor_options.resources or {}) == ({"dense": 1} if r.kind == "dense" else {}), r.name
    assert ragfan_config.gateway.ray_actor_options.resources is None
    # the head runs no replica
    assert cluster_spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_FACTOR = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: str | int | float) -> float:
    match = _QUANTITY.match(str(value))
    assert match, f"not a Kubernetes quantity: {value!r}"
    return float(match.group(1)) * _FACTOR[match.group(2)]


def test_quantity():
    assert quantity("500m") == 0.5 and quantity(2) == 2 and quantity("6Gi") == 6 * 2**30


def _pod(group: dict[str, Any]) -> tuple[float, float]:
    """(CPUs, bytes) of a group's Ray container: KubeRay tells Ray the limits."""
    (container,) = group["template"]["spec"]["containers"]
    res = container["resources"]
    assert res["requests"] == res["limits"], f"{group.get('groupName', 'head')}: requests != limits"
    return quantity(res["limits"]["cpu"]), quantity(res["limits"]["memory"])


def _replicas(config: AppConfig) -> list[tuple[str, float, int, dict[str, float], int]]:
    """(name, num_cpus, memory, custom resources, replicas at the most) per deployment."""
    out = []
    deployments = [("gateway", config.gateway), *((r.name, r) for r in config.retrievers)]
    deployments += [(f"encoder of {model}", config.encoder) for model in config.shared_models]
    for name, scaling in deployments:
        opts = scaling.ray_actor_options
        out.append((name, opts.num_cpus, opts.memory or 0, opts.resources or {}, scaling.most_replicas))
    return out


def test_every_replica_fits_a_pod_of_a_group_that_offers_what_it_needs(ragfan_config, cluster_spec):
    groups = cluster_spec["workerGroupSpecs"]
    for name, cpus, memory, resources, _ in _replicas(ragfan_config):
        fits = [
            g["groupName"] for g in groups
            if all(_offered(g).get(k, 0) >= v for k, v in resources.items())
            and _pod(g)[0] >= cpus and _pod(g)[1] >= memory
        ]
        assert fits, f"{name} ({cpus} CPU, {memory} B, {resources}) fits no worker group"


def test_the_groups_hold_every_replica_at_full_scale(ragfan_config, cluster_spec):
    groups = {g["groupName"]: g for g in cluster_spec["workerGroupSpecs"]}
    replicas = _replicas(ragfan_config)
    dense = [(cpus, memory, most) for _, cpus, memory, res, most in replicas if "dense" in res]
    units = _offered(groups["dense"])["dense"]
    # enough dense units at maxReplicas, and a pod full of dense replicas fits the pod
    assert sum(most for *_, most in dense) <= groups["dense"]["maxReplicas"] * units
    cpu, mem = _pod(groups["dense"])
    assert units * max(c for c, _, _ in dense) <= cpu and units * max(m for _, m, _ in dense) <= mem
    # and everything at its most fits into all groups at their most
    assert sum(c * n for _, c, _, _, n in replicas) <= sum(g["maxReplicas"] * _pod(g)[0] for g in groups.values())
    assert sum(m * n for _, _, m, _, n in replicas) <= sum(g["maxReplicas"] * _pod(g)[1] for g in groups.values())


def test_in_tree_autoscaling_with_bounds_per_group(cluster_spec):
    assert cluster_spec["enableInTreeAutoscaling"] is True
    assert cluster_spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    for g in cluster_spec["workerGroupSpecs"]:
        assert 1 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]


# -- storage, image, versions -----------------------------------------------------------------------
def _containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def _ray_groups(cluster_spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every group of Ray pods, the head's included: the Serve controller on the head builds the app and
    resolves the writes directory there, and any pod with CPUs can take the `versions` deployment
    (num_cpus 0.05, no custom resource), a retriever or the gateway."""
    return {"head": cluster_spec["headGroupSpec"], **{g["groupName"]: g for g in cluster_spec["workerGroupSpecs"]}}


def _volume_problems(spec: dict[str, Any], claim: str) -> list[str]:
    """Why a pod would not keep ragfan's files (indexes, artifacts, the write-ahead log, merged versions,
    pins) on the shared volume: a container without `claim` at VOLUME_PATH, or RAGFAN_CACHE_DIR elsewhere."""
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec.get("volumes", [])
              if "persistentVolumeClaim" in v}
    problems = []
    for c in _containers(spec):
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        if claims.get(mounts.get(VOLUME_PATH, "")) != claim:
            problems.append(f"{c['name']}: claim {claim} not mounted at {VOLUME_PATH}")
    env = {e["name"]: e.get("value") for e in spec["containers"][0].get("env", [])}
    if env.get("RAGFAN_CACHE_DIR") != VOLUME_PATH:
        problems.append(f"RAGFAN_CACHE_DIR is {env.get('RAGFAN_CACHE_DIR')!r}, not {VOLUME_PATH}")
    return problems


def test_every_ray_pod_and_the_ingest_job_keep_ragfans_files_on_the_shared_volume(cluster_spec):
    (pvc,) = documents(CLUSTER / "storage.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    (job,) = documents(CLUSTER / "ingest-job.yaml")
    pods = {name: g["template"]["spec"] for name, g in _ray_groups(cluster_spec).items()}
    pods["ingest-job"] = job["spec"]["template"]["spec"]
    assert {"head", "dense", "general", "ingest-job"} <= set(pods)
    problems = {name: _volume_problems(spec, pvc["metadata"]["name"]) for name, spec in pods.items()}
    assert problems == {name: [] for name in pods}


@pytest.mark.parametrize("drop", ["mount", "volume", "env"])
def test_a_pod_group_without_the_shared_volume_is_caught(cluster_spec, drop):
    head = copy.deepcopy(cluster_spec["headGroupSpec"]["template"]["spec"])
    container = head["containers"][0]
    if drop == "mount":
        del container["volumeMounts"]
    elif drop == "volume":
        del head["volumes"]
    else:
        container["env"] = [e for e in container["env"] if e["name"] != "RAGFAN_CACHE_DIR"]
    expected = (f"RAGFAN_CACHE_DIR is None, not {VOLUME_PATH}" if drop == "env"
                else f"ray-head: claim ragfan-index not mounted at {VOLUME_PATH}")
    assert _volume_problems(head, "ragfan-index") == [expected]


def test_the_writes_directory_is_on_the_shared_volume(ragfan_config, monkeypatch):
    """The pods' RAGFAN_CACHE_DIR puts the log and the merged versions on the volume (cluster_configs/README.md)."""
    monkeypatch.setenv("RAGFAN_CACHE_DIR", VOLUME_PATH)
    assert ragfan_config.writers, "ragfan-cluster.yaml takes writes"
    assert ragfan_config.writes_dir == Path(VOLUME_PATH) / ragfan_config.app_name / "writes"
    for r in ragfan_config.retrievers:
        for spec in ragfan_config.specs(r):
            assert spec.writes_dir is None or spec.writes_dir.is_relative_to(VOLUME_PATH), spec.deployment


def test_one_image_one_ray_version_one_torch(cluster_spec):
    dockerfile = (CLUSTER / "Dockerfile").read_text(encoding="utf-8")
    ray_version = cluster_spec["rayVersion"]
    assert ray_version == version("ray"), "the manifests' Ray must be the Ray ragfan is tested with"
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray_version)}-py\d+-cpu$", dockerfile, re.M)
    workdir = re.search(r"^WORKDIR (\S+)$", dockerfile, re.M).group(1)
    pods = [cluster_spec["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in cluster_spec["workerGroupSpecs"]]
    containers = [c for spec in pods for c in spec["containers"]]
    assert {c["image"] for c in containers} == {"ragfan:0.1.0"}
    assert {c["workingDir"] for c in containers} == {workdir}
    # the torch pin is the Makefile's, so the image runs what the tests ran
    pin = re.search(r'"torch==([\d.]+)"', (ROOT / "Makefile").read_text(encoding="utf-8")).group(1)
    assert f'"torch=={pin}" --index-url https://download.pytorch.org/whl/cpu' in dockerfile
    assert re.search(r"^ENV HF_HUB_OFFLINE=1$", dockerfile, re.M)


def test_every_pod_runs_with_ragfans_serve_env_and_the_head_reads_the_api_keys(cluster_spec):
    from serve_app.app import SERVE_ENV

    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    for group in groups:
        env = {e["name"]: e.get("value") for e in group["template"]["spec"]["containers"][0]["env"]}
        assert {k: env.get(k) for k in SERVE_ENV} == SERVE_ENV
    head_env = {e["name"]: e for e in groups[0]["template"]["spec"]["containers"][0]["env"]}
    assert head_env["RAGFAN_API_KEYS"]["valueFrom"]["secretKeyRef"]["optional"] is True
