"""moment_dtype, low-precision variables, mixed precision and numerical edge cases."""

import keras
import numpy as np
import pytest
from grid import UNIT_ROUNDOFF, float32_drift_bound, gradient_sequence, initial_values

import keras_adam
from keras_adam import reference

BACKEND = keras.backend.backend()


def _np(x):
    return keras.ops.convert_to_numpy(keras.ops.cast(x, "float32")).astype("float64")


def _apply(optimizer, variable, grads, dtype="float32"):
    for g in grads:
        optimizer.apply([keras.ops.convert_to_tensor(np.asarray(g, dtype))], [variable])


# --- moment_dtype ------------------------------------------------------------

def test_bfloat16_moments_halve_the_state():
    variables = [keras.Variable(x) for x in initial_values()]
    full = keras_adam.Adam(amsgrad=True)
    half = keras_adam.Adam(amsgrad=True, moment_dtype="bfloat16")
    full.build(variables)
    half.build(variables)
    for v in variables:
        assert all(keras.backend.standardize_dtype(s.dtype) == "bfloat16" for s in half.slots(v))
        assert all(keras.backend.standardize_dtype(s.dtype) == "float32" for s in full.slots(v))
    itemsize = {"float32": 4, "bfloat16": 2}

    def state_bytes(optimizer):
        return sum(int(np.prod(s.shape)) * itemsize[keras.backend.standardize_dtype(s.dtype)]
                   for v in variables for s in optimizer.slots(v))

    assert state_bytes(half) * 2 == state_bytes(full)


def test_float32_moments_keep_v_exact_for_bfloat16_variables():
    # Gradients that do not depend on theta: v is then a pure function of the
    # gradient sequence, comparable with the reference's float64 v.
    steps = 200
    sequence = [s[1] for s in gradient_sequence(steps)]
    errors = {}
    for moment_dtype in (None, "float32"):
        variable = keras.Variable(np.zeros(11), dtype="bfloat16")
        # Nearest rounding computes in the variable's dtype, as the built-in.
        optimizer = keras_adam.Adam(moment_dtype=moment_dtype, weight_rounding="nearest")
        _apply(optimizer, variable, sequence)
        _, state = reference.run(np.zeros(11), sequence)
        v = _np(optimizer.slots(variable)[1])
        errors[moment_dtype] = np.max(np.abs(v - state.v) / state.v)
    # float32 arithmetic and storage: ~2u per step relative (tests/grid.py).
    assert errors["float32"] <= 2 * steps * UNIT_ROUNDOFF
    # bfloat16 moments with bfloat16 arithmetic (nearest rounding, as in the
    # built-in): beta_2 = 0.999 rounds to 1, so v never decays; the error is large.
    assert errors[None] > 0.05


def test_bfloat16_moments_for_float32_variables_track_the_reference():
    steps, lr = 100, 1e-3
    sequence = gradient_sequence(steps)
    x0 = initial_values()
    variables = [keras.Variable(x) for x in x0]
    optimizer = keras_adam.Adam(moment_dtype="bfloat16")
    for grads in sequence:
        optimizer.apply([keras.ops.convert_to_tensor(g) for g in grads], variables)
    for i, (variable, x) in enumerate(zip(variables, x0)):
        theta, _ = reference.run(x, [s[i] for s in sequence])
        # bfloat16 keeps 8 significant bits: m and v are stored with relative
        # error 2^-9 each, so m_hat / sqrt(v_hat) is off by up to ~2^-9 + 2^-10
        # = 3e-3 relative per step, against the usual float32 drift.
        bound = steps * 4 * lr * 3e-3 + float32_drift_bound(steps, 4 * lr, np.abs(theta).max())
        np.testing.assert_allclose(_np(variable), theta, rtol=0, atol=bound)


