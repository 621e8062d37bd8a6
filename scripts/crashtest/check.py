"""The ledger of acknowledged writes, the state it leads to, and the checks after a trial.

The parent keeps every acknowledged write (sequence number, the content digest of each id it
changed). The state expected after a trial is the state before it with the trial's writes
applied in sequence order; a write that was in flight when its writer died may be there or not,
but whole, and only at a sequence number nobody acknowledged: every such number must be
explained by exactly one write in flight.
"""

from __future__ import annotations

import itertools
import shutil
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rstmdb_storage import NotAStoreError, Storage

from .workload import digest, store_config

#: id -> (content digest, sequence number of its last write)
State = dict[str, tuple[str, int]]
#: one WAL record as the ledger has it: (seq, [[id, digest or None for a delete], ...])
Record = tuple[int, list[list[Any]]]

MUST, MAY, NEVER = "must", "may", "never"


def apply(state: State, records: Iterable[Record]) -> tuple[State, dict[str, int]]:
    """*state* with *records* applied in seq order; and, per id, the seq that last wrote it."""
    state = dict(state)
    written: dict[str, int] = {}
    for seq, changes in sorted(records, key=lambda r: r[0]):
        for instance_id, value in changes:
            written[instance_id] = seq
            if value is None:
                state.pop(instance_id, None)
            else:
                state[instance_id] = (value, seq)
    return state, written


def stored_state(storage: Storage) -> State:
    return {i.id: (digest(i), i.last_wal_offset or 0) for i in storage.iter_instances()}


@dataclass
class Transcript:
    """What one child said: its acknowledged writes, the write in flight when it ended, and
    the backups and restores it made."""

    acked: list[Record] = field(default_factory=list)
    in_flight: list[list[Any]] | None = None
    lands: str = MAY
    targets: dict[str, int | None] = field(default_factory=dict)  # path -> acked seq or None
    anomalies: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    open_failed: str | None = None
    done: bool = False


def read_transcript(events: list[dict[str, Any]]) -> Transcript:
    t = Transcript()
    tries: dict[int, list[list[Any]]] = {}
    for e in events:
        ev = e["ev"]
        if ev == "try":
            tries[e["n"]] = e["changes"]
        elif ev == "ack":
            tries.pop(e["n"], None)
            t.acked.append((e["seq"], e["changes"]))
        elif ev == "refused":
            tries.pop(e["n"], None)
        elif ev == "target":
            t.targets[e["path"]] = None
        elif ev == "target-ack":
            t.targets[e["path"]] = e["seq"]
        elif ev == "target-refused":
            t.targets.pop(e["path"], None)
        elif ev == "anomaly":
            t.anomalies.append(e["what"])
        elif ev == "error":
            t.errors.append(f"{e['error']}\n{e.get('trace', '')}")
        elif ev == "open-failed":
            t.open_failed = e["error"]
        elif ev == "done":
            t.done = True
    if len(tries) > 1:
        t.anomalies.append(f"more than one write in flight: {sorted(tries)}")
    if tries:
        t.in_flight = tries[max(tries)]
    return t


@dataclass
class Outcome:
    """What one check found; every list must be empty."""

    lost: list[str] = field(default_factory=list)  # acknowledged writes not there as written
    unexplained: list[str] = field(default_factory=list)  # content or records nobody wrote
    wal: list[str] = field(default_factory=list)  # gaps, records that differ from the ledger
    verify: list[str] = field(default_factory=list)  # storage.verify() findings
    targets: list[str] = field(default_factory=list)  # backups and restores
    failed_open: str | None = None


