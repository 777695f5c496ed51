"""Figures, written as PNG files atomically. matplotlib is imported when a figure is made."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bnkit.files import PNG_SOFTWARE, atomic_path

DPI = 120


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, out: str | Path) -> Path:
    """Writes `fig` to `out` as a PNG, atomically, and closes it."""
    out = Path(out)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png", metadata={"Software": PNG_SOFTWARE})
    plt.close(fig)
    return out


def shift_plot(report: Any, out: str | Path, title: str | None = None) -> Path:
    """Plots a ShiftReport: mean and max channel divergence of each BN layer by depth,
    on a log scale, with the recommendation thresholds.

    Examples:
        >>> import keras, numpy as np, bnkit, tempfile, pathlib
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization()])
        >>> r = bnkit.shift(m, np.random.default_rng(0).normal(size=(8, 4)).astype("float32"))
        >>> shift_plot(r, pathlib.Path(tempfile.mkdtemp()) / "s.png").stat().st_size > 0
        True
    """
    from bnkit.stats import ADAPT_THRESHOLD, LABELS_THRESHOLD

    plt = _pyplot()
    depth = [x.depth for x in report.layers]
    floor = 1e-4
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(depth)), 3.6))
    ax.plot(depth, [max(x.kl_mean, floor) for x in report.layers], "o-", label="mean over channels")
    ax.plot(depth, [max(x.kl_max, floor) for x in report.layers], "^:", label="worst channel")
    ax.axhline(ADAPT_THRESHOLD, color="tab:orange", lw=1, ls="--", label="adapt from")
    ax.axhline(LABELS_THRESHOLD, color="tab:red", lw=1, ls="--", label="collect labels from")
    ax.set_yscale("log")
    ax.set_xlabel("BN layer (input side first)")
    ax.set_ylabel("KL(data || stored), nats")
    ax.set_title(title or f"BN input shift: model {report.score:.3f} -> {report.recommendation}")
    ax.legend(fontsize="small", loc="best")
    ax.grid(alpha=0.3)
    return _save(plt, fig, out)


def compare_plot(result: Any, out: str | Path) -> Path:
    """Validation accuracy and loss by epoch, one line per strategy (mean over seeds, the
    band spanning the seeds); diverged runs end early; a label-free strategy (`tent`) is a
    dashed level.

    Examples:
        >>> import keras, numpy as np, bnkit, tempfile, pathlib
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization(),
        ...                       keras.layers.Dense(2)])
        >>> x = np.random.rand(16, 4).astype("float32"); y = (x[:, 0] > .5).astype(int)
        >>> r = bnkit.compare(m, (x, y), (x, y), ["frozen"], epochs=2, seeds=2)
        >>> compare_plot(r, pathlib.Path(tempfile.mkdtemp()) / "c.png").stat().st_size > 0
        True
    """
    import numpy as np

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for summary in result.summaries:
        runs = [r for r in result.runs if r.strategy == summary.strategy]
        for ax, key in zip(axes, ("val_accuracy", "val_loss"), strict=True):
            length = max(len(r.epochs) for r in runs)
            if length == 0:  # a label-free strategy: no epochs, one final result
                final = np.mean([getattr(r, f"final_{key}") for r in runs])
                ax.axhline(final, ls="--", color="0.3", label=f"{summary.strategy} (no labels)")
                continue
            grid = np.full((len(runs), length), np.nan)
            for i, r in enumerate(runs):
                grid[i, : len(r.epochs)] = [getattr(e, key) for e in r.epochs]
            epochs = np.arange(1, length + 1)
            (line,) = ax.plot(epochs, np.nanmean(grid, 0), marker="o", label=summary.strategy)
            ax.fill_between(
                epochs, np.nanmin(grid, 0), np.nanmax(grid, 0), color=line.get_color(), alpha=0.15
            )
    from matplotlib.ticker import MaxNLocator

    for ax, label in zip(axes, ("validation accuracy", "validation loss"), strict=True):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs only
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    seeds = max(s.runs for s in result.summaries)
    fig.suptitle(
        f"BN strategies, mean and range over {seeds} seeds"
        if seeds != 1
        else "BN strategies, one seed"
    )
    return _save(plt, fig, out)


def tta_plot(report: Any, out: str | Path) -> Path:
    """Plots a TTAReport: per batch, the mean prediction entropy and (where labels were
    given) the accuracy, with a red line at every reset and a grey band where TENT was
    held on a label-shifted stream.

    Examples:
        >>> import torch, numpy as np, bnkit, tempfile, pathlib
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
        >>> r = bnkit.tta(m, np.ones((32, 4), "float32"), "none")
        >>> tta_plot(r, pathlib.Path(tempfile.mkdtemp()) / "t.png").stat().st_size > 0
        True
    """
    plt = _pyplot()
    index = [b.index for b in report.batches]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(index)), 3.6))
    ax.plot(index, [b.entropy for b in report.batches], "-", color="tab:blue", label="entropy")
    ax.set_xlabel("batch")
    ax.set_ylabel("mean prediction entropy, nats")
    if report.accuracy is not None:
        acc = ax.twinx()
        acc.plot(index, [b.accuracy for b in report.batches], "-", color="tab:green")
        acc.set_ylabel("batch accuracy", color="tab:green")
        acc.set_ylim(0, 1)
    for k, _ in report.resets:
        ax.axvline(k, color="tab:red", lw=1, ls=":")
    for k in report.held:
        ax.axvspan(k - 0.5, k + 0.5, color="0.85", lw=0)
    title = f"{report.method}: {len(report.resets)} reset(s)"
    if report.held:
        title += f", {len(report.held)} held"
    if report.accuracy is not None:
        title += f", accuracy {report.accuracy:.1%}"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(plt, fig, out)
