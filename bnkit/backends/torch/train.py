"""PyTorch training for `compare`: new heads, guarded training runs and frozen-prefix caching.

A run trains the way a PyTorch user's loop does (`model.train()`, an optimizer over the
parameters that require grad, one step per batch), so pinned BN modes, `requires_grad`
and `train()` interact exactly as they would in the user's own code.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from bnkit.backends.base import batch_slices, sample_order
from bnkit.backends.torch.deploy import (
    _BNLeafTracer,
    _eval_mode,
    _set_child,
    identity_at_inference,
)
from bnkit.backends.torch.exported import refuse_exported
from bnkit.backends.torch.modules import BN, as_input, call, is_pinned, observers_held, walk
from bnkit.errors import BnkitError
from bnkit.policy import Mode
from bnkit.records import Diverged, EpochLog, Split

HEAD_DROPOUT = 0.2
HEAD_SEED = 0
EVAL_BATCH = 256
SGD_MOMENTUM = 0.9
PROBABILITY_FLOOR = 1e-7
RANDOM_FUNCTIONS = ("dropout", "rand", "bernoulli", "normal", "multinomial")
"""call_function targets whose name holds one of these are random in training."""


# ---------------------------------------------------------------------- heads


class _Headed:
    """Mixin of a model with a new top: the original forward, then `bnkit_head`."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        body: Any = _BODY[type(self)]
        return self.bnkit_head(body.forward(self, *args, **kwargs))  # type: ignore[attr-defined]


_BODY: dict[type, type] = {}
_HEADED: dict[type, type] = {}


def _headed_class(cls: type) -> type:
    if cls not in _HEADED:
        made = type(f"{cls.__name__}WithHead", (_Headed, cls), {"__module__": __name__})
        _HEADED[cls] = made
        _BODY[made] = cls
    return _HEADED[cls]


def with_head(
    model: Any, num_classes: int, head: Any | None, example: np.ndarray | None = None
) -> Any:
    """`model` with a new top when `head` is given or its output does not have
    `num_classes` units; the input model is not changed (the new model is a copy).

    Where the output is a feature map (N, C, H, W), the new top takes it: `head`, or
    global average pooling, dropout 0.2 and a Linear layer of `num_classes` logits. Where
    the output is (N, K), the last Linear module the forward calls is replaced by `head`,
    or by dropout 0.2 and a Linear layer with its input size; its path stays the same.
    The new layers are initialised from a fixed seed, so every sweep starts alike.
    """
    if example is None:
        raise BnkitError("internal: a PyTorch head needs an example batch")
    refuse_exported(model, "fine-tune")
    out, last_linear = _probe(model, example[:2])
    if head is None and out.dim() == 2 and out.shape[1] == num_classes:
        return model
    new = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(HEAD_SEED)
        if out.dim() == 4:
            top = head if head is not None else _pooled_head(out.shape[1], num_classes)
            if not isinstance(new, nn.Sequential):  # a Sequential calls every child itself
                new.__class__ = _headed_class(type(new))
            new.add_module("bnkit_head", top)
        elif out.dim() == 2 and last_linear is not None:
            old = new.get_submodule(last_linear)
            top = head if head is not None else _linear_head(old.in_features, num_classes)
            _set_child(new, last_linear, top)
        else:
            raise BnkitError(
                f"cannot place a new head on an output of shape {tuple(out.shape)}: bnkit "
                "replaces the last Linear layer or pools a (N, C, H, W) feature map; pass "
                "head= a module that maps the model's output to one logit per class"
            )
    _to_model_device(top, model)
    return new


def _probe(model: Any, x: np.ndarray) -> tuple[torch.Tensor, str | None]:
    """The model's output on `x` in inference mode, and the path of the last Linear
    module the forward called."""
    linears = {id(n.module): n.path for n in walk(model) if isinstance(n.module, nn.Linear)}
    called: list[str] = []
    handles = [
        m.register_forward_hook(lambda mod, a, o: called.append(linears[id(mod)]))
        for m in model.modules()
        if id(m) in linears
    ]
    try:
        with _eval_mode(model), torch.no_grad():
            out = call(model, x)
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, torch.Tensor):
        raise BnkitError(
            f"the model returns a {type(out).__name__}, not a tensor: compare needs a "
            "classifier whose forward returns one tensor"
        )
    return out, called[-1] if called else None


