"""Small real PyTorch modules and the plain training loop PyTorch users write."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class Net(nn.Module):
    """A residual CNN: conv-BN-ReLU stem, a conv-BN block added to it, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()
        )
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.head(x.mean(dim=(2, 3)))


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def batch(seed: int = 0, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g) * 2 + 1, torch.randint(0, 3, (n,), generator=g)


def train_steps(model: nn.Module, steps: int = 3, n: int = 8) -> None:
    """The usual loop: model.train(), an optimizer over what requires grad."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1) if params else None
    model.train()
    for k in range(steps):
        x, y = batch(k, n)
        out = model(x)
        if opt is not None:
            opt.zero_grad()
            nn.functional.cross_entropy(out, y).backward()
            opt.step()


def state(module: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def moved(before: dict[str, np.ndarray], after: dict[str, np.ndarray], key: str) -> bool:
    return not np.array_equal(before[key], after[key])


def randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics and gamma/beta, so folding measures something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.2)
