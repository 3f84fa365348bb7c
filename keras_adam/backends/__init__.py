"""Chooses a fast path for an optimizer's options, or says why none applies.

Requirement: this package imports a framework (tensorflow, torch, jax) only
inside that framework's own module here, and only when
`keras.backend.backend()` names it. Importing `keras_adam` must never pull in
a framework that the active Keras backend does not use.

Every fast path computes exactly the rule of `keras_adam.Adam.update_step`
(the portable path) and is tested equal to it.
"""

import keras


def fused_unavailable_reason(optimizer):
    """Why TensorFlow's fused kernels cannot compute this optimizer's rule, or None.

    Only what is known at construction is checked here; per-variable limits
    (dtype, XLA) are checked by the backend module at each step.
    """
    backend = keras.backend.backend()
    if backend != "tensorflow":
        return (
            "the fused kernels are TensorFlow's (ResourceApplyAdam), "
            f"but the Keras backend is {backend!r}"
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
    """The fused-kernel module to use for `optimizer`, or None for the portable path.

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


def deduplicate(grads):
    """`grads` with each sparse gradient's repeated indices summed into one row.

    After this, clipping by norm or value sees the same numbers as it would on
    the dense gradient.
    """
    if not any(is_sparse(g) for g in grads):
        return list(grads)
    from keras_adam.backends import tensorflow

    return [tensorflow.deduplicate(g) if is_sparse(g) else g for g in grads]


def lazy_update(optimizer, gradient, variable, learning_rate):
    """The lazy sparse update (rows present in `gradient` only); TensorFlow only."""
    from keras_adam.backends import tensorflow

    tensorflow.lazy_update(optimizer, gradient, variable, learning_rate)
