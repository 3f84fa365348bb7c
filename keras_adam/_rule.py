"""Adam's rule, once: the update as a pure function of the state, plus its scalars.

Every update path calls `rule` (the dense portable path on whole variables,
the lazy sparse path on gathered rows) or is tested equal to it (the fused
kernels). Nothing here knows how m, v and v_max are stored: that is
`keras_adam._state`. Written with `keras.ops` only, so it runs on any Keras
backend. The names follow Kingma & Ba (2014), Algorithm 1: `t` is the 1-based
step, `c1` and `c2` are the bias factors 1 - beta_1^t and 1 - beta_2^t.

The bias factors and the fold of the epsilon placement into the step size
live here and nowhere else; host-side code (the torch kernel's arguments,
`AdamMonitor`) calls the float versions below.
"""

import dataclasses
import math

from keras import ops

EPSILON_PLACEMENTS = ("hat", "paper")


@dataclasses.dataclass(frozen=True)
class Hyper:
    """The rule's hyperparameters, as plain Python values (hashable, frozen).

    `epsilon` is epsilon-hat or the paper's epsilon according to
    `epsilon_placement` (see `fold_step_size`).
    """

    beta_1: float
    beta_2: float
    epsilon: float
    amsgrad: bool
    nesterov: bool
    bias_correction: bool
    epsilon_placement: str

    def __hash__(self):
        # Hashed several times for each variable at each step (the keys of
        # compiled functions and of per-step values): computed once.
        value = self.__dict__.get("_hash")
        if value is None:
            value = hash(tuple(getattr(self, name) for name in HYPER_FIELDS))
            object.__setattr__(self, "_hash", value)
        return value

    def __getstate__(self):
        # Without the cached hash: a string's hash differs between processes.
        return {name: getattr(self, name) for name in HYPER_FIELDS}


# The constructor arguments that `Hyper` holds, in its order.
HYPER_FIELDS = tuple(field.name for field in dataclasses.fields(Hyper))


@dataclasses.dataclass(frozen=True)
class Scalars:
    """One step's scalars in one dtype: the same for every variable of that dtype.

    `lr` is the learning rate at this step; `alpha` and `epsilon` are the
    folded step size and epsilon' of `fold_step_size`; `nesterov_momentum` is
    beta_1 * c1 / c1_next (see `rule`), None without Nesterov.
    """

    lr: object
    beta_1: object
    one_minus_beta_1: object
    beta_2: object
    one_minus_beta_2: object
    c1: object
    c2: object
    nesterov_momentum: object
    alpha: object
    epsilon: object


def rule(g, m, v, v_max, s, hyper):
    """One Adam step for arrays of the compute dtype. Returns (m, v, v_max, step).

    Algorithm 1 of Kingma & Ba (2014), in its order, with the options:

        m      <- beta_1 * m + (1 - beta_1) * g
        v      <- beta_2 * v + (1 - beta_2) * g^2
        v_max  <- max(v_max, v); v_max stands for v below       (amsgrad)
        m_hat  =  m / c1
               or beta_1 * m / c1_next + (1 - beta_1) * g / c1   (nesterov)
        D      =  (sqrt(v) + epsilon) / sqrt(c2)                (placement "hat")
               or sqrt(v / c2) + epsilon                        (placement "paper")
        step   =  lr * m_hat / D;   the caller applies theta <- theta - step

    `g`, `m`, `v` (and `v_max` with amsgrad; otherwise pass None and None
    comes back) are whole variables or gathered rows alike; `s` is the step's
    `Scalars`, `hyper` its `Hyper`. The last line is computed as
    alpha * (c1 * m_hat) / (sqrt(v) + epsilon'), with the scalar factors
    gathered by `fold_step_size`: one division per element instead of three,
    which is what XLA and the elementwise kernels then execute.
    """
    m = s.beta_1 * m + s.one_minus_beta_1 * g
    v = s.beta_2 * v + s.one_minus_beta_2 * ops.square(g)
    if hyper.amsgrad:
        # max(v_max, v), written as a select: keras.ops.maximum on torch
        # (Keras 3.15) computes float64 inputs in float32 (found by
        # tests/test_rule.py in float64).
        v_max = ops.where(v_max > v, v_max, v)
    v_hat_source = v_max if hyper.amsgrad else v

    # c1 * m_hat. Nesterov (Dozat 2016, NAdam without the momentum schedule:
    # the look-ahead uses the momentum step t+1 would apply):
    #   c1 * m_hat = (beta_1 * c1 / c1_next) * m + (1 - beta_1) * g.
    c1_m_hat = m
    if hyper.nesterov:
        c1_m_hat = s.nesterov_momentum * m + s.one_minus_beta_1 * g

    sqrt_v = ops.sqrt(v_hat_source)
    step = s.alpha * c1_m_hat / (sqrt_v + s.epsilon)
    if hyper.epsilon == 0:
        # With epsilon = 0 a coordinate whose v is 0 (its gradients were all
        # zero, or underflowed) would give 0/0 = NaN, as keras.optimizers.Adam
        # does. No gradient means no step, so the step is 0 there.
        step = ops.where(sqrt_v > 0, step, ops.zeros_like(step))
    return m, v, v_max, step


