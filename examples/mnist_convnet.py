"""The kormos 0.1 README's MNIST convnet example, on scikit-learn's digits.

keras.datasets.mnist needs a download, so this script uses the 1,797 8x8
digit images bundled with scikit-learn (`sklearn.datasets.load_digits`). The
model keeps the README's layer stack (Conv2D, MaxPooling2D, Conv2D,
MaxPooling2D, Flatten, Dropout, Dense) with padding="same" and 4/8 filters
instead of 32/64, so that it has 666 weights instead of 34,826.

That size matters for the README's `method='bfgs'`: BFGS keeps dense n x n
inverse Hessians, two of them in kormos (19 GB for the 2022 MNIST net's
n = 34,826). kormos refuses a model whose matrices would not fit in the memory
available, or that has more weights than `max_dense_params` (shown at the
end); use 'l-bfgs-b' for larger models.

Training is the README's: Adam for 1 epoch, then recompile with
`kormos.optimizers.ScipyBatchOptimizer()` and fit with method='bfgs'.

Run:  python examples/mnist_convnet.py   (about 11 s on 2 CPU cores)
"""
# ruff: noqa: E402, E501  (the 2022 README's code is kept as written)
import numpy as np

from tensorflow import keras
from keras import layers

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


keras.utils.set_random_seed(0)  # not in the 2022 README: reproducible output

# ---------------------------------------------------------------------------
# Prepare the Data: sklearn digits instead of keras.datasets.mnist
# ---------------------------------------------------------------------------
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

# Model / data parameters
num_classes = 10
input_shape = (8, 8, 1)

# Load the data and split it between train and test sets
digits = load_digits()
x_train, x_test, y_train, y_test = train_test_split(
    digits.images, digits.target, test_size=0.2, random_state=0
)

# Scale images to the [0, 1] range (digits pixels are 0..16)
x_train = x_train.astype("float32") / 16
x_test = x_test.astype("float32") / 16
# Make sure images have shape (8, 8, 1)
x_train = np.expand_dims(x_train, -1)
x_test = np.expand_dims(x_test, -1)
print("x_train shape:", x_train.shape)
print(x_train.shape[0], "train samples")
print(x_test.shape[0], "test samples")

# convert class vectors to binary class matrices
y_train = keras.utils.to_categorical(y_train, num_classes)
y_test = keras.utils.to_categorical(y_test, num_classes)

# ---------------------------------------------------------------------------
# Build the Model (the README's layer stack, smaller)
# ---------------------------------------------------------------------------
from kormos.models import BatchOptimizedSequentialModel

def build_model():
    model = BatchOptimizedSequentialModel(
        [
            keras.Input(shape=input_shape),
            layers.Conv2D(4, kernel_size=(3, 3), padding="same", activation="relu"),
            layers.MaxPooling2D(pool_size=(2, 2)),
            layers.Conv2D(8, kernel_size=(3, 3), padding="same", activation="relu"),
            layers.MaxPooling2D(pool_size=(2, 2)),
            layers.Flatten(),
            layers.Dropout(0.5),
            layers.Dense(num_classes, activation="softmax"),
        ]
    )
    return model

model = build_model()
model.summary()

# ---------------------------------------------------------------------------
# Train the Model (as in the 2022 README)
# ---------------------------------------------------------------------------
loss = keras.losses.CategoricalCrossentropy()
# Train a model with ADAM
model = build_model()
model.compile(loss=loss, optimizer="adam", metrics=["accuracy"])
hist1 = model.fit(x_train, y_train, batch_size=2**5, epochs=1, validation_data=(x_test, y_test))

# Continue training the model with a batch algorithm.
# We can instantiate the optimizer as well instead of a string identifier
optimizer = kormos.optimizers.ScipyBatchOptimizer()
model.compile(loss=loss, optimizer=optimizer, metrics=["accuracy"])

# We can specify the method and any options for it in fit as keyword wargs
hist2 = model.fit(
    x_train,
    y_train,
    batch_size=2**14, # this is much larger than for stochastic solvers!
    epochs=3,
    validation_data=(x_test, y_test),
    method='bfgs',
)

show("Adam, 1 epoch", hist1)
show("BFGS, 3 iterations (warm start from Adam)", hist2)

# ---------------------------------------------------------------------------
# Not in the 2022 README
# ---------------------------------------------------------------------------
# 1. 30 more BFGS iterations, continuing from the current weights.
hist3 = model.fit(
    x_train, y_train, epochs=30, validation_data=(x_test, y_test),
    method="bfgs", verbose=0,
)
print(f"\n== BFGS, 30 more iterations ({len(hist3.epoch)} run): every 5th row ==")
if pd is not None:
    with pd.option_context("display.max_columns", None, "display.width", 120):
        table = pd.DataFrame(hist3.history, index=hist3.epoch)
        print(table.iloc[list(range(4, len(table) - 1, 5)) + [-1]])
else:
    for key, values in hist3.history.items():
        print(key, ["%.6g" % v for v in values[4::5]])
print("solver:", model.optimizer.results[-1].message)

# 2. The 2022 MNIST-sized net (34,826 weights) is too big for a dense BFGS
#    here: refused above max_dense_params (or beyond the memory available).
big = BatchOptimizedSequentialModel(
    [
        keras.Input(shape=(28, 28, 1)),
        layers.Conv2D(32, kernel_size=(3, 3), activation="relu"),
        layers.MaxPooling2D(pool_size=(2, 2)),
        layers.Conv2D(64, kernel_size=(3, 3), activation="relu"),
        layers.MaxPooling2D(pool_size=(2, 2)),
        layers.Flatten(),
        layers.Dropout(0.5),
        layers.Dense(num_classes, activation="softmax"),
    ]
)
big.compile(
    loss=loss,
    optimizer=kormos.optimizers.ScipyBatchOptimizer(max_dense_params=20_000),
    metrics=["accuracy"],
)
x_fake = np.zeros((4, 28, 28, 1), "float32")
try:
    big.fit(x_fake, y_train[:4], epochs=1, method="bfgs", verbose=0)
except ValueError as error:
    print("\nBFGS on the 34,826-weight MNIST net:\nValueError:", error)
