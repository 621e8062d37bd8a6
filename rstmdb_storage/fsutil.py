"""Small file-system helpers shared by the WAL, the LMDB store and snapshots.

A created, renamed or deleted file is only durable once its directory is synced (etcd #6368);
every file that replaces another goes through a temporary name, fsync, rename, directory fsync.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import StorageError, StorageFullError
from .failpoints import failpoint


class SyncFailed(OSError):
    """An ``fsync`` that failed. Not to be retried, nor taken for a plain I/O error: the
    kernel may have dropped the pages it could not write and marked them clean, so a later
    sync that succeeds proves nothing about them. An open store fail-stops on it
    (:meth:`rstmdb_storage.engine.Engine.typed`)."""


def fsync(fd: int, path: str | os.PathLike[str]) -> None:
    """``fsync(fd)``, of the file or directory *path*; a failure is :class:`SyncFailed`."""
    try:
        os.fsync(fd)
    except OSError as exc:
        raise SyncFailed(exc.errno, exc.strerror, os.fspath(path)) from exc


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of directory *path* durable."""
    _fsync(path, os.O_RDONLY | os.O_DIRECTORY)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Make the data of file *path* durable."""
    _fsync(path, os.O_RDONLY)


def _fsync(path: str | os.PathLike[str], flags: int) -> None:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        fsync(fd, path)
    finally:
        os.close(fd)


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        # The symbols already loaded into this process (libc among them): no library search.
        function = ctypes.CDLL(None).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start writeback of dirty pages, do not wait


def start_writeback(fd: int) -> None:
    """Start writing *fd*'s dirty pages to the device without waiting for them (Linux's
    ``sync_file_range(SYNC_FILE_RANGE_WRITE)``), so that an ``fdatasync`` issued after some
    other work waits less. Only a hint: it makes nothing durable, and where it is missing or
    fails, nothing happens."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def make_dir(path: Path, mode: int) -> None:
    """Create *path* (and its parents) private to the owner if missing; sync the parent."""
    if path.is_dir():
        return
    path.mkdir(mode=_dir_mode(mode), parents=True, exist_ok=True)
    os.chmod(path, _dir_mode(mode))  # whatever the umask
    fsync_dir(path.parent)


def _dir_mode(file_mode: int) -> int:
    # A directory needs the execute bit wherever its files are readable.
    return file_mode | ((file_mode & 0o444) >> 2)


@contextlib.contextmanager
def atomic_file(path: Path, mode: int, point: str | None = None) -> Iterator[int]:
    """A descriptor to write *path* through: the block writes a temporary file, which is then
    synced, renamed to *path* and its directory synced; if the block raises, the temporary
    file is deleted and *path* is untouched. *point* names the failpoints around the rename
    (``POINT.before_rename``, ``.after_rename``, ``.after_dir_sync``)."""
    tmp = temporary_name(path)
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        yield fd
        fsync(fd, tmp)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    if point is not None:
        failpoint(point + ".before_rename")
    os.replace(tmp, path)
    if point is not None:
        failpoint(point + ".after_rename")
    fsync_dir(path.parent)
    if point is not None:
        failpoint(point + ".after_dir_sync")


def write_file_atomic(path: Path, data: bytes, mode: int, point: str | None = None) -> None:
    """Replace *path* with *data*: temporary name, fsync, rename, directory fsync."""
    with atomic_file(path, mode, point) as fd:
        write_all(fd, data, 0, str(path))


def copy_file_atomic(
    source: Path, target: Path, mode: int, progress: Callable[[int, int], None] | None = None
) -> int:
    """Copy *source* to *target* through :func:`atomic_file`; return the bytes copied.
    *progress* is called with (bytes done, bytes in all)."""
    done = 0
    with open(source, "rb") as src, atomic_file(target, mode) as fd:
        size = os.fstat(src.fileno()).st_size
        while chunk := src.read(_COPY_CHUNK):
            write_all(fd, chunk, done, str(target))
            done += len(chunk)
            if progress is not None:
                progress(done, size)
    return done


_COPY_CHUNK = 4 << 20


def temporary_name(path: Path) -> Path:
    """Where *path* is built before it is renamed into place; per process and thread, so that
    two writers of the same file (two processes, or two threads checkpointing) never write
    into one temporary file."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def current_pid() -> int:
    """``os.getpid()`` without its system call (glibc no longer caches it): the write path
    asks it several times a write, to notice a fork."""
    return _pid


def write_all(fd: int, data: bytes, offset: int, path: str | os.PathLike[str]) -> None:
    """``pwrite`` all of *data* at *offset*; a full disk is a :class:`StorageFullError`."""
    try:
        written = os.pwrite(fd, data, offset)
        if written == len(data):
            return  # the usual case, on every write: one call, nothing else made
        view = memoryview(data)
        while True:
            if written <= 0:
                raise StorageError(f"{path}: pwrite wrote nothing at offset {offset}")
            view = view[written:]
            offset += written
            if not view:
                return
            written = os.pwrite(fd, view, offset)
    except OSError as exc:
        raise os_error(exc, f"writing {path} at offset {offset}") from exc


def os_error(exc: OSError, doing: str) -> StorageError:
    """A typed error for an OSError met while *doing* something."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFullError(f"disk full while {doing}: {exc.strerror}")
    return StorageError(f"{exc.strerror or exc} while {doing}")


#: filesystem types whose locking and mmap coherence LMDB cannot rely on (lmdb.h, "Caveats")
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "9p",
        "ceph",
        "glusterfs",
        "lustre",
        "afs",
        "fuse.sshfs",
        "fuse.s3fs",
        "fuse.gcsfuse",
    }
)


def network_filesystem(path: Path, mounts: str = "/proc/self/mounts") -> str | None:
    """The type of the filesystem holding *path* if it is a network filesystem, else None
    (also when the mount table cannot be read)."""
    try:
        table = Path(mounts).read_text()
    except OSError:
        return None
    target = os.path.realpath(path)
    best, best_type = "", ""
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        mount_point = fields[1].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) > len(best):
            best, best_type = mount_point, fields[2]
    return best_type if best_type in NETWORK_FILESYSTEMS else None
