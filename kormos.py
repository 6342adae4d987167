"""kormos: fit Keras 3 models with scipy.optimize.minimize (L-BFGS-B, Newton-CG, ...).

A model compiled with `optimizer="l-bfgs-b"` (or any other method name of
`scipy.optimize.minimize`) is trained by `model.fit()` with that deterministic
full-batch solver: every function evaluation is one pass over all the training
data, one solver iteration is one Keras epoch, and `fit()` returns the usual
`History`. Compile the same model with `"adam"` and it trains like any
`keras.Model`.

Single-file library: copy kormos.py into your project, or pip install it.
License: MIT (see LICENSE).
"""

__version__ = "0.2.0"
__all__ = [
    # Models
    "BatchOptimizedModel",
    "BatchOptimizedSequentialModel",
    # Optimizers
    "BatchOptimizer",
    "ScipyBatchOptimizer",
    "get",
    "METHODS",
    # Weight packing
    "pack_weights",
    "unpack_weights",
    # Compatibility namespaces of kormos 0.1 (kormos.models, kormos.optimizers)
    "models",
    "optimizers",
]

import collections
import contextlib
import ctypes
import functools
import inspect
import itertools
import math
import os
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np
import scipy.optimize
import tensorflow as tf
import keras

if not keras.version().startswith("3."):
    raise ImportError(
        f"kormos requires Keras 3 (TensorFlow >= 2.16). Found keras=={keras.version()}."
    )

###############################################################################
# Solver methods ##############################################################
###############################################################################

#: Every method name of `scipy.optimize.minimize`, lower case.
METHODS = (
    "l-bfgs-b",
    "bfgs",
    "cg",
    "newton-cg",
    "trust-ncg",
    "trust-krylov",
    "trust-exact",
    "dogleg",
    "trust-constr",
    "tnc",
    "slsqp",
    "nelder-mead",
    "powell",
    "cobyla",
    "cobyqa",
)
_DERIVATIVE_FREE = ("nelder-mead", "powell", "cobyla", "cobyqa")
_HESSP_METHODS = ("newton-cg", "trust-ncg", "trust-krylov", "trust-constr")
_HESS_METHODS = ("trust-exact", "dogleg")
_BOUNDS_METHODS = (
    "l-bfgs-b",
    "tnc",
    "slsqp",
    "trust-constr",
    "powell",
    "nelder-mead",
    "cobyla",
    "cobyqa",
)
_CONSTRAINT_METHODS = ("slsqp", "trust-constr", "cobyla", "cobyqa")
# Methods that hold an n x n float64 matrix: how many of them, roughly.
_DENSE_MATRICES = {"bfgs": 3, "slsqp": 3, "trust-exact": 4, "dogleg": 3}
# Methods whose `maxiter` option counts function evaluations, not iterations.
_MAXITER_COUNTS_EVALS = ("cobyla", "cobyqa")
# Methods that take no `maxiter` option at all.
_NO_MAXITER = ("tnc",)


def _canonical_method(method, argname="method"):
    """Returns the lower-case scipy method name, or raises a clear error."""
    if isinstance(method, str) and method.lower() in METHODS:
        return method.lower()
    if callable(method) and not isinstance(method, str):
        return method
    raise ValueError(
        f"`{argname}` must be a `scipy.optimize.minimize` method name (in any "
        f"case) or a custom minimizer callable. Valid names: "
        f"{', '.join(METHODS)}. Received: {argname}={method!r}"
    )


###############################################################################
# Weight packing ##############################################################
###############################################################################


def pack_weights(variables):
    """Concatenates `variables` into one flat float64 numpy vector.

    Example:

    ```python
    x = kormos.pack_weights(model.trainable_variables)
    kormos.unpack_weights(2 * x, model.trainable_variables)
    ```

    Args:
        variables: A list of Keras variables (or tensors or arrays).

    Returns:
        A 1-D `np.ndarray` of dtype float64 holding every scalar of
        `variables`, in order, each flattened in C order.
    """
    if not variables:
        return np.zeros((0,), dtype=np.float64)
    parts = [np.asarray(v.numpy() if hasattr(v, "numpy") else v) for v in variables]
    return np.concatenate([p.astype(np.float64).ravel() for p in parts])


def unpack_weights(x, variables):
    """Assigns the flat vector `x` back into `variables`, in order.

    Values are cast to each variable's dtype. Nothing is assigned unless `x`
    has exactly as many entries as `variables` hold.

    Example:

    ```python
    x = kormos.pack_weights(model.trainable_variables)
    kormos.unpack_weights(np.zeros_like(x), model.trainable_variables)
    ```

    Args:
        x: A 1-D array-like of size `sum(v.size for v in variables)`.
        variables: The list of Keras variables to assign into.

    Raises:
        ValueError: If `x` is not a vector of the right size.
    """
    x = np.asarray(x)
    n = _flat_size(variables)
    if x.ndim != 1 or x.shape[0] != n:
        raise ValueError(
            f"Expected a flat vector of size {n} (the number of scalars in "
            f"the variables). Received: x.shape={x.shape}"
        )
    offset = 0
    for v in variables:
        size = int(np.prod(v.shape))
        part = x[offset : offset + size].reshape(tuple(v.shape))
        v.assign(part.astype(keras.backend.standardize_dtype(v.dtype)))
        offset += size


def _flat_size(variables):
    """Returns the number of scalars in `variables`."""
    return int(sum(int(np.prod(v.shape)) for v in variables))


def _assign_flat(x, variables):
    """Assigns the float64 tensor `x` into `variables` (graph-friendly)."""
    sizes = [int(np.prod(v.shape)) for v in variables]
    for v, part in zip(variables, tf.split(x, sizes)):
        v.assign(tf.cast(tf.reshape(part, v.shape), v.dtype))


def _flatten_float64(tensors, variables):
    """Concatenates gradient-like `tensors` into one float64 vector.

    `None` entries (no gradient path) become zeros of the variable's shape;
    `IndexedSlices` (from Embedding) are densified.
    """
    parts = []
    for t, v in zip(tensors, variables):
        if t is None:
            t = tf.zeros(v.shape, dtype=tf.float64)
        parts.append(tf.reshape(tf.cast(tf.convert_to_tensor(t), tf.float64), [-1]))
    return tf.concat(parts, axis=0)


###############################################################################
# Training data ###############################################################
###############################################################################


class _Data:
    """The training (or validation) data of one fit, ready to loop over.

    Either `tensors` holds in-memory `(x, y, sample_weight)` tensors that are
    sliced into `batch_size` rows at a time, or `dataset` holds a batched
    `tf.data.Dataset` of `(x, y, sample_weight)` tuples.
    """

    def __init__(self, tensors=None, dataset=None, batch_size=None, size=None):
        self.tensors = tensors
        self.dataset = dataset
        self.batch_size = batch_size
        self.size = size

    @property
    def num_batches(self):
        if self.tensors is None:
            return None
        return max(1, math.ceil(self.size / self.batch_size))

    def first_batch(self, rows=2):
        """Returns a few rows of the data, for probing the model eagerly."""
        if self.tensors is not None:
            return _map_tensors(lambda t: t[:rows], self.tensors)
        for batch in self.dataset.take(1):
            return batch
        raise ValueError("The training dataset is empty: it yields no batch.")

    def distributed(self, strategy):
        """Returns this data as a dataset distributed over `strategy`'s replicas.

        Distributed datasets cannot hold `None`, so absent parts (no targets,
        no sample weights) are dropped here and put back by `with_nones`.
        """
        present = tuple(p is not None for p in self.first_batch())
        if self.dataset is None:
            parts = tuple(p for p in self.tensors if p is not None)
            dataset = tf.data.Dataset.from_tensor_slices(parts).batch(self.batch_size)
        else:
            dataset = self.dataset.map(
                lambda *p: tuple(q for q, keep in zip(p, present) if keep)
            )
        data = _Data(dataset=strategy.experimental_distribute_dataset(dataset))
        data.present = present
        return data

    def with_nones(self, parts):
        """Puts `None` back where `distributed()` dropped absent parts."""
        parts = iter(parts)
        return tuple(next(parts) if keep else None for keep in self.present)

    def as_fit_inputs(self):
        """Returns `(x, y, sample_weight)` or a dataset, as `evaluate()` takes."""
        if self.tensors is not None:
            return self.tensors
        return (self.dataset, None, None)


def _map_tensors(fn, nest):
    """Maps `fn` over the tensors of `nest`, leaving `None` entries alone."""
    return tf.nest.map_structure(lambda t: None if t is None else fn(t), nest)


def _is_dataset(x):
    return isinstance(x, tf.data.Dataset)


def _make_data(
    model,
    x,
    y,
    sample_weight,
    batch_size,
    class_weight=None,
    steps=None,
    argname="x",
):
    """Checks user data and returns a `_Data` of (x, y, sample_weight).

    Raises:
        ValueError: for empty data, mismatched lengths, string targets, a
            dataset of the wrong structure or a non-positive `batch_size`.
    """
    _check_batch_size(batch_size)
    if _is_dataset(x):
        if y is not None or sample_weight is not None:
            raise ValueError(
                "When `x` is a `tf.data.Dataset`, `y` and `sample_weight` must "
                "be None: the dataset yields `(x, y)` or `(x, y, sample_weight)`."
                f" Received: y={type(y).__name__}, "
                f"sample_weight={type(sample_weight).__name__}"
            )
        return _make_dataset_data(x, class_weight, steps, argname)
    if x is None:
        raise ValueError(f"`{argname}` is required. Received: {argname}=None")
    x, y, sample_weight, size = _array_tensors(model, x, y, sample_weight, argname)
    if class_weight is not None:
        sample_weight = _apply_class_weight(y, sample_weight, class_weight)
    return _Data(
        tensors=(x, y, sample_weight),
        batch_size=batch_size or size,
        size=size,
    )


def _array_tensors(model, x, y, sample_weight, argname):
    """Returns `(x, y, sample_weight, rows)` as tensors of checked lengths."""
    x, y, sample_weight = (
        None if part is None else _to_tensors(part, name, model.compute_dtype)
        for part, name in ((x, "x"), (y, "y"), (sample_weight, "sample_weight"))
    )
    return x, y, sample_weight, _check_lengths(x, y, sample_weight, argname)


