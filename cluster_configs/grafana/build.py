"""ragfan's Grafana dashboard, written with grafanalib.

    .venv/bin/python cluster_configs/grafana/build.py     # writes cluster_configs/grafana/ragfan.json

Every panel is PromQL over the metrics that Ray exports for ragfan (actors/metrics.py's METRICS, with
Ray's `ray_` prefix) and one of Serve's own (`ray_serve_deployment_replica_healthy`). Two variables: the
Prometheus data source, and the `application` (Serve's app_name; All by default).

Importable too: `dashboard()` is the JSON as a dict, `expressions()` every PromQL expression in it, and
`metric_names()` the metric names an expression reads. tests/unit/test_grafana.py keeps ragfan.json equal
to what this writes; tests/integration/test_prometheus.py checks against a live Prometheus that every name
the dashboard reads is exported, and that every expression runs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from grafanalib._gen import DashboardEncoder
from grafanalib.core import Dashboard, GridPos, StateTimeline, Target, Template, Templating, Time, TimeSeries

OUT = Path(__file__).resolve().parent / "ragfan.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
APP = 'application=~"$application"'  # every selector is filtered by the `application` variable
WINDOW = "$__rate_interval"  # Grafana's: at least four scrape intervals, so a rate always has two samples
WIDTH, HEIGHT = 12, 8  # two panels a row (Grafana's grid is 24 wide)
SCHEMA_VERSION = 39  # Grafana 10's dashboard schema: timeseries and state-timeline panels


# -- PromQL ----------------------------------------------------------------------------------------
def rate(metric: str, *matchers: str) -> str:
    return f"rate({metric}{{{', '.join((APP, *matchers))}}}[{WINDOW}])"


def quantile(q: float, histogram: str, by: str) -> str:
    """The q-quantile of a Prometheus histogram, per `by`, over every replica."""
    return f"histogram_quantile({q}, sum by (le, {by}) ({rate(histogram + '_bucket')}))"


def average(histogram: str, by: str) -> str:
    """The mean observation of a histogram, per `by`: its rate of sum over its rate of count."""
    return f"sum by ({by}) ({rate(histogram + '_sum')}) / sum by ({by}) ({rate(histogram + '_count')})"


def share(counter: str, part: str, by: str = "") -> str:
    """The share of a counter's increase that has the label `part` (0 while none has it, not empty)."""
    total = f"sum by ({by}) " if by else "sum"
    whole = f"{total}({rate(counter)})"
    return f"({total}({rate(counter, part)}) or {whole} * 0) / {whole}"


def target(expr: str, legend: str, ref: str) -> Target:
    return Target(expr=expr, legendFormat=legend, refId=ref, datasource=DATASOURCE)


def p50_and_p99(histogram: str, by: str, legend: str = "") -> list[Target]:
    """Two targets, A and B: the histogram's p50 and p99 per `by`, each legend ending in p50 or p99."""
    return [target(quantile(q, histogram, by), f"{legend}p{round(q * 100)}", ref)
            for q, ref in ((0.5, "A"), (0.99, "B"))]


# -- the panels ------------------------------------------------------------------------------------
SEARCHES = "ray_ragfan_searches_total"
OUTCOMES = "ray_ragfan_retriever_outcomes_total"
CACHE = "ray_ragfan_cache_lookups_total"
BREAKER_STATES = [  # ragfan_breaker_state's values (serve_app/telemetry.py: BREAKER_LEVEL)
    (0, "closed", "green"), (1, "half-open", "yellow"), (2, "open", "red"),
]


