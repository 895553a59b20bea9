"""CPU time and resident memory of the whole process tree: this process and every child, Ray's
raylet, GCS and worker processes included (a local `ray.init` starts them as our descendants)."""

from __future__ import annotations

import threading

import psutil


def _tree() -> list[psutil.Process]:
    me = psutil.Process()
    return [me, *me.children(recursive=True)]


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
