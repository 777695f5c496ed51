"""Pick the BN strategy by experiment: `bnkit.compare` fine-tunes the model once per
strategy and seed from the same weights, on your data, and says whether the winner's
lead is beyond the noise (the spread over seeds and the validation set's size).

    python examples/compare_strategies.py
"""

import keras
import rich

import bnkit
from bnkit.data import digits
from bnkit.demo import few_labels
from bnkit.plots import compare_plot

keras.utils.set_random_seed(0)
source, target = digits("source", size=16), digits("target", size=16)

# A "pretrained" model: a small CNN with BN trained on the source digits.
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
model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.fit(*source.train, epochs=4, batch_size=32, verbose=0)
bnkit.adapt(model, source.train[0])  # statistics that match the final weights

# 20 labelled target images per class, validated on the target validation split.
labelled = few_labels(*target.train, per_class=20)
result = bnkit.compare(
    model,
    labelled,
    target.val,
    ["frozen", "affine", "train", "adapt"],
    epochs=3,
    seeds=2,
)
rich.print(result.table())  # mean ± standard deviation over seeds
print(result)
compare_plot(result, "compare.png")  # validation curves per strategy
assert {s.strategy for s in result.summaries} == {"frozen", "affine", "train", "adapt"}
