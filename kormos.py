"""kormos: fit Keras 3 models with scipy.optimize.minimize (L-BFGS-B, Newton-CG, ...).

A model compiled with `optimizer="l-bfgs-b"` (or any other method name of
`scipy.optimize.minimize`, or kormos' self-scaled quasi-Newton methods
"ssbfgs" and "ssbroyden") is trained by `model.fit()` with that deterministic
full-batch solver: every function evaluation is one pass over all the training
data, one solver iteration is one Keras epoch, and `fit()` returns the usual
`History`. Compile the same model with `"adam"` and it trains like any
`keras.Model`.

Single-file library: copy kormos.py into your project, or pip install it.
Needs Keras 3 on its TensorFlow backend. License: MIT (see LICENSE).
"""

__version__ = "0.4.0"
__all__ = [
    "BatchOptimizedModel", "BatchOptimizedSequentialModel",  # models
    "BatchOptimizer", "ScipyBatchOptimizer", "get", "METHODS",  # optimizers
    "pack_weights", "unpack_weights",  # weight packing
    "models", "optimizers",  # kormos 0.1's kormos.models and kormos.optimizers
]

import collections
import contextlib
import functools
import inspect
import itertools
import math
import os
import signal
import sys
import threading
import time
import types
import warnings

import numpy as np
import scipy.linalg.blas
import scipy.optimize
import tensorflow as tf
import keras

if np.lib.NumpyVersion(keras.version()) < "3.12.0":
    raise ImportError(
        "kormos requires Keras >= 3.12 (it comes with TensorFlow >= 2.16; "
        f"`pip install -U keras`). Found keras=={keras.version()}."
    )
if os.environ.get("TF_USE_LEGACY_KERAS", "").lower() in ("1", "true", "yes"):
    warnings.warn(
        "TF_USE_LEGACY_KERAS is set, so `tf.keras` is Keras 2 (or fails to "
        "import), but kormos models are Keras 3 models: build them with `import "
        "keras`, not tf.keras, or unset TF_USE_LEGACY_KERAS.", stacklevel=2,
    )
if keras.config.backend() != "tensorflow":
    raise ImportError(
        "kormos runs on Keras' TensorFlow backend, but this process uses the "
        f"{keras.config.backend()!r} backend. Set the environment variable "
        "KERAS_BACKEND=tensorflow before Keras is imported (or set "
        '"backend": "tensorflow" in ~/.keras/keras.json).'
    )

###############################################################################
# Solver methods ##############################################################
###############################################################################

#: Every method name of `scipy.optimize.minimize`, lower case, and kormos'
#: self-scaled quasi-Newton methods "ssbfgs" and "ssbroyden".
METHODS = (
    *("l-bfgs-b", "bfgs", "cg", "newton-cg", "trust-ncg", "trust-krylov"),
    *("trust-exact", "dogleg", "trust-constr", "tnc", "slsqp", "nelder-mead"),
    *("powell", "cobyla", "cobyqa", "ssbfgs", "ssbroyden"),
)
_DERIVATIVE_FREE = ("nelder-mead", "powell", "cobyla", "cobyqa")
_HESSP_METHODS = ("newton-cg", "trust-ncg", "trust-krylov", "trust-constr")
_HESS_METHODS = ("trust-exact", "dogleg")
_CONSTRAINT_METHODS = ("slsqp", "trust-constr", "cobyla", "cobyqa")
_BOUNDS_METHODS = ("l-bfgs-b", "tnc", "powell", "nelder-mead", *_CONSTRAINT_METHODS)
# kormos' dense quasi-Newton methods (below), which replace scipy's BFGS.
_QUASI_NEWTON = ("bfgs", "ssbfgs", "ssbroyden")
# Methods that hold n x n float64 matrices, and how many (a quasi-Newton
# method: the matrix and the one it started from).
_DENSE_MATRICES = {**dict.fromkeys(_QUASI_NEWTON, 2), "slsqp": 3, "trust-exact": 4,
                   "dogleg": 3}
# scipy's dense methods do O(n^3) work (or n Hessian-vector products) per
# iteration: by default they are refused above this many weights.
_DEFAULT_MAX_CUBIC_PARAMS = 2000
# Methods without an iteration-counting `maxiter` (TNC has none; COBYLA and
# COBYQA count evaluations with it): kormos counts their iterations itself.
_COUNTED_BY_KORMOS = ("tnc", "cobyla", "cobyqa")


def _canonical_method(method):
    """Returns the lower-case scipy method name (or the callable), or raises."""
    if isinstance(method, str) and method.lower() in METHODS:
        return method.lower()
    if callable(method) and not isinstance(method, str):
        return method
    raise ValueError(
        "`method` must be a `scipy.optimize.minimize` method name (in any "
        "case) or a custom minimizer callable. Valid names: "
        f"{', '.join(METHODS)}. Received: method={method!r}"
    )


def _method_name(method):
    """Returns the method's name, or "custom" for a custom minimizer."""
    return method if isinstance(method, str) else "custom"


###############################################################################
# Dense quasi-Newton methods ##################################################
###############################################################################

# "bfgs" takes the iterates of scipy's BFGS (its line search, options and
# result) with an O(n^2) update in place of scipy's O(n^3) one. "ssbfgs" and
# "ssbroyden" are the self-scaled BFGS (Al-Baali) and self-scaled Broyden
# updates of Urban, Stefanou and Pons, J. Comput. Phys. 523 (2025) 113656,
# eqs. 11 and 13-23, which Kiyani et al., CMAME 446 (2025) 118308, use for
# PINNs. kormos passes them to `scipy.optimize.minimize` as custom methods.

_QUASI_NEWTON_MESSAGES = (
    "Optimization terminated successfully.",
    "Maximum number of iterations has been exceeded.",
    "Desired error not necessarily achieved due to precision loss.",
    "NaN result encountered.",
)


def _ssbroyden_scaling(a, b, h, n):
    """Returns `(tau, phi)` of the self-scaled Broyden update (Urban et al.,
    eqs. 13-23, after Al-Baali and Khalfan): the Broyden parameter theta taken
    from its wide interval, tau from theta; phi is theta's member in the
    inverse form."""
    theta = 0.0  # a = 0: every member of the class is BFGS
    if a > 0:
        c = math.sqrt(a / (1.0 + a))
        rho_minus = min(1.0, h * (1.0 - c))
        theta = max((rho_minus - 1.0) / a, min(1.0 / rho_minus, (1.0 - b) / b))
    rho_plus, sigma = min(1.0, 1.0 / b), 1.0 + theta * a
    sigma_root = abs(sigma) ** (1.0 / (1.0 - n)) if n > 1 else 1.0
    if theta <= 0:
        tau = min(rho_plus * sigma_root, sigma)
    else:
        tau = rho_plus * min(sigma_root, 1.0 / theta)
    return tau, (1.0 - theta) / (1.0 + a * theta)


#: `scaling(a, b, h, n) -> (tau, phi)` of each update (see `_InverseHessian`).
_SCALINGS = {
    "bfgs": lambda a, b, h, n: (1.0, 1.0),  # no scaling, the BFGS member
    "ssbfgs": lambda a, b, h, n: (min(1.0, 1.0 / b), 1.0),  # Al-Baali: eq. 11
    "ssbroyden": _ssbroyden_scaling,
}


class _InverseHessian:
    """A symmetric n x n float64 matrix H = scale * M, M held in its upper
    triangle (Fortran order, for BLAS) and updated in place in O(n^2), without
    n x n temporaries. The self-scaling 1/tau goes into `scale`, saving a pass
    over the matrix (the "qn" solver-cost row of benchmarks/bench.py)."""

    def __init__(self, start):
        self.matrix = np.array(start, dtype=np.float64, order="F")  # a copy
        self.scale = 1.0

    def times(self, v):
        return scipy.linalg.blas.dsymv(self.scale, self.matrix, v)

    def update(self, s, y, h, hg, g, sbs, scaling):
        """Updates H for the step `s` and gradient change `y`; returns
        H_new @ g in O(n) from `h` = H @ y and `hg` = H @ g.

        H_new = (H - h h'/a + phi a v v') / tau + s s'/ys, with a = y'h,
        v = s/ys - h/a, and `tau`, `phi` from `scaling(a_k, b_k, h_k, n)`
        (Urban et al., eq. 13; `sbs` is s'Bs = -alpha s'g_old). The update
        is skipped, H kept positive definite, unless y's > 0, y'Hy > 0 and all
        the scalars are finite.
        """
        ys, a = float(y @ s), float(y @ h)
        if not ys > np.finfo(float).eps * np.linalg.norm(s) * np.linalg.norm(y):
            return hg
        with np.errstate(all="ignore"):
            b, h_k = np.float64(sbs) / ys, np.float64(a) / ys
            tau, phi = scaling(b * h_k - 1.0, b, h_k, len(s))
            c_hh, c_sh = (phi - 1.0) / (tau * a), -phi / (tau * ys)
            c_ss = phi * a / (tau * ys * ys) + 1.0 / ys
        if not (tau > 0 and a > 0 and np.all(np.isfinite([tau, c_hh, c_sh, c_ss]))):
            return hg
        if not 1e-100 < self.scale / tau < 1e100:
            self._fold_scale()
        self.scale /= tau
        blas, m = scipy.linalg.blas, 1.0 / self.scale
        # s w' + w s' = c_ss s s' + c_sh (s h' + h s'), with w = c_ss s / 2 + c_sh h
        self.matrix = blas.dsyr2(m, s, 0.5 * c_ss * s + c_sh * h, a=self.matrix,
                                 overwrite_a=True)
        if c_hh != 0.0:
            self.matrix = blas.dsyr(m * c_hh, h, a=self.matrix, overwrite_a=True)
        hs, ss = float(h @ g), float(s @ g)
        return hg / tau + (c_hh * hs + c_sh * ss) * h + (c_sh * hs + c_ss * ss) * s

    def restart(self):
        """Makes H the identity again, in place."""
        self.matrix[:] = 0.0
        np.fill_diagonal(self.matrix, 1.0)
        self.scale = 1.0

    def symmetric(self):
        """Returns the full matrix H, the scale folded in and the lower
        triangle filled in."""
        self._fold_scale()
        m = self.matrix
        for j in range(1, len(m)):
            m[j, :j] = m[:j, j]
        return m

    def _fold_scale(self):
        if self.scale != 1.0:
            self.matrix *= self.scale
            self.scale = 1.0


def _minimize_quasi_newton(
    fun, x0, args=(), jac=None, callback=None, *, update="bfgs", gtol=None,
    norm=np.inf, maxiter=None, c1=1e-4, c2=0.9, xrtol=0.0, hess_inv0=None,
    return_all=False, disp=False, tol=None, hess=None, hessp=None, bounds=None,
    constraints=(), **unknown,
):
    """Minimizes `fun` with a dense quasi-Newton method; scipy's BFGS loop.

    A custom `method` for `scipy.optimize.minimize(fun, x0, jac=..., method=
    functools.partial(_minimize_quasi_newton, update=...))`. The options are
    those of scipy's BFGS and mean the same; `hess_inv0` may also be an
    `_InverseHessian` (a warm start, trusted and not copied twice).
    """
    unknown = set(unknown) - {"eps", "finite_diff_rel_step", "workers"}  # unused
    if unknown:
        warnings.warn(f"Unknown solver options: {', '.join(sorted(unknown))}",
                      scipy.optimize.OptimizeWarning, stacklevel=3)
    x = np.asarray(x0, dtype=np.float64).ravel()
    n = len(x)
    gtol = (1e-5 if tol is None else tol) if gtol is None else gtol
    maxiter = 200 * n if maxiter is None else maxiter
    hess_inv = _start_inverse_hessian(hess_inv0, n)

    def f(z):
        return fun(z, *args)

    def grad(z):
        return jac(z, *args)

    fval, g = f(x), grad(x)
    old_fval = fval + np.linalg.norm(g) / 2  # a first step of about 1
    hg, k, status, iterates = hess_inv.times(g), 0, 0, [x]
    while np.linalg.norm(g, norm) > gtol and k < maxiter:  # scipy's `vecnorm`
        p = -hg
        if not float(g @ p) < 0:  # roundoff has taken H's definiteness: restart
            hess_inv.restart()
            p = -g
        step = _wolfe_line_search(f, grad, x, p, g, fval, old_fval, c1, c2)
        if step is None:
            status = 2
            break
        alpha, fval, old_fval, g_new = step
        s = alpha * p
        x = x + s
        g_new = grad(x) if g_new is None else g_new
        y, g_old, g, k = g_new - g, g, g_new, k + 1
        iterates += [x] if return_all else []
        if callback is not None:
            callback(scipy.optimize.OptimizeResult(x=x, fun=fval))
        if np.linalg.norm(g, norm) <= gtol or (
            alpha * np.linalg.norm(p) <= xrtol * (xrtol + np.linalg.norm(x))
        ):
            break
        if not np.isfinite(fval):
            status = 2
            break
        hg_new = hess_inv.times(g)
        hg = hess_inv.update(s, y, hg_new + p, hg_new, g, -alpha * float(s @ g_old),
                             _SCALINGS[update])
    if status == 0 and k >= maxiter:
        status = 1
    elif status == 0 and (np.isnan(fval) or np.isnan(g).any() or np.isnan(x).any()):
        status = 3
    result = scipy.optimize.OptimizeResult(
        x=x, fun=fval, jac=g, hess_inv=hess_inv.symmetric(), nit=k, status=status,
        success=status == 0, message=_QUASI_NEWTON_MESSAGES[status],
    )
    if return_all:
        result["allvecs"] = iterates
    if disp:
        print(result.message)
    return result


