"""The paper's claims about Adam, checked on the real optimizer (every backend).

Each test runs keras_adam.Adam on a single vector of independent coordinates
and compares its steps with a closed form from Kingma & Ba (2014).
"""

import keras
import numpy as np
import pytest

import keras_adam

LR = 1e-3
# Every closed form here is a ratio of float32 quantities a few operations
# deep, evaluated once per step: 1e-5 relative covers float32 rounding of
# theta (|theta| <= 1: at most u, grid.UNIT_ROUNDOFF) relative to steps of
# ~lr = 1e-3.
REL = 1e-5


def _steps(gradients, **kwargs):
    """|delta theta| / lr for each step of `gradients` (rows: steps)."""
    theta = keras.Variable(np.zeros(gradients.shape[1], "float32"))
    optimizer = keras_adam.Adam(learning_rate=LR, **kwargs)
    previous, steps = np.zeros(gradients.shape[1]), []
    for g in gradients.astype("float32"):
        optimizer.apply([keras.ops.convert_to_tensor(g)], [theta])
        current = keras.ops.convert_to_numpy(theta).astype("float64")
        steps.append((previous - current) / LR)
        previous = current
    return np.array(steps)


def test_first_step_is_lr_whatever_the_gradient_scale():
    # Section 2.1: with bias correction, |step 1| = lr * |m_hat| / sqrt(v_hat)
    # = lr * |g| / |g| = lr. Scales from 1e-6 to 1e6 (epsilon negligible: 0).
    g = np.array([[1e-6, -3e-3, 0.5, -7.0, 2e2, -1e6]])
    steps = _steps(g, epsilon=0.0)
    np.testing.assert_allclose(steps[0], np.sign(g[0]), rtol=REL)


def test_scale_invariance():
    # Section 2.1: multiplying the loss (so every gradient) by 1000 leaves the
    # updates unchanged, except for epsilon. With the "hat" placement a step
    # is lr m_hat sqrt(c2) / (sqrt(v) + epsilon), so epsilon changes it by at
    # most epsilon / sqrt(v) relative (for the unscaled run; 1000x less for
    # the scaled one). v is computed here from the gradients in float64.
    rng = np.random.default_rng(0)
    g = rng.normal(size=(50, 8))
    v = np.zeros(8)
    epsilon_effect = []
    for row in g:
        v = 0.999 * v + 0.001 * row**2
        epsilon_effect.append(1e-7 / np.sqrt(v))
    scaled, plain = _steps(1000 * g), _steps(g)
    allowed = (np.array(epsilon_effect) + REL) * np.abs(plain) + REL
    assert np.all(np.abs(scaled - plain) <= allowed), np.max(np.abs(scaled - plain) - allowed)


def test_scale_invariance_is_broken_only_by_epsilon():
    # Guards the test above: with a large epsilon the scale does matter.
    rng = np.random.default_rng(0)
    g = rng.normal(size=(5, 8)) * 1e-3
    assert not np.allclose(_steps(1000 * g, epsilon=1e-3), _steps(g, epsilon=1e-3), rtol=0.01)


@pytest.mark.parametrize("beta_1,expected_first", [(0.9, 3.16), (0.99, 0.316)],
                         ids=["default-betas-larger", "beta_1=0.99-smaller"])
def test_without_bias_correction_steps_change_by_c1_over_sqrt_c2(beta_1, expected_first):
    # m and v are the same with or without correction; only the step is
    # divided by c1 / sqrt(c2). So uncorrected / corrected = c1 / sqrt(c2) =
    # (1 - beta_1^t) / sqrt(1 - beta_2^t) at every t (epsilon = 0). At t = 1
    # that is (1 - beta_1) / sqrt(1 - beta_2): 3.16 with the default betas
    # (larger early steps, section 3 of the paper) and 0.316 with beta_1 = 0.99.
    rng = np.random.default_rng(1)
    g = rng.normal(size=(10, 6))
    corrected = _steps(g, beta_1=beta_1, epsilon=0.0)
    uncorrected = _steps(g, beta_1=beta_1, epsilon=0.0, bias_correction=False)
    t = np.arange(1, 11)[:, None]
    factor = (1 - beta_1**t) / np.sqrt(1 - 0.999**t)
    np.testing.assert_allclose(uncorrected, corrected * factor, rtol=10 * REL)
    assert factor[0, 0] == pytest.approx(expected_first, rel=1e-3)


def _paper_bound():
    # Section 2.1: |step| <= lr (1 - b1) / sqrt(1 - b2) if (1 - b1) > sqrt(1 - b2),
    # else |step| <= lr. With the defaults, 0.1 > 0.0316: the bound is 3.16 lr.
    b1, b2 = 0.9, 0.999
    return (1 - b1) / np.sqrt(1 - b2) if (1 - b1) > np.sqrt(1 - b2) else 1.0


def test_bounds_hold_for_iid_gradient_noise():
    rng = np.random.default_rng(2)
    steps = np.abs(_steps(rng.normal(size=(300, 16))))
    assert steps.max() <= _paper_bound() * (1 + REL)
    # and in this typical case the step stays near lr, well inside the bound
    assert steps.max() < 1.5


def test_bounds_hold_for_one_gradient_then_zeros():
    # The most severe sparsity of section 2.1: one non-zero gradient, then zeros.
    g = np.zeros((100, 3))
    g[0] = [1.0, -50.0, 1e-3]
    steps = np.abs(_steps(g))
    assert steps.max() <= _paper_bound() * (1 + REL)


def test_bounds_are_approximate_for_growing_gradients():
    # g_t = 1.05^t: each new gradient dominates v's history less than m's, so
    # steps exceed lr (near 3 lr). The paper's "|step| <~ lr" is a heuristic;
    # the rigorous Cauchy-Schwarz bound (|m_t| <= (1-b1) sqrt(sum (b1^2/b2)^k)
    # sqrt(v_t / (1-b2))) holds at every step:
    #   lr (1-b1)/(1-b1^t) sqrt((1-b2^t)/(1-b2)) sqrt(sum_{k<t} (b1^2/b2)^k)
    b1, b2, n = 0.9, 0.999, 200
    t = np.arange(1, n + 1)
    steps = np.abs(_steps((1.05 ** t)[:, None]))[:, 0]
    ratio = b1**2 / b2
    partial = np.cumsum(ratio ** np.arange(n))  # sum_{k<t} ratio^k
    rigorous = (1 - b1) / (1 - b1**t) * np.sqrt((1 - b2**t) / (1 - b2)) * np.sqrt(partial)
    assert np.all(steps <= rigorous * (1 + REL))
    assert 2.5 < steps.max() < _paper_bound()  # well above lr, yet below 3.16 lr
