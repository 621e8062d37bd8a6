"""``rstmdb-storage``: the operator's commands (also ``python -m rstmdb_storage``).

Inspections (:mod:`.inspect`) open a store read-only and change nothing; changes
(:mod:`.change`) open it for writing. None creates a store by accident: a path that is not a
data directory is one line on stderr and exit code 2 (:mod:`.common` has the table of exit
codes). Nothing in the package imports the CLI.
"""

from __future__ import annotations

import logging

import click

from . import change, inspect, replicate
from .common import CONTEXT


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="rstmdb-storage")
def main() -> None:
    """Inspect, check, change, back up, restore and replicate an rstmdb-storage data directory.

    Inspections (info, get, list, wal, snapshots, stats, verify, dump, machines, holds) only
    read. Exit codes: 0 ok, 1 a problem found or an operation failed, 2 bad usage or not a
    data directory.

    Example: rstmdb-storage info /var/lib/rstmdb
    """
    # The store logs what an operator should hear of (a rebuild, a network filesystem).
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING)


inspect.register(main)
change.register(main)
replicate.register(main)