def _start_inverse_hessian(hess_inv0, n):
    """Returns the `_InverseHessian` a run starts from, checking a user's."""
    if isinstance(hess_inv0, _InverseHessian):
        return hess_inv0
    if hess_inv0 is None:
        return _InverseHessian(np.eye(n))
    matrix = np.asarray(hess_inv0, dtype=np.float64)
    try:
        ok = matrix.shape == (n, n) and np.allclose(matrix, matrix.T, rtol=1e-10)
        matrix = 0.5 * (matrix + matrix.T)  # e.g. scipy's, symmetric to roundoff
        np.linalg.cholesky(matrix)
    except (np.linalg.LinAlgError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"`options['hess_inv0']` must be a symmetric positive definite {n} x "
            f"{n} matrix. Received: an array of shape {matrix.shape}"
        )
    return _InverseHessian(matrix)


def _wolfe_line_search(f, grad, x, p, g, fval, old_fval, c1, c2):
    """Returns `(alpha, f, previous f, gradient or None)` of scipy's BFGS line
    search (strong Wolfe: MINPACK's, then scipy's own), or None if it fails.
    It is private in scipy (scipy/optimize/_optimize.py, `_line_search_wolfe12`);
    using it is what gives "bfgs" scipy's iterates."""
    from scipy.optimize import _optimize

    try:
        alpha, _, _, fval, old_fval, g_new = _optimize._line_search_wolfe12(
            f, grad, x, p, g, fval, old_fval, amin=1e-100, amax=1e100, c1=c1, c2=c2
        )
    except _optimize._LineSearchError:
        return None
    return alpha, fval, old_fval, g_new


###############################################################################
# Weight packing ##############################################################
###############################################################################


def pack_weights(variables):
    """Returns `variables` (Keras variables, tensors or arrays) as one flat
    float64 numpy vector: each flattened in C order, in order.

    Example: `x = kormos.pack_weights(model.trainable_variables)`, then
    `kormos.unpack_weights(2 * x, model.trainable_variables)`.
    """
    parts = [np.asarray(v.numpy() if hasattr(v, "numpy") else v) for v in variables]
    if not parts:
        return np.zeros((0,), dtype=np.float64)
    return np.concatenate([p.astype(np.float64).ravel() for p in parts])


def unpack_weights(x, variables):
    """Assigns the flat vector `x` back into `variables`, cast to each one's
    dtype: the inverse of `pack_weights`.

    Raises:
        ValueError: If `x` is not a vector of the right size (nothing is
            assigned then).
    """
    x = _as_flat_float64(x, sum(_sizes(variables)))
    for v, part in zip(variables, np.split(x, np.cumsum(_sizes(variables))[:-1])):
        v.assign(part.reshape(tuple(v.shape)).astype(_dtype_name(v)))


def _ids(variables):
    return [id(v) for v in variables]


def _sizes(variables):
    """Returns the number of scalars of each variable."""
    return [math.prod(v.shape) for v in variables]


def _dtype_name(variable):
    return keras.backend.standardize_dtype(variable.dtype)


def _as_flat_float64(x, n, argname="x"):
    """Returns `x` as a float64 vector of size `n`, or raises."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1 or x.shape[0] != n:
        raise ValueError(
            f"Expected a flat vector of size {n} (the number of scalars in the "
            f"trainable weights). Received: {argname}.shape={x.shape}"
        )
    return x


def _unflatten(x, variables):
    """Splits the float64 tensor `x` into tensors shaped and typed like
    `variables` (inside a graph); `_assign_flat` assigns them."""
    parts = tf.split(x, _sizes(variables))
    return [tf.cast(tf.reshape(p, v.shape), v.dtype) for p, v in zip(parts, variables)]


def _assign_flat(x, variables):
    for v, part in zip(variables, _unflatten(x, variables)):
        v.assign(part)


def _flatten_float64(tensors, variables):
    """Concatenates gradient-like `tensors` into one float64 vector: `None`
    (no gradient path) as zeros, `IndexedSlices` (Embedding) densified."""
    parts = []
    for t, v in zip(tensors, variables):
        t = tf.zeros(v.shape, tf.float64) if t is None else tf.convert_to_tensor(t)
        parts.append(tf.reshape(tf.cast(t, tf.float64), [-1]))
    return tf.concat(parts, axis=0)


###############################################################################
# Training data ###############################################################
###############################################################################

# A finite dataset, `PyDataset` or generator up to this size is read into
# memory once, so that an evaluation costs what arrays cost; larger datasets
# are streamed at every evaluation (see `BatchOptimizer(max_dataset_bytes=)`).
_DEFAULT_MAX_DATASET_BYTES = 256 * 2**20


class _Data:
    """The training (or validation) data of one fit: in-memory `tensors`
    `(x, y, sample_weight)` sliced `batch_size` rows at a time, or a batched
    `dataset` of them, read at every evaluation."""

    def __init__(self, tensors=None, batch_size=None, dataset=None, present=None):
        self.tensors, self.dataset = tensors, dataset
        self.present = present  # of a distributed dataset: which parts it holds
        self.size = _check_lengths(*tensors) if tensors is not None else None
        self.batch_size = min(batch_size or self.size, self.size) if self.size else None

    @property
    def num_batches(self):
        """Batches per pass over in-memory data (None for a stream)."""
        return None if self.tensors is None else math.ceil(self.size / self.batch_size)

    def input_spec(self):
        """Returns the `tf.TensorSpec`s of `x`, their batch size unknown."""
        x = self.dataset.element_spec[0] if self.tensors is None else self.tensors[0]
        return tf.nest.map_structure(
            lambda t: tf.TensorSpec((None, *t.shape[1:]), t.dtype), x
        )

    def first_batch(self):
        """Returns a few rows of the data (for which parts it holds)."""
        if self.tensors is not None:
            return _map_tensors(lambda t: t[:2], self.tensors)
        for batch in self.dataset.take(1):
            return batch
        raise ValueError("The training dataset is empty: it yields no batch.")


def _map_tensors(fn, nest):
    """Maps `fn` over the tensors of `nest`, leaving `None` entries alone."""
    return tf.nest.map_structure(lambda t: None if t is None else fn(t), nest)


def _make_data(model, x, y=None, sample_weight=None, batch_size=None,
               class_weight=None, steps=None, max_bytes=None, argname="x"):
    """Checks user data in any form Keras' `fit()` takes; returns a `_Data`."""
    _check_positive_int(batch_size, "batch_size", "or None (all rows in one batch)")
    if x is None:
        raise ValueError(f"`{argname}` is required. Received: {argname}=None")
    if _is_batch_source(x):
        max_bytes = max_bytes or _DEFAULT_MAX_DATASET_BYTES
        if y is not None or sample_weight is not None:
            raise ValueError(
                f"When `{argname}` is a dataset, a `PyDataset` or a generator, "
                "`y` and `sample_weight` must be None: each batch holds `(x, y)` "
                f"or `(x, y, sample_weight)`. Received: y={type(y).__name__}, "
                f"sample_weight={type(sample_weight).__name__}"
            )
        return _batch_source_data(model, x, class_weight, steps, max_bytes, argname)
    x, y, sample_weight = (
        None if part is None else _to_tensors(part, name, model.compute_dtype)
        for part, name in ((x, argname), (y, "y"), (sample_weight, "sample_weight"))
    )
    if class_weight is not None:
        sample_weight = _apply_class_weight(y, sample_weight, class_weight)
    return _Data((x, y, sample_weight), batch_size)


def _is_batch_source(x):
    """True for inputs that yield batches: datasets, PyDatasets, generators."""
    sources = (tf.data.Dataset, keras.utils.PyDataset)
    return isinstance(x, sources) or inspect.isgenerator(x)


def _to_tensors(data, name, dtype):
    """Converts a nest of array-likes to tensors, casting floats to `dtype`;
    inputs may hold strings, for a model that encodes them itself."""

    def convert(leaf):
        array = _as_array(leaf)
        kind = array.dtype.name if tf.is_tensor(array) else array.dtype.kind
        if name in ("y", "sample_weight") and kind in ("string", "O", "U", "S"):
            raise ValueError(
                f"`{name}` must hold numbers; strings and objects cannot be "
                "a target or a weight. Encode them first (e.g. with "
                f"keras.layers.StringLookup). Received: {name} of dtype "
                f"{array.dtype}"
            )
        tensor = tf.convert_to_tensor(array)
        return tf.cast(tensor, dtype) if tensor.dtype.is_floating else tensor

    if isinstance(data, dict):
        return {k: convert(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)) and not all(np.isscalar(v) for v in data):
        return type(data)(convert(v) for v in data)  # several inputs
    if not (tf.is_tensor(data) or hasattr(data, "__array__") or np.isscalar(data)
            or isinstance(data, (list, tuple))):
        raise ValueError(
            f"Unrecognized data type: `{name}` must be an array, a tensor, "
            "a pandas object, a list or dict of them, a `tf.data.Dataset`, "
            "a `keras.utils.PyDataset` or a Python generator. Received: "
            f"{name} of type {type(data).__name__}"
        )
    return convert(data)


def _as_array(leaf):
    """Returns a tensor as it is, anything else as a numpy array; a pandas
    Series becomes one column, as in Keras."""
    if tf.is_tensor(leaf):
        return leaf
    leaf = leaf.to_frame() if hasattr(leaf, "to_frame") else leaf  # a Series
    return np.asarray(leaf.to_numpy() if hasattr(leaf, "to_numpy") else leaf)


def _check_lengths(x, y, sample_weight):
    """Returns the common number of rows of `x`, `y` and `sample_weight`."""
    sizes = {}
    for name, part in (("x", x), ("y", y), ("sample_weight", sample_weight)):
        for leaf in tf.nest.flatten(part) if part is not None else ():
            if leaf.shape.rank == 0:
                raise ValueError(
                    f"`{name}` must have a leading sample dimension. "
                    f"Received: {name} of shape {leaf.shape}"
                )
            sizes.setdefault(name, set()).add(int(leaf.shape[0]))
    all_sizes = set().union(*sizes.values())
    if len(all_sizes) != 1:
        detail = ", ".join(f"{k}: {sorted(v)}" for k, v in sizes.items())
        raise ValueError(
            "All inputs, targets and sample weights must have the same number "
            f"of samples (rows). Received sample counts {detail}"
        )
    if 0 in all_sizes:
        raise ValueError("The training data is empty: `x` has 0 samples.")
    return all_sizes.pop()


def _apply_class_weight(y, sample_weight, class_weight):
    """Returns sample weights that include `class_weight[label]`."""
    if not isinstance(class_weight, dict):
        raise TypeError(
            "`class_weight` must be a dict mapping class indices to weights. "
            f"Received: class_weight={class_weight!r}"
        )
    if y is None or len(tf.nest.flatten(y)) != 1:
        raise ValueError(
            "`class_weight` needs a single target array `y`. "
            f"Received: y={type(y).__name__}"
        )
    labels = tf.nest.flatten(y)[0]
    table = np.ones(max(class_weight) + 1, dtype=np.float64)
    table[list(map(int, class_weight))] = list(class_weight.values())
    if labels.shape.rank and labels.shape.rank > 1 and (labels.shape[-1] or 0) > 1:
        labels = tf.argmax(labels, axis=-1)  # one-hot
    labels = tf.reshape(tf.cast(tf.round(tf.cast(labels, tf.float64)), tf.int32), [-1])
    weights = tf.gather(tf.constant(table), labels)
    if sample_weight is not None:
        weights = weights * tf.cast(tf.reshape(sample_weight, [-1]), weights.dtype)
    return weights


def _batch_source_data(model, source, class_weight, steps, max_bytes, argname):
    """Returns the batches of a dataset, `PyDataset` or generator as `_Data`:
    read once into memory (its batch size kept) if it fits in `max_bytes`,
    else streamed at every evaluation (a generator, read once, must fit)."""

    def normalize(*batch):
        x, y, sw = keras.utils.unpack_x_y_sample_weight(batch)
        if class_weight is not None:
            sw = _apply_class_weight(y, sw, class_weight)
        return x, y, sw

    stream, count = _as_stream(source, steps, argname)
    batches = itertools.islice(source, steps) if stream is None else iter(stream)
    data = _read_into_memory(model, batches, count, max_bytes, normalize, argname)
    if data is not None:
        return data
    if stream is None:
        raise ValueError(
            f"The generator passed as `{argname}` holds more than "
            f"max_dataset_bytes={max_bytes} bytes (or batches of different "
            "shapes), and a generator can be read only once: pass a "
            "`tf.data.Dataset` or a `keras.utils.PyDataset`, or raise "
            "`max_dataset_bytes`."
        )
    return _Data(dataset=stream.map(normalize))


def _as_stream(source, steps, argname):
    """Returns `(dataset, batches)`: the source as a `tf.data.Dataset` (None
    for a generator, which can be read only once) and its number of batches
    (None if unknown)."""
    if inspect.isgenerator(source):
        return None, steps
    if isinstance(source, keras.utils.PyDataset):
        count = source.num_batches if steps is None else steps
        if count is None:
            raise ValueError(
                f"The `PyDataset` passed as `{argname}` is infinite. Pass "
                "`steps_per_epoch` to say how many batches make up the data."
            )
        source = _py_dataset_as_dataset(source, count)
    spec = source.element_spec
    if isinstance(spec, tuple) and not 1 <= len(spec) <= 3:
        raise ValueError(
            f"A dataset passed as `{argname}` must yield `x`, `(x, y)` or "
            "`(x, y, sample_weight)` batches. Received a dataset yielding a "
            f"tuple of {len(spec)} elements: {spec}"
        )
    if steps is not None:
        source = source.take(steps)
    elif source.cardinality() == tf.data.INFINITE_CARDINALITY:
        raise ValueError(
            f"The dataset passed as `{argname}` is infinite (it repeats). "
            "Pass `steps_per_epoch` to say how many batches make up the full "
            "data set, or remove `.repeat()`."
        )
    count = int(source.cardinality())
    return source, count if count >= 0 else None


def _py_dataset_as_dataset(py_dataset, count):
    """Wraps the first `count` batches of a `keras.utils.PyDataset`."""

    def batches():
        for i in range(count):
            yield _numpy(_as_tuple(py_dataset[i]))

    spec = tf.nest.map_structure(
        lambda a: tf.TensorSpec((None, *a.shape[1:]), tf.as_dtype(a.dtype)),
        _numpy(_as_tuple(py_dataset[0])),
    )
    dataset = tf.data.Dataset.from_generator(batches, output_signature=spec)
    return dataset.apply(tf.data.experimental.assert_cardinality(count))


