"""The optimizer's own behaviour: slots, training, sparse gradients."""

import keras
import numpy as np
import pytest
from grid import FUSED_TF_STEP_REL, FUSED_TF_V_REL, UNIT_ROUNDOFF, float32_drift_bound

import keras_adam
from keras_adam import reference


def test_build_creates_named_slots():
    dense = keras.layers.Dense(3, name="dense")
    dense.build((None, 2))
    for amsgrad, per_variable in [(False, 2), (True, 3)]:
        optimizer = keras_adam.Adam(amsgrad=amsgrad)
        optimizer.build(dense.trainable_variables)
        names = [v.path for v in optimizer.variables]
        # iteration and learning_rate, then the slots of kernel and bias
        assert len(names) == 2 + per_variable * 2
        for slot in ["m", "v"] + (["v_max"] if amsgrad else []):
            assert f"{optimizer.name}/dense_kernel_{slot}" in names
            assert f"{optimizer.name}/dense_bias_{slot}" in names
        m, v, v_max = optimizer.slots(dense.kernel)
        assert m.shape == v.shape == dense.kernel.shape
        assert (v_max is not None) == amsgrad


@pytest.mark.parametrize("cls", [keras_adam.Adam, keras_adam.AdamW])
def test_fit_lowers_the_loss(cls):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 3)).astype("float32")
    y = (x @ np.array([[2.0], [-1.0], [3.0]]) + 1.5).astype("float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(1)])
    model.compile(optimizer=cls(learning_rate=1e-2), loss="mse")
    before = model.evaluate(x, y, verbose=0)
    history = model.fit(x, y, batch_size=32, epochs=20, verbose=0)
    after = history.history["loss"][-1]
    # Var(y) is 2^2 + 1 + 3^2 = 14 (plus the offset's 2.25 in the MSE at init);
    # a converged fit of this linear target brings the MSE far below 1%.
    assert after < 0.01 * before, (before, after)


def test_zero_learning_rate_changes_only_the_moments():
    variable = keras.Variable(np.ones(4, "float32"))
    # The portable path (the specification); the fused kernel's documented
    # beta rounding is covered in test_backend_tensorflow.py.
    optimizer = keras_adam.Adam(learning_rate=0.0, fused=False)
    optimizer.apply([np.full(4, 2.0, "float32")], [variable])
    np.testing.assert_array_equal(variable.numpy(), 1.0)
    m, v, _ = optimizer.slots(variable)
    # m = (1 - 0.9) * 2 and v = (1 - 0.999) * 4: one rounding of the result
    # and one of (1 - beta) give at most 2u = 1.2e-7 relative. Computing
    # 1 - beta_2 in float32 instead would be off by 1.3e-5.
    np.testing.assert_allclose(m.numpy(), 0.2, rtol=1.2e-7)
    np.testing.assert_allclose(v.numpy(), 0.004, rtol=1.2e-7)


@pytest.mark.parametrize("t", [1, 2, 10, 100, 1000, 10_000, 1_000_000])
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 0.999, 0.99999])
def test_bias_factors_are_accurate_in_float32(t, beta):
    from keras_adam import _rule

    c1, c2, c1_next = _rule.bias_factors(t, beta, beta, True, "float32")
    exact = -np.expm1(t * np.log(beta)) if beta > 0 else 1.0
    exact_next = -np.expm1((t + 1) * np.log(beta)) if beta > 0 else 1.0
    # float32(ln beta) and t*ln beta round by u each, expm1 and the final cast
    # by about u more: 4u = 2.4e-7 relative. The direct 1 - beta^t in float32
    # is off by 1.3e-5 for beta = 0.999, t = 1.
    for value, want in [(c1, exact), (c2, exact), (c1_next, exact_next)]:
        np.testing.assert_allclose(float(value), want, rtol=2.4e-7)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="IndexedSlices gradients exist only on TensorFlow")
