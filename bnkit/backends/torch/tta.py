"""PyTorch test-time adaptation: TENT's entropy step on BN gamma/beta, with every other
module in inference mode and every BN normalising with the batch's statistics."""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch

from bnkit.backends.torch.exported import refuse_exported
from bnkit.backends.torch.modules import BN, as_input, walk
from bnkit.backends.torch.train import from_logits, predict, restore_state, save_state

ADAM_BETAS = (0.9, 0.999)
SGD_MOMENTUM = 0.9
LAYOUT_TRIALS = 4
"""TENT's first steps on image batches on a CPU alternate two memory layouts: the batch
channels-last, then as given (the first of each warms oneDNN up), and the steps after
take the faster of the second pair. The values are the same to float rounding; the
time is not: channels-last steps cost 2.4 against 3.1 inference passes on the demo's
CNN, but more than the given layout on resnet18 at 32x32 (benchmarks/README.md)."""


class TorchTestTime:
    """The TestTimeAdapter capability for PyTorch modules (see `backends.base`)."""

    def __init__(self) -> None:
        self.traced = False  # eager: a batch of any size costs no trace
        self._optimizer: Any = None
        self._logits = True
        self._flags: list[tuple[Any, bool]] = []
        self._grads: list[tuple[Any, bool]] = []
        self._channels_last: bool | None = None  # None while the layouts are on trial
        self._trials: list[float] = []  # the seconds of the steps on trial

    def prepare(self, model: Any, lr: float, optimizer: str) -> None:
        """Only BN weight and bias require grad (the rest as they were is remembered);
        `forward` then runs BN on batch statistics, everything else in inference."""
        refuse_exported(model, "adapt")
        self._grads = [(p, p.requires_grad) for p in model.parameters()]
        self._flags = [(m, m.training) for m in model.modules()]
        self._channels_last, self._trials = None, []
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
        inputs = as_input(model, x)
        cpu = inputs.dim() == 4 and inputs.device.type == "cpu"  # timed: no async device
        trying = self._channels_last is None and len(self._trials) % 2 == 0  # its turn
        last = cpu and (self._channels_last is True or trying)
        t = time.perf_counter()
        out = self._forward(model, inputs, last)
        if self._optimizer is not None:
            loss = entropy(out, self._logits).mean()
            self._optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._optimizer.step()
        if self._channels_last is None and cpu:
            self._trials.append(time.perf_counter() - t)
            if len(self._trials) == LAYOUT_TRIALS:  # the later pair: past the warm-up
                self._channels_last = self._trials[-2] < self._trials[-1]
        return out.detach().float().cpu().numpy()

    def _forward(self, model: Any, inputs: torch.Tensor, last: bool) -> torch.Tensor:
        """The step's forward, channels-last where `last`. A model that cannot take that
        layout (a `view` that flattens a feature map) fails on its first try; its BN
        buffers are put back and it runs as given from then on."""
        if not last:
            return model(inputs)
        inputs_last = inputs.contiguous(memory_format=torch.channels_last)
        if self._channels_last or self._trials:  # it ran channels-last before
            return model(inputs_last)
        with torch.no_grad():
            kept = [(b, b.clone()) for m in model.modules() if isinstance(m, BN)
                    for b in m.buffers(recurse=False)]  # fmt: skip
        try:
            return model(inputs_last)
        except RuntimeError:
            with torch.no_grad():
                for b, value in kept:
                    b.copy_(value)
            self._channels_last = False
            return model(inputs)

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
        """True when every BN weight and bias is finite: one test per device of all of
        them together (it runs after every TENT step)."""
        held: dict[torch.device, list[torch.Tensor]] = {}
        for m in model.modules():
            if isinstance(m, BN):
                for p in m.parameters(recurse=False):
                    held.setdefault(p.device, []).append(p.detach().reshape(-1))
        return all(bool(torch.isfinite(torch.cat(ps)).all()) for ps in held.values())


def entropy(out: torch.Tensor, logits: bool) -> torch.Tensor:
    """The Shannon entropy of each row's predicted distribution."""
    if logits:
        return -(out.softmax(1) * out.log_softmax(1)).sum(1)
    p = out.clamp_min(1e-7)
    return -(p * p.log()).sum(1)