def reconcile(
    base: State,
    found: State,
    acked: list[Record],
    writers: list[Transcript],
    unexplained: list[int],
    held: dict[int, list[list[Any]]],
) -> tuple[list[Record] | None, State, dict[str, int]]:
    """The writes in flight that landed (each at one unexplained seq, all of those used;
    MUST ones landed, NEVER ones did not) such that the ledger leads to *found* and each is
    where the WAL holds a record of its ids (*held*: the ids each unexplained record puts or
    deletes; a write's effect alone does not tell the order of writes to different ids, nor
    a write that changed nothing from one that did not land); when none does, the assignment
    closest to it; None (and the acknowledged writes alone) when no assignment accounts for
    the unexplained seqs at all."""
    options = []
    for w in writers:
        if w.in_flight is None or w.lands == NEVER:
            options.append([None])
        elif w.lands == MUST:
            options.append(list(unexplained))
        else:
            options.append([None, *unexplained])
    best: tuple[int, list[Record], State, dict[str, int]] | None = None
    for choice in itertools.product(*options):
        chosen = [s for s in choice if s is not None]
        if sorted(chosen) != unexplained:
            continue
        landed = [(s, w.in_flight) for s, w in zip(choice, writers, strict=True) if s is not None]
        expected, written = apply(base, [*acked, *landed])  # type: ignore[list-item]
        wrong = sum(expected.get(k) != found.get(k) for k in set(expected) | set(found))
        wrong += sum(_signature(c) != held.get(s, _signature(c)) for s, c in landed)
        if best is None or wrong < best[0]:
            best = (wrong, landed, expected, written)  # type: ignore[assignment]
        if wrong == 0:
            break
    if best is None:
        expected, written = apply(base, acked)
        return None, expected, written
    return best[1], best[2], best[3]


class Ledger:
    """Every write acknowledged in this run, and the state of the store it leads to."""

    def __init__(self, data_dir: Path, state: State, applied: int) -> None:
        self.data_dir = data_dir
        self.state = state
        self.applied = applied
        self.acked = 0
        #: (applied_seq before a trial, the state then, the trial's records): recent trials,
        #: to know the state at the sequence number a backup or restore holds
        self.history: deque[tuple[int, State, list[Record]]] = deque(maxlen=50)

    def check_trial(self, writers: list[Transcript]) -> Outcome:
        """Reopen the store after a trial and check it against the ledger."""
        out = Outcome()
        acked = [r for w in writers for r in w.acked]
        self.acked += len(acked)
        seqs = [s for s, _ in acked]
        if len(set(seqs)) != len(seqs):
            out.wal.append(f"a sequence number acknowledged twice: {sorted(seqs)}")
        if any(s <= self.applied for s in seqs):
            out.wal.append(f"a sequence number at or below {self.applied} acknowledged: {seqs}")
        try:
            storage = Storage.open(store_config(self.data_dir))
        except Exception as exc:
            out.failed_open = f"{type(exc).__name__}: {exc}"
            return out
        try:
            applied = storage.applied_seq
            found = stored_state(storage)
            unexplained = sorted(set(range(self.applied + 1, applied + 1)) - set(seqs))
            held = wal_signatures(storage, unexplained)
            landed, expected, written = reconcile(
                self.state, found, acked, writers, unexplained, held
            )
            acked_seqs = set(seqs)
            for key in sorted(set(expected) | set(found)):
                if expected.get(key) == found.get(key):
                    continue
                line = f"{key}: expected {expected.get(key)}, found {found.get(key)}"
                (out.lost if written.get(key) in acked_seqs else out.unexplained).append(line)
            if landed is None:
                musts = [w.in_flight for w in writers if w.lands == MUST and w.in_flight]
                out.unexplained.append(
                    f"records {unexplained} nobody acknowledged, for the writes in flight "
                    f"{[w.in_flight for w in writers if w.in_flight]} (durable: {musts})"
                )
                landed = []
            for s in seqs:
                if s > applied:
                    out.lost.append(f"record {s} acknowledged, applied_seq is {applied}")
            records = sorted([*acked, *landed], key=lambda r: r[0])  # type: ignore[list-item]
            self.history.append((self.applied, self.state, records))
            out.wal += check_wal(storage, applied, dict(acked), landed)
            out.verify += [str(f) for f in storage.verify()]
        except Exception as exc:  # reading what the open served failed: a finding, not a crash
            out.verify.append(f"checking the reopened store raised {type(exc).__name__}: {exc}")
            found, applied = self.state, self.applied
        finally:
            storage.close()
        self.state, self.applied = found, applied
        for w in writers:
            for path, seq in w.targets.items():
                out.targets += self.check_target(Path(path), seq)
        return out

    def state_at(self, seq: int) -> State | None:
        """The state the ledger says the store had at *seq* (None: too far back to know)."""
        for start, state, records in reversed(self.history):
            if start <= seq:
                return apply(state, [r for r in records if r[0] <= seq])[0]
        return None

    def check_target(self, path: Path, acked_seq: int | None) -> list[str]:
        """A backup or restore target: refused as unfinished, or whole at its seq."""
        problems = []
        try:
            if not path.exists():
                return []
            try:
                config = store_config(
                    path,
                    snapshot_interval=0,
                    compaction_enabled=False,
                    max_wal_segments=1 << 20,
                    create=False,
                )
                target = Storage.open(config)
            except NotAStoreError as exc:
                if acked_seq is not None:
                    problems.append(f"{path.name}: acknowledged at {acked_seq}, refused: {exc}")
                return problems
            except Exception as exc:
                return [f"{path.name}: opening failed: {type(exc).__name__}: {exc}"]
            with target:
                problems += target_problems(target, path.name, acked_seq, self.state_at)
        except Exception as exc:
            problems.append(f"{path.name}: checking it raised {type(exc).__name__}: {exc}")
        finally:
            shutil.rmtree(path, ignore_errors=True)
        return problems


