"""The optimizer's own behaviour: slots, training, sparse gradients."""

import keras
import numpy as np
import pytest

import keras_adam


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
def test_indexed_slices_equal_their_dense_gradient():
    import tensorflow as tf

    # Rows 0 and 2 repeat: the slices must be summed before g^2 is taken.
    # (keras.optimizers.Adam squares each slice first and moves row 0 by
    # sqrt(2) * lr on step one instead of lr.)
    indices = tf.constant([0, 2, 0, 5, 2, 2])
    values = tf.constant(np.random.default_rng(0).normal(size=(6, 3)), tf.float32)
    sparse = tf.IndexedSlices(values, indices, tf.constant([8, 3]))
    dense = tf.convert_to_tensor(sparse)
    results = []
    for gradient in (sparse, dense):
        variable = keras.Variable(np.ones((8, 3), "float32"))
        optimizer = keras_adam.Adam()
        for _ in range(3):
            optimizer.apply([gradient], [variable])
        results.append((variable.numpy(), *[s.numpy() for s in optimizer.slots(variable)[:2]]))
    for a, b in zip(*results):
        # Same dense tensor into the same ops: identical by construction.
        np.testing.assert_array_equal(a, b)


def test_public_methods_are_for_users_only():
    # Issue #13: no public method of Adam exists only for the backends (they
    # receive data: keras_adam/backends/__init__.py). A new public method must
    # be added here deliberately, and documented in the README's API table.
    own = {name for name in dir(keras_adam.Adam)
           if not name.startswith("_") and callable(getattr(keras_adam.Adam, name))}
    inherited = {name for name in dir(keras.optimizers.Optimizer) if not name.startswith("_")}
    assert own - inherited == {"moments", "slots", "update_plan"}
    # Keras's own method, overridden so that the exclusions are saved.
    assert "exclude_from_weight_decay" in inherited
