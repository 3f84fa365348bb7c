"""TensorFlow's fused Adam kernels, used beneath `Adam.update_step`.

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

import numpy as np
import tensorflow as tf
from keras import ops

from keras_adam import _rule
from keras_adam import backends

# A private seam, used here only: tf.function(jit_compile=True) marks its
# graph as an XLA context, and ResourceApplyAdamWithAmsgrad has no XLA kernel
# in TF 2.21. tests/test_backend_tensorflow.py runs amsgrad under
# jit_compile=True and fails if this stops detecting it.
from tensorflow.python.ops import control_flow_util


def _in_xla_context():
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def applies(optimizer, gradient, variable):
    """True when the fused kernel computes the rule exactly for this update."""
    if isinstance(gradient, tf.IndexedSlices):
        return False
    if optimizer.amsgrad and _in_xla_context():
        return False
    return backends.unsupported_dtype_reason(variable, optimizer.moment_dtype) is None


def trace_key():
    """The graph under construction (in eager mode, TF's global default graph)."""
    return id(tf.compat.v1.get_default_graph())


def update(optimizer, gradient, variable, learning_rate):
    """One fused Adam step on `variable` (see the module docstring for the identity)."""
    m, v, v_max = optimizer.slots(variable)
    lr, epsilon, beta_1, beta_2, zero = optimizer.step_scalars(
        "fused", variable.dtype, lambda: _kernel_scalars(optimizer, learning_rate, variable.dtype)
    )
    common = dict(
        var=variable.handle, m=m.handle, v=v.handle,
        beta1_power=zero, beta2_power=zero,
        lr=lr, beta1=beta_1, beta2=beta_2, epsilon=epsilon,
        grad=tf.cast(gradient, variable.dtype),
    )
    if optimizer.amsgrad:
        tf.raw_ops.ResourceApplyAdamWithAmsgrad(vhat=v_max.handle, **common)
    else:
        tf.raw_ops.ResourceApplyAdam(use_nesterov=optimizer.nesterov, **common)


def _kernel_scalars(optimizer, learning_rate, dtype):
    """lr' and epsilon' of the module docstring (the identity of `_rule.step_size`)."""
    beta_1 = _as_kernel_sees(optimizer.beta_1, dtype)
    beta_2 = _as_kernel_sees(optimizer.beta_2, dtype)
    c1, c2, _ = _rule.bias_factors(
        optimizer.iterations + 1, beta_1, beta_2, optimizer.bias_correction, dtype
    )
    # tf.constant, not ops.cast: keras.ops.cast(1e-7, "float64") passes the
    # Python float through float32 first (measured: 1.2e-8 relative error).
    epsilon = tf.constant(optimizer.epsilon, dtype)
    lr, epsilon = _rule.step_size(
        ops.cast(learning_rate, dtype), c1, c2, epsilon, optimizer.epsilon_placement
    )
    return (lr, epsilon, tf.constant(beta_1, dtype), tf.constant(beta_2, dtype),
            tf.zeros((), dtype))


def _as_kernel_sees(beta, dtype):
    """`beta` rounded to `dtype`, as a Python float: the beta the kernel applies."""
    return float(np.asarray(beta, dtype=tf.as_dtype(dtype).as_numpy_dtype))


def deduplicate(gradient):
    """IndexedSlices with each row index once; the values of repeated indices summed."""
    rows, position = tf.unique(gradient.indices)
    values = tf.math.unsorted_segment_sum(gradient.values, position, tf.shape(rows)[0])
    return tf.IndexedSlices(values, rows, gradient.dense_shape)


def lazy_update(optimizer, gradient, variable, learning_rate):
    """Adam on the rows present in `gradient`; every other row is left as it is.

    For the rows r of the (deduplicated) gradient, with the global step t:

        theta_r <- theta_r - lr * weight_decay * theta_r   (if weight decay applies)
        m_r, v_r, v_max_r and theta_r: the rule of Adam.update_step on row r

    Rows absent from the gradient keep theta, m, v and v_max bit for bit (their
    moments do not decay: that is what makes the update lazy).
    """
    gradient = deduplicate(gradient)  # again: an all-reduce may concatenate replicas' rows
    rows = gradient.indices
    dtype = optimizer.compute_dtype(variable.dtype)
    g = tf.cast(gradient.values, dtype)
    m, v, v_max = optimizer.slots(variable)
    beta_1, one_minus_beta_1, beta_2, one_minus_beta_2, epsilon = optimizer.coefficients(dtype)

    def rows_of(slot):
        return tf.cast(tf.gather(slot.value, rows), dtype)

    m_rows = beta_1 * rows_of(m) + one_minus_beta_1 * g
    v_rows = beta_2 * rows_of(v) + one_minus_beta_2 * tf.square(g)
    optimizer.assign(m, tf.IndexedSlices(tf.cast(m_rows, m.dtype), rows))
    optimizer.assign(v, tf.IndexedSlices(tf.cast(v_rows, v.dtype), rows))
    if optimizer.amsgrad:
        v_rows = tf.maximum(rows_of(v_max), v_rows)
        optimizer.assign(v_max, tf.IndexedSlices(tf.cast(v_rows, v_max.dtype), rows))

    c1, c2, c1_next = optimizer.bias_factors(dtype)
    lr = ops.cast(learning_rate, dtype)
    alpha, epsilon = _rule.step_size(lr, c1, c2, epsilon, optimizer.epsilon_placement)
    numerator = _rule.first_moment_numerator(
        m_rows, g, beta_1, one_minus_beta_1, c1, c1_next, optimizer.nesterov
    )
    step = _rule.guarded_step(alpha * numerator, tf.sqrt(v_rows), epsilon, optimizer.epsilon)
    if optimizer.decays(variable):
        # Keras decays before the step; both are subtracted from the same theta_r.
        theta_rows = tf.cast(tf.gather(variable, rows), dtype)
        step += theta_rows * ops.cast(optimizer.weight_decay, dtype) * lr
    optimizer.assign_sub(variable, tf.IndexedSlices(tf.cast(step, variable.dtype), rows))
