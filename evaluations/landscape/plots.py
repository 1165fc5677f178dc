"""Plots for paths, slices and connectivity; matplotlib is imported lazily and figures go to files.

Every function returns the path written, or None when matplotlib is not installed.
"""

from __future__ import annotations

from pathlib import Path

from evaluations.plotting import optional_pyplot, save_figure


def plot_path(result, path: str | Path, title: str = "") -> str | None:
    """Loss and error along a path, with the chord between the endpoints."""
    plt = optional_pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    a = result.alphas
    ax.plot(a, result.loss, "o-", label="loss")
    ax.plot([a[0], a[-1]], [result.loss[0], result.loss[-1]], "--", color="gray", label="chord")
    ax.set_xlabel("alpha")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(a, result.error, "s-", color="tab:red", alpha=0.6, label="error")
    ax2.set_ylabel("error")
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    return str(path)


def plot_slice_1d(s, path: str | Path, title: str = "") -> str | None:
    plt = optional_pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(s.alphas, s.loss, "o-")
    ax.set_xlabel("alpha")
    ax.set_ylabel("loss")
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    return str(path)


def plot_contour(s, path: str | Path, title: str = "", levels: int = 30) -> str | None:
    """Contour plot of a Slice2D's loss."""
    plt = optional_pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5, 4.5))
    cs = ax.contour(s.alphas, s.betas, s.loss, levels=levels)
    ax.clabel(cs, inline=True, fontsize=6)
    ax.plot([0], [0], "k*")
    ax.set_xlabel("d1")
    ax.set_ylabel("d2")
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    return str(path)


def plot_surface(s, path: str | Path, title: str = "") -> str | None:
    """3-D surface plot of a Slice2D's loss."""
    plt = optional_pyplot()
    if plt is None:
        return None
    import numpy as np

    fig = plt.figure(figsize=(6, 5))
    ax = fig.add_subplot(projection="3d")
    xx, yy = np.meshgrid(s.alphas, s.betas)
    ax.plot_surface(xx, yy, s.loss, cmap="viridis", linewidth=0)
    ax.set_xlabel("d1")
    ax.set_ylabel("d2")
    ax.set_zlabel("loss")
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    return str(path)


def plot_dendrogram(conn, path: str | Path, title: str = "") -> str | None:
    """scipy's single-linkage dendrogram of a Connectivity's barrier matrix, with the threshold drawn."""
    plt = optional_pyplot()
    if plt is None:
        return None
    from scipy.cluster.hierarchy import dendrogram

    fig, ax = plt.subplots(figsize=(5, 3.5))
    dendrogram(conn.linkage(), labels=conn.names, ax=ax)
    ax.axhline(conn.threshold, ls="--", color="gray")
    ax.set_ylabel(f"{conn.kind} barrier")
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    return str(path)