@pytest.mark.skipif(BACKEND not in ("tensorflow", "torch"), reason="fused kernels: TF and torch")
def test_fused_kernels_step_aside_for_other_moment_dtypes():
    sequence = gradient_sequence(20)
    results = []
    for fused in (None, False):
        variables = [keras.Variable(x) for x in initial_values()]
        optimizer = keras_adam.Adam(moment_dtype="bfloat16", fused=fused)
        for grads in sequence:
            optimizer.apply([keras.ops.convert_to_tensor(g) for g in grads], variables)
        results.append([_np(v) for v in variables])
    # fused=None finds no exact kernel and takes the portable path: identical.
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="`fused=True` is not possible: .*moment_dtype='bfloat16'"):
        keras_adam.Adam(fused=True, moment_dtype="bfloat16").build(
            [keras.Variable(np.zeros(3, "float32"))])


@pytest.mark.skipif(BACKEND != "tensorflow", reason="IndexedSlices exist only on TensorFlow")
def test_lazy_sparse_updates_honour_moment_dtype():
    import tensorflow as tf

    table = keras.Variable(np.ones((10, 2), "float32"))
    optimizer = keras_adam.LazyAdam(moment_dtype="bfloat16")
    g = tf.IndexedSlices(tf.constant([[1.0, 2.0], [3.0, -1.0]]), tf.constant([2, 7]),
                         tf.constant([10, 2]))
    optimizer.apply([g], [table])
    m, v, _ = optimizer.slots(table)
    assert keras.backend.standardize_dtype(m.dtype) == "bfloat16"
    untouched = [0, 1, 3, 4, 5, 6, 8, 9]
    np.testing.assert_array_equal(_np(table)[untouched], 1.0)
    # First step: lr * sign(g) on the touched rows, up to bfloat16 moments
    # (3e-3 relative, as above) and float32 rounding of theta near 1.
    np.testing.assert_allclose(_np(table)[[2, 7]], 1.0 - 1e-3 * np.sign([[1, 2], [3, -1]]),
                               rtol=0, atol=1e-3 * 3e-3 + 1e-7)


# --- Numerical edge cases -------------------------------------------------------

EDGE_OPTIONS = [
    ("defaults", {}), ("paper", dict(epsilon_placement="paper")),
    ("epsilon-0-hat", dict(epsilon=0.0)),
    ("epsilon-0-paper", dict(epsilon=0.0, epsilon_placement="paper")),
    ("amsgrad", dict(amsgrad=True)), ("portable", dict(fused=False)),
]


@pytest.mark.parametrize("kwargs", [o[1] for o in EDGE_OPTIONS], ids=[o[0] for o in EDGE_OPTIONS])
def test_zero_gradients_never_move_and_never_give_nan(kwargs):
    variable = keras.Variable(np.array([1.0, -2.0, 3.0], "float32"))
    _apply(keras_adam.Adam(**kwargs), variable, [np.zeros(3)] * 100)
    np.testing.assert_array_equal(_np(variable), [1.0, -2.0, 3.0])


def test_epsilon_zero_defines_the_zero_over_zero_step():
    # v = 0 (no gradient yet) with epsilon = 0 is 0/0. keras.optimizers.Adam
    # returns NaN; keras_adam defines the step as 0 where v = 0.
    ours, builtin = (keras.Variable(np.array([1.0, 2.0], "float32")) for _ in range(2))
    g = [np.array([0.0, 1.0])] * 3
    _apply(keras_adam.Adam(epsilon=0.0), ours, g)
    _apply(keras.optimizers.Adam(epsilon=0.0), builtin, g)
    assert _np(ours)[0] == 1.0 and np.isnan(_np(builtin)[0])
    # the coordinate with gradients moves by lr per step (sign-like steps)
    assert _np(ours)[1] == pytest.approx(2.0 - 3e-3, abs=1e-6)


