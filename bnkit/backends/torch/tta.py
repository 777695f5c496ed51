"""PyTorch test-time adaptation: TENT's entropy step on BN gamma/beta, with every other
module in inference mode and every BN normalising with the batch's statistics."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from bnkit.backends.torch.exported import refuse_exported
from bnkit.backends.torch.modules import BN, as_input, walk
from bnkit.backends.torch.train import from_logits, predict, restore_state, save_state

ADAM_BETAS = (0.9, 0.999)
SGD_MOMENTUM = 0.9


class TorchTestTime:
    """The TestTimeAdapter capability for PyTorch modules (see `backends.base`)."""

    def __init__(self) -> None:
        self.traced = False  # eager: a batch of any size costs no trace
        self._optimizer: Any = None
        self._logits = True
        self._flags: list[tuple[Any, bool]] = []
        self._grads: list[tuple[Any, bool]] = []

    def prepare(self, model: Any, lr: float, optimizer: str) -> None:
        """Only BN weight and bias require grad (the rest as they were is remembered);
        `forward` then runs BN on batch statistics, everything else in inference."""
        refuse_exported(model, "adapt")
        self._grads = [(p, p.requires_grad) for p in model.parameters()]
        self._flags = [(m, m.training) for m in model.modules()]
        for p in model.parameters():
            p.requires_grad_(False)
        params = []
        for node in walk(model):
            if isinstance(node.module, BN):
                for p in node.module.parameters(recurse=False):
                    p.requires_grad_(True)
                    params.append(p)
        self._logits = from_logits(model)
        if not params:
            self._optimizer = None
        elif optimizer == "sgd":
            self._optimizer = torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM)
        else:
            self._optimizer = torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS)

    def step(self, model: Any, x: np.ndarray) -> np.ndarray:
        """One entropy-minimisation step on `x`; returns that forward's outputs (the
        predictions made before the update, as TENT does)."""
        model.eval()
        for m in model.modules():
            if isinstance(m, BN):
                m.train()
        out = model(as_input(model, x))
        if self._optimizer is not None:
            loss = entropy(out, self._logits).mean()
            self._optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._optimizer.step()
        return out.detach().float().cpu().numpy()

    def finish(self, model: Any) -> None:
        """Puts back the training flags and requires_grad of `prepare`."""
        for m, flag in self._flags:
            m.training = flag
        for p, flag in self._grads:
            p.requires_grad_(flag)

    predict = staticmethod(predict)
    save_state = staticmethod(save_state)

    def reference(self, model: Any) -> Any:
        """A copy of the start model, to compare predictions with."""
        return copy.deepcopy(model)

    def restore_state(self, model: Any, state: dict[str, torch.Tensor]) -> None:
        """Puts back `save_state`'s copy and starts the optimizer afresh."""
        restore_state(model, state)
        if self._optimizer is not None:
            self._optimizer.state.clear()

    def finite(self, model: Any) -> bool:
        """True when every BN weight and bias is finite."""
        return all(
            bool(torch.isfinite(p).all())
            for m in model.modules()
            if isinstance(m, BN)
            for p in m.parameters(recurse=False)
        )


def entropy(out: torch.Tensor, logits: bool) -> torch.Tensor:
    """The Shannon entropy of each row's predicted distribution."""
    if logits:
        return -(out.softmax(1) * out.log_softmax(1)).sum(1)
    p = out.clamp_min(1e-7)
    return -(p * p.log()).sum(1)
