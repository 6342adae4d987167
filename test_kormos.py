"""Tests for kormos.py. Run: python -m pytest -q test_kormos.py"""

import contextlib
import functools
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scipy.optimize  # noqa: E402
import tensorflow as tf  # noqa: E402

import kormos  # noqa: E402

GRADIENT_METHODS = [
    "L-BFGS-B",
    "BFGS",
    "CG",
    "Newton-CG",
    "trust-ncg",
    "trust-krylov",
    "trust-constr",
    "trust-exact",
    "dogleg",
    "TNC",
    "SLSQP",
]
TIGHT = {
    "l-bfgs-b": {"gtol": 1e-12, "ftol": 1e-15},
    "bfgs": {"gtol": 1e-10},
    "cg": {"gtol": 1e-10},
    "newton-cg": {"xtol": 1e-12},
    "trust-ncg": {"gtol": 1e-10},
    "trust-krylov": {"gtol": 1e-8},
    "trust-constr": {"gtol": 1e-12, "xtol": 1e-14},
    "trust-exact": {"gtol": 1e-10},
    "dogleg": {"gtol": 1e-10},
    "tnc": {"gtol": 1e-12, "ftol": 1e-15, "xtol": 1e-15},
    "slsqp": {"ftol": 1e-15},
}


@contextlib.contextmanager
def floatx(dtype):
    """Builds layers in `dtype` inside the block, then restores float32."""
    keras.config.set_floatx(dtype)
    keras.config.set_dtype_policy(dtype)
    try:
        yield
    finally:
        keras.config.set_floatx("float32")
        keras.config.set_dtype_policy("float32")


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


@pytest.fixture(autouse=True, scope="session")
def ctrl_c_delivered():
    """The Ctrl-C tests send SIGINT to this process, which a shell that starts
    it in the background (`cmd &`) sets to be ignored: restore Python's
    handler, as in a terminal."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


@pytest.fixture
def float64():
    """Runs the whole test in float64: Keras casts compiled losses to floatx()."""
    with floatx("float64"):
        yield


def regression_data(n=200, d=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    w = rng.normal(size=d)
    y = x @ w + 0.5 + 0.1 * rng.normal(size=n)
    return x, y[:, None]


def linear_model(d=5, l2=1e-2, cls=kormos.BatchOptimizedSequentialModel, **kw):
    return cls(
        [
            keras.Input((d,)),
            keras.layers.Dense(
                1, kernel_regularizer=keras.regularizers.L2(l2) if l2 else None, **kw
            ),
        ]
    )


def ridge_solution(x, y, l2):
    """Closed form of mean((x w + b - y)^2) + l2 |w|^2 (float32-rounded l2)."""
    n, d = x.shape
    lam = effective_l2(l2)
    a = np.hstack([x, np.ones((n, 1))])
    h = 2 * a.T @ a / n + 2 * lam * np.diag([1.0] * d + [0.0])
    return np.linalg.solve(h, 2 * a.T @ y[:, 0] / n)


def effective_l2(l2):
    """The L2 factor Keras applies in float64 (3.14+ rounds it via float32)."""
    one = keras.ops.ones((1,), dtype="float64")
    return float(keras.regularizers.L2(l2)(one))


def breadth(values, fast=1, ids=None, unpack=False):
    """Parameters of which the first `fast` run in the fast test run
    (`-m "not slow"`) and the rest are marked `slow`."""
    ids = ids or [None] * len(values)
    return [
        pytest.param(
            *(value if unpack else [value]),
            id=i,
            marks=() if n < fast else pytest.mark.slow,
        )
        for n, (value, i) in enumerate(zip(values, ids))
    ]


def fit_without_progress(model, *args, **kwargs):
    """model.fit with verbose=0; a warning fails the test unless it expects it."""
    kwargs.setdefault("verbose", 0)
    return model.fit(*args, **kwargs)


def weights_of(model):
    return [np.array(w) for w in model.get_weights()]


# =============================================================================
# Metadata
# =============================================================================


def test_version():
    assert re.fullmatch(r"\d+\.\d+\.\d+", kormos.__version__)


def test_all_public_names_in___all__():
    public = {
        name
        for name, value in vars(kormos).items()
        if not name.startswith("_")
        and getattr(value, "__module__", "kormos") == "kormos"
        and (callable(value) or isinstance(value, tuple))
    }
    assert public <= set(kormos.__all__)
    assert all(hasattr(kormos, name) for name in kormos.__all__)


# Functions allowed to touch a private attribute of Keras, TensorFlow or scipy,
# each with a comment saying why and which source it mirrors.
PRIVATE_API_HELPERS = {
    "_all_layers": ["_flatten_layers"],
    "_resumed_epoch": ["_initial_epoch"],
    "_wolfe_line_search": ["_line_search_wolfe12", "_LineSearchError"],
}


def test_no_private_imports_and_private_attributes_only_in_isolated_helpers():
    import ast

    tree = ast.parse(Path(kormos.__file__).read_text())
    imported = [
        alias.name if isinstance(node, ast.Import) else node.module
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    ]
    private = ("keras.src", "tensorflow.python", "scipy.optimize._")
    assert not [name for name in imported if name.startswith(private)]
    # Private names kormos defines itself: functions, classes, attributes.
    own = {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.ClassDef))
    } | {
        node.attr
        for statement in ast.walk(tree)
        if isinstance(statement, (ast.Assign, ast.AugAssign))
        for target in getattr(statement, "targets", [getattr(statement, "target", None)])
        for node in ast.walk(target)
        if isinstance(node, ast.Attribute)
    }

    def private_names(node):
        """Private attribute names read at `node`: x._name or getattr(x, "_name")."""
        if isinstance(node, ast.Attribute):
            yield node.attr
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", None) == "getattr"
            and isinstance(node.args[1], ast.Constant)
        ):
            yield node.args[1].value

    foreign = {}
    for function in ast.walk(tree):
        if isinstance(function, ast.FunctionDef):
            for node in ast.walk(function):
                for name in private_names(node):
                    if name.startswith("_") and not name.startswith("__") and name not in own:
                        foreign.setdefault(name, set()).add(function.name)
    foreign.pop("_getframe", None)  # sys._getframe: documented CPython API
    foreign.pop("_replace", None)  # namedtuple._replace: documented Python API
    allowed = {
        attr: {helper} for helper, attrs in PRIVATE_API_HELPERS.items() for attr in attrs
    }
    assert foreign == allowed


def test_seed_compatibility_names():
    from kormos.models import BatchOptimizedSequentialModel

    assert BatchOptimizedSequentialModel is kormos.BatchOptimizedSequentialModel
    assert kormos.models.BatchOptimizedModel is kormos.BatchOptimizedModel
    assert kormos.optimizers.ScipyBatchOptimizer is kormos.ScipyBatchOptimizer
    assert kormos.optimizers.BatchOptimizer is kormos.BatchOptimizer
    assert kormos.optimizers.get is kormos.get


# =============================================================================
# Weight packing
# =============================================================================


def test_pack_unpack_round_trip():
    model = linear_model(d=3)
    variables = model.trainable_variables
    x = kormos.pack_weights(variables)
    assert x.dtype == np.float64 and x.shape == (4,)
    kormos.unpack_weights(np.arange(4.0), variables)
    np.testing.assert_array_equal(variables[0].numpy().ravel(), [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(variables[1].numpy(), [3.0])
    np.testing.assert_array_equal(kormos.pack_weights(variables), np.arange(4.0))


def test_unpack_rejects_wrong_size_and_leaves_weights():
    model = linear_model(d=3)
    before = weights_of(model)
    with pytest.raises(ValueError, match=r"size 4.*x.shape=\(5,\)"):
        kormos.unpack_weights(np.zeros(5), model.trainable_variables)
    for a, b in zip(before, weights_of(model)):
        np.testing.assert_array_equal(a, b)


# =============================================================================
# Identifiers
# =============================================================================


@pytest.mark.parametrize("name", ["l-bfgs-b", "L-BFGS-B", "Newton-CG", "tnc", "SLSQP"])
def test_get_accepts_method_names_in_any_case(name):
    optimizer = kormos.get(name)
    assert isinstance(optimizer, kormos.ScipyBatchOptimizer)
    assert optimizer.method == name.lower()


def test_get_scipy_and_instances():
    assert kormos.get("scipy").method == "l-bfgs-b"
    optimizer = kormos.ScipyBatchOptimizer(method="cg")
    assert kormos.get(optimizer) is optimizer


def test_get_unknown_lists_valid_names():
    with pytest.raises(
        ValueError, match="l-bfgs-b.*newton-cg.*Received: identifier='lbfgs'"
    ):
        kormos.get("lbfgs")


# =============================================================================
# The full-data objective, its gradient and Hessian-vector products
# =============================================================================


def mlp_problem(n=64, batch_size=None, l1=0.0):
    """A small tanh MLP with L2 (and optionally L1) regularization, bound."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 3))
    y = np.sin(x.sum(axis=1, keepdims=True))
    model = kormos.BatchOptimizedSequentialModel(
        [
            keras.Input((3,)),
            keras.layers.Dense(
                4,
                activation="tanh",
                kernel_regularizer=keras.regularizers.L1L2(l1, 1e-3),
            ),
            keras.layers.Dense(1),
        ]
    )
    model.compile(loss="mse", optimizer="l-bfgs-b")
    optimizer = model.optimizer.build(model, x, y, batch_size=batch_size)
    return model, optimizer, x, y


def finite_difference_gradient(f, x, eps):
    g = np.zeros_like(x)
    for i in range(x.size):
        e = np.zeros_like(x)
        e[i] = eps
        g[i] = (f(x + e) - f(x - e)) / (2 * eps)
    return g


@pytest.mark.parametrize(
    "dtype,eps,rtol",
    breadth([("float64", 1e-6, 1e-6), ("float32", 1e-2, 3e-2)], unpack=True),
)
def test_gradient_matches_finite_differences(dtype, eps, rtol):
    with floatx(dtype):
        _, optimizer, _, _ = mlp_problem()
        x0 = optimizer.get_weights()
        _, g = optimizer.func_and_grad(x0)
        fd = finite_difference_gradient(optimizer.func, x0, eps)
    np.testing.assert_allclose(g, fd, rtol=rtol, atol=rtol * np.abs(fd).max())


@pytest.mark.parametrize(
    "dtype,eps,rtol",
    breadth([("float64", 1e-6, 1e-6), ("float32", 1e-2, 3e-2)], unpack=True),
)
def test_hessp_matches_finite_differences_of_gradient(dtype, eps, rtol):
    with floatx(dtype):
        _, optimizer, _, _ = mlp_problem()
        x0 = optimizer.get_weights()
        v = np.random.default_rng(2).normal(size=x0.size)
        hv = optimizer.hessp(x0, v)
        fd = (optimizer.grad(x0 + eps * v) - optimizer.grad(x0 - eps * v)) / (2 * eps)
    np.testing.assert_allclose(hv, fd, rtol=rtol, atol=rtol * np.abs(fd).max())
    assert optimizer.hessp_evals == 1


def test_objective_equals_evaluate_and_ignores_batch_size(float64):
    model, optimizer, x, y = mlp_problem(n=70, l1=1e-3)
    x0 = optimizer.get_weights()
    f_full = optimizer.func(x0)
    reported = model.evaluate(x, y, batch_size=70, verbose=0)
    np.testing.assert_allclose(f_full, reported, rtol=1e-6)
    for batch_size in (16, 33):
        ragged = model.optimizer.build(model, x, y, batch_size=batch_size)
        np.testing.assert_allclose(ragged.func(x0), f_full, rtol=1e-12)
        np.testing.assert_allclose(
            ragged.grad(x0), optimizer.grad(x0), rtol=1e-10, atol=1e-14
        )


def test_evaluations_are_cached_and_counted():
    _, optimizer, _, _ = mlp_problem()
    x0 = optimizer.get_weights()
    optimizer.func_and_grad(x0)
    optimizer.func(x0)
    optimizer.grad(x0)
    assert optimizer.fg_evals == 1
    optimizer.func(x0 + 1.0)
    assert optimizer.fg_evals == 2


def test_unbound_optimizer_says_to_build_it():
    optimizer = kormos.ScipyBatchOptimizer()
    for call in (
        lambda: optimizer.func(np.zeros(3)),
        lambda: optimizer.set_weights(np.zeros(3)),
    ):
        with pytest.raises(RuntimeError, match="not bound to a model"):
            call()


def test_set_weights_rejects_wrong_size():
    _, optimizer, _, _ = mlp_problem()
    with pytest.raises(ValueError, match="flat vector of size 21"):
        optimizer.set_weights(np.zeros(3))


# =============================================================================
# Solvers reach known optima
# =============================================================================


# scipy's trlib (trust-krylov) multiplies a NaN inside its subproblem solver
# once the gradient vanishes; scipy's result is still right.
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("method", breadth(GRADIENT_METHODS, fast=2))
def test_every_gradient_method_reaches_least_squares_optimum(method, float64):
    x, y = regression_data()
    model = linear_model(l2=1e-2)
    model.compile(loss="mse", optimizer=method)
    history = fit_without_progress(model, x, y, epochs=200, options=TIGHT[method.lower()])
    solution = ridge_solution(x, y, 1e-2)
    np.testing.assert_allclose(model.optimizer.get_weights(), solution, rtol=1e-6)
    assert len(history.history["loss"]) >= 1
    assert {"loss", "grad", "fg_evals", "hessp_evals"} <= set(history.history)


def test_l2_logistic_regression_matches_scikit_learn(float64):
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression

    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    n, c = len(y), 1.0
    # sklearn minimizes C * sum(logloss) + |w|^2 / 2 ==  mean logloss + |w|^2/(2 C n)
    l2 = float(np.float32(1.0 / (2 * c * n)))
    reference = LogisticRegression(C=1.0 / (2 * l2 * n), tol=1e-12, max_iter=10000)
    reference.fit(x, y)
    model = kormos.BatchOptimizedSequentialModel(
        [
            keras.Input((x.shape[1],)),
            keras.layers.Dense(
                1, activation="sigmoid", kernel_regularizer=keras.regularizers.L2(l2)
            ),
        ]
    )
    model.compile(loss="binary_crossentropy", optimizer="l-bfgs-b")
    fit_without_progress(model, x, y[:, None], epochs=500, options=TIGHT["l-bfgs-b"])
    coef = model.optimizer.get_weights()
    expected = np.concatenate([reference.coef_.ravel(), reference.intercept_])
    np.testing.assert_allclose(
        coef, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max()
    )


# =============================================================================
# The 2022 README examples
# =============================================================================


def readme_regression_data(rank=50):
    np.random.seed(1)
    w = np.random.normal(size=rank)
    X = np.random.normal(size=(1000, rank))
    y = np.expand_dims(X.dot(w), axis=1)
    Xval = np.random.normal(size=(1000, rank))
    yval = np.expand_dims(Xval.dot(w), axis=1)
    return w, X, y, Xval, yval


@pytest.mark.slow
def test_readme_sequential_lbfgs_example_reproduces_its_table():
    rank = 50
    w, X, y, Xval, yval = readme_regression_data(rank)
    model = kormos.models.BatchOptimizedSequentialModel()
    with pytest.warns(UserWarning, match="input_shape"):  # Keras 3 on 2022 code
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
    model.compile(loss=loss, optimizer="l-bfgs-b", metrics=["mean_absolute_error"])
    with pytest.warns(scipy.optimize.OptimizeWarning, match="maxcors"):
        history = model.fit(
            x=X,
            y=y,
            epochs=10,
            validation_data=(Xval, yval),
            options={"maxcors": 3},
            verbose=0,
        )
    best_fit_weights = np.reshape(model.trainable_weights[0].numpy(), (1, -1))
    assert np.allclose(best_fit_weights, w, 1e-2)
    h = history.history
    # The 2022 table: loss 79.121972 at the first iteration, 0.046990 at the end.
    np.testing.assert_allclose(h["loss"][0], 79.121972, rtol=1e-5)
    np.testing.assert_allclose(h["grad"][0], 17.946233, rtol=1e-5)
    np.testing.assert_allclose(h["loss"][-1], 0.046990, atol=5e-7)
    np.testing.assert_allclose(h["val_loss"][-1], 0.046992, atol=5e-7)
    assert h["fg_evals"][:3] == [2, 3, 4]
    assert set(h) == {
        "loss",
        "grad",
        "fg_evals",
        "hessp_evals",
        "mean_absolute_error",
        "val_loss",
        "val_mean_absolute_error",
    }

    # Recompile with Adam: same weights, plain Keras training.
    before = weights_of(model)
    model.compile(loss=model.loss, optimizer="adam", metrics=["mean_absolute_error"])
    np.testing.assert_array_equal(before[0], weights_of(model)[0])
    model.set_weights([np.random.random(size=(rank, 1))])
    history = model.fit(x=X, y=y, epochs=2, validation_data=(Xval, yval), verbose=0)
    assert set(history.history) == {
        "loss",
        "mean_absolute_error",
        "val_loss",
        "val_mean_absolute_error",
    }


