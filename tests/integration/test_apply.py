"""Applying a changed config to the running app (`ragfan apply`) loses no search, and restarts only what
changed: a deadline or weight reconfigures the gateway, a replica count scales, a retriever added or
removed starts or stops only its own deployment."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from serve_app.apply import apply, replicas
from serve_app.config import parse_config
from tests.integration.conftest import synthetic, wait_until

pytestmark = pytest.mark.integration


def raw(**changes) -> dict:
    retrievers = {"a": synthetic("a", delay_ms=20), "b": synthetic("b", delay_ms=20)}
    for name, fields in changes.items():
        if fields is None:
            retrievers.pop(name, None)
        else:
            retrievers[name] = {**retrievers.get(name, synthetic(name, delay_ms=20)), **fields}
    return {"app_name": "applied", "cache": None, "gateway": {"ray_actor_options": {"num_cpus": 0.1}},
            "retrievers": list(retrievers.values())}


def config(**changes):
    return parse_config(raw(**changes), base_dir=Path("."))


class Load:
    def __init__(self, url: str, threads: int = 4) -> None:
        self.url, self.statuses, self.stop = url, [], threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                try:
                    self.statuses.append(client.post(f"{self.url}/v1/search", json={"query": "stem cells"}).status_code)
                except httpx.HTTPError as exc:
                    self.statuses.append(type(exc).__name__)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        wait_until(lambda: len(self.statuses) >= 10, 60)
        return self

    def __exit__(self, *exc) -> None:
        n = len(self.statuses)
        wait_until(lambda: len(self.statuses) >= n + 10, 60)  # searches after the change too
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


@pytest.fixture(scope="module")
def applied(cluster):
    from ray import serve

    apply(config(), api_keys=[], route_prefix="/applied")
    yield cluster + "/applied"
    serve.delete("applied")


def test_a_changed_deadline_and_weight_restart_nothing_and_lose_no_search(applied, http):
    before = replicas("applied")
    with Load(applied) as load:
        done = apply(config(a={"weight": 0.4}, b={"timeout_ms": 2500}), api_keys=[], route_prefix="/applied")
    assert [s for s in load.statuses if s != 200] == []
    assert done.before == before and done.after == before  # every replica of every deployment kept
    info = {r["name"]: r["config"] for r in http.get(f"{applied}/v1/retrievers").json()["retrievers"]}
    assert info["a"]["weight"] == 0.4 and info["b"]["timeout_ms"] == 2500
    assert any("kept" in line for line in done.lines()) and not any("restarted" in line for line in done.lines())


def test_a_retriever_added_then_removed_starts_and_stops_only_its_own_deployment(applied, http):
    before = replicas("applied")
    with Load(applied) as load:
        added = apply(config(c={}), api_keys=[], route_prefix="/applied")
    assert [s for s in load.statuses if s != 200] == []
    assert {d: ids for d, ids in added.after.items() if d != "c"} == before and len(added.after["c"]) == 1
    answer = http.post(f"{applied}/v1/search", json={"query": "stem cells"}).json()
    assert answer["retrievers"]["c"]["status"] == "ok"
    with Load(applied) as load:
        removed = apply(config(), api_keys=[], route_prefix="/applied")
    assert [s for s in load.statuses if s != 200] == []
    assert "c" not in removed.after and removed.after == before
    assert "c" not in http.post(f"{applied}/v1/search", json={"query": "stem cells"}).json()["retrievers"]


def test_a_replica_count_scales_without_restarting_the_replica_that_runs(applied, http):
    before = replicas("applied")
    with Load(applied) as load:
        scaled = apply(config(a={"num_replicas": 2}), api_keys=[], route_prefix="/applied")
    assert [s for s in load.statuses if s != 200] == []
    assert before["a"] < scaled.after["a"] and len(scaled.after["a"]) == 2
    assert {d: ids for d, ids in scaled.after.items() if d != "a"} == {d: ids for d, ids in before.items() if d != "a"}
    assert any(line.split()[0] == "a" and "scaled from 1 to 2 replicas, 1 kept" in line for line in scaled.lines())


def test_ragfan_apply_on_the_command_line_reports_what_serve_kept(applied, tmp_path):
    import yaml

    apply(config(), api_keys=[], route_prefix="/applied")  # whatever the tests before left: the config below
    path = tmp_path / "same.yaml"
    path.write_text(yaml.safe_dump(raw()))
    done = subprocess.run([sys.executable, "-m", "serve_app.cli", "apply", "--config", str(path), "--address", "auto",
                           "--route-prefix", "/applied"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"ragfan: applied {path} to app applied in ")
    assert "  a                    kept (1 replica)" in done.stdout and "restarted" not in done.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**raw(), "gateway": {"max_body_bytes": 10}}))
    refused = subprocess.run([sys.executable, "-m", "serve_app.cli", "apply", "--config", str(bad)],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "gateway.max_body_bytes" in refused.stderr and "Traceback" not in refused.stderr
