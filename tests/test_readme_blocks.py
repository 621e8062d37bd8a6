"""Every ```python block of README.md runs, so the docs cannot drift from the code.

The one convention, also stated in the README above its first block: each block runs on a new
store, with every absolute path in it (``"/var/lib/rstmdb"``, ``"/backups/..."``) moved under a
temporary directory; the first block runs as it stands, and every later one continues it, with
``storage`` open on ``/var/lib/rstmdb`` holding ``order-1`` (machine ``order``, state
``pending``), and ``time`` and the names of ``rstmdb_storage`` imported.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

import rstmdb_storage
from rstmdb_storage import Instance, Storage

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
_ABSOLUTE_PATH = re.compile(r"""(["'])(/[^"']*)\1""")


def python_blocks() -> list[tuple[int, str]]:
    text = README.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in _BLOCK.finditer(text)]


BLOCKS = python_blocks()


def test_every_python_block_is_found() -> None:
    assert len(BLOCKS) == README.read_text().count("```python\n") >= 7


@pytest.mark.parametrize(("line", "code"), BLOCKS, ids=[f"README.md:L{line}" for line, _ in BLOCKS])
def test_block_runs(line: int, code: str, tmp_path: Path) -> None:
    code = _ABSOLUTE_PATH.sub(lambda m: f"{m.group(1)}{tmp_path}{m.group(2)}{m.group(1)}", code)
    namespace = {name: getattr(rstmdb_storage, name) for name in rstmdb_storage.__all__}
    namespace["time"] = time
    compiled = compile(code, f"README.md:L{line}", "exec")
    if line == BLOCKS[0][0]:
        exec(compiled, namespace)
        return
    with Storage.open(tmp_path / "var/lib/rstmdb") as storage:
        storage.put_instance(Instance(id="order-1", machine="order", version=1, state="pending"))
        namespace["storage"] = storage
        exec(compiled, namespace)