@pytest.mark.slow
def test_readme_functional_newton_cg_example():
    rank = 50
    w, X, y, Xval, yval = readme_regression_data(rank)
    model_input = keras.Input(shape=(rank,), name="input")
    with pytest.warns(UserWarning, match="input_shape"):  # Keras 3 on 2022 code
        model_output = keras.layers.Dense(
            units=1,
            input_shape=(rank,),
            activation=None,
            use_bias=False,
            kernel_regularizer=keras.regularizers.L2(1e-3),
            kernel_initializer="ones",
        )(model_input)
    model = kormos.models.BatchOptimizedModel(inputs=model_input, outputs=model_output)
    loss = keras.losses.MeanSquaredError()
    model.compile(loss=loss, optimizer="newton-cg", metrics=["mean_absolute_error"])
    with pytest.warns(UserWarning, match="float32 stall"):  # 2022's float32 model
        history = model.fit(x=X, y=y, epochs=10, validation_data=(Xval, yval), verbose=0)
    best_fit_weights = np.reshape(model.trainable_weights[0].numpy(), (1, -1))
    assert np.allclose(best_fit_weights, w, 1e-2)
    assert isinstance(model, kormos.BatchOptimizedModel)
    assert history.history["hessp_evals"][-1] > 0
    assert history.history["grad"][-1] < 1e-4


def matrix_factorization_model(rank, num_users, num_items, **kwargs):
    # The 2022 README's build_model, unchanged.
    inputs = [
        keras.Input(shape=(1,), name="user", dtype=tf.int32),
        keras.Input(shape=(1,), name="item", dtype=tf.int32),
    ]
    user_embedding = keras.layers.Embedding(
        input_dim=(num_users + 1),
        output_dim=rank,
        mask_zero=True,
        embeddings_initializer="normal",
        embeddings_regularizer=keras.regularizers.L2(1e-5),
        name="user_embedding",
    )
    item_embedding = keras.layers.Embedding(
        input_dim=(num_items + 1),
        output_dim=rank,
        mask_zero=True,
        embeddings_initializer="normal",
        embeddings_regularizer=keras.regularizers.L2(1e-5),
        name="item_embedding",
    )
    features = [user_embedding(inputs[0]), item_embedding(inputs[1])]
    output = keras.layers.Dot(axes=2, normalize=False)(features)
    return kormos.models.BatchOptimizedModel(inputs=inputs, outputs=output, **kwargs)


@pytest.mark.slow
def test_readme_matrix_factorization_example_aligns_targets():
    rng = np.random.default_rng(0)
    num_users, num_items, n = 30, 40, 600
    x = np.stack(
        [rng.integers(1, num_users + 1, n), rng.integers(1, num_items + 1, n)], 1
    )
    y = rng.random(n)  # shape (n,) against an output of shape (n, 1, 1)
    model = matrix_factorization_model(3, num_users, num_items)
    model.compile(loss=tf.keras.losses.MeanSquaredError(), optimizer="l-bfgs-b")
    history = model.fit(
        x=(x[:500, 0], x[:500, 1]),
        y=y[:500],
        batch_size=2**7,
        epochs=5,
        verbose=0,
        validation_data=((x[500:, 0], x[500:, 1]), y[500:]),
    )
    # The loss is the per-rating MSE, not a broadcast (n, 1, n) one.
    pred = model.predict((x[:500, 0], x[:500, 1]), verbose=0).reshape(-1)
    reg = sum(float(loss) for loss in model.losses)
    np.testing.assert_allclose(
        history.history["loss"][-1], np.mean((pred - y[:500]) ** 2) + reg, rtol=1e-5
    )
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert "val_loss" in history.history


# =============================================================================
# Model classes, compile and recompile
# =============================================================================


def test_functional_and_subclassing_api_in_one_process():
    inputs = keras.Input((5,))
    functional = kormos.BatchOptimizedModel(inputs, keras.layers.Dense(1)(inputs))

    class Subclassed(kormos.BatchOptimizedModel):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(1)

        def call(self, x):
            return self.dense(x)

    subclassed = Subclassed()
    x, y = regression_data()
    for model in (functional, subclassed):
        assert isinstance(model, kormos.BatchOptimizedModel)
        model.compile(loss="mse", optimizer="l-bfgs-b")
        history = fit_without_progress(model, x, y, epochs=5)
        assert history.history["loss"][-1] < history.history["loss"][0]
    assert isinstance(linear_model(), kormos.BatchOptimizedModel)


class Scaled(kormos.BatchOptimizedModel):
    """A subclass whose constructor takes two positional arguments."""

    def __init__(self, units, scale):
        super().__init__()
        self.dense, self.scale = keras.layers.Dense(units), scale

    def call(self, x):
        return self.scale * self.dense(x)


def test_subclass_with_two_positional_constructor_arguments_like_keras():
    class PlainScaled(keras.Model):
        def __init__(self, units, scale):
            super().__init__()
            self.dense, self.scale = keras.layers.Dense(units), scale

    plain = PlainScaled(3, 2.0)
    model = Scaled(3, 2.0)
    assert model.scale == plain.scale == 2.0
    assert Scaled.__bases__ == (kormos.BatchOptimizedModel,)  # not rewritten
    x, y = regression_data(n=40, d=5)
    model.compile(loss="mse", optimizer="l-bfgs-b")
    assert len(fit_without_progress(model, x, np.repeat(y, 3, axis=1), epochs=2).history["loss"]) == 2
    inputs = keras.Input((5,))
    functional = kormos.BatchOptimizedModel(inputs, keras.layers.Dense(1)(inputs))
    assert isinstance(functional, kormos.BatchOptimizedModel)


@pytest.mark.slow
def test_model_overriding_compute_loss_trains_on_that_loss(float64):
    class MeanAbsolute(kormos.BatchOptimizedSequentialModel):
        def compute_loss(
            self, x=None, y=None, y_pred=None, sample_weight=None, training=True
        ):
            return keras.ops.mean(keras.ops.abs(y_pred - y))

    x, y = regression_data(n=101)
    model = MeanAbsolute([keras.Input((5,)), keras.layers.Dense(1)])
    model.compile(optimizer="powell")
    fit_without_progress(model, x, y, epochs=50, options={"xtol": 1e-10, "ftol": 1e-12})
    w = model.optimizer.get_weights()
    residual = x @ w[:5] + w[5] - y[:, 0]
    assert np.mean(np.abs(residual)) < 0.1
    # The L1 fit passes through data points: its median residual is ~0.
    assert abs(np.median(residual)) < 1e-3


@pytest.mark.slow
def test_evaluate_with_1d_targets_after_fit_with_validation():
    x, y = regression_data()
    model = linear_model()
    model.compile(loss="mse", optimizer="l-bfgs-b")
    history = fit_without_progress(model, x, y[:, 0], epochs=3, validation_data=(x, y[:, 0]))
    np.testing.assert_allclose(
        model.evaluate(x, y[:, 0], batch_size=200, verbose=0),
        history.history["val_loss"][-1],
        rtol=1e-5,
    )


@pytest.mark.slow
def test_recompile_switches_between_adam_and_lbfgs_keeping_weights():
    x, y = regression_data()
    model = linear_model()
    model.compile(loss="mse", optimizer="adam")
    adam_history = model.fit(x, y, epochs=2, verbose=0)
    assert "grad" not in adam_history.history
    after_adam = weights_of(model)
    model.compile(loss="mse", optimizer="l-bfgs-b")
    for a, b in zip(after_adam, weights_of(model)):
        np.testing.assert_array_equal(a, b)
    lbfgs_history = fit_without_progress(model, x, y, epochs=20)
    assert lbfgs_history.history["loss"][-1] < adam_history.history["loss"][-1]
    model.compile(loss="mse", optimizer=keras.optimizers.SGD(1e-3))
    history = model.fit(x, y, epochs=1, verbose=0)
    np.testing.assert_allclose(
        history.history["loss"][0], lbfgs_history.history["loss"][-1], rtol=0.05
    )


@pytest.mark.slow
def test_adam_path_matches_plain_keras():
    x, y = regression_data()
    histories = []
    for cls in (keras.Sequential, kormos.BatchOptimizedSequentialModel):
        keras.utils.set_random_seed(3)
        model = cls([keras.Input((5,)), keras.layers.Dense(1)])
        model.compile(loss="mse", optimizer="adam")
        histories.append(model.fit(x, y, epochs=3, verbose=0, shuffle=False).history)
    np.testing.assert_allclose(histories[0]["loss"], histories[1]["loss"], rtol=1e-4)


# =============================================================================
# Data: tf.data, several inputs and outputs, weights
# =============================================================================


def two_in_two_out_model():
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    h = keras.layers.Concatenate()([a, b])
    out1 = keras.layers.Dense(1, name="out1")(h)
    out2 = keras.layers.Dense(1, name="out2", kernel_regularizer="l2")(h)
    return kormos.BatchOptimizedModel(inputs=[a, b], outputs=[out1, out2])


def two_in_two_out_data(n=90):
    rng = np.random.default_rng(4)
    xa, xb = rng.normal(size=(n, 3)), rng.normal(size=(n, 2))
    y1 = xa.sum(1, keepdims=True)
    y2 = (xb**2).sum(1, keepdims=True)
    return xa, xb, y1, y2, rng.random(n)


@pytest.mark.parametrize(
    "loss_weights", breadth([[1.0, 0.25], {"out1": 1.0, "out2": 0.25}], ids=["list", "dict"])
)
def test_multi_input_multi_output_objective_equals_evaluate(loss_weights, float64):
    xa, xb, y1, y2, sw = two_in_two_out_data()
    model = two_in_two_out_model()
    model.compile(loss=["mse", "mae"], loss_weights=loss_weights, optimizer="bfgs")
    history = fit_without_progress(
        model, [xa, xb], [y1, y2], sample_weight=sw, epochs=3, batch_size=32
    )
    reported = model.evaluate(
        [xa, xb], [y1, y2], sample_weight=sw, batch_size=32, verbose=0, return_dict=True
    )
    np.testing.assert_allclose(history.history["loss"][-1], reported["loss"], rtol=1e-6)


@pytest.mark.slow
def test_dict_inputs_and_dataset_inputs_give_the_same_objective(float64):
    xa, xb, y1, y2, sw = two_in_two_out_data()
    losses = []
    for make in (
        lambda: ({"a": xa, "b": xb}, (y1, y2), sw),
        lambda: (
            tf.data.Dataset.from_tensor_slices(
                ({"a": xa, "b": xb}, (y1, y2), sw)
            ).batch(25),
        ),
    ):
        keras.utils.set_random_seed(5)
        model = two_in_two_out_model()
        model.compile(loss="mse", optimizer="l-bfgs-b")
        args = make()
        if len(args) == 3:
            history = fit_without_progress(
                model, args[0], args[1], sample_weight=args[2], epochs=4, batch_size=25
            )
        else:
            history = fit_without_progress(model, args[0], epochs=4)
        losses.append(history.history["loss"])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-10)


def test_class_weight_equals_the_matching_sample_weight(float64):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(120, 4))
    labels = (x[:, 0] + 0.3 * rng.normal(size=120) > 0.4).astype(int)
    class_weight = {0: 1.0, 1: 3.0}
    histories = []
    for kwargs in (
        {"class_weight": class_weight},
        {"sample_weight": np.where(labels == 1, 3.0, 1.0)},
    ):
        keras.utils.set_random_seed(7)
        model = kormos.BatchOptimizedSequentialModel(
            [keras.Input((4,)), keras.layers.Dense(2, activation="softmax")]
        )
        model.compile(loss="categorical_crossentropy", optimizer="l-bfgs-b")
        one_hot = keras.utils.to_categorical(labels, 2)
        histories.append(fit_without_progress(model, x, one_hot, epochs=5, **kwargs).history)
    np.testing.assert_allclose(histories[0]["loss"], histories[1]["loss"], rtol=1e-12)


def test_class_weight_on_a_dataset_equals_class_weight_on_arrays(float64):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(120, 4))
    one_hot = keras.utils.to_categorical((x[:, 0] > 0.4).astype(int), 2)
    losses = []
    for data in (
        (x, one_hot),
        (tf.data.Dataset.from_tensor_slices((x, one_hot)).batch(50),),
    ):
        keras.utils.set_random_seed(7)
        model = kormos.BatchOptimizedSequentialModel(
            [keras.Input((4,)), keras.layers.Dense(2, activation="softmax")]
        )
        model.compile(loss="categorical_crossentropy", optimizer="l-bfgs-b")
        history = fit_without_progress(model, *data, epochs=4, class_weight={0: 1.0, 1: 3.0})
        losses.append(history.history["loss"])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-10)


# =============================================================================
# Callbacks, progress, metrics, validation
# =============================================================================

STOP_METHODS = [
    "L-BFGS-B",
    "SSBroyden",
    "TNC",
    "Newton-CG",
    "trust-constr",
    "SLSQP",
    "Nelder-Mead",
    "COBYLA",
]


@pytest.mark.parametrize("method", breadth(STOP_METHODS, fast=2))
def test_stop_training_ends_the_solver_after_that_iteration(method):
    x, y = regression_data()
    model = linear_model()
    model.compile(loss="mse", optimizer=method)

    def stop_at_third(epoch, logs):
        if epoch == 2:
            model.stop_training = True

    history = fit_without_progress(
        model,
        x,
        y,
        epochs=50,
        callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=stop_at_third)],
    )
    assert len(history.history["loss"]) == 3
    assert model.optimizer.results[-1].status == 99


def test_early_stopping_stops_the_solver():
    x, y = regression_data()
    model = linear_model()
    model.compile(loss="mse", optimizer="cg")
    stopper = keras.callbacks.EarlyStopping(monitor="loss", min_delta=1e9, patience=1)
    history = fit_without_progress(model, x, y, epochs=50, callbacks=[stopper])
    assert len(history.history["loss"]) == 2
    assert stopper.stopped_epoch == 1


@pytest.mark.slow
def test_model_holds_the_iterate_during_on_epoch_end(float64):
    x, y = regression_data()
    model = linear_model()
    model.compile(loss="mse", optimizer="l-bfgs-b")
    seen = []

    def check(epoch, logs):
        seen.append((logs["loss"], model.evaluate(x, y, batch_size=200, verbose=0)))

    fit_without_progress(
        model,
        x,
        y,
        epochs=6,
        callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=check)],
    )
    assert len(seen) == 6
    for logged, evaluated in seen:
        np.testing.assert_allclose(logged, evaluated, rtol=1e-8)


def test_weights_a_callback_changes_do_not_outlive_the_fit(float64):
    """After fit(), the model holds the last row's iterate, even where a
    callback scribbled on the weights after the solver evaluated them."""
    x, y = regression_data()
    model = linear_model()
    model.compile(loss="mse", optimizer="l-bfgs-b")
    iterates = []

    def scribble(epoch, logs):
        iterates.append(model.optimizer.get_weights())
        model.set_weights([np.zeros_like(w) for w in model.get_weights()])
        model.stop_training = epoch == 1

    callback = keras.callbacks.LambdaCallback(on_epoch_end=scribble)
    fit_without_progress(model, x, y, epochs=3, callbacks=[callback])
    assert len(iterates) == 2
    np.testing.assert_array_equal(model.optimizer.get_weights(), iterates[-1])


def test_training_metrics_in_every_row_without_extra_passes(float64):
    x, y = regression_data()
    model = linear_model()
    model.compile(
        loss="mse",
        optimizer="l-bfgs-b",
        metrics=["mae", keras.metrics.RootMeanSquaredError()],
    )
    history = fit_without_progress(model, x, y, epochs=8)
    h = history.history
    assert len(h["mae"]) == len(h["loss"]) == len(h["root_mean_squared_error"])
    reported = model.evaluate(x, y, batch_size=200, verbose=0, return_dict=True)
    np.testing.assert_allclose(h["mae"][-1], reported["mae"], rtol=1e-8)
    np.testing.assert_allclose(
        h["root_mean_squared_error"][-1], reported["root_mean_squared_error"], rtol=1e-8
    )
    # Every evaluation is one the solver asked for: no extra pass for metrics.
    assert model.optimizer.fg_evals == model.optimizer.results[-1].nfev
    assert h["fg_evals"][-1] == model.optimizer.fg_evals


@pytest.mark.slow
def test_validation_split_freq_and_batch_size(float64):
    x, y = regression_data(n=100)
    model = linear_model()
    model.compile(loss="mse", optimizer="cg", metrics=["mae"])
    history = fit_without_progress(
        model,
        x,
        y,
        epochs=6,
        validation_split=0.2,
        validation_freq=2,
        validation_batch_size=7,
        options={"gtol": 1e-14},
    )
    h = history.history
    assert len(h["loss"]) == 6 and len(h["val_loss"]) == 3
    held_out = model.evaluate(x[80:], y[80:], verbose=0, return_dict=True)
    np.testing.assert_allclose(h["val_loss"][-1], held_out["loss"], rtol=1e-8)
    np.testing.assert_allclose(h["val_mae"][-1], held_out["mae"], rtol=1e-8)
    trained_on = model.evaluate(x[:80], y[:80], verbose=0, return_dict=True)["loss"]
    np.testing.assert_allclose(h["loss"][-1], trained_on, rtol=1e-8)


def test_initial_epoch_counts_like_keras():
    x, y = regression_data()
    model = linear_model()
    model.compile(loss="mse", optimizer="cg")
    epochs = []
    callback = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda e, logs: epochs.append(e)
    )
    history = fit_without_progress(
        model,
        x,
        y,
        epochs=5,
        initial_epoch=2,
        callbacks=[callback],
        options={"gtol": 1e-14},
    )
    assert epochs == [2, 3, 4]
    assert len(history.history["loss"]) == 3


