"""Chooses a fast path for an optimizer's options, or says why none applies.

Requirement: this package imports a framework (tensorflow, torch, jax) only
inside that framework's own module here, and only when
`keras.backend.backend()` names it. Importing `keras_adam` must never pull in
a framework that the active Keras backend does not use.

Every fast path computes exactly the rule of `keras_adam.Adam.update_step`
(the portable path) and is tested equal to it.
"""

import keras
import numpy as np

# Both fused kernels (TensorFlow's and torch's) are exact for these dtypes only:
# TensorFlow's takes beta_2 in the variable's dtype, and bfloat16 rounds 0.999
# to 1 (v would stay 0).
FUSED_DTYPES = ("float32", "float64")


def unsupported_dtype_reason(variable, moment_dtype=None):
    """Why no fused kernel may update `variable`, judged by dtypes, or None."""
    dtype = keras.backend.standardize_dtype(variable.dtype)
    name = getattr(variable, "path", None) or getattr(variable, "name", "?")
    if dtype not in FUSED_DTYPES:
        return f"the fused kernels are exact only for {FUSED_DTYPES}; variable {name!r} is {dtype}"
    if moment_dtype is not None and moment_dtype != dtype:
        return (f"the fused kernels keep m and v in the variable's dtype; variable {name!r} "
                f"is {dtype} and moment_dtype={moment_dtype!r}")
    return None


def fused_unavailable_reason(optimizer):
    """Why TensorFlow's fused kernels cannot compute this optimizer's rule, or None.

    Only what is known at construction is checked here; per-variable limits
    (dtype, XLA) are checked by the backend module at each step.
    """
    backend = keras.backend.backend()
    if optimizer.epsilon == 0:
        return "with epsilon=0 the kernels return NaN where v = 0; the portable path steps 0 there"
    if backend == "torch":
        if optimizer.nesterov:
            return "torch._fused_adam_ has no Nesterov option"
        return None
    if backend != "tensorflow":
        return (
            "fused kernels exist for TensorFlow (ResourceApplyAdam) and torch "
            f"(torch._fused_adam_), but the Keras backend is {backend!r}"
        )
    if optimizer.nesterov and optimizer.amsgrad:
        return "ResourceApplyAdamWithAmsgrad has no Nesterov option"
    if optimizer.nesterov and optimizer.bias_correction:
        # TF's kernel divides both Nesterov terms by 1 - beta_1^t; this rule
        # divides the momentum term by 1 - beta_1^(t+1) (see _rule.py).
        return (
            "TensorFlow's Nesterov kernel uses 1 - beta_1^t for the momentum "
            "term where this rule uses 1 - beta_1^(t+1); it matches only with "
            "bias_correction=False"
        )
    return None


def fused_path(optimizer):
    """The per-variable fused-kernel module for `optimizer`, or None.

    On torch the fused kernel is multi-tensor (see `multi_tensor_update`), so
    there is no per-variable module and this returns None.

    Raises:
        ValueError: if `optimizer.fused` is True and no fused path applies.
    """
    if optimizer.fused is False:
        return None
    reason = fused_unavailable_reason(optimizer)
    if reason is not None:
        if optimizer.fused:
            raise ValueError(
                f"`fused=True` is not possible: {reason}. "
                "Use fused=None to choose automatically, or fused=False."
            )
        return None
    if keras.backend.backend() != "tensorflow":
        return None
    from keras_adam.backends import tensorflow

    return tensorflow


def trace_key():
    """An identity for the graph being built, or None outside graph building.

    On TensorFlow, tf.function and each tf.cond branch build a separate graph;
    a tensor from one must not be used in another.
    """
    if keras.backend.backend() != "tensorflow":
        return None
    from keras_adam.backends import tensorflow

    return tensorflow.trace_key()


def is_sparse(gradient):
    """True for a row-sparse gradient (tf.IndexedSlices; only TensorFlow makes them)."""
    return hasattr(gradient, "indices") and hasattr(gradient, "dense_shape")


def canonical_gradients(grads):
    """`grads` as backend tensors, each sparse gradient's repeated indices summed.

    NumPy arrays become tensors (Keras's global-norm clipping and the torch
    kernel need them). After deduplication, clipping by norm or value sees the
    same numbers as it would on the dense gradient.
    """
    grads = [keras.ops.convert_to_tensor(g) if isinstance(g, np.ndarray) else g for g in grads]
    if not any(is_sparse(g) for g in grads):
        return grads
    from keras_adam.backends import tensorflow

    return [tensorflow.deduplicate(g) if is_sparse(g) else g for g in grads]


def lazy_update(optimizer, gradient, variable, learning_rate):
    """The lazy sparse update (rows present in `gradient` only); TensorFlow only."""
    from keras_adam.backends import tensorflow

    tensorflow.lazy_update(optimizer, gradient, variable, learning_rate)


def multi_tensor_update(optimizer, grads, variables, learning_rate):
    """Updates what a multi-tensor kernel can in one call; returns the rest.

    Only torch has one here (`torch._fused_adam_`); elsewhere, or with
    `fused=False`, every (gradient, variable) pair is returned untouched for
    the per-variable `update_step`.
    """
    pairs = list(zip(grads, variables))
    if optimizer.fused is False or keras.backend.backend() != "torch":
        return pairs
    from keras_adam.backends import torch

    mine, rest = [], []
    for g, v in pairs:
        (mine if torch.eligible(optimizer, v) else rest).append((g, v))
    if mine:
        torch.fused_update(optimizer, *zip(*mine), learning_rate)
    return rest
