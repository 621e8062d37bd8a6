"""Crash states built from what was synced: power loss simulated from a recording of one run.

``recording_io.c`` logs every mutating file operation of one workload run (``workload.py``,
from an empty data directory), in order, with the workload's marks ("write N is about to
happen", "write N is acknowledged as SEQ") in the same log. From that log this module builds
what a power cut at any point *k* of it (after the first *k* operations) could have left on
disk, writes such a crash state into a fresh directory, and chooses which crash states to
try (:func:`plan`); ``trials.py`` opens the store on each as the first process after a
reboot would, and judges what it finds.

The model of a power cut after operation *k*
============================================

**File contents**, per file (per inode, so renames keep its history):

* every write, truncation and preallocation made before the file's last ``fsync`` or
  ``fdatasync`` before *k* (through any descriptor) is durable, and so is a write made
  through an ``O_SYNC``/``O_DSYNC`` descriptor;
* each write after that last sync is independently *kept*, *dropped* or *torn*: a torn write
  keeps a random subset of its pieces, a piece being the part of the write that falls in one
  4 KiB page of the file (so a write that is not page-aligned tears at the file's page
  boundaries, not at its own);
* pages are written back whole, with what the page cache held at that moment: a kept piece
  of a later write keeps every earlier unsynced piece on the same page ("page order"), so a
  page never holds a later write without an earlier one; across pages and files, writes
  reach the disk in any order;
* a file grows to the end of the last piece kept beyond its synced size; bytes in between
  that no kept piece covers read as zeros (a hole); an unsynced truncation or preallocation
  is kept or dropped;
* a file created in the recording and never synced before *k* may come back empty (length
  0), as ext4's delayed allocation leaves it.

**Names** (creations, renames, unlinks, mkdir, rmdir): an operation is durable once its
parent directory (both parents for a rename) was ``fsync``'d after it and before *k*;
otherwise it is applied or not, independently, in log order. A rename is atomic: the file
has its old name or its new one. An operation whose subject is not there in the crash state
(a rename of a file whose creation was lost, an rmdir of a directory still holding files)
is not applied. A file whose directory is missing is missing.

Each crash state has a *mode*: ``random`` (the choices above made with a seeded RNG),
``synced`` (nothing that was not made durable survives: the strictest power cut), ``all``
(everything before *k* survives, as a crash of the process alone would leave it), or one of
two deterministic tears of LMDB's file, everything else as in ``all``: ``lmdb-meta-only``
(of ``indexes/data.mdb``'s unsynced writes only its meta pages, 0 and 1, reached the disk)
and ``lmdb-meta-lost`` (all of them but its meta pages did). A request can also name
operations on names to lose (``lose``: not applied, though the mode would apply them) and
unsynced writes to drop (``drop``: none of their pages reaches the disk, unless page order
brings one back with a later write to the same page). The state is a pure function of the
recording, *k*, the seed, the mode, ``lose`` and ``drop``.

What it does not model
======================

* tearing inside a 4 KiB page (sector-sized tears), and bytes that reach the disk wrong:
  a write's piece is all there or not at all;
* the file system's own ordering guarantees beyond the above: ext4 commits its metadata
  in order (a later rename is never durable without an earlier one) and, with
  ``data=ordered``, writes data blocks before the metadata that exposes them; this model
  lets names change in any order and exposes holes as zeros, which is harsher than ext4;
  it never exposes stale blocks (ext4 ``data=writeback``) or garbage;
* fsync that fails or lies, a device that reorders across a flush, and media errors;
* ``lock.mdb`` and other ``*-lock`` files, which are not recorded (LMDB rebuilds its lock
  file on open); reads through ``mmap`` (which see the page cache), and writes through a
  shared writable ``mmap``, ``O_TMPFILE``, hard and symbolic links and renames into or out
  of the data directory, which the shim logs as unsupported and this module refuses;
* more than one process: the log is one process's (its threads included);
* a ``sync_file_range`` is a hint to start writeback, not a sync, and is not recorded.

Opening the crash states and judging them is ``trials.py``.
"""

from __future__ import annotations

import bisect
import json
import random
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PAGE = 4096
HEADER = struct.Struct("<IB3xiiI4xQqqIII4x")
assert HEADER.size == 64

MODES = ("random", "synced", "all", "lmdb-meta-only", "lmdb-meta-lost")
#: the file the two "lmdb-" modes tear (LMDB writes its meta pages, pages 0 and 1, last)
LMDB_FILE = "indexes/data.mdb"
_META_PAGES = frozenset({0, 1})
_FALLOC_FL_KEEP_SIZE = 1