def test_initial_epoch_with_maxiter_and_no_epochs_runs_the_rest_without_warning():
    """Defect A: maxiter is the last epoch's index when `epochs` is not given."""
    x, y = regression_data()
    model = linear_model()
    model.compile(loss="mse", optimizer="cg")
    history = fit_without_progress(
        model, x, y, initial_epoch=3, options={"maxiter": 10, "gtol": 1e-14}
    )
    assert history.epoch == list(range(3, 10))


@pytest.mark.parametrize("epochs", [10, [10], [4, 6]], ids=["scalar", "list", "chain"])
def test_initial_epoch_counts_the_same_for_scalar_and_list_epochs_as_in_keras(epochs):
    """Defect B: epochs 10 from initial_epoch 3 are epochs 3..9, however the
    budget is written (a chain counts its epochs through its runs)."""
    x, y = regression_data()
    keras_model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(1)])
    keras_model.compile(loss="mse", optimizer="adam")
    expected = keras_model.fit(x, y, epochs=10, initial_epoch=3, verbose=0).epoch
    model = linear_model()
    model.compile(loss="mse", optimizer="cg")
    method = ["cg", "bfgs"] if epochs == [4, 6] else None
    history = fit_without_progress(
        model, x, y, epochs=epochs, initial_epoch=3, method=method,
        options={"gtol": 1e-14},
    )
    assert history.epoch == expected == list(range(3, 10))
    if method:  # the first run had 1 epoch left of its 4, the second all 6
        assert [r.nit for r in model.optimizer.results] == [1, 6]


def test_initial_epoch_past_the_budget_runs_nothing_like_keras():
    x, y = regression_data()
    keras_model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(1)])
    keras_model.compile(loss="mse", optimizer="adam")
    model = linear_model()
    model.compile(loss="mse", optimizer="l-bfgs-b")
    before = weights_of(model)
    for m in (keras_model, model):
        assert fit_without_progress(m, x, y, epochs=3, initial_epoch=5).epoch == []
    assert all(np.array_equal(a, b) for a, b in zip(before, weights_of(model)))


def test_a_maxiter_epochs_conflict_warns_once_per_fit():
    """Defect D: the run plan is made once, so its warning comes once."""
    x, y = regression_data()
    model = linear_model()
    model.compile(loss="mse", optimizer="l-bfgs-b")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_without_progress(model, x, y, epochs=4, options={"maxiter": 25})
    messages = [str(w.message) for w in caught]
    assert len([m for m in messages if "both set the iteration budget" in m]) == 1


def test_callbacks_see_an_iterations_evaluations_between_its_begin_and_end():
    """on_epoch_begin(k) comes before iteration k's evaluations, as in Keras,
    so a callback can time an epoch (or a step)."""
    x, y = regression_data()
    counter = CountsForwardPasses()
    model = kormos.BatchOptimizedSequentialModel(
        [keras.Input((5,)), counter, keras.layers.Dense(1)]
    )
    model.compile(loss="mse", optimizer="l-bfgs-b")
    events, timer = [], {}

    def record(name):
        return lambda epoch, logs=None: events.append(
            (name, epoch, int(counter.count.numpy()))
        )

    slow = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda e, logs=None: timer.update({e: time.perf_counter()}),
        on_epoch_end=lambda e, logs=None: timer.update({e: time.perf_counter() - timer[e]}),
    )
    callback = keras.callbacks.LambdaCallback(
        on_epoch_begin=record("begin"), on_train_batch_begin=record("batch_begin"),
        on_train_batch_end=record("batch_end"), on_epoch_end=record("end"),
    )
    history = fit_without_progress(model, x, y, epochs=5, callbacks=[callback, slow])
    names = [name for name, _, _ in events]
    assert names == ["begin", "batch_begin", "batch_end", "end"] * len(history.epoch)
    for (_, epoch, before), (_, _, after) in zip(events[::4], events[3::4]):
        assert after > before, (epoch, events)  # the evaluations ran in between
    assert all(timer[e] > 0 for e in history.epoch)


def test_the_model_is_never_run_eagerly_in_fit_like_keras(float64):
    """keras-opt's graph-mode test, with a validation set, metrics and an
    unbuilt subclassed model: every call of the model is traced."""

    class GraphOnly(keras.layers.Layer):
        def call(self, x):
            assert not tf.executing_eagerly(), "called eagerly"
            return x

    class Unbuilt(kormos.BatchOptimizedModel):
        def __init__(self):
            super().__init__()
            self.check, self.dense = GraphOnly(), keras.layers.Dense(1)

        def call(self, x):
            return self.dense(self.check(x))

    x, y = regression_data()
    for model in (Unbuilt(), linear_model(cls=kormos.BatchOptimizedSequentialModel)):
        if isinstance(model, keras.Sequential):
            model = kormos.BatchOptimizedSequentialModel(
                [keras.Input((5,)), GraphOnly(), keras.layers.Dense(1)]
            )
        model.compile(loss="mse", optimizer="cg", metrics=["mae"])
        history = fit_without_progress(
            model, x[:150], y[:150], epochs=3, validation_data=(x[150:], y[150:])
        )
        assert len(history.history["val_mae"]) == 3


def test_a_train_step_override_warns_that_the_solver_minimizes_compute_loss():
    class Penalized(kormos.BatchOptimizedSequentialModel):
        def train_step(self, data):
            return super().train_step(data)

    x, y = regression_data()
    model = Penalized([keras.Input((5,)), keras.layers.Dense(1)])
    model.compile(loss="mse", optimizer="l-bfgs-b")
    with pytest.warns(UserWarning, match="overrides `train_step`.*`compute_loss`"):
        fit_without_progress(model, x, y, epochs=2)
    model.compile(loss="mse", optimizer="adam")  # Keras' own fit calls it
    fit_without_progress(model, x, y, epochs=1)


def test_string_inputs_that_the_model_encodes_itself_train_like_keras():
    texts = tf.constant(
        [["good movie"], ["bad movie"], ["great film"], ["awful film"]] * 10
    )
    labels = np.array([[1.0], [0.0], [1.0], [0.0]] * 10)

    def text_model(cls):
        vectorize = keras.layers.TextVectorization(max_tokens=20, output_sequence_length=2)
        vectorize.adapt(texts)
        return cls([keras.Input((1,), dtype="string"), vectorize,
                    keras.layers.Embedding(20, 4), keras.layers.GlobalAveragePooling1D(),
                    keras.layers.Dense(1, activation="sigmoid")])

    reference = text_model(keras.Sequential)
    reference.compile(loss="binary_crossentropy", optimizer="adam", metrics=["accuracy"])
    reference.fit(texts, labels, epochs=2, validation_split=0.25, verbose=0)
    model = text_model(kormos.BatchOptimizedSequentialModel)
    model.compile(loss="binary_crossentropy", optimizer="l-bfgs-b", metrics=["accuracy"])
    history = fit_without_progress(model, texts, labels, epochs=20, validation_split=0.25)
    assert history.history["val_accuracy"][-1] == 1.0
    assert model.evaluate(texts, labels, verbose=0)[1] == 1.0


def test_evaluate_after_a_fit_on_pandas_with_validation_split_works_like_keras():
    pandas = pytest.importorskip("pandas")
    x, y = regression_data(n=50)
    frame, series = pandas.DataFrame(x), pandas.Series(y[:, 0])
    for model in (keras.Sequential([keras.Input((5,)), keras.layers.Dense(1)]),
                  linear_model(l2=0)):
        solver = isinstance(model, kormos.BatchOptimizedSequentialModel)
        model.compile(loss="mse", optimizer="l-bfgs-b" if solver else "adam")
        history = fit_without_progress(model, frame, series, epochs=3, validation_split=0.2)
        np.testing.assert_allclose(
            model.evaluate(frame, series, verbose=0),
            model.evaluate(x, y, verbose=0),
        )
        if solver:  # the validation rows as Keras holds them out
            np.testing.assert_allclose(
                history.history["val_loss"][-1],
                model.evaluate(frame[40:], series[40:], verbose=0), rtol=1e-6,
            )


def test_every_model_method_works_after_a_solver_fit(tmp_path):
    x, y = regression_data()
    model = linear_model(cls=functional_linear_model)
    model.compile(loss="mse", optimizer="bfgs", metrics=["mae"])
    fit_without_progress(model, x, y, epochs=5, validation_split=0.2)
    clone = keras.models.clone_model(model)  # compiled as the model is
    assert type(clone) is type(model) and clone.optimizer.method == "bfgs"
    assert len(fit_without_progress(clone, x, y, epochs=2).epoch) == 2
    expected = model.predict(x, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, rtol=1e-6)
    assert loaded.evaluate(x, y, verbose=0, return_dict=True).keys() == {"loss", "mae"}
    model.summary(print_fn=lambda *a, **k: None)


def functional_linear_model(layers):
    """`linear_model(cls=...)` as a functional BatchOptimizedModel."""
    inputs, outputs = layers[0], layers[0]
    for layer in layers[1:]:
        outputs = layer(outputs)
    return kormos.BatchOptimizedModel(inputs, outputs)


def test_saving_keeps_bounds_and_warns_about_functions_it_cannot_keep(tmp_path, float64):
    x, y = regression_data()
    bounds = {"dense/kernel": (-0.1, 0.1)}
    for spec in (bounds, scipy.optimize.Bounds(-0.1, 0.1), [(-0.1, 0.1)] * 6):
        model = linear_model(l2=0, name="dense")
        model.compile(loss="mse", optimizer=kormos.ScipyBatchOptimizer(bounds=spec))
        model.save(tmp_path / "m.keras")
        loaded = keras.models.load_model(tmp_path / "m.keras")
        for m in (model, loaded):
            fit_without_progress(m, x, y, epochs=20)
        np.testing.assert_allclose(loaded.get_weights()[0], model.get_weights()[0])
        assert np.abs(loaded.get_weights()[0]).max() <= 0.1 + 1e-12
    model.compile(loss="mse", optimizer=kormos.ScipyBatchOptimizer(
        method="slsqp", pretrain_fn=print, constraints=[{"type": "eq", "fun": np.sum}]
    ))
    with pytest.warns(UserWarning, match="constraints and pretrain_fn cannot be saved"):
        model.save(tmp_path / "m.keras")


def test_checkpoint_csvlogger_tensorboard_and_lr_callbacks(tmp_path):
    x, y = regression_data()
    model = linear_model()
    model.compile(loss="mse", optimizer="bfgs")
    csv = tmp_path / "log.csv"
    callbacks = [
        keras.callbacks.ModelCheckpoint(
            tmp_path / "best.keras", monitor="loss", save_best_only=True
        ),
        keras.callbacks.CSVLogger(csv),
        keras.callbacks.TensorBoard(tmp_path / "tb"),
    ]
    with pytest.warns(
        UserWarning, match="ReduceLROnPlateau acts on a learning rate"
    ) as caught:
        history = model.fit(
            x,
            y,
            epochs=5,
            verbose=0,
            callbacks=callbacks + [keras.callbacks.ReduceLROnPlateau(monitor="loss")],
        )
    # The warning points at this test's fit() call, not into kormos.
    assert {w.filename for w in caught if "learning rate" in str(w.message)} == {
        __file__
    }
    rows = csv.read_text().strip().splitlines()
    assert len(rows) == 1 + len(history.history["loss"])
    assert rows[0].split(",")[:3] == ["epoch", "fg_evals", "grad"]
    restored = keras.models.load_model(tmp_path / "best.keras")
    np.testing.assert_allclose(
        restored.evaluate(x, y, verbose=0), min(history.history["loss"]), rtol=1e-5
    )
    assert list((tmp_path / "tb").rglob("events.out.tfevents*"))


class Terminal(io.StringIO):
    """A stdout that says it is a terminal."""

    def isatty(self):
        return True


def test_progress_display_by_verbosity(capsys, monkeypatch):
    x, y = regression_data()
    model = linear_model()
    model.compile(loss="mse", optimizer="l-bfgs-b", metrics=["mae"])
    fit_without_progress(model, x, y, epochs=4, verbose=0)
    assert capsys.readouterr().out == ""
    slow = keras.callbacks.LambdaCallback(on_epoch_end=lambda *_: time.sleep(0.05))
    history = fit_without_progress(
        model, x, y, epochs=4, verbose=2, validation_data=(x, y), callbacks=[slow]
    )
    out = capsys.readouterr().out
    lines = re.findall(r"Iteration (\d)/4 - (?:(\d+)ms|(\d+\.\d+)s) - .*loss: .*", out)
    assert [int(n) for n, _, _ in lines] == [e + 1 for e in history.epoch]
    # One line per iteration, then why the solver stopped.
    assert len(out.splitlines()) == len(history.epoch) + 1
    result = model.optimizer.results[-1]
    reason = f"{len(history.epoch)} iterations: {result.message} (largest gradient "
    assert out.splitlines()[-1] == reason + f"entry: {np.abs(result.jac).max():.2e})"
    # Each iteration is timed, the previous one's callbacks included.
    assert all(float(ms or 1e3 * float(s)) >= 50 for _, ms, s in lines[1:])
    assert "grad:" in out and "fg_evals:" in out and "val_loss:" in out
    assert re.search(r" - fg_evals: \d+ - ", out)  # a count prints as one
    # verbose=1 in a terminal: one live bar over the iteration budget.
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    model.set_weights([w * 0 for w in model.get_weights()])
    fit_without_progress(model, x, y, epochs=4, verbose=1)
    out = terminal.getvalue()
    assert "/4" in out and "iteration" in out and "grad:" in out
    assert "\r" in out or "\b" in out  # redrawn in place


PIPED_PROGRESS = r"""
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, keras, kormos
cls = kormos.BatchOptimizedSequentialModel if sys.argv[1] == "kormos" else keras.Sequential
model = cls([keras.Input((3,)), keras.layers.Dense(1)])
model.compile(loss="mse", optimizer="l-bfgs-b" if sys.argv[1] == "kormos" else "adam")
x = np.random.default_rng(0).normal(size=(64, 3))
if sys.argv[1] == "kormos":
    h = model.fit(x, x.sum(axis=1), epochs=40, verbose=1, options={"gtol": 0, "ftol": 0})
    print("ROWS", len(h.epoch), model.optimizer.results[-1].message)
else:
    model.fit(x, x.sum(axis=1), epochs=3, verbose=1)
"""


@pytest.mark.slow
def test_progress_to_a_pipe_is_one_clean_line_per_iteration(tmp_path):
    script = tmp_path / "piped.py"
    script.write_text(PIPED_PROGRESS)
    outputs = {
        who: subprocess.run(
            [sys.executable, str(script), who], capture_output=True, text=True
        ).stdout
        for who in ("kormos", "keras")
    }
    assert "\b" in outputs["keras"]  # Keras' own bar redraws even into a pipe
    out = outputs["kormos"]
    assert "\b" not in out and "\r" not in out
    *lines, reason, rows = out.strip().splitlines()
    _, count, message = rows.split(" ", 2)
    assert len(lines) == int(count) >= 1
    assert all(re.match(r"Iteration \d+/40 - [\d.]+m?s - .*loss: ", line) for line in lines)
    assert reason.startswith(f"{count} iterations: {message} (largest gradient entry: ")


@pytest.mark.parametrize("method", breadth(["l-bfgs-b", "ssbroyden"], fast=2))
def test_ctrl_c_returns_history_and_keeps_last_iterate(method, tmp_path):
    x, y = regression_data()
    model = linear_model()
    model.compile(loss="mse", optimizer=method)
    iterates = []

    def press_ctrl_c(epoch, logs):
        iterates.append(model.optimizer.get_weights())
        if epoch == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while callbacks run

    csv = tmp_path / "log.csv"
    history = fit_without_progress(
        model,
        x,
        y,
        epochs=20,
        callbacks=[
            keras.callbacks.LambdaCallback(on_epoch_end=press_ctrl_c),
            keras.callbacks.CSVLogger(csv),
        ],
    )
    assert len(history.history["loss"]) == 3  # the interrupted iteration is logged
    np.testing.assert_array_equal(model.optimizer.get_weights(), iterates[-1])
    assert model.optimizer.results[-1].status == 97
    assert "Ctrl-C" in model.optimizer.results[-1].message
    assert csv.read_text().count("\n") == 4  # header + 3 rows, file closed


def test_callback_exception_propagates_and_keeps_last_iterate():
    x, y = regression_data()
    model = linear_model()
    model.compile(loss="mse", optimizer="bfgs")
    iterates = []

    def fail(epoch, logs):
        iterates.append(model.optimizer.get_weights())
        if epoch == 1:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fit_without_progress(
            model,
            x,
            y,
            epochs=20,
            callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=fail)],
        )
    np.testing.assert_array_equal(model.optimizer.get_weights(), iterates[-1])


# =============================================================================
# Chaining, saving, tuning
# =============================================================================


