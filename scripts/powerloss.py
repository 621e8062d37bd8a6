"""Simulated power loss, long form: ``python scripts/powerloss.py [--states N] [--seed S] ...``.

Records one run of the workload (``tests/powerloss/workload.py``, from an empty data
directory, under the recording shim ``tests/powerloss/recording_io.c``), then builds N crash
states from the recording (``tests/powerloss/crash_states.py`` has the model), opens the
store on each in a child process as the first process after a reboot
(``tests/powerloss/trials.py``), and checks the
promise: every write acknowledged before the cut is there (under the default fsync policy;
under the others a prefix of them), ``verify() == []``, no signal, no error that is not a
``StorageError``; a refusal that ``repair`` then fixes only under the non-default policies.

It prints the figures, then every crash state that broke the promise with the command that
rebuilds it, and exits 1 if any did. To look at one crash state::

    python scripts/powerloss.py --recording DIR --state K --state-seed S --mode M --keep OUT

rebuilds it from the recording DIR (which a run prints and keeps), opens it, prints the
verdict and leaves the state in ``OUT/state-K-S-M/``: ``data/`` (as opening left it),
``state.json`` (what was lost, kept or torn), ``observation.json`` (what opening it found;
missing when the child died of a signal).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from powerloss import crash_states, trials  # noqa: E402  (tests/ is put on the path just above)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--states", type=int, default=2000, help="crash states to try")
    parser.add_argument("--seed", type=int, help="seed of the workload and the choices")
    parser.add_argument("--ops", type=int, default=240, help="writes in the workload")
    parser.add_argument("--policy", default="every_write", help="fsync policy of the workload")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 2, help="server processes at once"
    )
    parser.add_argument("--workdir", type=Path, help="where to keep the recording and states")
    parser.add_argument("--recording", type=Path, help="reuse this recording instead")
    parser.add_argument("--keep-all", action="store_true", help="keep every state directory")
    one = parser.add_argument_group("one crash state")
    one.add_argument("--state", type=int, metavar="K", help="the cut: after K operations")
    one.add_argument(
        "--state-seed", type=int, default=0, metavar="S", help="seed of that state's choices"
    )
    one.add_argument("--mode", choices=crash_states.MODES, default="random")
    one.add_argument(
        "--lose",
        type=int,
        action="append",
        default=[],
        metavar="I",
        help="lose the operation on names at log index I (repeatable)",
    )
    one.add_argument(
        "--drop",
        type=int,
        action="append",
        default=[],
        metavar="I",
        help="drop the unsynced write at log index I (repeatable)",
    )
    one.add_argument("--keep", type=Path, metavar="OUT", help="leave that state in OUT")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="rstmdb-powerloss-"))
    started = time.monotonic()
    recording = args.recording or _record(workdir, seed, args.ops, args.policy)
    rec = crash_states.Recording(recording)
    print(
        f"recording: {recording} (seed {rec.meta['seed']}, {len(rec.writes)} writes, "
        f"{len(rec.ops)} operations, {len(rec.sync_points())} syncs, policy {rec.policy})"
    )
    if args.state is not None:
        return _one(rec, recording, args)
    print(f"seed: {seed}")
    requests = crash_states.plan(rec, args.states, seed)
    results = trials.run_states(
        recording, requests, workdir / "states", args.workers, keep=args.keep_all
    )
    figures = trials.tally(results)
    for name, value in figures.items():
        print(f"{name}: {value}")
    print(f"time: {time.monotonic() - started:.0f} s")
    broken = list(trials.findings(results))
    for result in broken:
        print()
        print(trials.report(result, recording))
    return 1 if broken else 0


def _record(workdir: Path, seed: int, ops: int, policy: str) -> Path:
    shim = trials.build_shim(workdir / "shim")
    return trials.record(workdir / "recording", shim, seed=seed, ops=ops, policy=policy)


def _one(rec: crash_states.Recording, recording: Path, args: argparse.Namespace) -> int:
    out = args.keep or Path(tempfile.mkdtemp(prefix="rstmdb-powerloss-state-"))
    request = crash_states.Request(
        args.state, args.state_seed, args.mode, "asked for", tuple(args.lose), tuple(args.drop)
    )
    (result,) = trials.run_states(recording, [request], out, workers=1, keep=True)
    print(json.dumps(result, indent=1))
    print(trials.report(result, recording) if result["problems"] else "the promise is kept")
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
