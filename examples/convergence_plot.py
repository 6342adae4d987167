"""Convergence of L-BFGS-B, Newton-CG and Adam on one small convex problem.

Multinomial logistic regression (a softmax Dense layer, 650 weights, L2
penalty 1e-4 on the kernel) on scikit-learn's 8x8 digits (1,437 training
images), in float64, from the same initial weights for every method. The
exact minimum f* comes from scikit-learn's LogisticRegression on the same
objective, so the plot shows the true suboptimality f - f*, against

- evaluations: passes over the training data. For L-BFGS-B that is
  `fg_evals`; for Newton-CG `fg_evals + hessp_evals` (each Hessian-vector
  product is one more pass); for Adam one epoch is one pass;
- wall-clock seconds since fit() started (including the tracing of this
  model's tf.functions; one untimed warm-up fit per method runs first).

Adam's loss is measured on the full training set at the end of each epoch
(Keras' epoch `loss` is a running mean over changing weights); the time spent
measuring it is left out of Adam's clock. Solvers run with scipy's default
tolerances.

Saves examples/convergence.png. Needs matplotlib.
Run:  python examples/convergence_plot.py   (about 20 s on 2 CPU cores)
"""

import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import keras
from scipy.special import logsumexp
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

import kormos

keras.config.set_floatx("float64")
keras.utils.set_random_seed(0)

digits = load_digits()
x, _, y, _ = train_test_split(
    digits.data / 16.0, digits.target, test_size=0.2, random_state=0
)
n = len(x)
lam = 1e-4
# Keras applies L2(lam) as float32(lam), even in float64.
lam32 = float(np.float32(lam))

# The exact optimum: mean cross-entropy + lam * ||W||^2 is what scikit-learn
# minimizes (up to a factor n) with C = 1 / (2 n lam); the bias is not penalized.
clf = LogisticRegression(C=1 / (2 * n * lam32), tol=1e-12, max_iter=10_000).fit(x, y)
z = x @ clf.coef_.T + clf.intercept_
cross_entropy = np.mean(logsumexp(z, axis=1) - z[np.arange(n), y])
f_star = cross_entropy + lam32 * np.sum(clf.coef_**2)
print(f"f* (scikit-learn) = {f_star:.12f}")


def build_model():
    return kormos.BatchOptimizedSequentialModel(
        [
            keras.Input(shape=(64,)),
            keras.layers.Dense(
                10, activation="softmax", kernel_regularizer=keras.regularizers.L2(lam)
            ),
        ]
    )


class Recorder(keras.callbacks.Callback):
    """Records (evaluations, seconds, training loss) at the end of each epoch."""

    def __init__(self, full_eval=False):
        super().__init__()
        self.full_eval = full_eval  # True for Keras optimizers (Adam)

    def on_train_begin(self, logs=None):
        loss = self.model.evaluate(x, y, batch_size=n, verbose=0)[0]
        self.rows = [(0, 0.0, loss)]
        self.pause = 0.0
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        if self.full_eval:
            loss = self.model.evaluate(x, y, batch_size=n, verbose=0)[0]
            evals = epoch + 1
        else:
            loss = logs["loss"]
            evals = int(logs["fg_evals"] + logs["hessp_evals"])
        self.rows.append((evals, now - self.start - self.pause, loss))
        self.pause += time.perf_counter() - now


# Warm-up, untimed: the first fit in a process pays one-off TensorFlow start-up
# costs that would otherwise be charged to whichever method runs first.
for warm_up in ("l-bfgs-b", "newton-cg", "adam"):
    model = build_model()
    model.compile(loss="sparse_categorical_crossentropy", optimizer=warm_up)
    model.fit(x, y, epochs=1, verbose=0)

w0 = build_model().get_weights()
runs = {
    "L-BFGS-B": dict(optimizer="l-bfgs-b", epochs=300),
    "Newton-CG": dict(optimizer="newton-cg", epochs=30),
    "Adam (batch 32, lr 1e-3)": dict(optimizer="adam", epochs=40, batch_size=32),
    "Adam (batch 32, lr 1e-2)": dict(
        optimizer=keras.optimizers.Adam(1e-2), epochs=40, batch_size=32
    ),
}
results = {}
for name, run in runs.items():
    model = build_model()
    model.set_weights(w0)
    model.compile(
        loss="sparse_categorical_crossentropy",
        optimizer=run["optimizer"],
        metrics=["accuracy"],
    )
    is_keras_optimizer = not isinstance(model.optimizer, kormos.BatchOptimizer)
    recorder = Recorder(full_eval=is_keras_optimizer)
    model.fit(
        x,
        y,
        epochs=run["epochs"],
        batch_size=run.get("batch_size"),
        callbacks=[recorder],
        verbose=0,
    )
    results[name] = rows = np.array(recorder.rows)
    evals, seconds, loss = rows[-1]
    print(
        f"{name:25s} epochs {len(rows) - 1:3d}  evaluations {int(evals):3d}  "
        f"seconds {seconds:5.2f}  loss {loss:.10f}  f - f* {loss - f_star:.1e}"
    )

fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
for name, rows in results.items():
    gap = np.maximum(rows[:, 2] - f_star, 1e-16)
    left.plot(rows[:, 0], gap, label=name)
    right.plot(rows[:, 1], gap, label=name)
left.set_xlabel("evaluations (passes over the training data)")
right.set_xlabel("wall-clock seconds (2 CPU cores)")
for ax in (left, right):
    ax.set_yscale("log")
    ax.set_ylabel("training loss - optimum")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
fig.suptitle(
    "Softmax regression on sklearn digits: 650 weights, 1,437 samples, L2 1e-4, float64"
)
fig.tight_layout()
path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "convergence.png")
fig.savefig(path, dpi=90)
print("saved", os.path.relpath(path))
