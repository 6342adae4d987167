"""Burgers' equation with a physics-informed network, two published setups.

`--setup raissi` (the default) reproduces the continuous-time inference
example of Raissi, Perdikaris and Karniadakis, "Physics-informed neural
networks", J. Comput. Phys. 378 (2019), Section 3.1.1 and Table 1:

    u_t + u u_x - (0.01/pi) u_xx = 0,   x in [-1, 1], t in [0, 1],
    u(0, x) = -sin(pi x),   u(t, -1) = u(t, 1) = 0.

A (t, x) -> u network of 8 hidden tanh layers of 20 units learns u from
N_u = 100 initial and boundary values and the equation's residual at
N_f = 10,000 collocation points, minimizing MSE_u + MSE_f with L-BFGS-B
(scipy, through kormos). The paper reports a relative L2 error of 6.7e-4 on
a 256 x 100 (x by t) grid; the exact solution is computed here by the
Cole-Hopf transformation, so nothing is downloaded. `--method` picks the
solver: L-BFGS-B with the paper's options, or one of the dense quasi-Newton
methods (BFGS, SSBFGS, SSBroyden).

`--setup kiyani` follows Kiyani, Shukla, Urban, Darbon and Karniadakis,
"Optimizing the optimizer for physics-informed neural networks and
Kolmogorov-Arnold networks", CMAME 446 (2025) 118308: a 4 x 20 tanh network
on raw (t, x), 8,000 collocation points, 500 initial and 500 boundary points
weighted 5, 1,000 Adam steps, then runs of 500 quasi-Newton iterations; before
each run the collocation points are resampled by residual-based adaptive
distribution (RAD: from 50,000 uniform candidates with probability
proportional to |residual| / mean |residual| + 1) and the initial and boundary
points redrawn, and each run continues from the inverse Hessian where the
last one ended (`ScipyBatchOptimizer(warm_start=True)`). The error is the
relative L2 error on the same 256 x 100 grid.

Run:

    python examples/burgers_pinn.py                  # float64, up to 50,000 iterations
    python examples/burgers_pinn.py --minutes 10     # stop after 10 minutes
    python examples/burgers_pinn.py --method ssbroyden --minutes 60
    python examples/burgers_pinn.py --setup kiyani --method ssbroyden --minutes 60
    python examples/burgers_pinn.py --precision float32

On a 2-core CPU an iteration (1.15 evaluations) takes 0.11-0.17 s in
float64: 85 minutes ran 38,714 iterations, and the error passed the paper's
after 10,000 (28 minutes) and ended at 2.2e-4. float32 is twice as fast per
evaluation, but L-BFGS-B stalls on its roundoff near 2.5e-3. The error
trajectory is printed as it goes, and plotted at the end.
"""

import argparse
import time

import numpy as np
import scipy.stats
import tensorflow as tf
from tensorflow import keras

import kormos

NU = 0.01 / np.pi
PAPER_ERROR = 6.7e-4


def burgers_exact(t, x, nu=NU, nodes=100):
    """The exact solution u(t, x), by Cole-Hopf and Gauss-Hermite quadrature.

    u = -int sin(pi (x - e)) f(x - e) exp(-e^2 / (4 nu t)) de / int f(x - e)
    exp(-e^2 / (4 nu t)) de with f(y) = exp(-cos(pi y) / (2 pi nu)); with
    e = sqrt(4 nu t) z both integrals have the Gauss-Hermite weight exp(-z^2).
    The exponents are shifted by their maximum (exp(1 / (2 pi nu)) overflows
    for small nu). For nu = 0.01/pi, 100 nodes agree with 340 to 2e-15 on the
    paper's grid; smaller nu needs more (numpy's hermgauss fails beyond 350).
    """
    t, x = np.broadcast_arrays(np.asarray(t, np.float64), np.asarray(x, np.float64))
    z, w = np.polynomial.hermite.hermgauss(nodes)
    y = np.pi * (x[..., None] - np.sqrt(4 * nu * t)[..., None] * z)
    exponent = np.log(w) - np.cos(y) / (2 * np.pi * nu)
    f = np.exp(exponent - exponent.max(axis=-1, keepdims=True))
    u = -(np.sin(y) * f).sum(axis=-1) / f.sum(axis=-1)
    return np.where(t == 0, -np.sin(np.pi * x), u)


