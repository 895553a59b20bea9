"""Live writes: the app's one component that orders them, logs them and merges them away.

`WriteHub` is the VersionHub (actors/versions.py) of an app with `writes` on, and so one Serve
replica, the `versions` deployment. It is the only writer of the log (actors/wal.py):

    POST /v1/documents ──► a gateway replica (serve_app/writes.py): checks, embeds once per model
        1. hub.write(records)      appended and fsynced: now acknowledged, with a seq
        2. members waiting in `follow_writes` wake up:
             gateway replicas learn the seq each retriever is at (their result-cache keys move)
             retriever replicas read the new records from the log and apply them (actors/delta.py),
             once every live gateway replica has learnt them: a cached answer from before a write
             is never served once a replica searches the write
        3. with `wait: true`, the gateway waits (`wait_applied`) until every live replica of every
           named retriever has applied it: read-your-writes

A deployment's writes pile up in the replicas' deltas until there are `merge.max_docs` of them or
the oldest is `merge.max_age_s` old. Then the hub starts a new log segment, asks one replica to
write its merged state as a new version (`RetrieverDeployment.merge`), pins that version, waits
until every live replica serves it, and drops the log segments that every retriever's pinned
version holds. Each step can be killed: a version that was written but not pinned is never
served, a pin moves only to a complete version, and a segment goes only once merged everywhere, so
a replica never lacks a record and never applies one twice (a version's `log_seq` says where its
replay starts).

The pins of the deployments that take writes are kept on disk beside the log (`pins.json`), so a
hub or a whole app that restarts serves the merged versions, not the versions they came from.
Plain Python with no Ray: the Serve deployment (serve_app/app.py) passes in how to reach replicas.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from actors.errors import ServiceUnavailable
from actors.versions import PINS, VersionHub
from actors.wal import WriteLog, segments

logger = logging.getLogger("ray.serve")
# A gateway replica not seen for this long (it was killed) no longer holds back applying the writes.
GATEWAY_STALE_S = 5.0
MERGE_CHECK_S = 1.0  # how often the hub checks whether a deployment's delta is due for a merge
MERGE_TIMEOUT_S = 600.0  # how long a merge may take: writing the version, and every replica opening it


class WriteHub(VersionHub):
    """The VersionHub of an app that takes writes (see the module docstring)."""

    def __init__(
        self,
        log_dir: Path,
        deployments: Sequence[str],
        *,
        max_docs: int = 1000,
        max_age_s: float = 300.0,
        live: Callable[[str], Awaitable[list[str]]] | None = None,
        replica: Callable[[str], Any] | None = None,
    ) -> None:
        """`deployments`: those that take writes. `live(deployment)`: the ids of its live replicas;
        `replica(deployment)`: a handle that reaches one of them (for `merge`)."""
        super().__init__()
        self.log_dir = Path(log_dir)
        self.log = WriteLog(self.log_dir)
        self.deployments = list(deployments)
        self.max_docs, self.max_age_s = max_docs, max_age_s
        self._live, self._replica = live, replica
        self.base_seq: dict[str, int] = dict.fromkeys(self.deployments, 0)  # what each pinned version holds
        saved = read_pins(self.log_dir)
        self.pins.update(saved.get("pins", {}))
        self.base_seq.update({d: s for d, s in saved.get("base_seq", {}).items() if d in self.base_seq})
        # per deployment: the seqs of the records addressed to it that its pinned version lacks
        self.pending: dict[str, list[int]] = {d: [] for d in self.deployments}
        self._pending_since: dict[str, float] = {}
        self.touched: dict[str, int] = dict.fromkeys(self.deployments, 0)
        self.touched.update({d: s for d, s in saved.get("touched", {}).items() if d in self.touched})
        self._scan()
        self.gateways: dict[str, tuple[int, float]] = {}  # member -> (the seq it knows, when it last called)
        self._in_call: dict[str, int] = {}  # gateway members waiting in follow_writes now
        self.applied: dict[str, dict[str, int]] = {d: {} for d in self.deployments}
        self._lock = asyncio.Lock()
        self._changed: asyncio.Event | None = None
        self.merges = 0

    def _scan(self) -> None:
        """Learn, from the log on disk, what each deployment was sent since its pinned version."""
        for _, path in segments(self.log_dir):
            with path.open("rb") as fh:
                for line in fh:
                    if not line.endswith(b"\n"):
                        break
                    record = json.loads(line)
                    if record["seq"] > self.log.end:
                        break
                    self._count(record["seq"], record["to"])

    def _count(self, seq: int, to: Iterable[str]) -> None:
        for d in to:
            if d in self.pending:
                self.touched[d] = seq
                if seq > self.base_seq[d]:
                    self.pending[d].append(seq)
                    self._pending_since.setdefault(d, time.monotonic())

    def _wake(self) -> None:
        super()._wake()
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def _changes(self, timeout_s: float) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout_s)
        except TimeoutError:
            pass

    # -- writing ------------------------------------------------------------------------------------
    async def write(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Append `records` (each with `to`, the deployments it is for) to the log, durably, in order.

        Returns {"seq": the last record's, "touched": {deployment: its last record's seq}}. Raises
        ServiceUnavailable, with nothing appended, when the log cannot be written and flushed."""
        unknown = sorted({d for r in records for d in r["to"]} - set(self.deployments))
        if unknown:
            raise ValueError(f"deployments that take no writes: {', '.join(unknown)}")
        async with self._lock:  # one append at a time: the log's order is the order acknowledged
            try:
                seqs = await asyncio.to_thread(self.log.append, records)
            except OSError as exc:
                logger.error("writes: the log at %s could not be written: %s", self.log_dir, exc)
                raise ServiceUnavailable(f"the write could not be made durable ({exc.strerror or exc}); "
                                         "nothing was applied", retry_after_s=5) from None
        for seq, record in zip(seqs, records, strict=True):
            self._count(seq, record["to"])
        self._wake()
        return {"seq": seqs[-1] if seqs else self.log.end, "touched": self._touched_of(self.deployments)}

    def _touched_of(self, deployments: Iterable[str]) -> dict[str, int]:
        return {d: self.touched.get(d, 0) for d in deployments}

    # -- members ------------------------------------------------------------------------------------
    def released(self) -> int:
        """The last seq that retriever replicas may apply: every live gateway replica knows it."""
        now = time.monotonic()
        known = [seq for m, (seq, seen) in self.gateways.items() if m in self._in_call or now - seen < GATEWAY_STALE_S]
        return min([self.log.end, *known])

    async def released_now(self) -> int:
        """`released()`, for a replica about to open a version and replay the log."""
        return self.released()

    async def follow_writes(
        self, member: str, *, knows: int = 0, deployment: str | None = None, wait_s: float = 0.0
    ) -> dict[str, Any]:
        """One member's long call: it reports the last seq it knows (a gateway) or has applied (a retriever
        replica of `deployment`), and waits up to `wait_s` for more.

        A gateway replica gets {"end", "touched"} as soon as the log is past `knows`; a retriever
        replica gets {"released", "base_seq"} as soon as it may apply past `knows`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        if deployment is None:
            self.gateways[member] = (knows, time.monotonic())
            self._in_call[member] = knows
            self._wake()  # a replica may be waiting for this gateway to know a seq
            try:
                while self.log.end <= knows and (left := deadline - loop.time()) > 0:
                    await self._changes(left)
            finally:
                self._in_call.pop(member, None)
                self.gateways[member] = (knows, time.monotonic())
            return {"end": self.log.end, "touched": self._touched_of(self.deployments)}
        self.applied.setdefault(deployment, {})[member] = knows
        self._wake()  # a writer may be waiting for this replica (`wait_applied`)
        while self.released() <= knows and (left := deadline - loop.time()) > 0:
            await self._changes(left)
        return {"released": self.released(), "base_seq": self.base_seq.get(deployment, 0)}

    async def wait_applied(self, deployments: Sequence[str], seq: int, timeout_s: float) -> bool:
        """Wait until every live replica of each deployment has applied `seq`; False at the timeout.

        A replica that has not reported yet (still starting) replays the log before it serves, so
        it is not waited for."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            behind = []
            for d in deployments:
                live = await self._live(d) if self._live is not None else list(self.applied.get(d, {}))
                reported = self.applied.get(d, {})
                behind += [m for m in live if m in reported and reported[m] < seq]
            if not behind:
                return True
            left = deadline - loop.time()
            if left <= 0:
                return False
            await self._changes(min(left, 1.0))  # also rechecks the live replicas: one may have died

    # -- pins on disk -------------------------------------------------------------------------------
    def pin(self, deployment: str, version: str) -> str | None:
        before = super().pin(deployment, version)
        if deployment in self.base_seq:
            self._save_pins()
        return before

    def _save_pins(self) -> None:
        pins = {d: v for d, v in self.pins.items() if d in self.base_seq}
        write_atomically(self.log_dir / PINS, json.dumps(
            {"pins": pins, "base_seq": self.base_seq, "touched": self.touched}, indent=1))

    # -- merging ------------------------------------------------------------------------------------
    def due(self) -> list[str]:
        """The deployments whose delta is due for a merge, by size or by age."""
        now = time.monotonic()
        return [d for d, seqs in self.pending.items() if seqs and (
            len(seqs) >= self.max_docs or now - self._pending_since.get(d, now) >= self.max_age_s)]

    async def merge_forever(self) -> None:
        while True:
            await asyncio.sleep(MERGE_CHECK_S)
            for deployment in self.due():
                try:
                    await self.merge(deployment)
                except Exception as exc:  # a replica killed mid-merge, say: the delta stays, and is tried again
                    logger.warning("writes: merging %s failed, will retry: %s", deployment, exc)
                    self._pending_since[deployment] = time.monotonic() - self.max_age_s + 10 * MERGE_CHECK_S

    async def merge(self, deployment: str) -> str:
        """Merge the deployment's delta into a new version, roll it in, and drop the log it made
        redundant; returns the new version."""
        if self._replica is None:
            raise RuntimeError("this hub has no way to reach replicas")
        async with self._lock:  # the records before the new segment are all in the log
            await asyncio.to_thread(self.log.rotate)
        merged = await asyncio.wait_for(self._replica(deployment).merge.remote(), MERGE_TIMEOUT_S)
        version, log_seq = merged["version"], merged["log_seq"]
        self.base_seq[deployment] = log_seq
        self.pending[deployment] = [s for s in self.pending[deployment] if s > log_seq]
        self._pending_since.pop(deployment, None)
        if self.pending[deployment]:
            self._pending_since[deployment] = time.monotonic()
        self.pin(deployment, version)
        await self._serving(deployment, version)
        dropped = await asyncio.to_thread(self.log.truncate, self.truncatable())
        self.merges += 1
        logger.info("writes: %s merged up to seq %d as version %s; %d log segment(s) dropped",
                    deployment, log_seq, version, dropped)
        return version

    async def _serving(self, deployment: str, version: str) -> None:
        """Wait until every live replica of the deployment reports serving `version`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + MERGE_TIMEOUT_S
        while loop.time() < deadline:
            live = await self._live(deployment) if self._live is not None else []
            members = self.members.get(deployment, {})
            if all(members[m].serving == version for m in live if m in members):
                return
            await asyncio.sleep(0.2)
        raise TimeoutError(f"{deployment}: replicas did not serve {version} within {MERGE_TIMEOUT_S:.0f} s")

    def truncatable(self) -> int:
        """The last seq that every deployment's pinned version holds, or has no use for."""
        return min(self.base_seq[d] if self.pending[d] else self.log.end for d in self.deployments)

    def writes_state(self) -> dict[str, Any]:
        return {"end": self.log.end, "released": self.released(), "merges": self.merges,
                "deployments": {d: {"touched": self.touched[d], "base_seq": self.base_seq[d],
                                    "pending": len(self.pending[d]), "applied": self.applied.get(d, {})}
                                for d in self.deployments}}


def read_pins(log_dir: Path) -> dict[str, Any]:
    """What the hub last saved, per deployment: its pinned version, the last record that version holds
    (`base_seq`), and the last record addressed to it (`touched`, which a merged-away log no longer shows)."""
    try:
        return json.loads((Path(log_dir) / PINS).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

