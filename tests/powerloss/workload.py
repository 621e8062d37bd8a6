"""The workload whose file operations the power-loss tests record: one process, one thread
of writes (the store's flusher and snapshot threads run beside it), run as
``python tests/powerloss/workload.py DATA_DIR MARKS [--seed S] [--ops N] [--policy P]``.

It starts from an empty data directory and makes, within a few hundred writes, everything
whose crash states are worth trying: WAL rotation (64 KiB segments), checkpoints (the flusher
every ``checkpoint_interval_ms``, and explicit ``checkpoint()`` calls), automatic snapshots
(every ``snapshot_interval`` changes) each followed by compaction (more than
``max_wal_segments`` segments, and old snapshots beyond ``snapshots_kept``), a machine
definition, puts, batches, transitions and deletes; and halfway, a checkpoint followed by an
explicit snapshot, a WAL hold set and released, and a compaction (LMDB commits with no WAL
record after the flush).

Marks go to *MARKS*, one JSON line per ``os.write`` (the recording shim logs each write to
that file in order with the store's I/O, see ``recording_io.c``):

* ``{"ev": "try", "n": N, "changes": [...]}`` before write N: what it will change, as
  ``["put", spec]`` (an instance's fields as it will be stored, see :func:`spec_of`),
  ``["del", id]`` or ``["machine", name, version, definition]``;
* ``{"ev": "ack", "n": N, "seq": SEQ}`` once the store acknowledged it;
* ``{"ev": "call", "what": ..., "phase": "start" | "done"}`` around open, checkpoint,
  snapshot, compaction and close (only to read the log by).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers
from helpers import write_changes

from rstmdb_storage import FsyncPolicy, Instance, Storage, StorageConfig

MACHINE = "order"
STATES = ["pending", "paid", "shipped", "done"]
#: transitions the workload makes, from each state
NEXT = {"pending": "paid", "paid": "shipped", "shipped": "done"}


def parse_policy(text: str) -> FsyncPolicy:
    """``every_write`` (the default policy), ``never``, ``every_n:5`` or ``every_ms:20``."""
    mode, _, value = text.partition(":")
    return FsyncPolicy(mode, int(value)) if value else FsyncPolicy(mode)  # type: ignore[arg-type]


def config(data_dir: str | os.PathLike[str], policy: str = "every_write") -> StorageConfig:
    """The configuration of the workload's store, and of every open of its crash states."""
    return StorageConfig(
        data_dir=data_dir,
        fsync_policy=parse_policy(policy),
        wal_segment_size=64 * 1024,
        snapshot_interval=60,
        max_wal_segments=3,
        snapshots_kept=2,
        checkpoint_interval_ms=25,
    )


def spec_of(inst: Instance) -> dict[str, Any]:
    """What the checker compares of a stored instance (its times are left out)."""
    return {
        "id": inst.id,
        "machine": inst.machine,
        "version": inst.version,
        "state": inst.state,
        "ctx": inst.ctx,
        "metadata": inst.metadata,
        "status": inst.status,
        "last_event_id": inst.last_event_id,
    }


def new_spec(rng: random.Random, instance_id: str, n: int) -> dict[str, Any]:
    return {
        "id": instance_id,
        "machine": MACHINE,
        "version": 1,
        "state": "pending",
        "ctx": {
            "n": n,
            "total": rng.randint(0, 10**6) / 100,
            "items": [rng.randint(0, 999) for _ in range(rng.randint(0, 4))],
            "note": "x" * rng.randint(0, 1500),  # records of varied size fill segments unevenly
        },
        "metadata": {"owner": f"w{rng.randint(0, 3)}", "prio": rng.randint(0, 9)},
        "status": "active",
        "last_event_id": None,
    }


