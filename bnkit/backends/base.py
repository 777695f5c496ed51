"""The protocols every framework backend satisfies.

A backend turns a framework's model into plain records (`bnkit.records`) and applies
plans to it (`Backend`); it hands out the capabilities some features need: a `Trainer`
for `compare`, a `Deployer` for `check` and `export`. Feature modules are written
against these protocols only: a framework is a folder under `backends/` with the same
module names (`core`, `train`, `deploy`), and a capability it lacks raises
`BackendError` naming the capability.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bnkit.errors import BackendError
from bnkit.policy import LayerDecision, Mode
from bnkit.records import BNFacts, CompileStatus, Diverged, EpochLog, Folded, LayerRecord, Split

CHANNELS_LAST = "channels_last"
CHANNELS_FIRST = "channels_first"


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


class Trainer(Protocol):
    """What `compare` needs: heads, guarded training runs and frozen-prefix caching."""

    def with_head(
        self, model: Any, num_classes: int, head: Any | None, example: np.ndarray | None = None
    ) -> Any:
        """`model` with a new top when `head` is given or its output does not have
        `num_classes` units (the input model is not changed); `example` is an input batch
        for frameworks that learn output shapes by running the model."""
        ...

    def from_logits(self, model: Any) -> bool:
        """True unless the model ends in a softmax."""
        ...

    def working_copy(self, model: Any) -> AbstractContextManager[Any]:
        """While open, a copy of `model` with its own weights, to train runs on."""
        ...

    def packed(self, model: Any) -> Any:
        """`model` in a picklable form another process turns back with `unpacked`."""
        ...

    def unpacked(self, value: Any) -> Any:
        """The model `packed` sent."""
        ...

    def worker_env(self) -> dict[str, str]:
        """Environment variables another process needs to set before `unpacked`."""
        ...

    def save_state(self, model: Any) -> Any:
        """Every weight and statistic of `model`, to restore runs from."""
        ...

    def restore_state(self, model: Any, state: Any) -> None:
        """Puts back what `save_state` returned."""
        ...

    def prepare(
        self, model: Any, lr: float, logits: bool, optimizer: str = "adam", loss: Any = None
    ) -> None:
        """A fresh optimizer at `lr` (`adam`, or `sgd` with momentum 0.9) and the loss
        (`loss`, else sparse cross-entropy), for one run."""
        ...

    def frozen_prefix(self, model: Any, train_from: str | None) -> Split | None:
        """The split at `train_from` when everything before it is frozen, in inference
        mode and deterministic; None otherwise."""
        ...

    def fingerprint(self, model: Any) -> str:
        """A digest of every weight: equal digests, equal computations."""
        ...

    def predict(self, model: Any, x: np.ndarray) -> np.ndarray:
        """Inference-mode outputs."""
        ...

    def guarded_fit(
        self,
        model: Any,
        paths_from: Any,
        x: np.ndarray,
        y: np.ndarray,
        val: tuple[np.ndarray, np.ndarray],
        *,
        epochs: int,
        batch_size: int,
        seed: int,
        on_step: Callable[[], None] | None = None,
        on_epoch: Callable[[EpochLog], None] | None = None,
    ) -> Diverged | None:
        """Trains in the seed's data order; stops at the first non-finite loss or weight,
        restoring the last finite weights."""
        ...

    def evaluate(self, model: Any, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """Loss and accuracy in inference mode."""
        ...


class Deployer(Protocol):
    """What `check` and `export` need: graph facts, folding, outputs, and the formats."""

    formats: tuple[str, ...]
    """export formats, the first being the default."""

    def bn_facts(self, model: Any, example: np.ndarray | None = None) -> list[BNFacts]:
        """Facts about every BN layer (read from the graph, or from one pass on `example`
        where the framework keeps no graph)."""
        ...

    def norm_layers(self, model: Any) -> dict[str, int]:
        """How many layers of each other normalisation class the model has."""
        ...

    def inference_copy(
        self, model: Any, fold: bool = True, example: np.ndarray | None = None
    ) -> Folded:
        """A copy for deployment: BN folded where possible, the rest fixed in inference
        mode, dropout removed; `model` unchanged. `example` is an input batch."""
        ...

    def outputs(self, model: Any, x: np.ndarray, training: bool = False) -> np.ndarray:
        """The model's output on `x` as float64, in inference or in training mode."""
        ...

    def format_problem(self, format: str) -> str | None:
        """Why `format` cannot be written here, or None when it can."""
        ...

    def write(self, model: Any, path: Path, format: str, example: np.ndarray) -> None:
        """Writes the inference copy in `format` to `path` (a file, or a new folder)."""
        ...

    def run_written(self, path: Path, format: str, x: np.ndarray) -> np.ndarray:
        """Loads what `write` wrote, as a user without bnkit would, and runs it on `x`."""
        ...

    def source_differences(self, model: Any, source: Any) -> list[tuple[str, str]]:
        """(layer path, what differs) for each BN of `model` whose epsilon or momentum is
        not that of the BN of the same path in `source`, the model it was made from (a
        `torch.export` graph and its module, a converted or quantized copy)."""
        ...


