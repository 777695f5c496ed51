"""Figures, written as PNG files atomically. matplotlib is imported when a figure is made."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bnkit.files import atomic_path

DPI = 120


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def shift_plot(report: Any, out: Path, title: str | None = None) -> Path:
    """Plots a ShiftReport: mean and max channel divergence of each BN layer by depth,
    on a log scale, with the recommendation thresholds.

    Example:
        >>> import keras, numpy as np, bnkit, tempfile, pathlib
        >>> m = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization()])
        >>> r = bnkit.shift(m, np.ones((8, 4), "float32"))
        >>> shift_plot(r, pathlib.Path(tempfile.mkdtemp()) / "s.png").stat().st_size > 0
        True
    """
    from bnkit.stats import ADAPT_THRESHOLD, TRAIN_THRESHOLD

    plt = _pyplot()
    depth = [x.depth for x in report.layers]
    floor = 1e-4
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(depth)), 3.6))
    ax.plot(depth, [max(x.kl_mean, floor) for x in report.layers], "o-", label="mean over channels")
    ax.plot(depth, [max(x.kl_max, floor) for x in report.layers], "^:", label="worst channel")
    ax.axhline(ADAPT_THRESHOLD, color="tab:orange", lw=1, ls="--", label="adapt from")
    ax.axhline(TRAIN_THRESHOLD, color="tab:red", lw=1, ls="--", label="train BN from")
    ax.set_yscale("log")
    ax.set_xlabel("BN layer (input side first)")
    ax.set_ylabel("KL(data || stored), nats")
    ax.set_title(title or f"BN input shift: model {report.score:.3f} -> {report.recommendation}")
    ax.legend(fontsize="small", loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    plt.close(fig)
    return out
