"""Replay: applying the WAL records LMDB has not applied yet.

LMDB's meta table holds the *applied tail*: the end of the records applied, stored in the same
transaction that applies them. Records past it exist when a writer died between its append and
its commit, when LMDB (which runs with ``sync=False``) lost commits in a power loss, when a
grouped writer appended and another is to apply, or when ``indexes/`` was rebuilt from a
snapshot. :func:`walk` is the one loop over them; opening (:func:`recover`), the write path's
catch-up (:func:`apply_pending`) and group commit's apply step (:func:`apply_through`) all use it.
"""

from __future__ import annotations

import logging
from typing import Any

from .apply import apply_changes
from .changes import Change, decode_changes
from .config import INDEXES_DIR, WAL_DIR
from .engine import Engine
from .errors import DecodeError, IndexesCorruptionError, WalGapError
from .failpoints import failpoint
from .snapshots import Progress, SnapshotManifest
from .store.env import LmdbEnvironment
from .store.meta import Checkpoint
from .verify import check_lmdb
from .wal import FramedRecord, WalTail
from .wal.format import segment_name
from .wal.reader import WalReader, ends_at

log = logging.getLogger("rstmdb_storage")

#: records this process appended, by sequence number: their changes, timestamp and the tail
#: after each, for group commit's apply to take from memory instead of reading them back
OwnRecords = dict[int, tuple[list[Change], int, WalTail]]

#: changes applied per LMDB transaction when replaying: a chunk ends with the record that
#: brings it to this many (a record is never split). Counting changes, not records, bounds a
#: transaction's dirty pages, which LMDB keeps in memory until the commit: 100 records of
#: 10,000 puts each, replayed in one transaction, took 1.4 GiB of anonymous memory.
REPLAY_CHUNK = 2000


def walk(
    engine: Engine,
    txn: Any | None,
    tail: WalTail,
    *,
    until_seq: int | None = None,
    limit: int | None = None,
    strict: bool = False,
    mark_unsynced: bool = True,
    own: OwnRecords | None = None,
) -> tuple[WalTail, list[Change], bool]:
    """Go through the records after *tail*: up to *until_seq* (all of which must exist), or
    to the end of the log, stopping before the next record once *limit* changes were
    applied. Each is applied inside *txn* (unless it is None: then they are only passed) and,
    with *mark_unsynced*, its segment is marked for the next sync. Returns the tail after the
    last one, the changes applied, and whether the end of the log was reached. *strict* checks
    the bytes after the end (see ``Wal.next_record``). A record in *own* (given with a *txn*
    and an *until_seq*: group commit's apply) is applied from there, not read.
    """
    wal = engine.wal
    if until_seq is None and not strict and ends_at(wal, tail):
        return tail, [], True  # nothing past it: what a writer's catch-up finds nearly always
    reader = WalReader(wal, tail, strict)
    read = reader.read
    dbs = engine.env.dbs if txn is not None else None
    changed: list[Change] = []
    marked = None  # the segment last marked unsynced
    while (until_seq is None or reader.next_seq <= until_seq) and (
        limit is None or len(changed) < limit
    ):
        mine = own.get(reader.next_seq) if own else None
        if mine is not None:  # appended by this process: what it holds is known
            seq = reader.next_seq
            changes, timestamp_ms, after = mine
            reader.go_on_after(after)
            apply_changes(txn, dbs, seq, timestamp_ms, changes)
            changed.extend(changes)
            continue
        record = read()
        if record is None:
            if until_seq is not None:
                raise WalGapError(
                    f"the WAL ends at sequence {reader.next_seq - 1}, before {until_seq}",
                    path=str(engine.config.path / WAL_DIR),
                )
            return reader.tail, changed, True
        if txn is not None:
            changes = _decoded(engine, record, reader.segment)
            apply_changes(txn, dbs, record.seq, record.timestamp_ms, changes)
            changed.extend(changes)
        if mark_unsynced and reader.segment != marked:
            marked = reader.segment
            wal.mark_unsynced(marked)
    return reader.tail, changed, False


def _decoded(engine: Engine, record: FramedRecord, segment: int) -> list[Change]:
    """The changes of *record*, in *segment*; a record that passes its CRC but does not hold
    acceptable changes stops the replay here, naming it, with what an operator can do."""
    try:
        return decode_changes(record.payload, f"WAL record {record.seq}")
    except DecodeError as exc:
        path = engine.wal.directory / segment_name(segment)
        raise DecodeError(
            f"{path} at offset {record.offset}: {exc}; its CRC matches, so it was written this "
            f"way and nothing after it is applied: restore from a backup, or to sequence "
            f"{record.seq - 1} (rstmdb-storage restore {engine.config.path} DIR --seq "
            f"{record.seq - 1})",
            path=str(path),
            offset=record.offset,
        ) from exc


