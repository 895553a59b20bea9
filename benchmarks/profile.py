"""Where each served process spends its time: py-spy stacks, summarised as short markdown.

    ragfan bench --dataset DIR --concurrency 32 --pyspy 10 --pyspy-output docs/data/profile-scifact.md
    python -m benchmarks.profile --pid gateway=4242 --pid dense=4243 --seconds 10

`ragfan bench --pyspy SECONDS` records the busiest process of every role (the driver, the proxy,
the controller and each deployment: see resources.py) during the c=32 `ragfan-handle` run. py-spy
samples a process's Python stacks `rate` times a second from outside, without pausing it
(`--nonblocking`: now and then a stack is torn, but the process is never slowed by stops). It
needs ptrace rights: root, or CAP_SYS_PTRACE. The profiled run's own figures include py-spy's CPU
(its own role in the CPU table), so take the headline figures from a run without `--pyspy`.

How to read the summary:

- *samples*: stacks recorded while one of the process's threads ran Python code. py-spy leaves
  idle threads out (blocked on a lock, a socket, a sleep), so the percentages say where the busy
  time goes, not how busy the process was; the CPU table by role says that (ms per query).
- *leaf frames* (self time): the function on top of the stack, the one running when sampled, with
  its line numbers merged. A few leaves holding most samples is a hot spot; a long flat tail is
  overhead spread over many layers. A leaf of `Worker.main_loop` or `Thread.run` is native code
  running below it: in a Ray worker, Ray's C++ core (RPCs, task dispatch), which py-spy shows only
  with `--native`, at a much higher cost. A leaf that waits (`_worker` of a thread pool,
  `Condition.wait`) caught its thread runnable: waking up, or waiting for the GIL.
- *inclusive*: the share of samples whose stack passes anywhere through a group of functions
  (encoding, index search, fusion, serialisation, pydantic, Serve's routing, HTTP, logging). The
  groups may overlap: a pickle call inside Serve's router counts for both.

The raw stacks stay on disk (their directory is in the summary); flamegraph.pl or speedscope.app
draws them.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import resources

RATE = 50
TOP = 8
# Roles whose processes py-spy cannot usefully read: "ray" is mostly C++ (raylet, GCS), and
# "py-spy" is the profiler itself.
SKIP_ROLES = ("ray", "py-spy")
# Inclusive groups: a sample counts for a group when any frame of its stack contains one of these.
# Each names work that a query needs or that serving adds; none is a root that every stack passes.
GROUPS = {
    "query encoding (sentence-transformers, torch)": ("sentence_transformers/", "torch/"),
    "index search (faiss, bm25s)": ("faiss/", "bm25s/"),
    "fusion": ("serve_app/fusion.py",),
    "serialisation (pickle, Ray's serializer, msgpack)": ("pickle", "_private/serialization.py", "msgpack"),
    "pydantic (models, validation)": ("pydantic/", "pydantic_core"),
    "Serve request routing": ("serve/_private/router.py", "serve/_private/request_router/"),
    "HTTP (uvicorn, starlette, fastapi, httpx)": ("uvicorn/", "starlette/", "fastapi/", "httpx/", "httpcore/", "h11/"),
    "logging": ("logging/",),
}
_LINE = re.compile(r":\d+\)$")  # `encode (sentence_transformers/SentenceTransformer.py:512)`


@dataclass(frozen=True)
class RoleProfile:
    pid: int
    samples: int
    leaf: list[tuple[str, float]]  # (frame, % of samples), most first
    inclusive: list[tuple[str, float]]  # (group, % of samples), most first; groups never seen left out
    error: str | None = None  # why py-spy recorded nothing


def parse_raw(text: str) -> Counter[tuple[str, ...]]:
    """py-spy's `--format raw` (collapsed stacks: `root;...;leaf COUNT` per line) -> stack counts."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(_LINE.sub(")", frame) for frame in stack.split(";"))] += int(count)
    return stacks


def summarise(stacks: Counter[tuple[str, ...]], *, pid: int = 0, top: int = TOP) -> RoleProfile:
    total = sum(stacks.values())
    leaf: Counter[str] = Counter()
    groups: Counter[str] = Counter()
    for stack, n in stacks.items():
        leaf[stack[-1]] += n
        for group, needles in GROUPS.items():
            if any(needle in frame for frame in stack for needle in needles):
                groups[group] += n

    def shares(counts: Counter[str]) -> list[tuple[str, float]]:
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))  # ties by name: stable output
        return [(name, round(100 * n / total, 1)) for name, n in ranked]

    return RoleProfile(pid=pid, samples=total, leaf=shares(leaf)[:top], inclusive=shares(groups))