def panels() -> list[Any]:
    """The dashboard's panels, in reading order (left to right, then down)."""
    series = [
        TimeSeries(
            title="Searches per second",
            description="Searches answered, all and by answer: complete, degraded (a retriever failed or a shard "
                        "was missing), failed (503). Each search of a batch counts.",
            targets=[target(f"sum({rate(SEARCHES)})", "all", "A"),
                     target(f"sum by (answer) ({rate(SEARCHES)})", "{{answer}}", "B")],
            unit="reqps",
        ),
        TimeSeries(
            title="Search latency at the gateway",
            description="Whole-search latency, from the request's validation to its fused answer.",
            targets=p50_and_p99("ray_ragfan_search_seconds", "application"),
            unit="s",
        ),
        TimeSeries(
            title="Retriever latency, p50 and p99",
            description="Each retriever's latency per search as the gateway saw it, timeouts and errors included "
                        "(a timeout counts at its deadline). Skipped calls took no time and are not counted.",
            targets=p50_and_p99("ray_ragfan_retriever_seconds", "retriever", legend="{{retriever}} "),
            unit="s",
        ),
        TimeSeries(
            title="Retriever outcomes",
            description="Each retriever's outcome per search, stacked: ok, timeout, error, skipped (in-flight "
                        "bound), circuit_open (its breaker was open).",
            targets=[target(f"sum by (retriever, status) ({rate(OUTCOMES)})", "{{retriever}} {{status}}", "A")],
            unit="ops", stacking={"mode": "normal", "group": "A"}, fillOpacity=40,
        ),
        TimeSeries(
            title="Degraded and failed answers",
            description="The share of searches answered degraded (at least one retriever missing) and failed "
                        "(none answered).",
            targets=[target(share(SEARCHES, 'answer="degraded"'), "degraded", "A"),
                     target(share(SEARCHES, 'answer="failed"'), "failed", "B")],
            unit="percentunit", valueMin=0, valueMax=1,
        ),
        TimeSeries(
            title="Result-cache hit rate",
            description="Per retriever: the share of cache lookups that were hits (bypass: the cache was "
                        "unreachable). Empty when the app runs without a cache.",
            targets=[target(share(CACHE, 'result="hit"', "retriever"), "{{retriever}}", "A")],
            unit="percentunit", valueMin=0, valueMax=1,
        ),
        TimeSeries(
            title="Batch size, gateway to retrievers and encoder (mean)",
            description="Queries per call the gateway sends downstream, per lane: a retriever, or "
                        "encoder:<model>.",
            targets=[target(average("ray_ragfan_gateway_batch_size", "lane"), "{{lane}}", "A")],
            unit="short",
        ),
        TimeSeries(
            title="Batch size, encoder forward pass (mean)",
            description="Texts per forward pass in the encoder replicas, per model.",
            targets=[target(average("ray_ragfan_encoder_batch_size", "model"), "{{model}}", "A")],
            unit="short",
        ),
        TimeSeries(
            title="Healthy replicas per deployment",
            description="Serve's own gauge, summed over replicas: the gateway, each retriever (and shard), the "
                        "encoder and the stats deployment.",
            targets=[target(f"sum by (deployment) (ray_serve_deployment_replica_healthy{{{APP}}})",
                            "{{deployment}}", "A")],
            unit="short", lineInterpolation="stepAfter",
        ),
        StateTimeline(
            title="Circuit breakers",
            description="Each retriever's breaker, the worst over gateway replicas: closed, half-open (probing), "
                        "open (calls skipped). Set every 2 s.",
            targets=[target(f"max by (retriever) (ray_ragfan_breaker_state{{{APP}}})", "{{retriever}}", "A")],
            mappings=[{"type": "value", "options": {str(value): {"text": text, "color": color, "index": value}
                                                    for value, text, color in BREAKER_STATES}}],
        ),
        TimeSeries(
            title="Calls in flight",
            description="Calls in flight from the gateway replicas to each retriever, summed. Set every 2 s.",
            targets=[target(f"sum by (retriever) (ray_ragfan_retriever_in_flight{{{APP}}})", "{{retriever}}", "A")],
            unit="short",
        ),
        TimeSeries(
            title="Deadline used, p99",
            description="Answered (ok) searches: a retriever's latency over its deadline. Near 100% it is about "
                        "to time out.",
            targets=[target(quantile(0.99, "ray_ragfan_retriever_deadline_ratio", "retriever"), "{{retriever}}",
                            "A")],
            unit="percentunit", valueMin=0,
        ),
    ]
    for i, panel in enumerate(series):
        panel.dataSource = DATASOURCE
        panel.gridPos = GridPos(h=HEIGHT, w=WIDTH, x=(i % 2) * WIDTH, y=(i // 2) * HEIGHT)
    return series


def variables() -> list[Template]:
    return [
        Template(name="datasource", label="Prometheus", type="datasource", query="prometheus"),
        Template(name="application", label="Application", dataSource=DATASOURCE,
                 query=f"label_values({SEARCHES}, application)", includeAll=True, multi=True, allValue=".*"),
    ]


def dashboard() -> dict[str, Any]:
    """The dashboard as Grafana imports it, as a plain dict."""
    built = Dashboard(
        title="ragfan", uid="ragfan", tags=["ragfan", "ray-serve"], timezone="browser",
        description="ragfan's retrieval gateway: searches, retrievers, cache, batches, replicas and breakers "
                    "(cluster_configs/grafana/build.py).",
        panels=panels(), templating=Templating(list=variables()), time=Time("now-30m", "now"),
        refresh="10s", schemaVersion=SCHEMA_VERSION,
    ).auto_panel_ids()
    board = json.loads(json.dumps(built.to_json_data(), cls=DashboardEncoder))
    for variable in board["templating"]["list"]:
        if variable["includeAll"]:  # as Grafana saves a multi-value variable set to All
            variable["current"] = {"selected": True, "text": ["All"], "value": ["$__all"]}
    return board


def render() -> str:
    """ragfan.json's text: sorted keys, so a change to the dashboard is a readable diff."""
    return json.dumps(dashboard(), sort_keys=True, indent=2) + "\n"


def expressions(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel."""
    for panel in board["panels"]:
        for t in panel.get("targets", []):
            yield panel["title"], t["expr"]


# -- metric names in PromQL -----------------------------------------------------------------------
_NAME_MATCHER = re.compile(r"""__name__\s*=\s*(?:"([^"]*)"|'([^']*)')""")
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")  # [5m], [$__rate_interval], subqueries' [1h:1m]
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")  # Grafana's
_IDENTIFIER = re.compile(r"(?<![\w.:])[a-zA-Z_:][a-zA-Z0-9_:]*")  # not the tail of a number or duration
KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                      "unless", "offset", "atan2", "inf", "nan"})


