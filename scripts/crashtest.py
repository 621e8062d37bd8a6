"""The crash harness as a tool: ``python scripts/crashtest.py [--trials N] [--seed S] ...``.

A shim, so that the command stays as documented: the harness is the package
``scripts/crashtest/`` (see its docstring), which ``python scripts/crashtest`` runs the same way.
The writer processes it kills are this same command with the hidden ``--child`` subcommand.
"""

import sys

if __name__ == "__main__":
    from crashtest.__main__ import main  # the package scripts/crashtest/, beside this file

    sys.exit(main())
