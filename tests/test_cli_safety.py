"""The CLI is safe to point anywhere: it never creates a store by accident, and an inspection
never changes what it inspects (every file but the lock files stays byte for byte, with its
modification time), on a closed store, a damaged one, a backup and a live one. Run as real
processes where it matters: the console script and ``python -m rstmdb_storage``."""

from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import ROOT, order

from rstmdb_storage import Storage
from rstmdb_storage.cli import main

INSPECTIONS = [
    ["info"],
    ["get", "order-1"],
    ["list", "--state", "order:pending"],
    ["wal"],
    ["snapshots"],
    ["stats"],
    ["verify"],
    ["dump"],
    ["machines"],
    ["holds"],
]
LOCK_FILES = {"lock.mdb"}


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def tree(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under *root* but the lock files: its SHA-256 and modification time."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name not in LOCK_FILES and path.suffix != ".lock":
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            found[str(path.relative_to(root))] = (digest, path.stat().st_mtime_ns)
    return found


def everything(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


@pytest.fixture
def closed_store(data_dir: Path) -> Path:
    with Storage.open(data_dir) as storage:
        storage.put_machine("order", 1, {"states": ["pending", "paid"]})
        for number in range(1, 6):
            storage.put_instance(order(f"order-{number}", metadata={"n": number}))
        storage.create_snapshot()
        storage.put_instance(order("order-6"))
        storage.hold_wal("nightly", 1)
    return data_dir


# --- never create by accident -------------------------------------------------------------------


def bad_paths(tmp_path: Path) -> dict[str, Path]:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a store\n")
    others = tmp_path / "photos"
    others.mkdir()
    (others / "cat.jpg").write_bytes(b"\xff\xd8")
    return {
        "nonexistent": tmp_path / "typo" / "rstmdb",
        "a file": a_file,
        "a directory of other files": others,
        "an empty directory": (tmp_path / "empty").resolve(),
    }


@pytest.mark.parametrize(
    "command",
    [
        *INSPECTIONS,
        ["snapshot"],
        ["compact"],
        ["recover"],
        ["repair"],
        ["rebuild-indexes"],
        ["purge-idempotency"],
        ["delete", "x"],
        ["transition", "x", "a", "b"],
        ["release-hold", "x"],
        ["hold", "x"],
        ["put", '{"id": "x", "machine": "m", "version": 1, "state": "s"}'],
        ["backup", "/tmp/never"],
        ["replicate", "s3://never/p"],
    ],
    ids=lambda command: command[0],
)
def test_a_path_that_is_not_a_store_is_refused_and_nothing_is_created(
    tmp_path: Path, command: list[str]
) -> None:
    paths = bad_paths(tmp_path)
    (tmp_path / "empty").mkdir()
    before = everything(tmp_path)
    for path in paths.values():
        code, out, err = run(command[0], str(path), *command[1:])
        assert (code, out) == (2, ""), f"{command[0]} on {path}"
        assert err == f"error: not an rstmdb-storage data directory: {path} (no wal/ or indexes/)\n"
    assert everything(tmp_path) == before
    assert not Path("/tmp/never").exists()


def test_restore_from_a_path_that_is_not_a_store(tmp_path: Path) -> None:
    code, _, err = run("restore", str(tmp_path / "typo"), str(tmp_path / "target"))
    assert code == 2 and "not an rstmdb-storage data directory" in err
    assert everything(tmp_path) == []


# --- inspection is read-only --------------------------------------------------------------------


@pytest.mark.parametrize("command", INSPECTIONS, ids=lambda command: command[0])
def test_inspecting_a_closed_store_changes_nothing(closed_store: Path, command: list[str]) -> None:
    before = tree(closed_store)
    code, out, err = run(command[0], str(closed_store), *command[1:])
    assert code == 0, err
    assert out and err == ""
    assert tree(closed_store) == before


def test_inspecting_a_damaged_store_says_it_needs_recovery_and_changes_nothing(
    closed_store: Path,
) -> None:
    data_file = closed_store / "indexes" / "data.mdb"
    with data_file.open("r+b") as f:
        f.write(b"\xa5" * 8192)  # both meta pages: LMDB no longer knows the file
    before = tree(closed_store)
    for command in INSPECTIONS:
        code, out, err = run(command[0], str(closed_store), *command[1:])
        assert code == 1 and out == "", command
        assert err.startswith(f"error: {closed_store} needs recovery: ") and err.count("\n") == 1
        assert f"rstmdb-storage recover {closed_store}" in err
    assert tree(closed_store) == before
    code, out, _ = run("recover", str(closed_store))  # the command the message names
    assert code == 0 and "applied_seq: 7" in out.splitlines()
    assert len(list((closed_store / "indexes").glob("data.mdb.broken-*"))) == 1  # kept aside
    code, out, _ = run("verify", str(closed_store))
    assert (code, out) == (0, "0 problem(s) found\n")


def test_a_store_whose_last_writer_left_records_unapplied_needs_recovery(data_dir: Path) -> None:
    with Storage.open(data_dir) as storage:
        storage.put_instance(order("order-1"))
    applied_at_one = (data_dir / "indexes" / "data.mdb").read_bytes()
    with Storage.open(data_dir) as storage:
        storage.put_instance(order("order-2"))
        storage.put_instance(order("order-3"))
    # LMDB as it was after the first write, the WAL as it is: what a writer killed between
    # its WAL append and its LMDB commit leaves, twice over.
    (data_dir / "indexes" / "data.mdb").write_bytes(applied_at_one)
    before = tree(data_dir)
    code, out, err = run("info", str(data_dir), "--json")
    report = json.loads(out)
    assert code == 1 and (report["applied_seq"], report["pending_records"]) == (1, 2)
    assert "2 WAL record(s) after sequence 1 are not applied" in report["needs_recovery"]
    assert f"rstmdb-storage recover {data_dir}" in err
    code, out, err = run("get", str(data_dir), "order-1")
    assert code == 1 and out == "" and "needs recovery" in err  # stale data is not served
    code, out, _ = run("verify", str(data_dir))
    assert code == 1 and "1 problem(s) found" in out
    for command in ("snapshots", "stats"):  # they report, and say so at the end
        code, out, err = run(command, str(data_dir))
        assert code == 1 and "needs recovery" in err, command
    assert tree(data_dir) == before
    code, out, _ = run("recover", str(data_dir))
    assert code == 0 and "applied_seq: 3" in out.splitlines()
    code, out, _ = run("info", str(data_dir))
    assert code == 0 and "pending_records: 0" in out.splitlines()


def test_inspecting_a_backup_changes_nothing(closed_store: Path, tmp_path: Path) -> None:
    backup = tmp_path / "backup"
    shutil.copytree(closed_store, backup)  # cp -r of a closed store, lock files and all
    for path in [backup, *backup.rglob("*")]:
        path.chmod(0o500 if path.is_dir() else 0o400)  # as a backup is kept
    try:
        before = tree(backup)
        for command in INSPECTIONS:
            code, _, err = run(command[0], str(backup), *command[1:])
            assert code == 0, (command, err)
        assert tree(backup) == before
    finally:
        for path in [backup, *backup.rglob("*")]:
            path.chmod(0o700 if path.is_dir() else 0o600)


def test_a_backup_without_indexes_is_named_as_such(closed_store: Path, tmp_path: Path) -> None:
    with Storage.open(closed_store) as storage:
        storage.backup(tmp_path / "copy")
    before = tree(tmp_path / "copy")
    code, out, err = run("info", str(tmp_path / "copy"))
    assert code == 1 and out == "" and "data.mdb is missing" in err and "recover" in err
    assert tree(tmp_path / "copy") == before


def test_inspecting_a_live_store_from_another_process(closed_store: Path) -> None:
    """The store open and written here; the CLI a real process beside it: it sees a live
    store (not one that needs recovery), and what it reads is what was written."""
    with Storage.open(closed_store) as storage:
        for number in range(7, 12):
            storage.put_instance(order(f"order-{number}"))
            result = cli("info", str(closed_store), "--json")
            assert result.returncode == 0, result.stderr
            report = json.loads(result.stdout)
            assert report["needs_recovery"] is None
            assert report["applied_seq"] == storage.applied_seq
        result = cli("get", str(closed_store), "order-11")
        assert result.returncode == 0 and json.loads(result.stdout)["id"] == "order-11"


# --- as real processes --------------------------------------------------------------------------


def cli_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def cli(*args: str, script: bool = True) -> subprocess.CompletedProcess[str]:
    """The console script, or ``python -m rstmdb_storage`` (*script* False)."""
    command = [str(Path(sys.executable).with_name("rstmdb-storage"))]
    if not script or not Path(command[0]).exists():
        command = [sys.executable, "-m", "rstmdb_storage"]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, env=cli_env(), timeout=60
    )


@pytest.mark.parametrize("script", [True, False], ids=["console script", "python -m"])
def test_as_a_process_errors_are_one_line_and_no_traceback(tmp_path: Path, script: bool) -> None:
    result = cli("info", str(tmp_path / "typo"), script=script)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"error: not an rstmdb-storage data directory: {tmp_path / 'typo'} (no wal/ or indexes/)\n"
    )
    result = cli("list", str(tmp_path), "--limit", "0", script=script)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert not (tmp_path / "typo").exists()


