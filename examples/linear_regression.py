"""Linear regression, the first example of the kormos 0.1 README in Keras 3.

1. A Sequential model fit by L-BFGS-B (full batch).
2. The same model recompiled with Adam (mini-batch, Keras' own fit loop).
3. The same model written with the functional API and fit by Newton-CG.

The 2022 README's code itself, character for character, runs in the tests
(test_kormos.py); this is the same example written for Keras 3: a
`keras.Input` instead of `input_shape`, float64 weights, and `maxcor` spelled
as scipy spells it.

Run:  python examples/linear_regression.py   (about 30 s on 2 CPU cores,
mostly the 150 Adam epochs)
"""

import numpy as np
import keras

import kormos

try:
    import pandas as pd
except ImportError:  # pandas is optional: fall back to plain printing
    pd = None


def show(title, history):
    print(f"\n== {title} ==")
    if pd is not None:
        with pd.option_context("display.max_columns", None, "display.width", 120):
            print(pd.DataFrame(history.history))
    else:
        for key, values in history.history.items():
            print(key, ["%.6g" % v for v in values])


keras.config.set_floatx("float64")  # full-batch solvers want float64 (README FAQ)
keras.utils.set_random_seed(1)
rank = 50


def linear_layer():
    return keras.layers.Dense(
        units=1,
        use_bias=False,
        kernel_regularizer=keras.regularizers.L2(1e-3),
        kernel_initializer="ones",
    )


# Normally distributed random data, as in the 2022 README
rng = np.random.default_rng(1)
w = rng.normal(size=rank)
X = rng.normal(size=(1000, rank))
y = X @ w[:, None]
Xval = rng.normal(size=(1000, rank))
yval = Xval @ w[:, None]

# 1. Sequential API, L-BFGS-B
model = kormos.BatchOptimizedSequentialModel([keras.Input((rank,)), linear_layer()])
model.compile(loss="mse", optimizer="l-bfgs-b", metrics=["mean_absolute_error"])
history = model.fit(
    X, y, epochs=10, validation_data=(Xval, yval), options={"maxcor": 3}, verbose=2
)
assert np.allclose(model.trainable_weights[0].numpy().ravel(), w, atol=1e-2)
show("Sequential model, L-BFGS-B", history)

# 2. Recompiled with Adam: Keras' own fit (the weights are kept; reset them)
model.compile(loss="mse", optimizer="adam", metrics=["mean_absolute_error"])
model.set_weights([rng.random(size=(rank, 1))])
history = model.fit(X, y, epochs=150, validation_data=(Xval, yval), verbose=0)
show("Same model recompiled with Adam", history)

# 3. Functional API, Newton-CG (exact Hessian-vector products)
inputs = keras.Input(shape=(rank,), name="input")
model = kormos.BatchOptimizedModel(inputs=inputs, outputs=linear_layer()(inputs))
model.compile(loss="mse", optimizer="newton-cg", metrics=["mean_absolute_error"])
history = model.fit(X, y, epochs=10, validation_data=(Xval, yval), verbose=0)
assert np.allclose(model.trainable_weights[0].numpy().ravel(), w, atol=1e-2)
show("Functional model, Newton-CG", history)
