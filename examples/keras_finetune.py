"""Fine-tune a Keras model the way the Keras transfer-learning guide does, but with BN
really frozen: the guide calls the base with `training=False` and later sets
`base.trainable = True`, and in Keras 3 `fit` then updates every BN statistic anyway.

    python examples/keras_finetune.py
"""

import keras
import numpy as np

import bnkit
from bnkit.data import digits
from bnkit.keras_callbacks import BNWatch

keras.utils.set_random_seed(0)
source, target = digits("source", size=16), digits("target", size=16)

# A "pretrained" base: a small CNN with BN, trained briefly on the source digits.
layers = [keras.Input((16, 16, 3))]
for k in (1, 2, 3):
    layers += [
        keras.layers.Conv2D(16 * k, 3, padding="same", name=f"conv{k}"),
        keras.layers.BatchNormalization(name=f"bn{k}"),
        keras.layers.ReLU(),
    ]
base = keras.Sequential(layers, name="base")
pretrain = keras.Sequential(
    [base, keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)]
)
pretrain.compile(
    "adam",
    keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=["accuracy"],
)
pretrain.fit(*source.train, epochs=5, batch_size=32, verbose=0)
lagging = pretrain.evaluate(*source.test, verbose=0)[1]
# Momentum 0.99: after 170 steps the moving statistics still lag the weights.
bnkit.adapt(pretrain, source.train[0])  # exact statistics of the training images
exact = pretrain.evaluate(*source.test, verbose=0)[1]
print(f"source accuracy {lagging:.1%} with the moving statistics, {exact:.1%} exact")

# The guide's model: the base called with training=False under a new head.
inputs = keras.Input((16, 16, 3))
features = keras.layers.GlobalAveragePooling2D()(base(inputs, training=False))
model = keras.Model(inputs, keras.layers.Dense(10, name="head")(features))

# What fit would really do once the base is trainable: bnkit check says it.
base.trainable = True
print(
    bnkit.check(model)
)  # BN001: 'base' was called with training=False, but fit overrides it

# Fine-tune the last conv block and the head with every BN frozen for real, after
# re-estimating the BN statistics on the (unlabelled) target images: mode adapt.
plan = bnkit.freeze(model, train_from="conv3", bn="adapt")
print(plan)
print(bnkit.adapt(model, target.train[0]))
model.compile(
    keras.optimizers.Adam(1e-3),
    keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=["accuracy"],
)
history = model.fit(
    *target.train,
    epochs=3,
    batch_size=32,
    verbose=0,
    callbacks=[BNWatch(on_problem="raise")],
)
print("BN statistics kept each epoch:", history.history["bn_stats_kept"])
_, accuracy = model.evaluate(*target.test, verbose=0)
print(f"target test accuracy: {accuracy:.1%}")
assert history.history["bn_problems"] == [0, 0, 0] and np.isfinite(accuracy)
