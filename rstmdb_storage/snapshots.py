"""Snapshots: consistent, checksummed copies of the LMDB environment.

A snapshot is taken inside one LMDB read transaction (copy-on-write MVCC: writers in this and
other processes go on while it copies) with a compacting copy, so it holds exactly the state at
the applied sequence number that transaction saw. Two immutable files are published per
snapshot in ``<data_dir>/snapshots/``::

    00000000000000052117.mdb        the copy (an LMDB data file holding state up to seq 52117)
    00000000000000052117.manifest   what the copy is, checksummed

The manifest is the envelope of :mod:`.codec` (its checksum covers the key ``b"manifest"``)
around a CBOR map: ``seq``, ``size`` (bytes of the ``.mdb`` file), ``crc32c`` (of its bytes),
``instances`` (how many it holds), ``created_at_ms``, ``store_id`` (16 bytes). Both files are
written under a temporary name, synced, renamed and the directory synced; the manifest last, so
a manifest always describes a complete copy (a copy without one is what a snapshot that died
left, deleted by the next snapshot or compaction). A manifest is also kept in the ``snapshots``
sub-database, to list them quickly; the files are what recovery trusts, since they survive the
loss of ``indexes/``.

Taking, deleting and copying snapshots happens under :func:`snapshot_lock` (a POSIX lock on
``snapshots/snapshot.lock``, which a forked child does not inherit), so that one process at a
time snapshots or compacts, and a restore reading the files is never raced by compaction.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import inspect
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crc32c import crc32c

from .codec import cbor_dumps, cbor_loads, seal, unseal
from .errors import CorruptionError, DecodeError, InvalidTypeError, shown
from .fsutil import atomic_file, fsync_dir, os_error, write_file_atomic
from .model import check_int63

log = logging.getLogger("rstmdb_storage")

MANIFEST_KEY = b"manifest"
LOCK_NAME = "snapshot.lock"
DATA_SUFFIX = ".mdb"
MANIFEST_SUFFIX = ".manifest"
_CHUNK = 1 << 20

#: called with (step, done, in all) while a long step runs: "checksum" and "copy" count bytes,
#: "replay" counts WAL records (in all is 0 when not known in advance)
Progress = Callable[[str, int, int], None]


def check_progress(progress: object) -> None:
    """Raise :class:`InvalidTypeError` unless *progress* is None or can be called as
    ``progress(step, done, total)``: checked at the call, before anything is written."""
    if progress is None:
        return
    if not callable(progress):
        raise InvalidTypeError(f"progress: expected a function or None, got {shown(progress)}")
    try:
        inspect.signature(progress).bind("step", 0, 0)
    except ValueError:
        return  # no signature to read (a builtin): it is trusted
    except TypeError as exc:
        raise InvalidTypeError(f"progress: must take (step, done, total): {exc}") from None


def check_snapshot(directory: Path, manifest: object, progress: Progress | None) -> None:
    """See :meth:`rstmdb_storage.Storage.check_snapshot` (its arguments checked first)."""
    if not isinstance(manifest, SnapshotManifest):
        raise InvalidTypeError(f"manifest: expected a SnapshotManifest, got {shown(manifest)}")
    check_int63("manifest seq", manifest.seq)
    check_progress(progress)
    check_data(directory, manifest, progress)


@dataclass(frozen=True, slots=True)
class SnapshotManifest:
    """What a published snapshot holds; ``seq`` is the WAL sequence number it contains."""

    seq: int
    size: int
    crc32c: int
    instances: int
    created_at_ms: int
    store_id: bytes

    @property
    def name(self) -> str:
        return f"{self.seq:020d}"

    def encode(self) -> bytes:
        fields = {
            "seq": self.seq,
            "size": self.size,
            "crc32c": self.crc32c,
            "instances": self.instances,
            "created_at_ms": self.created_at_ms,
            "store_id": self.store_id,
        }
        return seal(MANIFEST_KEY, cbor_dumps(fields, "snapshot manifest"))

    @classmethod
    def decode(cls, raw: bytes, where: str) -> SnapshotManifest:
        fields = cbor_loads(unseal(MANIFEST_KEY, raw, where), where)
        try:
            manifest = cls(**fields)
        except TypeError as exc:
            raise DecodeError(f"{where}: not a snapshot manifest ({exc})") from None
        if not all(type(getattr(manifest, f)) is int for f in ("seq", "size", "crc32c")):
            raise DecodeError(f"{where}: manifest fields of the wrong type")
        return manifest


def publish(
    copy: Callable[[int], None],
    directory: Path,
    manifest_fields: dict[str, Any],
    file_mode: int,
    progress: Progress | None = None,
) -> SnapshotManifest:
    """Write a snapshot with *copy* (which writes the LMDB copy to a file descriptor), check
    what it wrote, and publish both files atomically. Call under :func:`snapshot_lock`."""
    remove_leftovers(directory)
    name = f"{manifest_fields['seq']:020d}"
    data_path = directory / (name + DATA_SUFFIX)
    try:
        with atomic_file(data_path, file_mode, "snapshot.data") as fd:
            copy(fd)
            size = os.fstat(fd).st_size
            checksum = _crc_of(fd, size, progress)  # of what is in the file, read back
    except OSError as exc:
        raise os_error(exc, f"writing snapshot {data_path}") from exc
    manifest = SnapshotManifest(size=size, crc32c=checksum, **manifest_fields)
    write_file_atomic(
        directory / (name + MANIFEST_SUFFIX), manifest.encode(), file_mode, "snapshot.manifest"
    )
    return manifest


def leftovers(directory: Path) -> list[Path]:
    """What a snapshot or a compaction that died left: temporaries, and copies without a
    manifest (the copy is renamed into place before its manifest is written, and deleted
    after its manifest). Only while nobody holds the snapshot lock is that what they are."""
    found = list(directory.glob("*.tmp-*"))
    found += [
        path
        for path in directory.glob(f"*{DATA_SUFFIX}")
        if not path.with_suffix(MANIFEST_SUFFIX).exists()
    ]
    return sorted(found)


def remove_leftovers(directory: Path) -> None:
    """Delete the :func:`leftovers`; call holding the snapshot lock. Only its holder writes or
    deletes files here, so these will never be completed; they would only fill the disk."""
    for path in leftovers(directory):
        log.warning("removing %s, left by a snapshot that did not finish", path)
        path.unlink(missing_ok=True)


def read_manifest(directory: Path, seq: int) -> SnapshotManifest:
    """The manifest of snapshot *seq*. ``FileNotFoundError`` when it is gone (compaction in
    another process deletes snapshots at any time); any other failure to read it is typed."""
    path = directory / f"{seq:020d}{MANIFEST_SUFFIX}"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise os_error(exc, f"reading {path}") from exc
    return SnapshotManifest.decode(raw, str(path))


def first_needed_segment(segment_ids: list[int], seq: int) -> int | None:
    """The first WAL segment that replay after a snapshot of *seq* reads: the newest one
    starting at or before ``seq + 1`` (None when every segment starts later)."""
    starting_before = [first for first in segment_ids if first <= seq + 1]
    return starting_before[-1] if starting_before else None


def published_seqs(directory: Path) -> list[int]:
    """Sequence numbers of the snapshots whose manifest is published, oldest first."""
    names = (path.name[: -len(MANIFEST_SUFFIX)] for path in directory.glob("*" + MANIFEST_SUFFIX))
    return sorted(int(name) for name in names if name.isdigit())


def manifests(directory: Path) -> list[SnapshotManifest]:
    """The manifests of every published snapshot, oldest first (a damaged one raises; one
    that a compaction deletes while they are read is left out)."""
    found = []
    for seq in published_seqs(directory):
        with contextlib.suppress(FileNotFoundError):
            found.append(read_manifest(directory, seq))
    return found


def readable_manifests(directory: Path) -> list[SnapshotManifest]:
    """Like :func:`manifests`, skipping (and logging) a manifest that fails its checks."""
    found = []
    for seq in published_seqs(directory):
        try:
            found.append(read_manifest(directory, seq))
        except (CorruptionError, OSError) as exc:
            log.warning("skipping snapshot %020d: %s", seq, exc)
    return found


def delete(directory: Path, manifest: SnapshotManifest) -> int:
    """Delete a published snapshot, manifest first (so that no manifest ever names a missing
    file); return the bytes freed. Call under :func:`snapshot_lock`."""
    freed = 0
    for suffix in (MANIFEST_SUFFIX, DATA_SUFFIX):
        path = directory / (manifest.name + suffix)
        with contextlib.suppress(FileNotFoundError):
            freed += path.stat().st_size
            path.unlink()
        # Each unlink durable before the next: the file must not go while its manifest stays
        # (a filesystem may persist directory entries in any order until the sync).
        fsync_dir(directory)
    return freed


_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


@contextlib.contextmanager
def snapshot_lock(
    directory: Path, file_mode: int, blocking: bool = True, create: bool = True
) -> Iterator[bool]:
    """Hold the snapshot lock of *directory* (across processes and threads); yields False
    instead of waiting when *blocking* is False and someone else holds it. Without *create*,
    the lock file must exist (``FileNotFoundError`` otherwise)."""
    with _thread_locks_guard:
        thread_lock = _thread_locks.setdefault(os.path.realpath(directory), threading.Lock())
    if not thread_lock.acquire(blocking):
        yield False
        return
    try:
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        fd = os.open(directory / LOCK_NAME, flags, file_mode)
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if blocking or exc.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                yield False  # another process holds it
                return
            yield True
        finally:
            os.close(fd)  # releases the POSIX lock
    finally:
        thread_lock.release()


def check_data(
    directory: Path, manifest: SnapshotManifest, progress: Progress | None = None
) -> None:
    """Raise :class:`CorruptionError` unless the snapshot file matches its manifest."""
    path = directory / (manifest.name + DATA_SUFFIX)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CorruptionError(f"{path}: snapshot file is missing", path=str(path)) from None
    try:
        size = os.fstat(fd).st_size
        computed = _crc_of(fd, size, progress)
    except OSError as exc:
        raise os_error(exc, f"reading {path}") from exc
    finally:
        os.close(fd)
    if size != manifest.size or computed != manifest.crc32c:
        raise CorruptionError(
            f"{path}: snapshot does not match its manifest (size {size}, expected "
            f"{manifest.size}; CRC32C {computed:#010x}, expected {manifest.crc32c:#010x})",
            path=str(path),
        )


def _crc_of(fd: int, size: int, progress: Progress | None) -> int:
    crc, offset = 0, 0
    while offset < size:
        chunk = os.pread(fd, min(_CHUNK, size - offset), offset)
        if not chunk:
            break
        crc = crc32c(chunk, crc)
        offset += len(chunk)
        if progress is not None:
            progress("checksum", offset, size)
    return crc


def _forget_thread_locks() -> None:
    # A lock held by a thread of the parent would stay held forever in the child.
    global _thread_locks_guard
    _thread_locks.clear()
    _thread_locks_guard = threading.Lock()


os.register_at_fork(after_in_child=_forget_thread_locks)