def test_method_chain_with_pretrain_fn_freezing_a_layer():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(100, 3))
    y = np.tanh(x @ [[1.0], [-2.0], [0.5]])
    model = kormos.BatchOptimizedSequentialModel(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, activation="tanh"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(loss="mse", optimizer="l-bfgs-b")
    snapshots = {}

    def freeze_first(m):
        m.layers[0].trainable = False
        snapshots["first"] = m.layers[0].get_weights()[0].copy()

    history = fit_without_progress(
        model,
        x,
        y,
        method=["l-bfgs-b", "newton-cg"],
        epochs=[4, 3],
        pretrain_fn=[None, freeze_first],
    )
    assert len(history.history["loss"]) == 7
    assert len(model.optimizer.results) == 2
    np.testing.assert_array_equal(model.layers[0].get_weights()[0], snapshots["first"])
    assert history.history["hessp_evals"][-1] > 0
    assert history.history["fg_evals"] == sorted(history.history["fg_evals"])


@pytest.mark.parametrize("functional", [False, True])
def test_save_and_load_round_trip_keeps_batch_compile(functional, tmp_path):
    x, y = regression_data()
    if functional:
        inputs = keras.Input((5,))
        model = kormos.BatchOptimizedModel(inputs, keras.layers.Dense(1)(inputs))
    else:
        model = linear_model()
    model.compile(
        loss="mse",
        metrics=["mae"],
        optimizer=kormos.ScipyBatchOptimizer(method="bfgs", options={"gtol": 1e-9}),
    )
    fit_without_progress(model, x, y, epochs=3)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert type(loaded) is type(model)
    assert isinstance(loaded.optimizer, kormos.ScipyBatchOptimizer)
    assert loaded.optimizer.method == "bfgs" and loaded.optimizer.options == {
        "gtol": 1e-9
    }
    for a, b in zip(weights_of(model), weights_of(loaded)):
        np.testing.assert_array_equal(a, b)
    history = fit_without_progress(loaded, x, y, epochs=3)
    assert {"loss", "grad", "mae"} <= set(history.history)


def test_optimizer_config_round_trip():
    optimizer = kormos.ScipyBatchOptimizer(
        method="TNC", options={"maxfun": 7}, tol=1e-3
    )
    clone = kormos.ScipyBatchOptimizer.from_config(optimizer.get_config())
    assert clone.get_config() == optimizer.get_config()
    assert clone.method == "tnc" and clone.tol == 1e-3
    optimizer = kormos.ScipyBatchOptimizer(
        method="SSBroyden", warm_start=True, max_dense_params=5000
    )
    clone = kormos.ScipyBatchOptimizer.from_config(optimizer.get_config())
    assert clone.get_config() == optimizer.get_config()
    assert (clone.method, clone.warm_start, clone.max_dense_params) == (
        "ssbroyden", True, 5000
    )


@pytest.mark.slow
def test_keras_tuner_random_search_picks_best_val_trial(tmp_path, float64):
    keras_tuner = pytest.importorskip("keras_tuner")
    x, y = regression_data(n=120)

    def build(hp):
        model = linear_model(l2=hp.Choice("l2", [1e-4, 10.0]))
        method = hp.Choice("method", ["l-bfgs-b", "ssbroyden"])
        model.compile(loss="mse", optimizer=kormos.ScipyBatchOptimizer(method=method))
        return model

    tuner = keras_tuner.RandomSearch(
        build,
        objective="val_loss",
        max_trials=4,
        seed=1,
        directory=tmp_path,
        project_name="kormos",
    )
    tuner.search(x[:90], y[:90], epochs=10, validation_data=(x[90:], y[90:]), verbose=0)
    best = tuner.get_best_hyperparameters(1)[0]
    assert best.get("l2") == 1e-4
    trials = tuner.oracle.get_best_trials(4)
    assert {t.hyperparameters.get("method") for t in trials} == {"l-bfgs-b", "ssbroyden"}
    by_l2 = {}
    for trial in trials:
        by_l2.setdefault(trial.hyperparameters.get("l2"), []).append(trial.score)
    assert max(by_l2[1e-4]) < min(by_l2[10.0])  # the scores are the val_loss
    restored = tuner.get_best_models(1)[0]
    best_loss = restored.evaluate(x[90:], y[90:], batch_size=30, verbose=0)
    np.testing.assert_allclose(best_loss, trials[0].score, rtol=1e-5)


# =============================================================================
# The Keras contract: what keras.Model + "adam" does, a solver-compiled model
# does too (one epoch = one solver iteration)
# =============================================================================


def twin_models(cls=kormos.BatchOptimizedSequentialModel, width=4):
    """A kormos model and a plain Keras model with the same weights."""
    models = []
    for model_class in (cls, keras.Sequential):
        keras.utils.set_random_seed(0)
        models.append(
            model_class(
                [
                    keras.Input((3,)),
                    keras.layers.Dense(width, activation="tanh"),
                    keras.layers.Dense(1),
                ]
            )
        )
    return models


def small_data(n=48):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3))
    return x, np.sin(x).sum(axis=1, keepdims=True)