def target_problems(
    target: Storage, name: str, acked_seq: int | None, state_at: Callable[[int], State | None]
) -> list[str]:
    """An opened backup or restore: at the seq it was acknowledged with, holding the state
    the ledger says the store had then, its WAL gap-free, ``verify()`` clean."""
    problems = []
    seq = target.applied_seq
    if acked_seq is not None and seq != acked_seq:
        problems.append(f"{name}: holds {seq}, acknowledged {acked_seq}")
    expected = state_at(seq)
    if expected is not None and stored_state(target) != expected:
        problems.append(f"{name}: the state at {seq} differs from the ledger")
    problems += [f"{name}: {w}" for w in check_wal(target, seq, {})]
    problems += [f"{name}: verify: {f}" for f in target.verify()]
    return problems


def _signature(changes: Iterable[Any]) -> list[list[Any]]:
    """Which ids a record or a ledger entry puts or deletes, in order."""
    return [
        [c[0], c[1] is None]  # a ledger entry: [id, value or None]
        if isinstance(c, list)
        else [c.id, type(c).__name__ == "DeleteInstance"]
        for c in changes
        if isinstance(c, list) or type(c).__name__ in ("PutInstance", "DeleteInstance")
    ]


def wal_signatures(storage: Storage, seqs: list[int]) -> dict[int, list[list[Any]]]:
    """The ids the WAL records *seqs* put or delete (empty when the WAL cannot be read there:
    check_wal reports that)."""
    if not seqs:
        return {}
    try:
        records = storage.read_wal(seqs[0], limit=seqs[-1] - seqs[0] + 1)
        return {r.seq: _signature(r.changes()) for r in records if r.seq in seqs}
    except Exception:
        return {}


def check_wal(
    storage: Storage,
    applied: int,
    records: dict[int, list[list[Any]]],
    landed: list[Any] = (),  # type: ignore[assignment]
) -> list[str]:
    """The WAL holds every record from its first segment to *applied*, gap-free, and each one
    the ledger acknowledged changes the ids it says, the way it says (put or delete). The
    writes in flight that landed were placed at the unacknowledged sequence numbers by their
    effect on the state, which cannot tell apart writes of the same effect (three writers each
    deleting its own id): those records must together hold those writes, in whatever order."""
    segments = storage.wal_segments()
    if not segments:
        return [] if applied == 0 else [f"no WAL segment, applied_seq {applied}"]
    first = segments[0]
    problems = []
    seqs = []
    for record in storage.read_wal(first):
        seqs.append(record.seq)
        if record.seq in records:
            ids, wanted = _signature(record.changes()), _signature(records[record.seq])
            if ids != wanted:
                problems.append(f"record {record.seq} holds {ids}, the ledger says {wanted}")
    inferred = {seq: changes for seq, changes in landed}
    held = sorted(
        repr(_signature(record.changes()))
        for record in storage.read_wal(first)
        if record.seq in inferred
    )
    wanted_landed = sorted(
        repr(_signature(changes)) for seq, changes in inferred.items() if seq >= first
    )
    if held != wanted_landed:
        problems.append(
            f"records {sorted(inferred)} hold {held}, the writes in flight {wanted_landed}"
        )
    if seqs != list(range(first, applied + 1)):
        missing = sorted(set(range(first, applied + 1)) - set(seqs))
        problems.append(f"the WAL from {first} to {applied} lacks {missing[:20]}")
    return problems