def apply_pending(
    engine: Engine, txn: Any, tail: WalTail, strict: bool = False, limit: int = REPLAY_CHUNK
) -> tuple[WalTail, bool]:
    """Apply, inside *txn*, a chunk of the records past *tail* (see :data:`REPLAY_CHUNK`)
    and store the new applied tail; return it and whether the end of the log was reached.
    They are synced first: what becomes visible must be durable."""
    end, changed, reached_end = walk(engine, txn, tail, limit=limit, strict=strict)
    if end != tail:
        engine.wal.sync()
        engine.write_applied(txn, end, changed)
    return end, reached_end


def apply_through(
    engine: Engine, txn: Any, tail: WalTail, until_seq: int, own: OwnRecords | None = None
) -> WalTail:
    """Apply, inside *txn*, the records after *tail* up to *until_seq*, which are synced
    already (those in *own* from memory), and store the new applied tail; return it."""
    end, changed, _ = walk(engine, txn, tail, until_seq=until_seq, mark_unsynced=False, own=own)
    engine.write_applied(txn, end, changed)
    return end


def replay(engine: Engine, strict: bool, progress: Progress | None = None) -> int:
    """Apply every WAL record LMDB has not seen, a chunk per transaction; return how many."""
    env = engine.live()
    replayed = 0
    with env.write_mutex:
        while True:
            before, tail, done = engine.growing(env, _replay_chunk, engine, env, strict)
            replayed += tail.next_seq - before.next_seq
            strict = False  # the end of the log was checked once, in the first pass
            if progress is not None:
                progress("replay", replayed, 0)
            if done:
                break
            failpoint("replay.after_chunk")
    if replayed:
        log.info("replayed %d WAL records into %s", replayed, engine.config.path)
    return replayed


def _replay_chunk(
    engine: Engine, env: LmdbEnvironment, strict: bool
) -> tuple[WalTail, WalTail, bool]:
    """One transaction of replay: the tail before, the tail after, whether the end was reached."""
    appends, _ = engine.group_locks()
    with env.begin_write() as txn, appends.locked():
        before = engine.meta.tail(txn)
        tail, done = apply_pending(engine, txn, before, strict)
        if done:
            # Any other append tail is stale: the records it counted were cut (restore,
            # repair) or lost with a power loss, each of which is followed by an open.
            # Appends go on at the end.
            appends.write_tail(tail)
    return before, tail, done


def recover(engine: Engine, progress: Progress | None = None, rebuilt: bool = False) -> None:
    """Make LMDB whole on open: check it if a reboot may have torn it, then replay.

    LMDB runs with ``sync=False``, so commits after the last checkpoint may be missing or
    torn on disk after a power loss. The WAL holds them; the environment is checked when the
    machine rebooted since the last checkpoint and commits happened after it.
    """
    meta = engine.meta
    checkpoint, applied = engine.read(
        lambda txn: (meta.checkpoint(txn), meta.tail(txn).applied_seq)
    )
    rebooted = checkpoint is None or checkpoint.boot_id != engine.boot_id
    if rebooted and applied > (checkpoint.applied_seq if checkpoint else 0):
        findings = check_lmdb(engine)
        if findings:
            indexes = engine.config.path / INDEXES_DIR
            raise IndexesCorruptionError(
                f"{indexes} was not flushed before the machine restarted and fails its check "
                f"({len(findings)} problem(s), first: {findings[0]})",
                path=str(indexes),
            )
    # A crash cannot leave a hole before written bytes; a power loss can, so the end of the
    # log is checked byte for byte only after a reboot.
    # A rebuild (which records its checkpoint in this boot) follows damage or a reboot: the
    # end of the log is checked byte for byte then too.
    replay(engine, strict=rebooted or rebuilt, progress=progress)


def adopt_snapshot(engine: Engine, manifest: SnapshotManifest) -> None:
    """Record a snapshot just copied into place as flushed (it was synced) and listed."""

    def record(txn: Any) -> None:
        engine.meta.write_checkpoint(txn, Checkpoint(manifest.seq, engine.boot_id))
        engine.list_snapshot(txn, manifest)

    engine.write(record)  # and flushed
