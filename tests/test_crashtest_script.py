"""The crash harness as a tool (``scripts/crashtest.py``): its short form, run as an operator
would run it, kills writers at many failpoints and at random moments, loses nothing, and says
so in its figures and its exit status.

``RSTMDB_CRASH_SEED`` replays a seed (the script prints the one it used on its first line).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "crashtest.py"
TRIALS = 100


def test_short_form_loses_nothing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RSTMDB_FAILPOINTS"}
    command = [sys.executable, str(SCRIPT), "--trials", str(TRIALS), "--quick", "--writers", "4"]
    command += ["--data-dir", str(tmp_path / "data")]
    if "RSTMDB_CRASH_SEED" in os.environ:
        command += ["--seed", os.environ["RSTMDB_CRASH_SEED"]]
    proc = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    shown = f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, shown
    figures = {k: int(v) for k, v in re.findall(r"^([a-z ]+): (\d+)$", proc.stdout, re.M)}
    assert figures["trials"] >= TRIALS, shown
    assert figures["acknowledged writes"] > 0, shown
    for must_be_zero in ("lost", "failed opens", "verify findings", "wal", "unexplained"):
        assert figures[must_be_zero] == 0, f"{must_be_zero}: {shown}"
    for must_be_zero in ("targets", "child errors", "anomalies", "stuck trials"):
        assert figures[must_be_zero] == 0, f"{must_be_zero}: {shown}"
    kills = {
        point: int(count)
        for point, count in re.findall(r"^  ([a-z_.]+) +(\d+) / \d+$", proc.stdout, re.M)
    }
    reached = sorted(point for point, count in kills.items() if count > 0)
    assert len(reached) >= 8, f"kills at only {reached}: {shown}"
    assert {"write.after_sync", "snapshot.data.before_rename"} <= set(kills), shown
    random_kills = re.search(r"^kills: \d+ \(\d+ at failpoints, (\d+) at random", proc.stdout, re.M)
    assert random_kills is not None and int(random_kills.group(1)) > 0, shown


def test_a_stuck_trial_names_who_holds_the_writer_mutex(tmp_path: Path) -> None:
    """The report of a stuck trial says whose thread holds LMDB's writer mutex (the lock word
    in ``lock.mdb``), and which writers hold LMDB's fcntl locks on it."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from crashtest.trials import Child, writer_mutex_owner
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    indexes = tmp_path / "data" / "indexes"
    indexes.mkdir(parents=True)
    holder = (
        "import lmdb, sys\n"
        f"env = lmdb.open({str(indexes)!r}, map_size=1 << 20)\n"
        "txn = env.begin(write=True)\n"
        "print('holding', flush=True)\n"
        "sys.stdin.readline()\n"
        "txn.abort()\n"
        "print('released', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline() == "holding\n"
        child = Child(3, "random", None, None, {"data_dir": str(tmp_path / "data")}, proc)
        held = writer_mutex_owner([child])
        assert re.search(r"held by thread \d+ of writer 3 ", held), held
        assert "writer 3 READ 0-0" in held, held  # LMDB's shared lock on its first byte
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "released\n"
        assert "LMDB writer mutex: free" in writer_mutex_owner([child])
    finally:
        proc.kill()
        proc.wait()