def _read_into_memory(model, batches, count, max_bytes, normalize, argname):
    """Joins `batches` into in-memory `_Data`, keeping their batch size, or
    returns None: more than `max_bytes` (estimated from the first batch when
    `count` is known), or shapes that differ."""
    read, total = [], 0
    for batch in batches:
        batch = _numpy(normalize(*_as_tuple(batch)))
        total += sum(a.nbytes for a in tf.nest.flatten(batch) if a is not None)
        if total * (count if count and not read else 1) > max_bytes:
            return None
        read.append(batch)
    if not read:
        raise ValueError(f"`{argname}` is empty: it yields no batch.")
    try:
        x, y, sample_weight = tf.nest.map_structure(
            lambda *parts: None if parts[0] is None else np.concatenate(parts), *read
        )
    except (ValueError, TypeError):
        return None
    rows = len(tf.nest.flatten(read[0][0])[0])
    return _make_data(model, x, y, sample_weight, rows, argname=argname)


def _as_tuple(element):
    return element if isinstance(element, tuple) else (element,)


def _numpy(nest):
    return _map_tensors(np.asarray, nest)


def _split_validation(x, y, sample_weight, validation_split):
    """Holds out the last `validation_split` fraction of array inputs."""
    if not 0.0 < validation_split < 1.0:
        raise ValueError(
            "`validation_split` must be a float in (0, 1). "
            f"Received: validation_split={validation_split!r}"
        )
    if _is_batch_source(x):
        raise ValueError(
            "`validation_split` is only supported for arrays and tensors, not "
            f"for a {type(x).__name__}. Pass `validation_data` instead."
        )
    arrays = _map_tensors(_as_array, (x, y, sample_weight))
    size = len(tf.nest.flatten(arrays[0])[0])
    split = int(math.floor(size * (1.0 - validation_split)))
    if split in (0, size):
        raise ValueError(
            f"`validation_split={validation_split}` leaves no training or no "
            f"validation samples out of {size}."
        )
    training = _map_tensors(lambda t: t[:split], arrays)
    return training, _map_tensors(lambda t: t[split:], arrays)


def _make_validation(model, data, batch_size, steps, max_bytes):
    """Returns `validation_data` (in any form Keras takes) as `_Data`."""
    argname = "validation_data"
    if _is_batch_source(data):
        return _make_data(model, data, steps=steps, max_bytes=max_bytes,
                          argname=argname)
    if not (isinstance(data, (tuple, list)) and len(data) in (2, 3)):
        raise ValueError(
            "`validation_data` must be `(x_val, y_val)`, `(x_val, y_val, "
            "val_sample_weight)`, a `tf.data.Dataset`, a `PyDataset` or a "
            f"generator. Received: validation_data of type {type(data).__name__}"
        )
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(tuple(data))
    return _make_data(model, x, y, sample_weight, batch_size, argname=argname)


def _align_targets(y, y_pred):
    """Aligns `y` to `y_pred`: a target two or more dimensions short of the
    output gets its trailing unit dimensions ((n,) against (n, 1, 1)), so that
    the loss never broadcasts to (n, 1, n) (Keras handles a gap of one); a
    target that would broadcast against a unit output dimension raises."""
    if y is None or tf.nest.is_nested(y) != tf.nest.is_nested(y_pred):
        return y
    try:
        tf.nest.assert_same_structure(y, y_pred, check_types=False)
    except (ValueError, TypeError):
        return y
    return tf.nest.map_structure(_align_target, y, y_pred, check_types=False)


def _align_target(y, y_pred):
    y_rank, p_shape = y.shape.rank, y_pred.shape
    if y_rank is None or p_shape.rank is None:
        return y
    if y_rank <= p_shape.rank - 2 and all(d == 1 for d in p_shape[y_rank:]):
        return tf.reshape(y, tf.concat([tf.shape(y), [1] * (p_shape.rank - y_rank)], 0))
    if y_rank == p_shape.rank and any(
        p == 1 and t is not None and t > 1 for t, p in zip(y.shape[1:], p_shape[1:])
    ):
        raise ValueError(
            f"The target shape {(None, *y.shape[1:])} would silently broadcast "
            f"against the model output shape {(None, *p_shape[1:])}, giving a "
            "wrong loss. Reshape `y` to match the output."
        )
    return y


###############################################################################
# The objective: loss, gradient and Hessian-vector products ###################
###############################################################################


class _Objective:
    """The full-data loss of a model as compiled functions of its weight vector.

    `fg(x)`, `hessp(x, v)` (reverse-over-reverse) and `value()` (validation
    data, current weights) are each ONE compiled call over every batch. The
    loss is `model.compute_loss` with `training=False`, combined over batches
    so that `batch_size` does not change it: averaged, weighted by rows, as
    `evaluate()` does, or summed where every compiled loss sums over samples;
    weight regularization counts once. Under `tf.distribute`, each batch is
    split over the replicas with `strategy.run` and their terms are summed.
    """

    def __init__(self, model, xla=False, xla_optional=False):
        self.model = model
        self.variables = list(model.trainable_variables)  # the order of `x`
        self.size = sum(_sizes(self.variables))
        # Compile with XLA, or fall back to a plain graph if it cannot.
        self.xla, self.xla_optional, self.fell_back = xla, xla_optional, False
        # What tracing found (unused weights, per-call losses), for warnings.
        self.notices = []
        self.per_call_losses = 0  # `add_loss` terms per call, seen when traced
        self.strategy = model.distribute_strategy
        self.replicas = self.strategy.num_replicas_in_sync
        self.distributed = any(
            isinstance(getattr(v, "value", v), tf.distribute.DistributedValues)
            for v in self.variables
        )
        self.weighting = _batch_weighting(model) or "mean"
        # Weight regularization is taken out of every batch's loss and added
        # once, where batches (or replicas) would otherwise count it again.
        self.separate_regularization = any(
            getattr(v, "regularizer", None) is not None for v in model.trainable_weights
        ) and (self.weighting == "sum" or self.distributed)
        self.has_metrics = any(m.name != "loss" for m in model.metrics)
        takes_training = "training" in inspect.signature(model.compute_loss).parameters
        self.loss_kwargs = {"training": False} if takes_training else {}
        self.data = self.validation = None  # the training and validation `_Data`
        self._functions = {}  # (kind, whole pass?) -> (function, plain fallback)
        self._calls = {}  # kind -> the traced function for the bound data
        self.assign = _concrete(
            self._compiled(lambda x: _assign_flat(x, self.variables)),
            (tf.TensorSpec([self.size], tf.float64),),
        )

    def bind(self, data, validation=None):
        """Points the compiled functions at the training and validation data.
        In-memory data enters them as arguments, so that data of the same
        shapes reuses their traces (as Keras reuses its train function across
        `fit()` calls); a dataset is captured, so it gets new traces."""
        self._calls = {}
        if self.distributed:
            data = _distributed(data, self.strategy)
            validation = validation and _distributed(validation, self.strategy)
        if data.tensors is None or (validation and validation.tensors is None):
            self._functions = {}
        self.data, self.validation = data, validation

    def fg(self, x):
        """Returns `(loss, gradient, metrics)` tensors at the float64 tensor `x`."""
        return self._call("fg", x)

    def hessp(self, x, v):
        """Returns H(x) @ v for float64 tensors `x` and `v`."""
        return self._call("hessp", x, v)

    def value(self):
        """Returns `(loss, metrics)` on the validation data, weights as they are."""
        return self._call("value")

    def _call(self, kind, *vectors):
        data = self.validation if kind == "value" else self.data
        args = (*vectors, data.tensors, data.tensors and data.batch_size)
        if kind in self._calls:
            return self._calls[kind](*args)
        function, plain = self._function(kind, data.num_batches == 1)

        def first_call(function):
            if not self.distributed:
                return _concrete(function, args)(*args)
            # Replicas can create Keras' metric variables when tf.function's
            # own call traces (not in get_concrete_function); iterating a
            # distributed dataset there, tf.data warns about its options,
            # which kormos does not use.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "To make it possible to preserve")
                return function(*args)

        try:
            result = first_call(function)
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError):
            # XLA rejects some ops (e.g. tf.numpy_function) only when it
            # compiles, at the first call: use the plain graph from now on.
            if plain is None:
                raise
            self.fell_back, function = True, plain
            result = first_call(function)
        self._calls[kind] = _concrete(function, args)
        return result

    def _function(self, kind, whole):
        """Returns the compiled pass and, if XLA may fall back, the plain one.
        With XLA, a pass over one in-memory batch is compiled whole (the "mf"
        row of benchmarks/bench.py, `--ablate whole-xla`), a pass that loops
        over batches only the batch terms."""
        if (kind, whole) in self._functions:
            return self._functions[kind, whole]
        whole_pass, terms = {
            "fg": (self._fg_pass, self._fg_terms),
            "hessp": (self._hessp_pass, self._hessp_terms),
            "value": (self._value_pass, self._value_terms),
        }[kind]

        def traced(terms, jit_compile=False):
            # A closure, not functools.partial: tf.function would bind the
            # partial's keyword argument at every call.
            def run(*args):
                return whole_pass(*args, terms=terms)

            return self._compiled(run, jit_compile)

        plain = traced(terms)
        functions = (plain, None)
        if self.xla:
            step = terms if whole else self._compiled(terms, jit_compile=True)
            with_xla = traced(step, jit_compile=whole)
            functions = (with_xla, plain if self.xla_optional else None)
        self._functions[kind, whole] = functions
        return functions

    def _compiled(self, fn, jit_compile=False):
        # `run_eagerly=True` runs everything eagerly, for debugging, as in Keras.
        if self.model.run_eagerly:
            return fn
        return tf.function(fn, jit_compile=jit_compile)

    # -- One batch (or one replica's share of it) -----------------------------

    def _weighted_loss(self, x, y, sample_weight):
        """Returns `(w, w * loss, y, y_pred)` of one batch, Dropout off; `w`
        weighs the batch in the full-data loss: its rows, or 1 (summed losses)."""
        y_pred = self.model(x, training=False)
        y = _align_targets(y, y_pred)
        loss = self._compute_loss(x, y, y_pred, sample_weight)
        regularized = [w for w in self.model.weights if getattr(w, "regularizer", None)]
        self.per_call_losses = len(self.model.losses) - len(regularized)
        loss = tf.cast(loss, tf.float64)
        if self.replicas > 1 and self.weighting == "mean":
            # In a replica, Keras scales averaged losses (and regularization)
            # by 1 / replicas; summed losses are left alone.
            loss = loss * self.replicas
        if self.separate_regularization:
            scale = 1.0 if self.weighting == "mean" else 1.0 / self.replicas
            loss = loss - scale * _weight_regularization(self.model)
        rows = tf.cast(tf.shape(tf.nest.flatten(x)[0])[0], tf.float64)
        weight = rows if self.weighting == "mean" else tf.ones((), tf.float64)
        return weight, weight * loss, y, y_pred

    def _compute_loss(self, x, y, y_pred, sample_weight):
        try:
            loss = self.model.compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, **self.loss_kwargs
            )
        except ValueError as error:
            if "No loss to compute" not in str(error):
                raise
            raise ValueError(
                "The model has no loss: pass `loss=` to `compile()` or override "
                "`compute_loss`."
            ) from None
        if loss is None:
            raise ValueError("`compute_loss` returned None; it must return a scalar.")
        return loss

    def _value_terms(self, x, y, sample_weight):
        weight, loss, y, y_pred = self._weighted_loss(x, y, sample_weight)
        if self.has_metrics:
            self.model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        return weight, loss

    def _fg_terms(self, x, y, sample_weight):
        with tf.GradientTape() as tape:
            weight, loss = self._value_terms(x, y, sample_weight)
        grads = tape.gradient(loss, self.variables)
        unused = [v.path for v, g in zip(self.variables, grads) if g is None]
        if unused:
            self.notices.append(
                "These trainable weights have no gradient path to the loss and "
                f"stay fixed: {unused}"
            )
        return weight, loss, _flatten_float64(grads, self.variables)

    def _hessp_terms(self, x, y, sample_weight, vs):
        terms = []  # the weight and weighted loss, from inside the tapes

        def weighted_loss():
            terms[:] = self._weighted_loss(x, y, sample_weight)[:2]
            return terms[1]

        hv = self._hessian_times(weighted_loss, vs)
        return terms[0], hv

    def _hessian_times(self, value_fn, vs):
        """Returns H @ v of the scalar `value_fn()`, by reverse-over-reverse."""
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                value = value_fn()
            gv = _dot(inner.gradient(value, self.variables), vs)
        return _flatten_float64(outer.gradient(gv, self.variables), self.variables)

    # -- Whole passes -----------------------------------------------------------

    def _value_pass(self, tensors, batch_size, terms):
        self._reset_metrics()
        zero = tf.constant(0.0, tf.float64)
        data, state = self.validation, (zero, zero)
        weight, f = self._over_batches(terms, data, tensors, batch_size, state)
        f = self._normalized(weight, f)
        if self.separate_regularization:
            f = f + self._regularization()[0]
        return f, self._metrics()

    def _fg_pass(self, x, tensors, batch_size, terms):
        _assign_flat(x, self.variables)
        self._reset_metrics()
        zero = tf.constant(0.0, tf.float64)
        state = (zero, zero, tf.zeros([self.size], tf.float64))
        weight, f, g = self._over_batches(terms, self.data, tensors, batch_size, state)
        f, g = self._normalized(weight, f), self._normalized(weight, g)
        self._note_batch_dependence()
        if self.separate_regularization:
            regularization, gradient = self._regularization()
            f, g = f + regularization, g + gradient
        return f, g, self._metrics()

    def _hessp_pass(self, x, v, tensors, batch_size, terms):
        _assign_flat(x, self.variables)
        vs = _unflatten(v, self.variables)
        state = (tf.constant(0.0, tf.float64), tf.zeros([self.size], tf.float64))
        data = self.data
        weight, hv = self._over_batches(terms, data, tensors, batch_size, state, vs)
        hv = self._normalized(weight, hv)
        if self.separate_regularization:
            hv = hv + self._regularization(vs)[0]
        return hv

    def _reset_metrics(self):
        if self.has_metrics:
            self.model.reset_metrics()

    def _metrics(self):
        """Returns the compiled metrics of the pass, without Keras' loss
        tracker, which kormos does not feed."""
        if not self.has_metrics:
            return {}
        return {
            k: tf.cast(v, tf.float64)
            for k, v in self.model.get_metrics_result().items()
            if k != "loss"
        }

    def _note_batch_dependence(self):
        """Notes, when traced, a loss that depends on how the rows are batched."""
        if self.data.num_batches == 1:
            return
        if self.per_call_losses > 0:
            self.notices.append(
                "The model adds losses per call (`add_loss` or an activity "
                "regularizer). Split into batches, they are computed on each "
                "batch and averaged, weighted by rows, so the objective depends "
                "on `batch_size`; pass batch_size=None to compute them on all rows."
            )
        elif _batch_weighting(self.model) is None:
            self.notices.append(
                "kormos cannot tell how this model's loss combines over batches "
                "(a custom `compute_loss`, or compiled losses reduced in different "
                "ways); it averages the batch losses weighted by rows, so the "
                "objective may depend on `batch_size`."
            )

    def _regularization(self, vs=None):
        """Returns `(R, gradient of R)`, or `(H(R) @ v,)` with `vs`, where R
        is the weight regularization, computed once (in every replica and
        averaged, where the variables live in replicas)."""

        def terms():
            if vs is not None:
                return (
                    self._hessian_times(lambda: _weight_regularization(self.model), vs),
                )
            with tf.GradientTape() as tape:
                regularization = _weight_regularization(self.model)
            gradient = tape.gradient(regularization, self.variables)
            return regularization, _flatten_float64(gradient, self.variables)

        if not self.distributed:
            return terms()
        return tuple(
            self.strategy.reduce(tf.distribute.ReduceOp.MEAN, term, axis=None)
            for term in self.strategy.run(terms)
        )

    def _normalized(self, weight, total):
        return total / weight if self.weighting == "mean" else total

    def _over_batches(self, terms, data, tensors, batch_size, state, *args):
        """Sums `terms(batch, *args)` over every batch, inside the graph:
        in-memory `tensors` sliced `batch_size` rows at a time in a `tf.range`
        loop, or the dataset of `data`."""

        def add(batch, state):
            batch_terms = self._on_replicas(terms, batch, data.present, *args)
            return tuple(s + t for s, t in zip(state, batch_terms))

        if tensors is None:
            for batch in data.dataset:
                state = add(batch, state)
            return state
        size = int(tf.nest.flatten(tensors[0])[0].shape[0])
        if batch_size >= size:
            return add(tensors, state)
        for i in tf.range(math.ceil(size / batch_size)):
            start = i * batch_size
            end = tf.minimum(start + batch_size, size)
            batch = _map_tensors(lambda t, a=start, b=end: t[a:b], tensors)
            state = add(batch, state)
        return state

    def _on_replicas(self, terms, batch, present, *args):
        """Runs `terms` on a batch: directly, or split over replicas and summed
        (`present` says which of `(x, y, sample_weight)` a replica gets)."""
        if not self.distributed:
            return terms(*batch, *args)

        def replica_terms(*parts):
            parts = iter(parts)
            batch = tuple(next(parts) if keep else None for keep in present)
            return terms(*batch, *args)

        per_replica = self.strategy.run(replica_terms, args=tuple(batch))
        # One reduction per term: MultiWorkerMirroredStrategy packs a nested
        # reduction into one tensor, which fails for terms of different shapes.
        return tuple(
            self.strategy.reduce(tf.distribute.ReduceOp.SUM, term, axis=None)
            for term in per_replica
        )


