"""`inspect`: what every layer of a model will really do during training.

Layer records come from the backend; this module totals and renders them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.table import Table

from bnkit.records import CompileStatus, LayerRecord


@dataclass(frozen=True)
class Report:
    """The result of `inspect`: every layer and the totals."""

    model_name: str
    backend: str
    layers: tuple[LayerRecord, ...]
    compile: CompileStatus = field(default_factory=lambda: CompileStatus(compiled=False))

    @property
    def bn_layers(self) -> tuple[LayerRecord, ...]:
        """The BN layers."""
        return tuple(r for r in self.layers if r.is_bn)

    def leaves(self) -> tuple[LayerRecord, ...]:
        """Layers that are not containers of other layers."""
        return tuple(r for r in self.layers if not r.is_container)

    def bn_counts(self) -> dict[str, int]:
        """Number of BN layers per effective mode."""
        counts: dict[str, int] = {}
        for r in self.bn_layers:
            key = r.bn_mode or "custom"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def totals(self) -> dict[str, Any]:
        """Layer, BN and parameter counts."""
        leaves = self.leaves()
        return {
            "layers": len(leaves),
            "containers": len(self.layers) - len(leaves),
            "bn_layers": len(self.bn_layers),
            "bn_modes": self.bn_counts(),
            "trainable_layers": sum(r.effective_trainable for r in leaves),
            "trainable_params": sum(r.trainable_params for r in self.layers),
            "non_trainable_params": sum(r.non_trainable_params for r in self.layers),
        }

    def notes(self) -> tuple[str, ...]:
        """Every pitfall found, with the layers it concerns (grouped when many share it)."""
        where: dict[str, list[str]] = {}
        for r in self.layers:
            for n in r.notes:
                where.setdefault(n.text, []).append(r.path)
        found = [f"{_paths(paths)}: {n}" for n, paths in where.items()]
        msg = self.compile.message()
        return tuple(([msg] if msg else []) + found)

    def to_json(self) -> str:
        """The report as a JSON document."""
        return json.dumps(
            {
                "model": self.model_name,
                "backend": self.backend,
                "totals": self.totals(),
                "compile": {**asdict(self.compile), "stale": self.compile.stale},
                "notes": list(self.notes()),
                "layers": [asdict(r) for r in self.layers],
            },
            indent=2,
        )

    def table(self, bn_only: bool = False) -> Table:
        """A rich table of the layers (only BN layers with `bn_only`)."""
        t = Table(title=f"{self.model_name} ({self.backend})", show_lines=False)
        t.add_column("#", justify="right")
        t.add_column("path", no_wrap=True)
        for col in ("class", "trainable", "params train/fixed", "BN mode", "note"):
            t.add_column(col, no_wrap=True)
        rows = self.bn_layers if bn_only else self.layers
        for i, r in enumerate(rows):
            t.add_row(
                str(i),
                r.path + ("/" if r.is_container else ""),
                r.class_name,
                _trainable_cell(r),
                f"{r.trainable_params:,}/{r.non_trainable_params:,}",
                r.bn_mode or "",
                "!" if r.notes else "",
            )
        return t

    def summary(self) -> str:
        """The totals and notes as plain text."""
        t = self.totals()
        modes = ", ".join(f"{k} {v}" for k, v in sorted(t["bn_modes"].items())) or "none"
        lines = [
            f"{t['layers']} layers ({t['containers']} nested models), "
            f"{t['trainable_layers']} trainable; {t['bn_layers']} BN layers: {modes}",
            f"parameters: {t['trainable_params']:,} trainable, "
            f"{t['non_trainable_params']:,} non-trainable",
        ]
        lines += [f"note: {n}" for n in self.notes()]
        return "\n".join(lines)

    def __rich__(self) -> Table:
        return self.table()

    def __str__(self) -> str:
        head = f"{self.model_name} ({self.backend})"
        rows = [
            f"  {r.path:<40} {r.class_name:<22} {_trainable_cell(r):<8} {r.bn_mode or ''}"
            for r in self.layers
        ]
        return "\n".join([head, *rows, self.summary()])


def _paths(paths: list[str]) -> str:
    if len(paths) <= 3:
        return ", ".join(paths)
    return f"{len(paths)} layers ({paths[0]}, ..., {paths[-1]})"


def _trainable_cell(r: LayerRecord) -> str:
    if r.trainable == r.effective_trainable:
        return "yes" if r.trainable else "no"
    return "no (parent)" if r.trainable else "yes?"


def inspect(model: Any) -> Report:
    """Reports every layer's trainability and each BN layer's effective mode during `fit`.

    Recurses into nested models. The BN mode is what Keras will really do,
    including the cases where the code seems to say otherwise (a base model
    called with `training=False` and then unfrozen trains its BN); for a PyTorch
    module, what it does after `model.train()`.

    Args:
        model: a Keras model or a PyTorch module (or a `torch.export` program).

    Returns:
        A `Report`: one `LayerRecord` per layer, containers included, with the notes
        (pitfalls) found on each.

    Examples:
        >>> import keras, bnkit
        >>> base = keras.applications.ResNet50V2(weights=None, include_top=False,
        ...                                      input_shape=(32, 32, 3))
        >>> bnkit.inspect(base).totals()["bn_layers"]
        49
        >>> import torchvision
        >>> bnkit.inspect(torchvision.models.resnet18(weights=None)).totals()["bn_layers"]
        20
    """
    from bnkit.backends import get_backend, readable

    model = readable(model)
    backend = get_backend(model)
    return Report(
        model_name=str(getattr(model, "name", type(model).__name__)),
        backend=backend.name,
        layers=tuple(backend.records(model)),
        compile=backend.compile_status(model),
    )
