"""``python -m rstmdb_storage``: the same commands as the ``rstmdb-storage`` script."""

from .cli import main

main(prog_name="rstmdb-storage")
