"""Deploy safely: fold BN into the layers before it, and export a copy whose answers
were checked before anything was written (export vs original, one image alone vs in a
batch, training mode vs inference). A model left with BN in training mode answers one
image differently from a batch; the export cannot.

    python examples/deploy_export.py
"""

import tempfile
from pathlib import Path

import numpy as np
import torch
import torchvision

import bnkit
from bnkit.data import digits

torch.manual_seed(0)
images = digits("target", size=32).test[0].transpose(0, 3, 1, 2)  # NCHW for PyTorch

model = torchvision.models.resnet18(weights=None, num_classes=10)
bnkit.adapt(model, images)  # statistics of the images it will see

# The bug export prevents: BN in training mode normalises one image with itself.
model.train()
with torch.no_grad():
    x = torch.as_tensor(images[:8])
    alone, batched = model(x[:2])[:1], model(x)[:1]
gap = float((alone - batched).abs().max())
print(f"BN in train(): one image alone vs in a batch differ by {gap:.3g}")

out = Path(tempfile.mkdtemp())
folded = bnkit.fold(
    model, example=images[:8]
)  # an inference copy, BN folded where possible
print(folded)
report = bnkit.export(model, out / "resnet18.pt2", check_data=images[:32])
print(report)
program = torch.export.load(out / "resnet18.pt2").module()  # as your server loads it
with torch.no_grad():
    one, many = program(x[:1]), program(x)[:1]
gap = float((one - many).abs().max())
print(f"exported: one image alone vs in a batch differ by {gap:.1g}")
onnx = bnkit.export(
    model, out / "resnet18.onnx", check_data=images[:32]
)  # needs onnxruntime
print(onnx)
assert report.folded == 20 and np.allclose(one.numpy(), many.numpy(), atol=1e-4)
