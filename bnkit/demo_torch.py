"""The demo's PyTorch set-ups: the residual CNN of the embedded digits story and the
torchvision ResNet-50 set-ups of the traps table, each done the way PyTorch users, guides,
Lightning and timm do it. Same function names as `bnkit.demo_keras`."""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from bnkit.backends.torch.deploy import _eval_mode
from bnkit.backends.torch.loading import load_weights
from bnkit.backends.torch.modules import BN, as_input
from bnkit.policy import Mode

WIDTHS = (16, 32, 64)
MODEL_SUFFIX = ".pt"
TRAPS_TITLE = "torchvision ResNet-50"
TRAPS_LR = 0.05


# ---------------------------------------------------------------------- the digits model


class _ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(cout),
        )


class _Block(nn.Module):
    """Two conv-BN layers added to the input (projected when the shape changes)."""

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _ConvBN(cin, width, 3, stride)
        self.conv2 = _ConvBN(width, width, 3, 1)
        self.proj = _ConvBN(cin, width, 1, stride) if stride != 1 or cin != width else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        return F.relu(y + (self.proj(x) if self.proj is not None else x))


class DigitsResNet(nn.Module):
    """The Keras demo's residual CNN in PyTorch: a `backbone` (stem and three residual
    blocks, 9 BN layers), global average pooling and a `classifier` Linear layer."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [_ConvBN(3, WIDTHS[0], 3, 1), nn.ReLU()]
        cin = WIDTHS[0]
        for k, width in enumerate(WIDTHS):
            layers.append(_Block(cin, width, 1 if k == 0 else 2))
            cin = width
        self.backbone = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x).mean(dim=(2, 3)))


def digits_resnet(input_size: int = 32, num_classes: int = 10) -> nn.Module:
    """The residual CNN (any input size: it pools globally)."""
    return DigitsResNet(num_classes)


def images(x: np.ndarray) -> np.ndarray:
    """The demo's (N, H, W, C) images as PyTorch takes them: (N, C, H, W)."""
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if x.ndim == 4 else x


