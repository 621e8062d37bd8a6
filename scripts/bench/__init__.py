"""Benchmarks for rstmdb-storage: each path of the store timed against its floor, its
ceiling, SQLite and diskcache in one run, printed as ratios.

A row is one *path* of the store (get by id, a durable put, a batch, a listing, replay, a
snapshot, many processes, many threads ...). Each row times *ours* and every contender that
applies, all in rotation within each repetition, and reports the median rate of each over
``--repeats`` repetitions:

- *the floor*: the same work with the same libraries (lmdb, crc32c, cbor2) and no project
  layers (:mod:`bench.floor`): what Python allows;
- *the ceiling*: the bare physical operation (an LMDB get, ``pwrite`` + ``fdatasync`` on a
  preallocated file, ``cp`` + fsync);
- SQLite (stdlib sqlite3, WAL mode, ``synchronous=FULL``, the same records and indexes);
- diskcache (``Cache.get`` / ``Cache.set``, ``synchronous=FULL``) where it does the same job.

Every row prints ours / floor, ours / ceiling and ours / SQLite with SPEC.md's goal ("Figures it
must reach") next to the ratio it is about, met or NO, and for a row that misses its goal the
reason kept with the row (``why_short`` in :mod:`bench.comparisons`). Absolute rates move 20%
or more between runs on a shared machine; the ratios are what the goals are about.

Run it from the repository root::

    python scripts/bench.py                  # full run (100k records for gets, 10k listed)
    python scripts/bench.py --quick          # small counts, a smoke run (< 60 s on a quiet machine)
    python scripts/bench.py --only get --only replay   # just the rows whose path contains these
    python scripts/bench.py --json out.json --chart out.png
    python scripts/bench.py --readme         # full run; rewrites README.md's figures block,
                                             # docs/bench.json and docs/bench.png
    python scripts/bench.py --scale 10k,1M,10M --only none   # how rates and memory grow
    python scripts/bench.py --memory --only none             # peak memory of a 1M store

(``python scripts/bench ...``, or ``python -m bench ...`` from ``scripts/``, run the same.)
The exit status is 1 when the package does not behave as the benchmark assumes (the problems
are printed under the table), not when a goal is missed. ``pip install -e '.[bench]'`` brings
diskcache and matplotlib; without them diskcache is left out of the rows and no chart is drawn.

The package, one module per group of rows and one per shared piece:

- :mod:`bench.settings`: counts, the command line, where the repository is;
- :mod:`bench.data`: the instances every row writes and reads;
- :mod:`bench.ceiling`: SQLite's records, and WAL frames as the store writes them;
- :mod:`bench.floor`: the floor's layout, reads and writes;
  :mod:`bench.floor_processes`: the floor of group commit across writer processes (the floor
  of group commit across threads is in :mod:`bench.threads`, beside its row);
- :mod:`bench.timing`: one timed run, and medians of sides run in rotation;
- :mod:`bench.stores`: opening and filling the contenders' stores; :class:`~bench.stores.Bench`;
- :mod:`bench.gets`, :mod:`bench.puts`, :mod:`bench.listing`, :mod:`bench.snapshots`,
  :mod:`bench.replay`, :mod:`bench.processes`, :mod:`bench.threads`: the rows, by group;
- :mod:`bench.pool`: the worker processes of the multi-process rows;
- :mod:`bench.scale`: ``--scale`` and ``--memory``;
- :mod:`bench.comparisons`: the rows, their goals and reasons, and the sections;
- :mod:`bench.report`: the facts printed first, the table, the notes, the JSON;
- :mod:`bench.chart`, :mod:`bench.readme`: ``--chart`` and ``--readme``;
- :mod:`bench.cli`: :func:`~bench.cli.main`, with the API check (which also checks that the
  floor writes the store's layout).

To add a row, write a function ``path_xxx(bench) -> dict[str, float]`` returning the median
rate of ``"ours"`` and of each contender by name (use :meth:`Bench.rotated
<bench.stores.Bench.rotated>`) in the module of its group and list it, with its goals and
``why_short``, in :data:`bench.comparisons.ROWS`. A figure that is not a row of rates is a
:class:`~bench.comparisons.Section` in :data:`bench.comparisons.SECTIONS`.
"""
