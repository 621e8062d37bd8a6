"""The writer process the harness kills (``crashtest.py --child SPEC``), and what it shares
with the parent: the store's configuration and the digest of an instance's content.

The child talks to the parent in JSON lines on stdout, each flushed as soon as it is written:

``ready``         opened (``applied``: its applied_seq); it then waits for ``go`` on stdin
``try``           a write is about to be made: ``n``, ``op``, ``changes`` ([id, digest or null])
``ack``           the store acknowledged write ``n``: ``op``, ``id``, ``seq``, ``digest``,
                  ``changes`` (the content as stored: for a transition, the returned instance)
``refused``       write ``n`` raised ConflictError or InstanceNotFoundError: nothing written
``target``        a backup or restore into ``path`` begins; ``target-ack`` when it returned
``anomaly``       something the API promises did not hold (a stale CAS that succeeded, ...)
``error``         an unexpected exception; the child stops (exit status 2)
``open-failed``   Storage.open raised (exit status 3)
``done``          every operation made, the store closed

A write is in flight from its ``try`` until its ``ack`` or ``refused``: a killed child has at
most one. Its ids are ``w<slot>-<i>`` (only this child writes them during a trial) and the
shared ``shared-<i>``, written by every child, only with compare-and-set.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import hashlib
import json
import os
import random
import shutil
import signal
import struct
import sys
import traceback
from pathlib import Path
from typing import Any

from rstmdb_storage import (
    ConflictError,
    FsyncPolicy,
    Instance,
    InstanceNotFoundError,
    InvalidInputError,
    Storage,
    StorageConfig,
)

SEGMENT_SIZE = 64 * 1024  # the smallest allowed: segments rotate every few dozen writes
OWN_IDS = 16  # per writer slot
SHARED_IDS = 8  # written by every writer, with compare-and-set
STATES = ["pending", "paid", "packed", "shipped", "done", "failed"]

#: the operations a child makes, and their weights
WEIGHTS = {
    "put": 22,
    "batch": 12,
    "transition": 14,
    "cas": 14,
    "delete": 7,
    "snapshot": 3,
    "compact": 3,
    "checkpoint": 3,
    "backup": 2,
    "restore": 2,
}
WRITES = ("put", "batch", "transition", "cas", "delete")


def store_config(data_dir: str | os.PathLike[str], **fields: Any) -> StorageConfig:
    """The configuration every process opens the store with: small segments (rotation every
    few dozen writes), automatic snapshots and compaction, frequent checkpoints."""
    settings: dict[str, Any] = {
        "wal_segment_size": SEGMENT_SIZE,
        "snapshot_interval": 120,
        "max_wal_segments": 4,
        "snapshots_kept": 2,
        "compaction_enabled": True,
        "checkpoint_interval_ms": 50,
        "fsync_policy": FsyncPolicy.every_write(),
    }
    settings.update(fields)
    return StorageConfig(data_dir=data_dir, **settings)


def digest(inst: Instance) -> str:
    """The content of an instance, every field but those the store fills (seq, timestamps)."""
    body = [
        inst.id,
        inst.machine,
        inst.version,
        inst.state,
        inst.ctx,
        inst.metadata,
        inst.status,
        inst.last_event_id,
    ]
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class Writer:
    """One child: the writes of one trial, on its own ids and the shared ones."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.rng = random.Random(spec["seed"])
        self.slot = spec["slot"]
        self.config = store_config(spec["data_dir"])
        self.storage: Storage | None = None
        self.own: dict[str, Instance] = {}
        weights = dict(WEIGHTS)
        focus = spec.get("focus", [])
        for kind in focus:
            if kind in weights:
                weights[kind] *= 8
        #: "bulk": large contexts, so that segments fill (and rotate) within a few writes
        self.notes = [4000, 8000, 12000] if "bulk" in focus else [0, 10, 200, 900, 2500]
        self.kinds, self.weights = list(weights), list(weights.values())

    # --- opening --------------------------------------------------------------------------

    def open(self) -> Storage:
        self.storage = Storage.open(self.config)
        prefix = f"w{self.slot}-"
        self.own = {i.id: i for i in self.storage.iter_instances() if i.id.startswith(prefix)}
        return self.storage

    # --- one operation ----------------------------------------------------------------------

    def instance(self, instance_id: str, n: int) -> Instance:
        rng = self.rng
        return Instance(
            id=instance_id,
            machine=rng.choice(["order", "payment", "shipment"]),
            version=rng.randint(1, 3),
            state=rng.choice(STATES),
            ctx=self.ctx(n),
            metadata={"slot": self.slot, "prio": rng.randint(0, 9), "vip": rng.random() < 0.2},
        )

    def ctx(self, n: int) -> dict[str, Any]:
        rng = self.rng
        return {
            "n": n,
            "writer": f"{self.spec['seed']}",
            "total": rng.randint(0, 10**6) / 100,
            "items": [rng.randint(0, 999) for _ in range(rng.randint(0, 4))],
            "note": "x" * rng.choice(self.notes),  # segments fill unevenly
        }

    def own_id(self) -> str:
        return f"w{self.slot}-{self.rng.randrange(OWN_IDS)}"

    def run(self, n: int) -> None:
        kind = self.rng.choices(self.kinds, self.weights)[0]
        if kind in ("transition", "delete") and not self.own:
            kind = "put"
        getattr(self, f"op_{kind}")(n)

    def write(self, n: int, op: str, changes: list[tuple[str, Instance | None]], call: Any) -> Any:
        """Announce the write, make it, acknowledge it (or say it was refused)."""
        emit(
            ev="try",
            n=n,
            op=op,
            changes=[[i, None if v is None else digest(v)] for i, v in changes],
        )
        try:
            result = call()
        except (ConflictError, InstanceNotFoundError) as exc:
            emit(ev="refused", n=n, op=op, error=f"{type(exc).__name__}: {exc}")
            return None
        return result

    def ack(self, n: int, op: str, seq: int, changes: list[tuple[str, Instance | None]]) -> None:
        shown = [[i, None if v is None else digest(v)] for i, v in changes]
        emit(ev="ack", n=n, op=op, id=shown[0][0], seq=seq, digest=shown[0][1], changes=shown)

    def must(self, n: int, result: Any, what: str) -> Any:
        """A write on our own ids, which nobody else writes: a refusal is an anomaly."""
        if result is None:
            emit(ev="anomaly", n=n, what=f"{what} (our own id, as we read it) was refused")
            raise SystemExit(2)
        return result

    def op_put(self, n: int) -> None:
        assert self.storage is not None
        inst = self.instance(self.own_id(), n)
        call = lambda: self.storage.put_instance(inst)  # type: ignore[union-attr]  # noqa: E731
        seq = self.must(n, self.write(n, "put", [(inst.id, inst)], call), f"a put of {inst.id}")
        self.own[inst.id] = dataclasses.replace(inst, last_wal_offset=seq)
        self.ack(n, "put", seq, [(inst.id, inst)])

    def op_delete(self, n: int) -> None:
        assert self.storage is not None
        victim = self.rng.choice(sorted(self.own))
        call = lambda: self.storage.delete_instance(victim)  # type: ignore[union-attr]  # noqa: E731
        seq = self.must(n, self.write(n, "delete", [(victim, None)], call), f"delete of {victim}")
        del self.own[victim]
        self.ack(n, "delete", seq, [(victim, None)])

    def op_batch(self, n: int) -> None:
        assert self.storage is not None
        live = set(self.own)
        changes: list[tuple[str, Instance | None]] = []
        conditions: dict[int, int] = {}  # change index -> expected_seq
        touched: set[str] = set()
        for _ in range(self.rng.randint(2, 5)):
            if live and self.rng.random() < 0.3:
                victim = self.rng.choice(sorted(live))
                live.discard(victim)
                changes.append((victim, None))
            else:
                inst = self.instance(self.own_id(), n)
                stored = self.own.get(inst.id)
                if stored is not None and inst.id not in touched and self.rng.random() < 0.5:
                    conditions[len(changes)] = stored.last_wal_offset or 0  # CAS in a batch
                live.add(inst.id)
                changes.append((inst.id, inst))
            touched.add(changes[-1][0])

        def call() -> int:
            with self.storage.batch() as batch:  # type: ignore[union-attr]
                for at, (instance_id, inst) in enumerate(changes):
                    if inst is None:
                        batch.delete_instance(instance_id)
                    else:
                        batch.put_instance(inst, expected_seq=conditions.get(at))
            assert batch.seq is not None
            return batch.seq

        seq = self.must(n, self.write(n, "batch", changes, call), "a batch of our own ids")
        for instance_id, inst in changes:
            if inst is None:
                self.own.pop(instance_id, None)
            else:
                self.own[instance_id] = dataclasses.replace(inst, last_wal_offset=seq)
        self.ack(n, "batch", seq, changes)

    def op_transition(self, n: int) -> None:
        assert self.storage is not None
        current = self.own[self.rng.choice(sorted(self.own))]
        to_state = self.rng.choice([s for s in STATES if s != current.state])
        ctx, event_id = self.ctx(n), f"evt-{self.spec['seed']}-{n}"
        key = f"key-{self.spec['seed']}-{n}" if self.rng.random() < 0.3 else None
        moved = dataclasses.replace(current, state=to_state, ctx=ctx, last_event_id=event_id)
        stored = self.write(
            n,
            "transition",
            [(current.id, moved)],
            lambda: self.storage.transition(  # type: ignore[union-attr]
                current.id,
                current.state,
                to_state,
                ctx=ctx,
                event_id=event_id,
                idempotency_key=key,
            ),
        )
        self.must(n, stored, f"a transition of {current.id}")
        if digest(stored) != digest(moved):
            emit(ev="anomaly", n=n, what=f"transition stored {stored}, expected {moved}")
        self.own[current.id] = stored
        self.ack(n, "transition", stored.last_wal_offset, [(current.id, stored)])

    def op_cas(self, n: int) -> None:
        """Compare-and-set on a shared id (other writers race for it), or on one of ours."""
        assert self.storage is not None
        rng = self.rng
        if rng.random() < 0.7:
            instance_id = f"shared-{rng.randrange(SHARED_IDS)}"
            current = self.storage.get_instance(instance_id)
        else:
            instance_id = self.own_id()
            current = self.own.get(instance_id)
        expected = 0 if current is None else current.last_wal_offset or 0
        # A stale seq (lower than the one read, and not 0: "absent") must be refused.
        stale = expected > 1 and rng.random() < 0.15
        if stale:
            expected = max(1, expected - rng.randint(1, 3))
        if current is not None and rng.random() < 0.25 and not stale:
            changes: list[tuple[str, Instance | None]] = [(instance_id, None)]
            seq = self.write(
                n,
                "cas-delete",
                changes,
                lambda: self.storage.delete_instance(  # type: ignore[union-attr]
                    instance_id, expected_seq=expected
                ),
            )
        else:
            inst = self.instance(instance_id, n)
            changes = [(instance_id, inst)]
            seq = self.write(
                n,
                "cas",
                changes,
                lambda: self.storage.put_instance(inst, expected_seq=expected),  # type: ignore[union-attr]
            )
        own = instance_id.startswith("w")
        if seq is None:
            if own and not stale:
                emit(ev="anomaly", n=n, what=f"CAS on {instance_id}, ours, at its seq refused")
            return
        if stale:
            emit(ev="anomaly", n=n, what=f"CAS on {instance_id} with a stale seq succeeded")
        if own:
            ((_, value),) = changes
            if value is None:
                self.own.pop(instance_id, None)
            else:
                self.own[instance_id] = dataclasses.replace(value, last_wal_offset=seq)
        self.ack(n, "cas" if changes[0][1] is not None else "cas-delete", seq, changes)

    def op_snapshot(self, n: int) -> None:
        assert self.storage is not None
        emit(ev="snapshot", n=n, seq=self.storage.create_snapshot().seq)

    def op_compact(self, n: int) -> None:
        assert self.storage is not None
        result = self.storage.compact()
        emit(ev="compact", n=n, segments=result.segments_deleted, snaps=result.snapshots_deleted)

    def op_checkpoint(self, n: int) -> None:
        assert self.storage is not None
        emit(ev="checkpoint", n=n, seq=self.storage.checkpoint())

    def op_backup(self, n: int) -> None:
        assert self.storage is not None
        target = Path(self.spec["scratch"]) / f"backup-{self.spec['seed']}-{n}"
        emit(ev="target", n=n, kind="backup", path=str(target))
        emit(ev="target-ack", n=n, path=str(target), seq=self.storage.backup(target))

    def op_restore(self, n: int) -> None:
        """Point-in-time restore of the store in use into a new directory: to its newest
        record, or to a sequence number the oldest kept snapshot covers."""
        assert self.storage is not None
        target = Path(self.spec["scratch"]) / f"restore-{self.spec['seed']}-{n}"
        seq = None
        snapshots = self.storage.list_snapshots()
        if snapshots and self.rng.random() < 0.5:
            seq = self.rng.randint(snapshots[0].seq, self.storage.applied_seq)
        emit(ev="target", n=n, kind="restore", path=str(target), seq=seq)
        try:
            restored = Storage.restore(self.config.data_dir, target, seq=seq)
        except InvalidInputError as exc:  # compaction elsewhere deleted that snapshot since
            emit(ev="target-refused", n=n, path=str(target), error=str(exc))
            shutil.rmtree(target, ignore_errors=True)
            return
        emit(ev="target-ack", n=n, path=str(target), seq=restored)

    # --- repair ---------------------------------------------------------------------------

    def repair(self) -> None:
        """Close, leave a torn record after the last one (what a write cut short by a power
        loss leaves, made by the documented format of wal/format.py), repair, reopen."""
        assert self.storage is not None
        self.storage.close()
        wal = Path(self.config.data_dir) / "wal"
        last = max(wal.glob("*.wal"))
        offset = torn_tail(last, self.rng)
        emit(ev="torn", segment=last.name, offset=offset)
        if offset is not None:
            repaired = Storage.repair_wal(self.config)
            emit(ev="repaired", offset=None if repaired is None else repaired.offset)
        self.open()