class UnsupportedRecording(Exception):
    """The log holds an operation this model cannot replay (see the module docstring)."""


# --- the log --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Op:
    """One record of the log (see ``recording_io.c``), paths relative to the data dir."""

    index: int
    type: str
    pid: int
    fd: int
    flags: int
    ino: int
    off: int
    length: int
    path: str | None  # "" for the data directory itself; None outside it
    path2: str | None
    data: bytes

    def label(self) -> str:
        what = {
            "C": "create",
            "W": "write",
            "T": "truncate",
            "F": "fallocate",
            "S": "fsync",
            "Y": "sync",
            "R": "rename",
            "U": "unlink",
            "M": "mkdir",
            "D": "rmdir",
            "A": "mark",
            "X": "unsupported",
        }[self.type]
        if self.type == "S":
            what = "fsync dir" if self.flags & 1 else "fdatasync" if self.flags & 2 else what
        if self.type == "W":
            return f"#{self.index} write {self.path} [{self.off}, {self.off + self.length})"
        if self.type == "R":
            return f"#{self.index} rename {self.path} -> {self.path2}"
        if self.type == "A":
            return f"#{self.index} mark {self.data.decode(errors='replace').strip()}"
        return f"#{self.index} {what} {self.path if self.path is not None else ''}".rstrip()


def read_log(path: Path, prefix: str) -> list[Op]:
    """Every record of the log at *path*, whose data directory is *prefix*."""
    raw = path.read_bytes()
    ops: list[Op] = []
    pos = 0
    while pos < len(raw):
        if pos + HEADER.size > len(raw):
            raise ValueError(f"{path}: a record header is cut short at offset {pos}")
        size, kind, pid, fd, flags, ino, off, length, plen, p2len, dlen = HEADER.unpack_from(
            raw, pos
        )
        if size != HEADER.size + plen + p2len + dlen or pos + size > len(raw):
            raise ValueError(f"{path}: bad record at offset {pos}")
        body = pos + HEADER.size
        p1 = raw[body : body + plen].decode()
        p2 = raw[body + plen : body + plen + p2len].decode()
        data = raw[body + plen + p2len : pos + size]
        kind_text = chr(kind)
        ops.append(
            Op(
                len(ops),
                kind_text,
                pid,
                fd,
                flags,
                ino,
                off,
                length,
                p1 if kind_text == "A" else _relative(p1, prefix),
                p2 if kind_text == "X" else _relative(p2, prefix) if p2 else None,
                data,
            )
        )
        pos += size
    return ops


def _relative(path: str, prefix: str) -> str | None:
    if path.endswith(" (deleted)"):
        path = path[: -len(" (deleted)")]
    if path == prefix:
        return ""
    if path.startswith(prefix + "/"):
        return path[len(prefix) + 1 :]
    return None


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


# --- what the log says happened, indexed ------------------------------------------------------