class ArrayBatches(keras.utils.PyDataset):
    """A PyDataset over in-memory arrays, `size` rows a batch."""

    def __init__(self, *arrays, size=16, **kwargs):
        super().__init__(**kwargs)
        self.arrays, self.size = arrays, size

    def __len__(self):
        return -(-len(self.arrays[0]) // self.size)

    def __getitem__(self, i):
        rows = slice(i * self.size, (i + 1) * self.size)
        return tuple(a[rows] for a in self.arrays)


def endless_batches(*arrays, size=16):
    """A Python generator cycling over the batches forever, as Keras allows."""
    while True:
        for start in range(0, len(arrays[0]), size):
            yield tuple(a[start : start + size] for a in arrays)


INPUT_FORMS = {
    "numpy": lambda x, y: ((x, y), {}),
    "tensors": lambda x, y: ((tf.constant(x), tf.constant(y)), {}),
    "pandas": lambda x, y: (
        (pytest.importorskip("pandas").DataFrame(x), pytest.importorskip("pandas").DataFrame(y)),
        {},
    ),
    "tf.data": lambda x, y: ((tf.data.Dataset.from_tensor_slices((x, y)).batch(16),), {}),
    "PyDataset": lambda x, y: ((ArrayBatches(x, y),), {}),
    "generator": lambda x, y: ((endless_batches(x, y),), {"steps_per_epoch": 3}),
}


@pytest.mark.parametrize("form", breadth(list(INPUT_FORMS), fast=1))
def test_fit_takes_every_input_form_that_keras_takes(form, float64):
    x, y = small_data()
    model, plain = twin_models()
    plain.compile(loss="mse", optimizer="adam")
    args, kwargs = INPUT_FORMS[form](x, y)
    plain.fit(*args, epochs=1, verbose=0, shuffle=False, **kwargs)  # the baseline takes it
    model.compile(loss="mse", optimizer="l-bfgs-b")
    reference = kormos.ScipyBatchOptimizer().build(model, x, y)
    w0 = reference.get_weights()
    args, kwargs = INPUT_FORMS[form](x, y)
    steps = kwargs.get("steps_per_epoch")
    bound = kormos.ScipyBatchOptimizer().build(model, *args, steps=steps)
    np.testing.assert_allclose(bound.func(w0), reference.func(w0), rtol=1e-12)
    np.testing.assert_allclose(bound.grad(w0), reference.grad(w0), rtol=1e-10)
    args, kwargs = INPUT_FORMS[form](x, y)
    validation, _ = INPUT_FORMS[form](x, y)
    validation = validation if len(validation) > 1 else validation[0]
    history = model.fit(
        *args,
        epochs=3,
        verbose=0,
        validation_data=validation,
        validation_steps=steps,
        **kwargs,
    )
    assert len(history.history["loss"]) == len(history.history["val_loss"]) == 3
    np.testing.assert_allclose(history.history["val_loss"], history.history["loss"], rtol=1e-9)


def test_list_and_dict_inputs_like_keras(float64):
    x, y = small_data()
    inputs = {"a": keras.Input((2,), name="a"), "b": keras.Input((1,), name="b")}
    hidden = keras.layers.Concatenate()([inputs["a"], inputs["b"]])
    model = kormos.BatchOptimizedModel(inputs, keras.layers.Dense(1)(hidden))
    model.compile(loss="mse", optimizer="l-bfgs-b")
    as_dict = {"a": x[:, :2], "b": x[:, 2:]}
    as_list = [x[:, :2], x[:, 2:]]  # in the order of model.inputs
    w0 = kormos.pack_weights(model.trainable_variables)
    values = [kormos.ScipyBatchOptimizer().build(model, as_dict, y).func(w0)]
    with pytest.warns(UserWarning, match="structure of `inputs`"):  # Keras' own
        values.append(kormos.ScipyBatchOptimizer().build(model, as_list, y).func(w0))
    assert values[0] == values[1]
    assert len(fit_without_progress(model, as_dict, y, epochs=2).history["loss"]) == 2


def test_an_input_type_keras_does_not_take_raises_like_keras():
    model, plain = twin_models()
    plain.compile(loss="mse", optimizer="adam")
    model.compile(loss="mse", optimizer="l-bfgs-b")
    for fit in (plain.fit, model.fit):
        with pytest.raises(ValueError, match="(?i)unrecognized data type.*set"):
            fit({1, 2, 3}, np.ones((3, 1)), verbose=0)


# Constructor arguments for each built-in callback (those not listed take none).
CALLBACK_ARGUMENTS = {
    "BackupAndRestore": lambda tmp: {"backup_dir": str(tmp / "backup")},
    "CSVLogger": lambda tmp: {"filename": str(tmp / "log.csv")},
    "LambdaCallback": lambda tmp: {"on_epoch_end": lambda epoch, logs: None},
    "LearningRateScheduler": lambda tmp: {"schedule": lambda epoch, lr: lr},
    "ModelCheckpoint": lambda tmp: {"filepath": str(tmp / "best.keras")},
    "OrbaxCheckpoint": lambda tmp: {"directory": str(tmp / "orbax")},
    "RemoteMonitor": lambda tmp: {"root": "http://localhost:9"},  # nothing listens
    "SwapEMAWeights": lambda tmp: {},
    "TensorBoard": lambda tmp: {"log_dir": str(tmp / "tb"), "write_steps_per_second": True},
}
IGNORED_CALLBACKS = {"LearningRateScheduler", "ReduceLROnPlateau", "SwapEMAWeights"}


def builtin_callbacks():
    names = sorted(
        name
        for name, value in vars(keras.callbacks).items()
        if isinstance(value, type)
        and issubclass(value, keras.callbacks.Callback)
        and name not in ("Callback", "CallbackList", "History", "ProgbarLogger")
    )
    return names


@pytest.mark.parametrize("name", breadth(builtin_callbacks(), fast=0))
def test_every_builtin_callback_works_or_is_ignored_with_a_warning(name, tmp_path):
    x, y = small_data()
    arguments = CALLBACK_ARGUMENTS.get(name, lambda tmp: {})(tmp_path)
    try:
        keras_callback = getattr(keras.callbacks, name)(**arguments)
    except ImportError as error:  # e.g. OrbaxCheckpoint without orbax
        pytest.skip(f"{name} needs an optional package: {error}")
    model, plain = twin_models()
    plain.compile(loss="mse", optimizer="adam")
    if name == "SwapEMAWeights":
        plain.compile(loss="mse", optimizer=keras.optimizers.Adam(use_ema=True))
    unreachable = "Could not reach RemoteMonitor root server"  # no server runs
    with pytest.warns(UserWarning, match=unreachable) if name == "RemoteMonitor" else (
        contextlib.nullcontext()
    ):
        plain.fit(x, y, epochs=2, verbose=0, validation_data=(x, y),
                  callbacks=[keras_callback])
    model.compile(loss="mse", optimizer="l-bfgs-b")
    own = tmp_path / "kormos"
    own.mkdir()
    callback = getattr(keras.callbacks, name)(**CALLBACK_ARGUMENTS.get(name, lambda tmp: {})(own))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(
            x, y, epochs=3, verbose=0, validation_data=(x, y), callbacks=[callback]
        )
    rows = len(history.history["loss"])
    assert rows == 3 or (name == "EarlyStopping" and rows >= 1)
    ignored = [w for w in caught if f"{name} acts on a learning rate" in str(w.message)]
    assert bool(ignored) == (name in IGNORED_CALLBACKS)
    others = [str(w.message) for w in caught
              if w not in ignored and not issubclass(w.category, DeprecationWarning)]
    assert all(unreachable in m for m in others), others
    if name == "CSVLogger":
        assert len((own / "log.csv").read_text().splitlines()) == 1 + rows
    if name == "ModelCheckpoint":
        assert keras.models.load_model(own / "best.keras").optimizer.method == "l-bfgs-b"
    if name == "TensorBoard":
        assert list((own / "tb").rglob("*.tfevents.*"))
    if name == "BackupAndRestore":
        assert not (own / "backup").exists()  # deleted after a completed fit, as Keras does


class InterruptAt(keras.callbacks.Callback):
    """Simulates a crash (e.g. a preempted job) at the end of an epoch."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("preempted")


@pytest.mark.slow
def test_backup_and_restore_resumes_at_the_epoch_keras_resumes_at(tmp_path):
    x, y = small_data()
    model, plain = twin_models()
    plain.compile(loss="mse", optimizer="adam")
    model.compile(loss="mse", optimizer="l-bfgs-b")
    epochs = {}
    for who, m in (("keras", plain), ("kormos", model)):
        backup = keras.callbacks.BackupAndRestore(str(tmp_path / who))
        with pytest.raises(RuntimeError, match="preempted"):
            m.fit(x, y, epochs=8, verbose=0, callbacks=[backup, InterruptAt(3)])
        saved = [w.copy() for w in m.get_weights()]
        m.set_weights([w * 0 for w in saved])  # a fresh process would not have them
        resumed = {}

        def remember(logs=None, m=m, resumed=resumed):
            resumed["weights"] = [w.copy() for w in m.get_weights()]

        start = keras.callbacks.LambdaCallback(on_train_begin=remember)
        backup = keras.callbacks.BackupAndRestore(str(tmp_path / who))
        history = m.fit(
            x, y, epochs=8, verbose=0, callbacks=[backup, start],
            **({"options": {"gtol": 0, "ftol": 0}} if who == "kormos" else {}),
        )
        epochs[who] = history.epoch
        for a, b in zip(resumed["weights"], saved):
            np.testing.assert_array_equal(a, b)
    assert epochs["kormos"] == epochs["keras"] == [4, 5, 6, 7]


@pytest.mark.slow
def test_summary_counts_the_weights_once_and_shows_batch_none():
    model, plain = twin_models()
    model.compile(loss="mse", optimizer="l-bfgs-b")
    model.summary(print_fn=lambda *a, **k: None)  # works right after compile
    x, y = small_data()
    fit_without_progress(model, x, y, epochs=2)
    lines = []
    model.summary(print_fn=lambda line, *a, **k: lines.append(line))
    text = "\n".join(lines)
    assert re.search(r"Total params: 21\b", text), text
    assert not re.search(r"Optimizer params: [1-9]", text)

    class Subclassed(kormos.BatchOptimizedModel):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(1)

        def call(self, x):
            return self.dense(x)

    class PlainSubclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(1)

        def call(self, x):
            return self.dense(x)

    shown = {}
    for cls, optimizer in ((Subclassed, "l-bfgs-b"), (PlainSubclassed, "adam")):
        sub = cls()
        sub.compile(loss="mse", optimizer=optimizer)
        fit_without_progress(sub, x, y, epochs=1)
        printed = []
        sub.summary(print_fn=lambda line, *a, out=printed, **k: out.append(line))
        shown[cls] = re.findall(r"\(None, 1\)|\(\d+, 1\)", "\n".join(printed))
    assert shown[Subclassed] == shown[PlainSubclassed] == ["(None, 1)"]


@pytest.mark.slow
def test_evaluate_predict_and_batch_methods_match_keras(float64):
    x, y = small_data()
    model, plain = twin_models()
    for m, optimizer in ((model, "l-bfgs-b"), (plain, "adam")):
        m.compile(loss="mse", optimizer=optimizer, metrics=["mae"])
    fit_without_progress(model, x, y, epochs=5)
    plain.set_weights(model.get_weights())
    np.testing.assert_allclose(
        model.evaluate(x, y, verbose=0), plain.evaluate(x, y, verbose=0), rtol=1e-12
    )
    np.testing.assert_allclose(model.predict(x, verbose=0), plain.predict(x, verbose=0))
    np.testing.assert_allclose(model.test_on_batch(x, y), plain.test_on_batch(x, y))
    np.testing.assert_allclose(model.predict_on_batch(x), plain.predict_on_batch(x))


@pytest.mark.slow
def test_train_on_batch_points_at_fit_and_works_when_compiled_with_adam():
    x, y = small_data()
    model, plain = twin_models()
    model.compile(loss="mse", optimizer="l-bfgs-b")
    with pytest.raises(RuntimeError, match="fit\\(x, y, epochs=1\\)"):
        model.train_on_batch(x, y)
    model.compile(loss="mse", optimizer="adam")
    plain.compile(loss="mse", optimizer="adam")
    np.testing.assert_allclose(model.train_on_batch(x, y), plain.train_on_batch(x, y))
    np.testing.assert_allclose(model.get_weights()[0], plain.get_weights()[0])


@pytest.mark.slow
def test_adam_compiled_model_saves_and_loads_compiled_like_keras(tmp_path):
    x, y = small_data()
    histories = {}
    for who, m in zip(("kormos", "keras"), twin_models()):
        m.compile(loss="mse", optimizer="adam", metrics=["mae"])
        m.fit(x, y, epochs=2, batch_size=16, verbose=0)
        m.save(tmp_path / f"{who}.keras")
        loaded = keras.models.load_model(tmp_path / f"{who}.keras")
        assert isinstance(loaded.optimizer, keras.optimizers.Adam)
        assert int(loaded.optimizer.iterations) == 6  # the optimizer state too
        histories[who] = loaded.fit(x, y, epochs=2, batch_size=16, verbose=0).history
    for key in ("loss", "mae"):
        np.testing.assert_allclose(histories["kormos"][key], histories["keras"][key])


def test_save_weights_and_load_weights_round_trip(tmp_path):
    x, y = small_data()
    model, _ = twin_models()
    model.compile(loss="mse", optimizer="l-bfgs-b")
    fit_without_progress(model, x, y, epochs=3)
    model.save_weights(tmp_path / "w.weights.h5")
    fitted = weights_of(model)
    model.set_weights([w * 0 for w in fitted])
    model.load_weights(tmp_path / "w.weights.h5")
    for a, b in zip(weights_of(model), fitted):
        np.testing.assert_array_equal(a, b)


def test_constructor_arguments_positional_and_by_keyword_like_keras():
    def layers():
        return [keras.Input((3,)), keras.layers.Dense(1)]

    for args, kwargs in (((True, "seq"), {}), ((), {"trainable": True, "name": "seq"})):
        model = kormos.BatchOptimizedSequentialModel(layers(), *args, **kwargs)
        plain = keras.Sequential(layers(), *args, **kwargs)
        assert model.name == plain.name == "seq"
        assert model.count_params() == plain.count_params() == 4
    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(1)(inputs)
    for args, kwargs in (  # the forms Keras takes: two positional arguments at most
        ((inputs, outputs), {"name": "fun"}),
        ((inputs,), {"outputs": outputs, "name": "fun"}),
        ((), {"inputs": inputs, "outputs": outputs, "name": "fun"}),
    ):
        model = kormos.BatchOptimizedModel(*args, **kwargs)
        plain = keras.Model(*args, **kwargs)
        assert model.name == plain.name == "fun"
        assert isinstance(model, kormos.BatchOptimizedModel)
        assert model.count_params() == plain.count_params() == 4


@pytest.mark.parametrize("dtype", breadth(["float64", "float32"], fast=0))
def test_fit_inside_a_strategy_scope_equals_fit_without_one(dtype):
    x, y = small_data()
    histories = []
    with floatx(dtype):
        for strategy in (tf.distribute.get_strategy(), tf.distribute.MirroredStrategy()):
            with strategy.scope():
                model, _ = twin_models()
                model.compile(loss="mse", optimizer="l-bfgs-b", metrics=["mae"])
                histories.append(fit_without_progress(model, x, y, epochs=4, batch_size=20).history)
    rtol = 1e-10 if dtype == "float64" else 1e-5
    for key in ("loss", "mae", "grad"):
        np.testing.assert_allclose(histories[0][key], histories[1][key], rtol=rtol)


def python_beside_kormos(code, **environ):
    """Runs `code` in a new Python process beside kormos.py, with `environ`
    added to the environment."""
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(kormos.__file__).parent,
        env={**os.environ, **environ},
    )


@pytest.mark.slow
def test_import_fails_clearly_on_another_keras_backend():
    # Keras' other backends need jax, torch or openvino installed; what kormos
    # checks is `keras.config.backend()`, so the subprocess reports "jax".
    code = "import keras; keras.config.backend = lambda: 'jax'; import kormos"
    result = python_beside_kormos(code)
    assert result.returncode != 0
    assert "ImportError: kormos runs on Keras' TensorFlow backend" in result.stderr
    assert "'jax' backend" in result.stderr
    assert "KERAS_BACKEND=tensorflow" in result.stderr


@pytest.mark.slow
def test_import_warns_when_tf_keras_is_legacy_keras():
    code = "import warnings; warnings.simplefilter('always'); import kormos"
    result = python_beside_kormos(code, TF_USE_LEGACY_KERAS="1")
    assert result.returncode == 0, result.stderr
    assert "UserWarning: TF_USE_LEGACY_KERAS is set" in result.stderr
    assert "build them with `import keras`" in result.stderr


def test_summed_losses_do_not_depend_on_batch_size(float64):
    x, y = small_data(n=30)
    model = linear_model(d=3, l2=0.1)
    model.compile(loss=keras.losses.MeanSquaredError(reduction="sum"), optimizer="l-bfgs-b")
    w0 = kormos.pack_weights(model.trainable_variables)
    kernel, bias = model.get_weights()
    residual = x @ kernel + bias - y
    expected = float((residual**2).sum() + effective_l2(0.1) * (kernel**2).sum())
    fitted = []
    for batch_size in (None, 7, 1):
        opt = kormos.ScipyBatchOptimizer().build(model, x, y, batch_size=batch_size)
        np.testing.assert_allclose(opt.func(w0), expected, rtol=1e-12)
        model.set_weights([kernel, bias])
        fit_without_progress(model, x, y, epochs=5, batch_size=batch_size)
        fitted.append(kormos.pack_weights(model.trainable_variables))
    np.testing.assert_allclose(fitted[1], fitted[0], rtol=1e-8)
    np.testing.assert_allclose(fitted[2], fitted[0], rtol=1e-8)


def test_per_batch_add_loss_terms_warn_when_batch_size_splits_the_data():
    x, y = small_data()
    model = kormos.BatchOptimizedSequentialModel(
        [
            keras.Input((3,)),
            keras.layers.Dense(2, activity_regularizer=keras.regularizers.L1(1e-3)),
            keras.layers.Dense(1),
        ]
    )
    model.compile(loss="mse", optimizer="l-bfgs-b")
    with pytest.warns(UserWarning, match="add_loss.*depends on `batch_size`"):
        model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.fit(x, y, epochs=1, verbose=0)  # one batch: no warning


def test_results_and_memory_hold_the_last_fit_only():
    import gc
    import weakref

    x, y = small_data()
    model, _ = twin_models()
    model.compile(loss="mse", optimizer="l-bfgs-b")
    fit_without_progress(model, x, y, epochs=3)
    first = weakref.ref(model.optimizer.results[0])
    for _ in range(3):
        fit_without_progress(model, x, y, epochs=3, options={"gtol": 0, "ftol": 0})
        assert len(model.optimizer.results) == 1
    gc.collect()
    assert first() is None  # no earlier run is kept
    # ... nor L-BFGS-B's hess_inv, which holds scipy's whole workspace.
    assert "hess_inv" not in model.optimizer.results[-1]


class CountsForwardPasses(keras.layers.Layer):
    """Identity that counts how often the model runs forward, compiled or not."""

    def build(self, input_shape):
        self.count = self.add_weight(shape=(), initializer="zeros", trainable=False)

    def call(self, x):
        self.count.assign_add(1.0)
        return x


class GradientDescent(kormos.BatchOptimizer):
    """A custom batch optimizer: gradient descent with a fixed step."""

    def minimize(self, epochs=None, callback=None, pretrain_fn=None, **kwargs):
        x = self.get_weights()
        for _ in range(epochs):
            x = x - 0.05 * self.func_and_grad(x)[1]
            self.set_weights(x)
            if callback is not None and callback(x):
                break
        return x


def test_a_subclass_that_extends_func_and_grad_is_what_the_solver_calls():
    class Logging(kormos.ScipyBatchOptimizer):
        def func_and_grad(self, x):
            self.logged = getattr(self, "logged", 0) + 1
            return super().func_and_grad(x)

    x, y = regression_data()
    model = linear_model()
    model.compile(loss="mse", optimizer=Logging())
    fit_without_progress(model, x, y, epochs=5)
    assert model.optimizer.logged >= model.optimizer.results[-1].nfev > 0


def test_a_custom_batch_optimizer_trains_through_fit():
    x, y = regression_data()
    model = linear_model()
    model.compile(loss="mse", optimizer=GradientDescent("gd"))
    history = model.fit(x, y, epochs=5, verbose=0)
    assert len(history.epoch) == 5 and np.all(np.diff(history.history["loss"]) < 0)
    assert len(model.fit(x, y, verbose=0).epoch) == 20  # the default budget
    for epochs in (0, True, [2, 3]):
        with pytest.raises(ValueError, match="`epochs` must be a positive integer"):
            model.fit(x, y, epochs=epochs, verbose=0)


@pytest.mark.parametrize("method", breadth(["l-bfgs-b", "newton-cg", "trust-ncg"]))
def test_a_fit_evaluates_only_what_the_solver_asks_for(method, float64):
    x, y = small_data()
    counter = CountsForwardPasses()
    model = kormos.BatchOptimizedSequentialModel(
        [keras.Input((3,)), counter, keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)]
    )
    model.compile(loss="mse", optimizer=method)
    before = float(counter.count.numpy())
    fit_without_progress(model, x, y, epochs=6)
    passes = float(counter.count.numpy()) - before  # kormos never calls it eagerly
    requested = sum(r.nfev + r.get("nhev", 0) for r in model.optimizer.results)
    assert passes == model.optimizer.fg_evals + model.optimizer.hessp_evals
    # Logging an iteration costs no pass; a point scipy asks for twice (the
    # trust-region methods re-request an accepted point) is served from cache.
    assert passes == requested if method == "l-bfgs-b" else passes <= requested


class CtrlCTimer:
    """Presses Ctrl-C `delay` seconds after `start()`, unless `stop()` came first."""

    def __init__(self, delay):
        self.delay, self.timer, self.done = delay, None, False
        self.lock = threading.Lock()

    def start(self):
        if self.timer is None:
            self.timer = threading.Timer(self.delay, self._press)
            self.timer.start()

    def _press(self):
        with self.lock:
            if not self.done:
                os.kill(os.getpid(), signal.SIGINT)

    def stop(self):
        with self.lock:
            self.done = True
        self.timer.cancel()


class StartsTimer(ArrayBatches):
    """Batches whose first read (inside fit's setup) starts a `CtrlCTimer`."""

    def __init__(self, timer, *arrays, **kwargs):
        super().__init__(*arrays, **kwargs)
        self.ctrl_c = timer

    def __getitem__(self, i):
        self.ctrl_c.start()
        return super().__getitem__(i)


@pytest.mark.parametrize("delay", breadth([0.5, 0.0, 0.01, 0.05, 0.1, 0.2, 0.35, 0.7, 0.9, 1.1]))
def test_weights_match_the_last_history_row_whenever_ctrl_c_arrives(delay):
    x, y = small_data()
    model, _ = twin_models(width=8)
    model.compile(loss="mse", optimizer="nelder-mead", metrics=["mae"])
    start = weights_of(model)
    rows = []
    slow = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: (rows.append(weights_of(model)), time.sleep(0.01))
    )
    timer = CtrlCTimer(delay)  # Nelder-Mead's 300 iterations take far longer
    try:
        history = model.fit(
            StartsTimer(timer, x, y, size=48),
            epochs=300,
            verbose=0,
            callbacks=[slow],
            validation_data=(x, y),
            options={"xatol": 0, "fatol": 0},
        )
    finally:
        timer.stop()
    lengths = {len(values) for values in history.history.values()} | {len(history.epoch)}
    assert len(lengths) == 1 and lengths.pop() == len(rows) < 300
    expected = rows[-1] if rows else start
    for a, b in zip(weights_of(model), expected):
        np.testing.assert_array_equal(a, b)
    if rows:
        assert model.optimizer.results[-1].status == 97


def test_ctrl_c_while_reading_the_data_ends_fit_before_training():
    x, y = small_data()

    class PressesCtrlC(ArrayBatches):
        pressed = False

        def __getitem__(self, i):
            if not self.pressed:  # once: a second Ctrl-C raises KeyboardInterrupt
                self.pressed = True
                os.kill(os.getpid(), signal.SIGINT)
            return super().__getitem__(i)

    model, _ = twin_models()
    model.compile(loss="mse", optimizer="l-bfgs-b")
    start = weights_of(model)
    history = model.fit(PressesCtrlC(x, y), epochs=5, verbose=0)
    assert history.history == {} and history.epoch == []
    for a, b in zip(weights_of(model), start):
        np.testing.assert_array_equal(a, b)


# =============================================================================
# kormos 0.1 compatibility: the calls of its README and docstrings
# =============================================================================


def ols_problem_0_1(rank=3, n=1000, reg=1e-5, loss=None):
    """kormos 0.1's test problem: a keras.Sequential OLS model compiled with
    Adam, data as an (X, y, sample_weight) tuple of tensors."""
    w = 1.0 + np.arange(rank)
    X = np.random.default_rng(3).normal(size=(n, rank))
    data = (tf.constant(X), tf.constant(X @ w), tf.constant(np.ones(n)))
    model = keras.Sequential(
        [
            keras.Input((rank,)),
            keras.layers.Dense(
                1,
                use_bias=False,
                kernel_regularizer=keras.regularizers.L2(reg),
                kernel_initializer="ones",
            ),
        ]
    )
    model.compile(loss=loss or keras.losses.MeanSquaredError(), optimizer="adam")
    return model, data, w


def test_0_1_batch_optimizer_builds_on_an_xyw_tuple_with_exact_derivatives(float64):
    model, (X, y, w), _ = ols_problem_0_1(n=2, reg=0.1)
    X = tf.ones((2, 3), tf.float64)
    optimizer = kormos.optimizers.BatchOptimizer(
        dtype=tf.float64, batch_size=1
    ).build(model, (X, y, w))
    x0, n, lam = np.ones(3), 2, effective_l2(0.1)
    residual = X.numpy() @ x0 - y.numpy()
    np.testing.assert_allclose(optimizer.func(x0), residual @ residual / n + lam * 3)
    grad = 2 / n * X.numpy().T @ residual + 2 * lam * x0
    np.testing.assert_allclose(optimizer.grad(x0), grad)
    hess = 2 / n * X.numpy().T @ X.numpy() + 2 * lam * np.eye(3)
    for k in range(3):
        np.testing.assert_allclose(optimizer.hessp(x0, np.eye(3)[k]), hess[:, k])


@pytest.mark.slow
def test_0_1_minimize_returns_the_weights_and_chains_lists(float64):
    loss = keras.losses.MeanSquaredError(reduction="sum")
    model, data, w = ols_problem_0_1(rank=5, loss=loss)
    optimizer = kormos.optimizers.ScipyBatchOptimizer(
        dtype=tf.float64, batch_size=2
    ).build(model, data)
    weights = optimizer.minimize(
        method="L-BFGS-B", epochs=20, options={"gtol": 1e-9, "ftol": 1e-6}
    )
    np.testing.assert_allclose(weights, w, atol=0.01)
    assert len(optimizer.results) == 1 and optimizer.results[0].success
    model, data, w = ols_problem_0_1(rank=5)
    optimizer = kormos.optimizers.ScipyBatchOptimizer(dtype=tf.float64, batch_size=2)
    weights = optimizer.build(model, data).minimize(
        method=["L-BFGS-B", "Newton-CG"],
        epochs=[2, 5],
        options=[{"gtol": 1e-9, "ftol": 1e-6}, {}],
    )
    np.testing.assert_allclose(weights, w, atol=0.01)
    assert len(optimizer.results) == 2 and optimizer.results[-1].success


def test_0_1_pretrain_fn_and_callback_on_minimize(float64):
    x, y = small_data()
    model, _ = twin_models()
    model.compile(loss="mse", optimizer="scipy")
    optimizer = model.optimizer.build(model, x, y)
    frozen = {}

    def freeze_first_layer(m):
        m.layers[0].trainable = False
        frozen["kernel"] = m.layers[0].get_weights()[0].copy()

    seen = []
    weights = optimizer.minimize(
        epochs=[3, 3],
        method=["L-BFGS-B", "CG"],
        pretrain_fn=[None, freeze_first_layer],
        callback=lambda x: seen.append(x.size),
    )
    assert seen[:3] == [21] * 3 and set(seen[3:]) == {5}  # 4 kernel + 1 bias
    assert weights.size == 5
    np.testing.assert_array_equal(model.layers[0].get_weights()[0], frozen["kernel"])


def test_0_1_fit_points_to_fit_batch_when_compiled_with_a_batch_optimizer():
    x, y = small_data()
    model, _ = twin_models()
    model.compile(loss="mse", optimizer="scipy")
    assert model.fit == model.fit_batch
    history = model.fit_batch(x, y, epochs=3, verbose=0)
    assert len(history.history["loss"]) == 3
    model.compile(loss="mse", optimizer="adam")
    assert model.fit != model.fit_batch
    with pytest.raises(ValueError, match="compiled with a batch optimizer"):
        model.fit_batch(x, y, verbose=0)


def test_0_1_constructor_argument_order_and_defaults():
    # 0.1's order: name, method, epochs, pretrain_fn, options, ...
    options = {"gtol": 0.0}  # no early convergence: the run uses its whole budget
    optimizer = kormos.optimizers.ScipyBatchOptimizer("scipy", "bfgs", 4, None, options)
    assert (optimizer.name, optimizer.method, optimizer.epochs) == ("scipy", "bfgs", 4)
    base = kormos.optimizers.BatchOptimizer("batch", 2**10, 10, tf.float64)
    assert (base.name, base.batch_size, base.max_cache_entries) == ("batch", 1024, 10)
    x, y = small_data()
    model, _ = twin_models()
    model.compile(loss="mse", optimizer=optimizer)
    optimizer.build(model, x, y).minimize()  # the constructor's epochs
    assert optimizer.iterations == optimizer.results[-1].nit == 4
    assert type(kormos.optimizers.get("L-BFGS-B")) is kormos.ScipyBatchOptimizer
    with pytest.raises(ValueError, match="Received: identifier='invalid'"):
        kormos.optimizers.get("invalid")
    with pytest.raises(ValueError, match="`dtype` must be float64"):
        kormos.optimizers.BatchOptimizer(dtype=tf.float32)
    with pytest.warns(UserWarning, match="first argument is `name`.*method='bfgs'"):
        kormos.ScipyBatchOptimizer("bfgs")


# =============================================================================
# Bad input: a clear error before the weights are touched
# =============================================================================

X5, Y5 = regression_data(n=40)
BAD_INPUTS = [
    # (what is wrong, fit kwargs or "compile", exception, message pattern)
    (
        "unknown method in fit",
        {"method": "lbfgs"},
        ValueError,
        "method.*Valid names.*Received: method='lbfgs'",
    ),
    (
        "options not a dict",
        {"options": [("maxiter", 3)]},
        TypeError,
        "`options` must be a dict",
    ),
    (
        "chain lists of different lengths",
        {"method": ["cg", "bfgs"], "epochs": [3]},
        ValueError,
        "same length.*method has 2, epochs has 1",
    ),
    (
        "bounds of the wrong length",
        {"bounds": [(0, 1)] * 3},
        ValueError,
        "one \\(low, high\\) pair per weight: 6",
    ),
    (
        "bounds for a method that ignores them",
        {"method": "bfgs", "bounds": [(0, 1)] * 6},
        ValueError,
        "'bfgs' cannot take `bounds`",
    ),
    (
        "constraints for a method that ignores them",
        {"constraints": [{"type": "eq", "fun": np.sum}]},
        ValueError,
        "'l-bfgs-b' cannot take `constraints`",
    ),
    ("empty data", {"x": X5[:0], "y": Y5[:0]}, ValueError, "training data is empty"),
    (
        "x and y of different lengths",
        {"y": Y5[:30]},
        ValueError,
        "same number of samples.*x: \\[40\\], y: \\[30\\]",
    ),
    (
        "string targets",
        {"y": np.array(["a"] * 40)},
        ValueError,
        "`y` must hold numbers",
    ),
    (
        "dataset of the wrong structure",
        {"x": tf.data.Dataset.from_tensor_slices((X5, Y5, Y5, Y5)).batch(8), "y": None},
        ValueError,
        "tuple of 4 elements",
    ),
    ("epochs <= 0", {"epochs": 0}, ValueError, "`epochs`.*must be a positive integer"),
    (
        "batch_size <= 0",
        {"batch_size": 0},
        ValueError,
        "`batch_size` must be a positive integer.*batch_size=0",
    ),
    (
        "non-finite loss at the start",
        {"y": np.full((40, 1), np.nan)},
        ValueError,
        "not finite",
    ),
    (
        "y that would broadcast against the output",
        {"y": np.ones((40, 3))},
        ValueError,
        "would silently broadcast",
    ),
    (
        "dense-matrix method on a model too large",
        {"method": "bfgs", "max_dense_params": 4},
        ValueError,
        "dense 6 x 6.*max_dense_params",
    ),
    (
        "bounds for a quasi-Newton method",
        {"method": "ssbroyden", "bounds": [(0, 1)] * 6},
        ValueError,
        "'ssbroyden' cannot take `bounds`",
    ),
    (
        "constraints for a quasi-Newton method",
        {"method": "ssbfgs", "constraints": [{"type": "eq", "fun": np.sum}]},
        ValueError,
        "'ssbfgs' cannot take `constraints`",
    ),
    (
        "a scipy Bounds of the wrong length",
        {"bounds": scipy.optimize.Bounds(np.zeros(3), np.ones(3))},
        ValueError,
        r"`bounds.lb` \(one entry per weight\) must be a number or an array of "
        r"shape \(6,\). Received: an array of shape \(3,\)",
    ),
    (
        "options that are not a dict, echoed",
        {"options": "maxiter=5"},
        TypeError,
        "Received: options='maxiter=5'",
    ),
    (
        "an initial inverse Hessian that is not positive definite",
        {"method": "bfgs", "options": {"hess_inv0": -np.eye(6)}},
        ValueError,
        r"`options\['hess_inv0'\]` must be a symmetric positive definite 6 x 6",
    ),
    (
        "validation_split on a dataset",
        {
            "x": tf.data.Dataset.from_tensor_slices((X5, Y5)).batch(8),
            "y": None,
            "validation_split": 0.5,
        },
        ValueError,
        "only supported for arrays and tensors",
    ),
]


@pytest.mark.parametrize("case", breadth(BAD_INPUTS, 6, ids=[c[0] for c in BAD_INPUTS]))
def test_bad_input_raises_before_weights_change(case):
    _, kwargs, error, pattern = case
    kwargs = dict(kwargs)
    model = linear_model()
    max_dense = kwargs.pop("max_dense_params", 2000)
    model.compile(
        loss="mse", optimizer=kormos.ScipyBatchOptimizer(max_dense_params=max_dense)
    )
    before = weights_of(model)
    fit_kwargs = {"x": X5, "y": Y5, "epochs": 3, "verbose": 0, **kwargs}
    with pytest.raises(error, match=pattern):
        model.fit(**fit_kwargs)
    for a, b in zip(before, weights_of(model)):
        np.testing.assert_array_equal(a, b)


def test_fit_without_a_loss_raises_a_value_error_as_keras_does():
    x, y = regression_data(n=40)
    errors = {}
    for optimizer in ("adam", "l-bfgs-b"):
        model = linear_model(l2=0)
        model.compile(optimizer=optimizer)
        before = weights_of(model)
        with pytest.raises(ValueError) as raised:
            model.fit(x, y, epochs=2, verbose=0)
        errors[optimizer] = str(raised.value)
        for a, b in zip(before, weights_of(model)):
            np.testing.assert_array_equal(a, b)
    assert "No loss to compute" in errors["adam"]
    assert (
        "The model has no loss: pass `loss=` to `compile()` or override `compute_loss`."
        in errors["l-bfgs-b"]
    )


def test_float32_precision_loss_warns_to_use_float64():
    x, y = regression_data()
    model = linear_model(l2=0)
    model.compile(loss="mse", optimizer="bfgs")
    with pytest.warns(UserWarning, match="float32.*set_floatx\\('float64'\\)"):
        model.fit(x, y, epochs=200, verbose=0, options={"gtol": 1e-12})
    assert "float32" in model.optimizer.results[-1].message


def test_float32_stall_on_equal_losses_warns_and_says_so_in_the_result():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1000, 50))
    y = x @ rng.normal(size=(50, 1))
    messages = {}
    for dtype in ("float32", "float64"):
        with floatx(dtype):
            model = linear_model(d=50, l2=1e-3, use_bias=False, kernel_initializer="ones")
            model.compile(loss="mse", optimizer="l-bfgs-b")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                history = model.fit(x, y, epochs=100, verbose=0)
        result = model.optimizer.results[-1]
        messages[dtype] = (result.message, [str(w.message) for w in caught])
    message, caught = messages["float32"]
    # L-BFGS-B reports success on two equal float32 losses: kormos says why.
    assert re.match(r"CONVERGENCE: REL(ATIVE)?[ _]REDUCTION[ _]OF[ _]F", message)
    assert "float32 stall" in message and "set_floatx('float64')" in message
    assert any("float32 stall" in text for text in caught)
    last, before = history.history["loss"][-1], history.history["loss"][-2]
    assert abs(last - before) <= np.finfo(np.float32).eps * last  # float32-equal
    message, caught = messages["float64"]
    assert "float32" not in message and not any("float32" in t for t in caught)


