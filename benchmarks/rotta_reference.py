"""RoTTA (Yuan et al., CVPR 2023) written out from its published code (BIT-DA/RoTTA:
core/adapter/rotta.py, core/utils/bn_layers.py, core/utils/memory.py,
core/utils/custom_transforms.py, configs/adapter/rotta.yaml) as a baseline for
benchmarks/tta_corruptions.py. PyTorch only, CPU.

What it does, as published: every BatchNorm2d/1d becomes a robust BN that always
normalises with an exponential moving average of the statistics (alpha 0.05, starting
from the source statistics), updated only in training mode; a category-balanced memory
of 64 samples (CSTU: pseudo-label from the teacher, eviction by age and uncertainty);
every 64 samples, the student trains its BN affine parameters on the memory (strong
augmentation, cross-entropy to the teacher's soft labels weighted by timeliness), and
the teacher (an EMA of the student, nu 0.001) updates its robust-BN statistics on the
memory. Predictions are the teacher's, made before the batch enters the memory.
"""

from __future__ import annotations

import math
from copy import deepcopy

import torch
import torch.nn as nn
import torchvision.transforms as transforms
import torchvision.transforms.functional as F

ALPHA, NU, MEMORY, UPDATE_EVERY, LAMBDA_T, LAMBDA_U, LR = 0.05, 0.001, 64, 64, 1.0, 1.0, 1e-3


class RobustBN(nn.Module):
    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, momentum: float) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("source_mean", deepcopy(bn.running_mean))
        self.register_buffer("source_var", deepcopy(bn.running_var))
        self.weight = deepcopy(bn.weight)
        self.bias = deepcopy(bn.bias)
        self.eps = bn.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0] if x.dim() == 2 else [0, 2, 3]
        shape = (1, -1) if x.dim() == 2 else (1, -1, 1, 1)
        if self.training:
            b_var, b_mean = torch.var_mean(x, dim=dims, unbiased=False)
            mean = (1 - self.momentum) * self.source_mean + self.momentum * b_mean
            var = (1 - self.momentum) * self.source_var + self.momentum * b_var
            self.source_mean, self.source_var = mean.detach().clone(), var.detach().clone()
            mean, var = mean.view(shape), var.view(shape)
        else:
            mean, var = self.source_mean.view(shape), self.source_var.view(shape)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return x * self.weight.view(shape) + self.bias.view(shape)


class CSTU:
    """The category-balanced memory with time and uncertainty (memory.py)."""

    def __init__(self, capacity: int, num_class: int) -> None:
        self.capacity, self.num_class = capacity, num_class
        self.per_class = capacity / num_class
        self.data: list[list[list]] = [[] for _ in range(num_class)]  # [x, uncertainty, age]

    def score(self, age: float, uncertainty: float) -> float:
        return LAMBDA_T / (1 + math.exp(-age / self.capacity)) + LAMBDA_U * uncertainty / math.log(
            self.num_class
        )

    def add(self, x: torch.Tensor, prediction: int, uncertainty: float) -> None:
        if self._remove(prediction, self.score(0, uncertainty)):
            self.data[prediction].append([x, uncertainty, 0])
        for items in self.data:
            for item in items:
                item[2] += 1

    def _remove(self, cls: int, score: float) -> bool:
        if len(self.data[cls]) < self.per_class:
            if sum(len(c) for c in self.data) < self.capacity:
                return True
            most = max(len(c) for c in self.data)
            return self._remove_from([i for i, c in enumerate(self.data) if len(c) == most], score)
        return self._remove_from([cls], score)

    def _remove_from(self, classes: list[int], base: float) -> bool:
        best = None
        for cls in classes:
            for idx, (_, u, age) in enumerate(self.data[cls]):
                s = self.score(age, u)
                if best is None or s >= best[0]:
                    best = (s, cls, idx)
        if best is None:
            return True
        if best[0] > base:
            self.data[best[1]].pop(best[2])
            return True
        return False

    def memory(self) -> tuple[list[torch.Tensor], list[float]]:
        items = [item for c in self.data for item in c]
        return [i[0] for i in items], [i[2] / self.capacity for i in items]


class GaussianNoise(nn.Module):
    def __init__(self, std: float) -> None:
        super().__init__()
        self.std = std

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return img + torch.randn(img.size()) * self.std


class Clip(nn.Module):
    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return torch.clip(img, 0.0, 1.0)


