"""`weight_rounding`: 16-bit float variables written without losing small updates.

Oracles: closed forms (a constant step of lr from a constant gradient, whose
exact sum is known), the unbiasedness of stochastic rounding, Kahan's bound,
and float32 runs of the same optimizer with nearest rounding (unchanged code).
"""

import keras
import numpy as np
import pytest
from grid import gradient_sequence, initial_values, run_optimizer

import keras_adam
from keras_adam import _rounding

N_STEPS = 100
LR = 2e-4  # far below half an ulp of 1.0 in bfloat16 (2^-9 = 2e-3)
SIZE = 4096
# bfloat16 spacing just below 1.0 (8 significant bits): 2^-8.
SPACING_BELOW_ONE = 2.0 ** -8


def _np(x):
    return keras.ops.convert_to_numpy(keras.ops.cast(x, "float32")).astype(np.float64)


def _regression_data():
    """64 samples of 4 features and a target, for the resume and composition tests."""
    rng = np.random.default_rng(0)
    return (rng.normal(size=(64, 4)).astype("float32"),
            rng.normal(size=(64, 1)).astype("float32"))


def _tensorflow_only(what):
    """TensorFlow, or a skip off its backend (`what` needs it)."""
    tf = pytest.importorskip("tensorflow")
    if keras.backend.backend() != "tensorflow":
        pytest.skip(f"{what} needs the TensorFlow backend")
    return tf


def _constant_steps(rounding, steps=N_STEPS):
    """A bfloat16 variable of ones moved by a constant step of ~lr: with a constant
    gradient g = 1, m_hat = g and v_hat = g^2 exactly, so each step is
    lr * 1 / (1 + epsilon) (closed form, epsilon-hat 1e-7 and c2 ~ 1)."""
    variable = keras.Variable(np.ones(SIZE), dtype="bfloat16")
    optimizer = keras_adam.Adam(learning_rate=LR, weight_rounding=rounding)
    optimizer.build([variable])
    g = keras.ops.ones((SIZE,), "bfloat16")
    for _ in range(steps):
        optimizer.apply([g], [variable])
    return variable, optimizer


def test_nearest_never_moves_a_variable_by_a_step_below_half_an_ulp():
    variable, _ = _constant_steps("nearest", steps=20)
    np.testing.assert_array_equal(_np(variable), 1.0)


def test_stochastic_rounding_is_unbiased():
    variable, _ = _constant_steps("stochastic")
    exact = 1.0 - N_STEPS * LR
    values = _np(variable)
    # Each write rounds to a neighbour with the probabilities that make it
    # unbiased given the value before, so E[theta_N] = exact (a martingale).
    # Each write adds variance at most s^2 / 4 (s the spacing, 2^-8 here), so
    # an element's std is at most sqrt(N) s / 2 = 0.020 and the mean of SIZE
    # independent elements has std at most 0.020 / 64 = 3.1e-4. Five of those
    # is the bound: far inside the total move of 0.02 that nearest loses.
    bound = 5 * np.sqrt(N_STEPS) * SPACING_BELOW_ONE / 2 / np.sqrt(SIZE)
    assert abs(values.mean() - exact) < bound
    # It is random: elements differ, each a bfloat16 neighbour of the path.
    assert len(np.unique(values)) > 1


def test_compensated_stays_within_one_ulp_of_the_exact_result():
    variable, optimizer = _constant_steps("compensated")
    exact = 1.0 - N_STEPS * LR
    assert np.max(np.abs(_np(variable) - exact)) <= SPACING_BELOW_ONE
    # theta + c follows the float32 sum far more closely: c's own rounding
    # (2^-9 of |c| <= 2^-9) per step, and the float32 step (u per step).
    c = optimizer.state_variables(variable)["compensation"]
    assert np.max(np.abs(_np(variable) + _np(c) - exact)) <= N_STEPS * 2.0 ** -18


