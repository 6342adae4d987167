"""A physics-informed network: Adam warm start, then L-BFGS-B, on u'' = -pi^2 sin(pi x).

The Poisson problem u''(x) = -pi^2 sin(pi x) on [0, 1] with u(0) = u(1) = 0
has the exact solution u(x) = sin(pi x). The model overrides `compute_loss`
with the residual of the equation, which differentiates the network with
respect to its input.

Run: python examples/physics_informed.py
"""

import time

import numpy as np
import tensorflow as tf
from tensorflow import keras

import kormos

keras.config.set_floatx("float64")
keras.utils.set_random_seed(0)


class Poisson1D(kormos.BatchOptimizedSequentialModel):
    """Trains on the residual of u'' + pi^2 sin(pi x) = 0 plus boundary terms."""

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        x = tf.convert_to_tensor(x)
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                u = self(x, training=False)
            du = inner.gradient(u, x)
        d2u = outer.gradient(du, x)
        residual = d2u + np.pi**2 * tf.sin(np.pi * x)
        boundary = self(tf.constant([[0.0], [1.0]], x.dtype), training=False)
        return tf.reduce_mean(residual**2) + tf.reduce_mean(boundary**2)


x = np.linspace(0.0, 1.0, 101)[:, None]
model = Poisson1D(
    [
        keras.Input((1,)),
        keras.layers.Dense(20, activation="tanh"),
        keras.layers.Dense(20, activation="tanh"),
        keras.layers.Dense(1),
    ]
)


def max_error():
    return np.abs(model.predict(x, verbose=0) - np.sin(np.pi * x)).max()


start = time.perf_counter()
model.compile(optimizer=keras.optimizers.Adam(1e-2))
adam = model.fit(x, epochs=500, batch_size=len(x), verbose=0)
print(
    f"Adam, 500 epochs:     loss {adam.history['loss'][-1]:.2e}, "
    f"max |u - sin(pi x)| = {max_error():.2e}"
)

model.compile(optimizer="l-bfgs-b")
lbfgs = model.fit(x, epochs=500, verbose=0, options={"gtol": 1e-12, "ftol": 1e-16})
print(
    f"then L-BFGS-B, {len(lbfgs.history['loss'])} iterations: "
    f"loss {lbfgs.history['loss'][-1]:.2e}, max |u - sin(pi x)| = {max_error():.2e}"
)
print(f"total time: {time.perf_counter() - start:.0f} s")
