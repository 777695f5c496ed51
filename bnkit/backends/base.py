"""The Backend protocol: the few operations bnkit needs from a framework.

A backend turns a framework's model into plain records and applies plans to
it. Everything else in bnkit is written against this protocol, so adding a
framework means adding one module here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bnkit.policy import LayerDecision, Mode
from bnkit.report import CompileStatus, LayerRecord


@dataclass(frozen=True)
class Snapshot:
    """Copies of every weight, keyed by layer path then weight name.

    `stats` holds each BN layer's running statistics under the keys `mean` and
    `var`; `weights` holds everything else (gamma and beta included).
    """

    weights: dict[str, dict[str, np.ndarray]]
    stats: dict[str, dict[str, np.ndarray]]


MomentPass = Callable[[np.ndarray], dict[str, tuple[np.ndarray, np.ndarray, int]]]
"""Runs one batch; returns, per layer path, the per-channel mean and population variance
of that BN layer's input and the number of values per channel."""


class Backend(Protocol):
    """What every framework adapter provides."""

    name: str

    def records(self, model: Any) -> list[LayerRecord]:
        """Every layer, containers included, in topological order, with its effective state."""
        ...

    def compile_status(self, model: Any) -> CompileStatus:
        """Whether the model is compiled, and whether its compiled state is stale."""
        ...

    def apply(self, model: Any, decisions: Sequence[LayerDecision]) -> None:
        """Sets trainable flags and pins BN modes as `decisions` (one per leaf layer) say."""
        ...

    def set_bn_mode(self, layer: Any, mode: Mode) -> None:
        """Pins one BN layer to `mode`."""
        ...

    def unfreeze(self, model: Any) -> int:
        """Undoes every pin bnkit made; returns how many BN layers were released."""
        ...

    def recompile(self, model: Any) -> None:
        """Recompiles with the same loss and metrics and a fresh optimizer of the same config."""
        ...

    def snapshot(self, model: Any) -> Snapshot:
        """Copies every weight and running statistic."""
        ...

    def set_bn_stats(self, model: Any, stats: dict[str, dict[str, np.ndarray]]) -> None:
        """Writes running statistics (`mean`, `var`) into the BN layers at the given paths."""
        ...

    def moments_pass(
        self, model: Any, paths: Sequence[str], *, normalize: str
    ) -> AbstractContextManager[MomentPass]:
        """While open, gives a function that runs one batch through the model in inference
        mode and returns the input moments of each listed BN layer. With `normalize="batch"`
        those layers normalise with the batch moments (as in re-estimation); with
        `"running"` the model computes exactly what it computes in inference."""
        ...

    def input_shape(self, model: Any) -> tuple[int | None, ...] | None:
        """The shape of one input sample, None entries for free dimensions; None when the
        model has no single fixed input."""
        ...

    def forward(self, model: Any, x: np.ndarray) -> None:
        """Runs the model on one batch in inference mode, discarding the output."""
        ...

    def load(self, path: Path) -> Any:
        """Loads a model file; raises ModelFileError when it cannot."""
        ...

    def save(self, model: Any, path: Path) -> None:
        """Saves a model to `path` (the caller makes it atomic)."""
        ...