@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "compensated"])
def test_float32_variables_are_unchanged_by_every_rounding(rounding):
    sequence, x0 = gradient_sequence(20), initial_values()
    expected = run_optimizer(keras_adam.Adam(weight_decay=0.01), x0, sequence)
    got = run_optimizer(keras_adam.Adam(weight_decay=0.01, weight_rounding=rounding), x0,
                        sequence)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a),
                                      keras.ops.convert_to_numpy(b))


def _bfloat16_moments_v(rounding, steps=300, n=4096, beta_2=0.99, moment_dtype="bfloat16"):
    # A float32 variable with bfloat16 moments, lr = 0 (theta stays), g = 1:
    # v_t = 1 - beta_2^t in exact arithmetic.
    variable = keras.Variable(np.zeros((n,), "float32"))
    optimizer = keras_adam.Adam(learning_rate=0.0, beta_2=beta_2, moment_dtype=moment_dtype,
                                weight_rounding=rounding)
    optimizer.build([variable])
    g = keras.ops.ones((n,))
    for _ in range(steps):
        optimizer.apply([g], [variable])
    return _np(optimizer.slots(variable)[1]).astype(np.float64)


@pytest.mark.slow
@pytest.mark.parametrize("rounding", [None, "nearest"])
def test_bfloat16_moments_of_float32_variables_keep_their_small_updates(rounding):
    # Oracle: the closed form 1 - 0.99^300 = 0.951. Written to nearest,
    # bfloat16's v stops once (1 - beta_2)(1 - v) is under half an ulp of v:
    # at 0.805 (ml_dtypes, step by step). Stochastic writes keep E[v] exact:
    # each element's v wanders by about an ulp (2^-8) times
    # sqrt(1 / (1 - beta_2^2)) ~ 7, so the mean of 4096 elements is within
    # ~4e-4 (one sigma) of the closed form; 2.5e-3 is six sigmas, and
    # nearest's 0.146 is far outside. The variable's rounding does not apply
    # to a float32 variable, so every value of `weight_rounding` gives this.
    v = _bfloat16_moments_v(rounding)
    assert abs(v.mean() - (1 - 0.99**300)) < 2.5e-3, v.mean()
    # The same numbers again: the streams depend on the step and position only.
    np.testing.assert_array_equal(v, _bfloat16_moments_v(rounding))


def test_float16_moments_of_float32_variables_track_the_closed_form():
    # As above with float16 moments, written by the general stochastic form
    # (uniform numbers from the same streams). Near 0.95 float16's spacing is
    # 2^-11: each element wanders by about 2^-11 * 7, so the mean of 4096 is
    # within ~5e-5 (one sigma) of 1 - 0.99^300; 3.3e-4 is six sigmas.
    v = _bfloat16_moments_v(None, moment_dtype="float16")
    assert abs(v.mean() - (1 - 0.99**300)) < 3.3e-4, v.mean()


def _bfloat16_run(seed, rounding="stochastic", steps=5):
    keras.utils.set_random_seed(seed)
    variables = [keras.Variable(x, dtype="bfloat16") for x in initial_values()]
    optimizer = keras_adam.Adam(learning_rate=1e-3, weight_rounding=rounding,
                                weight_decay=0.1)
    optimizer.build(variables)
    for grads in gradient_sequence(steps):
        optimizer.apply(grads, variables)
    return [_np(v) for v in variables + list(optimizer.variables)]


def test_the_randomness_is_reproducible_from_the_seed():
    a, b, c = _bfloat16_run(1), _bfloat16_run(1), _bfloat16_run(2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, z) for x, z in zip(a, c))


