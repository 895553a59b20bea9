"""cluster_configs/grafana/: the committed dashboard is what build.py writes, every panel asks Prometheus
something, and build.py's `metric_names` finds the metric names in PromQL. No Ray, no Grafana (it cannot
be installed here); tests/integration/test_prometheus.py runs the dashboard's queries on a real Prometheus.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from actors.metrics import METRICS

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "cluster_configs" / "grafana" / "build.py"


def load_build() -> ModuleType:
    """cluster_configs/grafana/build.py, a script outside any package, as a module."""
    spec = importlib.util.spec_from_file_location("ragfan_grafana_build", BUILD)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


build = load_build()


@pytest.fixture(scope="module")
def board() -> dict:
    return json.loads(build.OUT.read_text(encoding="utf-8"))


def test_the_committed_json_is_what_build_py_writes(board):
    # if this fails: .venv/bin/python cluster_configs/grafana/build.py, and commit ragfan.json
    assert build.OUT.read_text(encoding="utf-8") == build.render()
    assert board == build.dashboard()


def test_the_script_writes_the_dashboard(tmp_path):
    out = tmp_path / "ragfan.json"
    assert build.main([str(out)]) == 0
    assert out.read_text(encoding="utf-8") == build.render()


def test_every_panel_asks_prometheus_something(board):
    assert len(board["panels"]) >= 10
    for panel in board["panels"]:
        exprs = [t["expr"].strip() for t in panel["targets"]]
        assert exprs and all(exprs), panel["title"]
        assert all(t["datasource"] == {"type": "prometheus", "uid": "${datasource}"} for t in panel["targets"])
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])


def test_panels_tile_the_grid_without_overlap(board):
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, panel["title"]
        cells |= mine


def test_a_datasource_variable_and_an_application_filter_on_every_query(board):
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    app = variables["application"]
    assert app["includeAll"] and app["allValue"] == ".*"
    assert build.metric_names(app["query"].removeprefix("label_values(").split(",")[0]) == ["ray_ragfan_searches_total"]
    for title, expr in build.expressions(board):
        selectors = expr.count("{")
        assert expr.count('application=~"$application"') == selectors > 0, title


def test_the_dashboard_reads_ragfans_metrics_by_their_exported_names(board):
    """Every name is one Ray exports: ray_ + a name in actors/metrics.py (+ _bucket/_sum/_count for a
    histogram), or Serve's replica gauge."""
    exported = {"ray_serve_deployment_replica_healthy"}
    for spec in METRICS:
        suffixes = ("_bucket", "_sum", "_count") if spec.kind == "histogram" else ("",)
        exported |= {f"ray_{spec.name}{s}" for s in suffixes}
    read = {name for _, expr in build.expressions(board) for name in build.metric_names(expr)}
    assert read <= exported, read - exported
    wanted = {"ray_ragfan_searches_total", "ray_ragfan_retriever_seconds_bucket", "ray_ragfan_retriever_outcomes_total",
              "ray_ragfan_cache_lookups_total", "ray_ragfan_gateway_batch_size_sum",
              "ray_ragfan_gateway_batch_size_count", "ray_ragfan_encoder_batch_size_sum",
              "ray_ragfan_encoder_batch_size_count", "ray_serve_deployment_replica_healthy",
              "ray_ragfan_breaker_state", "ray_ragfan_retriever_in_flight",
              "ray_ragfan_retriever_deadline_ratio_bucket"}
    assert wanted <= read, wanted - read


@pytest.mark.parametrize(("expr", "names"), [
    ('histogram_quantile(0.99, sum by (le, retriever) (rate(ray_ragfan_retriever_seconds_bucket'
     '{application=~"$application"}[$__rate_interval])))', ["ray_ragfan_retriever_seconds_bucket"]),
    ("sum(rate(a_total[5m])) by (le) / sum(rate(b_total{x='y'}[5m])) without (replica)", ["a_total", "b_total"]),
    ('(sum by (retriever) (rate(c{result="hit"}[1m])) or sum by (retriever) (rate(c[1m])) * 0) / on (retriever) '
     "group_left (model) d", ["c", "d"]),
    ("up == bool 1 unless on (job) absent(foo_seconds_count)", ["up", "foo_seconds_count"]),
    ("max_over_time(job:rate5m:sum[1h:1m] offset 30m) > 2e3 and 0x1f < Inf", ["job:rate5m:sum"]),
    ('label_replace(m, "dst (x)", "$1", "src {y}", "(.*)")', ["m"]),
    ('{__name__="ray_x", le="0.5"} + vector(0) + time()', ["ray_x"]),
    ("sum without (replica) (g) / ignoring (le) sum(h{le=\"+Inf\"})", ["g", "h"]),
    ('rate(ray_serve_num_http_requests_total{route=~"/(a|b)"}[$__interval]) * ${factor}',
     ["ray_serve_num_http_requests_total"]),
])
def test_metric_names_leaves_out_functions_keywords_labels_strings_and_durations(expr, names):
    assert build.metric_names(expr) == names
