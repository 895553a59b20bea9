"""Index versions: which one each replica serves, and how the replicas of a retriever change it together.

`ragfan ingest` writes every rebuild to a new directory beside the old and swaps the link
`OUT/<kind>` to it (actors/index.py). A replica opens one of those directories and serves it until it
is told to open another: the link moving changes nothing it serves. Its *version* is the directory's
name without the link's prefix (`v20261203T154512.123456-ab12`). A retriever built from a `data:`
file has the file's content hash instead (`data-3f2a9c0e11b4`), and a plain directory its manifest's
(`dir-...`).

`VersionHub` is the app's one record of the version each deployment (a retriever, or one shard of
it) serves: its *pin*. Every retriever replica and every gateway replica is a *member*: in one long
call, `sync`, it says what it serves and waits for the pin to move. So:

    ragfan reload corpus ──► a gateway replica (serve_app/reload.py)
        1. one replica of each shard verifies the link's version now       409 if it fails
        2. hub.pin(deployment, version)
        3. members waiting in `sync` wake up:
             retriever replicas open the version beside the one they serve,
             verify it, and swap in one assignment (actors/deployment.py);
             gateway replicas stop serving cached answers of the old version (serve_app/lanes.py)
        4. the reload returns once every live member reports the pin

A replica that starts later (a crash, autoscaling) asks the hub first and opens the pinned version,
not the link's. A hub that restarts has no pins: the first member to report a deployment's version
pins it again, so the replicas keep serving what they served.

Plain Python with no Ray and no numpy: the hub's Serve deployment is in serve_app/app.py, and unit
tests drive the hub directly.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from actors.errors import Conflict, DataError
from actors.index import MANIFEST, sha256_file
from actors.shards import shard_dir
from actors.spec import GraphOptions, RetrieverSpec

# How long a member's `sync` waits for the pin to move before it reports again.
SYNC_WAIT_S = 15.0
# A version merged from live writes (actors/writes.py): `merged-v20261203T...-ab12`, in the app's
# writes directory rather than beside the link `ragfan ingest` swaps.
MERGED = "merged-"
PINS = "pins.json"  # where the hub of an app with writes keeps the pins of the deployments that take them


def is_merged(version: str | None) -> bool:
    return version is not None and version.startswith(MERGED)


def merged_link(spec: RetrieverSpec) -> Path:
    """The path a merge swaps for this spec: `<writes dir>/bases/<deployment>`."""
    if spec.writes_dir is None:
        raise ValueError(f"{spec.name} takes no writes")
    return spec.writes_dir / "bases" / spec.deployment


def merged_version(spec: RetrieverSpec, directory: Path) -> str:
    """The version name of a directory a merge wrote."""
    return MERGED + directory.name.removeprefix(f".{merged_link(spec).name}.")


def log_dir(writes_dir: Path) -> Path:
    return writes_dir / "log"


def saved_pin(spec: RetrieverSpec) -> str | None:
    """The pin the hub last saved for this spec's deployment (only apps with writes save them)."""
    if spec.writes_dir is None:
        return None
    try:
        return json.loads((log_dir(spec.writes_dir) / PINS).read_text()).get("pins", {}).get(spec.deployment)
    except (OSError, json.JSONDecodeError):
        return None


# -- naming and finding versions ----------------------------------------------------------------------
def link_path(spec: RetrieverSpec) -> Path | None:
    """The path `ragfan ingest` swaps for this spec (a shard's own), or None for a `data:` retriever."""
    if spec.artifacts is None:
        return None
    return spec.artifacts if spec.shard is None else shard_dir(spec.artifacts, *spec.shard)


def reloadable(spec: RetrieverSpec) -> None:
    """Raise Conflict when this retriever holds no index that a reload could change."""
    if spec.kind == "synthetic":
        raise Conflict(f"{spec.name} is a synthetic retriever: it holds no index or artifacts, so there is "
                       "nothing to reload")