def _check_batch_size(batch_size):
    if batch_size is not None and (
        not isinstance(batch_size, (int, np.integer))
        or isinstance(batch_size, bool)
        or batch_size <= 0
    ):
        raise ValueError(
            "`batch_size` must be a positive integer or None (all samples in "
            f"one batch). Received: batch_size={batch_size!r}"
        )


def _to_tensors(data, name, dtype):
    """Converts a nest of array-likes to tensors, rejecting string data.

    Floating-point arrays are cast to the model's compute `dtype` once here,
    rather than at every evaluation.
    """

    def convert(leaf):
        if hasattr(leaf, "to_numpy"):  # pandas
            leaf = leaf.to_numpy()
        array = leaf if tf.is_tensor(leaf) else np.asarray(leaf)
        is_text = (
            array.dtype == tf.string
            if tf.is_tensor(array)
            else array.dtype.kind in "OUS"
        )
        if is_text:
            raise ValueError(
                f"`{name}` must hold numbers; strings and objects cannot be "
                f"fed to a model. Encode them first (e.g. with "
                f"keras.layers.StringLookup). Received: {name} of dtype "
                f"{array.dtype}"
            )
        tensor = tf.convert_to_tensor(array)
        if tensor.dtype.is_floating and tensor.dtype != dtype:
            tensor = tf.cast(tensor, dtype)
        return tensor

    if isinstance(data, dict):
        return {k: convert(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)) and not _is_plain_sequence(data):
        return type(data)(convert(v) for v in data)
    return convert(data)


def _is_plain_sequence(data):
    """True for a list of numbers (one array), False for a list of arrays."""
    return len(data) > 0 and all(np.isscalar(v) for v in data)


def _check_lengths(x, y, sample_weight, argname):
    sizes = {}
    for name, part in (("x", x), ("y", y), ("sample_weight", sample_weight)):
        if part is None:
            continue
        for leaf in tf.nest.flatten(part):
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
    size = all_sizes.pop()
    if size == 0:
        raise ValueError(f"The training data is empty: `{argname}` has 0 samples.")
    return size


def _apply_class_weight(y, sample_weight, class_weight):
    """Returns sample weights that include `class_weight[label]`."""
    if y is None or len(tf.nest.flatten(y)) != 1:
        raise ValueError(
            "`class_weight` needs a single target array `y`. "
            f"Received: y={type(y).__name__}"
        )
    weights = _class_weights_for(tf.nest.flatten(y)[0], class_weight)
    if sample_weight is not None:
        weights = weights * tf.cast(tf.reshape(sample_weight, [-1]), weights.dtype)
    return weights


def _class_weights_for(labels, class_weight):
    """Maps integer or one-hot `labels` to `class_weight[label]` (in TF)."""
    if not isinstance(class_weight, dict):
        raise TypeError(
            "`class_weight` must be a dict mapping class indices to weights. "
            f"Received: class_weight={class_weight!r}"
        )
    table = np.ones(max(class_weight) + 1, dtype=np.float64)
    for label, weight in class_weight.items():
        table[int(label)] = weight
    if (
        labels.shape.rank is not None
        and labels.shape.rank > 1
        and (labels.shape[-1] is not None and labels.shape[-1] > 1)
    ):
        labels = tf.argmax(labels, axis=-1)
    labels = tf.reshape(tf.cast(tf.round(tf.cast(labels, tf.float64)), tf.int32), [-1])
    return tf.gather(tf.constant(table), labels)


def _make_dataset_data(dataset, class_weight, steps, argname):
    """Wraps a batched dataset so that it yields `(x, y, sample_weight)`."""
    spec = dataset.element_spec
    if isinstance(spec, tuple) and not 1 <= len(spec) <= 3:
        raise ValueError(
            f"A `tf.data.Dataset` passed as `{argname}` must yield `x`, "
            "`(x, y)` or `(x, y, sample_weight)` batches. Received a dataset "
            f"yielding a tuple of {len(spec)} elements: {spec}"
        )
    if steps is not None:
        dataset = dataset.take(steps)
    elif dataset.cardinality() == tf.data.INFINITE_CARDINALITY:
        raise ValueError(
            f"The dataset passed as `{argname}` is infinite (it repeats). "
            "Pass `steps_per_epoch` to say how many batches make up the full "
            "data set, or remove `.repeat()`."
        )

    def normalize(*element):
        x, y, sw = keras.utils.unpack_x_y_sample_weight(
            element if len(element) > 1 else element[0]
        )
        if class_weight is not None:
            sw = _apply_class_weight(y, sw, class_weight)
        return x, y, sw

    return _Data(dataset=dataset.map(normalize), size=None)


def _split_validation(model, x, y, sample_weight, validation_split):
    """Holds out the last `validation_split` fraction of array inputs."""
    if not 0.0 < validation_split < 1.0:
        raise ValueError(
            "`validation_split` must be a float in (0, 1). "
            f"Received: validation_split={validation_split!r}"
        )
    if _is_dataset(x):
        raise ValueError(
            "`validation_split` is only supported for array inputs, not for a "
            "`tf.data.Dataset`. Pass `validation_data` instead."
        )
    x, y, sw, size = _array_tensors(model, x, y, sample_weight, "x")
    split = int(math.floor(size * (1.0 - validation_split)))
    if split == 0 or split == size:
        raise ValueError(
            f"`validation_split={validation_split}` leaves no training or no "
            f"validation samples out of {size}."
        )

    train = _map_tensors(lambda t: t[:split], (x, y, sw))
    val = _map_tensors(lambda t: t[split:], (x, y, sw))
    return train, val


def _align_targets(y, y_pred):
    """Aligns `y` to `y_pred` the way Keras 2 did, or raises.

    A target two or more dimensions short of the output gets the output's
    trailing unit dimensions (y of shape (n,) against an output (n, 1, 1)
    becomes (n, 1, 1)), so that the loss never broadcasts to (n, 1, n); Keras
    handles a gap of one itself. A target whose dimension would broadcast
    against a unit output dimension is an error.
    """
    if y is None or tf.nest.is_nested(y) != tf.nest.is_nested(y_pred):
        return y
    if tf.nest.is_nested(y):
        try:
            tf.nest.assert_same_structure(y, y_pred, check_types=False)
        except (ValueError, TypeError):
            return y
        return tf.nest.map_structure(_align_target, y, y_pred, check_types=False)
    return _align_target(y, y_pred)


def _align_target(y, y_pred):
    y_rank, p_shape = y.shape.rank, y_pred.shape
    if y_rank is None or p_shape.rank is None:
        return y
    # Keras itself handles a rank gap of one (y (n,) against (n, 1)), and
    # reshaping there would retrace evaluate() for no gain.
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
# Loss, gradient and Hessian-vector-product functions ########################
###############################################################################


def _batch_size_of(x):
    """Returns the number of rows of the first input leaf, as float64."""
    return tf.cast(tf.shape(tf.nest.flatten(x)[0])[0], tf.float64)


def _loop_over_batches(data, tensors, step, state):
    """Folds `step(batch, state)` over every batch of `data` (in a graph).

    In-memory `tensors` (`data.tensors` as passed to the compiled function)
    are sliced inside a `tf.range` loop, a dataset is iterated; either way
    the whole pass is part of one compiled function.
    """
    if tensors is None:
        for batch in data.dataset:
            state = step(batch, state)
        return state
    if data.num_batches == 1:
        return step(tensors, state)
    size, rows = data.size, data.batch_size
    for i in tf.range(data.num_batches):
        start = i * rows
        end = tf.minimum(start + rows, size)
        batch = _map_tensors(lambda t, a=start, b=end: t[a:b], tensors)
        state = step(batch, state)
    return state


def _data_leaves(data):
    """Returns the in-memory tensors of `data` as a flat tuple (or `()`)."""
    if data.tensors is None:
        return ()
    return tuple(t for t in tf.nest.flatten(data.tensors) if t is not None)


def _with_leaves(data, leaves):
    """Rebuilds `data.tensors` from `_data_leaves` (graph tensors), or None."""
    if data.tensors is None:
        return None
    leaves = iter(leaves)
    return _map_tensors(lambda t: next(leaves), data.tensors)


