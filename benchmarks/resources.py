"""CPU time and resident memory of the whole process tree: this process and every child, Ray's
raylet, GCS and worker processes included (a local `ray.init` starts them as our descendants).

Totals answer "what does a query cost"; the by-role figures answer "who pays for it". A process's
role comes from the title Ray gives its workers (checked on Ray 2.60 with a local cluster):

    ray::ServeReplica:<app>:<deployment>[.<method>]   a replica -> its deployment's name
    ray::ProxyActor                                   Serve's HTTP proxy -> "proxy"
    ray::ServeController[.<method>]                   Serve's controller -> "controller"
    py-spy ...                                        the profiler, when `--pyspy` runs it -> "py-spy"
    anything else (raylet, gcs_server, agents, idle workers)          -> "ray"

and this process is "driver". Replicas of one deployment add up under one role.
"""

from __future__ import annotations

import re
import threading
from collections import defaultdict

import psutil

# A replica's title, with the method it is running appended while it runs one (`Echo.handle_request`).
# The method suffix starts with a letter, so a deployment named like `e5-v1.5` keeps its last part.
_REPLICA = re.compile(r"ray::ServeReplica:[^:\s]+:(\S+?)(?:\.[A-Za-z_]\w*)?(?:\s|$)")

# pid -> (role, user + system CPU seconds so far)
CpuSnapshot = dict[int, tuple[str, float]]


def role_of(title: str) -> str:
    """The role of a process of the tree other than this one, from its name and command line."""
    replica = _REPLICA.search(title)
    if replica:
        return replica.group(1)
    if "ray::ProxyActor" in title:
        return "proxy"
    if "ray::ServeController" in title:
        return "controller"
    if "py-spy" in title:
        return "py-spy"
    return "ray"


def _tree() -> list[psutil.Process]:
    me = psutil.Process()
    return [me, *me.children(recursive=True)]


def _roles() -> list[tuple[psutil.Process, str]]:
    """Every live process of the tree with its role; one that exits while we look is left out."""
    me, *children = _tree()
    labelled = [(me, "driver")]
    for p in children:
        try:
            # Ray sets a worker's title by rewriting its argv; psutil reports it through
            # cmdline() and, when the kernel's 15-character name is cut short, through name().
            labelled.append((p, role_of(" ".join([p.name(), *p.cmdline()]))))
        except psutil.Error:
            pass
    return labelled


def cpu_seconds() -> float:
    """User + system CPU seconds used so far by every live process of the tree."""
    total = 0.0
    for p in _tree():
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


def cpu_snapshot() -> CpuSnapshot:
    """Each live process's role and CPU seconds so far, to diff with `cpu_seconds_by_role`."""
    snapshot: CpuSnapshot = {}
    for p, role in _roles():
        try:
            t = p.cpu_times()
            snapshot[p.pid] = (role, t.user + t.system)
        except psutil.Error:
            pass
    return snapshot


def cpu_seconds_by_role(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
    """CPU seconds each role used between two snapshots.

    Per process, so that a process that started in between counts from zero, and one that exited
    in between (its last seconds are lost with it) takes nothing away from the others.
    """
    used: dict[str, float] = defaultdict(float)
    for pid, (role, seconds) in after.items():
        used[role] += max(0.0, seconds - before.get(pid, (role, 0.0))[1])
    return dict(sorted(used.items()))


def busiest(snapshot: CpuSnapshot) -> dict[str, int]:
    """role -> the pid of its process that has used the most CPU so far."""
    best: dict[str, tuple[float, int]] = {}
    for pid, (role, seconds) in snapshot.items():
        if role not in best or seconds > best[role][0]:
            best[role] = (seconds, pid)
    return {role: pid for role, (_, pid) in sorted(best.items())}


def rss_mb_by_role() -> dict[str, float]:
    """Resident memory of the tree, summed per role, in MB."""
    rss: dict[str, float] = defaultdict(float)
    for p, role in _roles():
        try:
            rss[role] += p.memory_info().rss / 2**20
        except psutil.Error:
            pass
    return dict(sorted(rss.items()))


def rss_mb() -> float:
    total = 0
    for p in _tree():
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


class PeakRSS:
    """Samples the tree's summed RSS every `interval_s` while in use; `.peak_mb` is the largest."""

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, rss_mb())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())