def _concrete(function, args):
    """Returns the traced concrete function of a `tf.function` for `args`,
    which skips tf.function's argument matching at every evaluation (the
    "linreg" and "logreg" rows of benchmarks/bench.py, `--ablate
    concrete-functions`) and its warning when many optimizers trace."""
    if hasattr(function, "get_concrete_function"):
        return function.get_concrete_function(*args)
    return function


def _batch_weighting(model):
    """Returns how batch losses combine: "mean", "sum", or None if unknown (a
    custom `compute_loss`, or compiled losses reduced in different ways)."""
    if type(model).compute_loss is not keras.Model.compute_loss:
        return None
    losses = [keras.losses.get(loss) for loss in tf.nest.flatten(model.loss) if loss]
    reductions = {getattr(loss, "reduction", "sum_over_batch_size") for loss in losses}
    if reductions == {"sum"}:
        return "sum"
    if reductions <= {"sum_over_batch_size", "mean"}:
        return "mean"
    return None


def _distributed(data, strategy):
    """Returns `data` as a dataset distributed over the replicas, without the
    absent parts (it cannot hold None); its `present` says where they were."""
    present = tuple(part is not None for part in data.first_batch())
    if data.tensors is not None:
        parts = tuple(p for p in data.tensors if p is not None)
        dataset = tf.data.Dataset.from_tensor_slices(parts).batch(data.batch_size)
    else:
        dataset = data.dataset.map(
            lambda *p: tuple(q for q, keep in zip(p, present) if keep)
        )
    return _Data(dataset=strategy.experimental_distribute_dataset(dataset),
                 present=present)


def _dot(grads, vectors):
    """Returns sum(g * v) over a list of gradients, `None` counting as zero."""
    terms = [tf.reduce_sum(tf.convert_to_tensor(g) * tf.cast(v, g.dtype))
             for g, v in zip(grads, vectors) if g is not None]
    return tf.add_n(terms) if terms else tf.constant(0.0)


def _weight_regularization(model):
    """Returns the sum of the weight regularization losses of `model`."""
    terms = [tf.cast(v.regularizer(v), tf.float64) for v in model.trainable_weights
             if getattr(v, "regularizer", None) is not None]
    return tf.add_n(terms) if terms else tf.constant(0.0, tf.float64)


def _build_model(model, data):
    """Builds an unbuilt model without running it eagerly: symbolically, as
    Keras' own fit does, or else (a model that builds on real tensors only)
    by tracing one call in a graph."""
    if model.built:
        return
    specs = data.input_spec()
    try:
        model(tf.nest.map_structure(
            lambda s: keras.KerasTensor(s.shape, dtype=s.dtype.name), specs
        ), training=False)
    except Exception:  # noqa: BLE001 - any failure: try the traced call
        tf.function(lambda x: model(x, training=False)).get_concrete_function(specs)


def _xla_choice(model, jit_compile, data):
    """Returns `(xla, optional)`: compile with XLA, and may kormos fall back.

    `jit_compile=True` asks for XLA and `False` forbids it. Under `"auto"`,
    Keras uses XLA on GPUs and never on CPUs; kormos also uses it on CPUs for
    models with an `Embedding` layer, whose gathers and scatters XLA fuses
    ("mf" row of benchmarks/bench.py), falling back to a plain graph. Layers
    with `supports_jit=False` and string inputs (which crash XLA's compiler)
    rule XLA out, under `True` with Keras' warning.
    """
    if jit_compile is False or model.run_eagerly:
        return False, False
    layers = _all_layers(model)
    strings = any(s.dtype == tf.string for s in tf.nest.flatten(data.input_spec()))
    if strings or not all(getattr(layer, "supports_jit", True) for layer in layers):
        if jit_compile is True:
            _warn(
                "This model (or its string inputs) cannot be compiled with XLA: "
                "proceeding with `jit_compile=False`, as Keras does."
            )
        return False, False
    if jit_compile is True:
        return True, False
    if model.jit_compile is True:  # Keras' own "auto" chose XLA (a GPU)
        return True, True
    if model.distribute_strategy.num_replicas_in_sync > 1:
        return False, False
    embedding = any(isinstance(layer, keras.layers.Embedding) for layer in layers)
    return embedding, True


def _all_layers(model):
    """Returns every layer nested in `model`, custom layers' sublayers too:
    Keras 3 has no public recursive walk, so this uses `_flatten_layers`."""
    return list(model._flatten_layers(include_self=False))


###############################################################################
# Batch optimizers ############################################################
###############################################################################

#: One evaluation of the objective: the point, the loss, its gradient, the
#: compiled metrics and whether loss and gradient are finite.
_Evaluation = collections.namedtuple("_Evaluation", "x loss gradient metrics finite")


