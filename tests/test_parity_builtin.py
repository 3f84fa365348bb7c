"""keras_adam.Adam against keras.optimizers.Adam, which it must match by default.

Both optimizers see the same fixed gradient sequence. Every optimizer variable
is compared by position: our slots are created in the built-in's order
(iteration, learning rate, EMA copies, accumulators, m and v per variable,
then all v_max),
so this checks m, v, v_max, the step counter, EMA and accumulation buffers too.
"""

import math

import keras
import numpy as np
import pytest
from grid import (
    UNIT_ROUNDOFF,
    float32_drift_bound,
    gradient_sequence,
    initial_values,
    run_optimizer,
)

import keras_adam

# 1,000 steps: c2 = 1 - 0.999^t goes from 0.001 to 0.63, through the whole
# range where bias correction matters for the default beta_2.
STEPS = 1000
SEQUENCE = gradient_sequence(STEPS, seed=7)
X0 = initial_values(seed=8)


SLOT_RTOL = 2 * 2 * STEPS * UNIT_ROUNDOFF  # see test_apply_matches_builtin
ATOL_M = 2.4e-5  # see test_apply_matches_builtin


def _schedule():
    return keras.optimizers.schedules.ExponentialDecay(1e-2, decay_steps=100, decay_rate=0.5)


# (id, keras_adam class, built-in class, shared kwargs)
CASES = [
    ("defaults", keras_adam.Adam, keras.optimizers.Adam, {}),
    ("amsgrad", keras_adam.Adam, keras.optimizers.Adam, dict(amsgrad=True)),
    ("adamw", keras_adam.AdamW, keras.optimizers.AdamW, dict(weight_decay=0.1)),
    ("clipnorm", keras_adam.Adam, keras.optimizers.Adam, dict(clipnorm=0.5)),
    ("global_clipnorm", keras_adam.Adam, keras.optimizers.Adam, dict(global_clipnorm=0.5)),
    ("clipvalue", keras_adam.Adam, keras.optimizers.Adam, dict(clipvalue=0.01)),
    ("schedule", keras_adam.Adam, keras.optimizers.Adam, dict(learning_rate=_schedule)),
    ("ema", keras_adam.Adam, keras.optimizers.Adam,
     dict(use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=50)),
    ("accumulation", keras_adam.Adam, keras.optimizers.Adam, dict(gradient_accumulation_steps=3)),
    ("loss_scale", keras_adam.Adam, keras.optimizers.Adam, dict(loss_scale_factor=128.0)),
]


def _build(cls, kwargs):
    kwargs = {k: (v() if k == "learning_rate" and callable(v) else v) for k, v in kwargs.items()}
    return cls(**kwargs)


@pytest.mark.parametrize("ours_cls,builtin_cls,kwargs", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_apply_matches_builtin(ours_cls, builtin_cls, kwargs):
    ours, builtin = _build(ours_cls, kwargs), _build(builtin_cls, kwargs)
    ours_vars = run_optimizer(ours, X0, SEQUENCE)
    builtin_vars = run_optimizer(builtin, X0, SEQUENCE)

    # float32_drift_bound (tests/grid.py) adds every step's error with one
    # sign: N steps' worth, a worst case. The two runs' errors do not add
    # that way: each step's roundings (of the update and of theta) are new,
    # independent of the last step's, and of either sign, so the difference
    # between the runs is a random walk and grows as sqrt(N), not N. Each run
    # then drifts by sqrt(N) steps' worth of the bound, and the two apart by
    # twice that. Steps are at most ~lr with bias correction; the schedule
    # starts at lr = 1e-2. Measured on all three backends: at most 1.9e-6
    # (schedule, torch; 1.4e-6 without a schedule), against this bound's
    # 8e-6 to 1e-5 (N steps' worth would be 3e-4).
    lr = 1e-2 if "learning_rate" in kwargs else 1e-3
    for a, b in zip(ours_vars, builtin_vars):
        atol = 2 * float32_drift_bound(math.sqrt(STEPS), lr, np.abs(b.numpy()).max())
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=atol)

    assert len(ours.variables) == len(builtin.variables)
    for a, b in zip(ours.variables, builtin.variables):
        assert a.shape == b.shape
        # Slots are EMAs of g and g^2 (and of theta for use_ema): their float32
        # rounding accumulates ~2u per step relative, 2 * 1000 * u = 1.2e-4,
        # for each implementation: SLOT_RTOL = 2.4e-4 for the two.
        # m mixes signs and crosses zero, where a relative bound says nothing;
        # there its error is what earlier roundings left: each step rounds by
        # about u * |m| and the error then decays by beta_1, so it is a random
        # walk of about u * |m| / sqrt(1 - beta_1^2). With gradients of scale
        # up to 1e2 (tests/grid.py), |m| ~ (1 - beta_1) * 1e2 / sqrt(1 - beta_1^2)
        # = 23, so the walk's spread is ~3e-6 per implementation, 4.5e-6 for
        # the difference; ATOL_M is five of those.
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=SLOT_RTOL, atol=ATOL_M)


def _mlp():
    return keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(1),
    ])


@pytest.mark.parametrize("kwargs", [{}, dict(amsgrad=True)], ids=["defaults", "amsgrad"])
def test_fit_matches_builtin(kwargs):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1)) + 0.5).astype("float32")
    weights = _mlp().get_weights()
    results = []
    for optimizer in (keras_adam.Adam(**kwargs), keras.optimizers.Adam(**kwargs)):
        model = _mlp()
        model.set_weights(weights)
        model.compile(optimizer=optimizer, loss="mse")
        model.fit(x, y, batch_size=32, epochs=5, shuffle=False, verbose=0)
        results.append(model.get_weights())
    # 40 steps at lr = 1e-3. The optimizers differ only by float32 rounding
    # (the N-step drift bound of tests/grid.py, ~2e-5 for |w| < 2); feedback
    # through the gradients can amplify it, but over 40 small steps the map
    # stays close to the identity.
    # Measured: ~1e-7.
    for a, b in zip(*results):
        atol = 2 * float32_drift_bound(40, 1e-3, max(1.0, np.abs(b).max()))
        np.testing.assert_allclose(a, b, rtol=0, atol=atol)
