"""Benchmarks for rstmdb-storage: ``python scripts/bench.py [--quick] [--only TEXT] ...``.

A shim, so that the command stays as documented: the benchmark is the package
``scripts/bench/`` (see its docstring), which ``python scripts/bench`` runs the same way.
"""

import sys

if __name__ == "__main__":  # not when a 'spawn' worker process imports this as its main module
    from bench.__main__ import main  # the package scripts/bench/, beside this file

    sys.exit(main())
