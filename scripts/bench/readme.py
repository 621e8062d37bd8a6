"""``--readme``: rewrite the README's figures, the block between :data:`BEGIN` and
:data:`END`, from a run: the machine facts, the date, the table, the chart, and for each row
that misses its goal the reason kept with the row (``why_short`` in :mod:`bench.comparisons`).
Everything outside the block is left as it is."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.comparisons import NAMES, RATE, Result
from bench.report import format_rate, markdown_table, shown_ratio

BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"

WIDTH = 100
QUICK = " (a --quick run: small counts, not figures to quote)"
FACTS = ("python", "platform", "cores", "lmdb", "cbor2", "crc32c", "sqlite", "diskcache")


def block(document: dict[str, Any], results: Sequence[Result], chart: str | None) -> list[str]:
    """The lines between the markers."""
    facts = document["facts"]
    machine = "; ".join(f"{name} {facts[name]}" for name in FACTS if name in facts)
    lines = [
        "`scripts/bench.py` times each path of the store (one row each) against *the floor* "
        "(the same work with the same libraries, lmdb, crc32c and cbor2, and no project "
        "layers), *the ceiling* (the bare physical operation: an LMDB get, `pwrite` + "
        "`fdatasync`, `cp` + fsync), SQLite (stdlib `sqlite3`, WAL mode, `synchronous=FULL`, "
        "the same records and indexes) and diskcache where it does the same job, all sides "
        "in rotation within each repetition. Absolute rates move 20% or more between runs on "
        "a shared machine; the ratios are what the goals are about.",
        "",
        f"Measured {document['date']} by `python scripts/bench.py --readme` "
        f"({document['seconds']:.0f} s), medians of {document['repeats']} repetitions with "
        f"every side in rotation{QUICK if document.get('quick') else ''}; "
        f"{machine}; work dir on {facts['work dir'].split(' on ', 1)[-1]}; "
        f"records of {facts['record']}; counts: {facts['counts']}. "
        "A ratio is ours / that contender's rate; each goal (SPEC.md) stands next to the ratio "
        "it is about. All figures, with the machine facts: [docs/bench.json](docs/bench.json).",
        "",
        *markdown_table(results),
        "",
    ]
    if chart:
        lines += [f"![each ratio against its goal]({chart})", ""]
    missed = [r for r in results if r.missed()]
    if missed:
        lines.append("Rows that miss their goal, and why (as understood now):")
        lines.append("")
        for r in missed:
            shortfalls = ", ".join(
                f"rate {format_rate(v)} against {g.describe()}"
                if g.against == RATE
                else f"ours / {NAMES.get(g.against, g.against)} "
                f"{'-' if v is None else shown_ratio(v, (g, v, met))} against {g.describe()}"
                for g, v, met in r.verdicts()
                if not met
            )
            item = f"- **{r.row.path}** ({shortfalls}): {r.row.why_short or 'unexplained'}"
            lines += textwrap.wrap(item, WIDTH, subsequent_indent="  ", break_on_hyphens=False)
        lines.append("")
    further = [line for line in document.get("sections", []) if line.strip()]
    if further:
        lines += ["Further figures of the same run:", "", "```", *further, "```", ""]
    if document.get("problems"):
        lines += [f"Problems in this run: {'; '.join(document['problems'])}", ""]
    return lines


def wrapped(lines: list[str]) -> list[str]:
    """Prose lines wrapped to :data:`WIDTH` columns (tables, lists, code and images kept)."""
    out, fenced = [], False
    for line in lines:
        fenced ^= line.startswith("```")
        keep = fenced or line.startswith(("|", "- ", "  ", "!", "```")) or not line
        out += [line] if keep else textwrap.wrap(line, WIDTH, break_on_hyphens=False)
    return out


def rewrite_readme(
    readme: Path, document: dict[str, Any], results: Sequence[Result], chart: Path | None
) -> None:
    """Replace the text between :data:`BEGIN` and :data:`END` in ``readme``; raise if the
    markers are not there once each, in order."""
    text = readme.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start or text.count(BEGIN) != 1 or text.count(END) != 1:
        raise RuntimeError(f"{readme}: wants one {BEGIN} and one {END} after it")
    link = None if chart is None else os.path.relpath(chart, readme.parent)
    body = "\n".join(wrapped(block(document, results, link)))
    readme.write_text(f"{text[: start + len(BEGIN)]}\n{body}\n{text[end:]}")
