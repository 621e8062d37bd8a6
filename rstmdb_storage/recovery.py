"""Recovery: a snapshot in place of a lost ``indexes/``, and restore to a point in time.

When ``indexes/`` (the LMDB environment) is missing, cannot be opened, or fails its check,
opening the store rebuilds it (:func:`rebuild_from_snapshot`), holding the open lock and only
when no other process has the environment open:

1. a damaged ``data.mdb`` is moved aside as ``data.mdb.broken-<unix ms>``, never deleted;
2. the newest snapshot whose file matches its manifest (size and CRC32C) and whose store id is
   the WAL's is copied into place (temporary name, fsync, rename); a damaged one is skipped for
   the one before it;
3. opening then replays the WAL records after the snapshot's sequence number.

With no usable snapshot, a WAL that starts at sequence 1 is replayed whole. Otherwise the store
refuses to open, saying which sequence numbers are missing: a partial state is never served.

After a power loss, records appended but not yet synced can reach the disk out of order: a torn
record followed by an intact one. Opening refuses that (it cannot tell it from a disk damaging
synced records); :func:`cut_damaged_tail`, run by an operator (``rstmdb-storage repair``), cuts
the last segment at the bad record, after copying it aside, when LMDB has not applied it.

Point-in-time restore (:func:`restore_to`) builds a *new* data directory holding the state at a
chosen sequence number: the newest good snapshot at or before it, and the WAL segments after the
snapshot, cut after that record. It writes only inside its target directory, and marks it
unfinished (``RESTORE-IN-PROGRESS``) until the last file is in place: a restore or backup that
was interrupted is refused by ``Storage.open`` rather than opened as an older state.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .config import (
    INDEXES_DIR,
    RESTORE_MARKER,
    SNAPSHOTS_DIR,
    UNTRUSTED_MARKER,
    WAL_DIR,
    StorageConfig,
)
from .engine import (
    FLUSHED_NAME,
    RELAXED_NAME,
    flushed_before_reboot,
    lmdb_suspect,
    probe_wal,
    require_store,
)
from .errors import (
    CorruptionError,
    IndexesCorruptionError,
    InvalidInputError,
    InvalidTypeError,
    StorageError,
    WalGapError,
    shown,
)
from .failpoints import failpoint
from .fsutil import copy_file_atomic, fsync_dir, make_dir, write_file_atomic
from .model import check_int63
from .snapshots import (
    DATA_SUFFIX,
    LOCK_NAME,
    MANIFEST_SUFFIX,
    Progress,
    SnapshotManifest,
    check_data,
    check_progress,
    first_needed_segment,
    published_seqs,
    readable_manifests,
    snapshot_lock,
)
from .store import env as lmdb_env
from .store import locks
from .store.meta import Meta
from .wal import FramedRecord, TornTailRepair, Wal, WalTail
from .wal.decoder import BadRecord, decode_record, is_zero
from .wal.format import RECORD_SEAL, SEGMENT_HEADER_SIZE, segment_name
from .wal.repair import cut_torn_tail, zero_from
from .wal.segment import WalSegment

log = logging.getLogger("rstmdb_storage")

DATA_FILE = "data.mdb"
LOCK_FILE = "lock.mdb"


def choose_snapshot(
    snapshots_dir: Path,
    wal: Wal,
    until_seq: int | None = None,
    progress: Progress | None = None,
) -> SnapshotManifest | None:
    """The newest snapshot at or before *until_seq* whose file is intact and whose store id is
    the WAL's, or None when there is none.

    :raises WalGapError: that snapshot is good but the WAL after it is gone
    """
    ids = wal.segment_ids()
    for manifest in reversed(readable_manifests(snapshots_dir)):
        if until_seq is not None and manifest.seq > until_seq:
            continue
        if wal.store_id and manifest.store_id != wal.store_id:
            log.warning("skipping snapshot %s: it belongs to another store", manifest.name)
            continue
        try:
            check_data(snapshots_dir, manifest, progress)
        except CorruptionError as exc:
            log.warning("skipping snapshot %s: %s", manifest.name, exc)
            continue
        if first_needed_segment(ids, manifest.seq) is None:
            raise WalGapError(
                f"snapshot {manifest.name} holds the state up to sequence {manifest.seq}, but "
                f"WAL sequences {manifest.seq + 1}..{ids[0] - 1 if ids else 'end'} are missing "
                f"from {wal.directory}",
                path=str(wal.directory),
            )
        return manifest
    return None


def rebuild_from_snapshot(
    config: StorageConfig, wal: Wal, problem: str, progress: Progress | None = None
) -> SnapshotManifest | None:
    """Replace ``indexes/data.mdb`` with the newest good snapshot; return its manifest, or
    None when there is none and the WAL starts at sequence 1 (replay it all). *problem* says
    what is wrong with ``indexes/``, naming it (an :class:`IndexesCorruptionError`'s message).

    The caller holds the open lock, and no process has the environment open.

    :raises IndexesCorruptionError: neither a snapshot nor the whole WAL is there to rebuild from
    """
    indexes = config.path / INDEXES_DIR
    manifest = choose_snapshot(config.path / SNAPSHOTS_DIR, wal, progress=progress)
    ids = wal.segment_ids()
    # No snapshot: the whole WAL, from sequence 1; or no WAL at all, for a store cut off
    # while this package created it (it recorded that nothing was flushed yet, before LMDB
    # made the file), which never acknowledged a write. Anyone else's file is left alone.
    being_created = not ids and (indexes / FLUSHED_NAME).exists()
    if manifest is None and not (ids and ids[0] == 1) and not being_created:
        raise IndexesCorruptionError(
            f"{problem}, and cannot be rebuilt: no intact snapshot is in "
            f"{config.path / SNAPSHOTS_DIR} and the WAL starts at sequence "
            f"{ids[0] if ids else '(no segment)'}, not 1",
            path=str(indexes),
        )
    _move_aside(indexes)
    if manifest is not None:
        source = config.path / SNAPSHOTS_DIR / (manifest.name + DATA_SUFFIX)
        copy_file_atomic(source, indexes / DATA_FILE, config.file_mode, _step(progress, "copy"))
        log.warning(
            "%s: rebuilt it from snapshot %s; the WAL after it is replayed next",
            problem,
            manifest.name,
        )
    else:
        log.warning("%s: rebuilding it from the whole WAL", problem)
    return manifest


def _move_aside(indexes: Path) -> None:
    data = indexes / DATA_FILE
    if data.exists():
        aside = indexes / f"{DATA_FILE}.broken-{time.time_ns() // 1_000_000}"
        os.replace(data, aside)
        log.warning("moved the damaged %s aside to %s", data, aside)
    # The reader table of the old file means nothing for the new one; nobody has it open.
    (indexes / LOCK_FILE).unlink(missing_ok=True)
    # These spoke of the file moved aside.
    (indexes / UNTRUSTED_MARKER).unlink(missing_ok=True)
    (indexes / FLUSHED_NAME).unlink(missing_ok=True)
    (indexes / RELAXED_NAME).unlink(missing_ok=True)
    fsync_dir(indexes)
    failpoint("rebuild.after_move_aside")


def restore_to(
    source: Path,
    target: Path,
    wal: Wal,
    seq: int | None,
    file_mode: int,
    progress: Progress | None = None,
    target_role: str = "restore target",
    until_ms: int | None = None,
    move: bool = False,
) -> int:
    """Build in *target* a data directory holding *source*'s state at WAL sequence *seq* (its
    newest record when None; as of the time *until_ms*, when given), to be opened next;
    return that sequence number. *wal* reads the source's WAL. Replay happens when the
    target is opened. *target_role* names the target in errors ("backup target" for a backup).
    With *move*, the files are moved rather than copied: *source* is a staging directory of
    the caller's, thrown away afterwards.

    :raises InvalidInputError: *target* is not empty, or *seq* is not covered by the source
    """
    if seq is not None:
        check_int63("seq", seq)
    check_target(target, target_role)
    with _compaction_held_off(source / SNAPSHOTS_DIR, file_mode):
        if until_ms is not None:  # read here, where compaction cannot delete what it reads
            seq = seq_at_time(wal, until_ms)
        manifest = choose_snapshot(source / SNAPSHOTS_DIR, wal, seq, progress)
        ids = wal.segment_ids()
        if manifest is None and not (ids and ids[0] == 1):
            first = ids[0] if ids else None
            raise InvalidInputError(
                f"sequence {seq} is not covered by {source}: no intact snapshot at or before it, "
                f"and the WAL starts at {first}"
            )
        base = manifest.seq if manifest is not None else 0
        try:
            end = wal.tail_after(seq)
        except WalGapError as exc:
            raise InvalidInputError(f"sequence {seq} is not covered by {source}: {exc}") from exc
        # Listed again: writers go on during a backup, and may have rotated into a segment
        # that was not there when the snapshot was chosen; the end found is in it.
        ids = wal.segment_ids()
        if end.applied_seq < base:
            raise WalGapError(
                f"the WAL in {wal.directory} ends at sequence {end.applied_seq}, before "
                f"snapshot {manifest.name if manifest else ''} was taken"
            )
        first = first_needed_segment(ids, base)
        assert first is not None  # choose_snapshot made sure, or the WAL starts at 1
        # The end may be the seal of a segment the snapshot covers whole, with the next one
        # created since (found by the crash harness): that segment is the one to cut.
        first = min(first, end.segment)
        # Until the last file is in place, the target says it is unfinished: opening what was
        # copied so far would serve an older state than the one asked for.
        make_dir(target, file_mode)
        write_file_atomic(target / RESTORE_MARKER, b"", file_mode)
        for name in (WAL_DIR, SNAPSHOTS_DIR, INDEXES_DIR):
            make_dir(target / name, file_mode)
        place = _move_file if move else copy_file_atomic
        copied = [i for i in ids if first <= i <= end.segment]
        for number, first_seq in enumerate(copied, 1):
            place(
                source / WAL_DIR / segment_name(first_seq),
                target / WAL_DIR / segment_name(first_seq),
                file_mode,
            )
            if progress is not None:
                progress("copy", number, len(copied))
            if number == 1:
                failpoint("restore.mid_copy")
        _cut_after(target / WAL_DIR, end, wal.store_id)
        if manifest is not None:
            for suffix in (DATA_SUFFIX, MANIFEST_SUFFIX):
                name = manifest.name + suffix
                place(source / SNAPSHOTS_DIR / name, target / SNAPSHOTS_DIR / name, file_mode)
        (target / RESTORE_MARKER).unlink()
        fsync_dir(target)
    return end.applied_seq


def _move_file(source: Path, target: Path, mode: int) -> None:
    """Rename *source*, a synced file of a staging directory the restore owns (a download
    from a bucket), to *target*; copy it where a rename cannot go (another filesystem)."""
    try:
        os.chmod(source, mode)
        os.replace(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        copy_file_atomic(source, target, mode)
        return
    fsync_dir(target.parent)


def seq_at_time(wal: Wal, until_ms: int) -> int:
    """The sequence number of the state as of *until_ms* (Unix milliseconds): the record
    before the first one written later than that. Streams the WAL from its first segment."""
    ids = wal.segment_ids()
    if not ids:
        raise WalGapError(f"{wal.directory} holds no WAL segment")
    seq = ids[0] - 1
    for record in wal.records(ids[0], wal.tail_after().applied_seq):
        if record.timestamp_ms > until_ms:
            break
        seq = record.seq
    return seq


@contextlib.contextmanager
def _compaction_held_off(snapshots_dir: Path, file_mode: int) -> Iterator[None]:
    """The snapshot lock of a source being copied, so that compaction waits meanwhile. It is
    taken only when the lock file is there (every open for writing makes it): a restore
    writes nothing in its source, not even that file. None for a source this process cannot
    write (a read-only backup), which nobody compacts."""
    with contextlib.ExitStack() as stack:
        if (snapshots_dir / LOCK_NAME).exists():
            try:
                stack.enter_context(snapshot_lock(snapshots_dir, file_mode, create=False))
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT):
                    raise
        yield


def cut_damaged_tail(wal: Wal, applied_seq: int) -> TornTailRepair | None:
    """Cut the last WAL segment from its first bad record on (copied aside first), if there
    is one; return what was cut. None of the records cut can have been acknowledged under the
    default policy: a sync that covered a later record would have covered the bad one too.

    :raises CorruptionError: the bad record holds a sequence number at or below
        *applied_seq* (LMDB applied it: it was synced, so this is damage, not a torn write)
    """
    ids = wal.segment_ids()
    if not ids:
        return None
    segment = WalSegment.open(wal.directory, ids[-1], wal.store_id)
    try:
        offset, seq = SEGMENT_HEADER_SIZE, segment.first_seq
        while True:
            found = decode_record(segment.read, offset)
            if found is None and not is_zero(segment.read, offset, segment.size()):
                # A lost first page in front of written ones (what opening after a reboot
                # refuses): cut there, as for any other torn record.
                found = BadRecord(offset, "zero header followed by data", offset)
            if found is None or (isinstance(found, FramedRecord) and found.type == RECORD_SEAL):
                return None  # the log ends cleanly
            if isinstance(found, BadRecord):
                break
            offset, seq = found.end, found.seq + 1
        if seq <= applied_seq:
            raise CorruptionError(
                f"bad WAL record in {segment.path} at offset {offset} ({found.reason}): LMDB "
                f"has applied sequence {seq} already, so it was synced and this is damage; "
                f"restore from a backup or point-in-time restore to {seq - 1}",
                path=str(segment.path),
                offset=offset,
            )
        return cut_torn_tail(segment, offset, f"{found.reason} (cut by repair)")
    finally:
        segment.close()


def _cut_after(wal_dir: Path, end: WalTail, store_id: bytes) -> None:
    """Zero the copied segment holding the restore point from *end* on (later records, a
    seal), so that the restored log ends there."""
    segment = WalSegment.open(wal_dir, end.segment, store_id)
    try:
        zero_from(segment, max(end.offset, SEGMENT_HEADER_SIZE))
    finally:
        segment.close()


def _step(progress: Progress | None, step: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    return lambda done, total: progress(step, done, total)


def check_target(target: object, role: str) -> Path:
    """*target* as a path, if a restore or backup may build a store there: a path (without
    NUL) to a new or empty directory that is not a symbolic link.

    :raises InvalidTypeError, InvalidInputError: it may not
    """
    if not isinstance(target, str | os.PathLike):
        raise InvalidTypeError(f"{role}: expected a path, got {shown(target)}")
    path = Path(os.fspath(target))
    if "\x00" in os.fsdecode(path):
        raise InvalidInputError(f"{role}: a path cannot hold a NUL byte, got {shown(target)}")
    if path.is_symlink():
        raise InvalidInputError(
            f"{role} {path} is a symbolic link (to {os.readlink(path)}): give the directory "
            f"it should be"
        )
    if path.exists() and not path.is_dir():
        raise InvalidInputError(f"{role} {path} is not a directory")
    if path.exists() and any(path.iterdir()):
        raise InvalidInputError(f"{role} {path} is not empty")
    return path


def restore(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    seq: int | None,
    until_ms: int | None,
    progress: Progress | None,
    move: bool = False,
) -> int:
    """Build in *target* the state of the data directory *source* at *seq*, or as of the
    time *until_ms* (see :meth:`rstmdb_storage.Storage.restore`); return the sequence number
    restored to. Opening *target* replays the WAL up to it."""
    target_path = check_target(target, "restore target")
    check_progress(progress)
    config = StorageConfig(data_dir=source)
    config.validate()
    require_store(config)
    wal = probe_wal(config)
    if until_ms is not None:
        if seq is not None:
            raise InvalidInputError("restore: give seq or until_ms, not both")
        check_int63("until_ms", until_ms)
    return restore_to(
        config.path, target_path, wal, seq, config.file_mode, progress, until_ms=until_ms, move=move
    )


def repair_wal(config: StorageConfig) -> TornTailRepair | None:
    """Cut a torn tail that opening refuses (see :meth:`rstmdb_storage.Storage.repair_wal`);
    the store must be closed everywhere."""
    config.validate()
    require_store(config)
    with locks.open_lock(config):
        if locks.in_use(config):
            raise StorageError(f"{config.path} is open (here or in another process); close it")
        # What LMDB applied was synced: a bad record at or below it is damage, not a torn
        # write. Without a readable LMDB, the newest snapshot is the floor of what was applied.
        applied = max(published_seqs(config.path / SNAPSHOTS_DIR), default=0)
        if lmdb_suspect(config) is not None:  # not to be mapped; what it flushed stands
            applied = max(applied, flushed_before_reboot(config) or 0)
        elif (config.path / INDEXES_DIR / DATA_FILE).exists():
            with contextlib.suppress(IndexesCorruptionError):  # unreadable: the floor stands
                env = lmdb_env.acquire(config, lock_held=True)
                try:
                    with env.read() as txn:
                        meta = Meta(env.meta)
                        if meta.exists(txn):
                            applied = max(applied, meta.tail(txn).applied_seq)
                finally:
                    lmdb_env.release(env)
        return cut_damaged_tail(probe_wal(config), applied)
