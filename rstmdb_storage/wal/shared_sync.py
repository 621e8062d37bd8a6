"""Group commit: one ``fdatasync`` for every writer waiting on it, across threads and processes.

Under group commit a writer appends its record under the store's write lock without syncing,
then comes here, outside that lock. Holding the sync lock (a thread lock, then an exclusive
``flock`` on the file below), it reads how far the WAL is known to be synced; if another
writer's sync already covered its record it is done, else it reads the append tail, syncs the
segment holding it (older segments were synced when they were sealed), and records the new
position for the next writer. Since the tail is read *before* the sync, everything before it
is on disk when the position is recorded.

The file ``indexes/sync.lock`` (written with ``pwrite``, never synced: it only lets writers
skip a sync within one boot of the machine)::

    offset  size  field
    ------  ----  --------------------------------------------------------------------------
    0       8     synced_seq  u64 LE: every WAL record up to it is on stable storage
    8       36    boot_id     the boot (``/proc/sys/kernel/random/boot_id``) it was written
                              in, ASCII; a position written in another boot is ignored
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
from collections.abc import Callable
from pathlib import Path

from .format import segment_name
from .log import WalTail

_POSITION = struct.Struct("<Q36s")  # synced_seq, boot_id


class SharedSync:
    """The sync lock and the shared synced position of one data directory, in one process."""

    def __init__(self, lock_path: Path, wal_directory: Path, boot_id: str, file_mode: int) -> None:
        self.pid = os.getpid()
        self._boot_id = boot_id.encode()[:36].ljust(36, b"\0")
        self._wal_directory = wal_directory
        self._lock = threading.Lock()
        self._fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, file_mode)
        self._segment: tuple[int, int] | None = None  # (first_seq, fd) last synced

    def sync_through(self, seq: int, append_tail: Callable[[], WalTail]) -> tuple[int, bool]:
        """Make every record up to *seq* durable; return the sequence number known durable
        and whether another writer's sync did it. An ``OSError`` of the sync propagates (the
        caller must fail-stop: never retry a failed sync)."""
        with self._lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                synced = self._read()
                if synced >= seq:
                    return synced, True
                tail = append_tail()
                os.fdatasync(self._segment_fd(tail.segment))
                self._write(tail.applied_seq)
                return tail.applied_seq, False
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _read(self) -> int:
        raw = os.pread(self._fd, _POSITION.size, 0)
        if len(raw) < _POSITION.size:
            return 0
        synced, boot_id = _POSITION.unpack(raw)
        return synced if boot_id == self._boot_id else 0

    def _write(self, synced: int) -> None:
        os.pwrite(self._fd, _POSITION.pack(synced, self._boot_id), 0)

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
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
