"""The short workload of the OS-fault loop (tests/test_os_faults.py), run as
``python tests/faultshim/workload.py DATA_DIR LEDGER SEED``, usually under the failing_io shim.

It opens the store, makes a fixed mixed sequence of writes (puts, batches, transitions and
deletes, on instances large enough that WAL segments rotate) with a checkpoint, a snapshot and a
compaction between them, and closes it. Everything it does is the same from run to run for one
SEED (no background snapshots, no flusher turn within the run, a clock that counts: see
use_a_steady_clock), so the Nth call the shim counts is the same call in every run.

The ledger is JSON lines, each written with one unbuffered ``os.write`` to a file outside the
data directory (so the shim never counts or fails it, and a crash cannot lose a line it wrote):

    {"event": "try", "step": K, "kind": KIND, "changes": [...]}   before step K
    {"event": "ack", "step": K, "seq": SEQ}                        a write the store acknowledged
    {"event": "ok", "step": K}                                     open, close, maintenance done
    {"event": "error", "step": K, "type": NAME, "message": TEXT}   a StorageError, caught
    {"event": "done"}                                              the workload got to its end

After each step that raised (but open and close), two steps that write nothing: "health" (its
"ok" carries ``failed``, from ``health()``) and "read" of an instance whose content is known
(its "ok" carries ``matches``).

A change is ``["put", spec]`` or ``["del", id]`` as in tests/workers.py, so the test can replay
the ledger with ``helpers.apply_op``; a transition is written down as the put of the instance in
its new state. Only :class:`StorageError` is caught: any other exception leaving the public API
is a finding, and ends the workload with a traceback and no ``done``.

After three steps in a row fail (a failed sync fails every later write until the store is
reopened; a disk that stays full refuses every one), the workload stops writing and closes, so
that the outcomes the test has to allow for stay few.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
from helpers import write_changes

from rstmdb_storage import Instance, Storage, StorageConfig
from rstmdb_storage.errors import StorageError

SEGMENT_SIZE = 64 * 1024  # the smallest the config takes; the instances below fill one in ~12
WRITES = (10, 10, 10, 6)  # writes before the checkpoint, the snapshot, compact() and close
STATES = ("pending", "paid", "shipped", "done")
MAX_FAILURES_IN_A_ROW = 3


def use_a_steady_clock() -> None:
    """Make the store's wall clock a counter (1 ms per reading, from a fixed time). With real
    time, the order of the time index's keys, so LMDB's page splits and how many pwrite and
    writev calls a commit makes, vary with how many writes share a millisecond: the write
    family's count moved between 306 and 316 from run to run, and N was not one call."""
    ticks = itertools.count(1_800_000_000_000)
    time.time_ns = lambda: next(ticks) * 1_000_000


def config(data_dir: str) -> StorageConfig:
    """No background work within a run: nothing automatic (the flusher's first turn would come
    after 10 minutes, and the scrub, where there is one, is off), so the calls the shim counts
    depend only on the seed."""
    quiet = {"scrub_interval_ms": 0}
    fields = {f.name for f in dataclasses.fields(StorageConfig)}
    return StorageConfig(
        **{name: value for name, value in quiet.items() if name in fields},
        data_dir=data_dir,
        wal_segment_size=SEGMENT_SIZE,
        snapshot_interval=0,
        max_wal_segments=10_000,
        compaction_enabled=False,  # compact() still compacts; no automatic compaction
        snapshots_kept=1,  # so that compact() deletes a snapshot and covered segments
        checkpoint_interval_ms=600_000,
    )


class Ledger:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o644)

    def emit(self, **event: Any) -> None:
        os.write(self.fd, (json.dumps(event, separators=(",", ":")) + "\n").encode())