def test_the_uniform_numbers_are_the_same_on_every_backend():
    # A counter-based hash on int32 bits: these values were computed by hand
    # from the mixer's definition in NumPy (uint32 arithmetic), independent
    # of the Keras ops.
    def mix(x):
        x = np.uint32(x)
        x ^= x >> np.uint32(16)
        x = np.uint32((int(x) * 0x7FEB352D) & 0xFFFFFFFF)
        x ^= x >> np.uint32(15)
        x = np.uint32((int(x) * 0x846CA68B) & 0xFFFFFFFF)
        return x ^ (x >> np.uint32(16))

    golden = 0x9E3779B9
    seed, t, stream = 12345, 7, 3
    key = mix(mix((t * golden + stream) & 0xFFFFFFFF) ^ np.uint32(seed))
    want = [float(mix(np.uint32(((i ^ int(key)) * golden) & 0xFFFFFFFF)) >> np.uint32(8))
            * 2.0 ** -24 for i in range(64)]
    got = _rounding.uniform(keras.ops.convert_to_tensor(seed, "int32"),
                            keras.ops.convert_to_tensor(t, "int32"), stream,
                            _rounding.element_index((8, 8)))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(got).ravel(), want)


@pytest.mark.parametrize("rounding", ["stochastic", "compensated"])
def test_resuming_from_a_keras_file_continues_bit_for_bit(rounding, tmp_path):
    x, y = _regression_data()

    def model():
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, dtype="bfloat16"),
                              keras.layers.Dense(1, dtype="bfloat16")])
        m.compile(optimizer=keras_adam.Adam(weight_rounding=rounding), loss="mse")
        return m

    first = model()
    first.fit(x[:32], y[:32], batch_size=8, verbose=0)
    path = str(tmp_path / "model.keras")
    first.save(path)
    first.fit(x[32:], y[32:], batch_size=8, verbose=0, shuffle=False)
    resumed = keras.models.load_model(path)
    resumed.fit(x[32:], y[32:], batch_size=8, verbose=0, shuffle=False)
    for a, b in zip(first.get_weights() + [_np(v) for v in first.optimizer.variables],
                    resumed.get_weights() + [_np(v) for v in resumed.optimizer.variables]):
        np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))


def test_the_plan_names_each_variables_rounding():
    variables = [keras.Variable(np.ones(3), dtype="bfloat16"), keras.Variable(np.ones(3))]
    optimizer = keras_adam.Adam(weight_rounding="compensated")
    optimizer.build(variables)
    plan = list(optimizer.update_plan().values())
    assert [r.rounding for r in plan] == ["compensated", "nearest"]
    assert "written with compensated rounding" in str(optimizer.update_plan())
    default = keras_adam.Adam()
    default.build([keras.Variable(np.ones(3), dtype="float16")])
    assert [r.rounding for r in default.update_plan().values()] == ["stochastic"]


def test_the_option_is_validated_saved_and_fixed_after_build():
    with pytest.raises(ValueError, match="`weight_rounding` must be one of"):
        keras_adam.Adam(weight_rounding="up")
    optimizer = keras_adam.Adam(weight_rounding="compensated")
    assert optimizer.get_config()["weight_rounding"] == "compensated"
    config = optimizer.get_config()
    del config["weight_rounding"]  # a config from before the option: the default
    assert keras_adam.Adam.from_config(config).weight_rounding is None
    optimizer.build([keras.Variable(np.ones(3), dtype="bfloat16")])
    with pytest.raises(ValueError, match="`weight_rounding` cannot change once"):
        optimizer.weight_rounding = "stochastic"


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="row-sparse gradients exist only on TensorFlow")
@pytest.mark.parametrize("rounding", ["stochastic", "compensated"])
def test_lazy_rows_not_present_stay_bit_for_bit(rounding):
    import tensorflow as tf

    table = keras.Variable(np.random.default_rng(0).normal(size=(10, 3)), dtype="bfloat16")
    optimizer = keras_adam.Adam(sparse_updates="lazy", weight_rounding=rounding,
                                weight_decay=0.1)
    optimizer.build([table])
    optimizer.apply([tf.ones((10, 3), tf.bfloat16)], [table])  # every row's state non-zero
    before = [_np(table)] + [_np(v) for v in optimizer.state_variables(table).values()]
    grad = tf.IndexedSlices(tf.ones((3, 3), tf.bfloat16), tf.constant([1, 4, 4]),
                            tf.constant([10, 3]))
    optimizer.apply([grad], [table])
    after = [_np(table)] + [_np(v) for v in optimizer.state_variables(table).values()]
    untouched = [0, 2, 3, 5, 6, 7, 8, 9]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a[untouched], b[untouched])
    assert not np.array_equal(before[0][[1, 4]], after[0][[1, 4]])