@pytest.mark.parametrize("fused", [False, True], ids=["portable", "fused"])
def test_indexed_slices_follow_the_reference_on_their_summed_rows(fused):
    import tensorflow as tf

    # Rows 0 and 2 repeat: the slices must be summed before g^2 is taken.
    # (keras.optimizers.Adam squares each slice first and moves row 0 by
    # sqrt(2) * lr on step one instead of lr.) Rows 1, 3, 4, 6, 7 get none.
    shape, steps, lr = (8, 3), 3, 1e-3
    indices = np.array([0, 2, 0, 5, 2, 2])
    rng = np.random.default_rng(0)
    values = [rng.normal(size=(6, 3)).astype("float32") for _ in range(steps)]
    # The oracle's gradient: the slices summed into a dense array by NumPy.
    dense = []
    for v in values:
        g = np.zeros(shape)
        np.add.at(g, indices, v.astype("float64"))
        dense.append(g)
    want, state = reference.run(np.ones(shape), dense, learning_rate=lr)

    variable = keras.Variable(np.ones(shape, "float32"))
    optimizer = keras_adam.Adam(learning_rate=lr, fused=fused)
    for v in values:
        optimizer.apply([tf.IndexedSlices(tf.constant(v), tf.constant(indices),
                                          tf.constant(shape))], [variable])
    m, v, _ = optimizer.slots(variable)

    # The float32 drift bound (tests/grid.py): 3 steps of at most lr on
    # |theta| <= 1. TensorFlow's kernel (fused=True) forms 1 - beta_2 in
    # float32: its v and its steps are further off by FUSED_TF_V_REL and
    # FUSED_TF_STEP_REL relative (tests/grid.py).
    kernel = 1.0 if fused else 0.0  # whether the kernel's terms apply
    atol = float32_drift_bound(steps, lr, 1.0) + kernel * steps * lr * FUSED_TF_STEP_REL
    np.testing.assert_allclose(variable.numpy(), want, rtol=0, atol=atol)
    # m and v: their multiply and add round by u each, ~2u relative per step.
    # m mixes signs, so its error is relative to the gradients' scale.
    slot_rel = 2 * steps * UNIT_ROUNDOFF
    np.testing.assert_allclose(m.numpy(), state.m, rtol=0,
                               atol=slot_rel * np.abs(dense).max())
    np.testing.assert_allclose(v.numpy(), state.v, rtol=slot_rel + kernel * FUSED_TF_V_REL)
    # Rows without slices keep theta exactly: g = 0 gives m = v = 0, no step.
    untouched = np.setdiff1d(np.arange(shape[0]), indices)
    np.testing.assert_array_equal(variable.numpy()[untouched], 1.0)
    # Guards the check of v: squaring each slice before summing would give a
    # v that no tolerance above could mistake for the oracle's, in rows 0 and 2.
    v_squares_first = np.zeros(shape)
    for step_values in values:
        squares = np.zeros(shape)
        np.add.at(squares, indices, step_values.astype("float64") ** 2)
        v_squares_first = 0.999 * v_squares_first + (1 - 0.999) * squares
    repeated = [0, 2]
    assert np.all(np.abs(v_squares_first - state.v)[repeated]
                  > 100 * (slot_rel + FUSED_TF_V_REL) * state.v[repeated])


def test_public_methods_are_for_users_only():
    # Issue #13: no public method of Adam exists only for the backends (they
    # receive data: keras_adam/backends/__init__.py). A new public method must
    # be added here deliberately, and documented in docs/options.md's options table.
    own = {name for name in dir(keras_adam.Adam)
           if not name.startswith("_") and callable(getattr(keras_adam.Adam, name))}
    inherited = {name for name in dir(keras.optimizers.Optimizer) if not name.startswith("_")}
    assert own - inherited == {"moments", "slots", "state_variables", "update_plan"}
    # Keras's own method, overridden so that the exclusions are saved.
    assert "exclude_from_weight_decay" in inherited
