"""Fine-tune a KerasHub image classifier: the recipe KerasHub documents, what unfreezing
part of the backbone does to its BN layers (momentum 0.9 there, where Keras' default is
0.99), and bnkit's way. A preset would come from
`keras_hub.models.ImageClassifier.from_preset("resnet_18_imagenet", num_classes=10)`;
nothing can be downloaded here, so the script builds a small ResNet backbone with random
weights, trains each way for one epoch on 64 digits, and prints what `watch` saw.

    python examples/kerashub_finetune.py        # any KERAS_BACKEND
"""

import keras
import keras_hub
import numpy as np

import bnkit
from bnkit.data import digits

images, labels = digits("target", size=32).train
x, y = images[:64], labels[:64]


def classifier() -> keras.Model:
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 64], stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2], block_type="basic_block", image_shape=(32, 32, 3),
    )  # fmt: skip
    # KerasHub compiles a task when it is built (Adam, sparse cross-entropy on logits)
    return keras_hub.models.ResNetImageClassifier(backbone=backbone, num_classes=10)


def backbone_trainable_false(m: keras.Model) -> None:
    m.backbone.trainable = False  # KerasHub's recipe for a first, head-only phase


def unfreeze_all(m: keras.Model) -> None:
    m.backbone.trainable = True  # the second phase: everything trains, BN included
    m.compile(keras.optimizers.Adam(1e-4), m.loss, metrics=[])


def unfreeze_last_stage(m: keras.Model) -> None:
    m.backbone.trainable = True
    for layer in m.backbone.layers:  # partial unfreezing, by layer name
        layer.trainable = layer.name.startswith("stack1")
    m.compile(keras.optimizers.Adam(1e-4), m.loss, metrics=[])


def bnkit_from_last_stage(mode: str):
    def setup(m: keras.Model) -> None:
        bnkit.freeze(m, train_from="stack1_block0_1_pad", bn=mode, recompile=True)

    return setup


approaches = {
    "backbone.trainable = False (KerasHub's first phase)": backbone_trainable_false,
    "backbone.trainable = True, compile again": unfreeze_all,
    "last stage unfrozen by layer.trainable, compile again": unfreeze_last_stage,
    "bnkit.freeze(train_from=last stage, bn='frozen')": bnkit_from_last_stage("frozen"),
    "bnkit.freeze(train_from=last stage, bn='affine')": bnkit_from_last_stage("affine"),
}
print("| approach | BN | kept statistics | kept gamma/beta | watch |")
print("|---|---|---|---|---|")
for name, setup in approaches.items():
    m = classifier()
    setup(m)
    with bnkit.watch(m) as w:
        m.fit(x, y, epochs=1, batch_size=16, verbose=0)
    k = w.report.counts()
    planned = "as planned" if name.startswith("bnkit") and w.report.ok else ""
    n = k["bn_layers"]
    kept = f"{k['bn_stats_kept']}/{n} | {k['bn_affine_kept']}/{n}"
    print(f"| {name} | {n} | {kept} | {planned} |")
    if name.startswith("bnkit"):
        assert k["bn_stats_kept"] == n and w.report.ok
momenta = sorted({layer.momentum for layer in bnkit.inspect(classifier()).bn_layers})
print(f"\nBN momentum in KerasHub's ResNet: {', '.join(f'{m:g}' for m in momenta)}")
assert np.isfinite(n)
