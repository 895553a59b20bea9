"""The write-ahead log: every acknowledged write, in the order it was acknowledged, flushed to disk.

One log per app, in `writes.log_dir`. A write is one record, one JSON line, numbered by `seq` (1, 2,
...). The app's write-ordering component (the VersionHub, actors/writes.py) is the only writer; every
retriever replica reads the log from the position its index version covers and applies the records
addressed to its deployment (actors/delta.py).

    <log_dir>/
        000000000001.jsonl     a segment: the records from seq 1 on
        000000000845.jsonl     the next one, started before a merge; older ones go once merged

A record:

    {"seq": 7, "op": "upsert", "to": ["corpus", "keyword"], "id": "d1", "text": "...",
     "metadata": {...}, "vectors": {"<model>": "<base64 of float32>"}}
    {"seq": 8, "op": "delete", "to": ["corpus", "keyword"], "id": "d1"}

`append` opens the segment, writes the lines, flushes and fsyncs, and only then returns the seqs: a
record the caller was told about is on disk. If any step fails it cuts the segment back to where it
was and raises: nothing of that call is in the log. A crash can leave a half-written last line; it
was never acknowledged, and the next `WriteLog` cuts it off.

Vectors travel in the log, so a replica that replays it needs no encoder, and every replica
applies the very vectors the first one did. Plain Python: no numpy, no Ray.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

SEGMENT = re.compile(r"(\d{12})\.jsonl")
SEGMENT_MAX_BYTES = 64 << 20  # a segment this large is closed and the next one started


def encode_vector(vector: np.ndarray) -> str:
    """A vector as the log stores it: float32 bytes in base64."""
    return base64.b64encode(np.ascontiguousarray(vector, dtype=np.float32).tobytes()).decode("ascii")


def decode_vector(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=np.float32)


def _segment_name(first_seq: int) -> str:
    return f"{first_seq:012d}.jsonl"


def segments(directory: Path) -> list[tuple[int, Path]]:
    """The log's segments, as (first seq, path), oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := SEGMENT.fullmatch(p.name))]
    return sorted(found)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WriteLog:
    """The writer's side: append records durably, start segments, drop merged ones."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        found = segments(directory)
        if not found:
            self._start(1)
            found = segments(directory)
        self.first, self.path = found[-1]
        self.end, self.size = self._recover(self.path, self.first)

    @staticmethod
    def _recover(path: Path, first: int) -> tuple[int, int]:
        """The last complete record's seq and where it ends; a torn last line is cut off."""
        end, good = first - 1, 0
        with path.open("rb") as fh:
            for line in fh:
                try:
                    record = json.loads(line) if line.endswith(b"\n") else None
                except json.JSONDecodeError:
                    record = None
                if record is None or record.get("seq") != end + 1:
                    break
                end, good = end + 1, good + len(line)
        if good != path.stat().st_size:
            os.truncate(path, good)
        return end, good

    def _start(self, first: int) -> None:
        path = self.directory / _segment_name(first)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(self.directory)
        self.first, self.path, self.size = first, path, 0

    def append(self, records: Iterable[Mapping[str, Any]]) -> list[int]:
        """Write the records, numbered from `end + 1`, and fsync; returns their seqs. Raises OSError
        (nothing appended) when they cannot be made durable."""
        lines, seqs = [], []
        for i, record in enumerate(records, start=self.end + 1):
            lines.append(json.dumps({"seq": i, **record}, ensure_ascii=False, separators=(",", ":")) + "\n")
            seqs.append(i)
        if not lines:
            return []
        data = "".join(lines).encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY)  # never created here: a log whose directory went is an error
        try:
            try:
                os.lseek(fd, self.size, os.SEEK_SET)
                written = 0
                while written < len(data):
                    written += os.write(fd, data[written:])
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, self.size)  # best effort: the lines were never acknowledged
                raise
        finally:
            os.close(fd)
        self.end, self.size = seqs[-1], self.size + len(data)
        if self.size >= SEGMENT_MAX_BYTES:
            self.rotate()
        return seqs

    def rotate(self) -> None:
        """Start a new segment at `end + 1`, unless the current one is still empty."""
        if self.size:
            self._start(self.end + 1)

    def truncate(self, upto: int) -> int:
        """Delete the segments whose records all have seq <= `upto`; returns how many went."""
        found = segments(self.directory)
        gone = 0
        for (_, path), (next_first, _) in zip(found, found[1:], strict=False):
            if next_first - 1 <= upto:
                path.unlink(missing_ok=True)
                gone += 1
        if gone:
            _fsync_dir(self.directory)
        return gone


class LogReader:
    """A replica's side: the records after a seq, read on from where the last read stopped."""

    def __init__(self, directory: Path, after: int) -> None:
        self.directory = directory
        self.after = after  # the last seq read
        self._path: Path | None = None
        self._offset = 0

    def read(self, upto: int) -> list[dict[str, Any]]:
        """The records with `after` < seq <= `upto`, in order; stops early at the end of the log."""
        out: list[dict[str, Any]] = []
        while self.after < upto:
            if self._path is None or not self._path.exists():
                self._seek()
                if self._path is None:
                    break
            with self._path.open("rb") as fh:
                fh.seek(self._offset)
                for line in fh:
                    if not line.endswith(b"\n"):
                        break  # being written: not acknowledged yet
                    record = json.loads(line)
                    if record["seq"] > upto:
                        break
                    self._offset += len(line)
                    if record["seq"] > self.after:
                        out.append(record)
                        self.after = record["seq"]
            if self.after < upto and not self._next_segment():
                break
        return out

    def _seek(self) -> None:
        """Open the segment that holds `after + 1`, at its start. When that segment is gone, the oldest
        one left: the hub drops a segment only once every deployment's pinned version holds what it
        has for that deployment (actors/writes.py), so what is gone is nothing this reader needs."""
        found = segments(self.directory)
        before = [p for first, p in found if first <= self.after + 1]
        self._path = before[-1] if before else found[0][1] if found else None
        self._offset = 0

    def _next_segment(self) -> bool:
        """Move on to the segment that starts after the last record read; False when there is none yet."""
        later = [p for first, p in segments(self.directory) if first == self.after + 1 and p != self._path]
        if not later:
            return False
        self._path, self._offset = later[0], 0
        return True