def make_problem(n_f=10_000, n_u=100, seed=1234, nu=NU):
    """Returns the training and test data, built as in the paper's code.

    The test grid is x = linspace(-1, 1, 256) by t = 0, 0.01, ..., 0.99. N_u
    points are drawn from its initial row and boundary columns, and the
    collocation points are a Latin hypercube over the grid's bounds plus those
    N_u points. Every array has columns (t, x).
    """
    rng = np.random.default_rng(seed)
    t, x = np.arange(100) / 100, np.linspace(-1, 1, 256)
    tt, xx = np.meshgrid(t, x, indexing="ij")
    grid = np.stack([tt.ravel(), xx.ravel()], axis=1)
    lower, upper = grid.min(axis=0), grid.max(axis=0)
    edges = (tt == 0) | (np.abs(xx) == 1)
    tx_edges = np.unique(grid[edges.ravel()], axis=0)
    tx_u = tx_edges[rng.choice(len(tx_edges), n_u, replace=False)]
    u_u = burgers_exact(tx_u[:, 0], tx_u[:, 1], nu)[:, None]
    lhs = scipy.stats.qmc.LatinHypercube(d=2, seed=rng).random(n_f)
    tx_f = np.concatenate([lower + (upper - lower) * lhs, tx_u])
    u_grid = burgers_exact(grid[:, 0], grid[:, 1], nu)[:, None]
    return tx_f, tx_u, u_u, grid, u_grid


def burgers_residual(model, tx):
    """u_t + u u_x - nu u_xx of `model` at the points `tx` (columns t, x),
    the input derivatives by nested tapes."""
    with tf.GradientTape() as outer:
        outer.watch(tx)
        with tf.GradientTape() as inner:
            inner.watch(tx)
            u = model(tx)[:, 0]
        u_t, u_x = tf.unstack(inner.gradient(u, tx), axis=1)
    u_xx = outer.gradient(u_x, tx)[:, 1]
    return u_t + u * u_x - model.nu * u_xx


class BurgersPINN(kormos.BatchOptimizedModel):
    """u(t, x) as an MLP; the loss is MSE_u + MSE_f of the paper.

    `fit(tx_f)` takes the collocation points as its data; the initial and
    boundary points `tx_u` and their values `u_u` are constants of the model.
    """

    def __init__(self, *, tx_u, u_u, lower, upper, nu=NU, depth=8, width=20):
        super().__init__()
        dtype = keras.config.floatx()
        self.tx_u, self.u_u = tx_u.astype(dtype), u_u.astype(dtype)
        self.lower, self.upper = lower.astype(dtype), upper.astype(dtype)
        self.nu = nu
        self.hidden = [
            keras.layers.Dense(width, "tanh", kernel_initializer="glorot_normal")
            for _ in range(depth)
        ]
        self.out = keras.layers.Dense(1, kernel_initializer="glorot_normal")

    def call(self, tx):
        h = 2.0 * (tx - self.lower) / (self.upper - self.lower) - 1.0  # to [-1, 1]
        for layer in self.hidden:
            h = layer(h)
        return self.out(h)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        mse_f = tf.reduce_mean(burgers_residual(self, tf.convert_to_tensor(x)) ** 2)
        mse_u = tf.reduce_mean((self(self.tx_u) - self.u_u) ** 2)
        return mse_u + mse_f


class KiyaniBurgers(kormos.BatchOptimizedModel):
    """u(t, x) as an MLP on raw (t, x); Kiyani et al.'s loss.

    `fit(points)` takes `n_f` collocation, `n_0` initial and `n_b` boundary
    points, in that order (`sample_points` makes them; the targets are zero
    but for the initial values): MSE_f + 5 MSE_0 + 5 (MSE_left + MSE_right).
    """

    def __init__(self, *, n_f, n_0, n_b, nu=NU, depth=4, width=20):
        super().__init__()
        self.n_f, self.n_0, self.n_b, self.nu = n_f, n_0, n_b, nu
        self.hidden = [keras.layers.Dense(width, "tanh") for _ in range(depth)]
        self.out = keras.layers.Dense(1)

    def call(self, tx):
        h = tx
        for layer in self.hidden:
            h = layer(h)
        return self.out(h)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        tx = tf.convert_to_tensor(x)
        n_f, n_0 = self.n_f, self.n_0
        mse_f = tf.reduce_mean(burgers_residual(self, tx[:n_f]) ** 2)
        u_0 = self(tx[n_f : n_f + n_0])
        mse_0 = tf.reduce_mean((u_0 - y[n_f : n_f + n_0]) ** 2)
        u_b = self(tx[n_f + n_0 :])[:, 0]
        left = tf.cast(tx[n_f + n_0 :, 1] < 0, u_b.dtype)
        mse_left = tf.reduce_sum(left * u_b**2) / tf.reduce_sum(left)
        mse_right = tf.reduce_sum((1 - left) * u_b**2) / tf.reduce_sum(1 - left)
        return mse_f + 5.0 * mse_0 + 5.0 * (mse_left + mse_right)


