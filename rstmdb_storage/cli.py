"""``rstmdb-storage``: the operator's commands. Each calls one :class:`Storage` method; one
place turns a :class:`StorageError` into a one-line message and exit code 1."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from functools import wraps
from typing import Any

import click

from .errors import StorageError
from .storage import Storage

data_dir_argument = click.argument("data_dir", type=click.Path(file_okay=False))


def _reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except StorageError as exc:
            click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
            sys.exit(1)

    return wrapper


@click.group()
@click.version_option(package_name="rstmdb-storage")
def main() -> None:
    """Inspect and check an rstmdb-storage data directory."""


class _ProgressBars:
    """Turns the store's ``progress(step, done, total)`` calls into one progress bar per step
    on stderr (a count, for a step whose total is not known in advance)."""

    def __init__(self) -> None:
        self._step: str | None = None
        self._bar: Any = None
        self._done = 0

    def __call__(self, step: str, done: int, total: int) -> None:
        if step != self._step:
            self.close()
            self._step = step
            if total:
                self._bar = click.progressbar(length=total, label=step, file=sys.stderr)
                self._bar.__enter__()
        if self._bar is not None:
            self._bar.update(done - self._done)
        self._done = done

    def __enter__(self) -> _ProgressBars:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
        elif self._done:
            click.echo(f"{self._step}: {self._done}", err=True)
        self._step, self._bar, self._done = None, None, 0


def _open(data_dir: str) -> Storage:
    with _ProgressBars() as bars:
        return Storage.open(data_dir, progress=bars)  # shows a rebuild of indexes/, if any


def _with_progress(data_dir: str, work: Callable[[Storage, _ProgressBars], Any]) -> Any:
    """Open the store and run *work* on it, showing its progress."""
    with _ProgressBars() as bars, _open(data_dir) as storage:
        return work(storage, bars)


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=lambda v: v.hex()))


@main.command()
@data_dir_argument
@_reports_errors
def info(data_dir: str) -> None:
    """Print instance count, applied WAL sequence and WAL segments, as JSON.

    Example: rstmdb-storage info /var/lib/rstmdb
    """
    with _open(data_dir) as storage:
        report = {
            "data_dir": data_dir,
            "instances": storage.count_instances(),
            "applied_seq": storage.applied_seq,
            "wal_segments": storage.wal_segments(),
            "snapshots": [manifest.seq for manifest in storage.list_snapshots()],
            "wal_holds": storage.wal_holds(),
        }
    click.echo(json.dumps(report, indent=2))


@main.command()
@data_dir_argument
@click.argument("instance_id")
@_reports_errors
def get(data_dir: str, instance_id: str) -> None:
    """Print one instance as JSON (exit code 1 when absent).

    Example: rstmdb-storage get /var/lib/rstmdb order-1
    """
    with _open(data_dir) as storage:
        inst = storage.get_instance(instance_id)
    if inst is None:
        click.echo(f"no instance {instance_id!r}", err=True)
        sys.exit(1)
    click.echo(json.dumps(asdict(inst), indent=2, default=repr))


@main.command()
@data_dir_argument
@click.option(
    "--from", "from_seq", type=int, default=1, show_default=True, help="first sequence number"
)
@click.option("--limit", type=int, default=20, show_default=True, help="records to print")
@_reports_errors
def wal(data_dir: str, from_seq: int, limit: int) -> None:
    """Print WAL records (sequence, time, payload size) from a sequence number on.

    Example: rstmdb-storage wal /var/lib/rstmdb --from 100 --limit 5
    """
    with _open(data_dir) as storage:
        for record in storage.read_wal(from_seq, limit):
            click.echo(f"{record.seq}\t{record.timestamp_ms}\t{len(record.payload)} bytes")


@main.command()
@data_dir_argument
@_reports_errors
def verify(data_dir: str) -> None:
    """Check every instance, index, snapshot, the meta table and the WAL; exit code 1 if
    anything is wrong.

    Example: rstmdb-storage verify /var/lib/rstmdb
    """
    with _open(data_dir) as storage:
        findings = storage.verify()
    for finding in findings:
        click.echo(str(finding))
    click.echo(f"{len(findings)} problem(s) found")
    sys.exit(1 if findings else 0)


@main.command()
@data_dir_argument
@_reports_errors
def snapshot(data_dir: str) -> None:
    """Take a snapshot now and print its manifest as JSON.

    Example: rstmdb-storage snapshot /var/lib/rstmdb
    """
    _print_json(asdict(_with_progress(data_dir, Storage.create_snapshot)))


@main.command()
@data_dir_argument
@_reports_errors
def compact(data_dir: str) -> None:
    """Snapshot if anything changed, then delete the snapshots and WAL segments no longer
    needed; print what was done as JSON.

    Example: rstmdb-storage compact /var/lib/rstmdb
    """
    _print_json(asdict(_with_progress(data_dir, Storage.compact)))


@main.command()
@data_dir_argument
@click.argument("target", type=click.Path(file_okay=False))
@_reports_errors
def backup(data_dir: str, target: str) -> None:
    """Copy the store into TARGET (new or empty) while it stays in use: a snapshot taken now
    and the WAL after it. Open TARGET, or restore from it, to use the copy.

    Example: rstmdb-storage backup /var/lib/rstmdb /backups/rstmdb-2026-11-25
    """
    seq = _with_progress(data_dir, lambda storage, bars: storage.backup(target, progress=bars))
    click.echo(f"backed up {data_dir} to {target} up to sequence {seq}")


@main.command()
@click.argument("source", type=click.Path(file_okay=False, exists=True))
@click.argument("target", type=click.Path(file_okay=False))
@click.option("--seq", type=int, default=None, help="sequence number to restore to [newest]")
@_reports_errors
def restore(source: str, target: str, seq: int | None) -> None:
    """Build in TARGET (new or empty) a store holding SOURCE's state at a WAL sequence number:
    point-in-time restore from a snapshot and the WAL after it.

    Example: rstmdb-storage restore /var/lib/rstmdb /tmp/restored --seq 52117
    """
    with _ProgressBars() as bars:
        restored = Storage.restore(source, target, seq=seq, progress=bars)
    click.echo(f"restored {target} to sequence {restored}")


@main.command()
@data_dir_argument
@_reports_errors
def repair(data_dir: str) -> None:
    """After a power loss, cut the WAL at a torn record that opening refuses because intact
    (never acknowledged) records follow it; the segment is copied aside first.

    Example: rstmdb-storage repair /var/lib/rstmdb
    """
    done = Storage.repair_wal(data_dir)
    if done is None:
        click.echo("nothing to repair")
    else:
        click.echo(
            f"cut {done.bytes_cut} bytes of {done.path} from offset {done.offset} "
            f"({done.reason}); the original is kept as {done.copy_path}"
        )