class Workload:
    def __init__(self, data_dir: str, ledger: Ledger, seed: int) -> None:
        self.data_dir = data_dir
        self.ledger = ledger
        self.rng = random.Random(seed)
        self.step = 0
        self.failures_in_a_row = 0
        self.storage: Storage | None = None
        # Instances whose stored content the workload knows for certain: every write of them
        # was acknowledged. A write that failed may or may not have landed, so what it touched
        # is put again before it is deleted or transitioned.
        self.known: dict[str, dict[str, Any]] = {}

    @property
    def stopped(self) -> bool:
        return self.failures_in_a_row >= MAX_FAILURES_IN_A_ROW

    def attempt(self, kind: str, action: Any, changes: list[list[Any]] | None = None) -> bool:
        """Run one step between its ``try`` and its outcome; true when it succeeded."""
        self.step += 1
        self.ledger.emit(event="try", step=self.step, kind=kind, changes=changes or [])
        error: StorageError | None = None
        try:
            seq = action()
        except StorageError as exc:
            error = exc
        if error is not None:  # out of the except block: what look() raises stands alone
            self.ledger.emit(
                event="error", step=self.step, type=type(error).__name__, message=str(error)
            )
            self.failures_in_a_row += 1
            for kind_, arg in changes or []:
                self.known.pop(arg["id"] if kind_ == "put" else arg, None)
            if kind not in ("open", "close"):
                self.look()
            return False
        self.failures_in_a_row = 0
        if changes is None:
            self.ledger.emit(event="ok", step=self.step)
            return True
        self.ledger.emit(event="ack", step=self.step, seq=seq)
        for kind_, arg in changes:
            if kind_ == "put":
                self.known[arg["id"]] = arg
            else:
                self.known.pop(arg, None)
        return True

    def look(self) -> None:
        """After an error, ask ``health()`` and read an instance whose content is known: after
        a failed sync or a full disk the README promises that reads go on and that health()
        says whether the store failed. Neither counts as a failed step."""
        storage = self.storage
        assert storage is not None
        self.step += 1
        self.ledger.emit(event="try", step=self.step, kind="health", changes=[])
        try:
            failed = storage.health()["failed"]
        except StorageError as exc:
            self.ledger.emit(
                event="error", step=self.step, type=type(exc).__name__, message=str(exc)
            )
        else:
            self.ledger.emit(event="ok", step=self.step, failed=failed)
        if not self.known:
            return
        spec = self.known[min(self.known)]
        self.step += 1
        self.ledger.emit(event="try", step=self.step, kind="read", changes=[], id=spec["id"])
        try:
            inst = storage.get_instance(spec["id"])
        except StorageError as exc:
            self.ledger.emit(
                event="error", step=self.step, type=type(exc).__name__, message=str(exc)
            )
            return
        found = None if inst is None else {k: getattr(inst, k) for k in spec}
        self.ledger.emit(event="ok", step=self.step, matches=found == spec)

    def spec(self, instance_id: str) -> dict[str, Any]:
        rng = self.rng
        return {
            "id": instance_id,
            "machine": "order",
            "version": 1,
            "state": rng.choice(STATES),
            "ctx": {"step": self.step + 1, "pad": "p" * rng.randint(1000, 6000)},
            "metadata": {"owner": f"w{rng.randint(0, 3)}"},
        }

    def write(self) -> None:
        storage = self.storage
        assert storage is not None
        rng = self.rng
        roll = rng.random()
        known = sorted(self.known)
        if roll < 0.15 and known:
            victim = rng.choice(known)
            self.attempt("delete", lambda: storage.delete_instance(victim), [["del", victim]])
        elif roll < 0.3 and known:
            target = dict(self.known[rng.choice(known)])
            old, target["state"] = (
                target["state"],
                rng.choice([s for s in STATES if s != target["state"]]),
            )
            self.attempt(
                "transition",
                lambda: storage.transition(target["id"], old, target["state"]).last_wal_offset,
                [["put", target]],
            )
        elif roll < 0.6:
            changes: list[list[Any]] = []
            live = set(known)
            for _ in range(rng.randint(2, 4)):
                if live and rng.random() < 0.3:
                    victim = rng.choice(sorted(live))
                    live.discard(victim)
                    changes.append(["del", victim])
                else:
                    spec = self.spec(f"o{rng.randrange(12)}")
                    live.discard(spec["id"])  # not deleted after it is put in the same batch
                    changes.append(["put", spec])
            self.attempt("batch", lambda: self.run_batch(changes), changes)
        else:
            spec = self.spec(f"o{rng.randrange(12)}")
            self.attempt("put", lambda: storage.put_instance(Instance(**spec)), [["put", spec]])

    def run_batch(self, changes: list[list[Any]]) -> int:
        assert self.storage is not None
        return write_changes(self.storage, changes)

    def run(self) -> None:
        def open_store() -> None:
            self.storage = Storage.open(config(self.data_dir))

        if not self.attempt("open", open_store):
            self.ledger.emit(event="done")
            return
        storage = self.storage
        assert storage is not None
        maintenance = [
            ("checkpoint", storage.checkpoint),
            ("snapshot", storage.create_snapshot),
            ("compact", storage.compact),
            ("close", storage.close),
        ]
        for count, (kind, action) in zip(WRITES, maintenance, strict=True):
            for _ in range(count):
                if not self.stopped:
                    self.write()
            if kind == "close" or not self.stopped:
                self.attempt(kind, action)
        self.ledger.emit(event="done")


def main(data_dir: str, ledger: str, seed: str) -> None:
    use_a_steady_clock()
    Workload(data_dir, Ledger(ledger), int(seed)).run()


if __name__ == "__main__":
    main(*sys.argv[1:])
