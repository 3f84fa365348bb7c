"""The float64 oracle checked against closed forms, on its own (no Keras)."""

import numpy as np
import pytest

from keras_adam import reference

# NumPy float64 only (keras_adam.reference imports no Keras): the same on
# every backend, so it runs once rather than in each backend's run.
pytestmark = pytest.mark.backend_independent

G = np.array([3.0, -0.02, 7e-4, -150.0, 1.0])
LR = 0.01
# With epsilon = 0 every quantity below is a ratio of float64 numbers a few
# operations deep, so closed forms hold to float64 roundoff (~1e-16 relative);
# 1e-12 leaves room for the square roots.
EXACT = 1e-12


@pytest.mark.parametrize("placement", ["hat", "paper"])
def test_first_step_is_lr_times_sign(placement):
    # m = (1-b1) g, v = (1-b2) g^2, so m/c1 = g and v/c2 = g^2: the first
    # bias-corrected step is exactly lr * sign(g) when epsilon is 0.
    theta, _ = reference.step(np.zeros(5), G, reference.init_state(G),
                              learning_rate=LR, epsilon=0.0, epsilon_placement=placement)
    np.testing.assert_allclose(theta, -LR * np.sign(G), rtol=EXACT)


def test_first_nesterov_step_closed_form():
    # m_hat = b1 (1-b1) g / (1-b1^2) + (1-b1) g / (1-b1) = g (1 + b1 / (1+b1)).
    b1 = 0.9
    theta, _ = reference.step(np.zeros(5), G, reference.init_state(G),
                              learning_rate=LR, epsilon=0.0, nesterov=True, beta_1=b1)
    np.testing.assert_allclose(theta, -LR * (1 + b1 / (1 + b1)) * np.sign(G), rtol=EXACT)


def test_first_step_without_bias_correction():
    # m = (1-b1) g and v = (1-b2) g^2 unscaled: the step is lr (1-b1)/sqrt(1-b2).
    b1, b2 = 0.9, 0.999
    theta, _ = reference.step(np.zeros(5), G, reference.init_state(G), learning_rate=LR,
                              epsilon=0.0, bias_correction=False)
    np.testing.assert_allclose(theta, -LR * (1 - b1) / np.sqrt(1 - b2) * np.sign(G), rtol=EXACT)


@pytest.mark.parametrize("placement", ["hat", "paper"])
def test_zero_gradients_never_move(placement):
    theta0 = np.array([1.0, -2.0, 3.0])
    theta, state = reference.run(theta0, [np.zeros(3)] * 50, epsilon_placement=placement)
    np.testing.assert_array_equal(theta, theta0)
    assert state.t == 50


def test_placements_agree_when_epsilon_is_zero():
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=4) for _ in range(30)]
    hat, _ = reference.run(np.ones(4), grads, epsilon=0.0, epsilon_placement="hat")
    paper, _ = reference.run(np.ones(4), grads, epsilon=0.0, epsilon_placement="paper")
    np.testing.assert_allclose(hat, paper, rtol=EXACT)


def test_placements_differ_when_epsilon_matters():
    # Guards the test above: with a large epsilon the two rules must disagree
    # (hat's effective epsilon is epsilon / sqrt(c2), larger early on).
    grads = [np.full(2, 1e-2)] * 3
    hat, _ = reference.run(np.ones(2), grads, epsilon=1e-2, epsilon_placement="hat")
    paper, _ = reference.run(np.ones(2), grads, epsilon=1e-2, epsilon_placement="paper")
    assert np.all(np.abs(hat - 1) < np.abs(paper - 1))


def test_amsgrad_keeps_the_running_maximum():
    # A large gradient then small ones: v decays but v_max must not.
    grads = [np.array([10.0])] + [np.array([0.1])] * 20
    _, state = reference.run(np.zeros(1), grads, amsgrad=True)
    v_first = (1 - 0.999) * 100.0
    np.testing.assert_allclose(state.v_max, v_first, rtol=EXACT)
    assert state.v[0] < state.v_max[0]


def test_weight_decay_is_decoupled():
    # With g = 0 only the decay acts: theta_t = theta_0 (1 - lr wd)^t.
    theta, _ = reference.run(np.array([2.0]), [np.zeros(1)] * 10, learning_rate=0.1,
                             weight_decay=0.5)
    np.testing.assert_allclose(theta, 2.0 * (1 - 0.05) ** 10, rtol=EXACT)


def test_unknown_placement_is_refused():
    with pytest.raises(ValueError, match="epsilon_placement"):
        reference.step(np.zeros(1), np.ones(1), reference.init_state(np.zeros(1)),
                       epsilon_placement="torch")


def test_inputs_are_not_modified():
    theta, g = np.ones(3), np.ones(3)
    state = reference.init_state(theta)
    reference.step(theta, g, state)
    np.testing.assert_array_equal(theta, 1.0)
    np.testing.assert_array_equal(state.m, 0.0)
    assert state.t == 0
