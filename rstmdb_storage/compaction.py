"""Compaction: which snapshots and WAL segments may be deleted.

The rule, planned by a pure function (:func:`plan_compaction`) that a property test holds to
account:

* the newest ``snapshots_kept`` snapshots are kept, older ones go;
* the WAL is kept from ``keep_from = min(oldest kept snapshot's seq + 1, every hold)`` on, so
  that replay after *any* kept snapshot (recovery falls back to an older one when the newest is
  damaged) and every shipper or backup holding a position finds its records;
* a segment goes when the segment after it starts at or before ``keep_from``: then every
  record in it is below ``keep_from``. The segment holding ``keep_from`` and all later ones stay,
  and so does the last segment, which is never followed by another;
* with no snapshot, nothing goes: the WAL is then the only copy of the state.

Doing it (under the snapshot lock, so one process at a time) is :meth:`Storage.compact`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

from .snapshots import SnapshotManifest


@dataclass(frozen=True, slots=True)
class CompactionPlan:
    """What compaction deletes: WAL segments (by first sequence number) and snapshots."""

    segments: list[int]
    snapshots: list[SnapshotManifest]
    keep_from: int | None


@dataclass(frozen=True, slots=True)
class CompactionResult:
    """What :meth:`Storage.compact` did (rstmdb's names, and the snapshots it deleted)."""

    snapshots_created: int
    segments_deleted: int
    bytes_reclaimed: int
    snapshots_deleted: int = 0


def plan_compaction(
    segment_ids: list[int],
    snapshots: list[SnapshotManifest],
    snapshots_kept: int,
    holds: Iterable[int] = (),
) -> CompactionPlan:
    """Plan a compaction of a WAL with *segment_ids* (ascending) and *snapshots* (oldest
    first), keeping *snapshots_kept* snapshots and the records each hold in *holds* needs."""
    if not snapshots:
        return CompactionPlan([], [], None)
    kept = snapshots[-snapshots_kept:]
    keep_from = min([kept[0].seq + 1, *holds])
    segments = [
        first for first, following in itertools.pairwise(segment_ids) if following <= keep_from
    ]
    return CompactionPlan(segments, snapshots[: len(snapshots) - len(kept)], keep_from)