def _pooled_head(channels: int, num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(HEAD_DROPOUT),
        nn.Linear(channels, num_classes),
    )


def _linear_head(features: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Dropout(HEAD_DROPOUT), nn.Linear(features, num_classes))


def _to_model_device(module: nn.Module, model: Any) -> None:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    if p is not None:
        module.to(device=p.device, dtype=p.dtype)


def from_logits(model: Any) -> bool:
    """True unless the last module is a Softmax (a LogSoftmax output works as logits)."""
    leaves = [n.module for n in walk(model) if not n.children]
    return not (leaves and isinstance(leaves[-1], nn.Softmax))


# ---------------------------------------------------------------------- prefix caching


class _ByMode(nn.Module):
    """The trainable rest of a model, traced once in training and once in inference mode
    (code that reads `self.training` is fixed at trace time): calls the trace of the
    current mode. Both share the model's modules."""

    def __init__(self, training: nn.Module, inference: nn.Module) -> None:
        super().__init__()
        self.training_graph = training
        self.inference_graph = inference

    def forward(self, x: torch.Tensor) -> Any:
        return (self.training_graph if self.training else self.inference_graph)(x)


def frozen_prefix(model: Any, train_from: str | None) -> Split | None:
    """The split at the first call of module `train_from` (a path; a container means its
    first submodule called) when the model traces with torch.fx, everything before the cut
    is frozen, in inference mode and deterministic, and the rest depends on it only
    through the cut; None otherwise."""
    if train_from is None:
        return None
    halves = {}
    for training in (True, False):
        split = _split(model, train_from, training)
        if split is None:
            return None
        halves[training] = split
    prefix, suffix_train = halves[True]
    return Split(prefix, _ByMode(suffix_train, halves[False][1]))


@contextlib.contextmanager
def _mode(model: Any, training: bool) -> Iterator[None]:
    flags = [m.training for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for m, flag in zip(model.modules(), flags, strict=True):
            m.training = flag


def _split(model: Any, train_from: str, training: bool) -> tuple[Any, Any] | None:
    try:
        with _mode(model, training):
            graph = _BNLeafTracer().trace(model)
    except Exception:  # fx raises many types on untraceable code
        return None
    nodes = list(graph.nodes)
    start = next((i for i, n in enumerate(nodes) if _inside(n, train_from)), None)
    if start is None or len(nodes[start].all_input_nodes) != 1:
        return None
    cut = nodes[start].all_input_nodes[0]
    before, after = nodes[:start], nodes[start:]
    placeholders = [n for n in before if n.op == "placeholder"]
    if cut.op == "placeholder" or len(placeholders) != 1:
        return None
    early = set(before) - {cut}
    if any(a in early for n in after for a in n.all_input_nodes):
        return None
    if not all(_inert_node(model, n) for n in before):
        return None
    prefix_graph = torch.fx.Graph()
    env: dict[Any, Any] = {}
    for n in before:
        env[n] = prefix_graph.node_copy(n, lambda a: env[a])
    prefix_graph.output(env[cut])
    suffix_graph = torch.fx.Graph()
    env2: dict[Any, Any] = {cut: suffix_graph.placeholder("features")}
    for n in after:
        env2[n] = suffix_graph.node_copy(n, lambda a: env2[a])
    return torch.fx.GraphModule(model, prefix_graph), torch.fx.GraphModule(model, suffix_graph)


def _inside(node: Any, path: str) -> bool:
    target = str(node.target)
    return node.op == "call_module" and (target == path or target.startswith(path + "."))


def _inert_node(model: Any, node: Any) -> bool:
    """A node that computes the same in training as in inference and trains nothing."""
    if node.op == "call_module":
        return _inert(model.get_submodule(str(node.target)))
    if node.op == "get_attr":
        value = _attr(model, str(node.target))
        return not (isinstance(value, torch.Tensor) and value.requires_grad)
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target)).lower()
        return not any(word in name for word in RANDOM_FUNCTIONS)
    return True


