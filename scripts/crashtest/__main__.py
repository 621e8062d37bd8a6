"""Runs the crash harness: ``python scripts/crashtest.py`` (the shim) or
``python scripts/crashtest`` (from the repository root); see :mod:`crashtest`."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS, REPO_ROOT = str(HERE.parent), str(HERE.parent.parent)
if sys.path and Path(sys.path[0] or ".").resolve() == HERE:
    del sys.path[0]  # run as a directory: its modules are not top-level ones
for entry in (SCRIPTS, REPO_ROOT):  # the package, and the library of this repository
    if entry in sys.path:
        sys.path.remove(entry)
    sys.path.insert(0, entry)

from crashtest.cli import main  # noqa: E402  (the path first)

if __name__ == "__main__":
    sys.exit(main())
