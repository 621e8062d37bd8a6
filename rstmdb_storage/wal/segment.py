"""One WAL segment file: created preallocated and published atomically, read with ``pread``,
appended with ``pwrite`` at offsets the caller owns (the append tail, under the append lock of
:mod:`.group_commit`).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from ..errors import CorruptionError
from ..fsutil import fsync, fsync_dir, os_error, write_all
from .decoder import decode_segment_header
from .encoder import encode_segment_header
from .format import SEGMENT_HEADER_SIZE, segment_name


class WalSegment:
    """An open segment file. Several processes may hold the same segment open; they never
    write the same bytes because every append happens under the store's append lock."""

    __slots__ = ("fd", "first_seq", "path")

    def __init__(self, path: Path, fd: int, first_seq: int) -> None:
        self.path = path
        self.fd = fd
        self.first_seq = first_seq

    @classmethod
    def create(
        cls, directory: Path, first_seq: int, store_id: bytes, size: int, mode: int
    ) -> WalSegment:
        """Create the segment for records from *first_seq*, zero-filled to *size* bytes.

        The file is built under a temporary name and renamed into place, so a crash leaves
        either no segment or a complete, empty one. If an earlier, interrupted rotation already
        published it, that file is opened instead (it may hold records to replay).
        """
        path = directory / segment_name(first_seq)
        if path.exists():
            return cls.open(directory, first_seq, store_id)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                raise os_error(exc, f"preallocating WAL segment {tmp}") from exc
            write_all(fd, encode_segment_header(first_seq, store_id), 0, str(tmp))
            fsync(fd, tmp)
            os.rename(tmp, path)
            fsync_dir(directory)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return cls(path, fd, first_seq)

    @classmethod
    def open(
        cls, directory: Path, first_seq: int, store_id: bytes, path: Path | None = None
    ) -> WalSegment:
        """Open an existing segment and check that its header is this store's (from the file
        *path* when given, not its name in *directory*: a segment downloaded beside them)."""
        path = path or directory / segment_name(first_seq)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # a read-only copy: reading is all
        segment = cls(path, fd, first_seq)
        try:
            found_seq, found_store = decode_segment_header(
                segment.read(0, SEGMENT_HEADER_SIZE), str(path)
            )
            if found_seq != first_seq:
                raise CorruptionError(
                    f"{path}: header says first sequence {found_seq}, name says {first_seq}",
                    path=str(path),
                    offset=0,
                )
            if found_store != store_id:
                raise CorruptionError(
                    f"{path}: segment belongs to store {found_store.hex()}, not {store_id.hex()}",
                    path=str(path),
                    offset=0,
                )
        except BaseException:
            segment.close()
            raise
        return segment

    def read(self, offset: int, size: int) -> bytes:
        """Up to *size* bytes at *offset* (fewer at the end of the file)."""
        return os.pread(self.fd, size, offset)

    def write(self, offset: int, data: bytes) -> None:
        write_all(self.fd, data, offset, self.path)

    def truncate(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            raise os_error(exc, f"cutting WAL segment {self.path} to {size} bytes") from exc

    def sync(self) -> None:
        """``fdatasync``; an error propagates as OSError so that the caller can fail-stop."""
        os.fdatasync(self.fd)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