class ColorJitterPro(transforms.ColorJitter):
    def __init__(self, brightness, contrast, saturation, hue, gamma) -> None:  # type: ignore[no-untyped-def]
        super().__init__(brightness, contrast, saturation, hue)
        self.gamma = self._check_input(gamma, "gamma")

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        for fn in torch.randperm(5):
            if fn == 0:
                img = F.adjust_brightness(img, _uniform(self.brightness))
            if fn == 1:
                img = F.adjust_contrast(img, _uniform(self.contrast))
            if fn == 2:
                img = F.adjust_saturation(img, _uniform(self.saturation))
            if fn == 3:
                img = F.adjust_hue(img, _uniform(self.hue))
            if fn == 4:
                img = F.adjust_gamma(img.clamp(1e-8, 1.0), _uniform(self.gamma))
        return img


def _uniform(bounds) -> float:  # type: ignore[no-untyped-def]
    return torch.tensor(1.0).uniform_(bounds[0], bounds[1]).item()


def tta_transforms(size: int) -> nn.Module:
    """get_tta_transforms (not soft), on a batch of (N, 3, H, W) images in [0, 1]."""
    return transforms.Compose([
        Clip(),
        ColorJitterPro([0.6, 1.4], [0.7, 1.3], [0.5, 1.5], [-0.06, 0.06], [0.7, 1.3]),
        transforms.Pad(padding=size // 2, padding_mode="edge"),
        transforms.RandomAffine(degrees=[-15, 15], translate=(1 / 16, 1 / 16), scale=(0.9, 1.1),
                                interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.GaussianBlur(kernel_size=5, sigma=[0.001, 0.5]),
        transforms.CenterCrop(size=size),
        transforms.RandomHorizontalFlip(p=0.5),
        GaussianNoise(0.005),
        Clip(),
    ])  # fmt: skip


def softmax_entropy(x: torch.Tensor, x_ema: torch.Tensor) -> torch.Tensor:
    return -(x_ema.softmax(1) * x.log_softmax(1)).sum(1)


class RoTTA:
    """`RoTTA(model, classes)(batch)` returns the teacher's logits for the batch."""

    def __init__(self, model: nn.Module, num_class: int, size: int) -> None:
        self.model = _configure(model)
        self.model_ema = deepcopy(self.model)
        for p in self.model_ema.parameters():
            p.detach_()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=LR, betas=(0.9, 0.999), weight_decay=0.0)
        self.mem = CSTU(MEMORY, num_class)
        self.transform = tta_transforms(size)
        self.current_instance = 0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.model.eval()
            self.model_ema.eval()
            ema_out = self.model_ema(batch)
            predict = torch.softmax(ema_out, dim=1)
            pseudo_label = torch.argmax(predict, dim=1)
            entropy = torch.sum(-predict * torch.log(predict + 1e-6), dim=1)
        for i, data in enumerate(batch):
            self.mem.add(data, int(pseudo_label[i]), float(entropy[i]))
            self.current_instance += 1
            if self.current_instance % UPDATE_EVERY == 0:
                self._update()
        return ema_out

    def _update(self) -> None:
        with torch.enable_grad():
            self.model.train()
            self.model_ema.train()
            data, ages = self.mem.memory()
            if data:
                sup = torch.stack(data)
                strong = self.transform(sup)
                ema_out = self.model_ema(sup)
                student = self.model(strong)
                weight = _timeliness(torch.tensor(ages).float())
                loss = (softmax_entropy(student, ema_out) * weight).mean()
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
        with torch.no_grad():
            for ema_p, p in zip(self.model_ema.parameters(), self.model.parameters(), strict=True):
                ema_p.data[:] = (1 - NU) * ema_p.data[:] + NU * p.data[:]


def _timeliness(ages: torch.Tensor) -> torch.Tensor:
    return torch.exp(-ages) / (1 + torch.exp(-ages))


def _configure(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    names = [n for n, m in model.named_modules()
             if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]  # fmt: skip
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        robust = RobustBN(getattr(owner, leaf), ALPHA)
        robust.requires_grad_(True)
        setattr(owner, leaf, robust)
    return model


def run(model: nn.Module, x, num_class: int, batch_size: int, seed: int):  # type: ignore[no-untyped-def]
    """The teacher's predictions (argmax) on the stream `x` (N, C, H, W), batch by batch."""
    import numpy as np

    torch.manual_seed(seed)
    adapter = RoTTA(model, num_class, x.shape[-1])
    preds = []
    for i in range(0, len(x), batch_size):
        preds.append(adapter(torch.as_tensor(x[i : i + batch_size])).argmax(1).numpy())
    return np.concatenate(preds)