def test_python_dash_m_works_like_the_script(closed_store: Path) -> None:
    by_module = cli("dump", str(closed_store), script=False)
    by_script = cli("dump", str(closed_store))
    assert by_module.returncode == by_script.returncode == 0
    assert by_module.stdout == by_script.stdout and len(by_module.stdout.splitlines()) == 7
    assert "Usage: rstmdb-storage" in cli("--help", script=False).stdout


def test_wal_follow_prints_new_records_until_interrupted(closed_store: Path) -> None:
    command = [sys.executable, "-m", "rstmdb_storage", "wal", str(closed_store), "--follow"]
    follower = subprocess.Popen(
        [*command, "--from", "7"], stdout=subprocess.PIPE, text=True, env=cli_env()
    )
    try:
        assert json.loads(read_line(follower))["seq"] == 7  # the newest record there is
        with Storage.open(closed_store) as storage:
            seq = storage.put_instance(order("order-new"))
        record = json.loads(read_line(follower))
        assert record["seq"] == seq and record["changes"] == [{"op": "put", "id": "order-new"}]
        follower.send_signal(signal.SIGINT)
        assert follower.wait(timeout=30) == 0
    finally:
        follower.kill()
        follower.wait()


def read_line(process: subprocess.Popen[str], timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], deadline - time.monotonic())
        if ready:
            line = process.stdout.readline()
            assert line, "the process ended"
            return line
    raise AssertionError("no line within the deadline")
