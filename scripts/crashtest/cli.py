"""The command line: run the trials, check after each, print the figures."""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from rstmdb_storage import Storage
from rstmdb_storage.failpoints import POINTS

from .check import Ledger, Outcome, stored_state
from .trials import ARMED, NOT_ARMED, REPAIR_POINT, plan, run_trial
from .workload import child_main, store_config


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="crashtest.py",
        description="Kill writer processes at named failpoints and at random moments, and "
        "check after each trial that no acknowledged write is lost.",
    )
    parser.add_argument("--trials", type=int, default=100, help="trials (default 100)")
    parser.add_argument("--seed", type=int, default=None, help="seed (default: random)")
    parser.add_argument("--writers", type=int, default=4, help="most writers per trial (4)")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: a temp dir")
    parser.add_argument("--quick", action="store_true", help="fewer operations per writer")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data dir")
    args = parser.parse_args(argv)
    if args.trials < 1 or args.writers < 1:
        parser.error("--trials and --writers must be at least 1")
    return args


class Tally:
    def __init__(self) -> None:
        self.trials = 0
        self.lost = 0
        self.failed_opens = 0
        self.findings = 0  # verify()
        self.other = Counter[str]()  # wal, unexplained, targets, child errors, anomalies
        self.kills = Counter[str]()
        self.random_kills = 0
        self.missed = Counter[str]()  # armed, but the child finished first
        self.problems: list[str] = []

    def note(self, where: str, kind: str, lines: list[str]) -> None:
        for line in lines[:5]:
            self.problems.append(f"{where}: {kind}: {line}")
        if len(lines) > 5:
            self.problems.append(f"{where}: {kind}: ... and {len(lines) - 5} more")

    @property
    def failed(self) -> bool:
        return bool(self.lost or self.failed_opens or self.findings or sum(self.other.values()))


def run(args: argparse.Namespace) -> int:
    if os.environ.get("RSTMDB_FAILPOINTS"):
        print("crashtest: unset RSTMDB_FAILPOINTS (it would arm this process too)")
        return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    temp = None
    if args.data_dir is None:
        temp = Path(tempfile.mkdtemp(prefix="rstmdb-crashtest-"))
        data_dir = temp / "data"
    else:
        data_dir = args.data_dir
    scratch = Path(tempfile.mkdtemp(prefix="rstmdb-crashtest-scratch-"))
    started = time.monotonic()
    # Opening a backup rebuilds its indexes/, and says so: expected here, not news.
    logging.getLogger("rstmdb_storage").setLevel(logging.ERROR)
    tally = Tally()
    with Storage.open(store_config(data_dir)) as storage:  # a store that is there already
        ledger = Ledger(data_dir, stored_state(storage), storage.applied_seq)
    print(
        f"crashtest: seed {seed}, {args.trials} trials, 1-{args.writers} writers"
        f"{', quick' if args.quick else ''}, data dir {data_dir}",
        flush=True,
    )
    try:
        for trial in range(args.trials):
            rng = random.Random(f"{seed}-{trial}")
            children = plan(rng, seed * 100_000 + trial, args, data_dir, scratch)
            result = run_trial(children, rng, scratch)
            where = f"seed {seed} trial {trial}"
            tally.trials += 1
            for child, transcript in zip(result.children, result.transcripts, strict=True):
                assert child.proc is not None
                code = child.proc.returncode
                what = f"{where} writer {child.slot} ({child.mode} {child.point or ''})"
                if code == -signal.SIGKILL and child.killed:
                    tally.random_kills += 1
                elif code == -signal.SIGKILL and child.point is not None:
                    tally.kills[child.point] += 1
                elif code == 0 and transcript.done:
                    if child.point is not None:
                        tally.missed[child.point] += 1
                elif transcript.open_failed is not None:
                    tally.failed_opens += 1
                    tally.note(what, "open failed", [transcript.open_failed])
                else:
                    tally.other["child errors"] += 1
                    err = child.stderr_text()[-1500:]
                    tally.note(what, f"exit {code}", [*transcript.errors, err])
                tally.other["anomalies"] += len(transcript.anomalies)
                tally.note(what, "anomaly", transcript.anomalies)
            if result.stuck:
                tally.other["stuck trials"] += 1
                stacks = [f"writer {c.slot}: {c.stderr_text()[-4000:]}" for c in result.children]
                tally.note(
                    where,
                    "stuck",
                    ["killed every writer after the trial timeout", result.mutex_owner, *stacks],
                )
            outcome = ledger.check_trial(result.transcripts)
            record(tally, where, outcome)
            if outcome.failed_open is not None:
                break  # nothing more can be checked on this store
            if tally.problems:
                for line in tally.problems:
                    print(line, flush=True)
                tally.problems.clear()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    elapsed = time.monotonic() - started
    report(tally, ledger.acked, elapsed)
    if temp is not None:
        if tally.failed or args.keep:
            print(f"data dir kept: {data_dir}")
        else:
            shutil.rmtree(temp, ignore_errors=True)
    return 1 if tally.failed else 0


def record(tally: Tally, where: str, outcome: Outcome) -> None:
    tally.lost += len(outcome.lost)
    tally.note(where, "lost", outcome.lost)
    tally.findings += len(outcome.verify)
    tally.note(where, "verify", outcome.verify)
    for kind, lines in (
        ("wal", outcome.wal),
        ("unexplained", outcome.unexplained),
        ("targets", outcome.targets),
    ):
        tally.other[kind] += len(lines)
        tally.note(where, kind, lines)
    if outcome.failed_open is not None:
        tally.failed_opens += 1
        tally.note(where, "failed open", [outcome.failed_open])


def report(tally: Tally, acked: int, elapsed: float) -> None:
    killed_at = sum(tally.kills.values())
    print(f"trials: {tally.trials}")
    print(f"acknowledged writes: {acked}")
    print(f"lost: {tally.lost}")
    print(f"failed opens: {tally.failed_opens}")
    print(f"verify findings: {tally.findings}")
    for kind in ("wal", "unexplained", "targets", "child errors", "anomalies", "stuck trials"):
        print(f"{kind}: {tally.other[kind]}")
    print(
        f"kills: {killed_at + tally.random_kills} ({killed_at} at failpoints, "
        f"{tally.random_kills} at random moments)"
    )
    print("kills per failpoint (armed and reached / armed, the writer finished first):")
    for point in [*ARMED, REPAIR_POINT]:
        print(f"  {point:34} {tally.kills[point]:6} / {tally.missed[point]}")
    for point in POINTS:
        if point in NOT_ARMED:
            print(f"  {point:34} not armed: {NOT_ARMED[point]}")
        elif point not in ARMED and point != REPAIR_POINT:
            print(f"  {point:34} not armed: new to this harness")
    print(f"elapsed: {elapsed:.1f} s")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(argv[1])
    return run(parse_args(argv))