def torn_tail(segment: Path, rng: random.Random) -> int | None:
    """Write the first bytes of a record after the last one of *segment*; return where (None
    when the segment is sealed). Record framing: a 32-byte header (length u32, crc32c u32, seq
    u64, timestamp u64, type u8, 7 zero bytes), the payload, zeros to a multiple of 8."""
    data = segment.read_bytes()
    offset, seq = 48, None
    while offset + 32 <= len(data):
        header = data[offset : offset + 32]
        if header.count(0) == 32:
            break
        length, _, seq, _, kind = struct.unpack("<IIQQB7x", header)
        if kind == 2:
            return None  # sealed: the next record goes to a new segment
        offset += 32 + (length + 7) // 8 * 8
    if seq is None or offset + 600 > len(data):
        return None
    length = rng.randint(40, 500)
    header = struct.pack("<IIQQB7x", length, rng.getrandbits(32), seq + 1, 0, 1)
    torn = header + rng.randbytes(length)
    with open(segment, "r+b") as f:
        f.seek(offset)
        f.write(torn[: rng.randint(8, len(torn))])
    return offset


#: the signal a writer answers with every thread's stack (see trials.run_trial)
STACKS_SIGNAL = signal.SIGUSR1


def child_main(spec_text: str) -> int:
    # A stuck trial asks each writer for its stacks (into its stderr file) before the kill.
    faulthandler.register(STACKS_SIGNAL, all_threads=True)
    spec = json.loads(spec_text)
    writer = Writer(spec)
    try:
        writer.open()
    except Exception as exc:
        emit(ev="open-failed", error=f"{type(exc).__name__}: {exc}")
        return 3
    assert writer.storage is not None
    emit(ev="ready", applied=writer.storage.applied_seq)
    if sys.stdin.readline().strip() != "go":
        return 4
    n = 0
    try:
        for n in range(1, spec["ops"] + 1):
            if spec.get("repair") and n == spec["ops"] // 2:
                writer.repair()
            writer.run(n)
        writer.storage.close()
    except SystemExit:
        raise
    except Exception as exc:
        emit(ev="error", n=n, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc())
        return 2
    emit(ev="done")
    return 0