def _attr(model: Any, target: str) -> Any:
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _inert(module: Any) -> bool:
    if any(p.requires_grad for p in module.parameters()):
        return False
    if any(identity_at_inference(m) for m in module.modules()):
        return False
    for m in module.modules():
        if isinstance(m, BN) and not (is_pinned(m) and m._bnkit_mode != Mode.TRAIN.value):
            return False  # a plain BN normalises with batch statistics in training
    return True


def fingerprint(model: Any) -> str:
    """A digest of every parameter and buffer: equal digests, equal computations."""
    digest = hashlib.blake2b(digest_size=16)
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(value.detach().cpu().numpy()).tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------- copies


@contextlib.contextmanager
def working_copy(model: Any) -> Iterator[Any]:
    """A deep copy of `model` (pinned BN modes kept), in memory."""
    yield copy.deepcopy(model)


def packed(model: Any) -> Any:
    """`model` in a form another process can receive (Ray pickles modules, as torch.save
    does); `unpacked` turns it back into a module there."""
    return model


def unpacked(value: Any) -> Any:
    """The module `packed` sent."""
    return value


def worker_env() -> dict[str, str]:
    """Nothing: a module unpickles in any process with torch."""
    return {}


def save_state(model: Any) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer (not the optimizer's: each run makes one)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def restore_state(model: Any, state: dict[str, torch.Tensor]) -> None:
    """Puts back what `save_state` copied."""
    model.load_state_dict(state)


def predict(model: Any, x: np.ndarray, batch_size: int = EVAL_BATCH) -> np.ndarray:
    """Inference-mode outputs as a NumPy array (quantization observers held)."""
    outs = []
    with _eval_mode(model), torch.no_grad(), observers_held(model):
        for i in range(0, len(x), batch_size):
            outs.append(call(model, x[i : i + batch_size]).float().cpu().numpy())
    return np.concatenate(outs)


# ---------------------------------------------------------------------- guarded runs


Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class TorchTrainer:
    """The Trainer capability for PyTorch modules (see `bnkit.backends.base.Trainer`).

    `prepare` makes the optimizer of one run; the trainer keeps it until the next.
    """

    with_head = staticmethod(with_head)
    from_logits = staticmethod(from_logits)
    working_copy = staticmethod(working_copy)
    packed = staticmethod(packed)
    unpacked = staticmethod(unpacked)
    worker_env = staticmethod(worker_env)
    save_state = staticmethod(save_state)
    restore_state = staticmethod(restore_state)
    frozen_prefix = staticmethod(frozen_prefix)
    fingerprint = staticmethod(fingerprint)
    predict = staticmethod(predict)

    def __init__(self) -> None:
        self._optimizer: Any = None
        self._prepared = False
        self._loss: Loss = F.cross_entropy

    def prepare(
        self, model: Any, lr: float, logits: bool, optimizer: str = "adam", loss: Any = None
    ) -> None:
        """A fresh optimizer (Adam, or SGD with momentum 0.9) over the parameters that
        require grad, and the loss: `loss(outputs, labels)`, else cross-entropy on logits
        or on the log of probabilities."""
        params = [p for p in model.parameters() if p.requires_grad]
        self._prepared = True
        if not params:  # nothing to train: the steps still run, as in the user's loop
            self._optimizer = None
        elif optimizer == "sgd":
            self._optimizer = torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM)
        else:
            self._optimizer = torch.optim.Adam(params, lr=lr)
        if loss is not None:
            self._loss = loss
        elif logits:
            self._loss = F.cross_entropy
        else:
            self._loss = _probability_loss

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
        """Trains `model` in the seed's data order with `model.train()` and the prepared
        optimizer, evaluating after each epoch. A non-finite loss or weight stops the
        run: the weights that the last fully finite step started from are restored, and
        the step and the first module (named as in `paths_from`) whose output was
        non-finite on that batch are returned."""
        if not self._prepared:
            raise BnkitError("internal: prepare() was not called before guarded_fit()")
        torch.manual_seed(seed)  # dropout in the trained part
        tensors = _state_tensors(model)
        # the weights the next step starts from, and those the last finite step started from
        rolling = [[t.detach().clone() for t in tensors] for _ in range(2)]
        labels = torch.as_tensor(y, dtype=torch.long)
        with _mode(model, True):
            for epoch in range(epochs):
                start = time.perf_counter()
                model.train()
                loss_sum = hits = 0.0
                order = sample_order(len(x), seed, epoch)
                for step, b in enumerate(batch_slices(order, batch_size)):
                    loss, right = self._step(model, as_input(model, x[b]), labels[b])
                    if not np.isfinite(loss) or not _all_finite(tensors):
                        layer = first_nonfinite_module(paths_from, model, x[b])
                        _copy_into(tensors, rolling[1])
                        return Diverged(epoch, step, loss, layer)
                    rolling.reverse()  # what this step started from is now the last finite
                    _copy_into(rolling[0], tensors)
                    loss_sum += loss * len(b)
                    hits += right
                    if on_step is not None:
                        on_step()
                val_loss, val_acc = self.evaluate(model, *val)
                log = EpochLog(
                    epoch, loss_sum / len(x), hits / len(x), val_loss, val_acc,
                    time.perf_counter() - start,
                )  # fmt: skip
                if on_epoch is not None:
                    on_epoch(log)
        return None

    def _step(self, model: Any, xb: torch.Tensor, yb: torch.Tensor) -> tuple[float, int]:
        yb = yb.to(xb.device)
        if self._optimizer is None:
            with torch.no_grad():
                out = model(xb)
                return float(self._loss(out, yb)), int((out.argmax(dim=1) == yb).sum())
        self._optimizer.zero_grad(set_to_none=True)
        out = model(xb)
        loss = self._loss(out, yb)
        value = float(loss.detach())
        if np.isfinite(value):
            loss.backward()
            self._optimizer.step()
        return value, int((out.detach().argmax(dim=1) == yb).sum())

    def evaluate(self, model: Any, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """Loss and accuracy in inference mode."""
        labels = torch.as_tensor(y, dtype=torch.long)
        loss_sum = hits = 0.0
        with _eval_mode(model), torch.no_grad():
            for i in range(0, len(x), EVAL_BATCH):
                out = call(model, x[i : i + EVAL_BATCH])
                yb = labels[i : i + EVAL_BATCH].to(out.device)
                loss_sum += float(self._loss(out, yb)) * len(yb)
                hits += int((out.argmax(dim=1) == yb).sum())
        return loss_sum / len(x), hits / len(x)


def _probability_loss(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.nll_loss(torch.log(probs.clamp_min(PROBABILITY_FLOOR)), labels)


def _state_tensors(model: Any) -> list[torch.Tensor]:
    """Every floating parameter and buffer, as the live tensors."""
    seen: set[int] = set()
    out = []
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point() and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _copy_into(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for t, s in zip(targets, sources, strict=True):
            t.copy_(s)


def first_nonfinite_module(paths_from: Any, model: Any, x: np.ndarray) -> str | None:
    """Runs `x` through `model` in training mode and names the first leaf module (its
    path in `paths_from`) whose output holds NaN or inf; None when every output is
    finite."""
    paths = {id(n.module): n.path for n in walk(paths_from) if not n.children}
    found: list[str] = []

    def check(module: Any, args: Any, out: Any) -> None:
        tensors = out if isinstance(out, list | tuple) else [out]
        if not found and any(
            isinstance(t, torch.Tensor) and not bool(torch.isfinite(t).all()) for t in tensors
        ):
            found.append(paths[id(module)])

    handles = [m.register_forward_hook(check) for m in model.modules() if id(m) in paths]
    try:
        with _mode(model, True), torch.no_grad(), contextlib.suppress(Exception):
            call(model, x)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None
