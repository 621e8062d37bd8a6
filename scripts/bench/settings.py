"""Counts for one run, and the command line that picks them."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import bench
from bench.data import BATCH_SIZE, LIST_STATES

REPO_ROOT = Path(__file__).resolve().parents[2]

WRITER_TIMEOUT = 300.0
"""Seconds the main process waits for a worker or writer process before giving up."""


@dataclass(frozen=True)
class Settings:
    """Counts for one run; ``--quick`` picks small ones."""

    repeats: int
    records: int
    lookups: int
    puts: int
    batches: int
    list_matches: int
    snapshot_instances: int
    replay_records: int
    mp_seconds: float
    """Seconds of each multi-process durable-put run (lookup runs take half of it)."""
    mp_idle: bool
    """Whether the reader-process rows also time the readers with no writer (for the notes)."""
    scale: tuple[int, ...]
    """Store sizes of ``--scale`` (none: no scale run)."""
    memory_instances: int
    """Instances in the store of ``--memory`` (0: no memory run)."""
    replication_instances: int
    """Instances in the disaster-recovery store of ``--replication`` (0: no replication run)."""


def settings_from(args: argparse.Namespace) -> Settings:
    """Turn the command line into counts, filling what was not given."""
    quick = args.quick
    records = args.records or (5_000 if quick else 100_000)
    return Settings(
        repeats=args.repeats or (2 if quick else 5),
        records=records,
        lookups=args.lookups or (10_000 if quick else 100_000),
        puts=args.puts or (100 if quick else 3_000),
        batches=args.batches or (1 if quick else 3),
        list_matches=args.list_matches or (1_000 if quick else 10_000),
        snapshot_instances=args.snapshot_instances or (10_000 if quick else 1_000_000),
        replay_records=args.replay_records or (4_000 if quick else 200_000),
        mp_seconds=args.mp_seconds or (0.25 if quick else 2.0),
        mp_idle=not quick,
        scale=parse_sizes(args.scale) if args.scale else (),
        memory_instances=(args.memory_instances or 1_000_000) if args.memory else 0,
        replication_instances=(
            (args.replication_instances or (20_000 if quick else 1_000_000))
            if args.replication
            else 0
        ),
    )


def parse_size(text: str) -> int:
    """``10k`` -> 10,000; ``1M`` -> 1,000,000; ``2500`` -> 2,500."""
    text = text.strip().replace("_", "")
    factor = {"k": 1_000, "m": 1_000_000}.get(text[-1:].lower(), 1)
    number = text[:-1] if factor > 1 else text
    try:
        return int(float(number) * factor)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (write 10k, 1M, 2500)") from None


def parse_sizes(text: str) -> tuple[int, ...]:
    """``10k,1M,10M`` -> (10_000, 1_000_000, 10_000_000), sorted."""
    return tuple(sorted({parse_size(part) for part in text.split(",") if part.strip()}))


def default_tmp_dir() -> Path:
    """The repository's parent when writable (same disk, outside git), else the repository."""
    return REPO_ROOT.parent if os.access(REPO_ROOT.parent, os.W_OK) else REPO_ROOT


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    prog = "python -m bench" if Path(sys.argv[0]).name == "__main__.py" else None
    parser = argparse.ArgumentParser(prog=prog, description=(bench.__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, for CI smoke runs")
    parser.add_argument("--repeats", type=int, help="repetitions per side (default 5, quick 3)")
    parser.add_argument("--records", type=int, help="instances in the get stores (default 100k)")
    parser.add_argument("--lookups", type=int, help="random gets per repetition")
    parser.add_argument("--puts", type=int, help="durable single puts per repetition")
    parser.add_argument("--batches", type=int, help=f"batches of {BATCH_SIZE} per repetition")
    parser.add_argument(
        "--list-matches",
        type=int,
        help=f"instances listed per repetition (default 10k, quick 2k); the listing stores "
        f"hold that many in each of {len(LIST_STATES)} states",
    )
    parser.add_argument(
        "--snapshot-instances",
        type=int,
        help="instances in the store that create_snapshot copies (default 1M, quick 20k)",
    )
    parser.add_argument(
        "--replay-records",
        type=int,
        help="single-instance WAL records replayed on open (default 200k, quick 20k)",
    )
    parser.add_argument(
        "--mp-seconds",
        type=float,
        help="seconds of each multi-process durable-put run; lookup runs take half "
        "(default 2, quick 0.5)",
    )
    parser.add_argument(
        "--tmp-dir",
        type=Path,
        default=default_tmp_dir(),
        help="where to create the temporary directory (a real disk, not tmpfs; "
        "default: beside the repository, so that a killed run leaves nothing in the work tree)",
    )
    parser.add_argument(
        "--json", type=Path, metavar="PATH", help="write every row, the facts and the date as JSON"
    )
    parser.add_argument(
        "--chart",
        type=Path,
        metavar="PATH",
        help="write a PNG bar chart of the ratios against their goals (needs matplotlib)",
    )
    parser.add_argument(
        "--readme",
        action="store_true",
        help="rewrite README.md's block between <!-- bench:begin --> and <!-- bench:end --> "
        "from this run, with docs/bench.json and docs/bench.png",
    )
    parser.add_argument(
        "--scale",
        metavar="SIZES",
        help="also time get (two passes), durable put and list at each store size, with "
        "resident memory, e.g. --scale 10k,1M,10M",
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="also report peak memory of listing, verify, create_snapshot and replay of a "
        "store of --memory-instances instances, each in a fresh process",
    )
    parser.add_argument(
        "--memory-instances", type=parse_size, help="instances of the --memory store (default 1M)"
    )
    parser.add_argument(
        "--replication",
        action="store_true",
        help="also time shipping to a bucket and following it (a weed mini server on "
        "127.0.0.1): puts with shipping on against off, replica lag, shipping throughput, "
        "replica lookups, disaster recovery against a plain download",
    )
    parser.add_argument(
        "--replication-instances",
        type=parse_size,
        help="instances of the --replication disaster-recovery store (default 1M, quick 20k)",
    )
    parser.add_argument(
        "--only",
        metavar="TEXT",
        action="append",
        help="run only rows and sections whose name contains TEXT (repeatable: any)",
    )
    return parser.parse_args(argv)
