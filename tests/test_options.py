"""Every configuration of the option grid against the float64 reference."""

import numpy as np
import pytest
from grid import (
    GRID,
    GRID_IDS,
    GRID_KWARGS,
    KERAS_BASE_ARGUMENTS,
    SWITCHES,
    UNIT_ROUNDOFF,
    effective,
    float32_drift_bound,
    gradient_sequence,
    initial_values,
    reference_options,
    run_optimizer,
)

import keras_adam
from keras_adam import reference

# 200 steps: with the default beta_2 = 0.999, c2 = 1 - 0.999^200 is still 0.18,
# so the whole run is in the regime where bias correction matters; the
# "fast-betas" row (beta_2 = 0.95) crosses into the steady state (c2 ~ 1).
STEPS = 200
SEQUENCE = gradient_sequence(STEPS)
X0 = initial_values()


@pytest.mark.parametrize("kwargs", GRID_KWARGS, ids=GRID_IDS)
def test_matches_reference(kwargs):
    optimizer = keras_adam.Adam(**kwargs)
    variables = run_optimizer(optimizer, X0, SEQUENCE)
    kwargs = effective(kwargs)  # the values each variable gets from its group
    lr = kwargs.get("learning_rate", 1e-3)
    for i, (variable, x0) in enumerate(zip(variables, X0)):
        grads = [step[i] for step in SEQUENCE]
        theta, state = reference.run(x0, grads, **reference_options(kwargs))

        # Steps are at most ~(1-b1)/sqrt(1-b2) lr = 3.2 lr (section 2.1 of the
        # paper, reached without bias correction); 4 lr bounds every row.
        atol = float32_drift_bound(STEPS, 4 * lr, np.abs(theta).max())
        np.testing.assert_allclose(variable.numpy(), theta, rtol=0, atol=atol)

        m, v, v_max = optimizer.slots(variable)
        # v is a sum of non-negative terms: each step's multiply and add round
        # by u each, so its relative error grows at most ~2u per step. The
        # fused TF kernel adds a constant 1.3e-5 (it forms 1 - beta_2 from
        # float32 beta_2), inside this 2.4e-5 for 200 steps.
        np.testing.assert_allclose(v.numpy(), state.v, rtol=2 * STEPS * UNIT_ROUNDOFF)
        # m mixes signs, so its error is relative to the gradient scale, not m.
        m_atol = 2 * STEPS * UNIT_ROUNDOFF * np.abs(grads).max()
        np.testing.assert_allclose(m.numpy(), state.m, rtol=0, atol=m_atol)
        if kwargs.get("amsgrad"):
            np.testing.assert_allclose(
                v_max.numpy(), state.v_max, rtol=2 * STEPS * UNIT_ROUNDOFF
            )
        else:
            assert v_max is None
    assert int(optimizer.iterations.numpy()) == STEPS


def test_eager_steps_match_reference():
    # The same rule outside tf.function (on TensorFlow), over fewer steps.
    steps, kwargs = 20, dict(amsgrad=True, nesterov=True, epsilon_placement="paper")
    sequence = SEQUENCE[:steps]
    optimizer = keras_adam.Adam(**kwargs)
    variables = run_optimizer(optimizer, X0, sequence, compiled=False)
    for i, (variable, x0) in enumerate(zip(variables, X0)):
        theta, _ = reference.run(x0, [s[i] for s in sequence], **kwargs)
        atol = float32_drift_bound(steps, 4e-3, np.abs(theta).max())
        np.testing.assert_allclose(variable.numpy(), theta, rtol=0, atol=atol)


def test_grid_covers_every_switch():
    """A new constructor argument must get a row in tests/grid.py."""
    import inspect

    own = set(inspect.signature(keras_adam.Adam.__init__).parameters)
    ours = own - KERAS_BASE_ARGUMENTS - {"self", "kwargs"}
    exercised = {key for kwargs in GRID_KWARGS for key in kwargs}
    assert ours <= exercised, f"untested constructor arguments: {sorted(ours - exercised)}"
    for name, values in SWITCHES.items():
        seen = {kwargs.get(name, values[0]) for _, kwargs in GRID}
        assert seen == set(values), f"{name} takes {seen}, expected {values}"