def step_scalars(hyper, t, lr, dtype):
    """The `Scalars` of step `t` (a tensor, 1-based) at learning rate `lr`, in `dtype`."""
    beta_1, one_minus_beta_1, beta_2, one_minus_beta_2, epsilon = coefficients(
        hyper.beta_1, hyper.beta_2, hyper.epsilon, dtype
    )
    c1, c2, c1_next = bias_factors(
        t, hyper.beta_1, hyper.beta_2, hyper.bias_correction, dtype
    )
    lr = ops.cast(lr, dtype)
    alpha, epsilon = fold_step_size(lr, c1, c2, epsilon, hyper.epsilon_placement)
    return Scalars(
        lr=lr,
        beta_1=beta_1,
        one_minus_beta_1=one_minus_beta_1,
        beta_2=beta_2,
        one_minus_beta_2=one_minus_beta_2,
        c1=c1,
        c2=c2,
        nesterov_momentum=beta_1 * c1 / c1_next if hyper.nesterov else None,
        alpha=alpha,
        epsilon=epsilon,
    )


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
    """Returns (c1, c2, c1_next) as scalars of `dtype`, for a tensor step `t`.

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
    log_beta_1 = ops.convert_to_tensor(log_beta(beta_1), dtype=wide)
    log_beta_2 = ops.convert_to_tensor(log_beta(beta_2), dtype=wide)
    c1 = -ops.expm1(t * log_beta_1)
    c2 = -ops.expm1(t * log_beta_2)
    c1_next = -ops.expm1((t + 1.0) * log_beta_1)
    return ops.cast(c1, dtype), ops.cast(c2, dtype), ops.cast(c1_next, dtype)


def bias_factors_float(t, beta_1, beta_2, bias_correction):
    """(c1, c2) as Python floats for an integer step `t`: `bias_factors` on the host."""
    if not bias_correction:
        return 1.0, 1.0
    return -math.expm1(t * log_beta(beta_1)), -math.expm1(t * log_beta(beta_2))


def log_beta(beta):
    """ln(beta) in double precision, for 1 - beta^t = -expm1(t ln(beta))."""
    # beta = 0 gives ln(0) = -inf, so beta^t = exp(-inf) = 0 and c = 1, as
    # 1 - 0^t should be for t >= 1.
    return math.log(beta) if beta > 0.0 else -math.inf


def fold_step_size(lr, c1, c2, epsilon, epsilon_placement, sqrt=ops.sqrt):
    """(alpha, epsilon') with lr * m_hat / D = alpha * (c1 * m_hat) / (sqrt(v) + epsilon').

    "hat"   (Keras, TensorFlow kernels; the epsilon-hat of section 2):
            D = (sqrt(v) + epsilon) / sqrt(c2)
            => alpha = lr * sqrt(c2) / c1,  epsilon' = epsilon
    "paper" (Algorithm 1; PyTorch, optax):
            D = sqrt(v / c2) + epsilon = (sqrt(v) + epsilon * sqrt(c2)) / sqrt(c2)
            => alpha = lr * sqrt(c2) / c1,  epsilon' = epsilon * sqrt(c2)

    The two agree when epsilon = 0; otherwise "hat" acts as a larger epsilon
    early in training, epsilon / sqrt(c2). Works on tensors, or on Python
    floats with `sqrt=math.sqrt`.
    """
    sqrt_c2 = sqrt(c2)
    alpha = lr * sqrt_c2 / c1
    if epsilon_placement == "paper":
        epsilon = epsilon * sqrt_c2
    return alpha, epsilon


def moment_bound(beta_1, beta_2, n):
    """K_n with m^2 <= K_n * v for every element after n steps of `rule`, or None if unbounded.

    By Cauchy-Schwarz, with r = beta_1^2 / beta_2 and c = (1 - beta_1)^2 / (1 - beta_2),

        (beta_1 m + (1 - beta_1) g)^2 <= (r m^2 / v + c) (beta_2 v + (1 - beta_2) g^2),

    so m_n^2 <= K_n v_n with K_0 = 0 and K_n = r K_(n-1) + c, i.e.
    K_n = c (1 + r + ... + r^(n-1)) <= c / (1 - r) when r < 1 (the usual case:
    beta_1 = 0.9, beta_2 = 0.999 give K = 52.9). This is what keeps
    |m| / sqrt(v) <= sqrt(K) in exact arithmetic: the float32 rule's largest
    step. Quantized moments can break it (v stored as 0 where m is not); an
    8-bit read restores it (`keras_adam._state.Blockwise8bit`). With
    beta_2 = 0, v = g^2 alone and m is not bounded by it: None.

    Args:
        beta_1, beta_2: Python floats.
        n: the number of steps taken (a scalar tensor; used only when r >= 1).
    """
    if beta_2 == 0.0:
        return None
    r = beta_1 * beta_1 / beta_2
    c = (1.0 - beta_1) ** 2 / (1.0 - beta_2)
    if r < 1.0:
        # K_n grows towards this limit: using it is valid for every n.
        return c / (1.0 - r)
    n = ops.maximum(ops.cast(n, "float32"), 1.0)
    if r == 1.0:
        return c * n
    return c * (ops.power(r, n) - 1.0) / (r - 1.0)
