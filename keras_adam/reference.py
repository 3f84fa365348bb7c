"""Adam in plain NumPy float64: the test oracle, to read beside the paper.

This module imports no Keras and no framework. It applies the same rule as
`keras_adam.Adam` with every option, one step at a time, in float64, so that a
float32 implementation can be judged against it. The steps appear in the order
of Algorithm 1 of Kingma & Ba (2014):

    t       <- t + 1
    g       <- gradient at step t
    m       <- beta_1 * m + (1 - beta_1) * g              (1st moment)
    v       <- beta_2 * v + (1 - beta_2) * g^2            (2nd raw moment)
    v_max   <- max(v_max, v); use v_max as v below        (amsgrad only)
    c1, c2  =  1 - beta_1^t, 1 - beta_2^t                 (1, 1 if no bias correction)
    m_hat   =  m / c1
            or beta_1 * m / (1 - beta_1^(t+1)) + (1 - beta_1) * g / c1   (nesterov)
    D       =  (sqrt(v) + epsilon) / sqrt(c2)             (placement "hat")
            or sqrt(v / c2) + epsilon                     (placement "paper")
    theta   <- theta - lr * m_hat / D

Decoupled weight decay (Loshchilov & Hutter 2019), as Keras applies it before
the Adam step: theta <- theta - lr * weight_decay * theta.

Example:

>>> import numpy as np
>>> from keras_adam import reference
>>> theta, state = np.zeros(3), reference.init_state(np.zeros(3))
>>> theta, state = reference.step(theta, np.array([1.0, -2.0, 0.5]), state)
>>> np.round(theta, 6)   # the first step moves each coordinate by lr * sign(g)
array([-0.001,  0.001, -0.001])
"""

from dataclasses import dataclass

import numpy as np


@dataclass
class State:
    """Adam's state for one parameter array: the step count and the moments."""

    t: int
    m: np.ndarray
    v: np.ndarray
    v_max: np.ndarray


def init_state(theta):
    """Zero moments and t = 0 for a parameter array shaped like `theta`."""
    zeros = np.zeros(np.shape(theta), dtype=np.float64)
    return State(t=0, m=zeros, v=zeros.copy(), v_max=zeros.copy())