def sample_points(rng, model=None, n_f=8000, n_0=500, n_b=500, candidates=50_000):
    """Returns Kiyani et al.'s `(points, targets)`: collocation points drawn
    uniformly (no `model`) or by RAD from the model's residual, then fresh
    uniform initial and boundary points."""
    tx = np.stack([rng.uniform(0, 1, candidates), rng.uniform(-1, 1, candidates)], 1)
    if model is None:
        chosen = tx[:n_f]
    else:
        points = tf.constant(tx, keras.config.floatx())
        r = np.abs(burgers_residual(model, points).numpy())
        weight = r / r.mean() + 1.0
        chosen = tx[rng.choice(candidates, n_f, replace=False, p=weight / weight.sum())]
    x_0 = rng.uniform(-1, 1, n_0)
    tx_0 = np.stack([np.zeros(n_0), x_0], 1)
    tx_b = np.stack([rng.uniform(0, 1, n_b), rng.choice([-1.0, 1.0], n_b)], 1)
    points = np.concatenate([chosen, tx_0, tx_b]).astype(keras.config.floatx())
    targets = np.zeros((len(points), 1), keras.config.floatx())
    targets[n_f : n_f + n_0, 0] = -np.sin(np.pi * x_0)
    return points, targets


class ErrorLog(keras.callbacks.Callback):
    """Records (iteration, seconds, loss, relative L2 error) every `every`
    iterations, and stops training after `minutes`: over one fit, or over
    several (`initial_epoch` continues the count), timed from the first."""

    def __init__(self, grid, u_grid, every, minutes=None):
        super().__init__()
        self.grid, self.u_grid, self.every = grid, u_grid, every
        self.seconds = None if minutes is None else 60 * minutes
        self.rows, self.iterations, self.start = [], 0, None

    @property
    def out_of_time(self):
        elapsed = time.perf_counter() - self.start
        return self.seconds is not None and elapsed > self.seconds

    def record(self, iteration, loss):
        u = self.model(self.grid.astype(keras.config.floatx())).numpy()
        error = np.linalg.norm(u - self.u_grid) / np.linalg.norm(self.u_grid)
        seconds = time.perf_counter() - self.start
        self.rows.append((iteration, seconds, loss, error))
        print(f"{iteration:10d} {seconds:9.1f} {loss:10.3e} {error:12.3e}", flush=True)

    def on_train_begin(self, logs=None):
        if self.start is None:
            self.start = time.perf_counter()
            self.record(0, float("nan"))

    def on_epoch_end(self, epoch, logs=None):
        self.iterations, self.loss = epoch + 1, logs["loss"]
        if (epoch + 1) % self.every == 0:
            self.record(epoch + 1, logs["loss"])
        if self.out_of_time:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.rows[-1][0] != self.iterations:
            self.record(self.iterations, self.loss)


QUASI_NEWTON = ("bfgs", "ssbfgs", "ssbroyden")


def fit_raissi(args, log):
    """The paper's data and network; one fit of `args.iterations`."""
    tx_f, tx_u, u_u, grid, _ = make_problem(args.collocation, seed=args.seed)
    model = BurgersPINN(
        tx_u=tx_u, u_u=u_u, lower=grid.min(axis=0), upper=grid.max(axis=0)
    )
    jit_compile = {"auto": "auto", "on": True, "off": False}[args.jit]
    model.compile(optimizer=args.method, jit_compile=jit_compile)
    options = {"gtol": 0.0}  # scipy's default, 1e-5, stops long before 1e-4
    if args.method == "l-bfgs-b":  # the paper's options
        options.update(maxfun=args.iterations, maxcor=50, maxls=50)
        options.update(ftol=np.finfo(float).eps)
    model.fit(tx_f, epochs=args.iterations, verbose=0, callbacks=[log], options=options)
    return model.optimizer.results[-1].message, model.optimizer.results[-1].nfev