@pytest.mark.parametrize("magnitude", [1e30, 1e-30], ids=["huge", "tiny"])
def test_extreme_float32_gradients_behave_as_the_builtin(magnitude):
    # 1e30^2 overflows float32, so v = inf. The portable rule,
    # beta_2 v + (1 - beta_2) g^2, keeps v = inf and steps m / inf = 0: the
    # coordinate stops, without NaN. TensorFlow's kernel and the built-in form
    # v + (g^2 - v)(1 - beta_2) = inf - inf = NaN from the second step.
    # 1e-30^2 underflows to 0: epsilon dominates and the step is
    # ~lr * 1e-30 / 1e-7, far below theta's precision.
    # Documented outcome: the portable path (JAX, and fused=False everywhere)
    # never gives NaN and the coordinate does not move; torch's fused kernel
    # does the same; TensorFlow's fused kernel gives NaN exactly where
    # keras.optimizers.Adam does. Clip such gradients.
    ours, builtin, portable = (keras.Variable(np.array([1.0, -1.0], "float32")) for _ in range(3))
    g = [np.array([magnitude, -magnitude])] * 5
    _apply(keras_adam.Adam(), ours, g)
    _apply(keras.optimizers.Adam(), builtin, g)
    _apply(keras_adam.Adam(fused=False), portable, g)
    np.testing.assert_allclose(_np(portable), [1.0, -1.0], rtol=0, atol=1e-6)
    if BACKEND == "tensorflow":
        np.testing.assert_array_equal(np.isnan(_np(ours)), np.isnan(_np(builtin)))
        finite = np.isfinite(_np(ours))
    else:
        finite = np.ones(2, bool)
    np.testing.assert_allclose(_np(ours)[finite], np.array([1.0, -1.0])[finite],
                               rtol=0, atol=1e-6)


def test_float16_variables_need_float32_moments_for_large_gradients():
    # In float16, g^2 overflows above |g| = 256 (max 65504): with float16
    # arithmetic and moments (nearest rounding, as the built-in) v = inf and
    # the step is 0. With float32 moments, or with the default rounding for
    # 16-bit variables (float32 arithmetic; v = 1e3 fits float16), the first
    # step is lr, as the rule says (closed form).
    steps = {}
    for moment_dtype, rounding in ((None, "nearest"), ("float32", "nearest"),
                                   (None, None)):
        variable = keras.Variable(np.array([1.0], "float16"))
        _apply(keras_adam.Adam(learning_rate=0.01, moment_dtype=moment_dtype,
                               weight_rounding=rounding), variable,
               [np.array([1e3])], dtype="float16")
        steps[moment_dtype, rounding] = 1.0 - _np(variable)[0]
    assert steps[None, "nearest"] == 0.0
    # float16 theta near 1 has spacing 2^-10 ~ 1e-3: 0.99 is stored as 0.98999
    # (nearest), or as one of its two neighbours (stochastic).
    assert steps["float32", "nearest"] == pytest.approx(0.01, abs=1e-3)
    assert steps[None, None] == pytest.approx(0.01, abs=1e-3)


def test_nan_and_inf_gradients_as_the_builtin():
    # Documented outcome: NaN/Inf in a gradient propagates as in
    # keras.optimizers.Adam (Keras's LossScaleOptimizer skips such steps).
    g = [np.array([np.nan, np.inf, -np.inf, 1.0])]
    ours, builtin = (keras.Variable(np.ones(4, "float32")) for _ in range(2))
    _apply(keras_adam.Adam(), ours, g)
    _apply(keras.optimizers.Adam(), builtin, g)
    np.testing.assert_array_equal(np.isnan(_np(ours)), np.isnan(_np(builtin)))
    assert np.isfinite(_np(ours)[3])


# --- Mixed precision ---------------------------------------------------------------

@pytest.fixture
def policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"], indirect=True)
def test_mixed_precision_fit_and_save(tmp_path, policy):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 4)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]])).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(1, dtype="float32")])
    model.compile(optimizer=keras_adam.Adam(learning_rate=1e-2), loss="mse")
    if policy == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    history = model.fit(x, y, batch_size=32, epochs=10, verbose=0)
    # Var(y) ~ 14; a fitted linear target falls far below 10% of the start.
    assert history.history["loss"][-1] < 0.1 * history.history["loss"][0]

    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert type(loaded.optimizer) is type(model.optimizer)
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(_np(a), _np(b))
