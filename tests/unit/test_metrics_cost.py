"""benchmarks/metrics_cost.py's summary: medians over rounds, per side, and the on/off ratios."""

from __future__ import annotations

from benchmarks.metrics_cost import format_report, summarize


def _run(path: str, on: bool, qps: float, gateway_ms: float, round_: int) -> dict:
    roles = {"gateway": gateway_ms, "corpus": 10.0} | ({"stats": 0.1} if on else {})
    return {"system": path, "metrics": on, "round": round_, "qps": qps, "p50_ms": 100.0,
            "cpu_ms_per_query_by_role": roles}


def test_summary_takes_medians_per_side_and_divides_them():
    runs = [_run(path, on, qps, ms, i)
            for i, (on_qps, off_qps) in enumerate([(90, 100), (99, 101), (95, 200)], 1)
            for path in ("handle", "http")
            for on, qps, ms in ((True, on_qps, 6.0), (False, off_qps, 5.0))]
    summary = summarize(runs)
    handle = summary["handle"]
    assert handle["on"]["qps"] == 95 and handle["off"]["qps"] == 101  # a noisy round does not move a median
    assert handle["qps_on_over_off"] == round(95 / 101, 3)
    assert handle["gateway_cpu_on_over_off"] == 1.2
    assert handle["on"]["stats_cpu_ms_per_query"] == 0.1 and handle["off"]["stats_cpu_ms_per_query"] == 0.0
    assert handle["cluster_cpu_on_over_off"] == round(16.1 / 15.0, 3)
    text = format_report({"runs": runs, "summary": summary})
    assert "handle: median QPS on 95.00 / off 101.00" in text
