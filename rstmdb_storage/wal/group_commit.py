"""Group commit across processes: the shared append tail and the shared sync.

Under group commit (see :mod:`rstmdb_storage.writes`, which takes the locks) a durable write
takes three steps, each under its own lock, so that the slow one, ``fdatasync``, serves every
record appended while it waited:

1. **append** under the *append lock*: read the append tail, write the record there, store the
   new tail. Appends do not take LMDB's write lock, so they go on while other writers apply;
2. **sync** under the *sync lock*: if another writer's sync already covered the record, done;
   else read the append tail, sync the segment holding it (older segments were synced when they
   were sealed) and record how far the WAL is synced. Since the tail is read *before* the sync,
   everything before it is on disk when the position is recorded;
3. **apply**, under LMDB's write lock, every synced record nobody has applied yet.

Each lock is a thread lock and an exclusive ``flock`` on a file in ``indexes/``, which also holds
the position the lock guards. Both files are written with ``pwrite`` and never synced: they are
only valid within one boot of the machine (after a power loss they may be stale, and opening
replays the WAL anyway). A position written in another boot, or a file too short to hold one,
reads as no position.

``indexes/append.lock``, where the next WAL record goes::

    offset  size  field
    ------  ----  --------------------------------------------------------------------------
    0       8     segment     u64 LE: first sequence number (and name) of the segment appended to
    8       8     offset      u64 LE: byte offset of the next record in that segment
    16      8     next_seq    u64 LE: the sequence number the next record carries
    24      36    boot_id     the boot (``/proc/sys/kernel/random/boot_id``) it was written
                              in, ASCII

``indexes/sync.lock``, how far the WAL is known to be on stable storage::

    offset  size  field
    ------  ----  --------------------------------------------------------------------------
    0       8     synced_seq  u64 LE: every WAL record up to it is on stable storage
    8       36    boot_id     as above

The order the locks are taken in is :mod:`rstmdb_storage.writes`'s, which takes them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..fsutil import current_pid
from .format import segment_name
from .log import WalTail, read_failure, write_failure

APPEND_LOCK_NAME = "append.lock"
SYNC_LOCK_NAME = "sync.lock"

_APPEND_POSITION = struct.Struct("<QQQ36s")  # segment, offset, next_seq, boot_id
_SYNC_POSITION = struct.Struct("<Q36s")  # synced_seq, boot_id


class _PositionFile:
    """A lock file holding one position that is valid within the boot it was written in."""

    def __init__(self, path: Path, layout: struct.Struct, boot_id: str, file_mode: int) -> None:
        self.pid = current_pid()
        self._layout = layout
        self._boot_id = boot_id.encode()[:36].ljust(36, b"\0")
        # flock excludes other open files, not other threads using this one
        self._thread_lock = threading.Lock()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, file_mode)

    def locked(self) -> _PositionFile:
        """The lock, for a ``with`` block (this thread's, then the file's)."""
        return self

    # A plain context manager, not contextlib's: a generator costs every write three calls.
    def __enter__(self) -> None:
        self._thread_lock.acquire()
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise

    def __exit__(self, *exc_info: object) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    def read(self) -> tuple[Any, ...] | None:
        """The position, without the boot id; call holding the lock."""
        raw = os.pread(self._fd, self._layout.size, 0)
        if len(raw) < self._layout.size:
            return None
        *position, boot_id = self._layout.unpack(raw)
        return tuple(position) if boot_id == self._boot_id else None

    def write(self, *position: int) -> None:
        """Store the position; call holding the lock."""
        os.pwrite(self._fd, self._layout.pack(*position, self._boot_id), 0)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SharedAppendTail(_PositionFile):
    """The append lock of one data directory in one process, and the append tail it guards.

    Example::

        with appends.locked():
            tail = appends.tail() or applied_tail
            appends.write_tail(wal.append(tail, timestamp_ms, payload))
    """

    def __init__(self, indexes_directory: Path, boot_id: str, file_mode: int) -> None:
        path = indexes_directory / APPEND_LOCK_NAME
        super().__init__(path, _APPEND_POSITION, boot_id, file_mode)

    def tail(self) -> WalTail | None:
        """Where the last append left the tail in this boot; call holding the lock."""
        position = self.read()
        return None if position is None else WalTail(*position)

    def write_tail(self, tail: WalTail) -> None:
        self.write(*tail)


class SharedSync(_PositionFile):
    """The sync lock of one data directory in one process, and the synced position."""

    def __init__(
        self, indexes_directory: Path, wal_directory: Path, boot_id: str, file_mode: int
    ) -> None:
        super().__init__(indexes_directory / SYNC_LOCK_NAME, _SYNC_POSITION, boot_id, file_mode)
        self._wal_directory = wal_directory
        self._file_mode = file_mode
        self._segment: tuple[int, int] | None = None  # (first_seq, fd) last synced

    def sync_through(self, seq: int, append_tail: Callable[[], WalTail]) -> tuple[int, bool]:
        """Make every record up to *seq* durable; return the sequence number known durable
        and whether another writer's sync did it. *append_tail* reads the append tail (under
        the append lock). An ``OSError`` of the sync propagates (the caller must fail-stop:
        never retry a failed sync)."""
        with self.locked():
            position = self.read()
            synced = 0 if position is None else position[0]
            if synced >= seq:
                return synced, True
            tail = append_tail()
            try:
                os.fdatasync(self._segment_fd(tail.segment))
            except OSError as exc:  # told to every process before the lock is let go
                reason = f"fdatasync of the WAL failed ({exc.strerror})"
                write_failure(self._wal_directory, reason, self._file_mode)
                raise
            elsewhere = read_failure(self._wal_directory)
            if elsewhere is not None:  # our sync may cover a record whose sync failed there
                raise OSError(errno.EIO, f"a sync in another process failed: {elsewhere}")
            self.write(tail.applied_seq)
            return tail.applied_seq, False

    def _segment_fd(self, first_seq: int) -> int:
        # Our own descriptor: the WAL's are opened and closed by appenders under another lock.
        if self._segment is not None and self._segment[0] != first_seq:
            os.close(self._segment[1])
            self._segment = None
        if self._segment is None:
            path = self._wal_directory / segment_name(first_seq)
            self._segment = (first_seq, os.open(path, os.O_RDWR | os.O_CLOEXEC))
        return self._segment[1]

    def close(self) -> None:
        if self._segment is not None:
            os.close(self._segment[1])
            self._segment = None
        super().close()