def test_adam_monitor_reports_the_stalled_share():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = rng.normal(size=(64, 16)).astype("float32")
    stalled = {}
    for dtype, rounding in [("float32", None), ("bfloat16", "nearest")]:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(
            16, use_bias=False, dtype=dtype, name="hidden")])
        model.compile(optimizer=keras_adam.Adam(learning_rate=1e-5, weight_rounding=rounding),
                      loss="mse")
        history = model.fit(x, y, batch_size=16, epochs=1, verbose=0,
                            callbacks=[keras_adam.callbacks.AdamMonitor()])
        stalled[dtype] = history.history["adam/hidden/stalled"][-1]
    # Closed forms: every float32 weight has a gradient here and moves by
    # ~lr, which float32 represents. In bfloat16, a step of 1e-5 is below half
    # an ulp (2^-9 |w|) of every weight above 5e-3: Glorot-uniform weights of
    # limit sqrt(6 / 24) = 0.5 are below that with probability 1%, so nearest
    # rounding keeps about 99% of them.
    assert stalled["float32"] == 0.0
    assert stalled["bfloat16"] > 0.95


def test_the_memory_table_counts_weights_gradients_and_state():
    from keras_adam.benchmark import moments

    rows = {r["run"]: r for r in moments.memory_rows(keras, keras_adam, width=512, layers=2)}
    params = 2 * (512 * 512 + 512)
    kernels, biases = 2 * 512 * 512, 2 * 512
    # Closed forms: float32 and mixed_bfloat16 keep float32 weights, gradients
    # and two float32 moments (4 + 4 + 8).
    assert rows["float32 + keras.optimizers.Adam"]["total"] == 16.0
    assert rows["mixed_bfloat16 + keras.optimizers.Adam"]["total"] == 16.0
    # Pure bfloat16: 2 + 2 + two bfloat16 moments, plus the rounding's int32
    # seed (4 bytes in all) where the rounding is random.
    seed = 4 / params
    assert rows["bfloat16 + keras_adam, moments bfloat16, nearest"]["total"] == 8.0
    assert rows["bfloat16 + keras_adam, moments bfloat16, stochastic"]["total"] == (
        pytest.approx(8.0 + seed))
    # Kahan's compensation: one more bfloat16 per parameter.
    assert rows["bfloat16 + keras_adam, moments bfloat16, compensated"]["total"] == (
        pytest.approx(10.0 + seed))
    # 8-bit: one byte per code and a float32 scale per block of 256 for the
    # kernels (m and v); the biases (< min_8bit_size) keep float32 m and v;
    # plus the int32 rounding seed.
    eight = (2 * kernels * (1 + 4 / 256) + 8 * biases + 4) / params
    row = rows["bfloat16 + keras_adam, moments 8bit, stochastic"]
    assert row["optimizer"] == pytest.approx(eight)
    assert row["total"] == pytest.approx(4 + eight)


def _example():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "bfloat16_training.py"
    spec = importlib.util.spec_from_file_location("bfloat16_training", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


# Three seeds: each run of a seed starts from the same weights (the
# example's `start`), so what differs between the runs of a seed is the
# rounding of weights and moments alone.
SEEDS = 3


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["mlp", "cnn", "transformer"])
def test_pure_bfloat16_trains_as_well_as_mixed_precision(model_name):
    """examples/bfloat16_training.py's models, 128 steps, against mixed_bfloat16
    with the same optimizer from the same start (mean over three seeds)."""
    example = _example()
    ids = ["mixed", "stochastic", "compensated", "8bit"] + (
        ["builtin"] if model_name == "mlp" else [])
    loss = {}
    for run_id in ids:
        _, policy, optimizer_name, kwargs = example.RUNS[run_id]
        loss[run_id] = np.mean([
            example.train(policy, optimizer_name, kwargs or {}, epochs=2, seed=seed,
                          model_name=model_name)[0] for seed in range(SEEDS)])
    mixed = loss["mixed"]
    # The bar for a short run: within 3% of mixed precision's loss. Lower is
    # allowed (rounding noise can help as well as hurt). From a shared start,
    # reordering the data or 1-ulp noise on the start moves a run by ~0.6%.
    for run_id in ("stochastic", "compensated", "8bit"):
        assert loss[run_id] <= 1.03 * mixed, (run_id, loss)
    if "builtin" in loss:
        # The built-in does not train in pure bfloat16 (it casts beta_2 to the
        # variable's dtype, where 0.999 rounds to 1): its loss stays far above.
        assert not loss["builtin"] <= 2 * mixed


