"""Cutting a torn tail: the one repair recovery makes by itself.

The segment is first copied aside (``<segment>.broken-<offset>``), then the torn bytes are
overwritten with zeros, restoring the invariant that nothing but zeros follows the last record,
and the file is synced. What was cut is returned as a :class:`TornTailRepair`, not a bool.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..failpoints import failpoint
from ..fsutil import fsync_dir, fsync_file
from .decoder import last_nonzero
from .segment import WalSegment

log = logging.getLogger("rstmdb_storage.wal")


@dataclass(frozen=True, slots=True)
class TornTailRepair:
    """A torn tail that was cut: the segment, where the cut began, how many bytes were zeroed,
    why, and the copy made before touching the file."""

    path: str
    offset: int
    bytes_cut: int
    reason: str
    copy_path: str


def _make_durable(path: Path) -> None:
    fsync_file(path)
    fsync_dir(path.parent)


def zero_from(segment: WalSegment, offset: int) -> int:
    """Overwrite with zeros whatever is written in *segment* from *offset* on (the rest of a
    preallocated segment is zeros already), and sync it; return how many bytes were zeroed."""
    end = last_nonzero(segment.read, offset, segment.size())
    zeros = bytes(1 << 20)
    for start in range(offset, end, len(zeros)):
        segment.write(start, zeros[: min(len(zeros), end - start)])
    segment.sync()
    return end - offset


def cut_torn_tail(segment: WalSegment, offset: int, reason: str) -> TornTailRepair:
    copy_path = segment.path.with_name(f"{segment.path.name}.broken-{offset}")
    shutil.copy(segment.path, copy_path)  # keeps the segment's private mode
    _make_durable(copy_path)  # the copy must survive whatever the cut does not
    failpoint("repair.after_copy_aside")
    bytes_cut = zero_from(segment, offset)
    repair = TornTailRepair(str(segment.path), offset, bytes_cut, reason, str(copy_path))
    log.warning(
        "cut a torn WAL tail: %s at offset %d, %d bytes (%s); the original is kept as %s",
        repair.path,
        offset,
        repair.bytes_cut,
        reason,
        copy_path,
    )
    return repair