def step(
    theta,
    g,
    state,
    *,
    learning_rate=0.001,
    beta_1=0.9,
    beta_2=0.999,
    epsilon=1e-7,
    amsgrad=False,
    nesterov=False,
    bias_correction=True,
    epsilon_placement="hat",
    weight_decay=None,
):
    """One Adam step in float64. Returns (new theta, new state); inputs unchanged.

    The keyword arguments mean exactly what they mean for `keras_adam.Adam`;
    `learning_rate` is the value at this step (a float).
    """
    theta = np.asarray(theta, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    lr = float(learning_rate)
    t = state.t + 1

    if weight_decay is not None:
        theta = theta - lr * weight_decay * theta

    m = beta_1 * state.m + (1.0 - beta_1) * g
    v = beta_2 * state.v + (1.0 - beta_2) * g**2
    v_max = np.maximum(state.v_max, v) if amsgrad else state.v_max
    v_used = v_max if amsgrad else v

    if bias_correction:
        c1, c2 = 1.0 - beta_1**t, 1.0 - beta_2**t
        c1_next = 1.0 - beta_1 ** (t + 1)
    else:
        c1 = c2 = c1_next = 1.0

    if nesterov:
        m_hat = beta_1 * m / c1_next + (1.0 - beta_1) * g / c1
    else:
        m_hat = m / c1

    if epsilon_placement == "hat":
        denom = (np.sqrt(v_used) + epsilon) / np.sqrt(c2)
    elif epsilon_placement == "paper":
        denom = np.sqrt(v_used / c2) + epsilon
    else:
        raise ValueError(
            "`epsilon_placement` must be one of ('hat', 'paper'). "
            f"Received: epsilon_placement={epsilon_placement!r}"
        )

    theta = theta - lr * m_hat / denom
    return theta, State(t=t, m=m, v=v, v_max=v_max)


def run(theta, gradients, learning_rates=None, **options):
    """Applies `step` for each gradient in `gradients`, in order.

    Args:
        theta: initial parameters (array-like).
        gradients: a sequence of gradient arrays shaped like `theta`.
        learning_rates: optional sequence of per-step learning rates (to follow
            a schedule); otherwise `options["learning_rate"]` or 0.001 is used.
        **options: the keyword arguments of `step`.

    Returns:
        (final theta, final State).
    """
    state = init_state(theta)
    theta = np.asarray(theta, dtype=np.float64)
    for i, g in enumerate(gradients):
        if learning_rates is not None:
            options["learning_rate"] = learning_rates[i]
        theta, state = step(theta, g, state, **options)
    return theta, state


# --- Blockwise 8-bit moments (moment_dtype="8bit") ---------------------------
# The same scheme as keras_adam's, written apart from it, in float64: codes
# are rounded in the law's scale, j = round(127 (|x| / s)^(1/4)) for m and
# k = round(255 (v / s)^(1/8)) for v, and decode to sign(j) (|j| / 127)^4 s
# and (k / 255)^8 s.

M_VALUES = np.sign(np.arange(-127, 128)) * (np.abs(np.arange(-127, 128)) / 127.0) ** 4
V_VALUES = (np.arange(256) / 255.0) ** 8


def _rows(x):
    return np.reshape(x, (x.shape[0] if x.ndim >= 2 else 1, -1))


def block_length(cols, block_size):
    """The blocks' length in a row of `cols`: all of it if shorter than `block_size`;
    else the largest divisor of `cols` that is at most `block_size` and more
    than half of it; else `block_size` (the last block shorter)."""
    if cols <= block_size:
        return max(cols, 1)
    divisors = [d for d in range(block_size // 2 + 1, block_size + 1) if cols % d == 0]
    return max(divisors) if divisors else block_size


def quantize(x, signed, block_size=256):
    """(codes, scales): absmax per block of each row, codes j in -127..127 (m) or k in 0..255 (v).

    Rows are x's first dimension (a 1-D x is one row); blocks of
    `block_length` run along each row.
    """
    rows = _rows(np.asarray(x, dtype=np.float64))
    block_size = block_length(rows.shape[1], block_size)
    codes = np.zeros(rows.shape, dtype=np.int64)
    scales = np.zeros((rows.shape[0], -(-rows.shape[1] // block_size)))
    for b in range(scales.shape[1]):
        block = rows[:, b * block_size:(b + 1) * block_size]
        scale = np.max(np.abs(block), axis=1, keepdims=True)
        a = np.abs(block) / np.where(scale > 0, scale, 1.0)
        if signed:
            code = np.sign(block) * np.round(127 * a ** 0.25)
        else:
            code = np.round(255 * a ** 0.125)
        codes[:, b * block_size:(b + 1) * block_size] = code
        scales[:, b] = scale[:, 0]
    return codes.reshape(np.shape(x)), scales


def dequantize(codes, scales, signed, block_size=256):
    """The values of `codes` times their blocks' scales (the inverse of `quantize`)."""
    rows = _rows(codes)
    block_size = block_length(rows.shape[1], block_size)
    per_element = np.repeat(scales, block_size, axis=1)[:, :rows.shape[1]]
    values = M_VALUES[rows + 127] if signed else V_VALUES[rows]
    return (values * per_element).reshape(np.shape(codes))


def run_8bit(theta, gradients, block_size=256, **options):
    """`run` with m, v, v_max stored as blockwise 8-bit codes between steps.

    Before each step the moments are dequantized and v, v_max raised to
    m^2 / K (K = (1 - beta_1)^2 / ((1 - beta_2) (1 - beta_1^2 / beta_2)), the
    bound m^2 <= K v of exact arithmetic, for beta_1^2 < beta_2); after it
    they are quantized again. Returns (final theta, final dequantized State).
    """
    beta_1, beta_2 = options.get("beta_1", 0.9), options.get("beta_2", 0.999)
    if beta_1 ** 2 >= beta_2:
        raise ValueError("run_8bit models beta_1^2 < beta_2 only")
    bound = (1 - beta_1) ** 2 / ((1 - beta_2) * (1 - beta_1 ** 2 / beta_2))
    theta = np.asarray(theta, dtype=np.float64)
    state = init_state(theta)
    for g in gradients:
        theta, state = step(theta, g, state, **options)
        stored = {name: dequantize(*quantize(getattr(state, name), name == "m", block_size),
                                   name == "m", block_size)
                  for name in ("m", "v", "v_max")}
        floor = stored["m"] ** 2 / bound
        state = State(t=state.t, m=stored["m"], v=np.maximum(stored["v"], floor),
                      v_max=np.maximum(stored["v_max"], floor))
    return theta, state