def test_every_run_of_a_seed_starts_from_the_same_weights():
    """The example's comparison holds only from one start: a model built under the
    bfloat16 policy and one built under mixed_bfloat16 hold the same values."""
    example = _example()
    weights = example.start("transformer", seed=1)
    for policy in ("bfloat16", "mixed_bfloat16"):
        keras.config.set_dtype_policy(policy)
        try:
            model = example.build("transformer")
        finally:
            keras.config.set_dtype_policy("float32")
        model.set_weights(weights)
        for w, held in zip(weights, model.get_weights()):
            np.testing.assert_array_equal(np.asarray(held, "float32"), w)
    # Every weight of the model is among them (the position table included).
    assert len(weights) == len(model.weights)


def test_the_example_draws_the_samples_asked_for(capsys):
    # `--samples` sets the training set (a longer run on fresh samples); a
    # size that is not whole batches of 32 is refused, naming the flag.
    example = _example()
    for name in ("mlp", "cnn", "transformer"):
        x, y = example.data(name, samples=96)
        assert len(x) == len(y) == 96
    with pytest.raises(SystemExit):
        example.main(["--samples", "100", "--runs", "mixed"])
    assert "--samples takes a multiple of 32" in capsys.readouterr().err


def test_a_file_saved_without_the_rounding_state_loads(tmp_path):
    # A bfloat16 model saved with nearest rounding (no seed, no compensation)
    # loads into an optimizer with compensated rounding: every saved value
    # lands, the compensation starts at 0 (exact for the loaded theta).
    def model(rounding):
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, dtype="bfloat16")])
        m.compile(optimizer=keras_adam.Adam(weight_rounding=rounding), loss="mse")
        return m

    x, y = np.ones((8, 4), "float32"), np.zeros((8, 3), "float32")
    saved = model("nearest")
    saved.fit(x, y, verbose=0)
    path = str(tmp_path / "nearest.weights.h5")
    saved.save_weights(path)
    loaded = model("compensated")
    loaded.optimizer.build(loaded.trainable_variables)
    loaded.load_weights(path)
    for variable, other in zip(saved.trainable_variables, loaded.trainable_variables):
        ours, theirs = (loaded.optimizer.state_variables(other),
                        saved.optimizer.state_variables(variable))
        for role in ("m", "v"):
            np.testing.assert_array_equal(_np(ours[role]), _np(theirs[role]))
        np.testing.assert_array_equal(_np(ours["compensation"]), 0.0)
    assert int(keras.ops.convert_to_numpy(loaded.optimizer.iterations)) == 1


def _bf16_model(rounding, optimizer=None, **kwargs):
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, dtype="bfloat16"),
                          keras.layers.Dense(1, dtype="bfloat16")])
    # Without XLA (jit_compile=False): XLA may fuse two programs' arithmetic
    # differently, and a last-bit difference flips a stochastic rounding.
    m.compile(optimizer=optimizer or keras_adam.Adam(weight_rounding=rounding, **kwargs),
              loss="mse", jit_compile=False)
    return m


def _all_bits(model, optimizer=None):
    optimizer = optimizer or model.optimizer
    return [np.asarray(w, np.float64) for w in model.get_weights()] + [
        _np(v) for v in optimizer.variables]


