"""Reloading a retriever in place: verify the link's version, pin it, wait until every replica serves it.

`POST /v1/retrievers/{name}/reload` (and `ragfan reload NAME`) reach `Reloader.reload` on one gateway
replica. The steps, and what answers when one fails:

    1. the name is a retriever of this app                                    404 NotFound
       and it holds an index (not synthetic)                                  409 Conflict
    2. one replica of each deployment (each shard) verifies the version
       its link points to now: every file's checksum, the kind, the model     409 Conflict, nothing changed
       against the encoder's; and here, its dimension against the encoder's
    3. the VersionHub pins that version for each deployment (actors/versions.py)
    4. every live replica opens it beside the version it serves, verifies it
       again and swaps; every live gateway replica stops using cached answers
       of the old version. Wait until each of them reports the pin.           409 if a replica refused it:
                                                                               the old pins are restored
                                                                              503 past RELOAD_TIMEOUT_S
    5. answer {name, version_before, version, replicas, seconds}

No search waits for a reload: a replica serves the old version until the new one is open, and the
swap is one assignment. Why pins and members rather than Serve's `user_config` and `reconfigure()`:
docs/RELOAD.md.

`watch` runs `reload` by itself when a retriever's link moves (`reload: {watch_s: N}`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from actors.errors import Conflict, NotFound, RagError, ServiceUnavailable
from serve_app.lanes import RetrieverLane
from serve_app.outcome import describe_error
from serve_app.schemas import ReloadResponse, ReplicaVersion

logger = logging.getLogger("ray.serve")
RELOAD_TIMEOUT_S = 300.0  # opening a large index on every replica can take minutes
CHECK_TIMEOUT_S = 120.0  # one replica checksumming the new version's files
POLL_S = 0.05
GATEWAY = "gateway"  # the gateway's deployment name: its replicas are members too ...
GW = "gw:"  # ... named gw:<replica id> at the hub, apart from the retriever replicas


def gateway_member(replica: str) -> str:
    return GW + replica

# The ids of a deployment's live replicas; None: take every member that ever reported (unit tests).
LiveReplicas = Callable[[str], Awaitable[list[str]]]


class Reloader:
    def __init__(self, lanes: Mapping[str, RetrieverLane], kinds: Mapping[str, str], versions: Any, *,
                 live: LiveReplicas | None = None, timeout_s: float = RELOAD_TIMEOUT_S) -> None:
        """`lanes` and `kinds` by retriever name; `versions`: the VersionHub's handle (None: the app has none)."""
        self.lanes = lanes
        self.kinds = kinds
        self.versions = versions
        self.live = live
        self.timeout_s = timeout_s
        self._locks: dict[str, asyncio.Lock] = {}

    async def reload(self, name: str) -> ReloadResponse:
        lane = self.lanes.get(name)
        if lane is None:
            raise NotFound(f"no retriever {name!r}; retrievers: {', '.join(self.lanes)}")
        if self.kinds[name] == "synthetic":
            raise Conflict(f"{name} is a synthetic retriever: it holds no index or artifacts, so there is "
                           "nothing to reload")
        if self.versions is None:
            raise Conflict("this app runs no version hub (ragfan is disabled): there is nothing to reload")
        async with self._locks.setdefault(name, asyncio.Lock()):  # one reload of a retriever at a time here
            started = time.perf_counter()
            target = await self._check(lane)
            before = await self._pin(lane, target)
            replicas = await self._wait(lane, target, before)
        version = "|".join(target[d] for d in lane.deployments)
        logger.info("retriever %s reloaded: version %s (was %s), %d replicas, %.2f s",
                    name, version, _joined(before, lane), len(replicas), time.perf_counter() - started)
        return ReloadResponse(name=name, version_before=_joined(before, lane), version=version, replicas=replicas,
                              seconds=round(time.perf_counter() - started, 3))

    async def _check(self, lane: RetrieverLane) -> dict[str, str]:
        """Each deployment's version now, verified by one of its replicas; raises Conflict on a bad one."""
        checks = await asyncio.gather(
            *(asyncio.wait_for(_awaited(h.check_version.remote()), CHECK_TIMEOUT_S) for h in lane.handles),
            return_exceptions=True,
        )
        for deployment, check in zip(lane.deployments, checks, strict=True):
            if isinstance(check, BaseException):
                cause = getattr(check, "cause", None)
                if isinstance(cause, RagError):  # Ray wraps what the replica raised
                    check = cause
                if isinstance(check, Conflict):
                    raise check
                raise ServiceUnavailable(f"{lane.name}: {deployment} could not check the new version: "
                                         f"{describe_error(check)}")
        found = [c for c in checks if isinstance(c, dict)]
        if lane.encoder is not None and any(c.get("dim") for c in found):
            encoder = await lane.encoder.describe()
            dim = (encoder.value or {}).get("dim") if encoder.status == "ok" else None
            wrong = next((c for c in found if c.get("dim") and dim and c["dim"] != dim), None)
            if wrong is not None:
                raise Conflict(f"{lane.name}: the new version {wrong['version']} has dimension {wrong['dim']}, "
                               f"but the encoder's model {lane.encoder.model} has {dim}; rebuild it with that model")
        return {d: c["version"] for d, c in zip(lane.deployments, found, strict=True)}

    async def _pin(self, lane: RetrieverLane, target: Mapping[str, str]) -> dict[str, str | None]:
        """Pin `target`; returns the pins before."""
        return {d: await _awaited(self.versions.pin.remote(d, target[d])) for d in lane.deployments}

    async def _wait(self, lane: RetrieverLane, target: Mapping[str, str], before: Mapping[str, str | None]
                    ) -> list[ReplicaVersion]:
        """Until every live replica of the lane and every live gateway replica reports `target`."""
        deadline = time.perf_counter() + self.timeout_s
        while True:
            replicas, gateways = await self.replicas(lane)
            refused = next((r for r in replicas if r.failed and r.failed.startswith(f"{target[r.deployment]}:")), None)
            if refused is not None:
                for d, v in before.items():
                    if v is not None and v != target[d]:
                        await _awaited(self.versions.pin.remote(d, v))
                raise Conflict(f"{lane.name}: replica {refused.replica} refused version {refused.failed}; every "
                               f"replica keeps serving {_joined(before, lane)}")
            version = "|".join(target[d] for d in lane.deployments)
            waiting = [r.replica for r in replicas if r.version != target[r.deployment] and not r.opening]
            waiting += [g for g, followed in gateways.items() if followed != version]
            if not waiting:
                return replicas
            if time.perf_counter() > deadline:
                raise ServiceUnavailable(f"{lane.name}: {len(waiting)} replica(s) still do not serve "
                                         f"{'|'.join(target.values())} after {self.timeout_s:.0f} s: "
                                         f"{', '.join(waiting[:5])}; they keep trying", retry_after_s=10)
            await asyncio.sleep(POLL_S)

    async def replicas(self, lane: RetrieverLane) -> tuple[list[ReplicaVersion], dict[str, str | None]]:
        """Each live replica of the lane and what it serves; each live gateway replica and the version of
        this lane it follows."""
        state = await _awaited(self.versions.state.remote(lane.deployments))
        replicas: list[ReplicaVersion] = []
        gateways: dict[str, list[str | None]] = {}
        live_gateways = [gateway_member(g) for g in await self.live(GATEWAY)] if self.live is not None else None
        for d in lane.deployments:
            members = state[d]["members"]
            live = await self.live(d) if self.live is not None else [m for m in members if not m.startswith(GW)]
            # A replica not yet in the hub has not started: it asks for the pin first thing, and opens it.
            for m in (m for m in live if m in members):
                report = members[m]
                failed = f"{report['failed']}: {report['error']}" if report.get("failed") else None
                # still starting, and told the pin now: it opens that, and needs no waiting for here
                opening = report.get("serving") is None and report.get("told") == state[d]["pin"]
                replicas.append(ReplicaVersion(replica=m, deployment=d, version=report.get("serving"), failed=failed,
                                               opening=opening))
            for g in live_gateways if live_gateways is not None else [m for m in members if m.startswith(GW)]:
                gateways.setdefault(g, []).append((members.get(g) or {}).get("serving"))
        followed = {g: None if None in vs else "|".join(vs) for g, vs in gateways.items()}  # type: ignore[arg-type]
        return replicas, followed

    async def watch(self, name: str, every_s: float) -> None:
        """Reload `name` whenever its link moves, checking every `every_s` seconds; runs until cancelled."""
        lane = self.lanes[name]
        refused: str | None = None
        while True:
            await asyncio.sleep(every_s)
            try:
                now = [await _awaited(h.version_now.remote()) for h in lane.handles]
                version = "|".join(now)
                if version in (lane.pinned, refused):
                    continue
                await self.reload(name)
            except Conflict as exc:
                refused = version  # once per version: a broken build is logged, not retried
                logger.warning("retriever %s: watch: %s", name, exc.message)
            except Exception as exc:
                logger.warning("retriever %s: watch: %s", name, describe_error(exc))


async def _awaited(response: Any) -> Any:
    return await response


def _joined(pins: Mapping[str, str | None], lane: RetrieverLane) -> str | None:
    versions = [pins.get(d) for d in lane.deployments]
    return None if None in versions else "|".join(versions)  # type: ignore[arg-type]
