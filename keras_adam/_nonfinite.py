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
Under tf.distribute without merge-free strategies, the cond has to run in
the cross-replica context (a cond branch may not call `merge_call`, which
the update does), as Keras's `LossScaleOptimizer` does.
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
        return _tensorflow_apply_if_finite(grads, variables, apply, skip)
    # torch runs eagerly (torch.compile breaks the graph here), and JAX's
    # stateful apply too (jax.jit goes through stateless_apply): a Python
    # branch on the verdict. A traced JAX cond branch could not assign to the
    # variables.
    if bool(all_finite(grads)):
        apply(grads, variables)
    else:
        skip()


def _tensorflow_apply_if_finite(grads, variables, apply, skip):
    import tensorflow as tf

    if tf.__internal__.distribute.strategy_supports_no_merge_call() or (
        not tf.distribute.has_strategy()
    ):
        return ops.cond(all_finite(grads), lambda: apply(grads, variables), skip)

    def cross_replica(distribution, grads, variables):
        # Gradients are all-reduced, so every replica reaches the same
        # verdict; the first replica's is taken.
        finite = distribution.experimental_local_results(
            distribution.extended.call_for_each_replica(all_finite, args=(grads,))
        )[0]
        def apply_on_each_replica():
            distribution.extended.call_for_each_replica(apply, args=(grads, variables))

        ops.cond(finite, apply_on_each_replica, skip)

    return tf.distribute.get_replica_context().merge_call(
        cross_replica, args=(grads, variables))


def _no_result(fn):
    # Both branches of a graph cond must return the same structure: nothing.
    def run(*args):
        fn(*args)
    return run