def metric_names(expr: str) -> list[str]:
    """The metric names a PromQL expression reads, in order, each once.

    Left out: functions and aggregations (a name followed by `(`), keywords and binary operators, label
    names in by/without/on/ignoring/group_* lists, label matchers, strings, ranges and durations,
    numbers, and Grafana's $variables. A matcher `{__name__="x"}` counts as the name x.
    """
    names = [a or b for a, b in _NAME_MATCHER.findall(expr)]
    rest = _STRING.sub(" ", expr)
    for pattern in (_MATCHERS, _RANGE, _GROUPING, _VARIABLE):
        rest = pattern.sub(" ", rest)
    for m in _IDENTIFIER.finditer(rest):
        word, after = m.group(), rest[m.end():].lstrip()
        if word.lower() in KEYWORDS or after.startswith("("):
            continue
        names.append(word)
    return list(dict.fromkeys(names))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Write ragfan's Grafana dashboard JSON from its panels.")
    parser.add_argument("out", nargs="?", type=Path, default=OUT,
                        help=f"where to write it (default: {OUT.name} beside this script)")
    out = parser.parse_args(argv).out
    out.write_text(render(), encoding="utf-8")
    board = json.loads(out.read_text(encoding="utf-8"))
    print(f"wrote {out}: {len(board['panels'])} panels, {len(list(expressions(board)))} queries")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
