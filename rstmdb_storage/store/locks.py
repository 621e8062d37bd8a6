"""The data directory's two lock files, both in ``indexes/`` and both ``flock`` locks (released
by the kernel when their holder dies, so a SIGKILL never leaves one held):

* ``open.lock``, exclusive (:func:`open_lock`): held for all of a store's opening, a recovery
  and a heal, so that nothing opens the LMDB environment while ``data.mdb`` may be replaced;
* ``users.lock``, shared (:func:`users_lock`): held by every process with the environment open,
  for as long as it has it open; :func:`in_use` tells whether anyone does, by trying for it
  exclusively without waiting.

A read-only copy (no write access to ``indexes/``) is still answered: a ``flock`` needs only a
descriptor open for reading.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from ..config import INDEXES_DIR, StorageConfig
from ..fsutil import make_dir

OPEN_LOCK_NAME = "open.lock"
USERS_LOCK_NAME = "users.lock"


@contextlib.contextmanager
def open_lock(config: StorageConfig, wait: bool = True) -> Iterator[bool]:
    """Hold the data directory's exclusive open lock: no other process opens, recovers or
    replaces its LMDB environment meanwhile. Yields whether it is held: without *wait*, False
    at once when another process holds it (for work that can be left for another time
    rather than make a closing process wait for an opener)."""
    path = config.path / INDEXES_DIR
    make_dir(path, config.file_mode)
    operation = fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB
    try:
        fd = _lock_file(path / OPEN_LOCK_NAME, config.file_mode, operation)
    except BlockingIOError:
        yield False
        return
    try:
        yield True
    finally:
        os.close(fd)  # closing releases the flock


def in_use(config: StorageConfig) -> bool:
    """Whether any process (this one included) has the environment of *config* open."""
    path = config.path / INDEXES_DIR / USERS_LOCK_NAME
    if not path.exists():
        return False
    try:
        # Read-only: a flock needs no write access, and a read-only copy has to answer too.
        fd = _lock_file(path, config.file_mode, fcntl.LOCK_EX | fcntl.LOCK_NB, read_only=True)
    except BlockingIOError:
        return True
    except OSError:
        return True  # cannot tell: assume it is, which only ever holds back a rebuild
    os.close(fd)
    return False


def users_lock(path: Path, config: StorageConfig) -> int:
    """The shared lock on ``users.lock`` every process with the environment open holds; a
    read-only opener of a directory it cannot write takes it only if the file exists (-1 if
    it cannot)."""
    if not config.read_only:
        return _lock_file(path / USERS_LOCK_NAME, config.file_mode, fcntl.LOCK_SH)
    try:
        return _lock_file(path / USERS_LOCK_NAME, config.file_mode, fcntl.LOCK_SH, read_only=True)
    except OSError:
        return -1


def _lock_file(path: Path, mode: int, operation: int, read_only: bool = False) -> int:
    flags = os.O_RDONLY if read_only else os.O_RDWR | os.O_CREAT
    fd = os.open(path, flags | os.O_CLOEXEC, mode)
    try:
        fcntl.flock(fd, operation)
    except BaseException:
        os.close(fd)
        raise
    return fd
