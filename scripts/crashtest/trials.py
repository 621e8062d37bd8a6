"""One trial: plan it, start its writers, kill them, and hand their transcripts to the check.

A trial starts 1 to ``--writers`` child processes on the one data directory, each waiting for
``go`` after it opened so that they write at the same time (and so commit in groups). Each child
is one of:

* *armed*: ``RSTMDB_FAILPOINTS="<point>=<n>*off->kill"`` in its environment; it kills itself at
  the (n+1)-th hit of the point, or finishes if its operations never get that far;
* *random*: the parent sends SIGKILL once it has read k acknowledgements from it (k at random),
  while the child goes on writing: the kill lands wherever the child then is;
* *clean*: it makes its operations and closes the store.

Now and then a trial is a *repair* trial instead: one writer, which halfway closes the store,
leaves a torn record at the end of the WAL and runs ``Storage.repair_wal`` before it reopens.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .check import MAY, MUST, NEVER, Transcript, read_transcript
from .workload import STACKS_SIGNAL

SHIM = Path(__file__).resolve().parent.parent / "crashtest.py"
TRIAL_TIMEOUT = 300  # seconds; a trial that takes longer is stuck, not slow


@dataclass(frozen=True)
class Point:
    """How to arm a failpoint: what happens to the write in flight when it kills there, the
    operations that reach it (made more often by the armed child), how many hits to let pass,
    and how many writers the trial needs."""

    lands: str
    focus: tuple[str, ...] = ()
    passes: int = 0
    writers: int = 1


ARMED: dict[str, Point] = {
    "write.after_append": Point(MAY, passes=12),
    "write.after_sync": Point(MUST, passes=12),
    "write.after_commit": Point(MUST, passes=12),
    "group.after_append": Point(MAY, passes=8, writers=2),
    "group.after_sync": Point(MUST, passes=8, writers=2),
    "group.after_apply": Point(MUST, passes=8, writers=2),
    "wal.sync": Point(MAY, passes=12),
    "wal.after_seal": Point(NEVER, ("put", "batch", "bulk"), 1),
    "wal.after_new_segment": Point(NEVER, ("put", "batch", "bulk"), 1),
    "wal.after_segment_delete": Point(MAY, ("compact", "bulk"), 1),
    "lmdb.sync": Point(MAY, ("checkpoint",), 3),
    "checkpoint.after_wal_sync": Point(MAY, ("checkpoint",), 3),
    "checkpoint.before_lmdb_sync": Point(MAY, ("checkpoint",), 3),
    "snapshot.data.before_rename": Point(MAY, ("snapshot",), 1),
    "snapshot.data.after_rename": Point(MAY, ("snapshot",), 1),
    "snapshot.data.after_dir_sync": Point(MAY, ("snapshot",), 1),
    "snapshot.manifest.before_rename": Point(MAY, ("snapshot",), 1),
    "snapshot.manifest.after_rename": Point(MAY, ("snapshot",), 1),
    "snapshot.manifest.after_dir_sync": Point(MAY, ("snapshot",), 1),
    "compact.after_snapshot_delete": Point(MAY, ("compact", "snapshot")),
    "restore.mid_copy": Point(MAY, ("backup", "restore"), 1),
    "rebuild.after_move_aside": Point(MAY, ("restore", "backup")),
    "transition.after_key_check": Point(NEVER, ("transition",), 4),
}
REPAIR_POINT = "repair.after_copy_aside"
#: points of POINTS this workload does not arm, and why
NOT_ARMED = {
    "lmdb.before_grow": "a write must find the map full before the flusher grows it early",
    "replay.after_chunk": "an open must replay more than 2,000 changes",
}


@dataclass
class Child:
    slot: int
    mode: str  # "armed", "random" or "clean"
    point: str | None
    kill_after: int | None  # random: acknowledgements read before the parent kills
    spec: dict[str, Any]
    proc: subprocess.Popen[bytes] | None = None
    buffer: bytes = b""
    events: list[dict[str, Any]] = field(default_factory=list)
    acks: int = 0
    killed: bool = False
    stderr: Path | None = None

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        new = [json.loads(line) for line in lines if line]
        self.events += new
        return new

    def stderr_text(self) -> str:
        return self.stderr.read_text(errors="replace") if self.stderr else ""


@dataclass
class TrialResult:
    transcripts: list[Transcript]
    children: list[Child]
    stuck: bool = False
    #: for a stuck trial, who held LMDB's writer mutex when the time was up
    mutex_owner: str = ""


def plan(
    rng: random.Random, trial_seed: int, args: Any, data_dir: Path, scratch: Path
) -> list[Child]:
    """The writers of one trial."""
    repair = rng.random() < 0.07
    count = 1 if repair else rng.randint(1, args.writers)
    ops = 14 if args.quick else 30
    children = []
    for slot in range(count):
        mode = rng.choices(["armed", "random", "clean"], [55, 35, 10])[0]
        if mode == "clean" and count == 1:
            mode = "random"
        point = None
        if mode == "armed":
            if repair:
                point = REPAIR_POINT
            else:
                point = rng.choice([p for p, how in ARMED.items() if how.writers <= count])
        spec = {
            "data_dir": str(data_dir),
            "scratch": str(scratch),
            "slot": slot,
            "seed": trial_seed * 10 + slot,
            "ops": ops,
            "repair": repair,
            "focus": list(ARMED[point].focus) if point in ARMED else [],
        }
        kill_after = rng.randint(0, ops * 2 // 3) if mode == "random" else None
        children.append(Child(slot, mode, point, kill_after, spec))
    return children


def arming(child: Child, rng: random.Random) -> str:
    """The child's ``RSTMDB_FAILPOINTS``: let a random number of hits pass, then kill (at
    most about half its operations' worth, so that most armed children get there)."""
    if child.point is None:
        return ""
    most = min(ARMED[child.point].passes, child.spec["ops"] // 2) if child.point in ARMED else 0
    passes = rng.randint(0, most)
    return f"{child.point}={passes}*off->kill" if passes else f"{child.point}=kill"


def run_trial(children: list[Child], rng: random.Random, scratch: Path) -> TrialResult:
    """Start the children, say go once all are open, kill the random ones at their moment,
    and read every transcript to its end."""
    selector = selectors.DefaultSelector()
    for child in children:
        env = dict(os.environ)
        env.pop("RSTMDB_FAILPOINTS", None)
        failpoints = arming(child, rng)
        if failpoints:
            env["RSTMDB_FAILPOINTS"] = failpoints
        child.stderr = scratch / f"child-{child.slot}.err"
        with open(child.stderr, "wb") as err:
            child.proc = subprocess.Popen(
                [sys.executable, str(SHIM), "--child", json.dumps(child.spec)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
            )
        assert child.proc.stdout is not None
        os.set_blocking(child.proc.stdout.fileno(), False)
        selector.register(child.proc.stdout, selectors.EVENT_READ, child)
    deadline = time.monotonic() + TRIAL_TIMEOUT
    waiting = {c.slot for c in children}  # not yet ready (nor ended)
    started = False
    stuck = False
    owner = ""
    while selector.get_map():
        if not started and not waiting:
            started = True
            for child in children:
                go(child)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            stuck = True
            owner = writer_mutex_owner(children)
            ask_for_stacks(children)
            for child in children:
                kill(child)
            break
        for key, _ in selector.select(timeout=min(remaining, 5)):
            child = key.data
            stream = key.fileobj
            data = os.read(stream.fileno(), 1 << 16)  # type: ignore[union-attr]
            if not data:
                selector.unregister(stream)
                waiting.discard(child.slot)
                continue
            for event in child.feed(data):
                if event["ev"] in ("ready", "open-failed"):
                    waiting.discard(child.slot)
                elif event["ev"] == "ack":
                    child.acks += 1
                if child.mode == "random" and started and child.acks >= (child.kill_after or 0):
                    kill(child)
    for child in children:
        assert child.proc is not None
        child.proc.wait()
        for stream in (child.proc.stdout, child.proc.stdin):
            if stream is not None and not stream.closed:
                with contextlib.suppress(BrokenPipeError):  # "go" unread: it died first
                    stream.close()
    selector.close()
    transcripts = []
    for child in children:
        transcript = read_transcript(child.events)
        if child.point in ARMED and not child.killed and child.proc.returncode == -signal.SIGKILL:  # type: ignore[union-attr]
            transcript.lands = ARMED[child.point].lands
        transcripts.append(transcript)
    return TrialResult(transcripts, children, stuck, owner)


def go(child: Child) -> None:
    assert child.proc is not None and child.proc.stdin is not None
    try:
        child.proc.stdin.write(b"go\n")
        child.proc.stdin.flush()
    except BrokenPipeError:  # it died before (open failed, or killed at a failpoint on open)
        pass
    if child.mode == "random" and child.kill_after == 0:
        kill(child)


def ask_for_stacks(children: list[Child]) -> None:
    """Have every writer still running write its threads' stacks to its stderr file, for
    the report of a stuck trial (faulthandler writes them from a signal handler, at once)."""
    running = [c for c in children if c.proc is not None and c.proc.poll() is None]
    for child in running:
        os.kill(child.proc.pid, STACKS_SIGNAL)  # type: ignore[union-attr]
    deadline = time.monotonic() + 5
    for child in running:  # a stack is a few kB: written as soon as the signal is handled
        while time.monotonic() < deadline and "most recent call first" not in child.stderr_text():
            time.sleep(0.05)


def writer_mutex_owner(children: list[Child]) -> str:
    """Who holds LMDB's writer mutex, for the report of a stuck trial: the thread id in the
    robust mutex's lock word in ``lock.mdb`` (after the 64-byte first cache line of LMDB's
    ``MDB_txninfo``), and whose thread that is among the writers still running."""
    lock_file = Path(children[0].spec["data_dir"]) / "indexes" / "lock.mdb"
    try:
        with open(lock_file, "rb") as f:
            f.seek(64)
            word = int.from_bytes(f.read(4), "little")
    except OSError as exc:
        return f"LMDB writer mutex: {lock_file} unreadable ({exc})"
    tid = word & 0x3FFFFFFF  # FUTEX_TID_MASK
    running = {c.proc.pid: f"writer {c.slot}" for c in children if c.proc and c.proc.poll() is None}
    owner = "no writer still running"
    for pid, slot in running.items():
        if os.path.exists(f"/proc/{pid}/task/{tid}"):
            owner = slot
    held = f"held by thread {tid} of {owner}" if tid else "free"
    # LMDB's locks on lock.mdb are fcntl() locks: which processes hold one (/proc/locks)
    inode = f":{os.stat(lock_file).st_ino} "
    with open("/proc/locks") as f:
        holders = [
            f"{running.get(int(fields[4]), 'pid ' + fields[4])} {fields[3]} {fields[6]}-{fields[7]}"
            for fields in (line.split() for line in f if inode in line and "POSIX" in line)
        ]
    return f"LMDB writer mutex: {held} (lock word {word:#x}); fcntl locks: {holders}"


def kill(child: Child) -> None:
    if child.killed or child.proc is None or child.proc.returncode is not None:
        return
    child.killed = True
    os.kill(child.proc.pid, signal.SIGKILL)
