"""Plots of a benchmark result (matplotlib imported lazily; nothing is drawn without it): the average accuracy per
row with its spread over seeds, and the landscape columns: the loss along each row's path to the fine-tunes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evaluations.plotting import optional_pyplot, save_figure


def _bars(ax: Any, result: Any) -> None:
    labels = [r.label for r in result.rows]
    avg = [100 * r.average for r in result.rows]
    err = [100 * r.spread.get("average", 0.0) for r in result.rows]
    colors = ["tab:gray" if r.kind == "reference" else "tab:blue" for r in result.rows]
    ax.bar(range(len(labels)), avg, yerr=err, color=colors, capsize=2)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(max(0.0, min(avg) - 10), min(100.0, max(a + e for a, e in zip(avg, err)) + 3))
    ax.set_ylabel("average accuracy (%)")
    seeds = result.seeds or [result.seed]
    ax.set_title(f"{result.suite}: average over {len(result.tasks)} tasks, {len(seeds)} seed(s)", fontsize=9)


def _paths(ax: Any, result: Any) -> None:
    for r in result.rows:
        if not r.paths:
            continue
        curves = [r.paths["loss"][t] for t in result.tasks]
        mean = [sum(v) / len(v) for v in zip(*curves)]
        ax.plot(r.paths["alphas"], mean, marker=".", label=r.label, linestyle="--" if r.kind == "reference" else "-")
    ax.set_xlabel("alpha: row's body (0) -> each fine-tune (1)")
    ax.set_ylabel("test loss, mean over tasks")
    ax.set_title("loss along the paths to the fine-tunes", fontsize=9)
    ax.legend(fontsize=6, ncol=2)


def save_plots(result: Any, out_dir: str | Path, stem: str = "bench") -> list[Path]:
    """`stem.png` in `out_dir`; returns the files written ([] without matplotlib)."""
    plt = optional_pyplot()
    if plt is None:
        return []
    has_paths = any(r.paths for r in result.rows)
    fig, axes = plt.subplots(1, 2 if has_paths else 1, figsize=(max(6.0, 0.55 * len(result.rows)) + 5 * has_paths, 4.5),
                             squeeze=False)
    _bars(axes[0][0], result)
    if has_paths:
        _paths(axes[0][1], result)
    fig.tight_layout()
    path = Path(out_dir) / f"{stem}.png"
    save_figure(fig, path, dpi=120)
    return [path]
