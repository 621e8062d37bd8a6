"""The failpoint seam: arming, counting, actions, and that every listed point exists."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import internals
import pytest
from helpers import order

import rstmdb_storage
from rstmdb_storage import ConfigError, Instance, Storage, StorageError, failpoints
from rstmdb_storage.failpoints import POINTS, FailpointError

PACKAGE = Path(rstmdb_storage.__file__).parent


@pytest.fixture(autouse=True)
def disarmed() -> Iterator[None]:
    failpoints.disable()
    yield
    failpoints.disable()


def test_every_listed_point_is_placed_in_the_code() -> None:
    source = "\n".join(path.read_text() for path in PACKAGE.rglob("*.py"))
    placed = set(re.findall(r'failpoint\("([a-z_.]+)"\)', source))
    # atomic_file names its points after the prefix its caller passes
    for prefix in re.findall(r'"(snapshot\.(?:data|manifest))"', source):
        placed |= {
            f"{prefix}.{step}" for step in ("before_rename", "after_rename", "after_dir_sync")
        }
    assert placed == set(POINTS)
    assert len(POINTS) >= 15


def test_an_unarmed_point_does_nothing_and_counts_nothing() -> None:
    failpoints.failpoint("write.after_sync")
    assert failpoints.hits("write.after_sync") == 0


def test_counted_terms_run_in_order_then_the_point_is_off() -> None:
    failpoints.enable("write.after_sync", "2*off->1*raise")
    failpoints.failpoint("write.after_sync")
    failpoints.failpoint("write.after_sync")
    with pytest.raises(FailpointError, match=r"write\.after_sync"):
        failpoints.failpoint("write.after_sync")
    failpoints.failpoint("write.after_sync")  # the chain is used up
    assert failpoints.hits("write.after_sync") == 4


def test_a_term_without_count_acts_on_every_hit() -> None:
    failpoints.enable("wal.after_seal", "1*off->raise")
    failpoints.failpoint("wal.after_seal")
    for _ in range(3):
        with pytest.raises(FailpointError):
            failpoints.failpoint("wal.after_seal")


@pytest.mark.parametrize(
    "spec",
    [
        "no.such.point=kill",
        "write.after_sync=explode",
        "write.after_sync=0*kill",
        "write.after_sync",
    ],
)
def test_a_bad_spec_is_a_config_error(spec: str) -> None:
    with pytest.raises(ConfigError):
        failpoints.configure(spec)


def test_a_raise_at_the_write_path_reaches_the_caller_typed(tmp_path: Path) -> None:
    with Storage.open(tmp_path / "db") as storage:
        failpoints.enable("write.after_append", "1*raise")
        instance = Instance(id="a", machine="m", version=1, state="s")
        with pytest.raises(FailpointError):
            storage.put_instance(instance)
        # The record was appended before the error: the next write applies it first.
        seq = storage.put_instance(Instance(id="b", machine="m", version=1, state="s"))
        assert seq == 2
        assert storage.get_instance("a") is not None


def test_the_environment_variable_arms_a_child_that_dies_at_the_point(tmp_path: Path) -> None:
    script = (
        "import sys; from rstmdb_storage import Instance, Storage\n"
        "s = Storage.open(sys.argv[1])\n"
        "s.put_instance(Instance(id='a', machine='m', version=1, state='s'))\n"
        "print('acknowledged', flush=True)\n"
    )
    env = {**os.environ, "RSTMDB_FAILPOINTS": "write.after_sync=kill"}
    child = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "db")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == -9
    assert "acknowledged" not in child.stdout
    # Durable in the WAL, not committed to LMDB: opening replays it.
    with Storage.open(tmp_path / "db") as storage:
        assert storage.get_instance("a") is not None
        assert storage.applied_seq == 1


def test_a_misspelt_point_in_the_environment_stops_the_import() -> None:
    env = {**os.environ, "RSTMDB_FAILPOINTS": "write.after_synk=kill"}
    child = subprocess.run(
        [sys.executable, "-c", "import rstmdb_storage"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == 1
    assert "write.after_synk" in child.stderr


def test_the_readme_lists_every_failpoint_with_what_it_places() -> None:
    readme = (PACKAGE.parent / "README.md").read_text()
    listed = dict(re.findall(r"^\| `([a-z_.]+)` \| (.+) \|$", readme, re.M))
    assert {name: listed.get(name) for name in POINTS} == POINTS


WRITE_POINTS = [p for p in POINTS if p.split(".")[0] in ("write", "group", "wal")]


@pytest.mark.parametrize("grouped", [False, True], ids=["one transaction", "group commit"])
@pytest.mark.parametrize("action", ["eio", "enospc"])
def test_an_os_error_at_any_write_point_reaches_the_caller_typed(
    tmp_path: Path, grouped: bool, action: str
) -> None:
    """Whichever step of a write an I/O error stops (an injected one at each write path's
    point), the caller gets a StorageError, never a bare OSError."""
    with Storage.open(tmp_path / "db") as storage:
        if grouped:
            internals.force_group_commit(storage)
        for n, point in enumerate(WRITE_POINTS):
            failpoints.enable(point, action)
            try:
                storage.put_instance(Instance(id=f"i{n}", machine="m", version=1, state="s"))
            except StorageError:
                pass
            except OSError as exc:
                pytest.fail(f"{point}={action}: a bare {exc!r} reached the caller")
            finally:
                failpoints.disable(point)


def _every_operation(storage: Storage, root: Path, n: int) -> Iterator[tuple[str, Any]]:
    def batch() -> None:
        with storage.batch() as writing:
            for k in range(3):
                writing.put_instance(order(f"b{n}-{k}"))

    yield "put", lambda: storage.put_instance(order(f"i{n}"))
    yield "cas", lambda: storage.put_instance(order(f"i{n}", "paid"), expected_seq=1)
    yield "keyed", lambda: storage.put_instance(order(f"k{n}"), idempotency_key=f"key{n}")
    yield "batch", batch
    yield "delete", lambda: storage.delete_instance(f"b{n}-0")
    yield "snapshot", storage.create_snapshot
    yield "checkpoint", storage.checkpoint
    yield "compact", storage.compact
    yield "backup", lambda: storage.backup(root / f"backup-{n}")
    yield "restore", lambda: Storage.restore(storage.config.data_dir, root / f"restore-{n}")


def test_the_writer_lock_reader_finds_a_thread_holding_lmdbs_writer_lock(tmp_path: Path) -> None:
    """What the test below relies on: the lock word read names the thread that holds it."""
    with Storage.open(tmp_path / "db") as storage:
        assert internals.writer_lock_held_here(storage) is None
        with internals.write_txn_in_another_thread(storage) as holder:
            assert internals.writer_lock_held_here(storage) == holder
        assert internals.writer_lock_held_here(storage) is None
        storage.put_instance(order("after"))  # and the lock was left as it was


@pytest.mark.parametrize("grouped", [False, True], ids=["one transaction", "group commit"])
def test_no_failed_operation_leaves_lmdbs_writer_lock_held(tmp_path: Path, grouped: bool) -> None:
    """Whatever step of an operation an error stops, its LMDB write transaction ends in the
    thread that began it: a writer mutex left held would make this process's next write wait
    for ever (and every other process's)."""
    # Group commit differs from the one-transaction path only at the write path's points.
    for point in sorted(WRITE_POINTS if grouped else POINTS):
        root = tmp_path / point
        with Storage.open(root / "db") as storage:
            if grouped:
                internals.force_group_commit(storage)
            for n, action in enumerate(["eio", "1*off->raise"]):
                failpoints.enable(point, action)
                try:
                    for what, operation in _every_operation(storage, root, n):
                        with contextlib.suppress(StorageError):
                            operation()
                        holder = internals.writer_lock_held_here(storage)
                        assert holder is None, f"{point}={action}, {what}: thread {holder} holds it"
                finally:
                    failpoints.disable(point)