def test_maxiter_is_the_budget_unless_epochs_is_given_and_then_epochs_wins(float64):
    x, y = small_data()
    model, _ = twin_models(width=8)
    model.compile(loss="mse", optimizer="l-bfgs-b")
    budget_free = {"gtol": 0, "ftol": 0}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(x, y, verbose=0, options={"maxiter": 25, **budget_free})
    assert not [w for w in caught if "maxiter" in str(w.message)]  # no conflict
    assert len(history.history["loss"]) == 25
    with pytest.warns(UserWarning, match="maxiter'\\]=25 and epochs=4.*epochs wins"):
        history = model.fit(x, y, epochs=4, verbose=0, options={"maxiter": 25})
    assert len(history.history["loss"]) == 4


def test_nonneg_constraint_with_a_method_without_bounds_warns():
    model = linear_model(kernel_constraint=keras.constraints.NonNeg())
    model.compile(loss="mse", optimizer="cg")
    with pytest.warns(UserWarning, match="'cg' cannot enforce the NonNeg") as caught:
        model.fit(X5, Y5, epochs=2, verbose=0)
    assert caught[0].filename == __file__


def test_unknown_optimizer_in_compile_lists_choices():
    model = linear_model()
    with pytest.raises(ValueError, match="Unknown optimizer 'lbfgs'.*l-bfgs-b"):
        model.compile(loss="mse", optimizer="lbfgs")