class BatchOptimizer:
    """Binds a model and its full training data into a scipy-shaped objective.

    Over the flat float64 vector `x` of the model's trainable weights it
    offers `func_and_grad(x)`, `func(x)`, `grad(x)`, the exact Hessian-vector
    product `hessp(x, v)` and the dense Hessian `hess(x)` (small models).
    Each evaluation is ONE compiled TensorFlow call over every mini-batch,
    accumulated in float64; the last `max_cache_entries` are remembered.
    Subclasses implement `minimize()`; see `ScipyBatchOptimizer`.

    Example:

    ```python
    opt = kormos.ScipyBatchOptimizer()
    opt.build(model, x_train, y_train)  # model compiled with any loss
    f, g = opt.func_and_grad(opt.get_weights())
    ```

    Args:
        name: Name of the optimizer. Defaults to `"batchoptimizer"`.
        batch_size: Rows per mini-batch when `fit()` or `build()` is given
            none; it bounds memory, not the loss. Defaults to `None` (all
            rows in one batch).
        max_cache_entries: How many evaluated points to remember. Defaults
            to `2`, enough for every scipy method.
        dtype: The solver's dtype; scipy's solvers work in float64 only.
        max_dataset_bytes: A finite dataset, `PyDataset` or generator of at
            most this many bytes is read into memory once; a larger dataset
            is streamed at every evaluation, and a generator, read only once,
            must fit. Defaults to 256 MiB.
    """

    def __init__(self, name="batchoptimizer", batch_size=None, max_cache_entries=2,
                 dtype="float64", max_dataset_bytes=_DEFAULT_MAX_DATASET_BYTES):
        _check_positive_int(batch_size, "batch_size", "or None (all rows in one batch)")
        _check_positive_int(max_cache_entries, "max_cache_entries")
        _check_positive_int(max_dataset_bytes, "max_dataset_bytes")
        if tf.as_dtype(dtype) != tf.float64:
            raise ValueError(
                "`dtype` must be float64: scipy's solvers work on float64 vectors "
                f"(the model may compute in float32). Received: dtype={dtype!r}"
            )
        self.name = name
        self.batch_size = batch_size
        self.max_cache_entries = int(max_cache_entries)
        self.dtype = "float64"
        self.max_dataset_bytes = int(max_dataset_bytes)
        # Keras' evaluate()/predict() build `model.optimizer` unless it is
        # built; a batch optimizer has no variables to build.
        self.built = True
        self.model = None
        self.results = []  # the OptimizeResults of the last minimize()
        self.iterations = 0  # solver iterations in the last minimize()
        self.fg_evals = 0  # loss-and-gradient passes in the last minimize()
        self.hessp_evals = 0  # Hessian-vector-product passes, likewise
        self._jit_compile = "auto"
        self._objective = None
        self._cache = []  # the last `_Evaluation`s, newest last
        self._data = self._validation_data = None  # the bound `_Data`
        # The cached point the weights hold since the last evaluation, unless a
        # callback ran: then set_weights(x) need not copy all n weights into
        # the model again (benchmarks/bench.py, "large" row, `--ablate held-point`).
        self._holds = None

    @property
    def variables(self):
        """The optimizer's own state variables: none (scipy holds the state)."""
        return []

    @property
    def jit_compile(self):
        """The XLA request of `compile()`: True, False or "auto". Setting it
        drops the compiled functions."""
        return self._jit_compile

    @jit_compile.setter
    def jit_compile(self, value):
        if value not in (True, False, "auto"):
            raise ValueError(
                f"`jit_compile` must be True, False or 'auto'. Received: {value!r}"
            )
        self._jit_compile, self._objective = value, None

    @property
    def uses_xla(self):
        """Whether evaluations run XLA-compiled (False before `build()`)."""
        objective = self._objective
        return bool(objective and objective.xla and not objective.fell_back)

    def build(self, model, x=None, y=None, sample_weight=None, batch_size=None,
              class_weight=None, steps=None):
        """Binds a compiled `model` and its training data to this optimizer
        and returns it, the weights unchanged. `model.fit()` does this itself;
        call it to use `func_and_grad`, `hessp` or `minimize` directly.

        Args:
            x: Inputs in any form `keras.Model.fit()` takes; as in kormos
                0.1's `build(model, Xyw)`, a tuple `(x, y[, sample_weight])`
                with `y` left `None` is unpacked.
            y, sample_weight, class_weight: As in `fit()`.
            batch_size: Rows per mini-batch. Defaults to the optimizer's.
            steps: The batches of a dataset, `PyDataset` or generator that
                make up the data (required if it is infinite).

        Raises:
            ValueError: For bad data, or a model without a loss or without
                trainable weights.
        """
        if y is None and sample_weight is None and isinstance(x, tuple):
            if 2 <= len(x) <= 3:  # kormos 0.1's Xyw
                x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(x)
        batch_size = self.batch_size if batch_size is None else batch_size
        self._bind(model, _make_data(model, x, y, sample_weight, batch_size,
                                     class_weight, steps, self.max_dataset_bytes))
        return self

    def _bind(self, model, data, validation=None):
        _build_model(model, data)
        if not model.trainable_variables:
            raise ValueError(
                "The model has no trainable weights to optimize: make sure "
                "some of its layers are trainable."
            )
        objective = self._objective
        if (objective is None or objective.model is not model
                or _ids(objective.variables) != _ids(model.trainable_variables)):
            objective = _Objective(model, *_xla_choice(model, self._jit_compile, data))
        objective.bind(data, validation)
        self.model, self._objective, self._cache = model, objective, []
        self._data, self._validation_data, self._holds = data, validation, None

    def _validation(self, data):
        """Binds the validation `data`; returns a function that gives its loss
        and metrics at the current weights (a dict of floats)."""
        self._bind(self.model, self._data, data)

        def validate():
            loss, metrics = self._objective.value()
            return {"loss": float(loss), **{k: float(v) for k, v in metrics.items()}}

        return validate

    def _require_built(self):
        if self._objective is None:
            raise RuntimeError(
                "This optimizer is not bound to a model and data yet. Call "
                "`model.fit(...)` or `optimizer.build(model, x, y)` first."
            )

    def get_weights(self):
        """Returns the trainable weights as one flat float64 vector."""
        self._require_built()
        return pack_weights(self._objective.variables)

    def set_weights(self, x):
        """Assigns the flat vector `x` to the trainable weights."""
        self._require_built()
        if x is not self._holds:  # else the last evaluation left them at `x`
            self._objective.assign(
                tf.constant(_as_flat_float64(x, self._objective.size))
            )
            self._holds = None

    def func_and_grad(self, x):
        """Returns the full-data loss (a float) and its float64 gradient at the
        flat vector `x`; raises a FloatingPointError if either is not finite."""
        found = self._finite_evaluation(x)
        return found.loss, found.gradient

    def func(self, x):
        """Returns the full-data loss at `x` (a Python float)."""
        return self._finite_evaluation(x).loss

    def grad(self, x):
        """Returns the gradient of the full-data loss at `x`."""
        return self._finite_evaluation(x).gradient

    def metrics_at(self, x):
        """Returns the compiled metrics on the training data at `x` (a dict)."""
        return self._finite_evaluation(x).metrics

    def hessp(self, x, v):
        """Returns the exact Hessian-vector product H(x) @ v (float64)."""
        self._require_built()
        n = self._objective.size
        x, v = _as_flat_float64(x, n), _as_flat_float64(v, n, "v")
        self.hessp_evals += 1
        self._holds = None
        return self._objective.hessp(tf.constant(x), tf.constant(v)).numpy()

    def hess(self, x):
        """Returns the dense Hessian at `x`, one `hessp` a column: `n` passes
        over the data and `8 * n**2` bytes, so for small models only."""
        self._require_built()
        n = self._objective.size
        h = np.stack([self.hessp(x, np.eye(1, n, i).ravel()) for i in range(n)], 1)
        return 0.5 * (h + h.T)

    def _finite_evaluation(self, x):
        """Returns the `_Evaluation` at `x`, or raises if it is not finite."""
        found = self._evaluation(x)
        if not found.finite:
            what = "loss" if not np.isfinite(found.loss) else "gradient"
            raise FloatingPointError(
                f"The {what} is not finite (loss={found.loss}) at the current weights."
            )
        return found

    def _evaluation(self, x):
        """Returns the `_Evaluation` at `x`, remembered or computed now."""
        self._require_built()
        x = _as_flat_float64(x, self._objective.size)
        return self._remembered(x) or self._evaluate(x)

    def _evaluate(self, x):
        """Evaluates at `x` (one compiled pass) and remembers the result."""
        point = tf.constant(x)  # a copy: scipy reuses its buffer
        loss, gradient, metrics = self._objective.fg(point)
        loss, gradient = float(loss), gradient.numpy()
        metrics = {k: float(v) for k, v in metrics.items()}
        finite = bool(np.isfinite(loss) and np.isfinite(gradient).all())
        found = _Evaluation(point.numpy(), loss, gradient, metrics, finite)
        self._cache = (self._cache + [found])[-self.max_cache_entries :]
        self.fg_evals, self._holds = self.fg_evals + 1, found.x
        while self._objective.notices:
            _warn(self._objective.notices.pop(0))
        return found

    def _remembered(self, x):
        """Returns the remembered `_Evaluation` at `x`, or None; most misses
        differ at the first entry (the "large" row of benchmarks/bench.py,
        `--ablate first-element`)."""
        for found in reversed(self._cache):
            if found.x is x or (found.x[0] == x[0] and np.array_equal(found.x, x)):
                return found
        return None

    def minimize(self, epochs=None, callback=None, pretrain_fn=None, **kwargs):
        """Minimizes the bound objective from the current weights and returns
        the final weights; subclasses implement it."""
        raise NotImplementedError(f"{type(self).__name__} must implement `minimize()`.")

    def _plan(self, epochs=None, method=None, options=None, pretrain_fn=None):
        """Returns the `_Run`s of a fit: here, one call of `minimize()`."""
        budget = _iteration_budget(epochs, {}, method, warn=False)
        return [_Run(method, budget, options, pretrain_fn)]

    def _minimize_runs(self, runs, listener, **solver_kwargs):
        """Runs a fit's `runs` for the fit loop (`listener`): here, one call of
        `minimize()`, whose callback ends each iteration."""
        if not runs:
            return

        def callback(x):
            listener.begin_iteration()
            return self._end_iteration(listener, self._finite_evaluation(x))

        run, given = runs[0], {"method": runs[0].method, "options": runs[0].options}
        given = {k: v for k, v in {**given, **solver_kwargs}.items() if v is not None}
        budget = sum(r.budget for r in runs)
        self.minimize(epochs=budget, callback=callback, pretrain_fn=run.pretrain_fn,
                      **given)

    def _end_iteration(self, listener, found):
        """Hands the iterate `found` (with the passes so far) to the fit loop,
        `listener`; returns its answer. Callbacks may change the weights, so
        the held point is forgotten."""
        iterate = scipy.optimize.OptimizeResult(
            x=found.x, fun=found.loss, jac=found.gradient, metrics=found.metrics,
            nfev=self.fg_evals, nhev=self.hessp_evals,
        )
        try:
            return listener.end_iteration(iterate)
        finally:
            self._holds = None

    def get_config(self):
        """Returns the constructor arguments, as Keras objects do."""
        names = ("name", "batch_size", "max_cache_entries", "max_dataset_bytes")
        return {name: getattr(self, name) for name in names}

    @classmethod
    def from_config(cls, config):
        """Creates an optimizer from `get_config()` output."""
        return cls(**config)

    def __repr__(self):
        return f"{type(self).__name__}({self.get_config()})"


def _check_positive_int(value, argname, or_none=None):
    """Raises unless `value` is a positive integer (or None, if `or_none`
    says what None means)."""
    if value is None and or_none:
        return
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        alternative = f" {or_none}" if or_none else ""
        raise ValueError(
            f"`{argname}` must be a positive integer{alternative}. "
            f"Received: {argname}={value!r}"
        )


def _warn(message):
    """Issues a `UserWarning` attributed to the caller's own code: the first
    frame outside kormos, Keras, TensorFlow and scipy (Python 3.12's
    `skip_file_prefixes` does this by file path; this works on 3.10 too)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and (
        frame.f_globals is globals()
        or frame.f_globals.get("__name__", "").split(".")[0]
        in ("keras", "tensorflow", "scipy")
    ):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


###############################################################################
# Bounds ######################################################################
###############################################################################


def _resolve_bounds(bounds, variables, method):
    """Returns a `scipy.optimize.Bounds` over the flat vector, or None: the
    user's `bounds` and the lower bounds of 0 that `NonNeg` constraints imply
    (other Keras constraints are not boxes: ignored, with a warning)."""
    nonneg = [isinstance(v.constraint, keras.constraints.NonNeg) for v in variables]
    for v, box in zip(variables, nonneg):
        if v.constraint is not None and not box:
            _warn(
                f"The constraint {type(v.constraint).__name__} on {v.path} is "
                "not a box, so a full-batch solver cannot enforce it; it is "
                "ignored."
            )
    if bounds is None and not any(nonneg):
        return None
    n, offsets = sum(_sizes(variables)), np.cumsum([0] + _sizes(variables))
    lower, upper = np.full(n, -np.inf), np.full(n, np.inf)
    for i in np.flatnonzero(nonneg):
        lower[offsets[i] : offsets[i + 1]] = 0.0
    if bounds is None and method not in _BOUNDS_METHODS + ("custom",):
        _warn(
            f"Method {method!r} cannot enforce the NonNeg constraints of this "
            f"model; use one of {', '.join(_BOUNDS_METHODS)} to keep those "
            "weights non-negative."
        )
        return None
    if bounds is not None:
        user_lower, user_upper = _user_bounds(bounds, variables, offsets)
        lower, upper = np.maximum(lower, user_lower), np.minimum(upper, user_upper)
    if not (np.isfinite(lower).any() or np.isfinite(upper).any()):
        return None
    if np.any(lower > upper):
        raise ValueError(
            "`bounds` has a lower bound above its upper bound at flat "
            f"indices {np.flatnonzero(lower > upper)[:10].tolist()}."
        )
    return scipy.optimize.Bounds(lower, upper)


def _user_bounds(bounds, variables, offsets):
    """Converts the user's `bounds` to (lower, upper) flat arrays."""
    n = int(offsets[-1])
    if isinstance(bounds, scipy.optimize.Bounds):
        return tuple(
            _broadcast(b, (n,), f"`bounds.{side}` (one entry per weight)")
            for side, b in (("lb", bounds.lb), ("ub", bounds.ub))
        )
    if not isinstance(bounds, dict):
        pairs = list(bounds)
        if len(pairs) != n:
            raise ValueError(
                f"`bounds` must have one (low, high) pair per weight: {n} pairs "
                f"for this model. Received {len(pairs)} pairs."
            )
        bounds = dict(enumerate(pairs))
        spans = {i: (slice(i, i + 1), ()) for i in range(n)}
    else:
        spans = {}
        for key in bounds:
            i = _variable_index(key, variables)
            spans[key] = (slice(offsets[i], offsets[i + 1]), tuple(variables[i].shape))
    lower, upper = np.full(n, -np.inf), np.full(n, np.inf)
    for key, (lo, hi) in bounds.items():
        span, shape = spans[key]
        for side, value in ((lower, lo), (upper, hi)):
            if value is not None:
                side[span] = _broadcast(value, shape, f"`bounds[{key!r}]`")
    return lower, upper


def _broadcast(value, shape, what):
    """Returns `value` broadcast to `shape`, flattened, or raises."""
    try:
        return np.broadcast_to(np.asarray(value, float), shape).ravel()
    except ValueError:
        raise ValueError(
            f"{what} must be a number or an array of shape {shape}. Received: "
            f"an array of shape {np.shape(value)}"
        ) from None


def _variable_index(key, variables):
    """Finds the variable whose path is `key` or ends with `/key`."""
    paths = [v.path for v in variables]
    matches = [i for i, p in enumerate(paths) if p == key or p.endswith("/" + key)]
    if len(matches) == 1:
        return matches[0]
    problem = "matches no" if not matches else "is ambiguous: it matches several"
    raise ValueError(
        f"The `bounds` key {key!r} {problem} trainable variable. Use a "
        f"longer path suffix. Variable paths: {paths}"
    )


def _bounds_config(bounds):
    """Returns `bounds` as plain data for `get_config` (see `_bounds_from`)."""
    if isinstance(bounds, scipy.optimize.Bounds):
        lb, ub = (np.asarray(b, float).tolist() for b in (bounds.lb, bounds.ub))
        return {"scipy.optimize.Bounds": [lb, ub]}
    if isinstance(bounds, dict):
        return {k: [np.asarray(b, float).tolist() for b in v]
                for k, v in bounds.items()}
    return None if bounds is None else np.asarray(bounds, float).tolist()


def _bounds_from(config):
    """The inverse of `_bounds_config`."""
    if isinstance(config, dict) and list(config) == ["scipy.optimize.Bounds"]:
        return scipy.optimize.Bounds(*config["scipy.optimize.Bounds"])
    return config


###############################################################################
# Solver runs #################################################################
###############################################################################

_DEFAULT_EPOCHS = 20
# `OptimizeResult.status` of runs that kormos ended (99 is scipy's own code
# for a callback that raised StopIteration).
_STATUS_BUDGET_USED, _STATUS_INTERRUPTED, _STATUS_NOT_FINITE = 1, 97, 98
_STATUS_STOPPED = 99
_STOPPED_EARLY = (_STATUS_INTERRUPTED, _STATUS_NOT_FINITE, _STATUS_STOPPED)