class TestTimeAdapter(Protocol):
    """What `tta` needs: TENT's entropy step on BN gamma/beta and resets."""

    traced: bool
    """True where passes are compiled per batch shape (Keras on TensorFlow and JAX): a
    new batch size costs a trace."""

    def prepare(self, model: Any, lr: float, optimizer: str) -> None:
        """Only BN gamma/beta trainable; a fresh `adam` or `sgd` optimizer over them."""
        ...

    def step(self, model: Any, x: np.ndarray) -> np.ndarray:
        """One entropy step on `x` with BN on batch statistics and every other layer in
        inference mode; returns that forward's outputs (before the update)."""
        ...

    def finish(self, model: Any) -> None:
        """Puts back every flag `prepare` changed."""
        ...

    def predict(self, model: Any, x: np.ndarray) -> np.ndarray:
        """Inference-mode outputs."""
        ...

    def reference(self, model: Any) -> Any:
        """A copy of `model` with its own weights."""
        ...

    def save_state(self, model: Any) -> Any:
        """Every weight and statistic."""
        ...

    def restore_state(self, model: Any, state: Any) -> None:
        """Puts back `save_state`'s copy and resets the optimizer's state."""
        ...

    def finite(self, model: Any) -> bool:
        """True when every BN gamma and beta is finite."""
        ...


class Collective(Protocol):
    """The processes of a distributed job this one belongs to (one per rank), as far as
    `adapt` and `shift` need them: to combine each layer's moments exactly."""

    rank: int
    world: int

    def all_gather(self, values: np.ndarray) -> list[np.ndarray]:
        """Every rank's `values` (a float64 vector of the same length on every rank),
        in rank order; every rank must call it."""
        ...


class Backend(Protocol):
    """What every framework adapter provides."""

    name: str
    layout: str
    """how image batches are laid out: CHANNELS_LAST or CHANNELS_FIRST."""
    model_suffix: str
    """the suffix of the model files the command line writes."""

    def records(self, model: Any) -> list[LayerRecord]:
        """Every layer, containers included, in topological order, with its effective state."""
        ...

    def bn_paths(self, model: Any) -> list[str]:
        """The paths of the BN layers among `records`' leaves, in the same order: what the
        `bn` selector picks, found without building the records."""
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

    def snapshot(self, model: Any, weights_too: bool = True) -> Snapshot:
        """Copies every running statistic and (unless `weights_too` is False, when only
        the statistics are wanted) every trainable weight."""
        ...

    def bn_stats(self, model: Any, paths: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
        """Copies the running statistics (`mean`, `var`) of the BN layers at `paths`."""
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

    def trainer(self) -> Trainer:
        """The training capability (`compare`); BackendError when the backend lacks it."""
        ...

    def deployer(self) -> Deployer:
        """The deployment capability (`check`, `export`); BackendError when lacking."""
        ...

    def test_time(self) -> TestTimeAdapter:
        """The test-time adaptation capability (`tta`); BackendError when lacking."""
        ...

    def collective(self) -> Collective | None:
        """The distributed job this process is one rank of (None: it runs alone)."""
        ...

    def launched_job(
        self, world: int, on_wait: Callable[[str], None] | None = None
    ) -> AbstractContextManager[tuple[int, int]]:
        """While open, this process is one rank of the job a launcher (torchrun) started
        with `world` processes, its process group joined: yields (rank, world).
        `on_wait` gets one line before the wait for the other ranks (how long at most).
        BackendError when this framework's models are not combined across processes."""
        ...


def sample_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one training epoch: fixed by the seed, the same for every
    strategy and every backend."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_slices(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """The batches of one epoch in `order`; a last batch of one sample joins the one
    before it (BN cannot compute a variance from one value per channel)."""
    slices = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if len(slices) > 1 and len(slices[-1]) == 1:
        slices[-2:] = [np.concatenate(slices[-2:])]
    return slices


def missing(capability: str, feature: str, backend: str) -> BackendError:
    """The error for a capability a backend does not have."""
    return BackendError(
        f"{feature} needs the {capability!r} capability, which the {backend} backend does "
        "not provide"
    )
