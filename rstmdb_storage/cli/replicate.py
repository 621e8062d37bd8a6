"""Commands that ship a store to a bucket and follow one: ``replicate`` and ``follow``. Both
run until stopped (Ctrl-C or SIGTERM), printing the replication status every ``--every``
seconds, or do one pass and exit with ``--once``. Restoring from a bucket is ``restore
s3://... DIR`` (:mod:`.change`)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

import click

from ..config import StorageConfig
from ..storage import Storage
from .common import CONTEXT, ProgressBars, data_dir_argument, dumps, reports_errors

url_argument = click.argument("url", metavar="s3://BUCKET/PREFIX")
once_option = click.option("--once", is_flag=True, help="one pass, then exit")
every_option = click.option(
    "--every",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="seconds between two status lines",
)


def register(main: click.Group) -> None:
    main.add_command(replicate)
    main.add_command(follow)


@click.command(context_settings=CONTEXT)
@data_dir_argument
@url_argument
@click.option(
    "--seal-interval-ms",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="a record is in the bucket within this long of its write",
)
@once_option
@every_option
@reports_errors
def replicate(data_dir: str, url: str, seal_interval_ms: int, once: bool, every: float) -> None:
    """Ship the store in DATA_DIR to URL: each sealed WAL segment and each snapshot, as they
    come, while other processes write (one process ships at a time; the endpoint and
    credentials come from boto3's environment: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).
    With --once: seal the open segment, ship everything not shipped yet, print what, exit.

    Example: rstmdb-storage replicate /var/lib/rstmdb s3://backups/rstmdb/orders
    """
    config = StorageConfig(
        data_dir=data_dir, create=False, replica_url=url, max_seal_interval_ms=seal_interval_ms
    )
    _run(config, every, _ship_once if once else None)


def _ship_once(storage: Storage) -> dict[str, Any]:
    report = storage.ship()
    return {"shipped": report.shipped, "shipped_seq": report.shipped_seq}


@click.command(context_settings=CONTEXT)
@url_argument
@data_dir_argument
@click.option(
    "--poll-ms",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="how often the bucket is asked for new segments",
)
@once_option
@every_option
@reports_errors
def follow(url: str, data_dir: str, poll_ms: int, once: bool, every: float) -> None:
    """Keep DATA_DIR a replica of the store that ships to URL: an empty DATA_DIR is restored
    from the bucket first, then what the primary ships is applied as it comes. Lookup
    processes read DATA_DIR meanwhile (read-only). Stops at the first gap or damaged object,
    naming it. With --once: apply what the bucket holds now, print the status, exit (1 if it
    stopped short).

    Example: rstmdb-storage follow s3://backups/rstmdb/orders /var/lib/rstmdb-replica
    """
    config = StorageConfig(data_dir=data_dir, replica_of=url, replica_poll_interval_ms=poll_ms)
    _run(config, every, _catch_up_once if once else None)


def _catch_up_once(storage: Storage) -> dict[str, Any]:
    storage.catch_up()
    return storage.replication_status()


def _run(
    config: StorageConfig, every: float, once: Callable[[Storage], dict[str, Any]] | None
) -> None:
    """Open the store; with *once*, print what it returns and close; else print the status
    every *every* seconds until SIGINT or SIGTERM, then close (a clean close of a primary
    ships what is left)."""
    with ProgressBars() as bars:
        storage = Storage.open(config, progress=bars)
    with storage:
        if once is not None:
            click.echo(dumps(once(storage)))
            return
        _report_until_stopped(storage, every)


def _report_until_stopped(storage: Storage, every: float) -> None:
    stopped = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopped.set())
    while True:
        click.echo(dumps(storage.replication_status()))
        if stopped.wait(every):
            return
