import keras, numpy as np, bnkit

base = keras.applications.MobileNetV2(
    weights=None, include_top=False, input_shape=(32, 32, 3)
)
inputs = keras.Input((32, 32, 3))
x = keras.layers.GlobalAveragePooling2D()(base(inputs, training=False))
model = keras.Model(inputs, keras.layers.Dense(10)(x))
print(bnkit.inspect(model).summary())  # what fit will really do
bnkit.freeze(model, train_from="block_16_expand", bn="frozen")  # pinned
loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)  # Dense(10): logits
model.compile("adam", loss)
with bnkit.watch(model) as w:  # what moved, against the plan
    model.fit(np.random.rand(16, 32, 32, 3), np.arange(16) % 10, verbose=0)
assert w.report.ok, w.report  # as planned: BN kept, the trained layers moved