@dataclass(slots=True)
class Write:
    index: int
    off: int
    data: bytes
    durable: bool  # through an O_SYNC/O_DSYNC descriptor

    def pages(self) -> range:
        return range(self.off // PAGE, (self.off + len(self.data) - 1) // PAGE + 1)

    def piece(self, page: int) -> tuple[int, bytes]:
        start = max(self.off, page * PAGE)
        end = min(self.off + len(self.data), (page + 1) * PAGE)
        return start, self.data[start - self.off : end - self.off]


@dataclass(slots=True)
class Resize:
    index: int
    kind: str  # "truncate" or "fallocate"
    size: int  # the size after it (a fallocate that keeps the size is not recorded as one)


@dataclass(slots=True)
class Sync:
    index: int


@dataclass(slots=True)
class FileHistory:
    fid: int
    created: int  # the index of its creation
    name: str  # its name when created
    events: list[Write | Resize | Sync] = field(default_factory=list)

    def indices(self) -> list[int]:
        return [event.index for event in self.events]


@dataclass(frozen=True, slots=True)
class NameOp:
    index: int
    kind: str  # "create", "rename", "unlink", "mkdir", "rmdir"
    path: str
    path2: str | None = None
    fid: int | None = None

    def parents(self) -> set[str]:
        found = {_parent(self.path)}
        if self.path2 is not None:
            found.add(_parent(self.path2))
        return found

    def __str__(self) -> str:
        if self.kind == "rename":
            return f"#{self.index} rename {self.path} -> {self.path2}"
        return f"#{self.index} {self.kind} {self.path}"


@dataclass(slots=True)
class WriteMark:
    """One write of the workload: what it changes, when it started, when it was acknowledged."""

    n: int
    kind: str
    changes: list[list[Any]]
    try_index: int
    ack_index: int | None = None
    seq: int | None = None


#: key -> [value, seq]: "instance:<id>" -> [spec, last_wal_offset], "machine:<name>:<v>" ->
#: [definition, None]
State = dict[str, list[Any]]


class Recording:
    """A recorded run: the log, indexed, and the workload's transcript from its marks."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        meta = json.loads((self.directory / "recording.json").read_text())
        self.prefix: str = meta["prefix"]
        self.policy: str = meta["policy"]
        self.meta = meta
        self.ops = read_log(self.directory / "record.log", self.prefix)
        self.files: list[FileHistory] = []
        self.names: list[NameOp] = []
        self.dir_syncs: dict[str, list[int]] = {}
        self.global_syncs: list[int] = []
        self.writes: list[WriteMark] = []
        self._index()
        self.states = self._states()

    # --- indexing ---

    def _index(self) -> None:
        by_ino: dict[int, FileHistory] = {}
        pids = {op.pid for op in self.ops}
        if len(pids) > 1:
            raise UnsupportedRecording(f"the log holds more than one process: {sorted(pids)}")
        by_n: dict[int, WriteMark] = {}
        for op in self.ops:
            if op.type == "X":
                raise UnsupportedRecording(f"{op.path}: {op.path2}")
            if op.type == "A":
                for line in op.data.decode().splitlines():
                    self._mark(op.index, json.loads(line), by_n)
                continue
            if op.path is None:
                raise UnsupportedRecording(f"{op.label()}: outside the data directory")
            if op.type == "C":
                if op.flags & 1:
                    history = FileHistory(len(self.files), op.index, op.path)
                    self.files.append(history)
                    by_ino[op.ino] = history
                    self.names.append(NameOp(op.index, "create", op.path, fid=history.fid))
                if op.flags & 2:
                    self._file(by_ino, op).events.append(Resize(op.index, "truncate", 0))
            elif op.type == "W":
                self._file(by_ino, op).events.append(
                    Write(op.index, op.off, op.data, bool(op.flags & 1))
                )
            elif op.type == "T":
                self._file(by_ino, op).events.append(Resize(op.index, "truncate", op.off))
            elif op.type == "F":
                if op.flags & ~_FALLOC_FL_KEEP_SIZE:
                    raise UnsupportedRecording(f"{op.label()}: fallocate mode {op.flags:#x}")
                if not op.flags & _FALLOC_FL_KEEP_SIZE:
                    self._file(by_ino, op).events.append(
                        Resize(op.index, "fallocate", op.off + op.length)
                    )
            elif op.type == "S":
                if op.flags & 1:
                    self.dir_syncs.setdefault(op.path, []).append(op.index)
                else:
                    self._file(by_ino, op).events.append(Sync(op.index))
            elif op.type == "Y":
                self.global_syncs.append(op.index)
                for history in self.files:
                    history.events.append(Sync(op.index))
            elif op.type == "R":
                if any(name.kind == "mkdir" and name.path == op.path for name in self.names):
                    raise UnsupportedRecording(f"{op.label()}: renaming a directory")
                self.names.append(NameOp(op.index, "rename", op.path, op.path2))
            elif op.type == "U":
                self.names.append(NameOp(op.index, "unlink", op.path))
            elif op.type == "M":
                self.names.append(NameOp(op.index, "mkdir", op.path))
            elif op.type == "D":
                self.names.append(NameOp(op.index, "rmdir", op.path))
            else:
                raise UnsupportedRecording(f"unknown record type {op.type!r}")
        self.writes = [by_n[n] for n in sorted(by_n)]
        self._name_indices = [name.index for name in self.names]
        for history in self.files:
            history.events.sort(key=lambda event: event.index)  # global syncs were appended
        self._event_indices = [history.indices() for history in self.files]

    def _file(self, by_ino: dict[int, FileHistory], op: Op) -> FileHistory:
        try:
            return by_ino[op.ino]
        except KeyError:
            raise UnsupportedRecording(
                f"{op.label()}: a file the recording did not see created (the workload must "
                f"start from an empty data directory)"
            ) from None

    def _mark(self, index: int, mark: dict[str, Any], by_n: dict[int, WriteMark]) -> None:
        if mark["ev"] == "try":
            by_n[mark["n"]] = WriteMark(mark["n"], mark["kind"], mark["changes"], index)
        elif mark["ev"] == "ack":
            write = by_n[mark["n"]]
            write.ack_index, write.seq = index, mark["seq"]

    def _states(self) -> list[State]:
        """``states[j]``: what the store holds after the first *j* writes (all are acked by
        the end of the run, so each write's sequence number is known)."""
        state: State = {}
        states = [dict(state)]
        for write in self.writes:
            if write.seq is None:
                raise UnsupportedRecording(f"write {write.n} was never acknowledged")
            state = dict(state)
            for change in write.changes:
                if change[0] == "put":
                    state["instance:" + change[1]["id"]] = [change[1], write.seq]
                elif change[0] == "del":
                    del state["instance:" + change[1]]
                else:
                    _, name, version, definition = change
                    state[f"machine:{name}:{version}"] = [definition, None]
            states.append(state)
        return states

    # --- questions ---

    def progress(self, k: int) -> tuple[int, int]:
        """(writes acknowledged, writes attempted) before cut *k*."""
        acked = sum(1 for w in self.writes if w.ack_index is not None and w.ack_index < k)
        tried = sum(1 for w in self.writes if w.try_index < k)
        return acked, tried

    def synced_after(self, directory: str, index: int, k: int) -> bool:
        """Whether *directory* was fsync'd after operation *index* and before cut *k*."""
        for syncs in (self.dir_syncs.get(directory, []), self.global_syncs):
            at = bisect.bisect_right(syncs, index)
            if at < len(syncs) and syncs[at] < k:
                return True
        return False

    def sync_points(self) -> list[Op]:
        return [op for op in self.ops if op.type in "SY"]

    def ack_points(self) -> list[int]:
        """The cut right after each acknowledgment."""
        return [w.ack_index + 1 for w in self.writes if w.ack_index is not None]


# --- one crash state --------------------------------------------------------------------------


@dataclass(slots=True)
class CrashState:
    k: int
    seed: int
    mode: str
    dirs: set[str]
    files: dict[str, bytes]
    #: what was lost, kept or torn, for a report (see :meth:`summary`)
    names_changed: list[str] = field(default_factory=list)
    contents: dict[str, dict[str, Any]] = field(default_factory=dict)
    last_op: str = ""

    def summary(self) -> str:
        parts = []
        for path, what in sorted(self.contents.items()):
            if what.get("empty"):
                parts.append(f"{path}: came back empty")
                continue
            counts = ", ".join(
                f"{what[key]} {key}"
                for key in ("kept", "dropped", "torn", "resizes lost")
                if what.get(key)
            )
            parts.append(f"{path}: {what['unsynced']} unsynced write(s): {counts or 'none'}")
        parts += self.names_changed
        return "; ".join(parts) if parts else "only what was synced, nothing else pending"

    def describe(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "seed": self.seed,
            "mode": self.mode,
            "last_op": self.last_op,
            "names": self.names_changed,
            "contents": self.contents,
            "files": {path: len(data) for path, data in sorted(self.files.items())},
            "dirs": sorted(self.dirs),
        }


def crash_state(
    rec: Recording,
    k: int,
    seed: int,
    mode: str,
    lose: Iterable[int] = (),
    drop: Iterable[int] = (),
) -> CrashState:
    """What a power cut after the first *k* operations of *rec* leaves, choosing with *seed*
    under *mode*, the operations on names at the indices *lose* lost and the unsynced writes
    at the indices *drop* dropped (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if not 0 <= k <= len(rec.ops):
        raise ValueError(f"k must be in 0..{len(rec.ops)}, not {k}")
    rng = random.Random(f"{seed}/{k}/{mode}")
    state = CrashState(k, seed, mode, {""}, {})
    state.last_op = rec.ops[k - 1].label() if k else "(nothing)"
    lost = set(lose)
    dropped = set(drop)
    for index in dropped:
        if not (index < k and rec.ops[index].type == "W"):
            raise ValueError(f"operation {index} is not a write before cut {k}")

    def chance(p: float) -> bool:
        if mode == "random":
            return rng.random() < p
        return mode != "synced"  # "all" and the "lmdb-" modes apply everything

    names: dict[str, int] = {}
    for name in rec.names[: bisect.bisect_left(rec._name_indices, k)]:
        durable = all(rec.synced_after(parent, name.index, k) for parent in name.parents())
        if name.index in lost:
            if durable:
                raise ValueError(f"{name} is durable at cut {k}: it cannot be lost")
            applied = False
            lost.discard(name.index)
        else:
            applied = durable or chance(0.5)
        if _apply_name(name, applied, names, state.dirs) and not durable:
            state.names_changed.append(f"{'kept' if applied else 'lost'} {name}")
    if lost:
        raise ValueError(f"no operation on names at {sorted(lost)} before cut {k}")
    for path, fid in sorted(names.items()):
        if _parent(path) not in state.dirs:
            continue  # its directory is gone
        data, what = _content(rec, rec.files[fid], k, mode, rng, path, dropped)
        state.files[path] = data
        if what:
            state.contents[path] = what
    state.dirs = {d for d in state.dirs if _reachable(d, state.dirs)}
    state.files = {p: d for p, d in state.files.items() if _reachable(_parent(p), state.dirs)}
    return state


def _reachable(directory: str, dirs: set[str]) -> bool:
    while directory:
        if directory not in dirs:
            return False
        directory = _parent(directory)
    return True


def _apply_name(name: NameOp, applied: bool, names: dict[str, int], dirs: set[str]) -> bool:
    """Apply *name* to the namespace when *applied* and possible; return whether it mattered
    (whether its subject was there to be changed)."""
    if name.kind == "create":
        if applied:
            assert name.fid is not None
            names[name.path] = name.fid
        return True
    if name.kind == "rename":
        if name.path not in names:
            return False
        if applied:
            assert name.path2 is not None
            names[name.path2] = names.pop(name.path)
        return True
    if name.kind == "unlink":
        if name.path not in names:
            return False
        if applied:
            del names[name.path]
        return True
    if name.kind == "mkdir":
        if applied:
            dirs.add(name.path)
        return True
    # rmdir: only of an empty directory
    inside = name.path + "/"
    if name.path not in dirs or any(p.startswith(inside) for p in [*names, *dirs]):
        return False
    if applied:
        dirs.discard(name.path)
    return True


def _content(
    rec: Recording,
    history: FileHistory,
    k: int,
    mode: str,
    rng: random.Random,
    path: str,
    dropped: set[int],
) -> tuple[bytes, dict[str, Any]]:
    """The bytes of one file after a power cut at *k*, and what happened to its unsynced
    writes (empty when there were none)."""
    count = bisect.bisect_left(rec._event_indices[history.fid], k)
    events = history.events[:count]
    last_sync = max((i for i, e in enumerate(events) if isinstance(e, Sync)), default=-1)
    data = bytearray()
    for event in events[: max(last_sync, 0)]:
        _apply_event(data, event, None)
    later = [e for e in events[last_sync + 1 :] if not isinstance(e, Sync)]
    if not later:
        return bytes(data), {}
    what: dict[str, Any] = {"unsynced": len(later), "synced_size": len(data)}
    empty = mode == "random" and last_sync < 0 and rng.random() < 0.25
    kept: list[set[int] | bool] = []
    for event in later:
        if isinstance(event, Resize):
            keep = mode != "synced" and (mode != "random" or (not empty and rng.random() < 0.5))
            kept.append(keep)
            what["resizes lost"] = what.get("resizes lost", 0) + (not keep)
            continue
        pages = set(event.pages())
        if event.index in dropped and not event.durable:
            chosen = set()
        elif event.durable or mode == "all":
            chosen = pages
        elif mode.startswith("lmdb-"):
            if path != LMDB_FILE:
                chosen = pages
            elif mode == "lmdb-meta-only":
                chosen = pages & _META_PAGES
            else:
                chosen = pages - _META_PAGES
        elif mode == "synced" or empty:
            chosen = set()
        else:
            roll = rng.random()
            if roll < 1 / 3:
                chosen = pages
            elif roll < 2 / 3:
                chosen = set()
            else:
                chosen = {page for page in sorted(pages) if rng.random() < 0.5}
        kept.append(chosen)
    # Page order: a page written back holds every earlier write to it.
    written_back: set[int] = set()
    for event, chosen in zip(reversed(later), reversed(kept), strict=True):
        if isinstance(event, Write):
            assert isinstance(chosen, set)
            chosen |= written_back & set(event.pages())
            written_back |= chosen
    for event, chosen in zip(later, kept, strict=True):
        if isinstance(event, Write):
            assert isinstance(chosen, set)
            pages = set(event.pages())
            key = "kept" if chosen == pages else "dropped" if not chosen else "torn"
            what[key] = what.get(key, 0) + 1
        if chosen:
            _apply_event(data, event, chosen if isinstance(chosen, set) else None)
    if empty:
        what["empty"] = True
    what["size"] = len(data)
    return bytes(data), what


def _apply_event(data: bytearray, event: Write | Resize | Sync, pages: set[int] | None) -> None:
    if isinstance(event, Sync):
        return
    if isinstance(event, Resize):
        if event.kind == "truncate":
            del data[event.size :]
        if len(data) < event.size:
            data.extend(bytes(event.size - len(data)))
        return
    for page in event.pages() if pages is None else sorted(pages):
        start, piece = event.piece(page)
        if len(data) < start:
            data.extend(bytes(start - len(data)))
        data[start : start + len(piece)] = piece


def materialize(state: CrashState, target: Path) -> None:
    """Write *state* into *target*, which must not exist."""
    target.mkdir(parents=True)
    for directory in sorted(state.dirs, key=lambda d: (d.count("/"), d)):
        if directory:
            (target / directory).mkdir()
    for path, data in state.files.items():
        (target / path).write_bytes(data)


@dataclass(frozen=True, slots=True)
class Request:
    """One crash state to try: the cut *k*, the seed and mode of the choices, the operations
    on names to lose and the writes to drop (indices into the log), and why it was chosen."""

    k: int
    seed: int
    mode: str
    why: str = ""
    lose: tuple[int, ...] = ()
    drop: tuple[int, ...] = ()

    @classmethod
    def of(cls, fields: dict[str, Any]) -> Request:
        lists = {name: tuple(fields.get(name, ())) for name in ("lose", "drop")}
        return cls(**{**fields, **lists})

    def key(self) -> tuple[Any, ...]:
        return (self.k, self.seed, self.mode, self.lose, self.drop)


# --- choosing crash states ----------------------------------------------------------------------


def plan(rec: Recording, count: int, seed: int) -> list[Request]:
    """*count* crash states worth trying (fewer when the recording has fewer distinct ones):

    1. the cut right before every sync that is not the WAL's own per-write ``fdatasync`` (a
       checkpoint's flush of ``data.mdb``, directory syncs, snapshots, ``indexes/flushed``, a
       new segment): the moments with the most unsynced data, in ``random`` mode;
    2. the end of the run, ``synced`` and ``random``;
    3. then, in turn: the cut right after an acknowledgment in ``synced`` mode (exactly
       what the promise is about: that write must be there with nothing unsynced helping),
       the cut right before a WAL sync, a uniformly random cut, and a sync point of (1)
       again with another seed and any mode (the two LMDB tears among them); each pick a
       new seed.
    """
    rng = random.Random(seed)
    syncs = rec.sync_points()
    wal_syncs = [op.index for op in syncs if _is_wal_sync(op)]
    other_syncs = [op.index for op in syncs if not _is_wal_sync(op)]
    acks = rec.ack_points()
    chosen: dict[tuple[Any, ...], Request] = {}

    def add(k: int, mode: str, why: str) -> None:
        request = Request(k, rng.randrange(1 << 31), mode, why)
        chosen.setdefault(request.key(), request)

    first = other_syncs if len(other_syncs) <= count else sorted(rng.sample(other_syncs, count))
    for k in first:
        add(k, "random", "before a sync")
    for mode in ("synced", "random"):
        if len(chosen) < count:
            add(len(rec.ops), mode, "the end")
    pools = [
        (acks, "synced", "after an ack"),
        (wal_syncs, "random", "before a WAL sync"),
        (list(range(len(rec.ops) + 1)), "random", "a random cut"),
        (other_syncs, None, "before a sync"),
    ]
    turn = 0
    while len(chosen) < count and any(pool for pool, _, _ in pools):
        pool, mode, why = pools[turn % len(pools)]
        turn += 1
        if pool:
            add(rng.choice(pool), mode or rng.choice(MODES), why)
    return list(chosen.values())[:count]


def _is_wal_sync(op: Op) -> bool:
    return (
        op.type == "S"
        and not op.flags & 1
        and (op.path or "").startswith("wal/")
        and (op.path or "").endswith(".wal")
    )