class _Objective:
    """Compiled loss/gradient and Hessian-vector-product functions of a model.

    `fg(x)` assigns the float64 vector `x` to the trainable variables, runs
    over every batch of the data and returns the mean loss (compiled loss with
    `loss_weights` and sample weights, plus regularization losses, exactly as
    `evaluate()` reports it), its flat float64 gradient, and the compiled
    metrics on the full data. `hessp(x, v)` likewise returns H(x) @ v, by
    reverse-over-reverse differentiation (it works for every layer).

    Under a `tf.distribute` strategy with several replicas, every batch is
    split across the replicas with `strategy.run` and the per-replica sums are
    reduced; Keras' 1/replicas scaling of the loss in a replica is undone, and
    weight regularization is added once.
    """

    def __init__(self, model, data, xla=False, xla_optional=False):
        self.model = model
        self.variables = list(model.trainable_variables)
        self.sizes = [int(np.prod(v.shape)) for v in self.variables]
        self.size = sum(self.sizes)
        self.unused_variables = []
        self.strategy = model.distribute_strategy
        self.replicas = self.strategy.num_replicas_in_sync
        self.data = data if self.replicas == 1 else data.distributed(self.strategy)
        # In-memory data enters the compiled functions as arguments, so that a
        # later fit() on data of the same shapes reuses them (see `rebind`).
        self.leaves = _data_leaves(self.data)
        self._loss_takes_training = (
            "training" in inspect.signature(model.compute_loss).parameters
        )
        # Without compiled metrics, skip resetting, updating and reading them.
        self.has_metrics = any(m.name != "loss" for m in model.metrics)
        self.xla = xla
        self._fg_call = self._compile(self._fg, self._batch_fg_terms, xla, xla_optional)
        self._hessp_call = self._compile(
            self._hessp, self._batch_hessp_terms, xla, xla_optional
        )
        if xla_optional and not xla and self._all_float64():
            # float64 HVPs: XLA is 1.1-1.3x faster on some dense models and
            # slower on others, and agrees to roundoff; measure once.
            self._hessp_call = _FasterCall(
                self._hessp_call,
                self._compile(self._hessp, self._batch_hessp_terms, True, False),
            )
        self.assign = _ConcreteCall(
            tf.function(lambda x: _assign_flat(x, self.variables))
        )

    def _compile(self, whole_pass, batch_terms, xla, xla_optional):
        """Returns `whole_pass` as a `_ConcreteCall`, compiled with XLA or not.

        With XLA, a pass over one in-memory batch is compiled whole; a pass
        that loops (over slices or a dataset) compiles only its batch step,
        as a nested function. With `xla_optional`, a model that XLA cannot
        compile falls back to the plain graph.
        """

        def compiled(terms, jit_compile=False):
            # A closure, not functools.partial: tf.function would bind the
            # partial's keyword at every call (0.3 ms).
            def run(*tensors):
                return whole_pass(*tensors, batch_terms=terms)

            return tf.function(run, jit_compile=jit_compile)

        if not xla:
            return _ConcreteCall(compiled(batch_terms))
        if self.data.tensors is not None and self.data.num_batches == 1:
            with_xla = compiled(batch_terms, jit_compile=True)
        else:
            with_xla = compiled(tf.function(batch_terms, jit_compile=True))
        fallback = compiled(batch_terms) if xla_optional else None
        return _ConcreteCall(with_xla, fallback=fallback)

    def fg(self, x):
        """Returns `(loss, gradient, metrics)` at the float64 tensor `x`."""
        return self._fg_call(x, *self.leaves)

    def hessp(self, x, v):
        """Returns H(x) @ v for float64 tensors `x` and `v`."""
        return self._hessp_call(x, v, *self.leaves)

    @property
    def fg_uses_xla(self):
        """Whether `fg` runs with XLA (it may have fallen back)."""
        return self.xla and not self._fg_call.fell_back

    @property
    def hessp_uses_xla(self):
        """Whether `hessp` runs with XLA (fallen back, or chosen by timing)."""
        if isinstance(self._hessp_call, _FasterCall):
            return self._hessp_call.chose_alternative
        return self.xla and not self._hessp_call.fell_back

    def _all_float64(self):
        return all(v.dtype == "float64" for v in self.variables)

    def rebind(self, data):
        """Points the compiled functions at new data of the same structure."""
        self.data = data
        self.leaves = _data_leaves(data)

    # -- One batch (or one replica's share of it) -------------------------

    def _data_loss(self, x, y, sample_weight):
        """Returns `(rows, rows * loss, y, y_pred)` on one batch, Dropout off."""
        y_pred = self.model(x, training=False)
        y = _align_targets(y, y_pred)
        kwargs = {"training": False} if self._loss_takes_training else {}
        loss = self.model.compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, **kwargs
        )
        if self.replicas > 1:
            # In a replica, Keras scales the whole loss by 1/replicas.
            loss = loss * self.replicas - _weight_regularization(self.model)
        rows = _batch_size_of(x)
        return rows, rows * tf.cast(loss, tf.float64), y, y_pred

    def _batch_fg_terms(self, x, y, sample_weight):
        with tf.GradientTape() as tape:
            rows, f, y, y_pred = self._data_loss(x, y, sample_weight)
        grads = tape.gradient(f, self.variables)
        self.unused_variables = [
            v.path for v, g in zip(self.variables, grads) if g is None
        ]
        if self.has_metrics:
            self.model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        return rows, f, _flatten_float64(grads, self.variables)

    def _batch_hessp_terms(self, x, y, sample_weight, vs):
        def rows_times_loss():
            return self._data_loss(x, y, sample_weight)[1]

        return _batch_size_of(x), self._hessian_times(rows_times_loss, vs)

    def _hessian_times(self, value_fn, vs):
        """Returns H @ v of the scalar `value_fn()`, by reverse-over-reverse."""
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                value = value_fn()
            gv = _dot(inner.gradient(value, self.variables), vs)
        return _flatten_float64(outer.gradient(gv, self.variables), self.variables)

    def _sum_over_replicas(self, fn, batch, *args):
        """Runs `fn` on a batch: directly, or split over replicas and summed."""
        if self.replicas == 1:
            return fn(*batch, *args)

        def replica_fn(*parts):
            return fn(*self.data.with_nones(parts), *args)

        per_replica = self.strategy.run(replica_fn, args=tuple(batch))
        # One reduction per term: MultiWorkerMirroredStrategy packs a nested
        # reduction into one tensor, which fails for terms of different shapes.
        return tuple(
            self.strategy.reduce(tf.distribute.ReduceOp.SUM, term, axis=None)
            for term in per_replica
        )

    # -- Whole passes -------------------------------------------------------

    def _fg(self, x, *leaves, batch_terms):
        _assign_flat(x, self.variables)
        if self.has_metrics:
            self.model.reset_metrics()
        zero = tf.constant(0.0, tf.float64)
        state = (zero, zero, tf.zeros([self.size], tf.float64))

        def step(batch, state):
            terms = self._sum_over_replicas(batch_terms, batch)
            return tuple(s + t for s, t in zip(state, terms))

        tensors = _with_leaves(self.data, leaves)
        rows, f, g = _loop_over_batches(self.data, tensors, step, state)
        f, g = f / rows, g / rows
        if self.replicas > 1:
            with tf.GradientTape() as tape:
                reg = tf.cast(_weight_regularization(self.model), tf.float64)
            f = f + reg
            g = g + _flatten_float64(tape.gradient(reg, self.variables), self.variables)
        metrics = {}
        if self.has_metrics:
            metrics = {
                k: tf.cast(v, tf.float64)
                for k, v in self.model.get_metrics_result().items()
                if k != "loss"
            }
        return f, g, metrics

    def _hessp(self, x, v, *leaves, batch_terms):
        _assign_flat(x, self.variables)
        vs = [
            tf.cast(tf.reshape(p, w.shape), w.dtype)
            for p, w in zip(tf.split(v, self.sizes), self.variables)
        ]
        zero = tf.constant(0.0, tf.float64)
        state = (zero, tf.zeros([self.size], tf.float64))

        def step(batch, state):
            terms = self._sum_over_replicas(batch_terms, batch, vs)
            return tuple(s + t for s, t in zip(state, terms))

        tensors = _with_leaves(self.data, leaves)
        rows, hv = _loop_over_batches(self.data, tensors, step, state)
        hv = hv / rows
        if self.replicas > 1:
            regularization = functools.partial(_weight_regularization, self.model)
            hv = hv + self._hessian_times(regularization, vs)
        return hv


class _ConcreteCall:
    """Calls a `tf.function` through the one concrete function it traces.

    kormos calls its functions with float64 vectors of one fixed size, so
    after the first call the concrete function is called directly, skipping
    tf.function's argument binding and trace lookup (about 0.1 ms a call,
    15-20% of a small model's evaluation). If the first call fails and a
    `fallback` function is given, the fallback is used from then on.
    """

    def __init__(self, function, fallback=None):
        self.function = function
        self.fallback = fallback
        self.fell_back = False
        self.concrete = None

    def __call__(self, *args):
        if self.concrete is not None:
            return self.concrete(*args)
        try:
            self.concrete = self.function.get_concrete_function(*args)
            return self.concrete(*args)
        except Exception:
            # XLA rejects some ops only when it compiles, at the first call.
            if self.fallback is None:
                self.concrete = None
                raise
        self.function, self.fallback, self.fell_back = self.fallback, None, True
        self.concrete = self.function.get_concrete_function(*args)
        return self.concrete(*args)


class _FasterCall:
    """Calls `reference`, or `alternative` where one measurement finds it faster.

    The first call returns the reference's result. If a second, timed run of
    the reference took at least `min_seconds`, the alternative is run at the
    same arguments (its first run may compile), then both are timed in
    `rounds` interleaved rounds; the alternative is kept only if it runs,
    agrees with the reference to `rtol` and its best time beats the
    reference's best by `margin`. Both compute the same quantity, so the
    choice changes results at roundoff level only.
    """

    def __init__(self, reference, alternative, min_seconds=0.01, margin=0.1):
        self.reference = reference
        self.alternative = alternative
        self.min_seconds = min_seconds
        self.margin = margin
        self.rounds = 3
        self.rtol = 1e-8
        self.chosen = None

    @property
    def chose_alternative(self):
        return self.chosen is self.alternative

    def __call__(self, *args):
        if self.chosen is not None:
            return self.chosen(*args)
        result = self.reference(*args)
        self.chosen = self.reference
        (seconds,) = _best_seconds([self.reference], args, rounds=1)
        if seconds >= self.min_seconds and self._alternative_wins(args, result):
            self.chosen = self.alternative
        return result

    def _alternative_wins(self, args, expected):
        try:
            got = self.alternative(*args).numpy()
        except Exception:  # e.g. an op that XLA cannot compile
            return False
        expected = expected.numpy()
        scale = np.max(np.abs(expected), initial=0.0)
        if not np.allclose(got, expected, rtol=self.rtol, atol=self.rtol * scale):
            return False
        reference, alternative = _best_seconds(
            [self.reference, self.alternative], args, self.rounds
        )
        return alternative <= (1.0 - self.margin) * reference


def _best_seconds(functions, args, rounds):
    """Returns each function's fastest call, timed in interleaved rounds."""
    best = [float("inf")] * len(functions)
    for _ in range(rounds):
        for i, function in enumerate(functions):
            start = time.perf_counter()
            function(*args).numpy()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def _dot(grads, vectors):
    """Returns sum(g * v) over a list of gradients, `None` counting as zero."""
    terms = [
        tf.reduce_sum(tf.convert_to_tensor(g) * tf.cast(v, g.dtype))
        for g, v in zip(grads, vectors)
        if g is not None
    ]
    return tf.add_n(terms) if terms else tf.constant(0.0)