def fit_kiyani(args, log, run=500):
    """Kiyani et al.: Adam, then quasi-Newton runs of `run` iterations with
    the points resampled (RAD) and the inverse Hessian carried between runs."""
    rng = np.random.default_rng(args.seed)
    model = KiyaniBurgers(n_f=8000, n_0=500, n_b=500)
    schedule = keras.optimizers.schedules.ExponentialDecay(5e-3, 1000, 0.98)
    model.compile(optimizer=keras.optimizers.Adam(
        schedule, beta_1=0.99, beta_2=0.999, epsilon=1e-20
    ))
    points, targets = sample_points(rng)
    for start in range(0, args.adam, run):  # full-batch, resampled like the runs
        steps = min(run, args.adam - start)
        model.fit(points, targets, batch_size=len(points), epochs=steps, verbose=0)
        points, targets = sample_points(rng, model)
    model.compile(optimizer=kormos.ScipyBatchOptimizer(
        method=args.method, warm_start=args.method in QUASI_NEWTON,
        options={"gtol": 0.0},
    ))
    done, nfev, stalls = 0, 0, 0
    while done < args.iterations and not (log.start and log.out_of_time):
        last = min(done + run, args.iterations)
        model.fit(points, targets, initial_epoch=done, epochs=last, verbose=0,
                  callbacks=[log])
        nfev += sum(result.nfev for result in model.optimizer.results)
        stalls = stalls + 1 if log.iterations == done else 0
        if stalls == 5:  # five samples in a row where no step could be made
            break
        done = log.iterations
        points, targets = sample_points(rng, model)
    return model.optimizer.results[-1].message, nfev


def plot(logs, path):
    """Draws relative L2 error against wall time from error logs (CSV files
    named <setup>_<method>.csv): one panel per setup, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name.rsplit("/", 1)[-1].removesuffix(".csv") for name in logs]
    setups = sorted({name.split("_", 1)[0] for name in names})
    fig, axes = plt.subplots(
        1, len(setups), figsize=(6 * len(setups), 4), squeeze=False
    )
    for ax, setup in zip(axes[0], setups):
        for name, log in zip(names, logs):
            if name.split("_", 1)[0] == setup:
                _, seconds, _, error = np.loadtxt(log, delimiter=",", skiprows=1).T
                ax.semilogy(seconds / 60, error, label=name.split("_", 1)[-1])
        if setup == "raissi":
            ax.axhline(PAPER_ERROR, color="k", ls="--", lw=1, label="paper: 6.7e-4")
        ax.set_xlabel("wall time (minutes)")
        ax.set_ylabel("relative L2 error")
        ax.set_title(f"Burgers' equation, {setup} setup")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", choices=["raissi", "kiyani"], default="raissi")
    parser.add_argument(
        "--method", choices=["l-bfgs-b", *QUASI_NEWTON], default="l-bfgs-b"
    )
    parser.add_argument(
        "--precision", choices=["float32", "float64"], default="float64"
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=50_000,
        help="solver iterations (both papers: 50,000)",
    )
    parser.add_argument("--minutes", type=float, default=None, help="wall-time budget")
    parser.add_argument(
        "--jit",
        choices=["auto", "on", "off"],
        default="auto",
        help="XLA: compile(jit_compile=...); 'auto' is kormos' choice (no XLA on CPUs)",
    )
    parser.add_argument("--collocation", type=int, default=10_000, help="N_f (raissi)")
    parser.add_argument("--adam", type=int, default=1000, help="Adam steps (kiyani)")
    parser.add_argument(
        "--threads", type=int, default=0, help="TensorFlow threads (0: all cores)"
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument(
        "--every",
        type=int,
        default=250,
        help="evaluate the error every this many iterations",
    )
    parser.add_argument("--log", default=None, help="write the error log to this CSV")
    parser.add_argument("--plot", default="burgers_pinn.png", help="output PNG path")
    parser.add_argument(
        "--plot-logs", nargs="+", default=None, metavar="CSV",
        help="only draw these error logs (from --log) into --plot",
    )
    args = parser.parse_args()
    if args.plot_logs:
        plot(args.plot_logs, args.plot)
        return

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    keras.config.set_floatx(args.precision)
    keras.config.set_dtype_policy(args.precision)
    keras.utils.set_random_seed(args.seed)
    _, _, _, grid, u_grid = make_problem(10, seed=args.seed)
    log = ErrorLog(grid, u_grid, args.every, args.minutes)
    print(" iteration   seconds      loss    rel. L2 error")
    fit = fit_kiyani if args.setup == "kiyani" else fit_raissi
    message, nfev = fit(args, log)
    print(f"{message} ({log.iterations} iterations, {nfev} evaluations)")
    log_path = args.log or f"{args.setup}_{args.method}.csv"
    np.savetxt(log_path, np.array(log.rows), delimiter=",", fmt="%.6g",
               header="iteration,seconds,loss,error", comments="")
    plot([log_path], args.plot)


if __name__ == "__main__":
    main()