def test_fit_before_compile_and_model_without_trainable_weights():
    plain = keras.Sequential([keras.Input((5,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError) as keras_error:
        plain.fit(X5, Y5)
    model = linear_model()
    with pytest.raises(ValueError) as error:
        model.fit(X5, Y5)
    assert str(error.value) == str(keras_error.value)
    model.trainable = False
    model.compile(loss="mse", optimizer="l-bfgs-b")
    with pytest.raises(ValueError, match="no trainable weights"):
        model.fit(X5, Y5, verbose=0)


def test_trust_exact_refuses_large_models_with_the_memory_needed():
    model = kormos.BatchOptimizedSequentialModel(
        [keras.Input((80,)), keras.layers.Dense(80)]
    )
    model.compile(loss="mse", optimizer="trust-exact")
    with pytest.raises(ValueError, match=r"dense 6480 x 6480.*about 1\.3 GB"):
        model.fit(np.ones((4, 80)), np.ones((4, 80)), verbose=0)


class WithUnusedLayer(kormos.BatchOptimizedModel):
    def __init__(self):
        super().__init__()
        self.used = keras.layers.Dense(1)
        self.unused = keras.layers.Dense(2, name="unused")  # not on the loss' path
        self.unused.build((None, 5))

    def call(self, x):
        return self.used(x)


def test_weights_without_gradient_path_warn_and_stay_fixed():
    model = WithUnusedLayer()
    model.compile(loss="mse", optimizer="l-bfgs-b")
    unused = model.unused
    before = unused.get_weights()
    with pytest.warns(UserWarning, match="no gradient path.*unused/kernel") as caught:
        model.fit(X5, Y5, epochs=3, verbose=0)
    np.testing.assert_array_equal(unused.get_weights()[0], before[0])
    assert all(w.filename == __file__ for w in caught)  # the caller's line


class Walled(kormos.BatchOptimizedSequentialModel):
    """(w - 10)^2, undefined (NaN) beyond w = 5: the solver runs into the wall."""

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        w = self.trainable_variables[0][0, 0]
        wall = keras.ops.where(w > 5.0, np.nan, 0.0)
        return (w - 10.0) ** 2 + wall


def walled_model():
    return Walled(
        [keras.Input((1,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")]
    )


def test_non_finite_loss_mid_run_keeps_last_finite_iterate(float64):
    model = walled_model()
    model.compile(optimizer="l-bfgs-b")
    iterates = []
    callback = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda e, logs: iterates.append(model.optimizer.get_weights())
    )
    with pytest.warns(UserWarning, match="not finite") as caught:
        history = model.fit(
            np.ones((4, 1)), np.ones((4, 1)), epochs=20, verbose=0, callbacks=[callback]
        )
    # Raised while scipy evaluates, the warning still points at this call.
    assert [w.filename for w in caught if "not finite" in str(w.message)] == [__file__]
    w = model.optimizer.get_weights()
    assert iterates and np.all(np.isfinite(history.history["loss"]))
    assert 0.0 < w[0] <= 5.0  # it moved, and stopped before the wall
    np.testing.assert_array_equal(w, iterates[-1])
    assert model.optimizer.results[-1].status == 98
    assert "not finite" in model.optimizer.results[-1].message


def test_dropout_and_batchnorm_objective_is_deterministic(float64):
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=(64, 4)), rng.normal(size=(64, 1))
    model = kormos.BatchOptimizedSequentialModel(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.5),
            keras.layers.GaussianNoise(1.0),
            keras.layers.Dense(1),
        ]
    )
    model.compile(loss="mse", optimizer="l-bfgs-b")
    moving = [w.numpy().copy() for w in model.non_trainable_weights]
    history = fit_without_progress(model, x, y, epochs=15)
    optimizer = model.optimizer
    x_final = optimizer.get_weights()
    first = optimizer.func(x_final)
    again = kormos.ScipyBatchOptimizer().build(model, x, y)  # nothing cached
    assert again.func(x_final) == first
    np.testing.assert_allclose(
        first, model.evaluate(x, y, batch_size=64, verbose=0), rtol=1e-10
    )
    assert len(history.history["loss"]) == 15  # no line-search failure on noise
    for before, after in zip(moving, model.non_trainable_weights):
        np.testing.assert_array_equal(before, after.numpy())


# =============================================================================
# Dense quasi-Newton methods: BFGS, SSBFGS, SSBroyden
# =============================================================================

QUASI_NEWTON = ["bfgs", "ssbfgs", "ssbroyden"]


def convex_problem(n=40, seed=0):
    """A strictly convex smooth function (quadratic plus log cosh) and a start."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, n))
    q, b = a.T @ a / n + 0.1 * np.eye(n), rng.normal(size=n)

    def loss_and_gradient(x):
        loss = 0.5 * x @ q @ x - b @ x + 0.05 * np.sum(np.log(np.cosh(x)))
        return loss, q @ x - b + 0.05 * np.tanh(x)

    return loss_and_gradient, rng.normal(size=n)


@pytest.mark.parametrize("update", QUASI_NEWTON)
def test_quasi_newton_update_keeps_the_secant_equation_symmetry_and_definiteness(
    update,
):
    rng = np.random.default_rng(1)
    n = 12
    a = rng.normal(size=(n, n))
    hessian = a @ a.T + np.eye(n)
    inverse = kormos._InverseHessian(np.eye(n))
    g = rng.normal(size=n)
    hg = inverse.times(g)
    for _ in range(25):
        p = -hg
        alpha = -(g @ p) / (p @ hessian @ p)  # an exact line search: Wolfe holds
        s = alpha * p
        y = hessian @ s
        g_new = g + y
        hg_new = inverse.times(g_new)
        hg = inverse.update(
            s, y, hg_new + p, hg_new, g_new, -alpha * (s @ g), kormos._SCALINGS[update]
        )
        h = inverse.symmetric().copy()
        np.testing.assert_allclose(h @ y, s, rtol=1e-8, atol=1e-12 * np.abs(s).max())
        np.testing.assert_array_equal(h, h.T)
        assert np.linalg.eigvalsh(h).min() > 0
        np.testing.assert_allclose(hg, h @ g_new, rtol=1e-9, atol=1e-12)
        g = g_new
        if np.linalg.norm(g) < 1e-9:
            break


@pytest.mark.parametrize("phi", [0.0, 0.5, 1.0, 3.0, -0.5])
def test_quasi_newton_update_is_the_scaled_broyden_class_formula(phi):
    """Urban et al., eq. 13, written out densely, for Broyden-class members on
    both sides of BFGS (phi = 1) and a self-scaling tau."""
    rng = np.random.default_rng(2)
    n, tau = 9, 0.7
    a = rng.normal(size=(n, n))
    start = 0.1 * (a @ a.T / n + np.eye(n))
    s, g = rng.normal(size=n), rng.normal(size=n)
    y = s + 0.1 * rng.normal(size=n)
    inverse = kormos._InverseHessian(start)
    h = start @ y
    hg = inverse.update(s, y, h, start @ g, g, 1.0, lambda *_: (tau, phi))
    ys, yhy = y @ s, y @ h
    v = s / ys - h / yhy
    expected = (start - np.outer(h, h) / yhy + phi * yhy * np.outer(v, v)) / tau
    expected += np.outer(s, s) / ys
    np.testing.assert_allclose(inverse.symmetric(), expected, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(hg, expected @ g, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("update", QUASI_NEWTON)
def test_a_matrix_that_lost_definiteness_restarts_from_the_identity(update):
    """Roundoff can take a long-carried matrix's definiteness; where -H g is
    no descent direction, the run restarts H rather than fail its line search."""
    loss_and_gradient, x0 = convex_problem(n=10)
    indefinite = kormos._InverseHessian(-np.eye(10))  # trusted, as a warm start's
    method = functools.partial(kormos._minimize_quasi_newton, update=update)
    result = scipy.optimize.minimize(loss_and_gradient, x0, jac=True, method=method,
                                     options={"hess_inv0": indefinite, "gtol": 1e-8})
    assert result.success, result.message
    assert np.linalg.eigvalsh(result.hess_inv).min() > 0


def test_quasi_newton_update_is_skipped_without_curvature():
    inverse = kormos._InverseHessian(np.eye(3))
    s, y, g = np.array([1.0, 0, 0]), np.array([-1.0, 0, 0]), np.ones(3)  # y's < 0
    hg = inverse.update(s, y, -s, g, g, 1.0, kormos._SCALINGS["ssbroyden"])
    np.testing.assert_array_equal(inverse.symmetric(), np.eye(3))
    np.testing.assert_array_equal(hg, g)


def test_bfgs_takes_the_iterates_and_result_of_scipys_bfgs(float64):
    """L2-regularized logistic regression (convex): 20 iterations of
    fit(optimizer="bfgs") against scipy's BFGS on the same objective."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 10))
    y = (x @ rng.normal(size=(10, 1)) + 0.5 * rng.normal(size=(300, 1)) > 0) * 1.0
    model = kormos.BatchOptimizedSequentialModel([keras.Input((10,)), keras.layers.Dense(
        1, activation="sigmoid", kernel_regularizer=keras.regularizers.L2(1e-3))])
    model.compile(loss="binary_crossentropy", optimizer="bfgs")
    objective = kormos.ScipyBatchOptimizer().build(model, x, y)
    x0, scipys = objective.get_weights(), []
    theirs = scipy.optimize.minimize(
        objective.func_and_grad, x0, jac=True, method="BFGS",
        options={"maxiter": 20, "gtol": 1e-12},
        callback=lambda intermediate_result: scipys.append(intermediate_result.fun),
    )
    objective.set_weights(x0)  # the same start
    history = fit_without_progress(model, x, y, epochs=20, options={"gtol": 1e-12})
    ours = model.optimizer.results[-1]
    assert len(history.epoch) == len(scipys) == 20
    np.testing.assert_allclose(history.history["loss"], scipys, rtol=1e-6)
    np.testing.assert_allclose(ours.x, theirs.x, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(ours.hess_inv, theirs.hess_inv, rtol=1e-4, atol=1e-6)
    assert (ours.status, ours.message) == (theirs.status, theirs.message)


@pytest.mark.parametrize("method", breadth(QUASI_NEWTON, fast=3))
def test_quasi_newton_fit_reaches_the_ridge_optimum(method, float64):
    x, y = regression_data()
    model = linear_model(l2=1e-2)
    model.compile(loss="mse", optimizer=method, metrics=["mae"])
    history = fit_without_progress(model, x, y, epochs=100, options={"gtol": 1e-7})
    w = model.optimizer.get_weights()
    np.testing.assert_allclose(w, ridge_solution(x, y, 1e-2), rtol=1e-6, atol=1e-8)
    result = model.optimizer.results[-1]
    assert result.success and result.message == "Optimization terminated successfully."
    assert len(history.epoch) == result.nit and result.nfev == history.history["fg_evals"][-1]
    assert result.hess_inv.shape == (6, 6)


def test_quasi_newton_keeps_a_float64_matrix_for_a_float32_model():
    x, y = regression_data()
    model = linear_model(l2=0)
    model.compile(loss="mse", optimizer="ssbroyden")
    fit_without_progress(model, x, y, epochs=30, options={"gtol": 1e-4})
    result = model.optimizer.results[-1]
    assert result.hess_inv.dtype == np.float64 and result.success
    assert result.fun < 0.0105


@pytest.mark.slow
def test_self_scaled_methods_beat_lbfgsb_tenfold_on_a_poisson_pinn(float64):
    """examples/poisson_pinn.py (481 weights, 200 points, float64, the same
    start): after 400 iterations, SSBFGS and SSBroyden end with a relative L2
    error at least 10x below L-BFGS-B's."""
    poisson = load_example("poisson_pinn")
    errors = {m: rows[-1][2] for m, rows in poisson.race(
        400, ["l-bfgs-b", "ssbfgs", "ssbroyden"], every=400).items()}
    assert errors["ssbroyden"] * 10 <= errors["l-bfgs-b"], errors
    assert errors["ssbfgs"] * 10 <= errors["l-bfgs-b"], errors


@pytest.mark.parametrize("method", breadth(["bfgs", "ssbroyden"], fast=1))
def test_a_warm_started_fit_needs_fewer_iterations_than_a_cold_one(method, float64):
    """Least squares with badly scaled inputs: the second fit (new targets, the
    same Hessian) starts from the curvature the first one learned."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 10)) * np.logspace(0, 1.5, 10)
    first, second = x @ rng.normal(size=(10, 1)), x @ rng.normal(size=(10, 1))
    iterations = {}
    for warm_start in (False, True):
        keras.utils.set_random_seed(0)
        model = kormos.BatchOptimizedSequentialModel(
            [keras.Input((10,)), keras.layers.Dense(1, use_bias=False)]
        )
        model.compile(loss="mse", optimizer=kormos.ScipyBatchOptimizer(
            method=method, warm_start=warm_start, options={"gtol": 1e-8}
        ))
        fit_without_progress(model, x, first, epochs=500)
        history = fit_without_progress(model, x, second, epochs=500)
        iterations[warm_start] = len(history.epoch)
        result = model.optimizer.results[-1]
        assert result.success
        np.testing.assert_allclose(result.hess_inv, result.hess_inv.T)
        assert np.linalg.eigvalsh(result.hess_inv).min() > 0
    assert iterations[True] <= iterations[False] / 2, iterations


def test_warm_start_with_another_number_of_weights_starts_cold_with_a_warning():
    x, y = regression_data()
    optimizer = kormos.ScipyBatchOptimizer(method="bfgs", warm_start=True)
    model = linear_model()
    model.compile(loss="mse", optimizer=optimizer)
    fit_without_progress(model, x, y, epochs=5)
    wider = linear_model(d=4)
    wider.compile(loss="mse", optimizer=optimizer)
    with pytest.warns(UserWarning, match="5 trainable weights.*carried.*6.*identity"):
        fit_without_progress(wider, x[:, :4], y, epochs=5)
    assert optimizer.results[-1].hess_inv.shape == (5, 5)


def test_warm_start_is_refused_for_methods_without_an_inverse_hessian():
    with pytest.raises(ValueError, match="warm_start=True.*Received: method='l-bfgs-b'"):
        kormos.ScipyBatchOptimizer(method="l-bfgs-b", warm_start=True)


def test_dense_methods_refuse_a_model_whose_matrices_do_not_fit_in_memory():
    model = kormos.BatchOptimizedSequentialModel(
        [keras.Input((500,)), keras.layers.Dense(400)]
    )
    model.compile(loss="mse", optimizer="ssbroyden")
    before = weights_of(model)
    n = 500 * 400 + 400
    with pytest.raises(ValueError, match=rf"dense {n} x {n}.*\({2 * 8 * n * n} bytes\), "
                       "more than the .* GB of memory available"):
        fit_without_progress(model, np.ones((4, 500)), np.ones((4, 400)))
    assert all(np.array_equal(a, b) for a, b in zip(before, weights_of(model)))


def test_an_unknown_option_of_a_quasi_newton_method_is_named_in_a_warning():
    x, y = regression_data()
    model = linear_model()
    model.compile(loss="mse", optimizer="ssbfgs")
    with pytest.warns(scipy.optimize.OptimizeWarning, match="Unknown solver options: maxcors"):
        fit_without_progress(model, x, y, epochs=3, options={"maxcors": 3})


def test_quasi_newton_stops_at_the_last_finite_iterate(float64):
    model = walled_model()
    model.compile(optimizer="ssbroyden")
    with pytest.warns(UserWarning, match="not finite"):
        history = model.fit(np.ones((4, 1)), np.ones((4, 1)), epochs=20, verbose=0)
    w = model.optimizer.get_weights()
    assert 0.0 < w[0] <= 5.0 and np.isfinite(history.history["loss"]).all()
    assert model.optimizer.results[-1].status == 98


# =============================================================================
# Properties (hypothesis)
# =============================================================================

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # optional: without it these tests are skipped

    class _Absent:
        """Stands for hypothesis' strategies and health checks."""

        def __getattr__(self, name):
            return lambda *args, **kwargs: self

        def __iter__(self):
            return iter(())

    HealthCheck = st = _Absent()

    def settings(**kwargs):
        return lambda test: test

    def given(**kwargs):
        return pytest.mark.skip(reason="hypothesis is not installed")

shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)


@settings(max_examples=25, deadline=None)
@given(
    shape_list=st.lists(shapes, min_size=1, max_size=4),
    dtype=st.sampled_from(["float32", "float64", "float16"]),
    seed=st.integers(0, 2**16),
)
@pytest.mark.slow
def test_pack_unpack_round_trip_property(shape_list, dtype, seed):
    rng = np.random.default_rng(seed)
    variables = [
        keras.Variable(rng.normal(size=s).astype(dtype), dtype=dtype)
        for s in shape_list
    ]
    x = kormos.pack_weights(variables)
    assert x.dtype == np.float64
    assert x.size == sum(int(np.prod(s)) for s in shape_list)
    new = rng.normal(size=x.size).astype(dtype).astype(np.float64)
    kormos.unpack_weights(new, variables)
    np.testing.assert_array_equal(kormos.pack_weights(variables), new)
    with pytest.raises(ValueError, match="flat vector"):
        kormos.unpack_weights(np.zeros(x.size + 1), variables)


@pytest.mark.slow
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch_size=st.integers(1, 40), n=st.integers(5, 40))
def test_objective_is_independent_of_batch_size_property(batch_size, n):
    with floatx("float64"):
        model, full, x, y = mlp_problem(n=n)
        x0 = full.get_weights()
        batched = kormos.ScipyBatchOptimizer().build(model, x, y, batch_size=batch_size)
        np.testing.assert_allclose(batched.func(x0), full.func(x0), rtol=1e-12)
        np.testing.assert_allclose(
            batched.grad(x0), full.grad(x0), rtol=1e-9, atol=1e-13
        )


# =============================================================================
# Bounds, exact Hessians, physics-informed losses, custom minimizers
# =============================================================================


def nonnegative_factorization_model(num_users=20, num_items=30, rank=3):
    user, item = keras.Input((1,), dtype="int32"), keras.Input((1,), dtype="int32")
    embed = dict(
        embeddings_initializer=keras.initializers.RandomUniform(0, 1),
        embeddings_constraint=keras.constraints.NonNeg(),
    )
    u = keras.layers.Embedding(num_users, rank, name="users", **embed)(user)
    v = keras.layers.Embedding(num_items, rank, name="items", **embed)(item)
    out = keras.layers.Flatten()(keras.layers.Dot(axes=2)([u, v]))
    return kormos.BatchOptimizedModel([user, item], out)


def test_nonneg_constraints_become_bounds_for_nonnegative_factorization(float64):
    rng = np.random.default_rng(10)
    w, h = rng.random((20, 3)), rng.random((30, 3))
    users, items = np.meshgrid(np.arange(20), np.arange(30), indexing="ij")
    users, items = users.ravel(), items.ravel()
    ratings = (w @ h.T)[users, items] - 0.3  # some targets want negative factors
    model = nonnegative_factorization_model()
    model.compile(loss="mse", optimizer="l-bfgs-b")
    history = fit_without_progress(model, (users, items), ratings[:, None], epochs=100)
    x = model.optimizer.get_weights()
    assert x.min() == 0.0  # active bounds: unconstrained L-BFGS would go negative
    assert history.history["loss"][-1] < 0.05 * history.history["loss"][0]
    assert model.optimizer.results[-1].success


def test_bounds_by_path_suffix_bounds_object_and_ambiguity(float64):
    x, y = regression_data()
    model = kormos.BatchOptimizedSequentialModel(
        [keras.Input((5,)), keras.layers.Dense(3), keras.layers.Dense(1)]
    )
    model.compile(loss="mse", optimizer="l-bfgs-b")
    suffix = "/".join(model.layers[1].kernel.path.split("/")[-2:])  # "dense_1/kernel"
    fit_without_progress(model, x, y, epochs=30, bounds={suffix: (-0.1, 0.1)})
    assert np.abs(model.layers[1].kernel.numpy()).max() <= 0.1 + 1e-12
    assert np.abs(model.layers[0].kernel.numpy()).max() > 0.1
    with pytest.raises(ValueError, match="'kernel' is ambiguous"):
        fit_without_progress(model, x, y, epochs=3, bounds={"kernel": (0, 1)})
    with pytest.raises(ValueError, match="matches no trainable variable"):
        fit_without_progress(model, x, y, epochs=3, bounds={"nope/kernel": (0, 1)})
    n = model.optimizer.get_weights().size
    fit_without_progress(
        model,
        x,
        y,
        epochs=30,
        method="tnc",
        bounds=scipy.optimize.Bounds(np.full(n, -0.05), np.full(n, 0.05)),
    )
    assert np.abs(model.optimizer.get_weights()).max() <= 0.05 + 1e-12


def test_non_box_constraint_warns():
    model = kormos.BatchOptimizedSequentialModel(
        [
            keras.Input((5,)),
            keras.layers.Dense(1, kernel_constraint=keras.constraints.MaxNorm(1.0)),
        ]
    )
    model.compile(loss="mse", optimizer="l-bfgs-b")
    with pytest.warns(UserWarning, match="MaxNorm on .*kernel is not a box"):
        model.fit(X5, Y5, epochs=2, verbose=0)


def test_dense_hessian_is_exact_for_least_squares(float64):
    x, y = regression_data(n=50, d=3)
    model = linear_model(d=3, l2=0.1)
    model.compile(loss="mse", optimizer="dogleg")
    optimizer = model.optimizer.build(model, x, y)
    n = len(x)
    a = np.hstack([x, np.ones((n, 1))])
    expected = 2 * a.T @ a / n + 2 * effective_l2(0.1) * np.diag([1.0, 1, 1, 0])
    np.testing.assert_allclose(
        optimizer.hess(optimizer.get_weights()), expected, rtol=1e-10
    )


def test_custom_minimizer_callable_receives_callback_and_options(float64):
    calls = {}

    def gradient_descent(
        fun, x0, args=(), jac=None, callback=None, maxiter=100, lr=0.1, **kwargs
    ):
        calls.update(maxiter=maxiter, lr=lr)
        x = x0.copy()
        for _ in range(maxiter):
            x = x - lr * jac(x)
            callback(scipy.optimize.OptimizeResult(x=x, fun=fun(x)))
        return scipy.optimize.OptimizeResult(
            x=x, fun=fun(x), success=True, nit=maxiter, message="done"
        )

    x, y = regression_data()
    model = linear_model()
    model.compile(
        loss="mse", optimizer=kormos.ScipyBatchOptimizer(method=gradient_descent)
    )
    history = fit_without_progress(model, x, y, epochs=30, options={"lr": 0.2})
    assert calls == {"maxiter": 30, "lr": 0.2}
    assert len(history.history["loss"]) == 30
    assert history.history["loss"][-1] < 0.1 * history.history["loss"][0]


@keras.saving.register_keras_serializable(package="kormos_tests")
def steepest_descent(fun, x0, args=(), jac=None, callback=None, maxiter=10, **kw):
    x = x0.copy()
    for _ in range(maxiter):
        x = x - 0.1 * jac(x)
        callback(scipy.optimize.OptimizeResult(x=x, fun=fun(x)))
    return scipy.optimize.OptimizeResult(x=x, fun=fun(x), success=True, nit=maxiter)


def test_saved_model_keeps_a_registered_custom_minimizer(tmp_path):
    x, y = regression_data()
    model = linear_model()
    model.compile(
        loss="mse", optimizer=kormos.ScipyBatchOptimizer(method=steepest_descent)
    )
    path = str(tmp_path / "custom.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.optimizer.method is steepest_descent
    history = fit_without_progress(loaded, x, y, epochs=3)
    assert len(history.history["loss"]) == 3


def test_loading_an_unregistered_custom_minimizer_says_how_to_fix_it(tmp_path):
    def local_descent(fun, x0, **kwargs):
        return scipy.optimize.OptimizeResult(x=x0, fun=fun(x0), success=True)

    model = linear_model()
    model.compile(
        loss="mse", optimizer=kormos.ScipyBatchOptimizer(method=local_descent)
    )
    path = str(tmp_path / "local.keras")
    model.save(path)
    with pytest.raises(TypeError, match="custom_objects"):
        keras.models.load_model(path)
    loaded = keras.models.load_model(
        path, custom_objects={"local_descent": local_descent}
    )
    assert loaded.optimizer.method is local_descent


class DecayODE(kormos.BatchOptimizedSequentialModel):
    """u' = -u on [0, 2] with u(0) = 1, i.e. u = exp(-t), as a PINN residual."""

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        t = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(t)
            u = self(t, training=False)
        du = tape.gradient(u, t)
        u0 = self(tf.zeros((1, 1), t.dtype), training=False)
        return tf.reduce_mean((du + u) ** 2) + tf.reduce_sum((u0 - 1.0) ** 2)


@pytest.mark.slow
def test_physics_informed_ode_adam_then_lbfgs(float64):
    t = np.linspace(0, 2, 64)[:, None]
    model = DecayODE(
        [
            keras.Input((1,)),
            keras.layers.Dense(16, activation="tanh"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    model.fit(t, epochs=100, batch_size=64, verbose=0)
    model.compile(optimizer="l-bfgs-b")
    history = fit_without_progress(model, t, epochs=300, options={"gtol": 1e-12, "ftol": 1e-15})
    error = np.abs(model.predict(t, verbose=0) - np.exp(-t)).max()
    assert history.history["loss"][-1] < 1e-7
    assert error < 1e-3


def load_example(name):
    """Imports examples/<name>.py as a module."""
    import importlib.util

    path = Path(kormos.__file__).parent / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_burgers_pinn_example_small_version(float64):
    """examples/burgers_pinn.py scaled down: viscosity 0.1/pi (10x the paper's,
    so that 300 iterations resolve it), a 4 x 20 tanh network, 1,000
    collocation points. It reaches about 7e-3; a flipped u*u_x sign, a dropped
    viscosity term or a missing MSE_u end at 0.3 to 1."""
    burgers = load_example("burgers_pinn")
    nu = 0.1 / np.pi
    tx_f, tx_u, u_u, grid, u_grid = burgers.make_problem(n_f=1000, seed=1234, nu=nu)
    model = burgers.BurgersPINN(
        tx_u=tx_u, u_u=u_u, lower=grid.min(0), upper=grid.max(0), nu=nu, depth=4
    )
    model.compile(optimizer="l-bfgs-b")
    fit_without_progress(model, tx_f, epochs=300, options={"gtol": 0, "ftol": 0, "maxcor": 50})
    u = model.predict(grid, verbose=0)
    error = np.linalg.norm(u - u_grid) / np.linalg.norm(u_grid)
    assert error < 0.05, error


# =============================================================================
# tf.distribute
# =============================================================================

MIRRORED_SCRIPT = r"""
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, tensorflow as tf, keras
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import kormos

seen = set()

class Recording(keras.layers.Layer):
    # An identity that records which replica (and device) runs it.
    def call(self, x):
        context = tf.distribute.get_replica_context()
        replica = context.replica_id_in_sync_group if context else -1
        replica = int(tf.get_static_value(replica)) if tf.is_tensor(replica) else replica
        seen.add((replica, tf.constant(0.0).device.split("device:")[-1]))
        return x

def fit(strategy, dtype, loss):
    keras.config.set_floatx(dtype); keras.config.set_dtype_policy(dtype)
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(101, 4)); y = np.tanh(x @ rng.normal(size=(4, 1)))
    with strategy.scope():  # build, compile and fit inside the scope
        model = kormos.BatchOptimizedSequentialModel([keras.Input((4,)), Recording(), keras.layers.Dense(8, activation="tanh",
                           kernel_regularizer=keras.regularizers.L2(1e-3)), keras.layers.Dense(1)])
        model.compile(loss=keras.losses.MeanSquaredError(reduction=loss),
                      optimizer="l-bfgs-b", metrics=["mae"])
        opt = model.optimizer.build(model, x, y, batch_size=32)
        w0 = opt.get_weights()
        at_start = (opt.func(w0), opt.grad(w0), opt.hessp(w0, np.ones(49)))
        # 101 rows and 21 validation rows split unevenly over two replicas.
        h = model.fit(x, y, epochs=8, batch_size=32, verbose=0,
                      validation_data=(x[:21], y[:21]))
        q = model.fit(x, y, epochs=4, verbose=0, method="ssbroyden")
    return at_start, {**h.history, "ssbroyden": q.history["loss"]}

# The objective, its gradient and an HVP agree to roundoff; 8 iterations of
# L-BFGS-B amplify roundoff somewhat (most with the larger summed loss).
for dtype, exact, path in (("float64", 1e-12, 1e-6), ("float32", 1e-5, 1e-3)):
    for loss in ("sum_over_batch_size", "sum"):  # created after set_floatx
        one, h1 = fit(tf.distribute.get_strategy(), dtype, loss)
        seen.clear()
        two, h2 = fit(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), dtype, loss)
        assert {0, 1} <= {r for r, _ in seen}, seen
        for a, b in zip(one, two):
            np.testing.assert_allclose(a, b, rtol=exact, atol=exact * np.abs(a).max())
        for key in ("loss", "mae", "val_loss", "ssbroyden"):
            np.testing.assert_allclose(h1[key], h2[key], rtol=path)
        print("MIRRORED-OK", dtype, loss, len(h1["loss"]), h1["loss"][-1])
"""


@pytest.mark.slow
def test_mirrored_strategy_runs_on_every_replica_and_matches_one_device(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(kormos.__file__).parent,
    )
    assert result.stdout.count("MIRRORED-OK") == 4, result.stdout + result.stderr[-3000:]


# =============================================================================
# Memory: a dataset that is never materialised
# =============================================================================

STREAMING_SCRIPT = r"""
import os, resource
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, tensorflow as tf, keras, kormos
ROWS, BATCH = 10_000_000, 100_000  # 800 MB of float32 features if materialised

def make_batch(i):
    x = tf.random.stateless_normal((BATCH, 20), seed=tf.stack([i, i]))
    return x, tf.reduce_sum(x, axis=1, keepdims=True)

dataset = tf.data.Dataset.range(ROWS // BATCH).map(make_batch)
model = kormos.BatchOptimizedSequentialModel([keras.Input((20,)), keras.layers.Dense(1)])
model.compile(loss="mse", optimizer="l-bfgs-b")
optimizer = model.optimizer.build(model, dataset)
x0 = optimizer.get_weights()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
for k in range(3):
    f, g = optimizer.func_and_grad(x0 + k)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"STREAM-OK grew={after - before:.0f}MB peak={after:.0f}MB loss={f:.4f}")
"""


@pytest.mark.slow
def test_streaming_dataset_of_ten_million_rows_stays_in_bounded_memory(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "stream.py"
    script.write_text(STREAMING_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300
    )
    match = re.search(r"STREAM-OK grew=(-?\d+)MB", result.stdout)
    assert match, result.stdout + result.stderr[-3000:]
    assert int(match.group(1)) < 250  # one batch is 8 MB; all rows 800 MB


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", breadth([None, 16]))  # XLA whole / in a loop
def test_jit_compile_gives_the_same_objective(float64, batch_size):
    model, _, x, y = mlp_problem(n=50)
    optimizers = {}
    for jit_compile in (False, True):
        model.compile(
            loss="mse", optimizer="l-bfgs-b", metrics=["mae"], jit_compile=jit_compile
        )
        optimizers[jit_compile] = model.optimizer.build(
            model, x, y, batch_size=batch_size
        )
    plain, xla = optimizers[False], optimizers[True]
    assert model.jit_compile
    x0 = plain.get_weights()
    np.testing.assert_allclose(xla.func(x0), plain.func(x0), rtol=1e-12)
    np.testing.assert_allclose(xla.grad(x0), plain.grad(x0), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(
        xla.hessp(x0, x0), plain.hessp(x0, x0), rtol=1e-10, atol=1e-14
    )
    assert xla.uses_xla and not plain.uses_xla
    mae = plain.metrics_at(x0)["mae"]
    assert mae > 0
    assert xla.metrics_at(x0)["mae"] == pytest.approx(mae, rel=1e-12)


class CountsTraces(keras.layers.Layer):
    """Identity that counts how often Python runs its `call`: once per trace
    (and once per eager call)."""

    calls = 0

    def call(self, x):
        CountsTraces.calls += 1
        return x


def test_refit_reuses_the_compiled_functions_with_the_new_data(float64):
    x, y = regression_data(n=40)
    model = kormos.BatchOptimizedSequentialModel(
        [keras.Input((5,)), CountsTraces(), keras.layers.Dense(1)]
    )
    model.compile(loss="mse", optimizer="l-bfgs-b")
    fit_without_progress(model, x, y, epochs=2)
    opt = model.optimizer

    def traces_of_a_fit(x, y):
        before = CountsTraces.calls
        fit_without_progress(model, x, y, epochs=2)
        return CountsTraces.calls - before  # kormos never calls it eagerly

    # Same shapes, new values: the traced functions are reused...
    x2, y2 = x[::-1] * 0.5, np.cos(y)
    assert traces_of_a_fit(x2, y2) == 0
    # ... and they compute on the new data, as a fresh optimizer does.
    fresh = kormos.ScipyBatchOptimizer().build(model, x2, y2)
    w = opt.get_weights()
    np.testing.assert_allclose(opt.func_and_grad(w)[0], fresh.func(w), rtol=1e-12)
    np.testing.assert_allclose(opt.grad(w), fresh.grad(w), rtol=1e-10)
    # Other shapes, a recompile or a frozen weight trace anew.
    assert traces_of_a_fit(x[:30], y[:30]) > 0
    model.compile(loss="mse", optimizer=opt)
    assert traces_of_a_fit(x[:30], y[:30]) > 0
    model.layers[-1].kernel.trainable = False
    assert traces_of_a_fit(x[:30], y[:30]) > 0
    assert opt.get_weights().size == 1  # only the bias is trained


class _NumpyOnes(keras.layers.Layer):
    """Multiplies by ones computed in numpy: an op that XLA cannot compile."""

    def call(self, x):
        ones = tf.numpy_function(np.ones_like, [x], x.dtype, stateful=False)
        return x * tf.stop_gradient(tf.reshape(ones, tf.shape(x)))


def embedding_model(jit_compile="auto", numpy_layer=False):
    keras.utils.set_random_seed(0)
    item = keras.Input((), dtype="int32")
    h = keras.layers.Embedding(20, 3)(item)
    if numpy_layer:
        h = _NumpyOnes()(h)
    model = kormos.BatchOptimizedModel(item, keras.layers.Dense(1)(h))
    model.compile(loss="mse", optimizer="l-bfgs-b", jit_compile=jit_compile)
    return model


def embedding_data():
    items = np.arange(300) % 20
    return items, np.random.default_rng(0).normal(size=(300, 1))


@pytest.mark.slow
@pytest.mark.parametrize(
    "jit_compile, numpy_layer, expected",
    breadth(
        [("auto", False, "xla"), (False, False, "plain"), ("auto", True, "fell back")],
        unpack=True,
    ),
)
def test_auto_jit_compiles_embedding_models_and_falls_back(
    float64, jit_compile, numpy_layer, expected
):
    x, y = embedding_data()
    model = embedding_model(jit_compile, numpy_layer)
    assert not model.jit_compile  # Keras' "auto" is off on a CPU
    opt = model.optimizer.build(model, x, y)
    w0 = opt.get_weights()
    v = np.random.default_rng(1).normal(size=w0.size)
    f, g = opt.func_and_grad(w0)
    hv = opt.hessp(w0, v)
    assert opt.uses_xla == (expected == "xla")
    # Reference: the same model with XLA forbidden.
    reference_model = embedding_model(False)
    reference = reference_model.optimizer.build(reference_model, x, y)
    f0, g0 = reference.func_and_grad(w0)
    np.testing.assert_allclose(f, f0, rtol=1e-12)
    np.testing.assert_allclose(g, g0, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(hv, reference.hessp(w0, v), rtol=1e-10, atol=1e-14)


@pytest.mark.slow
def test_jit_compile_true_raises_when_xla_cannot_compile(float64):
    x, y = embedding_data()
    model = embedding_model(True, numpy_layer=True)
    opt = model.optimizer.build(model, x, y)
    with pytest.raises(tf.errors.InvalidArgumentError):
        opt.func(opt.get_weights())


@pytest.mark.slow
def test_saved_model_keeps_the_jit_compile_request(tmp_path):
    x, y = embedding_data()
    model = embedding_model("auto")
    model.fit(x, y, epochs=1, verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.get_compile_config()["jit_compile"] == "auto"
    loaded.fit(x, y, epochs=1, verbose=0)
    assert loaded.optimizer.uses_xla


# =============================================================================
# The README: every python block runs as written
# =============================================================================


def readme_examples():
    """The README's python blocks, each with the text block right after it
    (its printed output) or None."""
    text = (Path(kormos.__file__).parent / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```\n(?:\n```text\n(.*?)```)?", text, re.S)


NUMBER = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)"


def same_output(printed, expected, rtol=1e-3):
    """True if `printed` is `expected` word for word and number for number,
    the numbers to `rtol` (the last digit of a 4-digit figure may differ
    between the oldest and the newest tested versions; scipy 1.11 writes
    L-BFGS-B's messages in other case, with underscores for spaces)."""
    printed = re.sub(r"(?<=[A-Z=])_(?=[A-Z<])", " ", printed)
    got, want = re.split(NUMBER, printed.strip()), re.split(NUMBER, expected.strip())
    if len(got) != len(want):
        return False
    return all(
        a.lower() == b.lower() if i % 2 == 0 else np.isclose(float(a), float(b), rtol=rtol)
        for i, (a, b) in enumerate(zip(got, want))
    )


def test_same_output_compares_words_exactly_and_numbers_to_a_tolerance():
    assert same_output("loss 12.48 after 6 it", "loss 12.4801 after 6 it")
    assert not same_output("max = 3.0e-04", "max = 6.0e-04")
    assert not same_output("28 99 Stopped", "29 99 Stopped")
    assert not same_output("loss 1.0", "val_loss 1.0")
    assert same_output("NORM_OF_PROJECTED_GRADIENT_<=_PGTOL", "NORM OF PROJECTED GRADIENT <= PGTOL")
    assert same_output("STOP: TOTAL NO. of ITERATIONS", "STOP: TOTAL NO. OF ITERATIONS")


@pytest.mark.slow
def test_the_first_demo_runs_and_prints_no_warning():
    """README's first command: `python examples/linear_regression.py`."""
    root = Path(kormos.__file__).parent
    result = subprocess.run(
        [sys.executable, str(root / "examples" / "linear_regression.py")],
        capture_output=True, text=True, timeout=600, cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Warning" not in result.stderr, result.stderr[-3000:]
    assert "== Functional model, Newton-CG ==" in result.stdout


@pytest.mark.slow
def test_the_tests_collect_without_hypothesis(tmp_path):
    code = (
        "import sys; sys.modules['hypothesis'] = None\n"
        "import test_kormos\n"
        "marks = test_kormos.test_pack_unpack_round_trip_property.pytestmark\n"
        "print('skip' in [m.name for m in marks])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
        cwd=Path(__file__).parent,
    )
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("block", range(len(readme_examples())))
def test_readme_python_block_prints_its_output_block_and_no_warning(block, tmp_path):
    """Each README python block runs as a program of its own, prints exactly
    what the text block after it shows (numbers to 1e-3) and no warning."""
    code, expected = readme_examples()[block]
    assert expected, "every python block is followed by its output"
    script = tmp_path / "readme.py"
    script.write_text(code)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600,
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(Path(kormos.__file__).parent)},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "Warning" not in result.stderr, result.stderr[-3000:]
    assert same_output(result.stdout, expected), (
        f"README block {block} printed:\n{result.stdout}\nexpected:\n{expected}"
    )


def test_solver_runs_with_one_blas_thread_and_restores_it():
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas_threads():
        return [
            lib["num_threads"]
            for lib in threadpoolctl.threadpool_info()
            if lib["user_api"] == "blas"
        ]

    if not blas_threads():
        pytest.skip("threadpoolctl finds no BLAS library in numpy or scipy here")
    x, y = regression_data()
    model = linear_model()
    model.compile(loss="mse", optimizer="l-bfgs-b")
    inside = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda *_: inside.append(blas_threads())
    )
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        fit_without_progress(model, x, y, epochs=3, callbacks=[record])
        after = blas_threads()
    assert inside and all(threads == [1] * len(threads) for threads in inside)
    assert after == [2] * len(after)


MULTI_WORKER_SCRIPT = r"""
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
index, ports = int(sys.argv[1]), sys.argv[2].split(",")
if index >= 0:
    os.environ["TF_CONFIG"] = json.dumps({
        "cluster": {"worker": [f"localhost:{p}" for p in ports]},
        "task": {"type": "worker", "index": index},
    })
import numpy as np, tensorflow as tf, keras
keras.config.set_floatx("float64")
import kormos

if index >= 0:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
else:
    strategy = tf.distribute.get_strategy()
keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
x = rng.normal(size=(101, 4)); y = np.tanh(x @ rng.normal(size=(4, 1)))
with strategy.scope():
    model = kormos.BatchOptimizedSequentialModel([keras.Input((4,)), keras.layers.Dense(8, activation="tanh",
        kernel_regularizer=keras.regularizers.L2(1e-3)), keras.layers.Dense(1)])
    model.compile(loss="mse", optimizer="l-bfgs-b")
history = model.fit(x, y, epochs=6, batch_size=32, verbose=0)
print("RESULT", json.dumps({"replicas": strategy.num_replicas_in_sync, "loss": history.history["loss"],
                            "weights": model.optimizer.get_weights().tolist()}), flush=True)
"""


@pytest.mark.slow
def test_multi_worker_strategy_on_two_local_processes_matches_one_device(tmp_path):
    import json
    import socket
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(MULTI_WORKER_SCRIPT)
    sockets = [socket.socket() for _ in range(2)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = ",".join(str(s.getsockname()[1]) for s in sockets)
    for s in sockets:
        s.close()
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), str(index), ports],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in (0, 1, -1)  # two workers over loopback, and one device
    ]
    outputs = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=240)
            match = re.search(r"^RESULT (.*)$", out, flags=re.M)
            assert match, out + err[-3000:]
            outputs.append(json.loads(match.group(1)))
    finally:
        for process in processes:
            process.kill()
    worker0, worker1, single = outputs
    assert worker0["replicas"] == worker1["replicas"] == 2 and single["replicas"] == 1
    for worker in (worker0, worker1):
        np.testing.assert_allclose(worker["loss"], single["loss"], rtol=1e-10)
        np.testing.assert_allclose(
            worker["weights"], single["weights"], rtol=1e-10, atol=1e-14
        )
