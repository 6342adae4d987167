"""A 1D Poisson PINN: L-BFGS-B against the dense quasi-Newton methods.

u'' = -4 pi^2 sin(2 pi x) on [-1, 1], u(-1) = u(1) = 0, whose solution is
sin(2 pi x), learned by a 1-20-20-1 tanh network (481 weights) from the
residual at 200 points, in float64. Every method starts from the same
weights, with gtol 0, and the relative L2 error against the exact solution
is recorded as it goes: L-BFGS-B's error stalls near 1e-4 where BFGS, SSBFGS
and SSBroyden go orders of magnitude lower in the same iterations.

Run:  python examples/poisson_pinn.py [iterations]   (default 1,500)
"""

import sys
import time

import numpy as np
import tensorflow as tf
import keras

import kormos

METHODS = ("l-bfgs-b", "bfgs", "ssbfgs", "ssbroyden")


class Poisson(kormos.BatchOptimizedSequentialModel):
    """The residual of u'' + 4 pi^2 sin(2 pi x) = 0, plus the boundary values."""

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        x = tf.convert_to_tensor(x)
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                u = self(x)
            du = inner.gradient(u, x)
        residual = outer.gradient(du, x) + 4 * np.pi**2 * tf.sin(2 * np.pi * x)
        ends = self(tf.constant([[-1.0], [1.0]], x.dtype))
        return tf.reduce_mean(residual**2) + tf.reduce_mean(ends**2)


class ErrorTrace(keras.callbacks.Callback):
    """Records (iteration, seconds, relative L2 error) every `every` iterations."""

    def __init__(self, x, every):
        super().__init__()
        self.x, self.exact, self.every, self.rows = x, np.sin(2 * np.pi * x), every, []

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every == 0 or epoch == 0:
            u = self.model(self.x).numpy()
            error = np.linalg.norm(u - self.exact) / np.linalg.norm(self.exact)
            self.rows.append((epoch + 1, time.perf_counter() - self.start, error))


def race(iterations, methods=METHODS, every=100):
    """Fits the model with each method from the same start (build it under a
    float64 floatx); returns {method: [(iteration, seconds, error), ...]}."""
    x = np.linspace(-1, 1, 200)[:, None]
    traces = {}
    for method in methods:
        keras.utils.set_random_seed(0)  # the same start for every method
        tanh = dict(units=20, activation="tanh")
        model = Poisson([keras.Input((1,)), keras.layers.Dense(**tanh),
                         keras.layers.Dense(**tanh), keras.layers.Dense(1)])
        model.compile(optimizer=method)
        trace = ErrorTrace(x, every)
        model.fit(x, epochs=iterations, verbose=0, callbacks=[trace],
                  options={"gtol": 0.0})
        traces[method] = trace.rows
    return traces


if __name__ == "__main__":
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    iterations = int(sys.argv[1]) if len(sys.argv) > 1 else 1500
    print(f"{'method':10s} {'iterations':>10s} {'seconds':>8s} {'rel. L2 error':>14s}")
    for method, rows in race(iterations).items():
        iteration, seconds, error = rows[-1]
        print(f"{method:10s} {iteration:10d} {seconds:8.1f} {error:14.2e}")