@pytest.mark.parametrize("rounding", ["stochastic", "compensated"])
def test_resuming_from_a_tf_checkpoint_continues_bit_for_bit(rounding, tmp_path):
    tf = _tensorflow_only("tf.train.Checkpoint")
    x, y = _regression_data()
    first = _bf16_model(rounding)
    first.fit(x[:32], y[:32], batch_size=8, verbose=0)
    path = tf.train.Checkpoint(model=first, optimizer=first.optimizer).save(
        str(tmp_path / "ckpt"))
    first.fit(x[32:], y[32:], batch_size=8, verbose=0, shuffle=False)
    # Restored into a fresh model whose optimizer drew another seed: the
    # checkpoint's seed, t, moments and compensations replace it.
    keras.utils.set_random_seed(99)
    resumed = _bf16_model(rounding)
    resumed.optimizer.build(resumed.trainable_variables)
    tf.train.Checkpoint(model=resumed, optimizer=resumed.optimizer).restore(
        path).assert_consumed()
    resumed.fit(x[32:], y[32:], batch_size=8, verbose=0, shuffle=False)
    for a, b in zip(_all_bits(first), _all_bits(resumed)):
        np.testing.assert_array_equal(a, b)


def _bf16_steps(optimizer, grads_sequence):
    variables = [keras.Variable(x, dtype="bfloat16") for x in initial_values(seed=3)]
    optimizer.build(variables)
    for grads in grads_sequence:
        optimizer.apply([keras.ops.cast(g, "bfloat16") for g in grads], variables)
    return [_np(v) for v in variables]


SEQUENCE_16 = gradient_sequence(6, seed=11)


@pytest.mark.parametrize("rounding", ["stochastic", "compensated"])
def test_a_skipped_nonfinite_step_leaves_the_random_stream_where_it_was(rounding):
    # The skipped step changes no bit and does not advance t, which keys the
    # rounding's random numbers: the run equals the one without the bad step.
    nan = [np.full_like(g, np.nan) for g in SEQUENCE_16[0]]
    keras.utils.set_random_seed(5)
    with_nan = _bf16_steps(keras_adam.Adam(weight_rounding=rounding, skip_nonfinite=True),
                           SEQUENCE_16[:3] + [nan] + SEQUENCE_16[3:])
    keras.utils.set_random_seed(5)
    without = _bf16_steps(keras_adam.Adam(weight_rounding=rounding, skip_nonfinite=True),
                          SEQUENCE_16)
    for a, b in zip(with_nan, without):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("rounding", ["stochastic", "compensated"])
def test_gradient_accumulation_rounds_once_per_optimizer_step(rounding):
    # Each gradient given twice with accumulation over 2: the mean (g + g) / 2
    # is g exactly, and t advances once per pair, so the run equals the one
    # without accumulation bit for bit.
    keras.utils.set_random_seed(5)
    accumulated = _bf16_steps(
        keras_adam.Adam(weight_rounding=rounding, gradient_accumulation_steps=2),
        [g for grads in SEQUENCE_16 for g in (grads, grads)])
    keras.utils.set_random_seed(5)
    plain = _bf16_steps(keras_adam.Adam(weight_rounding=rounding), SEQUENCE_16)
    for a, b in zip(accumulated, plain):
        np.testing.assert_array_equal(a, b)


