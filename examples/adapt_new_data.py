"""Re-estimate BN statistics on new data, without labels: measure how far the data is
from each BN layer's statistics (`shift`), re-estimate them (`adapt`), and see what it
buys on the shifted digits.

    python examples/adapt_new_data.py
"""

import keras
import rich

import bnkit
from bnkit.data import digits
from bnkit.plots import shift_plot

keras.utils.set_random_seed(0)
source, target = digits("source", size=16), digits("target", size=16)

layers = [keras.Input((16, 16, 3))]
for k in (1, 2, 3):
    layers += [
        keras.layers.Conv2D(16 * k, 3, padding="same"),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
    ]
model = keras.Sequential(
    [*layers, keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)]
)
loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
model.compile("adam", loss, metrics=["accuracy"])
model.fit(*source.train, epochs=4, batch_size=32, verbose=0)
bnkit.adapt(
    model, source.train[0]
)  # the source statistics, exact for the final weights


def accuracy(split) -> float:
    return float(model.evaluate(*split, verbose=0)[1])


print(
    f"accuracy: source {accuracy(source.test):.1%}, target {accuracy(target.test):.1%}"
)
report = bnkit.shift(model, target.train[0])  # unlabelled target images
rich.print(report.table())  # KL divergence per BN layer, input side first
print(report)  # the model's shift and what to do about it
shift_plot(report, "shift.png")

adapted = bnkit.adapt(model, target.train[0])  # population statistics, one pass
print(adapted)
print(f"target test accuracy after adapt: {accuracy(target.test):.1%}")
assert report.recommendation in ("adapt", "labels")