def _weight_regularization(model):
    """Returns the sum of the weight regularization losses of `model`."""
    terms = [
        tf.cast(v.regularizer(v), tf.float64)
        for v in model.trainable_weights
        if getattr(v, "regularizer", None) is not None
    ]
    return tf.add_n(terms) if terms else tf.constant(0.0, tf.float64)


###############################################################################
# Batch optimizers ############################################################
###############################################################################


# `OptimizeResult.status` of runs that kormos ended (99 is scipy's own code
# for a callback that raised StopIteration).
_STATUS_BUDGET_USED = 1
_STATUS_INTERRUPTED = 97
_STATUS_NOT_FINITE = 98
_STATUS_STOPPED = 99


class _StopSolver(Exception):
    """Raised inside the scipy callback to end the solver cleanly."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


class BatchOptimizer:
    """Binds a model and its full training data into a scipy-shaped objective.

    A `BatchOptimizer` turns a compiled Keras model and its training data into
    the callables that `scipy.optimize.minimize` takes, over the flat float64
    vector of the model's trainable weights:

    - `func_and_grad(x) -> (float, np.ndarray)`, `func(x)`, `grad(x)`;
    - `hessp(x, v) -> np.ndarray`, the exact Hessian-vector product;
    - `hess(x)`, the dense Hessian (small models only).

    Each evaluation is ONE compiled TensorFlow call that assigns `x`, loops
    over every mini-batch, and accumulates the mean loss and its derivatives
    in float64. Values at the last few `x` are cached, so `fg` and `hessp` at
    the same point are never computed twice. Subclasses implement
    `minimize()`; see `ScipyBatchOptimizer`.

    Example:

    ```python
    opt = kormos.ScipyBatchOptimizer()
    opt.build(model, x_train, y_train)  # model compiled with any loss
    f, g = opt.func_and_grad(opt.get_weights())
    ```

    Args:
        name: Name of the optimizer. Defaults to `"batch_optimizer"`.
        max_cache_entries: How many evaluated points to remember.
            Defaults to `16`.
    """

    def __init__(self, name="batch_optimizer", max_cache_entries=16):
        self.name = name
        self.max_cache_entries = max_cache_entries
        # Keras' evaluate()/predict() build `model.optimizer` unless it is
        # built; a batch optimizer has no slot variables to build.
        self.built = True
        self.results = []
        self.model = None
        self._objective = None
        self._objective_key = None
        self._reset_counters()

    def _reset_counters(self):
        self.fg_evals = 0
        self.hessp_evals = 0
        self._cache = collections.OrderedDict()
        self._assigned = None  # x.tobytes() of the point last written, if known

    # -- Binding ---------------------------------------------------------------

    def build(self, model, x=None, y=None, sample_weight=None, batch_size=None):
        """Binds `model` and its training data to this optimizer.

        `model.fit()` does this itself; call it to use `func_and_grad`,
        `hessp` etc. directly.

        Args:
            model: A compiled Keras model.
            x: Inputs, as `fit()` takes them (arrays, a dict or list of
                arrays, or a `tf.data.Dataset` of `(x, y[, sample_weight])`).
            y: Targets, unless `x` is a dataset.
            sample_weight: Optional per-sample weights.
            batch_size: Rows per mini-batch; `None` puts all rows in one.

        Returns:
            This optimizer.
        """
        data = _make_data(model, x, y, sample_weight, batch_size)
        return self._bind(model, data)

    def _bind(self, model, data):
        """Binds `model` and an already checked `_Data`."""
        _probe_model(model, data)  # also builds a subclassed model
        if not model.trainable_variables:
            raise ValueError(
                "The model has no trainable weights to optimize: make sure "
                "some of its layers are trainable."
            )
        self.model = model
        xla, optional = _xla_choice(model)
        key = _objective_key(model, data, xla)
        if key is not None and key == self._objective_key:
            self._objective.rebind(data)  # no new tracing or XLA compilation
        else:
            self._objective = _Objective(model, data, xla=xla, xla_optional=optional)
            self._objective_key = key
        self._reset_counters()
        return self

    def _require_built(self):
        if self._objective is None:
            raise RuntimeError(
                "This optimizer is not bound to a model and data yet. Call "
                "`model.fit(...)` or `optimizer.build(model, x, y)` first."
            )

    # -- The flat parameter vector -----------------------------------------

    @property
    def variables(self):
        """The trainable variables that the flat vector maps to."""
        self._require_built()
        return self._objective.variables

    def get_weights(self):
        """Returns the trainable weights as one flat float64 vector."""
        return pack_weights(self.variables)

    def set_weights(self, x):
        """Assigns the flat vector `x` to the trainable weights."""
        self._require_built()
        x = _as_flat_float64(x, self._objective.size)
        self._objective.assign(tf.constant(x))
        self._assigned = x.tobytes()

    def _ensure_weights(self, x):
        """Assigns `x` unless this optimizer's last write was `x` itself."""
        if np.asarray(x, np.float64).tobytes() != self._assigned:
            self.set_weights(x)

    # -- Objective ----------------------------------------------------------

    def func_and_grad(self, x):
        """Returns the full-data loss and its gradient at `x`.

        Args:
            x: Flat float64 parameter vector.

        Returns:
            A tuple `(loss, gradient)`: a Python float and a float64 vector.

        Raises:
            FloatingPointError: If the loss or the gradient is not finite.
        """
        f, g, _ = self._evaluate(x)
        return f, g

    def func(self, x):
        """Returns the full-data loss at `x` (a Python float)."""
        return self._evaluate(x)[0]

    def grad(self, x):
        """Returns the gradient of the full-data loss at `x`."""
        return self._evaluate(x)[1]

    def metrics_at(self, x):
        """Returns the compiled metrics on the training data at `x` (a dict)."""
        return self._evaluate(x)[2]

    def hessp(self, x, v):
        """Returns the exact Hessian-vector product H(x) @ v.

        Args:
            x: Flat float64 parameter vector.
            v: Vector of the same size.

        Returns:
            A float64 vector.
        """
        self._require_built()
        n = self._objective.size
        x, v = _as_flat_float64(x, n), _as_flat_float64(v, n, "v")
        key = _PointKey("hessp", x, v)
        if key not in self._cache:
            self.hessp_evals += 1
            hv = self._objective.hessp(tf.constant(x), tf.constant(v)).numpy()
            self._assigned = key.point
            self._remember(key, hv)
        return self._cache[key]

    def hess(self, x):
        """Returns the dense Hessian at `x`, one Hessian-vector product a column.

        Use it only for small models: it costs `n` passes over the data and
        `8 * n**2` bytes.
        """
        self._require_built()
        n = self._objective.size
        columns = [self.hessp(x, np.eye(1, n, i).ravel()) for i in range(n)]
        h = np.stack(columns, axis=1)
        return 0.5 * (h + h.T)

    def _evaluate(self, x):
        self._require_built()
        x = _as_flat_float64(x, self._objective.size)
        key = _PointKey("fg", x)
        if key not in self._cache:
            self.fg_evals += 1
            f, g, metrics = self._objective.fg(tf.constant(x))
            self._assigned = key.point
            value = (
                float(f),
                g.numpy(),
                {k: float(v) for k, v in metrics.items()},
            )
            self._remember(key, value)
            _warn_unused_variables(self._objective)
        f, g, metrics = self._cache[key]
        if not (np.isfinite(f) and np.all(np.isfinite(g))):
            what = "loss" if not np.isfinite(f) else "gradient"
            raise FloatingPointError(
                f"The {what} is not finite (loss={f}) at the current weights."
            )
        return self._cache[key]

    def _cached_fg(self, x):
        """Returns `(loss, gradient)` at `x`, or `(nan, None)` if not finite."""
        try:
            return self.func_and_grad(x)
        except FloatingPointError:
            return float("nan"), None

    def _remember(self, key, value):
        self._cache[key] = value
        while len(self._cache) > self.max_cache_entries:
            self._cache.popitem(last=False)

    # -- Solver ---------------------------------------------------------------

    def minimize(self, epochs=20, callback=None, **kwargs):
        """Minimizes the bound objective; subclasses implement it.

        Args:
            epochs: The iteration budget.
            callback: Called as `callback(x)` after each iteration with a
                copy of the iterate; returning `True` stops the solver.
            **kwargs: Solver-specific arguments.

        Returns:
            A `scipy.optimize.OptimizeResult`.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement `minimize()`.")

    def get_config(self):
        """Returns the constructor arguments, as Keras objects do."""
        return {"name": self.name, "max_cache_entries": self.max_cache_entries}

    @classmethod
    def from_config(cls, config):
        """Creates an optimizer from `get_config()` output."""
        return cls(**config)

    def __repr__(self):
        return f"{type(self).__name__}({self.get_config()})"


def _objective_key(model, data, xla):
    """Returns what the compiled functions of an `_Objective` depend on.

    Two binds with equal keys can share the traced (and XLA-compiled)
    functions, as Keras reuses its train function across `fit()` calls:
    the same model, compile() call and trainable variables, and in-memory
    data of the same structure, shapes, dtypes and batch size. Datasets and
    distributed models are traced for each bind (key `None`).
    """
    if data.tensors is None or model.distribute_strategy.num_replicas_in_sync > 1:
        return None
    specs = _map_tensors(lambda t: (tuple(t.shape), t.dtype.name), data.tensors)
    return (
        id(model),
        getattr(model, "_kormos_compile_id", None),
        tuple(id(v) for v in model.trainable_variables),
        xla,
        data.batch_size,
        repr(specs),
    )


class _PointKey:
    """A cache key for an evaluation at float64 vectors, cheap to hash.

    Hashing every byte of a 50,000-weight vector costs 0.1 ms, more than a
    small model's evaluation; the hash covers a sample of at most 64 entries
    of each vector, while equality still compares every byte.
    """

    __slots__ = ("parts", "_hash")

    def __init__(self, kind, *vectors):
        self.parts = (kind,) + tuple(v.tobytes() for v in vectors)
        sample = tuple(v[:: max(1, v.size // 64)].tobytes() for v in vectors)
        self._hash = hash((kind,) + sample)

    @property
    def point(self):
        """The bytes of the point `x` (the first vector)."""
        return self.parts[1]

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return isinstance(other, _PointKey) and self.parts == other.parts


def _as_flat_float64(x, n, argname="x"):
    """Returns `x` as a float64 vector of size `n`, or raises."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1 or x.shape[0] != n:
        raise ValueError(
            f"Expected a flat vector of size {n}. Received: {argname}.shape={x.shape}"
        )
    return x