def train_classifier(
    model: nn.Module, x: Any, y: Any, *, epochs: int, batch_size: int, seed: int, lr: float
) -> None:
    """The plain loop: `model.train()`, Adam, cross-entropy, a seeded shuffle per epoch."""
    seed_everything(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xt, yt = torch.as_tensor(images(x)), torch.as_tensor(y, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), batch_size):
            b = order[i : i + batch_size]
            if len(b) < 2:
                continue
            loss = F.cross_entropy(model(xt[b]), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()


def accuracy(model: nn.Module, x: Any, y: Any, batch_size: int = 256) -> float:
    """Top-1 accuracy in inference mode (`model.train()` flags put back afterwards)."""
    x = images(x)
    hits = 0
    with _eval_mode(model), torch.no_grad():
        for i in range(0, len(x), batch_size):
            out = model(as_input(model, x[i : i + batch_size]))
            hits += int((out.argmax(1).numpy() == y[i : i + batch_size]).sum())
    return hits / len(x)


def clone(model: nn.Module) -> nn.Module:
    """A deep copy (its own weights and statistics)."""
    return copy.deepcopy(model)


def seed_everything(seed: int) -> None:
    """Seeds NumPy and torch."""
    np.random.seed(seed)
    torch.manual_seed(seed)


def version() -> str:
    """torch's version, as reports name it."""
    return f"torch {torch.__version__}"


def backend_name() -> str:
    """The cache key of the framework."""
    return "pytorch"


def load(path: Any) -> nn.Module:
    """The residual CNN with the weights of `path` (read with `weights_only=True`)."""
    model = DigitsResNet()
    load_weights(model, Path(path), "the cached digits model")
    return model


# ---------------------------------------------------------------------- the traps table


def traps_model(input_size: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """torchvision `resnet50(weights=None)` with a new `fc` of `num_classes`; watched
    whole."""
    from torchvision.models import resnet50

    model = resnet50(weights=None)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model, model


def get_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every weight and statistic."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def set_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Puts back what `get_state` copied."""
    model.load_state_dict(state)


def fit_once(model: nn.Module, x: Any, y: Any, batch_size: int) -> None:
    """The user's loop over (N, C, H, W) data once, in order: `model.train()`, SGD over
    what requires grad."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=TRAPS_LR) if params else None
    xt, yt = torch.as_tensor(x), torch.as_tensor(y, dtype=torch.long)
    model.train()
    for i in range(0, len(xt), batch_size):
        loss = F.cross_entropy(model(xt[i : i + batch_size]), yt[i : i + batch_size])
        if opt is not None:
            opt.zero_grad()
            loss.backward()
            opt.step()


def _bns(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, BN)]


def _backbone(model: nn.Module) -> list[nn.Module]:
    return [m for name, m in model.named_children() if name != "fc"]


def _bn_requires_grad_off(model: nn.Module) -> int:
    for bn in _bns(model):
        for p in bn.parameters():
            p.requires_grad_(False)
    return len(_bns(model))


def _bn_eval_then_train(model: nn.Module) -> int:
    for bn in _bns(model):
        bn.eval()
    model.train()
    return len(_bns(model))


def _backbone_requires_grad_off(model: nn.Module) -> int:
    for part in _backbone(model):
        for p in part.parameters():
            p.requires_grad_(False)
    return len(_bns(model))


def _lightning_freeze(model: nn.Module) -> int:
    from lightning.pytorch.callbacks import BaseFinetuning

    BaseFinetuning.freeze(_backbone(model), train_bn=False)
    return len(_bns(model))


def _timm_freeze(model: nn.Module) -> int:
    from timm.utils.model import freeze

    n = len(_bns(model))
    freeze(model, [name for name, _ in model.named_children() if name != "fc"])
    return n


def _peft_lora(model: nn.Module) -> int:
    """PEFT's LoRA on every 3x3 convolution, as its image-classification guides set it
    up: the base frozen by requires_grad=False (the model is changed in place)."""
    import peft

    peft.get_peft_model(model, peft.LoraConfig(target_modules=["conv2"], r=4))
    return 0


def _torchvision_frozen_bn(model: nn.Module) -> int:
    """Every BatchNorm2d swapped for torchvision's FrozenBatchNorm2d holding its weights,
    as building with `norm_layer=FrozenBatchNorm2d` and loading the weights does."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(frozen, key).copy_(getattr(child, key).detach())
                setattr(parent, name, frozen)
                swapped += 1
    return swapped


def trap_approaches() -> list[tuple[str, Callable[[Any], int]]]:
    """The ways PyTorch users, guides, Lightning, timm, PEFT and torchvision freeze BN,
    each returning how many BN layers its code touched. Lightning's, timm's and PEFT's
    rows need those packages."""
    rows: list[tuple[str, Callable[[Any], int]]] = [
        ("requires_grad=False on every BN", _bn_requires_grad_off),
        ("bn.eval() on every BN, then model.train()", _bn_eval_then_train),
        ("requires_grad=False on the backbone", _backbone_requires_grad_off),
    ]
    if importlib.util.find_spec("lightning") is not None:
        rows.append(
            ("Lightning BaseFinetuning.freeze(backbone, train_bn=False)", _lightning_freeze)
        )
    if importlib.util.find_spec("timm") is not None:
        rows.append(("timm.utils.freeze(backbone)", _timm_freeze))
    if importlib.util.find_spec("peft") is not None:
        rows.append(("peft.get_peft_model(model, LoraConfig(...))", _peft_lora))
    rows.append(("torchvision FrozenBatchNorm2d in place of BN", _torchvision_frozen_bn))
    return rows


def bnkit_label(mode: Mode) -> str:
    """The traps table's label of a bnkit row."""
    return f"bnkit.freeze(bn='{mode.value}'), then model.train()"


def reenable(model: nn.Module) -> None:
    """What the framework's own code does next: `model.train()`."""
    model.train()
