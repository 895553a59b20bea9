"""What `make serve` costs: time to the first all-`ok` answer, and memory summed over its processes.

    .venv/bin/python -m benchmarks.startup --runs 3 --output docs/data/startup.json

Each run starts `ragfan serve` as `make serve` does (the embedded default config, a cluster of its
own), posts a search every 0.25 s from the moment it starts, and stops the clock at the first answer
in which every retriever says `ok`. It then waits `--settle` seconds, sums the resident memory of
`ragfan serve` and every process under it (Ray's GCS, raylet, agents, Serve's controller and proxy,
one worker per replica), by role, and stops the service with SIGINT, as Ctrl-C does.

Run `make serve` once beforehand (or pass --runs 4 and read the last three): the first start on a
machine embeds the demo collections into the index cache, which a warm start only reads.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.resources import role_of

QUERY = {"query": "what does the knowledge graph say about insulin?", "top_k": 5}
GIVE_UP_S = 300.0


def _by_role(root: psutil.Process, measure: Callable[[psutil.Process], float]) -> dict[str, float]:
    """`measure` of `ragfan serve` and each process under it, summed per role."""
    total: dict[str, float] = defaultdict(float)
    for p in [root, *root.children(recursive=True)]:
        try:
            role = "ragfan serve" if p.pid == root.pid else role_of(" ".join([p.name(), *p.cmdline()]))
            total[role] += measure(p)
        except psutil.Error:
            pass
    return dict(sorted(total.items()))


def _rss_mb(p: psutil.Process) -> float:
    return p.memory_info().rss / 2**20


def _cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def _first_all_ok(url: str, proc: subprocess.Popen, started: float) -> tuple[float, dict[str, str]]:
    """Seconds from start to the first answer with every retriever `ok`, and the first answer's statuses."""
    first: dict[str, str] = {}
    with httpx.Client(timeout=10.0) as http:
        while time.perf_counter() - started < GIVE_UP_S:
            if proc.poll() is not None:
                raise RuntimeError(f"ragfan serve exited with {proc.returncode} before answering")
            try:
                reply = http.post(url, json=QUERY)
            except httpx.HTTPError:
                time.sleep(0.25)
                continue
            if reply.status_code == 200:
                statuses = {name: r["status"] for name, r in reply.json()["retrievers"].items()}
                first = first or statuses
                if all(s == "ok" for s in statuses.values()):
                    return time.perf_counter() - started, first
            time.sleep(0.25)
    raise RuntimeError(f"no all-ok answer within {GIVE_UP_S:.0f} s")


def one_run(port: int, settle_s: float, config: str | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    command = [str(Path(sys.executable).parent / "ragfan"), "serve", "--port", str(port)]
    proc = subprocess.Popen(command + (["--config", config] if config else []),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        ready_s, first = _first_all_ok(f"http://127.0.0.1:{port}/v1/search", proc, started)
        # what each role had spent to get there: on 2 cores, start-up is mostly CPU
        cpu = {role: round(s, 1) for role, s in _by_role(psutil.Process(proc.pid), _cpu_s).items()}
        time.sleep(settle_s)
        rss = {role: round(mb) for role, mb in _by_role(psutil.Process(proc.pid), _rss_mb).items()}
        processes = len(psutil.Process(proc.pid).children(recursive=True)) + 1
    finally:
        stop = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return {"ready_s": round(ready_s, 1), "first_answer": first, "cpu_s_to_ready": round(sum(cpu.values()), 1),
            "cpu_s_to_ready_by_role": cpu, "rss_mb": round(sum(rss.values())),
            "rss_mb_by_role": rss, "processes": processes, "stop_s": round(time.perf_counter() - stop, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--port", type=int, default=8790)
    parser.add_argument("--settle", type=float, default=10.0, help="seconds at rest before memory is summed")
    parser.add_argument("--config", help="serve this config instead of the embedded default")
    parser.add_argument("--output", help="write the runs and medians as JSON here")
    args = parser.parse_args()
    runs = []
    for i in range(args.runs):
        runs.append(one_run(args.port, args.settle, args.config))
        r = runs[-1]
        print(f"run {i + 1}: all ok after {r['ready_s']} s ({r['cpu_s_to_ready']} CPU-s), "
              f"{r['rss_mb']:,} MB over {r['processes']} processes, "
              f"stopped in {r['stop_s']} s", flush=True)
    report = {"runs": runs, "median_ready_s": statistics.median(r["ready_s"] for r in runs),
              "median_rss_mb": statistics.median(r["rss_mb"] for r in runs),
              "config": args.config or "the embedded default",
              "env": {k: v for k, v in os.environ.items() if k.startswith(("RAY_SERVE", "RAGFAN"))}}
    print(f"median: all ok after {report['median_ready_s']} s, {report['median_rss_mb']:,} MB")
    print("MB by role (last run):", ", ".join(f"{k} {v}" for k, v in runs[-1]["rss_mb_by_role"].items()))
    print("CPU-s to ready by role (last run):",
          ", ".join(f"{k} {v}" for k, v in runs[-1]["cpu_s_to_ready_by_role"].items()))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
