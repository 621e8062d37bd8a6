"""The scrub: :mod:`rstmdb_storage.verify`'s checks, a bounded slice at a time, in the
background, so that damage is found before a read misses it.

Every ``scrub_interval_ms`` (0: never) the background thread checks the next slice of one part
of the store, the parts in this order:

1. ``instances``: :data:`SLICE` instances, each found again by its key, decoded, checked
   as a write would check it, with every index entry it should have;
2. each index (``idx_state``, ``idx_metadata``, ``idx_time``): :data:`SLICE` entries, each
   found again by its key and pointing to a stored instance it describes;
3. ``machines``: every machine definition;
4. ``wal``: :data:`SLICE` records, read with their CRCs (a sealed segment against its seal);
   once the walk reaches the applied sequence, every instance the WAL touched is checked
   against what the WAL says it must be (:class:`~rstmdb_storage.verify.WalEffects`): a key
   lost to a damaged page is found here even when its index entries went with it;
5. ``snapshots``: one snapshot file per slice, against its manifest.

After the last part a *cycle* is complete and the next begins. Each slice is one short read
transaction; keys and sequence numbers mark where the next slice goes on, so writes in between
are met or not, and nothing is reported that a write explains.

Damage in LMDB (parts 1 to 4) fail-stops the store for every process, as a failed sync does:
``indexes/UNTRUSTED`` names what was found and ``wal/FAILED`` refuses every later write, for
a write into a damaged tree can spread the damage, while the WAL holds every acknowledged write.
Reads go on. The next open, once no process has the store open, heals it: ``data.mdb`` is
moved aside (``data.mdb.broken-<unix ms>``) and rebuilt from the newest intact snapshot and the
WAL, losing nothing acknowledged. Damage in a snapshot or a sealed WAL segment is reported
(:meth:`~rstmdb_storage.Storage.health`, the log) and not acted on: the store serves from LMDB,
and ``verify()`` says which snapshot or segment to replace.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from .config import (
    DB_INSTANCES,
    DB_MACHINES,
    INDEX_DATABASES,
    INDEXES_DIR,
    SNAPSHOTS_DIR,
    UNTRUSTED_MARKER,
)
from .engine import Engine
from .errors import CorruptionError, StorageError, StorageFailedError
from .fsutil import write_file_atomic
from .recovery import DATA_FILE, rebuild_from_snapshot
from .replay import adopt_snapshot, replay
from .snapshots import published_seqs
from .store import locks
from .store.meta import Checkpoint
from .verify import (
    Finding,
    WalEffects,
    check_index_entry,
    check_instance_entry,
    check_machine_entry,
    check_snapshot,
    entries,
    walk_wal,
)
from .wal import WalTail
from .wal.format import SEGMENT_HEADER_SIZE

log = logging.getLogger("rstmdb_storage")

#: entries (or WAL records) one slice checks
SLICE = 2000
#: findings kept for :meth:`~rstmdb_storage.Storage.health`
KEPT_FINDINGS = 20

_PARTS = (DB_INSTANCES, *INDEX_DATABASES, DB_MACHINES, b"wal", b"snapshots")

#: what a slice found, whether its part is done, and whether what it found is damage in LMDB
Slice = tuple[list[Finding], bool, bool]


@dataclass
class ScrubState:
    """Where the scrub of one open store is, and what it found."""

    part: int = 0
    #: the last key checked in the part (None: from its start)
    after: bytes | None = None
    #: the WAL part: the next sequence number, and the effects read so far
    next_seq: int | None = None
    effects: WalEffects = field(default_factory=WalEffects)
    #: the snapshots part: the last snapshot checked
    after_snapshot: int = 0
    slices: int = 0
    cycles: int = 0
    #: times the store was rebuilt in place after damage was found
    heals: int = 0
    #: wall-clock Unix ms of the last slice and of the end of the last cycle
    last_slice_ms: int | None = None
    last_cycle_ms: int | None = None
    #: the last findings, newest last
    findings: list[str] = field(default_factory=list)
    #: monotonic time the next background slice is due
    due_at: float = 0.0

    def report(self) -> dict[str, Any]:
        return {
            "cycles": self.cycles,
            "slices": self.slices,
            "heals": self.heals,
            "part": _PARTS[self.part].decode(),
            "last_slice_ms": self.last_slice_ms,
            "last_cycle_ms": self.last_cycle_ms,
            "findings": list(self.findings),
        }


def state_of(engine: Engine) -> ScrubState:
    if engine.scrub is None:
        engine.scrub = ScrubState()
    return engine.scrub


def scrub_if_due(engine: Engine) -> None:
    """A slice, from the background thread, when ``scrub_interval_ms`` has passed since the
    last one (never with 0). Damage in LMDB raises the :class:`StorageFailedError` it caused."""
    interval_ms = engine.config.scrub_interval_ms
    state = state_of(engine)
    now = time.monotonic()
    if not state.due_at:  # the first slice one interval after opening, as every later one
        state.due_at = now + interval_ms / 1000
    if not interval_ms or now < state.due_at:
        return
    state.due_at = now + interval_ms / 1000
    found, in_lmdb = scrub_slice(engine, state)
    if in_lmdb and not heal(engine, found):
        raise fail_on_damage(engine, found)


def scrub_cycle(engine: Engine) -> list[Finding]:
    """See :meth:`rstmdb_storage.Storage.scrub`: slices until a whole cycle has run (from
    the start of the first part, wherever the background scrub was)."""
    state = state_of(engine)
    state.part, state.after, state.next_seq = 0, None, None
    state.effects, state.after_snapshot = WalEffects(), 0
    cycles = state.cycles
    found: list[Finding] = []
    damage: list[Finding] = []
    while state.cycles == cycles:
        slice_found, in_lmdb = scrub_slice(engine, state)
        found += slice_found
        if in_lmdb:
            damage += slice_found
    if damage and not engine.config.read_only and not heal(engine, damage):
        fail_on_damage(engine, damage)
    return found


def scrub_slice(engine: Engine, state: ScrubState) -> tuple[list[Finding], bool]:
    """Check the next slice; return what it found, and whether that is damage in LMDB."""
    part = _PARTS[state.part]
    try:
        if part == b"snapshots":
            found, done, in_lmdb = _snapshot_slice(engine, state)
        else:
            found, done, in_lmdb = engine.read(lambda txn: _lmdb_slice(engine, state, txn, part))
    except CorruptionError as exc:  # LMDB itself gave up on a damaged page
        found, done, in_lmdb = [Finding(part.decode(), str(exc))], True, True
    state.slices += 1
    state.last_slice_ms = time.time_ns() // 1_000_000
    if found:
        for finding in found:
            log.error("scrub of %s: %s", engine.config.path, finding)
        state.findings = (state.findings + [str(f) for f in found])[-KEPT_FINDINGS:]
    if done:
        _next_part(state)
    return found, bool(found) and in_lmdb


def _next_part(state: ScrubState) -> None:
    state.part, state.after = (state.part + 1) % len(_PARTS), None
    if state.part == 0:
        state.cycles += 1
        state.last_cycle_ms = time.time_ns() // 1_000_000
        state.next_seq, state.effects, state.after_snapshot = None, WalEffects(), 0


def _lmdb_slice(engine: Engine, state: ScrubState, txn: Any, part: bytes) -> Slice:
    dbs = engine.live().dbs
    applied = engine.meta.tail(txn).applied_seq
    if part == b"wal":
        return _wal_slice(engine, state, txn, applied)
    found: list[Finding] = []
    walk = entries(txn, dbs[part], part.decode(), state.after)
    for checked, (key, raw, finding) in enumerate(walk, 1):
        if finding is not None:
            found.append(finding)
        if part == DB_INSTANCES:
            found += check_instance_entry(txn, dbs, key, raw, applied)
        elif part == DB_MACHINES:
            found += check_machine_entry(key, raw)
        else:
            found += check_index_entry(txn, dbs, part, key)
        state.after = key
        if checked == SLICE and part != DB_MACHINES:
            return found, False, True
    return found, True, True


def _wal_slice(engine: Engine, state: ScrubState, txn: Any, applied: int) -> Slice:
    """The next :data:`SLICE` records (damage there is the WAL's); at the applied sequence,
    the instances against the effects, in this transaction (whose applied sequence the walk
    has reached: damage there is LMDB's)."""
    wal = engine.wal
    ids = wal.segment_ids()
    if not ids:
        return [Finding(str(wal.directory), "no WAL segments")], True, False
    if state.next_seq is None or state.next_seq < ids[0]:  # the start, or compacted away
        state.next_seq, state.effects = ids[0], WalEffects()
    until = min(applied, state.next_seq + SLICE - 1)
    found = list(walk_wal(wal, state.next_seq, until, state.effects))
    if found and wal.segment_ids()[:1] != ids[:1]:
        state.next_seq = None  # a compaction deleted the segment being read: start again
        return [], False, False
    state.next_seq = until + 1
    if found:
        return found, True, False
    if until < applied:
        return [], False, False
    return list(state.effects.check(txn, engine.live().dbs[DB_INSTANCES])), True, True


def _snapshot_slice(engine: Engine, state: ScrubState) -> Slice:
    directory = engine.config.path / SNAPSHOTS_DIR
    later = [seq for seq in published_seqs(directory) if seq > state.after_snapshot]
    if not later:
        return [], True, False
    state.after_snapshot = later[0]
    found = list(check_snapshot(directory, engine.wal, later[0], engine.wal.segment_ids()))
    return found, len(later) == 1, False


def fail_on_damage(engine: Engine, found: list[Finding]) -> StorageFailedError:
    """Mark ``indexes/`` untrusted with *found* and fail-stop the store (see the module
    docstring); return the error the background thread raises."""
    indexes = engine.config.path / INDEXES_DIR
    text = "\n".join(str(f) for f in found[:KEPT_FINDINGS]) + "\n"
    with contextlib.suppress(OSError):  # the failure below is what counts
        write_file_atomic(indexes / UNTRUSTED_MARKER, text.encode(), engine.config.file_mode)
    return engine.wal.failed(
        f"the scrub of {indexes / 'data.mdb'}",
        f"{len(found)} problem(s), first: {found[0]}; reopening, once no process has the "
        f"store open, rebuilds it from the newest intact snapshot and the WAL",
    )


def heal(engine: Engine, found: list[Finding]) -> bool:
    """Rebuild LMDB in place, as opening does, from the newest intact snapshot and the WAL,
    keeping the damaged file aside, when this store object is the only user of the data
    directory (in this process and every other); return whether it did. Reads wait at the
    gate meanwhile, and writes at the write mutex; both then go on in the rebuilt file."""
    config = engine.config
    env = engine.live()
    if config.read_only or env.refs != 1:
        return False
    reason = f"the scrub found damage in {env.path / DATA_FILE} ({found[0]})"
    try:
        with locks.open_lock(config), env.write_mutex:
            if not env.alone():
                return False
            try:
                with env.paused():
                    restored = env.reopen(
                        config, lambda: rebuild_from_snapshot(config, engine.wal, reason)
                    )
                    if restored is None:
                        engine.write(lambda txn: _start_from_the_whole_wal(engine, txn))
                    else:
                        adopt_snapshot(engine, restored)
                    replay(engine, strict=False)
            finally:
                env.share()
    except StorageError as exc:
        log.error("%s could not be healed: %s", config.path, exc)
        return False
    state_of(engine).heals += 1
    log.warning("%s healed: %s", config.path, reason)
    return True


def _start_from_the_whole_wal(engine: Engine, txn: Any) -> None:
    """The meta table of a store rebuilt with no snapshot: the WAL, from sequence 1, is
    replayed next."""
    engine.meta.create(txn, engine.wal.store_id, WalTail(1, SEGMENT_HEADER_SIZE, 1))
    engine.meta.write_checkpoint(txn, Checkpoint(0, engine.boot_id))