def test_loss_scaling_changes_no_bit_of_a_bfloat16_run():
    # LossScaleOptimizer multiplies the loss by 2^15 and divides the gradients
    # by it: powers of two, exact in bfloat16 (its exponent range is
    # float32's), so the scaled run is the unscaled one bit for bit.
    x, y = _regression_data()
    plain = _bf16_model("stochastic")
    plain.fit(x, y, batch_size=8, verbose=0, shuffle=False)
    keras.utils.set_random_seed(0)
    inner = keras_adam.Adam(weight_rounding="stochastic")
    scaled = _bf16_model("stochastic", keras.optimizers.LossScaleOptimizer(inner))
    scaled.fit(x, y, batch_size=8, verbose=0, shuffle=False)
    for a, b in zip(_all_bits(plain), _all_bits(scaled, inner)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_rounding_under_jit_compile_keeps_small_updates():
    # XLA on TensorFlow and JAX, torch.compile on torch. lr = 1e-4 moves a
    # weight by ~1e-4 a step, below half an ulp of most of this kernel's
    # (Glorot, |w| up to 0.3: ulp ~1e-3 at 0.15). Stochastic rounding moves
    # each by an ulp with probability ~0.1 a step, so after 32 steps ~97%
    # have moved; nearest rounding moves only those under ~0.05 (~15%).
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 4)).astype("float32")
    y = (x @ rng.normal(size=(4, 1))).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(64, dtype="bfloat16"),
                              keras.layers.Dense(1, dtype="bfloat16")])
    start = np.asarray(model.get_weights()[0], np.float64)
    model.compile(optimizer=keras_adam.Adam(learning_rate=1e-4), loss="mse", jit_compile=True)
    if keras.backend.backend() == "torch":
        from torch._dynamo.utils import counters

        counters.clear()
    model.fit(x, y, batch_size=32, epochs=4, verbose=0)
    assert np.mean(np.asarray(model.get_weights()[0], np.float64) != start) > 0.5
    if keras.backend.backend() == "torch":
        # Traced into the train step, the assignment compares no data pointers
        # (what a step written in place needs eagerly): Dynamo breaks the graph
        # on such a comparison.
        assert not [k for k in counters["graph_break"] if "Data pointer" in k]


@pytest.mark.parametrize("rounding", ["stochastic", "compensated"])
def test_a_saved_models_training_step_continues_bit_for_bit(rounding, tmp_path):
    # A tf.Module whose traced training step is saved and loaded: the loaded
    # step reads the restored seed, t, moments and compensations, so it writes
    # the same bits as the original object's.
    tf = _tensorflow_only("SavedModel")
    x, y = _regression_data()
    model = _bf16_model(rounding)
    optimizer = model.optimizer
    optimizer.build(model.trainable_variables)

    class Trainer(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4]), tf.TensorSpec([None, 1])])
        def train(self, xb, yb):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(tf.cast(model(xb), "float32") - yb))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply(grads, model.trainable_variables)
            return loss

        @tf.function(input_signature=[])
        def state(self):
            return [tf.cast(v.value, "float64") for v in model.trainable_variables] + [
                tf.cast(v.value, "float64") for v in optimizer.variables]

    original = Trainer()
    original.model, original.optimizer = model, optimizer  # tracked for saving
    for step in range(4):
        original.train(x[8 * step:8 * (step + 1)], y[8 * step:8 * (step + 1)])
    tf.saved_model.save(original, str(tmp_path / "trainer"))
    restored = tf.saved_model.load(str(tmp_path / "trainer"))
    for step in range(4, 8):
        batch = (x[8 * step:8 * (step + 1)], y[8 * step:8 * (step + 1)])
        original.train(*batch)
        restored.train(*batch)
    for a, b in zip(original.state(), restored.state()):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("rounding", ["stochastic", "compensated"])
def test_ema_leaves_the_rounded_weights_as_without_it(rounding):
    # Keras's EMA keeps averages beside the weights; the weights, written by
    # the rounding from the same seed and t, must be the run's without EMA.
    keras.utils.set_random_seed(5)
    with_ema = keras_adam.Adam(weight_rounding=rounding, use_ema=True, ema_momentum=0.5)
    weights_ema = _bf16_steps(with_ema, SEQUENCE_16)
    keras.utils.set_random_seed(5)
    weights = _bf16_steps(keras_adam.Adam(weight_rounding=rounding), SEQUENCE_16)
    for a, b in zip(weights_ema, weights):
        np.testing.assert_array_equal(a, b)
    averages = [_np(v) for v in with_ema._model_variables_moving_average]
    assert all(np.all(np.isfinite(a)) for a in averages)
    assert any(not np.array_equal(a, w) for a, w in zip(averages, weights))
