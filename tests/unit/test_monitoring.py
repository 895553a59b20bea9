"""cluster_configs/prometheus/: the local scrape config and the KubeRay monitors, checked without Kubernetes.

The monitors are Prometheus Operator resources, not KubeRay's, so test_manifests.py's CRD schemas do not
cover them (and it reads only cluster_configs/*.yaml). Here: they parse, and their selectors pick the pods
that KubeRay makes from our manifests (KubeRay labels every pod `ray.io/node-type` and `ray.io/cluster`,
keeps the template's labels, and adds a container port `metrics`, 8080, unless the template names one).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "cluster_configs" / "prometheus"
MONITORS = PROMETHEUS / "kuberay-monitors.yaml"
RAY_MANIFESTS = [ROOT / "cluster_configs" / name for name in ("rayservice.yaml", "raycluster.yaml")]
METRICS_PORT = 8080  # KubeRay's default for the port it names `metrics`


def monitors() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MONITORS.read_text(encoding="utf-8")) if d]


def monitor(name: str) -> dict[str, Any]:
    (found,) = [m for m in monitors() if m["metadata"]["name"] == name]
    return found


def cluster_specs() -> list[Any]:
    """(the RayCluster's name as KubeRay would make it, its spec) for each of our manifests."""
    specs = []
    for path in RAY_MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc and doc.get("kind") == "RayCluster":
                specs.append(pytest.param(doc["metadata"]["name"], doc["spec"], id=path.name))
            elif doc and doc.get("kind") == "RayService":
                # a RayService names its cluster `<name>-<5 random characters>`
                name = doc["metadata"]["name"] + "-x7k2q"
                specs.append(pytest.param(name, doc["spec"]["rayClusterConfig"], id=path.name))
    assert len(specs) == 2
    return specs


def pod_labels(cluster: str, node_type: str, template: dict[str, Any]) -> dict[str, str]:
    """The labels KubeRay gives a pod: the template's, plus its own."""
    own = {"ray.io/node-type": node_type, "ray.io/cluster": cluster, "ray.io/is-ray-node": "yes"}
    return {**template.get("metadata", {}).get("labels", {}), **own}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against a pod's labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        ok = {
            "In": lambda e=e: labels.get(e["key"]) in e["values"],
            "NotIn": lambda e=e: labels.get(e["key"]) not in e["values"],
            "Exists": lambda e=e: e["key"] in labels,
            "DoesNotExist": lambda e=e: e["key"] not in labels,
        }[e["operator"]]()
        if not ok:
            return False
    return True


def kept(endpoint: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether the endpoint's `keep`/`drop` relabelings keep a pod, as Prometheus applies them (anchored regex
    over the source labels, joined by `;`): __meta_kubernetes_pod_label_<name> is the pod's label."""
    meta = {"__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k): v for k, v in labels.items()}
    for rule in endpoint.get("relabelings", []):
        action = rule.get("action", "replace")
        if action in ("keep", "drop"):
            value = rule.get("separator", ";").join(meta.get(s, "") for s in rule["sourceLabels"])
            matched = re.fullmatch(rule.get("regex", "(.*)"), value) is not None
            if matched != (action == "keep"):
                return False
    return True


def scraped(pod: dict[str, str]) -> list[str]:
    """The monitors that scrape this pod."""
    return [m["metadata"]["name"] for m in monitors()
            if selects(m["spec"]["selector"], pod) and all(kept(e, pod) for e in m["spec"]["podMetricsEndpoints"])]


def test_the_monitors_are_prometheus_operator_pod_monitors_found_by_the_stack():
    docs = monitors()
    assert [d["kind"] for d in docs] == ["PodMonitor", "PodMonitor"]
    for d in docs:
        assert d["apiVersion"] == "monitoring.coreos.com/v1"
        assert d["metadata"]["labels"]["release"] == "prometheus"  # kube-prometheus-stack's podMonitorSelector
        assert d["spec"]["namespaceSelector"]["matchNames"]
        for endpoint in d["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] == "metrics"
            # every series says which RayCluster it came from, as in KubeRay's guide
            assert {"sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"],
                    "targetLabel": "ray_io_cluster"} in endpoint["relabelings"]


@pytest.mark.parametrize(("cluster", "spec"), cluster_specs())
def test_every_pod_of_our_clusters_is_scraped_once_on_its_metrics_port(cluster, spec):
    head = pod_labels(cluster, "head", spec["headGroupSpec"]["template"])
    assert scraped(head) == ["ragfan-ray-head"]
    pods = [head]
    for group in spec["workerGroupSpecs"]:
        worker = pod_labels(cluster, "worker", group["template"])
        assert scraped(worker) == ["ragfan-ray-workers"], group["groupName"]
        pods.append(worker)
    assert len(pods) == 3  # the head, dense and general
    # The port the monitors name: KubeRay adds `metrics` (8080) to the Ray container unless the manifest
    # names one; if a manifest ever does, it must still be the port Ray exports on.
    templates = [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]
    for template in templates:
        ports = template["spec"]["containers"][0].get("ports", [])
        assert [p["containerPort"] for p in ports if p.get("name") == "metrics"] in ([], [METRICS_PORT])
        assert METRICS_PORT not in [p["containerPort"] for p in ports if p.get("name") != "metrics"]


def test_pods_of_other_ray_clusters_are_not_scraped():
    other = {"ray.io/cluster": "someone-else", "ray.io/is-ray-node": "yes"}
    assert scraped({**other, "ray.io/node-type": "head"}) == []
    assert scraped({**other, "ray.io/node-type": "worker"}) == []
    assert scraped({**other, "ray.io/node-type": "head", "ray.io/cluster": "ragfanatic"}) == []


def test_the_local_scrape_config_scrapes_rays_pinned_metrics_port():
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text(encoding="utf-8"))
    (job,) = config["scrape_configs"]
    assert job["static_configs"] == [{"targets": [f"127.0.0.1:{METRICS_PORT}"]}]  # ragfan serve --metrics-port 8080
    assert config["global"]["scrape_interval"] == "5s"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed: run `make debs`")
def test_promtool_accepts_the_local_scrape_config():
    check = subprocess.run(["promtool", "check", "config", str(PROMETHEUS / "prometheus.yml")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
