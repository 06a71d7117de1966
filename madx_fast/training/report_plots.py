"""The report's heatmaps (``report.py``): the matrix, and each system's difference to the baseline.

Both have a row per report row (a block per source language, split by a line) and a column per target plus
the mean. The matrix's colour scale spans the zero-shot cells (target other than the row's source) and the
means: the in-language cells, near the top of the scale, are drawn grey with their number, so that they do not
take the whole scale and the differences between the transfer cells stay visible. The difference map is on a
diverging scale centred at 0 (blue: better than the baseline, red: worse), symmetric around it.
"""
from __future__ import annotations


def _grid(rows, targets, value):
    """``(values, in_language)`` arrays: ``value(row, column)`` per cell (NaN where None) and the source's own
    cells."""
    import numpy as np
    columns = targets + ["mean"]
    values = np.array([[np.nan if value(r, c) is None else value(r, c) for c in columns] for r in rows], dtype=float)
    own = np.array([[c == r["source"] for c in columns] for r in rows])
    return values, own


def _draw(rows, targets, values, own, path: str, title: str, *, cmap, vmin, vmax, label, signed=False) -> None:
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    columns = targets + ["mean"]
    colour = np.ma.masked_where(own | np.isnan(values), values)
    cmap = plt.get_cmap(cmap).with_extremes(bad="#d9d9d9")
    fig, ax = plt.subplots(figsize=(3.0 + 0.9 * len(columns), 1.3 + 0.42 * len(rows)))
    im = ax.imshow(colour, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(columns)), labels=columns)
    ax.set_yticks(range(len(rows)), labels=[f"{r['source']} | {r['name']}" for r in rows], fontsize=8)
    ax.set_xlabel("target language")
    ax.axvline(len(targets) - 0.5, color="black", linewidth=1.5)
    for i in range(1, len(rows)):
        if rows[i]["source"] != rows[i - 1]["source"]:
            ax.axhline(i - 0.5, color="black", linewidth=1.5)
    span = max(abs(vmax - vmin), 1e-9)
    for i in range(len(rows)):
        for j in range(len(columns)):
            v = values[i, j]
            if np.isnan(v):
                continue
            dark = not own[i, j] and (abs(v) > 0.6 * vmax if signed else (v - vmin) / span < 0.45)
            ax.text(j, i, f"{v:+.1f}" if signed else f"{v:.1f}", ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=label)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120, format="png")
    finally:
        plt.close(fig)


def _cell_mean(row: dict, column: str) -> float | None:
    stats = row["mean"] if column == "mean" else row["cells"].get(column)
    return None if stats is None else stats["mean"]


def plot_matrix(report: dict, path: str, title: str) -> None:
    import numpy as np
    rows, targets = report["rows"], report["targets"]
    values, own = _grid(rows, targets, _cell_mean)
    scale = values[~own & ~np.isnan(values)]
    lo, hi = (float(scale.min()), float(scale.max())) if scale.size else (0.0, 100.0)
    if hi - lo < 1.0:
        lo, hi = lo - 0.5, hi + 0.5
    _draw(rows, targets, values, own, path, f"{title}\n(in-language cells grey: outside the colour scale)",
          cmap="viridis", vmin=lo, vmax=hi, label=f"{report['metric']} (%)")


def plot_difference(report: dict, path: str, title: str) -> None:
    import numpy as np
    rows, targets = report["difference"], report["targets"]
    values, own = _grid(rows, targets, lambda r, c: r["mean"] if c == "mean" else r["cells"].get(c))
    scale = np.abs(values[~own & ~np.isnan(values)])
    bound = max(float(scale.max()) if scale.size else 1.0, 0.5)
    _draw(rows, targets, values, own, path, f"{title}: difference to {report['baseline']}",
          cmap="RdBu", vmin=-bound, vmax=bound, label="points", signed=True)
