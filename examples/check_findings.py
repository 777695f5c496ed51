"""Read `check`'s findings: three ways fine-tuning goes wrong, each found before
training starts, with the layer, the problem and the fix. Every code (BN001-BN016) is
in the guide "Read check findings".

    python examples/check_findings.py
"""

# bnkit first: with TensorFlow and torch in one process it keeps torch 2.14's bundled
# triton, which crashes when first imported after TensorFlow, from loading (see Install)
import bnkit  # isort: skip
import keras
import rich
import torch
import torchvision

# Keras: the transfer-learning guide's pattern. BN001 says fit will update the
# statistics of a base called with training=False once it is trainable.
base = keras.applications.MobileNetV2(
    weights=None, include_top=False, input_shape=(32, 32, 3)
)
inputs = keras.Input((32, 32, 3))
x = keras.layers.GlobalAveragePooling2D()(base(inputs, training=False))
model = keras.Model(inputs, keras.layers.Dense(10)(x))
base.trainable = True
report = bnkit.check(model, batch_size=4, steps=20)
rich.print(report.table())  # one row per cause; report.table(verbose=True) per layer
print(report)

# PyTorch: bn.eval() before the loop's model.train() (BN010), and a batch of one image
# at the last stage of a resnet at 32x32 (BN004: one value per channel, PyTorch raises).
net = torchvision.models.resnet18(weights=None)
for m in net.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
        m.eval()
torch_report = bnkit.check(net, batch_size=1, input_shape=(3, 32, 32))
print(torch_report)
codes = {f.code for f in report.findings} | {f.code for f in torch_report.findings}
assert {"BN001", "BN004", "BN010"} <= codes

# After bnkit.freeze the same models are clean of those.
bnkit.freeze(model, bn="frozen")
bnkit.freeze(net, bn="frozen")
print(bnkit.check(model, batch_size=4))
print(bnkit.check(net, batch_size=1, input_shape=(3, 32, 32)))
