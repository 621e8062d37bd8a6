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


@main.command()
@data_dir_argument
@_reports_errors
def info(data_dir: str) -> None:
    """Print instance count, applied WAL sequence and WAL segments, as JSON.

    Example: rstmdb-storage info /var/lib/rstmdb
    """
    with Storage.open(data_dir) as storage:
        report = {
            "data_dir": data_dir,
            "instances": storage.count_instances(),
            "applied_seq": storage.applied_seq,
            "wal_segments": storage.wal_segments(),
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
    with Storage.open(data_dir) as storage:
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
    with Storage.open(data_dir) as storage:
        for record in storage.read_wal(from_seq, limit):
            click.echo(f"{record.seq}\t{record.timestamp_ms}\t{len(record.payload)} bytes")


@main.command()
@data_dir_argument
@_reports_errors
def verify(data_dir: str) -> None:
    """Check every instance, the meta table and the WAL; exit code 1 if anything is wrong.

    Example: rstmdb-storage verify /var/lib/rstmdb
    """
    with Storage.open(data_dir) as storage:
        findings = storage.verify()
    for finding in findings:
        click.echo(str(finding))
    click.echo(f"{len(findings)} problem(s) found")
    sys.exit(1 if findings else 0)
