"""Bar plots of a benchmark result (matplotlib imported lazily; nothing is drawn without it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evaluations.plotting import optional_pyplot, save_figure


def save_plots(result: Any, out_dir: str | Path, stem: str = "bench") -> list[Path]:
    """Average accuracy per row, and normalized score per merge; returns the files written ([] without matplotlib)."""
    plt = optional_pyplot()
    if plt is None:
        return []
    out = Path(out_dir)
    labels = [r.label for r in result.rows]
    avg = [100 * r.average for r in result.rows]
    colors = ["tab:gray" if r.kind == "reference" else "tab:blue" for r in result.rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(labels)), 4))
    ax.bar(range(len(labels)), avg, color=colors)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(max(0.0, min(avg) - 10), min(100.0, max(avg) + 3))
    ax.set_ylabel("average accuracy (%)")
    ax.set_title(f"{result.suite}: average over {len(result.tasks)} tasks")
    fig.tight_layout()
    path = out / f"{stem}.png"
    save_figure(fig, path, dpi=120)
    return [path]
