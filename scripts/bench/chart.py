"""``--chart PATH``: a PNG bar chart of each goal's ratio against the goal, with matplotlib
(an optional extra: ``pip install -e '.[bench]'``; without it the chart is skipped)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bench.comparisons import NAMES, RATE, Result


def bars(results: Sequence[Result]) -> list[tuple[str, float, float]]:
    """(label, value / goal, goal) of each goal that has a value: 1.0 is the goal reached.
    Rows without a goal show ours / floor (or / SQLite) for information, with no goal line."""
    out = []
    for result in results:
        for goal, value, _ in result.verdicts():
            if value is None:
                continue
            against = "rate" if goal.against == RATE else NAMES.get(goal.against, goal.against)
            out.append(
                (f"{result.row.path}\nvs {against} ({goal.describe()})", value, goal.at_least)
            )
    return out


def write_chart(results: Sequence[Result], path: Path, date: str) -> str | None:
    """Draw :func:`bars` into ``path`` (horizontal bars of value / goal, a line at 1). Returns
    None, or the note printed instead when matplotlib is missing or nothing has a goal."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"no chart: matplotlib is not installed (pip install -e '.[bench]'); not {path}"
    items = bars(results)
    if not items:
        return f"no chart: no row with a goal ran; not {path}"
    labels = [label for label, _, _ in items]
    share = [value / goal for _, value, goal in items]
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(items) + 1.2))
    colours = ["#2e7d32" if s >= 1 else "#c62828" for s in share]
    ax.barh(range(len(items)), share, color=colours)
    ax.axvline(1.0, color="black", linewidth=1)
    for i, ((_, value, goal), s) in enumerate(zip(items, share, strict=True)):
        shown = f"{value:,.0f}" if goal > 100 else f"{value:.2f}"
        ax.text(s + 0.02, i, shown, va="center", fontsize=8)
    ax.set_yticks(range(len(items)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("measured / goal (1 = goal reached)")
    ax.set_xlim(0, max(max(share) * 1.15, 1.2))
    ax.set_title(f"rstmdb-storage against its goals (SPEC.md), {date[:10]}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
