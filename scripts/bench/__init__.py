"""Benchmarks for rstmdb-storage, printed as ratios measured in one run.

Each comparison times *ours* against *the other* (a ceiling built from the raw
libraries, or SQLite) in the same run, alternating the two within every
repetition, and reports the median rate of each over ``--repeats`` repetitions.
Absolute rates move 20% or more between runs on a shared machine; the ratios
are what the goals in SPEC.md ("Figures it must reach") are about.

Run it from the repository root::

    python scripts/bench.py            # full run (100k records for gets, 10k listed)
    python scripts/bench.py --quick    # small counts, for CI smoke runs (< 60 s)
    python scripts/bench.py --only snapshot --only replay   # just those rows and sections

(``python scripts/bench ...``, or ``python -m bench ...`` from ``scripts/``, run the same.)
The exit status is 1 when the package does not behave as the benchmark assumes
(the problems are printed under the table), not when a goal is missed.

The package, one module per group of comparisons and one per shared piece:

- :mod:`bench.settings`: counts, the command line, where the repository is;
- :mod:`bench.data`: the instances every comparison writes and reads;
- :mod:`bench.ceiling`: the raw ceiling's and SQLite's records, WAL frames as the store's;
- :mod:`bench.timing`: one timed run, and medians of sides run in rotation;
- :mod:`bench.stores`: opening and filling the contenders' stores; :class:`~bench.stores.Bench`;
- :mod:`bench.gets`, :mod:`bench.puts`, :mod:`bench.listing`, :mod:`bench.snapshots`,
  :mod:`bench.replay`, :mod:`bench.processes`: the comparisons, by group;
- :mod:`bench.pool`: the worker processes of the multi-process rows;
- :mod:`bench.comparisons`: the list of rows and sections that a run goes through;
- :mod:`bench.report`: the facts printed first, the table and the notes under it;
- :mod:`bench.cli`: :func:`~bench.cli.main`, with the API check.

To add a comparison, write a function ``compare_xxx(bench) -> (ours, other)``
returning two rates in ops/s (use :meth:`Bench.paired <bench.stores.Bench.paired>`, or
:func:`~bench.timing.paired_medians`) in the module of its group and list it in
:data:`bench.comparisons.COMPARISONS`. A figure that is not a pair of rates (latency
percentiles, say) is a :class:`~bench.comparisons.Section` in
:data:`bench.comparisons.SECTIONS`: a function ``section_xxx(bench)`` returning the lines
printed under the table.

Besides the per-operation rows, the run measures what SPEC.md asks of snapshots and
recovery: ``create_snapshot()`` of a store of ``--snapshot-instances`` instances
(1M) against ``cp`` of its LMDB file, the latency of durable puts in another
process while snapshots run, and WAL replay on open (records per second, rebuilding
a lost ``indexes/`` from ``--replay-records`` single-instance records).

Many processes (SPEC.md guarantee 6): durable puts per second of 1, 2 and 4 writer
processes on one data directory against as many SQLite processes on one file, and
lookups per second of 1 and 2 reader processes while a writer process puts, each run
``--mp-seconds`` long (lookups half of it) in worker processes that
:class:`~bench.pool.MpPool` spawns once and starts together. They use only the public API.
"""