class Marks:
    """The marks file: one ``os.write`` per line, so that the shim logs each mark whole."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    def mark(self, **event: Any) -> None:
        line = json.dumps(event, separators=(",", ":"), sort_keys=True) + "\n"
        assert os.write(self.fd, line.encode()) == len(line.encode())

    def call(self, what: str, phase: str) -> None:
        self.mark(ev="call", what=what, phase=phase)


def choose(
    rng: random.Random, present: dict[str, dict[str, Any]], n: int, ids: int
) -> tuple[str, list[list[Any]]]:
    """The next write: its kind and changes (``present`` is what the store holds)."""
    movable = sorted(i for i, spec in present.items() if spec["state"] in NEXT)
    roll = rng.random()
    if roll < 0.35 or not present:
        target = f"o{rng.randrange(ids)}"
        return "put", [["put", new_spec(rng, target, n)]]
    if roll < 0.55 and movable:
        spec = dict(present[rng.choice(movable)])
        spec["state"] = NEXT[spec["state"]]
        spec["last_event_id"] = f"evt-{n}"
        return "transition", [["put", spec]]
    if roll < 0.65:
        return "delete", [["del", rng.choice(sorted(present))]]
    live = set(present)
    changes: list[list[Any]] = []
    for _ in range(rng.randint(2, 4)):
        if live and rng.random() < 0.3:
            victim = rng.choice(sorted(live))
            live.discard(victim)
            changes.append(["del", victim])
        else:
            target = f"o{rng.randrange(ids)}"
            live.add(target)
            changes.append(["put", new_spec(rng, target, n)])
    return "batch", changes


def write(storage: Storage, kind: str, changes: list[list[Any]]) -> int:
    """Make the write; return its acknowledged sequence number."""
    if kind == "machine":
        ((_, name, version, definition),) = changes
        return storage.put_machine(name, version, definition)
    if kind == "transition":
        ((_, spec),) = changes
        stored = storage.get_instance(spec["id"])
        assert stored is not None
        after = storage.transition(
            spec["id"], stored.state, spec["state"], event_id=spec["last_event_id"]
        )
        assert spec_of(after) == spec, (spec_of(after), spec)
        return after.last_wal_offset
    return write_changes(storage, changes, batch=kind not in ("put", "delete"))


def apply(present: dict[str, dict[str, Any]], changes: list[list[Any]]) -> None:
    for change in changes:
        if change[0] == "put":
            present[change[1]["id"]] = change[1]
        elif change[0] == "del":
            del present[change[1]]


def run(data_dir: str, marks_path: str, seed: int, ops: int, policy: str, ids: int = 40) -> None:
    rng = random.Random(seed)
    marks = Marks(marks_path)
    marks.call("open", "start")
    storage = Storage.open(config(data_dir, policy))
    marks.call("open", "done")
    present: dict[str, dict[str, Any]] = {}
    definition = {"states": STATES, "transitions": [[a, b] for a, b in NEXT.items()]}
    for n in range(1, ops + 1):
        if n == 1:
            kind, changes = "machine", [["machine", MACHINE, 1, definition]]
        else:
            kind, changes = choose(rng, present, n, ids)
        marks.mark(ev="try", n=n, kind=kind, changes=changes)
        seq = write(storage, kind, changes)
        marks.mark(ev="ack", n=n, seq=seq)
        apply(present, changes)
        if n % 45 == 0:
            marks.call("checkpoint", "start")
            storage.checkpoint()
            marks.call("checkpoint", "done")
        if n == ops // 2:
            # Housekeeping right after a checkpoint: LMDB commits (the snapshot's listing, a
            # hold) with no WAL record behind them, so the WAL does not go past the flush.
            for what, call in (
                ("checkpoint", storage.checkpoint),
                ("snapshot", storage.create_snapshot),
                ("hold", lambda seq=seq: storage.hold_wal("powerloss", seq)),
                ("release", lambda: storage.release_wal("powerloss")),
                ("compact", storage.compact),
            ):
                marks.call(what, "start")
                call()
                marks.call(what, "done")
    marks.call("close", "start")
    storage.close()
    marks.call("close", "done")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir")
    parser.add_argument("marks")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--ops", type=int, default=240)
    parser.add_argument("--policy", default="every_write")
    args = parser.parse_args(argv)
    if Path(args.data_dir).exists() and any(Path(args.data_dir).iterdir()):
        parser.error(f"{args.data_dir} is not empty: the workload starts from an empty store")
    run(args.data_dir, args.marks, args.seed, args.ops, args.policy)
    return 0


if __name__ == "__main__":
    sys.exit(main())
