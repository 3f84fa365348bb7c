"""`skip_nonfinite=True`: a step whose gradients hold NaN or Inf changes nothing but a counter.

One non-finite gradient written into m and v poisons them for good. With
`skip_nonfinite=True` the whole optimizer step (clipping, weight decay, the
Adam update of every variable, EMA, gradient accumulation, the step counter
t) runs only when every gradient is finite; otherwise only `skipped_steps`
is incremented. The next finite step is then exactly the step that would
have come without the bad one. (Compare optax's `apply_if_finite` and the
`found_inf` of PyTorch's fused Adam.)

The decision is one `cond` on one scalar, computed from every gradient (the
values of row-sparse ones), so it works inside tf.function, XLA and jax.jit.
Under tf.distribute the cond runs in the cross-replica context
(`keras_adam.backends.tensorflow.apply_if_finite`).
"""

import keras
from keras import ops

from keras_adam import _sparse


def all_finite(grads):
    """A scalar bool: True when no gradient holds a NaN or an Inf."""
    checks = [ops.all(ops.isfinite(g.values if _sparse.is_sparse(g) else g))
              for g in grads if g is not None]
    if not checks:
        return ops.convert_to_tensor(True)
    return ops.all(ops.stack(checks))


def apply_if_finite(grads, variables, apply, skip):
    """Runs `apply(grads, variables)` if every gradient is finite, else `skip()`.

    For the stateful `apply`; both are called for their effects and nothing
    is returned. Under tf.distribute `apply` runs once per replica, with that
    replica's `grads` and `variables`.
    """
    apply, skip = _no_result(apply), _no_result(skip)
    if keras.backend.backend() == "tensorflow":
        from keras_adam.backends import tensorflow

        return tensorflow.apply_if_finite(grads, variables, apply, skip, all_finite)
    # torch runs eagerly (torch.compile breaks the graph here), and JAX's
    # stateful apply too (jax.jit goes through stateless_apply): a Python
    # branch on the verdict. A traced JAX cond branch could not assign to the
    # variables.
    if bool(all_finite(grads)):
        apply(grads, variables)
    else:
        skip()


def _no_result(fn):
    # Both branches of a graph cond must return the same structure: nothing.
    def run(*args):
        fn(*args)
    return run


def stateless_apply_if_finite(grads, model, optimizer, apply, skip):
    """The stateless form, for JAX's trainer: new values from `apply()` if every
    gradient is finite, else from `skip()`, both run in a `keras.StatelessScope`.

    Args:
        grads: this step's gradients.
        model: (the model variables the optimizer was built with, their values).
        optimizer: (the optimizer's variables, their values).
        apply: runs the step (stateful code: it assigns inside the scope).
        skip: counts a skipped step.

    Returns:
        (new model values, new optimizer values), as
        `keras.optimizers.Optimizer.stateless_apply`.

    Raises:
        ValueError: if a list of values does not match its variables.
    """
    for (variables, values), name in ((model, "trainable_variables"),
                                      (optimizer, "optimizer_variables")):
        if len(variables) != len(values):
            raise ValueError(
                f"`{name}` must hold one value per variable: expected {len(variables)}, "
                f"received {len(values)}."
            )
    mapping = list(zip(*model)) + list(zip(*optimizer))

    def in_scope(fn):
        def branch():
            with keras.StatelessScope(state_mapping=mapping) as scope:
                fn()
            return tuple([scope.get_current_value(v) for v in variables]
                         for variables in (model[0], optimizer[0]))
        return branch

    return ops.cond(all_finite(grads), in_scope(apply), in_scope(skip))


def new_counter(add_variable):
    """The saved `skipped_steps` counter (`add_variable`: the optimizer's).

    Created after the slots, so the layout of optimizers without it is
    unchanged. Assigned only in the cross-replica context under
    tf.distribute (as LossScaleOptimizer's counters): no aggregation.
    """
    return add_variable(shape=(), dtype="int", name="skipped_steps", aggregation="none")
