"""TensorFlow's fused Adam kernels beneath `Adam.update_step`, and the row primitives.

`tf.raw_ops.ResourceApplyAdam` (and `...WithAmsgrad`) update var, m, v (and
v_max) in one pass over memory. With beta1_power = beta2_power = 0 the kernel
computes, for inputs lr', beta_1, beta_2, epsilon', g:

    m <- m + (g - m) * (1 - beta_1)           (= beta_1 * m + (1 - beta_1) * g)
    v <- v + (g^2 - v) * (1 - beta_2)
    [v_max <- max(v_max, v), used as v below]
    var <- var - lr' * m / (sqrt(v) + epsilon')
    (use_nesterov: m in the last line is replaced by beta_1 * m + (1 - beta_1) * g)

Our rule is var <- var - lr * (m / c1) / D. For D = (sqrt(v) + eps) / sqrt(c2)
("hat") this is lr' = lr * sqrt(c2) / c1 with epsilon' = eps; for
D = sqrt(v / c2) + eps ("paper"), multiplying through by sqrt(c2) gives the
same lr' with epsilon' = eps * sqrt(c2). The kernel's own 1 - beta^t is
bypassed by passing powers of 0.

The kernels take beta_1 and beta_2 as tensors of the variable's dtype, so in
float32 they run Adam with beta' = float32(beta): 1 - float32(0.999) is 1.3e-5
relative away from 0.001, and v follows beta_2' exactly. c1 and c2 are
therefore computed for beta' (by `_rule.bias_factors`, accurate in float32),
which keeps v / c2 an unbiased estimate for the beta_2' the kernel applies.
The first step is then lr * sign(g), as in the paper; c2 for 0.999 would make
it 1 + 6.4e-6 times that (and moved the final loss of
examples/mlp_regression.py 1.9e-4 relative away from the built-in's, against
1.1e-5 now). What remains is v's slightly different averaging weights,
(1 - beta_2') beta_2'^k: v differs from the portable path's by up to 1.3e-5
relative. In float16 and bfloat16 the same rounding is 2% or total (beta_2
rounds to 1), so those dtypes use the portable path. In float64, beta' = beta.
"""

import dataclasses
import functools

import keras
import numpy as np
import tensorflow as tf

# A private seam, used here only: tf.function(jit_compile=True) marks its
# graph as an XLA context, and ResourceApplyAdamWithAmsgrad has no XLA kernel
# in TF 2.21. tests/test_backend_tensorflow.py runs amsgrad under
# jit_compile=True and fails if this stops detecting it.
from tensorflow.python.ops import control_flow_util


class Fused:
    """`ResourceApplyAdam` / `ResourceApplyAdamWithAmsgrad`, one variable at a time."""

    name = "tensorflow-fused"
    exact_because = "ResourceApplyAdam, with the bias factors folded into lr"
    per_variable = True

    @staticmethod
    def portable_when(hyper):
        if hyper.amsgrad:
            return "under XLA (ResourceApplyAdamWithAmsgrad has no XLA kernel)"
        return ""

    @classmethod
    def option_reason(cls, hyper):
        if hyper.nesterov and hyper.amsgrad:
            return "ResourceApplyAdamWithAmsgrad has no Nesterov option"
        if hyper.nesterov and hyper.bias_correction:
            # TF's kernel divides both Nesterov terms by 1 - beta_1^t; this rule
            # divides the momentum term by 1 - beta_1^(t+1) (see _rule.py).
            return (
                "TensorFlow's Nesterov kernel uses 1 - beta_1^t for the momentum "
                "term where this rule uses 1 - beta_1^(t+1); it matches only with "
                "bias_correction=False"
            )
        return None

    def portable_now(self, hyper):
        if hyper.amsgrad and control_flow_util.GraphOrParentsInXlaContext(
            tf.compat.v1.get_default_graph()
        ):
            return "ResourceApplyAdamWithAmsgrad has no XLA kernel"
        return None

    def apply(self, items, hyper, step):
        """One fused Adam step on each (gradient, variable, (m, v, v_max)); see the
        module docstring."""
        for gradient, variable, (m, v, v_max) in items:
            dtype = variable.dtype
            s = step.scalars(_kernel_hyper(hyper, dtype), dtype)
            zero = step.memo(("tensorflow-zero", dtype), lambda: tf.zeros((), dtype))
            common = dict(
                var=variable.handle, m=m.handle, v=v.handle,
                beta1_power=zero, beta2_power=zero,
                lr=s.alpha, beta1=s.beta_1, beta2=s.beta_2, epsilon=s.epsilon,
                grad=tf.cast(gradient, dtype),
            )
            if hyper.amsgrad:
                tf.raw_ops.ResourceApplyAdamWithAmsgrad(vhat=v_max.handle, **common)
            else:
                tf.raw_ops.ResourceApplyAdam(use_nesterov=hyper.nesterov, **common)
        return []


