"""Small pure pieces of Adam's rule, shared by every update path.

Written with `keras.ops` only, so they run on any Keras backend. The names
follow Kingma & Ba (2014), Algorithm 1: `t` is the 1-based step, `c1` and `c2`
are the bias factors 1 - beta_1^t and 1 - beta_2^t.
"""

import math

from keras import ops

EPSILON_PLACEMENTS = ("hat", "paper")


def wide_dtype(dtype):
    """float32 at least: the dtype for arithmetic that `dtype` is too narrow for.

    beta_2^t rounds to exactly 1 in bfloat16 (and badly in float16) for the
    whole useful range of t, which would make c2 zero, so powers are taken in
    this dtype and cast afterwards; with a `moment_dtype`, the whole update is.
    """
    return "float64" if dtype == "float64" else "float32"


def coefficients(beta_1, beta_2, epsilon, dtype):
    """(beta_1, 1 - beta_1, beta_2, 1 - beta_2, epsilon) as scalars of `dtype`.

    1 - beta is formed from the Python floats (float64) before conversion:
    from float32(0.999) it would be 1.3e-5 relative off. The conversion names
    the dtype because `python_float * tensor` goes through float32 on some
    backends (torch), which would cost a float64 variable its precision.
    """
    return tuple(
        ops.convert_to_tensor(x, dtype=dtype)
        for x in (beta_1, 1.0 - beta_1, beta_2, 1.0 - beta_2, epsilon)
    )


def bias_factors(t, beta_1, beta_2, bias_correction, dtype):
    """Returns (c1, c2, c1_next) as scalars of `dtype`.

        c1 = 1 - beta_1^t,  c2 = 1 - beta_2^t,  c1_next = 1 - beta_1^(t+1)

    All three are 1 when `bias_correction` is False. `c1_next` is only used by
    the Nesterov estimate of m_hat.

    Computed as 1 - beta^t = -expm1(t * ln(beta)) with ln(beta) taken in
    float64 (beta is a Python float). The direct form loses digits twice in
    float32: beta = 0.999 itself rounds with an error of 1.3e-8, which is
    1.3e-5 relative to 1 - beta, and 1 - beta^t cancels for small t. This
    form keeps c1 and c2 within a few float32 ulps for every t.
    """
    if not bias_correction:
        one = ops.ones((), dtype=dtype)
        return one, one, one
    wide = wide_dtype(dtype)
    t = ops.cast(t, wide)
    log_beta_1 = ops.convert_to_tensor(_log(beta_1), dtype=wide)
    log_beta_2 = ops.convert_to_tensor(_log(beta_2), dtype=wide)
    c1 = -ops.expm1(t * log_beta_1)
    c2 = -ops.expm1(t * log_beta_2)
    c1_next = -ops.expm1((t + 1.0) * log_beta_1)
    return ops.cast(c1, dtype), ops.cast(c2, dtype), ops.cast(c1_next, dtype)


def _log(beta):
    # beta = 0 gives ln(0) = -inf, so beta^t = exp(-inf) = 0 and c = 1, as
    # 1 - 0^t should be for t >= 1.
    return math.log(beta) if beta > 0.0 else -math.inf


def first_moment_numerator(m, g, beta_1, one_minus_beta_1, c1, c1_next, nesterov):
    """c1 * m_hat: the first-moment estimate before division by c1.

    Plain Adam:  m_hat = m / c1, so c1 * m_hat = m.
    Nesterov:    m_hat = beta_1 * m / c1_next + (1 - beta_1) * g / c1
                 (Dozat 2016, NAdam without the momentum schedule: the
                 look-ahead uses the momentum step t+1 would apply), so
                 c1 * m_hat = (beta_1 * c1 / c1_next) * m + (1 - beta_1) * g.
    The 1/c1 is folded into the step size (see `step_size`).
    """
    if not nesterov:
        return m
    return (beta_1 * c1 / c1_next) * m + one_minus_beta_1 * g


def step_size(lr, c1, c2, epsilon, epsilon_placement):
    """(alpha, epsilon') such that lr * m_hat / D = alpha * (c1 * m_hat) / (sqrt(v) + epsilon').

    "hat"   (Keras, TensorFlow kernels; the epsilon-hat of section 2):
            D = (sqrt(v) + epsilon) / sqrt(c2)
            => alpha = lr * sqrt(c2) / c1,  epsilon' = epsilon
    "paper" (Algorithm 1; PyTorch, optax):
            D = sqrt(v / c2) + epsilon = (sqrt(v) + epsilon * sqrt(c2)) / sqrt(c2)
            => alpha = lr * sqrt(c2) / c1,  epsilon' = epsilon * sqrt(c2)

    The two agree when epsilon = 0; otherwise "hat" acts as a larger epsilon
    early in training, epsilon / sqrt(c2). Folding the scalars leaves one
    division per element instead of three, which is what XLA and the
    elementwise kernels then execute.
    """
    sqrt_c2 = ops.sqrt(c2)
    alpha = lr * sqrt_c2 / c1
    if epsilon_placement == "paper":
        epsilon = epsilon * sqrt_c2
    return alpha, epsilon


def guarded_step(scaled_numerator, sqrt_v, epsilon, epsilon_value):
    """scaled_numerator / (sqrt(v) + epsilon'), and 0 where that is 0/0.

    With epsilon = 0, a coordinate whose v is 0 (its gradients were all zero,
    or underflowed) would give 0/0 = NaN, which keras.optimizers.Adam returns.
    No gradient means no step, so the step is defined as 0 there. With
    epsilon > 0 the denominator is never 0 and no guard is built.
    """
    step = scaled_numerator / (sqrt_v + epsilon)
    if epsilon_value > 0:
        return step
    return ops.where(sqrt_v > 0, step, ops.zeros_like(step))