def py_spy() -> str:
    """The py-spy executable: beside this Python (the venv's), else on PATH."""
    found = shutil.which("py-spy", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if found is None:
        raise FileNotFoundError("py-spy not found; install the dev extras (`pip install -e '.[dev]'`)")
    return found


class Recorder:
    """py-spy on each `role -> pid` for `seconds`, started on entering; `.profiles` after the block.

    Exiting waits for the recordings to end (py-spy stops itself after `seconds`). A process that
    py-spy cannot read gets a profile with no samples and py-spy's reason, never an exception.
    """

    def __init__(self, pids: Mapping[str, int], seconds: float, *, rate: int = RATE,
                 directory: Path | None = None) -> None:
        self.pids = dict(pids)
        self.seconds = seconds
        self.rate = rate
        self.directory = directory or Path(tempfile.mkdtemp(prefix="ragfan-pyspy-"))
        self.profiles: dict[str, RoleProfile] = {}
        self._running: dict[str, subprocess.Popen] = {}

    def _path(self, role: str) -> Path:
        return self.directory / f"{role}.txt"

    def __enter__(self) -> Recorder:
        exe, duration = py_spy(), str(max(1, round(self.seconds)))  # py-spy takes whole seconds
        for role, pid in self.pids.items():
            self._running[role] = subprocess.Popen(
                [exe, "record", "--format", "raw", "--rate", str(self.rate), "--duration", duration,
                 "--pid", str(pid), "--nonblocking", "--output", str(self._path(role))],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )
        return self

    def __exit__(self, *exc) -> None:
        for role, proc in self._running.items():
            try:
                _, err = proc.communicate(timeout=self.seconds + 60)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            path = self._path(role)
            stacks = parse_raw(path.read_text(encoding="utf-8")) if path.is_file() else Counter()
            profile = summarise(stacks, pid=self.pids[role])
            if not stacks:
                last = (err or "").strip().splitlines()
                profile = RoleProfile(self.pids[role], 0, [], [], error=last[-1] if last else "no Python code ran")
            self.profiles[role] = profile

    def report(self, run: str) -> dict[str, Any]:
        """The recordings as JSON-able data, for the benchmark report and `to_markdown`."""
        return {"run": run, "seconds": self.seconds, "rate": self.rate, "stacks_dir": str(self.directory),
                "roles": {role: asdict(p) for role, p in sorted(self.profiles.items())}}


def to_markdown(report: Mapping[str, Any]) -> str:
    """A `Recorder.report` as markdown: per role, the top leaf frames, then the inclusive groups."""
    lines = [f"## py-spy: {report['run']}, {report['seconds']:g} s at {report['rate']} Hz", "",
             f"% of the samples in which a thread ran Python code (idle threads are not sampled); how to read "
             f"it: benchmarks/profile.py. Raw stacks: `{report['stacks_dir']}`.", ""]
    for role, p in report["roles"].items():
        lines += [f"### {role} (pid {p['pid']}, {p['samples']} samples)", ""]
        if p["error"]:
            lines += [f"no samples: {p['error']}", ""]
            continue
        lines += ["| % | leaf frame (self time) |", "|---:|---|"]
        lines += [f"| {pct:.1f} | `{frame}` |" for frame, pct in p["leaf"]]
        lines += ["", "inclusive: " + (", ".join(f"{g} {pct:.0f}%" for g, pct in p["inclusive"]) or "none"), ""]
    return "\n".join(lines)


def busiest_pids() -> dict[str, int]:
    """role -> its busiest process so far, for every role py-spy can usefully read."""
    busiest = resources.busiest(resources.cpu_snapshot())
    return {role: pid for role, pid in busiest.items() if role not in SKIP_ROLES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--pid", action="append", required=True, metavar="ROLE=PID", help="a process to record")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=RATE, help="samples per second")
    parser.add_argument("--output", help="write the markdown summary here")
    args = parser.parse_args(argv)
    pids = {role: int(pid) for role, _, pid in (p.partition("=") for p in args.pid)}
    with Recorder(pids, args.seconds, rate=args.rate) as recorder:
        pass  # leaving the block waits for py-spy to finish
    text = to_markdown(recorder.report(f"pids {', '.join(f'{r}={p}' for r, p in pids.items())}"))
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