def _xla_choice(model):
    """Returns `(xla, optional)`: compile the batch step with XLA, and may
    kormos fall back to a plain graph if XLA cannot compile the model.

    `compile(jit_compile=True)` asks for XLA (errors propagate) and
    `jit_compile=False` forbids it. For `"auto"`, Keras turns XLA off on
    CPUs and on for GPUs where the layers support it; kormos keeps that,
    except that on CPUs it compiles models with an `Embedding` layer: XLA
    runs their gather/scatter about 8x faster than TensorFlow's CPU kernels
    (matrix factorization in benchmarks/bench.py), while it makes a float32
    MLP 1.3-1.6x slower.
    """
    if model.jit_compile:
        return True, False
    request = getattr(model, "_kormos_jit_compile", "auto")
    auto = request == "auto" and not model.run_eagerly
    if not auto or model.distribute_strategy.num_replicas_in_sync > 1:
        return False, False
    layers = _all_layers(model)
    if not all(getattr(layer, "supports_jit", True) for layer in layers):
        return False, False
    embedding = any(isinstance(layer, keras.layers.Embedding) for layer in layers)
    return embedding, True


def _all_layers(model):
    """Returns every layer nested in `model`, custom layers' sublayers too.

    Keras 3 has no public recursive walk (`model.layers` lists only the top
    level), so this uses the private `_flatten_layers`.
    """
    return list(model._flatten_layers(include_self=False))


def _probe_model(model, data):
    """Runs the loss once eagerly on two rows to build the model and metrics.

    Keras creates metric variables lazily; creating them eagerly here keeps
    tf.function from tracing variable creation. It also checks that the model
    has a loss.
    """
    x, y, sw = data.first_batch()
    y_pred = model(x, training=False)
    y = _align_targets(y, y_pred)
    try:
        loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sw)
    except ValueError as e:
        if "No loss to compute" not in str(e):
            raise
        raise ValueError(
            "The model has no loss: pass `loss=` to `compile()` or override "
            "`compute_loss`."
        ) from None
    if loss is None:
        raise ValueError("`compute_loss` returned None; it must return a scalar.")
    model.compute_metrics(x, y, y_pred, sample_weight=sw)
    model.reset_metrics()


def _warn(message):
    """Issues a `UserWarning` attributed to the caller's own code.

    The warning points at the first frame outside kormos, Keras and
    TensorFlow (usually the user's `fit()` call), however deep in kormos it
    was raised.
    """
    frame, level = sys._getframe(1), 2
    while frame is not None and _is_library_frame(frame):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


def _is_library_frame(frame):
    filename = frame.f_code.co_filename
    return filename == __file__ or any(
        f"{os.sep}{package}{os.sep}" in filename for package in ("keras", "tensorflow")
    )


def _warn_unused_variables(objective):
    if objective.unused_variables:
        _warn(
            "These trainable weights have no gradient path to the loss and "
            f"stay fixed: {objective.unused_variables}",
        )
        objective.unused_variables = []


