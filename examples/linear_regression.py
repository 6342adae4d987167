"""Linear regression, the first example of the kormos 0.1 README, unchanged.

1. A Sequential model fit by L-BFGS-B (full batch).
2. The same model recompiled with Adam (mini-batch, Keras' own fit loop).
3. The same model written with the functional API and fit by Newton-CG.

The only additions are the `show()` calls that print each History.

Run:  python examples/linear_regression.py   (about 30 s on 2 CPU cores,
mostly the 150 Adam epochs)
"""
# ruff: noqa: E402, E501  (the 2022 README's code is kept as written)
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


# ---------------------------------------------------------------------------
# Example: Linear Regression with Sequential API (code as in the 2022 README)
# ---------------------------------------------------------------------------
import numpy as np
from tensorflow import keras

import kormos

rank = 50

# Define the model using the keras.model.Model Sequential API
model = kormos.models.BatchOptimizedSequentialModel()
model.add(
    keras.layers.Dense(
        units=1,
        input_shape=(rank,),
        activation=None,
        use_bias=False,
        kernel_regularizer=keras.regularizers.L2(1e-3),
        kernel_initializer="ones",
    )
)
loss = keras.losses.MeanSquaredError()
model.compile(loss=loss, optimizer='l-bfgs-b', metrics=['mean_absolute_error'])

# Generate samples of normally distributed random data
np.random.seed(1)
w = np.random.normal(size=rank)
X = np.random.normal(size=(1000, rank))
y = np.expand_dims(X.dot(w), axis=1)

Xval = np.random.normal(size=(1000, rank))
yval = np.expand_dims(Xval.dot(w), axis=1)

# Fit the model
history = model.fit(
    x=X,
    y=y,
    epochs=10,
    validation_data=(Xval, yval),
    options={"maxcors": 3}, # can pass options payload if so desired
)
best_fit_weights = np.reshape(model.trainable_weights[0].numpy(), (1, -1))
assert np.allclose(best_fit_weights, w, 1e-2)

show("Sequential model, L-BFGS-B", history)

# Recompile the model to use a different optimizer (this doesn't change its weights)
model.compile(loss=model.loss, optimizer='adam', metrics=['mean_absolute_error'])

# Reset the weights
model.set_weights([np.random.random(size=(rank, 1))])

# Fit the model using ADAM
history = model.fit(
    x=X,
    y=y,
    epochs=150,
    validation_data=(Xval, yval),
)

show("Same model recompiled with Adam", history)

# ---------------------------------------------------------------------------
# Example: Linear Regression using the Functional API (Newton-CG)
# ---------------------------------------------------------------------------

# Define the model using the keras.model.Model functional API
model_input = keras.Input(shape=(rank,), name="input")
model_output = keras.layers.Dense(
    units=1,
    input_shape=(rank,),
    activation=None,
    use_bias=False,
    kernel_regularizer=keras.regularizers.L2(1e-3),
    kernel_initializer="ones",
)(model_input)
model = kormos.models.BatchOptimizedModel(
    inputs=model_input,
    outputs=model_output,
)
loss = keras.losses.MeanSquaredError()
model.compile(loss=loss, optimizer='newton-cg', metrics=['mean_absolute_error'])

# Fit the model on the same data as previously
history = model.fit(
    x=X,
    y=y,
    epochs=10,
    validation_data=(Xval, yval),
)
best_fit_weights = np.reshape(model.trainable_weights[0].numpy(), (1, -1))
assert np.allclose(best_fit_weights, w, 1e-2)

show("Functional model, Newton-CG", history)
