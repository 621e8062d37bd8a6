"""What an operator asks of an open store: what is pending, how big it is (``verify`` has
whether it is intact)."""

from __future__ import annotations

from typing import Any

from .config import SNAPSHOTS_DIR
from .engine import Engine
from .scrub import state_of
from .snapshots import published_seqs
from .wal.format import segment_name


def pending_records(engine: Engine) -> int:
    """WAL records after the newest one applied to LMDB."""
    applied = engine.applied_tail().applied_seq
    return engine.wal.tail_after().applied_seq - applied


def recovery_needed(engine: Engine) -> str | None:
    """See :meth:`rstmdb_storage.Storage.recovery_needed`."""
    config = engine.config
    if not config.read_only or engine.opened_in_use:
        return None
    pending = pending_records(engine)
    if pending <= 0:
        return None
    return (
        f"{pending} WAL record(s) after sequence {engine.applied_tail().applied_seq} are not "
        f"applied yet and no process has {config.path} open; open it for writing to replay "
        f"them (rstmdb-storage recover {config.path})"
    )


def stats(engine: Engine) -> dict[str, Any]:
    """See :meth:`rstmdb_storage.Storage.stats`."""
    report = engine.live().stats()
    wal = engine.wal
    segments = wal.segment_ids()
    snapshots = engine.config.path / SNAPSHOTS_DIR
    snapshot_files = [p for p in snapshots.iterdir() if p.is_file()]
    report["applied_seq"] = engine.applied_tail().applied_seq
    report["wal"] = {
        "segments": len(segments),
        "bytes": sum((wal.directory / segment_name(i)).stat().st_size for i in segments),
    }
    report["snapshots"] = {
        "count": len(published_seqs(snapshots)),
        "bytes": sum(p.stat().st_size for p in snapshot_files),
    }
    return report


def health(engine: Engine) -> dict[str, Any]:
    """See :meth:`rstmdb_storage.Storage.health`."""
    checkpoint = engine.read(engine.meta.checkpoint)
    snapshots = published_seqs(engine.config.path / SNAPSHOTS_DIR)
    flusher = engine.flusher
    return {
        "failed": engine.wal.failure,
        "background_error": engine.background_error,
        "applied_seq": engine.applied_tail().applied_seq,
        "checkpoint": None
        if checkpoint is None
        else {"applied_seq": checkpoint.applied_seq, "boot_id": checkpoint.boot_id},
        "newest_snapshot_seq": snapshots[-1] if snapshots else None,
        "background_thread": flusher is not None and flusher.running(),
        "scrub": state_of(engine).report(),
    }