class ScipyBatchOptimizer(BatchOptimizer):
    """Trains a model with `scipy.optimize.minimize` on the full data.

    Every method of `scipy.optimize.minimize` works: gradient methods
    (`"L-BFGS-B"`, `"BFGS"`, `"CG"`, `"TNC"`, `"SLSQP"`) get the exact
    gradient, `"Newton-CG"`, `"trust-ncg"`, `"trust-krylov"` and
    `"trust-constr"` also get exact Hessian-vector products, `"trust-exact"`
    and `"dogleg"` the dense Hessian (small models), and derivative-free
    methods (`"Nelder-Mead"`, `"Powell"`, `"COBYLA"`, `"COBYQA"`) the loss.
    After `fit()`, `results` holds one `scipy.optimize.OptimizeResult` per
    solver run.

    Example:

    ```python
    model.compile(loss="mse", optimizer=kormos.ScipyBatchOptimizer(
        method="L-BFGS-B", options={"gtol": 1e-10}))
    history = model.fit(x, y, epochs=100)
    print(model.optimizer.results[-1].message)
    ```

    Args:
        method: A `scipy.optimize.minimize` method name, in any case, or a
            custom minimizer callable `(fun, x0, args, **kwargs)` returning an
            `OptimizeResult`. Defaults to `"L-BFGS-B"`.
        options: Dict passed to `scipy.optimize.minimize(options=...)`; see
            `scipy.optimize.show_options("minimize", method)`. `fit(epochs=)`
            sets `maxiter`. Defaults to `None`.
        bounds: Bounds on the weights, for the methods that take them: a
            `scipy.optimize.Bounds`, a sequence of `(low, high)` pairs over
            the flat vector, or a dict mapping a variable path or path suffix
            (e.g. `"dense/kernel"`) to `(low, high)`. Keras box constraints
            (`keras.constraints.NonNeg`) are added automatically.
            Defaults to `None`.
        constraints: `scipy.optimize` constraints over the flat vector, for
            `"SLSQP"`, `"trust-constr"`, `"COBYLA"` and `"COBYQA"`.
            Defaults to `None`.
        tol: Tolerance passed to `scipy.optimize.minimize`. Defaults to `None`.
        max_dense_params: Largest number of weights for which a method that
            keeps dense n x n matrices (`"BFGS"`, `"SLSQP"`, `"trust-exact"`,
            `"dogleg"`) is allowed. Defaults to `2000` (about 0.1 GB; one
            BFGS update of scipy then takes about a second on 2 CPU cores).
        **kwargs: `name` and `max_cache_entries`, see `BatchOptimizer`.
    """

    def __init__(
        self,
        method="L-BFGS-B",
        options=None,
        bounds=None,
        constraints=None,
        tol=None,
        max_dense_params=2000,
        **kwargs,
    ):
        kwargs.setdefault("name", "scipy_batch_optimizer")
        super().__init__(**kwargs)
        self.method = _canonical_method(method)
        self.options = _check_options(options)
        self.bounds = bounds
        self.constraints = constraints
        self.tol = tol
        self.max_dense_params = max_dense_params

    def minimize(
        self,
        epochs=20,
        callback=None,
        method=None,
        options=None,
        bounds=None,
        constraints=None,
        tol=None,
    ):
        """Runs the solver from the current weights and leaves the best ones.

        Arguments left `None` take this optimizer's own settings. The model
        ends at the solver's answer, or at the last iterate that the solver
        accepted if it was stopped (by `callback`, by a non-finite loss or
        by Ctrl-C).

        Args:
            epochs: The iteration budget, passed as `options["maxiter"]`. TNC
                has no `maxiter` and COBYLA/COBYQA count function evaluations
                with it, so for these kormos counts the iterations itself.
            callback: `callback(x) -> bool`, called after each iteration with
                a copy of the iterate; returning `True` stops the solver.
            method, options, bounds, constraints, tol: As in the constructor.

        Returns:
            The `scipy.optimize.OptimizeResult`, also appended to `results`.

        Raises:
            ValueError: For arguments the method cannot take, or a loss that
                is not finite at the starting weights.
        """
        self._require_built()
        run = self._plan(epochs, method, options, bounds, constraints, tol)
        x0 = self.get_weights()
        self._check_start(x0)
        tracker = _IterationTracker(x0, epochs, callback, run["method"])
        self._assigned = None  # pretrain_fn or the user may have set weights
        dense = run["method"] in _DENSE_MATRICES
        try:
            with contextlib.nullcontext() if dense else _one_blas_thread():
                result = scipy.optimize.minimize(
                    x0=x0, callback=tracker.scipy_callback, **run
                )
        except _StopSolver as stop:
            result = tracker.result(self, stop.status, stop.message)
        except FloatingPointError as error:
            message = f"Stopped: {error} The last finite iterate is kept."
            _warn(message)
            result = tracker.result(self, _STATUS_NOT_FINITE, message)
        except KeyboardInterrupt:
            result = tracker.result(
                self,
                _STATUS_INTERRUPTED,
                "Interrupted by KeyboardInterrupt; the last accepted iterate is kept.",
            )
        except BaseException:
            self.set_weights(tracker.last_x)
            raise
        else:
            tracker.log_final(result.x)  # the callback sets these weights itself
            _note_float32_stall(result, self.variables)
        self.set_weights(result.x)
        self.results.append(result)
        return result

    def _plan(self, epochs, method, options, bounds, constraints, tol):
        """Checks the arguments and returns the `scipy.optimize.minimize` kwargs."""
        if not isinstance(epochs, (int, np.integer)) or epochs <= 0:
            raise ValueError(
                "`epochs` (the iteration budget) must be a positive integer. "
                f"Received: epochs={epochs!r}"
            )
        method = _canonical_method(method if method is not None else self.method)
        options = dict(
            _check_options(options if options is not None else self.options) or {}
        )
        name = method if isinstance(method, str) else "custom"
        if name not in _NO_MAXITER + _MAXITER_COUNTS_EVALS:
            options["maxiter"] = min(int(options.get("maxiter", epochs)), epochs)
        n = self._objective.size
        _check_dense_size(name, n, self.max_dense_params)
        run = {
            "method": method,
            "options": options,
            "tol": tol if tol is not None else self.tol,
        }
        run["bounds"] = _resolve_bounds(
            bounds if bounds is not None else self.bounds, self.variables, name
        )
        constraints = constraints if constraints is not None else self.constraints
        if constraints:
            if name not in _CONSTRAINT_METHODS + ("custom",):
                raise ValueError(
                    f"Method {name!r} ignores `constraints`; use one of "
                    f"{', '.join(_CONSTRAINT_METHODS)}. Received: "
                    f"constraints={constraints!r}"
                )
            run["constraints"] = constraints
        if name in _DERIVATIVE_FREE:
            run["fun"] = self.func
        else:
            run["fun"], run["jac"] = self.func_and_grad, True
        if name in _HESSP_METHODS + ("custom",):
            run["hessp"] = self.hessp
        if name in _HESS_METHODS:
            run["hess"] = self.hess
        return run

    def _check_start(self, x0):
        try:
            self.func_and_grad(x0)
        except FloatingPointError as error:
            raise ValueError(
                f"{error} The solver cannot start from non-finite values: "
                "check the data for NaN/Inf and the initial weights."
            ) from None

    def get_config(self):
        """Returns the constructor arguments except `bounds` and `constraints`.

        A custom minimizer (a callable `method`) is saved by its registered
        Keras name: decorate it with `keras.saving.register_keras_serializable()`
        or pass it in `custom_objects` when loading.
        """
        config = super().get_config()
        method = self.method
        if callable(method):
            method = keras.saving.serialize_keras_object(method)
        config.update(
            {
                "method": method,
                "options": self.options,
                "tol": self.tol,
                "max_dense_params": self.max_dense_params,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        """Creates an optimizer from `get_config()` output."""
        config = dict(config)
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


@contextlib.contextmanager
def _one_blas_thread():
    """Runs the block with numpy's and scipy's OpenBLAS on one thread.

    The solver's own vector arithmetic is small; a second BLAS thread only
    competes with TensorFlow for the cores (measured: L-BFGS-B's step on
    51,670 weights took 99 ms with 2 BLAS threads, 3.5 ms with 1). The
    setting is thread-local and restored afterwards.
    """
    previous = [(setter, setter(1)) for setter in _openblas_thread_setters()]
    try:
        yield
    finally:
        for setter, threads in previous:
            setter(threads)


@functools.cache
def _openblas_thread_setters():
    """Returns `openblas_set_num_threads_local` of numpy's and scipy's OpenBLAS.

    pip wheels of numpy and scipy bundle OpenBLAS in `<package>.libs/`; where
    there is none (e.g. Accelerate on macOS) the list is empty.
    """
    setters = []
    for package in (np, scipy):
        libs = Path(package.__file__).parent.parent / f"{package.__name__}.libs"
        for path in sorted(libs.glob("*openblas*")):
            try:
                setter = ctypes.CDLL(str(path)).openblas_set_num_threads_local
            except (OSError, AttributeError):
                continue
            setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
            setters.append(setter)
    return tuple(setters)


class _IterationTracker:
    """Follows the solver's iterations: keeps the last one, calls back, stops."""

    def __init__(self, x0, epochs, callback, method):
        self.last_x = np.array(x0, copy=True)
        self.nit = 0
        self.epochs = epochs
        self.callback = callback
        self.counts_itself = not isinstance(method, str) or (
            method in _NO_MAXITER + _MAXITER_COUNTS_EVALS
        )

    def scipy_callback(self, intermediate_result):
        # Most methods pass an OptimizeResult, TNC passes x. L-BFGS-B and
        # Newton-CG reuse one buffer for x, hence the copy.
        x = getattr(intermediate_result, "x", intermediate_result)
        self.last_x = np.array(x, dtype=np.float64, copy=True)
        self.nit += 1
        if self.callback is not None and self.callback(self.last_x):
            raise _StopSolver(
                _STATUS_STOPPED, "Stopped by a callback (model.stop_training)."
            )
        if self.counts_itself and self.nit >= self.epochs:
            raise _StopSolver(
                _STATUS_BUDGET_USED, "Stopped: the iteration budget (epochs) is used."
            )

    def log_final(self, x):
        """Reports the solver's answer if no iteration reported it yet."""
        if self.callback is not None and (
            self.nit == 0 or not np.array_equal(x, self.last_x)
        ):
            self.last_x = np.array(x, copy=True)
            self.callback(self.last_x)

    def result(self, optimizer, status, message):
        """Builds the result of a run that ended early, at the last iterate."""
        x = self.last_x
        f, g = optimizer._cached_fg(x)
        return scipy.optimize.OptimizeResult(
            x=x,
            fun=f,
            jac=g,
            nit=self.nit,
            nfev=optimizer.fg_evals,
            nhev=optimizer.hessp_evals,
            status=status,
            success=False,
            message=message,
        )


def _check_options(options):
    if options is not None and not isinstance(options, dict):
        raise TypeError(
            "`options` must be a dict of solver options (see "
            "scipy.optimize.show_options('minimize', method)) or None. "
            f"Received: options={options!r}"
        )
    return options


def _check_dense_size(method, n, limit):
    if method not in _DENSE_MATRICES or n <= limit:
        return
    gigabytes = _DENSE_MATRICES[method] * 8 * n * n / 1e9
    raise ValueError(
        f"Method {method!r} keeps dense {n} x {n} matrices for this model's "
        f"{n} weights: about {gigabytes:.1f} GB, and O(n^3) work per "
        "iteration. Use 'L-BFGS-B' or 'Newton-CG' instead, or raise the limit "
        f"with ScipyBatchOptimizer(max_dense_params=...) (now {limit})."
    )


def _note_float32_stall(result, variables):
    """Warns when a float32 model stopped because its loss cannot resolve more."""
    if result.success or not any(
        keras.backend.standardize_dtype(v.dtype) in ("float16", "bfloat16", "float32")
        for v in variables
    ):
        return
    message = str(result.message).lower()
    if any(s in message for s in ("abnormal", "precision loss", "line search")):
        result.message = (
            f"{result.message} The model computes in float32, whose loss "
            "cannot resolve smaller steps; call "
            "keras.config.set_floatx('float64') and "
            "keras.config.set_dtype_policy('float64') before building the model."
        )
        _warn(result.message)


###############################################################################
# Bounds ######################################################################
###############################################################################


def _resolve_bounds(bounds, variables, method):
    """Returns a `scipy.optimize.Bounds` over the flat vector, or None.

    Merges the user's `bounds` with the boxes implied by Keras constraints
    (`NonNeg`) on the variables.
    """
    takes_bounds = method in _BOUNDS_METHODS + ("custom",)
    lower, upper = _constraint_bounds(variables)
    from_model = bool(np.isfinite(lower).any())
    if bounds is not None:
        if not takes_bounds:
            raise ValueError(
                f"Method {method!r} ignores `bounds`; use one of "
                f"{', '.join(_BOUNDS_METHODS)}. Received: bounds={bounds!r}"
            )
        user_lower, user_upper = _user_bounds(bounds, variables)
        lower, upper = np.maximum(lower, user_lower), np.minimum(upper, user_upper)
    elif from_model and not takes_bounds:
        _warn(
            f"Method {method!r} cannot enforce the NonNeg constraints of this "
            f"model; use one of {', '.join(_BOUNDS_METHODS)} to keep those "
            "weights non-negative.",
        )
        return None
    if not (np.isfinite(lower).any() or np.isfinite(upper).any()):
        return None
    if np.any(lower > upper):
        raise ValueError(
            "`bounds` has a lower bound above its upper bound at flat "
            f"indices {np.flatnonzero(lower > upper)[:10].tolist()}."
        )
    return scipy.optimize.Bounds(lower, upper)


def _constraint_bounds(variables):
    """Returns the (lower, upper) boxes of the variables' Keras constraints."""
    n = _flat_size(variables)
    lower, upper = np.full(n, -np.inf), np.full(n, np.inf)
    offset = 0
    for v in variables:
        size = int(np.prod(v.shape))
        constraint = getattr(v, "constraint", None)
        if isinstance(constraint, keras.constraints.NonNeg):
            lower[offset : offset + size] = 0.0
        elif constraint is not None:
            _warn(
                f"The constraint {type(constraint).__name__} on {v.path} is "
                "not a box, so a full-batch solver cannot enforce it; it is "
                "ignored.",
            )
        offset += size
    return lower, upper


def _user_bounds(bounds, variables):
    """Converts the user's `bounds` to (lower, upper) flat arrays."""
    n = _flat_size(variables)
    if isinstance(bounds, scipy.optimize.Bounds):
        return (
            np.broadcast_to(np.asarray(bounds.lb, float), (n,)).copy(),
            np.broadcast_to(np.asarray(bounds.ub, float), (n,)).copy(),
        )
    if isinstance(bounds, dict):
        return _bounds_by_path(bounds, variables)
    pairs = list(bounds)
    if len(pairs) != n:
        raise ValueError(
            f"`bounds` must have one (low, high) pair per weight: {n} pairs "
            f"for this model. Received {len(pairs)} pairs."
        )
    lower = np.array([-np.inf if lo is None else lo for lo, _ in pairs], float)
    upper = np.array([np.inf if hi is None else hi for _, hi in pairs], float)
    return lower, upper


def _bounds_by_path(bounds, variables):
    n = _flat_size(variables)
    lower, upper = np.full(n, -np.inf), np.full(n, np.inf)
    offsets = np.cumsum([0] + [int(np.prod(v.shape)) for v in variables])
    for key, (lo, hi) in bounds.items():
        i = _variable_index(key, variables)
        shape = tuple(variables[i].shape)
        span = slice(offsets[i], offsets[i + 1])
        if lo is not None:
            lower[span] = np.broadcast_to(np.asarray(lo, float), shape).ravel()
        if hi is not None:
            upper[span] = np.broadcast_to(np.asarray(hi, float), shape).ravel()
    return lower, upper


def _variable_index(key, variables):
    """Finds the variable whose path is `key` or ends with `/key`."""
    matches = [
        i
        for i, v in enumerate(variables)
        if v.path == key or v.path.endswith("/" + key)
    ]
    if len(matches) == 1:
        return matches[0]
    paths = [v.path for v in variables]
    problem = "matches no" if not matches else "is ambiguous: it matches several"
    raise ValueError(
        f"The `bounds` key {key!r} {problem} trainable variable. Use a "
        f"longer path suffix. Variable paths: {paths}"
    )


###############################################################################
# Identifiers #################################################################
###############################################################################


def get(identifier):
    """Returns a `BatchOptimizer` for `identifier`.

    Example:

    ```python
    kormos.get("l-bfgs-b")   # ScipyBatchOptimizer(method="l-bfgs-b")
    kormos.get("scipy")      # ScipyBatchOptimizer() (L-BFGS-B)
    ```

    Args:
        identifier: `"scipy"`, any `scipy.optimize.minimize` method name in any
            case, a `BatchOptimizer` (returned as is) or a serialized one.

    Returns:
        A `BatchOptimizer`.

    Raises:
        ValueError: If `identifier` names no batch optimizer.
    """
    if isinstance(identifier, BatchOptimizer):
        return identifier
    if isinstance(identifier, dict):
        return keras.saving.deserialize_keras_object(identifier)
    if isinstance(identifier, str):
        if identifier.lower() == "scipy":
            return ScipyBatchOptimizer()
        if identifier.lower() in METHODS:
            return ScipyBatchOptimizer(method=identifier)
    raise ValueError(
        "Could not interpret the batch optimizer identifier. Use 'scipy', a "
        f"scipy.optimize.minimize method name ({', '.join(METHODS)}) or a "
        f"kormos.BatchOptimizer. Received: identifier={identifier!r}"
    )


def _is_batch_identifier(identifier):
    if isinstance(identifier, BatchOptimizer):
        return True
    return isinstance(identifier, str) and (
        identifier.lower() == "scipy" or identifier.lower() in METHODS
    )


###############################################################################
# Progress and callbacks ######################################################
###############################################################################


class _SolverProgbar(keras.callbacks.Callback):
    """One live `keras.utils.Progbar` over the solver's iteration budget."""

    def __init__(self, epochs):
        super().__init__()
        self.epochs = epochs
        self._bar = None
        self._logs = {}

    def on_train_begin(self, logs=None):
        self._bar = keras.utils.Progbar(self.epochs, unit_name="iteration")

    def on_epoch_end(self, epoch, logs=None):
        self._logs = dict(logs or {})
        self._bar.stateful_metrics.update(self._logs)
        self._bar.update(epoch + 1, list(self._logs.items()))

    def on_train_end(self, logs=None):
        seen = self._bar._seen_so_far if self._bar else 0
        if self._bar is not None and seen < self.epochs:
            # The solver converged early: close the bar where it stopped.
            self._bar.target = max(seen, 1)
            self._bar.update(self._bar.target, list(self._logs.items()), finalize=True)


class _SolverLogger(keras.callbacks.Callback):
    """`verbose=2`: one line per iteration, timed from the previous one.

    Keras' `ProgbarLogger` times from `on_epoch_begin`, which kormos can only
    call once the iteration's work is done, so it would show next to 0 s.
    """

    def __init__(self, epochs):
        super().__init__()
        self.epochs = epochs
        self._last = None

    def on_train_begin(self, logs=None):
        self._last = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        took = f"{seconds:.2f}s" if seconds >= 1 else f"{seconds * 1e3:.0f}ms"
        values = "".join(f" - {k}: {_format_log(v)}" for k, v in (logs or {}).items())
        print(f"Iteration {epoch + 1}/{self.epochs} - {took}{values}", flush=True)


def _format_log(value):
    """Formats a log value as Keras' progress bar does."""
    return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.4e}"


# Callbacks that act on a learning rate, which a full-batch solver has not.
_LEARNING_RATE_CALLBACKS = (
    keras.callbacks.ReduceLROnPlateau,
    keras.callbacks.LearningRateScheduler,
)


def _make_callbacks(model, callbacks, verbose, epochs):
    """Returns the `CallbackList` of one batch fit, with a fresh History."""
    kept = []
    for callback in callbacks or []:
        if isinstance(callback, _LEARNING_RATE_CALLBACKS):
            _warn(
                f"{type(callback).__name__} adjusts a learning rate, which "
                "full-batch solvers do not have; it is ignored.",
            )
            continue
        kept.append(callback)
    # History first: an iteration that a later callback interrupts is logged.
    history = keras.callbacks.History()
    kept.insert(0, history)
    if verbose == 1:
        kept.append(_SolverProgbar(epochs))
    elif verbose == 2:
        kept.append(_SolverLogger(epochs))
    callback_list = keras.callbacks.CallbackList(
        kept,
        add_progbar=False,
        model=model,
        verbose=verbose,
        epochs=epochs,
        steps=1,
    )
    return callback_list, history


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


###############################################################################
# Models ######################################################################
###############################################################################


_COMPILE_IDS = itertools.count()


class _BatchOptimizedMixin:
    """compile() and fit() of a model that a BatchOptimizer can train."""

    def compile(self, optimizer="rmsprop", **kwargs):
        """Configures the model for training, by a batch solver or by Keras.

        `optimizer` may be a `kormos.BatchOptimizer`, `"scipy"` or any
        `scipy.optimize.minimize` method name (`"l-bfgs-b"`, `"newton-cg"`,
        ...): then `fit()` runs that full-batch solver. Anything else (`"adam"`,
        `keras.optimizers.SGD(...)`) is passed to `keras.Model.compile` and
        `fit()` trains as usual. Recompiling keeps the weights.

        Example:

        ```python
        model.compile(loss="mse", optimizer="adam")      # Keras training
        model.fit(x, y, epochs=5)
        model.compile(loss="mse", optimizer="l-bfgs-b")  # full-batch solver
        model.fit(x, y, epochs=50)
        ```

        Args:
            optimizer: The optimizer, see above. Defaults to `"rmsprop"`.
            **kwargs: Every other argument of `keras.Model.compile` (`loss`,
                `metrics`, `loss_weights`, `jit_compile`, ...). With a batch
                optimizer, `jit_compile="auto"` (the default) also compiles
                models with an `Embedding` layer with XLA on CPUs, and may
                run float64 Hessian-vector products with XLA where one
                measurement finds it faster; `True` or `False` decide alone.

        Raises:
            ValueError: If `optimizer` names neither a batch optimizer nor a
                Keras optimizer.
        """
        if not _is_batch_identifier(optimizer):
            if isinstance(optimizer, str):
                _check_keras_optimizer_name(optimizer)
            return super().compile(optimizer=optimizer, **kwargs)
        batch_optimizer = get(optimizer)
        super().compile(optimizer="sgd", **kwargs)
        self.optimizer = batch_optimizer
        # Keras resolves "auto" at once; kormos' own "auto" needs the request.
        self._kormos_jit_compile = kwargs.get("jit_compile", "auto")
        self._kormos_compile_id = next(_COMPILE_IDS)

    def fit(self, *args, **kwargs):
        """Trains the model: full-batch if compiled with a batch optimizer.

        Compiled with a Keras optimizer, this is `keras.Model.fit`. Compiled
        with a `BatchOptimizer`, the solver runs on ALL the training data.

        The arguments shared with `keras.Model.fit` mean what they mean there,
        with one solver iteration as one epoch; `shuffle` has no effect.

        Example:

        ```python
        model.compile(loss="mse", optimizer="l-bfgs-b", metrics=["mae"])
        history = model.fit(
            x, y, epochs=100, validation_split=0.2,
            callbacks=[keras.callbacks.EarlyStopping(monitor="val_loss")],
        )
        # Chain solvers: 50 L-BFGS-B iterations, then 10 of Newton-CG.
        model.fit(x, y, method=["l-bfgs-b", "newton-cg"], epochs=[50, 10])
        ```

        Args:
            batch_size: Rows per mini-batch of an evaluation. It only bounds
                memory: the objective is always over all samples. `None` puts
                all rows in one batch.
            epochs: The iteration budget (scipy's `maxiter`), or a list of
                budgets when `method` is a list. Defaults to `20`.
            method, options, bounds, constraints, tol: Override the
                optimizer's settings for this fit; see `ScipyBatchOptimizer`.
                `method`, `epochs`, `options` and `pretrain_fn` may be lists
                of equal length to chain solvers, each warm-started from the
                last.
            pretrain_fn: `fn(model)` called before the solver starts (for
                example to freeze a layer), or a list of them for a chain.

        Returns:
            A `keras.callbacks.History` with one row per solver iteration:
            `loss`, `grad` (gradient 2-norm), `fg_evals`, `hessp_evals`, the
            compiled metrics on the training data and `val_*` entries.

        Raises:
            ValueError: If the model is not compiled, or for bad data or
                solver arguments; raised before any weight changes.
            TypeError: If `options` is neither a dict nor a list of dicts.
        """
        if not getattr(self, "compiled", False):
            raise ValueError(
                "You must call `compile()` before `fit()`, e.g. "
                "`model.compile(loss='mse', optimizer='l-bfgs-b')`."
            )
        if isinstance(self.optimizer, BatchOptimizer):
            return self._fit_batch(*args, **kwargs)
        return super().fit(*args, **kwargs)

    def _fit_batch(
        self,
        x=None,
        y=None,
        batch_size=None,
        epochs=20,
        verbose="auto",
        callbacks=None,
        validation_split=0.0,
        validation_data=None,
        shuffle=True,
        class_weight=None,
        sample_weight=None,
        initial_epoch=0,
        steps_per_epoch=None,
        validation_steps=None,
        validation_batch_size=None,
        validation_freq=1,
        method=None,
        options=None,
        bounds=None,
        constraints=None,
        tol=None,
        pretrain_fn=None,
    ):
        """Runs the full-batch fit; `fit()` documents the arguments."""
        stages = _plan_stages(method, epochs, options, pretrain_fn, initial_epoch)
        validation = None
        if validation_split and validation_data is None:
            (x, y, sample_weight), validation_data = _split_validation(
                self, x, y, sample_weight, validation_split
            )
        data = _make_data(
            self, x, y, sample_weight, batch_size, class_weight, steps_per_epoch
        )
        if validation_data is not None:
            validation = _make_validation(
                self,
                validation_data,
                validation_batch_size or batch_size,
                validation_steps,
            )
        verbose = 1 if verbose == "auto" else verbose
        last_epoch = initial_epoch + sum(stage[1] for stage in stages)
        callback_list, history = _make_callbacks(self, callbacks, verbose, last_epoch)
        fitter = _BatchFit(self, data, validation, validation_freq, callback_list)
        fitter.run(
            stages, initial_epoch, bounds=bounds, constraints=constraints, tol=tol
        )
        return history

    def get_compile_config(self):
        config = super().get_compile_config()
        if config is not None and isinstance(self.optimizer, BatchOptimizer):
            config["optimizer"] = keras.saving.serialize_keras_object(self.optimizer)
            config["jit_compile"] = getattr(self, "_kormos_jit_compile", "auto")
        return config

    def compile_from_config(self, config):
        config = keras.saving.deserialize_keras_object(config)
        if _is_batch_identifier(config.get("optimizer")):
            self.compile(**config)
        else:
            super().compile_from_config(keras.saving.serialize_keras_object(config))


def _check_keras_optimizer_name(name):
    try:
        keras.optimizers.get(name)
    except ValueError:
        raise ValueError(
            f"Unknown optimizer {name!r}. Use a Keras optimizer ('adam', "
            f"'sgd', ...) or a batch solver: 'scipy' or one of "
            f"{', '.join(METHODS)}. Received: optimizer={name!r}"
        ) from None


def _plan_stages(method, epochs, options, pretrain_fn, initial_epoch):
    """Returns `[(method, budget, options, pretrain_fn), ...]`, one per solver."""
    lists = {
        name: value
        for name, value in (
            ("method", method),
            ("epochs", epochs),
            ("options", options),
            ("pretrain_fn", pretrain_fn),
        )
        if isinstance(value, (list, tuple))
    }
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

    def nth(value, i):
        return value[i] if isinstance(value, (list, tuple)) else value

    stages = []
    for i in range(count):
        budget = nth(epochs, i)
        if not isinstance(budget, (int, np.integer)) or isinstance(budget, bool):
            raise ValueError(
                f"`epochs` must be a positive integer. Received: epochs={epochs!r}"
            )
        if count == 1:
            budget = budget - initial_epoch
        if budget <= 0:
            raise ValueError(
                "`epochs` must be a positive integer (greater than "
                f"`initial_epoch`). Received: epochs={epochs!r}, "
                f"initial_epoch={initial_epoch}"
            )
        stage_method = nth(method, i)
        if stage_method is not None:
            _canonical_method(stage_method)
        if not isinstance(nth(options, i), (dict, type(None))):
            raise TypeError(
                "`options` must be a dict of solver options, or a list of "
                f"dicts (one per chained solver). Received: options={options!r}"
            )
        stages.append((stage_method, int(budget), nth(options, i), nth(pretrain_fn, i)))
    return stages


def _make_validation(model, validation_data, batch_size, steps):
    """Returns validation data as `_Data`."""
    if _is_dataset(validation_data):
        return _make_data(
            model,
            validation_data,
            None,
            None,
            None,
            steps=steps,
            argname="validation_data",
        )
    if (
        not isinstance(validation_data, (tuple, list))
        or not 2 <= len(validation_data) <= 3
    ):
        raise ValueError(
            "`validation_data` must be `(x_val, y_val)`, `(x_val, y_val, "
            "val_sample_weight)` or a `tf.data.Dataset`. Received: "
            f"validation_data of type {type(validation_data).__name__}"
        )
    vx, vy, vsw = keras.utils.unpack_x_y_sample_weight(tuple(validation_data))
    return _make_data(model, vx, vy, vsw, batch_size, argname="validation_data")


class _BatchFit:
    """One call of `fit()` on a batch-optimized model: stages, logs, callbacks."""

    def __init__(self, model, data, validation, validation_freq, callbacks):
        self.model = model
        self.optimizer = model.optimizer
        self.data = data
        self.validation = validation
        self.validation_freq = validation_freq
        self.callbacks = callbacks
        self.epoch = 0
        self.logs = None
        self._evals = (0, 0)

    def run(self, stages, initial_epoch, **solver_kwargs):
        model, optimizer = self.model, self.optimizer
        self.epoch = initial_epoch
        if self.validation is not None:
            # evaluate() does not align targets the way the objective does.
            self.validation = _aligned(model, self.validation)
        optimizer._bind(model, self.data)
        model.stop_training = False
        self.callbacks.on_train_begin()
        for method, budget, options, pretrain_fn in stages:
            if pretrain_fn is not None:
                pretrain_fn(model)
                self._rebind_if_trainables_changed()
            result = optimizer.minimize(
                epochs=budget,
                callback=self.on_iteration,
                method=method,
                options=options,
                **solver_kwargs,
            )
            if model.stop_training or result.status == _STATUS_INTERRUPTED:
                break
        self.callbacks.on_train_end(logs=self.logs)

    def _rebind_if_trainables_changed(self):
        optimizer = self.optimizer
        if [id(v) for v in self.model.trainable_variables] != [
            id(v) for v in optimizer.variables
        ]:
            self._evals = (
                self._evals[0] + optimizer.fg_evals,
                self._evals[1] + optimizer.hessp_evals,
            )
            optimizer._bind(self.model, self.data)

    def on_iteration(self, x):
        """Logs one solver iteration as one epoch; returns True to stop."""
        optimizer, epoch = self.optimizer, self.epoch
        f, g = optimizer.func_and_grad(x)
        logs = {
            "loss": f,
            "grad": float(np.linalg.norm(g)),
            "fg_evals": self._evals[0] + optimizer.fg_evals,
            "hessp_evals": self._evals[1] + optimizer.hessp_evals,
        }
        logs.update(optimizer.metrics_at(x))
        # Usually the solver evaluated this iterate last: no assignment needed.
        optimizer._ensure_weights(x)
        if self.validation is not None and _should_validate(
            epoch, self.validation_freq
        ):
            logs.update(self._validate())
        self.callbacks.on_epoch_begin(epoch)
        self.callbacks.on_epoch_end(epoch, logs)
        optimizer._assigned = None  # a callback may have changed the weights
        self.logs = logs
        self.epoch += 1
        return bool(self.model.stop_training)

    def _validate(self):
        x, y, sample_weight = self.validation.as_fit_inputs()
        results = self.model.evaluate(
            x=x,
            y=y,
            sample_weight=sample_weight,
            batch_size=self.validation.batch_size if y is not None else None,
            verbose=0,
            return_dict=True,
        )
        return {f"val_{k}": float(v) for k, v in results.items()}


def _aligned(model, data):
    """Returns `data` with targets aligned to the model's output shapes."""
    x, y, sw = data.first_batch()
    if y is None:
        return data
    y_pred = model(x, training=False)
    if data.tensors is not None:
        dx, dy, dsw = data.tensors
        return _Data(
            (dx, _align_targets(dy, y_pred), dsw), None, data.batch_size, data.size
        )
    dataset = data.dataset.map(lambda a, b, c: (a, _align_targets(b, y_pred), c))
    return _Data(dataset=dataset)


@keras.saving.register_keras_serializable(package="kormos")
class BatchOptimizedModel(_BatchOptimizedMixin, keras.Model):
    """A `keras.Model` that trains with a full-batch solver or a Keras optimizer.

    Build it with the functional API (`inputs=`, `outputs=`) or subclass it,
    exactly as `keras.Model`. `compile(optimizer="l-bfgs-b")` (or any
    `scipy.optimize.minimize` method, or a `BatchOptimizer`) makes `fit()` run
    that solver on the full data; `compile(optimizer="adam")` makes it a plain
    Keras model again, keeping its weights.

    During a full-batch fit the model is called with `training=False`:
    Dropout and noise layers are identity and BatchNormalization uses (and
    never updates) its moving statistics, so the objective is a deterministic
    function of the weights and equals what `evaluate()` reports.

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
        if _is_functional_call(args, kwargs) and not issubclass(cls, _Functional):
            cls = _with_functional_base(cls)
        return super().__new__(cls, *args, **kwargs)


def _is_functional_call(args, kwargs):
    """Keras' test for `Model(inputs, outputs)` (functional) construction."""
    return (
        len(args) == 2
        or (len(args) == 1 and "outputs" in kwargs)
        or ("inputs" in kwargs and "outputs" in kwargs)
    )


def _functional_class():
    """Returns Keras' Functional model class.

    It is not public API: `keras.Model.__new__` returns a (not yet
    initialized) instance of it for functional arguments, so we take its type
    rather than import `keras.src`. Building a real model here would fix the
    global dtype policy at import and break `keras.config.set_floatx()`.
    """
    return type(keras.Model.__new__(keras.Model, None, None))


_Functional = _functional_class()


@keras.saving.register_keras_serializable(package="kormos", name="BatchOptimizedModel")
class _FunctionalBatchOptimizedModel(BatchOptimizedModel, _Functional):
    """A functional `BatchOptimizedModel`.

    Keras turns a `Model` subclass into a functional one by rewriting its base
    classes in place, which would break later subclassing-API use of
    `BatchOptimizedModel` in the same process. Routing functional construction
    to this subclass keeps `BatchOptimizedModel` itself intact.
    """


_FunctionalBatchOptimizedModel.__name__ = "BatchOptimizedModel"
_FunctionalBatchOptimizedModel.__qualname__ = "BatchOptimizedModel"


def _with_functional_base(cls):
    """Returns `cls` with `BatchOptimizedModel` swapped for its functional twin."""
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

    Everything said of `BatchOptimizedModel` holds.

    Example:

    ```python
    model = kormos.BatchOptimizedSequentialModel([
        keras.Input(shape=(5,)),
        keras.layers.Dense(1),
    ])
    model.compile(loss="mse", optimizer="newton-cg")
    model.fit(x, y, epochs=10)
    ```
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
    BatchOptimizedModel=BatchOptimizedModel,
    BatchOptimizedSequentialModel=BatchOptimizedSequentialModel,
)
optimizers = _compat_module(
    "optimizers",
    "kormos 0.1 names: kormos.optimizers.ScipyBatchOptimizer, ...",
    BatchOptimizer=BatchOptimizer,
    ScipyBatchOptimizer=ScipyBatchOptimizer,
    get=get,
)