class _Interrupts:
    """Ctrl-C during a fit: inside `deferred()` (main thread) the first SIGINT
    sets `requested`, which ends the solver at its last iterate (checked at
    every evaluation and iteration); a second raises `KeyboardInterrupt`."""

    def __init__(self):
        self.requested, self._depth = False, 0

    @contextlib.contextmanager
    def deferred(self):
        in_main = threading.current_thread() is threading.main_thread()
        default = signal.getsignal(signal.SIGINT) is signal.default_int_handler
        install = self._depth == 0 and in_main and default
        self.requested = self.requested and self._depth > 0
        if install:
            signal.signal(signal.SIGINT, self._on_sigint)
        self._depth += 1
        try:
            yield self
        finally:
            self._depth -= 1
            if install:
                signal.signal(signal.SIGINT, signal.default_int_handler)

    def _on_sigint(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


_INTERRUPTS = _Interrupts()


class _StopRun(Exception):
    """Ends a solver run at its last iterate (the one stop path of kormos).
    scipy stops cleanly on a callback's StopIteration only for the methods its
    `_wrap_callback` wraps (scipy/optimize/_optimize.py: not TNC or COBYLA,
    and the set changes between versions), and never inside an evaluation:
    kormos raises this from both and builds the run's result itself."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status, self.message = status, message


class _Run(collections.namedtuple("_Run", "method budget options pretrain_fn")):
    """One solver run of a chain: method, iteration budget, options (as
    given) and pretrain_fn."""

    def scipy_options(self):
        """The `options` for scipy: the user's, with the budget as `maxiter`
        where it counts iterations (kormos counts the others' itself)."""
        counted = _method_name(self.method) in _COUNTED_BY_KORMOS
        return {**(self.options or {}), **({} if counted else {"maxiter": self.budget})}


def _plan_runs(
    optimizer, method=None, epochs=None, options=None, pretrain_fn=None, warn=True
):
    """Checks the solver arguments and returns a list of `_Run`s. Arguments
    left None take the optimizer's own; each is a list (one entry per chained
    run, all of one length) or a value for every run. A run's budget is
    `epochs`, else `options["maxiter"]`, else 20."""
    given = dict(method=method, epochs=epochs, options=options, pretrain_fn=pretrain_fn)
    given = {k: getattr(optimizer, k) if v is None else v for k, v in given.items()}
    lists = {k: v for k, v in given.items() if isinstance(v, (list, tuple))}
    lengths = {len(v) for v in lists.values()}
    if len(lengths) > 1:
        detail = ", ".join(f"{k} has {len(v)}" for k, v in lists.items())
        raise ValueError(
            "To chain solvers, `method`, `epochs`, `options` and "
            f"`pretrain_fn` lists must have the same length. Received: {detail}"
        )
    count = lengths.pop() if lengths else 1
    if count == 0:
        raise ValueError("The solver chain is empty: pass at least one method.")
    runs = []
    for i in range(count):
        run = {k: v[i] if k in lists else v for k, v in given.items()}
        method = _canonical_method(run["method"])
        if run["options"] is not None and not isinstance(run["options"], dict):
            raise TypeError(
                "`options` must be a dict of solver options (see "
                "scipy.optimize.show_options('minimize', method)), or a list "
                "of dicts (one per chained solver). Received: "
                f"options={run['options']!r}"
            )
        options_i = dict(run["options"] or {})
        budget = _iteration_budget(run["epochs"], options_i, method, warn)
        runs.append(_Run(method, budget, options_i, run["pretrain_fn"]))
    return runs


def _iteration_budget(epochs, options, method, warn):
    """Returns a run's iteration budget: `epochs`, else `maxiter`, else 20."""
    maxiter = options.get("maxiter")
    if _method_name(method) in _COUNTED_BY_KORMOS:
        maxiter = None  # it counts evaluations, or does not exist
    if epochs is None:
        return _DEFAULT_EPOCHS if maxiter is None else int(maxiter)
    _check_positive_int(epochs, "epochs")
    if warn and maxiter is not None and maxiter != epochs:
        _warn(
            f"options['maxiter']={maxiter} and epochs={epochs} both set the "
            f"iteration budget; epochs wins, so the solver runs at most {epochs} "
            "iterations. Leave epochs unset to use maxiter."
        )
    return int(epochs)


def _skip_iterations(runs, done):
    """Returns `runs` without their first `done` iterations (the epochs that
    `initial_epoch` or a resumed fit count as done)."""
    remaining = []
    for run in runs:
        if done < run.budget:
            remaining.append(run._replace(budget=run.budget - done))
        done = max(0, done - run.budget)
    return remaining


class _SolverRun:
    """One solver run: the callables scipy gets, its own counts, the last
    accepted iterate, and the run's result. Its `listener` hears
    `begin_iteration()` before an iteration's first evaluation and
    `end_iteration(iterate)` after it; a True answer stops the run."""

    def __init__(self, optimizer, run, listener):
        self.optimizer, self.run, self.listener = optimizer, run, listener
        self.x0 = self.x = optimizer.get_weights()  # the start, the last iterate
        self.last = None  # the loss and gradient of the last iterate
        self.nit = self.nfev = self.nhev = 0
        self.losses = []  # of the last two iterates
        self.in_iteration = False  # the listener has heard begin_iteration()
        self.counts_itself = _method_name(run.method) in (*_COUNTED_BY_KORMOS, "custom")
        self.hess_inv = None  # the dense quasi-Newton methods' `_InverseHessian`

    def solve(self, bounds, constraints, tol, carried):
        """Runs scipy from the current weights (a quasi-Newton method from the
        inverse Hessian `carried`, if not None) and returns its result."""
        name = _method_name(self.run.method)
        method, options = self.run.method, self.run.scipy_options()
        if name in _QUASI_NEWTON:
            method = functools.partial(_minimize_quasi_newton, update=name)
            start = options.get("hess_inv0")
            self.hess_inv = options["hess_inv0"] = (
                _InverseHessian(carried) if start is None and carried is not None
                else _start_inverse_hessian(start, len(self.x0))
            )
        arguments = {
            "fun": self.loss if name in _DERIVATIVE_FREE else self.loss_and_gradient,
            "jac": name not in _DERIVATIVE_FREE or None,
            "hessp": self.hessp if name in _HESSP_METHODS + ("custom",) else None,
            "hess": self.hess if name in _HESS_METHODS else None,
            "bounds": bounds,
            "constraints": constraints or (),
        }
        arguments = {k: v for k, v in arguments.items() if v is not None}
        try:
            with _solver_blas_threads(name):
                result = scipy.optimize.minimize(
                    x0=self.x0, method=method, options=options, tol=tol,
                    callback=self.on_iteration, **arguments,
                )
        except _StopRun as stop:
            result = self._result(stop.status, stop.message)
        except BaseException:
            self.optimizer.set_weights(self.x)
            raise
        else:
            self._report_final(result.x)
            _explain_float32_stall(result, self.losses, self.optimizer.model)
        if self.hess_inv is not None:
            result.update(hess_inv=self.hess_inv.symmetric(), nfev=self.nfev,
                          njev=self.nfev)
        elif not isinstance(result.get("hess_inv"), (np.ndarray, type(None))):
            # L-BFGS-B's operator holds scipy's whole workspace (~25 x n floats).
            del result["hess_inv"]
        self.optimizer.set_weights(result.x)
        return result

    def loss_and_gradient(self, x):
        # The public `func_and_grad`, which a subclass may extend.
        self._begin_iteration()
        before = self.optimizer.fg_evals
        try:
            loss, gradient = self.optimizer.func_and_grad(x)
        except FloatingPointError as error:
            if self.nit == 0 and np.array_equal(x, self.x0):
                raise ValueError(
                    f"{error} The solver cannot start from non-finite values: "
                    "check the data for NaN/Inf and the initial weights."
                ) from None
            message = f"Stopped: {error} The last finite iterate is kept."
            _warn(message)
            raise _StopRun(_STATUS_NOT_FINITE, message) from None
        finally:
            self.nfev += self.optimizer.fg_evals - before
        self.last = self.last or (loss, gradient)  # the first evaluation is at x0
        return loss, gradient

    def loss(self, x):
        return self.loss_and_gradient(x)[0]

    def hessp(self, x, v):
        self._begin_iteration()
        self.nhev += 1
        return self.optimizer.hessp(x, v)

    def hess(self, x):
        self._begin_iteration()
        self.nhev += len(x)
        return self.optimizer.hess(x)

    def on_iteration(self, intermediate_result):
        """scipy's callback: most methods pass an OptimizeResult, TNC passes
        x (and L-BFGS-B and Newton-CG reuse its buffer)."""
        if self._end_iteration(getattr(intermediate_result, "x", intermediate_result)):
            raise _StopRun(_STATUS_STOPPED, "Stopped by a callback (stop_training).")
        self._stop_if_interrupted()
        if self.counts_itself and self.nit >= self.run.budget:
            raise _StopRun(_STATUS_BUDGET_USED, "Stopped: the budget (epochs) is used.")

    def _begin_iteration(self):
        self._stop_if_interrupted()
        if not self.in_iteration:
            self.in_iteration = True
            self.listener.begin_iteration()

    def _end_iteration(self, x):
        """Accepts the iterate `x` and tells the listener; returns its answer."""
        before = self.optimizer.fg_evals
        found = self.optimizer._evaluation(x)  # remembered: scipy evaluated it
        self.nfev += self.optimizer.fg_evals - before
        self.x, self.last = found.x, (found.loss, found.gradient)
        self.nit += 1
        self.losses = self.losses[-1:] + [found.loss]
        self._begin_iteration()
        self.in_iteration = False
        return self.optimizer._end_iteration(self.listener, found)

    def _stop_if_interrupted(self):
        if _INTERRUPTS.requested:
            message = "Interrupted by Ctrl-C; the last iterate is kept."
            raise _StopRun(_STATUS_INTERRUPTED, message)

    def _report_final(self, x):
        """Tells the listener of the solver's answer if it is a new point."""
        if not np.array_equal(x, self.x):
            self._end_iteration(x)
            self.nit -= 1  # not an iteration of the solver's (SLSQP's answer)

    def _result(self, status, message):
        """Builds the result of a run that kormos ended, at the last iterate."""
        fun, jac = self.last or (float("nan"), None)
        return scipy.optimize.OptimizeResult(
            x=self.x, fun=fun, jac=jac, nit=self.nit, nfev=self.nfev, nhev=self.nhev,
            status=status, success=False, message=message,
        )


class _UserCallback:
    """The listener of `minimize(callback=...)`: `callback(x) -> bool`, as in
    kormos 0.1."""

    def __init__(self, callback):
        self.callback = callback

    def begin_iteration(self):
        pass

    def end_iteration(self, iterate):
        return self.callback is not None and bool(self.callback(iterate.x))


def _check_solver_arguments(method, bounds, constraints):
    name = _method_name(method)
    for argument, value, takers in (
        ("bounds", bounds, _BOUNDS_METHODS),
        ("constraints", constraints or None, _CONSTRAINT_METHODS),
    ):
        if value is not None and name not in takers + ("custom",):
            raise ValueError(
                f"Method {name!r} cannot take `{argument}`; use one of "
                f"{', '.join(takers)}. Received: {argument}={value!r}"
            )


def _check_dense_size(method, n, limit):
    """Refuses a method whose dense n x n matrices would not fit in memory,
    or that has more than `limit` weights (None: 2000 for scipy's methods of
    O(n^3) work per iteration, no limit for the quasi-Newton methods)."""
    if method not in _DENSE_MATRICES:
        return
    if limit is None and method not in _QUASI_NEWTON:
        limit = _DEFAULT_MAX_CUBIC_PARAMS
    needed, available = _DENSE_MATRICES[method] * 8 * n * n, _available_memory()
    too_big = needed > (available or needed)
    if too_big or (limit is not None and n > limit):
        reason = f"and this model has more than max_dense_params={limit} weights"
        if too_big:
            reason = f"more than the {available / 1e9:.1f} GB of memory available"
        raise ValueError(
            f"Method {method!r} keeps dense {n} x {n} float64 matrices for this "
            f"model's {n} weights: about {needed / 1e9:.1f} GB ({needed} bytes), "
            f"{reason}. Use 'L-BFGS-B' or 'Newton-CG' instead, or set "
            "ScipyBatchOptimizer(max_dense_params=...)."
        )


def _available_memory():
    """Returns the bytes of memory available now, or None if unknown."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as meminfo:  # Linux: free + reclaimable
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


try:
    import threadpoolctl as _threadpoolctl
except ImportError:  # optional
    _threadpoolctl = None


def _solver_blas_threads(method):
    """Limits numpy's and scipy's BLAS to one thread while a solver runs,
    with threadpoolctl where it is installed (else it does nothing): a
    solver's vector (and matrix-vector) arithmetic is memory-bound, and a
    second thread competes with TensorFlow for the cores. In whole fits of the
    "large" row of benchmarks/bench.py (`--ablate blas-limit`) scipy 1.18's
    L-BFGS-B routine ran 1.2 x faster with one thread, scipy 1.11's a third
    faster on a busy machine (9% slower on an idle one). scipy's methods with
    O(n^3) matrix products keep all threads."""
    cubic = method in _DENSE_MATRICES and method not in _QUASI_NEWTON
    if cubic or _threadpoolctl is None:
        return contextlib.nullcontext()
    return _threadpoolctl.threadpool_limits(1, user_api="blas")


def _explain_float32_stall(result, losses, model):
    """Says so when a float32 model stopped because its loss cannot resolve
    smaller steps: L-BFGS-B's relative-reduction test passed on two equal
    float32 losses, or a line search failed."""
    low_precision = ("float16", "bfloat16", "float32")
    if not any(_dtype_name(v) in low_precision for v in model.trainable_variables):
        return
    # "RELATIVE REDUCTION OF F", or "REL_REDUCTION_OF_F" in older scipy.
    message = str(result.message).lower().replace("_", " ")
    failures = ("abnormal", "precision loss", "line search", "linesearch")
    failed = not result.success and any(s in message for s in failures)
    resolution = np.finfo(np.float32).eps * max(map(abs, losses), default=0.0)
    flat = len(losses) == 2 and abs(losses[0] - losses[1]) <= resolution
    if failed or ("reduction of f" in message and flat):
        result.message = (
            f"{result.message} The model computes in float32, whose loss "
            "cannot resolve smaller steps, so this is a float32 stall rather "
            "than convergence; call keras.config.set_floatx('float64') and "
            "keras.config.set_dtype_policy('float64') before building the model."
        )
        _warn(result.message)


class ScipyBatchOptimizer(BatchOptimizer):
    """Trains a model with `scipy.optimize.minimize` on the full data.

    Every method works: gradient methods get the exact gradient,
    `"Newton-CG"`, `"trust-ncg"`, `"trust-krylov"` and `"trust-constr"` also
    exact Hessian-vector products, `"trust-exact"` and `"dogleg"` the dense
    Hessian (small models), derivative-free methods the loss. `"BFGS"` is
    scipy's BFGS with an O(n^2) update, `"SSBFGS"` and `"SSBroyden"` its
    self-scaled variants. The arguments are defaults that `minimize()` and
    `fit()` may override; their order is kormos 0.1's.

    Example:

    ```python
    model.compile(loss="mse", optimizer=kormos.ScipyBatchOptimizer(
        method="L-BFGS-B", options={"gtol": 1e-10}))
    history = model.fit(x, y, epochs=100)
    print(model.optimizer.results[-1].message)
    ```

    Args:
        name: Name of the optimizer. Defaults to `"scipy"`.
        method: A name of `METHODS` in any case, or a custom minimizer
            `(fun, x0, args, **kwargs) -> OptimizeResult`. Default: L-BFGS-B.
        epochs: The iteration budget. Defaults to `options["maxiter"]`, else 20.
        pretrain_fn: `fn(model)`, called before the solver starts.
        options: Dict for `scipy.optimize.minimize(options=...)`.
        bounds: A `scipy.optimize.Bounds`, `(low, high)` pairs over the flat
            vector, or a dict from a variable path (suffix), e.g.
            `"dense/kernel"`, to `(low, high)`. `NonNeg` constraints add 0.
        constraints: scipy constraints over the flat vector (SLSQP,
            trust-constr, COBYLA, COBYQA). tol: As in scipy.
        max_dense_params: The most weights allowed for methods with dense
            n x n matrices. Defaults to `None`: BFGS, SSBFGS and SSBroyden
            take any model whose two matrices fit in memory; SLSQP,
            trust-exact and dogleg (O(n^3) work per iteration) up to 2000.
        warm_start: With BFGS, SSBFGS or SSBroyden, start each run from the
            inverse Hessian the last run of this optimizer ended with (in
            this process; it is not saved). Defaults to `False`.
        **kwargs: `batch_size`, `max_cache_entries`, `dtype`,
            `max_dataset_bytes`; see `BatchOptimizer`.
    """

    def __init__(self, name="scipy", method=None, epochs=None, pretrain_fn=None,
                 options=None, bounds=None, constraints=None, tol=None,
                 max_dense_params=None, warm_start=False, **kwargs):
        super().__init__(name=name, **kwargs)
        if method is None and isinstance(name, str) and name.lower() in METHODS:
            _warn(
                f"ScipyBatchOptimizer({name!r}) names the optimizer {name!r} and "
                "runs L-BFGS-B: its first argument is `name`, as in kormos 0.1. "
                f"Pass method={name!r} to run {name}."
            )
        self.method = "l-bfgs-b" if method is None else method
        self.epochs, self.pretrain_fn, self.options = epochs, pretrain_fn, options
        self.bounds, self.constraints, self.tol = bounds, constraints, tol
        _check_positive_int(max_dense_params, "max_dense_params", "or None")
        self.max_dense_params, self.warm_start = max_dense_params, bool(warm_start)
        methods = [run.method for run in _plan_runs(self, warn=False)]  # checks them
        self.method = methods if isinstance(method, (list, tuple)) else methods[0]
        if warm_start and not set(methods) & set(_QUASI_NEWTON):
            raise ValueError(
                "`warm_start=True` carries the inverse Hessian of "
                f"{', '.join(_QUASI_NEWTON)} from one run to the next; these "
                f"methods have none. Received: method={self.method!r}"
            )
        self._carried = None  # the inverse Hessian a warm start continues from

    def minimize(self, epochs=None, callback=None, pretrain_fn=None, method=None,
                 options=None, bounds=None, constraints=None, tol=None):
        """Runs the solver, or a chain of solvers, from the current weights;
        returns the final weights as a flat float64 vector (as kormos 0.1).

        Arguments left `None` take the optimizer's own; `method`, `epochs`,
        `options` and `pretrain_fn` may be lists of equal length to chain
        solvers. `results` holds each run's `scipy.optimize.OptimizeResult`.
        A run stopped by `callback`, a non-finite loss or Ctrl-C ends at its
        last iterate (a second Ctrl-C raises KeyboardInterrupt at once).

        Args:
            epochs: The iteration budget, passed as `options["maxiter"]`
                (kormos counts the iterations of TNC, COBYLA and COBYQA).
                Defaults to `maxiter`, else 20; a different `maxiter` warns.
            callback: `callback(x) -> bool`, called with each iterate (and
                the solver's answer, if new); returning `True` stops.
            pretrain_fn, method, options, bounds, constraints, tol: As in
                the constructor.

        Raises:
            ValueError: For arguments the method cannot take, or a loss that
                is not finite at the start; before any weight changes.
        """
        self._require_built()
        runs = _plan_runs(self, method, epochs, options, pretrain_fn)
        self._minimize_runs(runs, _UserCallback(callback), bounds, constraints, tol)
        return self.get_weights()

    def _plan(self, epochs=None, method=None, options=None, pretrain_fn=None):
        return _plan_runs(self, method, epochs, options, pretrain_fn)

    def _minimize_runs(self, runs, listener, bounds=None, constraints=None, tol=None):
        bounds = self.bounds if bounds is None else bounds
        constraints = self.constraints if constraints is None else constraints
        tol = self.tol if tol is None else tol
        names = [_method_name(run.method) for run in runs]
        for name in names:
            _check_solver_arguments(name, bounds, constraints)
            _check_dense_size(name, self._objective.size, self.max_dense_params)
        # Resolved (and checked) before any weight changes, once per method.
        boxes = {n: _resolve_bounds(bounds, self._objective.variables, n)
                 for n in dict.fromkeys(names)}
        self.results, self.iterations, self.fg_evals, self.hessp_evals = [], 0, 0, 0
        with _INTERRUPTS.deferred():
            for run, name in zip(runs, names):
                box = boxes[name]
                if run.pretrain_fn is not None:
                    variables = self._objective.variables
                    run.pretrain_fn(self.model)
                    if _ids(self.model.trainable_variables) != _ids(variables):
                        self._bind(self.model, self._data, self._validation_data)
                        box = _resolve_bounds(bounds, self._objective.variables, name)
                solver = _SolverRun(self, run, listener)
                result = solver.solve(box, constraints, tol, self._warm_start())
                if solver.hess_inv is not None and self.warm_start:
                    self._carried = result.hess_inv
                self.results.append(result)
                self.iterations += result.nit
                if result.status in _STOPPED_EARLY:
                    break

    def _warm_start(self):
        """Returns the inverse Hessian a run continues from, or None."""
        carried, n = self._carried if self.warm_start else None, self._objective.size
        if carried is not None and len(carried) != n:
            _warn(
                f"warm_start: the model has {n} trainable weights, the inverse "
                f"Hessian carried from the last run {len(carried)}; this run "
                "starts from the identity."
            )
            carried = self._carried = None
        return carried

    def get_config(self):
        """Returns the constructor arguments except `constraints` and
        `pretrain_fn` (functions; saving a model warns about them). A custom
        minimizer is saved by its registered Keras name: decorate it with
        `keras.saving.register_keras_serializable()` or pass it in
        `custom_objects` when loading."""
        method = self.method
        if callable(method):
            method = keras.saving.serialize_keras_object(method)
        return {
            **super().get_config(),
            "method": method,
            "epochs": self.epochs,
            "options": self.options,
            "bounds": _bounds_config(self.bounds),
            "tol": self.tol,
            "max_dense_params": self.max_dense_params,
            "warm_start": self.warm_start,
        }

    @classmethod
    def from_config(cls, config):
        """Creates an optimizer from `get_config()` output."""
        config = {**config, "bounds": _bounds_from(config.get("bounds"))}
        method = config.get("method")
        if isinstance(method, dict):
            try:
                config["method"] = keras.saving.deserialize_keras_object(method)
            except (TypeError, ValueError) as e:
                name = method.get("config")
                raise TypeError(
                    f"Cannot find the custom minimizer {name!r} of this "
                    "ScipyBatchOptimizer. Decorate it with "
                    "`@keras.saving.register_keras_serializable()` or pass "
                    f"`custom_objects={{{name!r}: {name}}}` to `load_model`."
                ) from e
        return cls(**config)


###############################################################################
# Identifiers #################################################################
###############################################################################


def get(identifier):
    """Returns the `BatchOptimizer` that `identifier` names: `"scipy"` gives
    `ScipyBatchOptimizer()` (L-BFGS-B), a `scipy.optimize.minimize` method name
    in any case a `ScipyBatchOptimizer` of that method; a `BatchOptimizer` is
    returned as it is and a serialized one deserialized.

    Raises:
        ValueError: If `identifier` names no batch optimizer.
    """
    optimizer = _as_batch_optimizer(identifier)
    if optimizer is None:
        raise ValueError(
            "Could not interpret the batch optimizer identifier. Use 'scipy', a "
            f"scipy.optimize.minimize method name ({', '.join(METHODS)}) or a "
            f"kormos.BatchOptimizer. Received: identifier={identifier!r}"
        )
    return optimizer


def _as_batch_optimizer(identifier):
    """Returns the `BatchOptimizer` that `identifier` names, or None."""
    if isinstance(identifier, BatchOptimizer):
        return identifier
    if isinstance(identifier, str):
        name = identifier.lower()
        if name == "scipy":
            return ScipyBatchOptimizer()
        if name in METHODS:
            return ScipyBatchOptimizer(name=name, method=name)
    if isinstance(identifier, dict) and identifier.get("module") == __name__:
        return keras.saving.deserialize_keras_object(identifier)
    return None


###############################################################################
# The full-batch fit loop #####################################################
###############################################################################


class _FitLoop:
    """One `fit()`: Keras' own fit loop (keras/src/backend/tensorflow/trainer.py)
    with one solver iteration as one epoch. scipy drives the iterations, so
    the loop is the solver runs' listener. Whenever `fit()` returns or raises,
    the model holds the weights of the last History row (or the first)."""

    def __init__(self, model, callbacks, history, validate, validation_freq):
        self.model, self.optimizer = model, model.optimizer
        self.callbacks, self.history = callbacks, history
        self.validate, self.validation_freq = validate, validation_freq
        self.epoch, self.logs = 0, None
        # The weights after each of the last two History rows, by row count.
        self.row_weights = {}

    def run(self, runs, initial_epoch, solver_kwargs):
        model, optimizer = self.model, self.optimizer
        model.stop_training = False
        self.callbacks.on_train_begin()
        self.epoch = _resumed_epoch(model, initial_epoch)
        self.row_weights = {0: optimizer.get_weights()}
        try:
            if not _INTERRUPTS.requested:
                runs = _skip_iterations(runs, self.epoch)
                optimizer._minimize_runs(runs, self, **solver_kwargs)
        finally:
            weights = self.row_weights.get(len(self.history.epoch))
            if weights is not None and len(weights) == len(optimizer.get_weights()):
                optimizer.set_weights(weights)
        self.callbacks.on_train_end(logs=self.logs)
        return self.history

    def begin_iteration(self):
        self.callbacks.on_epoch_begin(self.epoch)
        self.callbacks.on_train_batch_begin(0)

    def end_iteration(self, iterate):
        """Logs one solver iteration as one epoch; returns True to stop."""
        self.optimizer.set_weights(iterate.x)  # callbacks see the model there
        grad = float(np.linalg.norm(iterate.jac))
        logs = {"loss": iterate.fun, "grad": grad, "fg_evals": iterate.nfev,
                "hessp_evals": iterate.nhev, **iterate.metrics}
        self.callbacks.on_train_batch_end(0, dict(logs))
        if self.validate and _should_validate(self.epoch, self.validation_freq):
            logs.update(self._validation_logs())
        rows = len(self.history.epoch)
        self.row_weights = {rows: self.row_weights[rows], rows + 1: iterate.x}
        self.callbacks.on_epoch_end(self.epoch, logs)
        self.logs = logs
        self.epoch += 1
        return bool(self.model.stop_training)

    def _validation_logs(self):
        """The validation loss and metrics, with the callbacks Keras' own
        `evaluate()` inside `fit()` calls (one batch: the whole pass)."""
        self.callbacks.on_test_begin()
        self.callbacks.on_test_batch_begin(0)
        logs = self.validate()
        self.callbacks.on_test_batch_end(0, dict(logs))
        self.callbacks.on_test_end(dict(logs))
        return {f"val_{k}": v for k, v in logs.items()}


def _resumed_epoch(model, initial_epoch):
    """Returns the epoch to start from, after `on_train_begin`: the one that
    `BackupAndRestore` restored, in the private `model._initial_epoch` that
    Keras' own `fit()` reads (keras/src/backend/tensorflow/trainer.py), else
    `initial_epoch`."""
    return getattr(model, "_initial_epoch", None) or initial_epoch


def _should_validate(epoch, validation_freq):
    """Keras' rule: validate after (1-indexed) epochs that `validation_freq` picks."""
    if isinstance(validation_freq, int) and validation_freq > 0:
        return (epoch + 1) % validation_freq == 0
    if isinstance(validation_freq, (list, tuple, set)):
        return (epoch + 1) in validation_freq
    raise ValueError(
        "`validation_freq` must be a positive int or a list of epochs. "
        f"Received: validation_freq={validation_freq!r}"
    )


# Callbacks that act on a learning rate or on an optimizer's moving averages,
# which full-batch solvers do not have.
_IGNORED_CALLBACKS = (
    keras.callbacks.ReduceLROnPlateau,
    keras.callbacks.LearningRateScheduler,
    keras.callbacks.SwapEMAWeights,
)


def _make_callbacks(model, callbacks, verbose, epochs):
    """Returns the `CallbackList` of one full-batch fit and its fresh History."""
    # History first: an iteration that a later callback interrupts is logged.
    kept = [keras.callbacks.History()]
    for callback in callbacks or []:
        if isinstance(callback, _IGNORED_CALLBACKS):
            _warn(
                f"{type(callback).__name__} acts on a learning rate or on moving "
                "averages of the weights, which full-batch solvers do not have; "
                "it is ignored."
            )
        else:
            kept.append(callback)
    if verbose:
        kept.append(_Progress(epochs, live=verbose == 1 and _live_display()))
    callback_list = keras.callbacks.CallbackList(
        kept, add_progbar=False, model=model, verbose=verbose, epochs=epochs, steps=1
    )
    return callback_list, kept[0]


def _live_display():
    """True where a redrawn progress bar reads well: a terminal or a notebook
    (Keras' `Progbar` redraws wherever `"posix" in sys.modules`, files too)."""
    isatty = getattr(sys.stdout, "isatty", None)
    return bool(isatty and isatty()) or "ipykernel" in sys.modules


class _Progress(keras.callbacks.Callback):
    """Shows a full-batch fit: a live `keras.utils.Progbar` over the budget
    (verbose=1 in a terminal or notebook), or else one plain line per
    iteration with its wall time and logs (verbose=2, files and pipes)."""

    def __init__(self, epochs, live):
        super().__init__()
        self.epochs, self.live = epochs, live
        self._bar, self._seen, self._logs, self._last = None, 0, {}, None

    def on_train_begin(self, logs=None):
        self._last = time.perf_counter()
        if self.live:
            self._bar = keras.utils.Progbar(self.epochs, unit_name="iteration")

    def on_epoch_end(self, epoch, logs=None):
        self._logs, self._seen = dict(logs or {}), epoch + 1
        if self._bar is not None:
            self._bar.stateful_metrics.update(self._logs)  # shown as they are
            self._bar.update(self._seen, list(self._logs.items()))
            return
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        took = f"{seconds:.2f}s" if seconds >= 1 else f"{seconds * 1e3:.0f}ms"
        values = "".join(f" - {k}: {_format_log(k, v)}" for k, v in self._logs.items())
        print(f"Iteration {self._seen}/{self.epochs} - {took}{values}", flush=True)

    def on_train_end(self, logs=None):
        if self._bar is not None and self._seen < self.epochs:  # stopped early
            self._bar.target = max(self._seen, 1)
            self._bar.update(self._bar.target, list(self._logs.items()), finalize=True)
        results = getattr(self.model.optimizer, "results", None)
        if results:  # why the solver stopped, and the gradient gtol tests
            result, largest = results[-1], ""
            if result.get("jac") is not None:
                largest = f" (largest gradient entry: {np.abs(result.jac).max():.2e})"
            print(f"{self._seen} iterations: {result.message}{largest}", flush=True)


def _format_log(key, value):
    """Formats a log value as Keras' progress bar does, a count as an int."""
    if key in ("fg_evals", "hessp_evals"):
        return str(int(value))
    return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.4e}"




###############################################################################
# Models ######################################################################
###############################################################################


class _BatchOptimizedMixin:
    """compile() and fit() of a model that a BatchOptimizer can train."""

    def compile(self, optimizer="rmsprop", **kwargs):
        """Configures the model for training, by a batch solver or by Keras.

        With a `kormos.BatchOptimizer`, `"scipy"` or a `scipy.optimize.minimize`
        method name as `optimizer`, `fit()` runs that full-batch solver; any
        other (`"adam"`, ...) goes to `keras.Model.compile`. Other arguments
        mean what they mean in Keras; under `jit_compile="auto"` a batch
        optimizer also uses XLA on CPUs for models with an `Embedding` layer.
        Recompiling keeps the weights. Raises a ValueError if `optimizer` names
        neither a batch optimizer nor a Keras optimizer.
        """
        batch_optimizer = _as_batch_optimizer(optimizer)
        if batch_optimizer is None:
            if isinstance(optimizer, str):
                _check_keras_optimizer_name(optimizer)
            return super().compile(optimizer=optimizer, **kwargs)
        super().compile(optimizer="sgd", **kwargs)  # Keras needs one; replaced
        batch_optimizer.jit_compile = kwargs.get("jit_compile", "auto")
        self.optimizer = batch_optimizer

    @property
    def fit(self):
        """`fit_batch` if compiled with a batch optimizer, else `keras.Model.fit`
        (as in kormos 0.1, so `model.fit == model.fit_batch` tells which)."""
        if isinstance(getattr(self, "optimizer", None), BatchOptimizer):
            return self.fit_batch
        return super().fit

    def fit_batch(
        self, x=None, y=None, batch_size=None, epochs=None, verbose="auto",
        callbacks=None, validation_split=0.0, validation_data=None, shuffle=True,
        class_weight=None, sample_weight=None, initial_epoch=0, steps_per_epoch=None,
        validation_steps=None, validation_batch_size=None, validation_freq=1,
        # kormos' own, as in ScipyBatchOptimizer:
        method=None, options=None, bounds=None, constraints=None, tol=None,
        pretrain_fn=None,
    ):
        """Trains the model with its batch optimizer on ALL the training data.

        `model.fit` is this method when the model is compiled with a batch
        optimizer. The arguments shared with `keras.Model.fit` mean what they
        mean there, with one solver iteration as one epoch (`shuffle` has no
        effect). The solver minimizes `compute_loss` (with `add_loss` terms);
        a `train_step` of the model's own is never called.

        Example: 50 L-BFGS-B iterations, then 10 of Newton-CG:
        `model.fit(x, y, method=["l-bfgs-b", "newton-cg"], epochs=[50, 10])`.

        Args:
            x: Inputs in any form `keras.Model.fit` takes; a dataset,
                `PyDataset` or generator that fits in the optimizer's
                `max_dataset_bytes` is read into memory once.
            batch_size: Rows per mini-batch of an evaluation: it bounds
                memory, not the loss. Defaults to the optimizer's.
            epochs: The index of the last epoch, as in Keras: the iteration
                budget (scipy's `maxiter`) of a fit from epoch 0. A list of
                budgets chains solvers, the epochs counting through the chain.
                Defaults to `options["maxiter"]` if given, else 20.
            initial_epoch: The first `initial_epoch` iterations of the chain
                count as done.
            method, options, bounds, constraints, tol, pretrain_fn: Override
                the optimizer's settings for this fit (see
                `ScipyBatchOptimizer`); lists of equal length chain solvers.

        Returns:
            A `History` with one row per solver iteration: `loss`, `grad`
            (the gradient's 2-norm, as in kormos 0.1; the log's last line
            shows its largest entry, which `gtol` tests), `fg_evals`,
            `hessp_evals`, the compiled metrics and `val_*` entries.

        Raises:
            ValueError: For bad data or solver arguments, before any weight
                changes.
        """
        optimizer = self.optimizer if getattr(self, "compiled", False) else None
        if not isinstance(optimizer, BatchOptimizer):
            raise ValueError(
                "`fit_batch()` needs a model compiled with a batch optimizer, "
                "e.g. `model.compile(loss='mse', optimizer='l-bfgs-b')`."
            )
        overridden = type(self).train_step is not keras.Model.train_step
        if overridden or "train_step" in vars(self):
            _warn(
                "This model overrides `train_step`, which a full-batch solver "
                "never calls: kormos minimizes `compute_loss` (and `add_loss` "
                "terms) over all the rows. Move extra loss terms into "
                "`compute_loss` to have them minimized."
            )
        with _INTERRUPTS.deferred():
            runs = optimizer._plan(epochs, method, options, pretrain_fn)
            if validation_split and validation_data is None:
                (x, y, sample_weight), validation_data = _split_validation(
                    x, y, sample_weight, validation_split
                )
            optimizer.build(
                self, x, y, sample_weight, batch_size, class_weight, steps_per_epoch
            )
            validate = None
            if validation_data is not None:
                validate = optimizer._validation(_make_validation(
                    self, validation_data, validation_batch_size or batch_size,
                    validation_steps, optimizer.max_dataset_bytes,
                ))
            verbose = 1 if verbose == "auto" else verbose
            last_epoch = sum(run.budget for run in runs)
            callbacks, history = _make_callbacks(self, callbacks, verbose, last_epoch)
            loop = _FitLoop(self, callbacks, history, validate, validation_freq)
            solver_kwargs = {"bounds": bounds, "constraints": constraints, "tol": tol}
            return loop.run(runs, initial_epoch, solver_kwargs)

    def train_on_batch(self, *args, **kwargs):
        """`keras.Model.train_on_batch`; not for a batch optimizer (use `fit`)."""
        if isinstance(getattr(self, "optimizer", None), BatchOptimizer):
            raise RuntimeError(
                "`train_on_batch()` takes one stochastic step, which a full-batch "
                "solver does not have: call `fit(x, y, epochs=1)` for one solver "
                "iteration, or compile with a Keras optimizer such as 'adam'."
            )
        return super().train_on_batch(*args, **kwargs)

    def get_compile_config(self):
        config = super().get_compile_config()
        unsaved = [k for k in ("constraints", "pretrain_fn")
                   if getattr(self.optimizer, k, None) is not None]
        if config is not None and unsaved:  # model.save() asks for this
            _warn(
                f"The optimizer's {' and '.join(unsaved)} cannot be saved (they "
                "hold functions): pass them to `fit()` again after loading."
            )
        if config is not None and isinstance(self.optimizer, BatchOptimizer):
            config["optimizer"] = keras.saving.serialize_keras_object(self.optimizer)
            config["jit_compile"] = self.optimizer.jit_compile
        return config

    def compile_from_config(self, config):
        # keras.Model.compile_from_config skips a custom compile(); this is
        # what it does otherwise (keras/src/trainers/trainer.py): compile, then
        # create the optimizer's variables so that loading can fill them.
        self.compile(**keras.saving.deserialize_keras_object(config))
        if not isinstance(self.optimizer, BatchOptimizer) and self.built:
            self.optimizer.build(self.trainable_variables)


def _check_keras_optimizer_name(name):
    try:
        keras.optimizers.get(name)
    except ValueError:
        raise ValueError(
            f"Unknown optimizer {name!r}. Use a Keras optimizer ('adam', "
            f"'sgd', ...) or a batch solver: 'scipy' or one of "
            f"{', '.join(METHODS)}. Received: optimizer={name!r}"
        ) from None


@keras.saving.register_keras_serializable(package="kormos")
class BatchOptimizedModel(_BatchOptimizedMixin, keras.Model):
    """A `keras.Model` that trains with a full-batch solver or a Keras optimizer.

    Build it with the functional API or subclass it, exactly as `keras.Model`.
    `compile(optimizer="l-bfgs-b")` (any `scipy.optimize.minimize` method, or
    a `BatchOptimizer`) makes `fit()` run that solver on the full data;
    `compile(optimizer="adam")` makes it a plain Keras model again. The
    solver calls the model with `training=False` (Dropout off, BatchNorm's
    moving statistics used and kept), so the loss is a deterministic
    function of the weights.

    Example:

    ```python
    inputs = keras.Input(shape=(5,))
    outputs = keras.layers.Dense(1)(inputs)
    model = kormos.BatchOptimizedModel(inputs=inputs, outputs=outputs)
    model.compile(loss="mse", optimizer="l-bfgs-b")
    history = model.fit(x, y, epochs=50)
    ```
    """

    def __new__(cls, *args, **kwargs):
        # Inputs and outputs that reach keras.Model.__init__ unchanged (no
        # constructor of the subclass's own in between) make it functional.
        if cls.__init__ is keras.Model.__init__ and not issubclass(cls, _Functional):
            if _is_functional_call(args, kwargs):
                cls = _with_functional_base(cls)
        return super().__new__(cls, *args, **kwargs)


# -- Functional construction ---------------------------------------------------
# `keras.Model(inputs, outputs)` returns an instance of Keras' private
# Functional class, and `class M(keras.Model)` called with `inputs, outputs`
# becomes functional by having its base classes rewritten in place
# (keras/src/models/model.py: `functional_init_arguments`,
# `inject_functional_model_class`). That rewrite would break later
# subclassing-API use of `BatchOptimizedModel` in the same process, so kormos
# routes functional construction to a functional twin class instead.


def _is_functional_call(args, kwargs):
    """Keras' `functional_init_arguments`: called with inputs and outputs?"""
    with_outputs = "outputs" in kwargs and (len(args) == 1 or "inputs" in kwargs)
    return len(args) == 2 or with_outputs


def _functional_class():
    """Returns Keras' private Functional class without importing `keras.src`:
    `keras.Model.__new__` returns an uninitialized instance of it for
    functional arguments (building a model here would fix the dtype policy)."""
    return type(keras.Model.__new__(keras.Model, None, None))


_Functional = _functional_class()


@keras.saving.register_keras_serializable(package="kormos", name="BatchOptimizedModel")
class _FunctionalBatchOptimizedModel(BatchOptimizedModel, _Functional):
    """A functional `BatchOptimizedModel` (see the comment above)."""


_FunctionalBatchOptimizedModel.__name__ = "BatchOptimizedModel"
_FunctionalBatchOptimizedModel.__qualname__ = "BatchOptimizedModel"


def _with_functional_base(cls):
    """Returns `cls` with `BatchOptimizedModel` swapped for its functional twin
    (a user's subclass gets its bases rewritten, as Keras does to them)."""
    if cls is BatchOptimizedModel:
        return _FunctionalBatchOptimizedModel
    cls.__bases__ = tuple(
        _with_functional_base(base) if issubclass(base, BatchOptimizedModel) else base
        for base in cls.__bases__
    )
    return cls


@keras.saving.register_keras_serializable(package="kormos")
class BatchOptimizedSequentialModel(BatchOptimizedModel, keras.Sequential):
    """A `keras.Sequential` model that a full-batch solver can train.

    Everything said of `BatchOptimizedModel` holds. Example:
    `kormos.BatchOptimizedSequentialModel([keras.Input((5,)), keras.layers.Dense(1)])`.
    """


###############################################################################
# Registration and compatibility ##############################################
###############################################################################

keras.saving.register_keras_serializable(package="kormos")(BatchOptimizer)
keras.saving.register_keras_serializable(package="kormos")(ScipyBatchOptimizer)


def _compat_module(name, doc, **attrs):
    """Registers `kormos.<name>` so that `from kormos.<name> import X` works."""
    module = types.ModuleType(f"{__name__}.{name}", doc)
    module.__dict__.update(attrs)
    sys.modules[module.__name__] = module
    return module


models = _compat_module(
    "models",
    "kormos 0.1 names: kormos.models.BatchOptimizedModel, ...",
    **{c.__name__: c for c in (BatchOptimizedModel, BatchOptimizedSequentialModel)},
)
optimizers = _compat_module(
    "optimizers",
    "kormos 0.1 names: kormos.optimizers.ScipyBatchOptimizer, ...",
    **{c.__name__: c for c in (BatchOptimizer, ScipyBatchOptimizer, get)},
)