def version_now(spec: RetrieverSpec) -> str:
    """The version `spec` opens now: what its link points to, or its data file's content hash."""
    link = link_path(spec)
    if link is None:
        digest = hashlib.sha256(sha256_file(spec.data_file).encode())
        if isinstance(spec.options, GraphOptions) and spec.options.aliases is not None:
            digest.update(sha256_file(Path(spec.options.aliases)).encode())
        return f"data-{digest.hexdigest()[:12]}"
    if link.is_symlink():
        target = Path(os.readlink(link)).name
        prefix = f".{link.name}."
        return target[len(prefix):] if target.startswith(prefix) else target
    if (link / MANIFEST).is_file():
        return f"dir-{hashlib.sha256((link / MANIFEST).read_bytes()).hexdigest()[:12]}"
    raise DataError(f"{link}: not found; build it with `ragfan ingest SOURCE --out {link.parent}`")


def version_dir(spec: RetrieverSpec, version: str) -> Path:
    """The directory that holds `version` of an artifacts retriever, or a merged one; DataError when it is gone."""
    if is_merged(version):
        merged = merged_link(spec)
        path = merged.parent / f".{merged.name}.{version.removeprefix(MERGED)}"
        if not (path / MANIFEST).is_file():
            raise DataError(f"{path}: merged version {version} is gone")
        return path
    link = link_path(spec)
    if link is None:
        raise ValueError(f"{spec.name} opens from a data file, not from versioned artifacts")
    if version.startswith("dir-"):  # a plain directory, not written by `ragfan ingest`: it is its only version
        return link
    path = link.parent / f".{link.name}.{version}"
    if not (path / MANIFEST).is_file():
        raise DataError(f"{link}: version {version} is gone (ingest keeps the current version and the one "
                        f"before it); reload {spec.name} to serve the current one")
    return path


# -- the app's record of who serves what ---------------------------------------------------------------
@dataclass(slots=True)
class Member:
    """What one member last reported for one deployment."""

    serving: str | None  # the version it serves (a gateway replica: the pin it follows)
    failed: str | None = None  # a pinned version it could not open ...
    error: str | None = None  # ... and why
    told: str | None = None  # the pin the hub last answered it: a replica still starting opens that one


class VersionHub:
    """The pinned version per deployment, and what every member serves (see the module docstring)."""

    def __init__(self) -> None:
        self.pins: dict[str, str] = {}
        self.members: dict[str, dict[str, Member]] = {}  # deployment -> member -> its last report
        self._moved: asyncio.Event | None = None

    def pin(self, deployment: str, version: str) -> str | None:
        """Pin `version` for `deployment` and wake every member waiting in `sync`; returns the pin before."""
        before = self.pins.get(deployment)
        self.pins[deployment] = version
        self._wake()
        return before

    def _wake(self) -> None:
        if self._moved is not None:
            self._moved.set()
            self._moved = None

    async def sync(
        self,
        member: str,
        serving: Mapping[str, str | None],
        *,
        known: Mapping[str, str | None] | None = None,
        failed: Mapping[str, tuple[str, str]] | None = None,
        wait_s: float = 0.0,
    ) -> dict[str, str | None]:
        """Record what `member` serves per deployment, then return the pins of those deployments: at
        once if one differs from `known` (default: `serving`), else when one moves, or after `wait_s`.

        `failed` maps a deployment to (the pinned version the member could not open, why).
        """
        for deployment, version in serving.items():
            bad = (failed or {}).get(deployment)
            self.members.setdefault(deployment, {})[member] = Member(version, *(bad or (None, None)))
            if version is not None and deployment not in self.pins:
                self.pins[deployment] = version  # the first replica up, or a hub that restarted, learns the pin
                self._wake()
        seen = dict(serving if known is None else known)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while all(self.pins.get(d) == v for d, v in seen.items()) and (left := deadline - loop.time()) > 0:
            if self._moved is None:
                self._moved = asyncio.Event()
            try:
                await asyncio.wait_for(self._moved.wait(), left)
            except TimeoutError:
                break
        pins = {d: self.pins.get(d) for d in seen}
        for deployment in serving:
            self.members[deployment][member].told = pins.get(deployment)
        return pins

    def state(self, deployments: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Per deployment: its pin, and each member's last report."""
        return {
            d: {"pin": self.pins.get(d), "members": {m: asdict(r) for m, r in self.members.get(d, {}).items()}}
            for d in deployments
        }