@functools.lru_cache(maxsize=None)
def _kernel_hyper(hyper, dtype):
    """`hyper` with the betas the kernel applies: each rounded to `dtype`.

    The step's scalars for this `Hyper` are lr' = alpha and epsilon' of the
    module docstring (`_rule.fold_step_size`), with c1 and c2 for these betas.
    """
    return dataclasses.replace(
        hyper,
        beta_1=_as_kernel_sees(hyper.beta_1, dtype),
        beta_2=_as_kernel_sees(hyper.beta_2, dtype),
    )


def _as_kernel_sees(beta, dtype):
    """`beta` rounded to `dtype`, as a Python float: the beta the kernel applies."""
    return float(np.asarray(beta, dtype=tf.as_dtype(dtype).as_numpy_dtype))


def trace_key():
    """The graph under construction (in eager mode, TF's global default graph)."""
    return id(tf.compat.v1.get_default_graph())


def unique_rows(indices):
    """(rows, position) of `tf.unique`: each index once, and where each entry went."""
    return tf.unique(indices)


def gather_rows(variable, rows):
    """The rows of a variable; on a resource variable this reads those rows only.

    `variable` is a Keras variable (a slot) or the tf.Variable inside one
    (Keras's TensorFlow optimizer hands update_step the latter).
    """
    if isinstance(variable, keras.Variable):
        variable = variable.value
    return tf.gather(variable, rows)


def row_slices(values, rows, dense_shape=None):
    """tf.IndexedSlices: Keras's TensorFlow `assign` scatters them into the rows only."""
    return tf.IndexedSlices(values, rows, dense_shape)


def apply_if_finite(grads, variables, apply, skip, all_finite):
    """`apply(grads, variables)` if `all_finite(grads)`, else `skip()`, under tf.distribute too.

    A cond branch may not call `merge_call`, which the optimizer's update does,
    so with a strategy that needs merge calls the cond runs in the
    cross-replica context and `apply` on each replica, as Keras's
    `LossScaleOptimizer` does. (See `keras_adam._nonfinite`.)
    """
    if tf.__internal__.distribute.strategy_supports_no_merge_call() or (
        not tf.distribute.has_strategy()
    ):
        return tf.cond(all_finite(grads), lambda: apply(grads, variables), skip)

    def cross_replica(distribution, grads, variables):
        # Each replica judges its own gradients (before the all-reduce, which
        # happens inside `apply`); the step runs only if every replica's are
        # finite, since one replica's NaN would reach all through the sum.
        verdicts = distribution.experimental_local_results(
            distribution.extended.call_for_each_replica(all_finite, args=(grads,))
        )
        finite = tf.reduce_all(tf.stack(list(verdicts)))

        def apply_on_each_replica():
            distribution.extended.call_for_each_replica(apply, args=(grads, variables))

        tf.cond(finite, apply_on_each_replica, skip)

    return tf.distribute.get_replica_context().merge_call(
        cross_replica, args=(grads, variables))


def compiled(fn):
    """`fn` as one XLA cluster: its element-wise ops fuse into a few passes over
    memory even inside a tf.function without XLA (model.fit's default on CPU)."""
    return tf.function(fn, jit_compile=True, autograph=False, reduce_retracing=False)
