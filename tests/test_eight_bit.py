"""moment_dtype="8bit": the codec, the guard against blow-up, accuracy, and every context.

Oracles: the tables' closed forms, rounding in float64 on the laws' scale, the
float64 8-bit emulation `keras_adam.reference.run_8bit` (written apart from
`keras_adam._quantize`), float32 keras_adam from the same start, and the
Cauchy-Schwarz bound of `keras_adam._rule.moment_bound` in closed form.
"""

import math

import keras
import numpy as np
import pytest

import keras_adam
from keras_adam import _quantize
from keras_adam import _rule
from keras_adam import reference

BACKEND = keras.backend.backend()


def _np(x):
    return keras.ops.convert_to_numpy(x)


# --- The codec ------------------------------------------------------------

def test_the_tables_are_the_quartic_laws_and_decode_equals_them():
    # Byte 128 (j = -128) is never written.
    j = np.arange(256, dtype=np.uint8).view(np.int8).astype(np.float64)
    # float32 rounding of the laws: a few roundings of 2^-24 each.
    np.testing.assert_allclose(_quantize.M_TABLE, np.sign(j) * (np.abs(j) / 127) ** 4,
                               rtol=5e-7)
    np.testing.assert_allclose(_quantize.V_TABLE, (np.arange(256) / 255) ** 8, rtol=8e-7)
    codes_m = np.arange(-127, 128, dtype=np.int8)
    assert np.all(np.diff(_quantize.M_TABLE[codes_m.view(np.uint8)]) > 0)
    assert np.all(np.diff(_quantize.V_TABLE) > 0)
    assert _quantize.M_TABLE[127] == 1.0 and _quantize.V_TABLE[255] == 1.0
    # decode with scale 1 is the table, bit for bit, on this backend.
    b = _quantize.blocking((255,), 255)
    got = _np(_quantize.decode(keras.ops.convert_to_tensor(codes_m), np.ones(1, "float32"),
                               True, b))
    np.testing.assert_array_equal(got, _quantize.M_TABLE[codes_m.view(np.uint8)])
    codes_v = np.arange(256, dtype=np.uint8)
    b = _quantize.blocking((256,), 256)
    got = _np(_quantize.decode(keras.ops.convert_to_tensor(codes_v), np.ones(1, "float32"),
                               False, b))
    np.testing.assert_array_equal(got, _quantize.V_TABLE)


def _wide_range(shape, seed=0):
    """Values spread over six orders of magnitude, of both signs, with exact zeros."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * 10.0 ** rng.uniform(-6, 0, size=shape)
    x[rng.random(size=shape) < 0.05] = 0.0
    return x.astype("float32")


@pytest.mark.parametrize("signed", [True, False], ids=["m", "v"])
def test_encode_rounds_in_the_laws_scale(signed):
    x = _wide_range((6, 701))
    if not signed:
        x = x * x
    b = _quantize.blocking(x.shape, 256)
    codes, scales = _quantize.encode(keras.ops.convert_to_tensor(x), signed, b)
    codes, scales = _np(codes), _np(scales)
    assert scales.shape == (6, 3) and b.block_length == 256  # 701 (prime) = 256 + 256 + 189
    per_element = np.repeat(scales, 256, axis=1)[:, :701]
    np.testing.assert_array_equal(per_element, np.maximum.reduceat(
        np.abs(x), [0, 256, 512], axis=1).repeat([256, 256, 189], axis=1))
    a = np.abs(x).astype(np.float64) / np.where(per_element > 0, per_element, 1)
    top, root = (127, 4) if signed else (255, 8)
    position = top * a ** (1 / root)  # where x falls on the evenly spaced code scale
    want = np.sign(x) * np.round(position)
    # Equal, except where float32 rounding of x / s and of the roots (a few
    # 2^-24 relative) puts the position within 1e-4 of a half-way point.
    near_half = np.abs(position - np.floor(position) - 0.5) < 1e-4
    assert np.all((codes.astype(np.int64) == want) | near_half)
    assert np.mean(near_half) < 0.01
    # Each block's largest |x| is stored exactly.
    table = _quantize.M_TABLE[codes.view(np.uint8)] if signed else _quantize.V_TABLE[codes]
    np.testing.assert_array_equal(np.max(np.abs(table * per_element), axis=1),
                                  np.max(np.abs(x), axis=1))
    assert np.all(codes[x == 0] == 0)


def test_blocks_never_span_rows():
    x = _wide_range((10, 300), seed=1)
    b = _quantize.blocking(x.shape, 128)
    rows = np.array([7, 2, 3])
    whole = [_np(t) for t in _quantize.encode(keras.ops.convert_to_tensor(x), True, b)]
    part = [_np(t) for t in _quantize.encode(keras.ops.convert_to_tensor(x[rows]), True, b)]
    np.testing.assert_array_equal(part[0], whole[0][rows])
    np.testing.assert_array_equal(part[1], whole[1][rows])
    assert _quantize.blocking((3, 3, 64, 8), 256) == _quantize.Blocking(3, 1536, 256, 6, (3, 6))
    assert _quantize.blocking((1000,), 256).scale_shape == (4,)  # 4 x 250: no padding
    assert _quantize.blocking((4, 2000), 256).block_length == 250
    assert _quantize.blocking((4, 1031), 256).block_length == 256  # prime: padded
    for cols in (16, 96, 300, 700, 1031, 2000, 4096):
        assert _quantize.blocking((2, cols), 256).block_length == reference.block_length(cols, 256)
    assert _quantize.blocking((50000, 16), 256).block_length == 16  # narrow rows: one block each


# --- The guard: no step larger than the float32 rule allows ----------------

@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.5, 0.95), (0.9, 0.8)],
                         ids=["defaults", "fast", "beta_1^2>beta_2"])
def test_the_moment_bound_holds_for_the_float32_rule(betas):
    beta_1, beta_2 = betas
    rng = np.random.default_rng(2)
    variable = keras.Variable(np.zeros((40,), "float32"))
    optimizer = keras_adam.Adam(beta_1=beta_1, beta_2=beta_2, fused=False)
    optimizer.build([variable])
    for n in range(1, 31):
        g = rng.normal(size=40) * 10.0 ** rng.uniform(-8, 3, size=40)
        optimizer.apply([keras.ops.convert_to_tensor(g.astype("float32"))], [variable])
        m, v = (_np(s).astype(np.float64) for s in optimizer.slots(variable)[:2])
        # The closed form: K_n = c (1 + r + ... + r^(n-1)).
        r, c = beta_1 ** 2 / beta_2, (1 - beta_1) ** 2 / (1 - beta_2)
        k_n = c * sum(r ** i for i in range(n))
        bound = float(_np(keras.ops.convert_to_tensor(
            _rule.moment_bound(beta_1, beta_2, n))))
        assert bound >= k_n * (1 - 1e-6)  # the limit (r < 1) or K_n itself
        # float32 m and v: each ~4 roundings per step, relative (tests/grid.py).
        assert np.all(m * m <= k_n * v * (1 + 1e-5) + 1e-45)


def test_a_v_quantized_to_zero_cannot_blow_up_the_step():
    # One block: a huge gradient G at step 1 sets both scales; 40 zero steps
    # let m's scale decay (0.9^40 = 0.015) while v's barely does
    # (0.999^40 = 0.96); then a tiny gradient s = 1e-11 G elsewhere. Its v is
    # 1e-22 of v's scale, below half the unsigned table's smallest gap
    # ((0.5 / 255)^8 = 2.2e-22): stored as 0. Its m is 7e-10 of m's scale,
    # above (0.5 / 127)^4 = 2.4e-10: stored non-zero. Unguarded, the next
    # zero-gradient step would be lr * m_hat / (epsilon / sqrt(c2)), ~1000x
    # the float32 rule's largest step.
    lr, size, big, tiny = 1e-3, 4096, 1e9, 1e-2
    variable = keras.Variable(np.zeros(size, "float32"))
    optimizer = keras_adam.Adam(learning_rate=lr, moment_dtype="8bit")
    optimizer.build([variable])

    def step(index=None, value=0.0):
        g = np.zeros(size, "float32")
        if index is not None:
            g[index] = value
        optimizer.apply([keras.ops.convert_to_tensor(g)], [variable])

    step(0, big)
    for _ in range(40):
        step()
    step(1, tiny)
    m_codes, v_codes, _ = optimizer.slots(variable)
    assert _np(v_codes)[1] == 0 and _np(m_codes)[1] != 0, "the adversarial case did not arise"

    before = _np(variable).copy()
    step()
    # The float32 rule's largest step at t = 43: |m_hat| / sqrt(v_hat) is at
    # most sqrt(K) sqrt(c2) / c1 (keras_adam._rule.moment_bound, closed form).
    t = 43
    c1, c2 = 1 - 0.9 ** t, 1 - 0.999 ** t
    bound = (1 - 0.9) ** 2 / ((1 - 0.999) * (1 - 0.9 ** 2 / 0.999))
    largest = lr * math.sqrt(bound) * math.sqrt(c2) / c1
    moved = np.abs(_np(variable) - before)
    assert moved[1] > 0  # the guard bounds the step; it does not freeze the element
    # 1e-5: float32 rounding of the step and of K.
    assert np.all(moved <= largest * (1 + 1e-5))


# --- Accuracy against float32 (bitsandbytes' test design) --------------------

@pytest.mark.slow
def test_fifty_steps_track_float32():
    rng = np.random.default_rng(3)
    shape = (64, 1024)
    theta = (rng.normal(size=shape) * 0.1).astype("float32")
    full_var, q_var = keras.Variable(theta), keras.Variable(theta)
    full, quantized = keras_adam.Adam(), keras_adam.Adam(moment_dtype="8bit")
    full.build([full_var])
    quantized.build([q_var])
    errors = []
    for _ in range(50):
        g = keras.ops.convert_to_tensor((rng.normal(size=shape) * 0.01).astype("float32"))
        full.apply([g], [full_var])
        quantized.apply([g], [q_var])
        errors.append(np.mean(np.abs(_np(q_var) - _np(full_var))))
        q_var.assign(full_var)  # re-synced: each step's error is that step's alone
    m, v, _ = quantized.moments(q_var)
    m_full, v_full = (_np(s) for s in full.slots(full_var)[:2])
    # Each moment is judged in units of its block's absmax s (rows of 1024 =
    # 4 blocks of 256), the scale of the codec's precision: m ~ 1e-3 and
    # v ~ 5e-6 here, so one absolute tolerance cannot fit both (3e-3, as
    # bitsandbytes' test has it, let v = 0 pass). A rounding moves a value by
    # at most 1.6% of s (keras_adam/_quantize.py), and by 1.6% / sqrt(3) =
    # 0.92% of s as a standard deviation (uniform within the gap). Roundings
    # add up as a random walk. m's decay by beta_1 each step:
    # sigma <= 0.92% / sqrt(1 - beta_1^2) = 2.1% of s. v's hardly decay
    # (beta_2 = 0.999) over the 50 steps, but v, so its block's scale and
    # each rounding, grows as c2 ~ t / 1000:
    # sigma <= 0.92% sqrt(sum_t (t / 50)^2) = 3.8% of s.
    # 20 of the 65,536 elements is the two-sided 3.6-sigma tail.
    # Measured: no element beyond 5.5% (m) or 11.5% (v) of s.
    for got, want, sigma in ((_np(m), m_full, 0.021), (_np(v), v_full, 0.038)):
        wrong = np.abs(got - want) > 3.6 * sigma * _block_absmax(want)
        assert wrong.sum() <= 20
    # Issue #15's target; measured 4.9e-6 (steps are ~lr = 1e-3).
    assert np.mean(errors) < 6e-5
    # Stricter than the issue, a closed-form worst case: the 8-bit m minus the
    # float32 m obeys e_t = beta_1 e_(t-1) + (this step's rounding), and a
    # rounding is at most half the table's widest gap, (1 - (126/127)^4) / 2
    # = 0.0157 of the block's scale; so |e| <= 0.0157 / (1 - beta_1) = 0.157
    # of the scale (the scale drifts a little between steps: 0.16).
    assert np.max(np.abs(_np(m) - m_full) / _block_absmax(m_full)) < 0.16


def _block_absmax(x):
    """Each element's block absmax, for test_fifty_steps_track_float32's (64, 1024)."""
    return np.repeat(np.max(np.abs(x.reshape(64, 4, 256)), -1), 256, 1)


# --- Every context and option, against the float64 8-bit emulation -----------

# The kernel has 7,200 elements (quantized; rows of 600 = 3 blocks of 200);
# the bias keeps float32 moments (fewer than min_8bit_size).
SHAPES = [(12, 600), (11,)]
STEPS = 12
OPTION_ROWS = [
    ("defaults", {}),
    ("amsgrad", dict(amsgrad=True)),
    ("nesterov-paper", dict(nesterov=True, epsilon_placement="paper", epsilon=1e-8)),
    ("decay-uncorrected", dict(weight_decay=0.1, bias_correction=False, learning_rate=1e-2)),
]
CONTEXTS = {"tensorflow": ["eager", "function", "xla"], "jax": ["eager", "jit"],
            "torch": ["eager"]}


def _run_in(context, optimizer, x0, sequence):
    from grid import run_optimizer

    if context != "xla":
        return run_optimizer(optimizer, x0, sequence, compiled=context != "eager")
    import tensorflow as tf

    variables = [keras.Variable(x) for x in x0]
    optimizer.build(variables)
    step = tf.function(lambda grads: optimizer.apply(grads, variables), jit_compile=True)
    for grads in sequence:
        step([tf.constant(g) for g in grads])
    return variables


@pytest.mark.parametrize("context", CONTEXTS[BACKEND])
@pytest.mark.parametrize("kwargs", [r[1] for r in OPTION_ROWS], ids=[r[0] for r in OPTION_ROWS])
def test_matches_the_8bit_reference(kwargs, context):
    from grid import float32_drift_bound, gradient_sequence, initial_values, reference_options

    sequence, x0 = gradient_sequence(STEPS, SHAPES), initial_values(SHAPES)
    optimizer = keras_adam.Adam(moment_dtype="8bit", **kwargs)
    got = [_np(v).astype(np.float64) for v in _run_in(context, optimizer, x0, sequence)]
    options = reference_options(kwargs)
    want_kernel, _ = reference.run_8bit(x0[0], [s[0] for s in sequence], **options)
    want_bias, _ = reference.run(x0[1], [s[1] for s in sequence], **options)
    lr = options.get("learning_rate", 1e-3)
    # The float32 path and the float64 emulation round the same way except
    # where a value sits within float32 rounding of a rounding boundary; that
    # element then takes the neighbouring code. Near the bottom of the table
    # neighbours differ by large factors (the gap is 4/|j| relative), and
    # these gradients' columns span six orders of magnitude within a block,
    # so such an element's later steps may differ by up to the rule's bound
    # (4 lr a step bounds every row). Measured: 1 element of 7,200 beyond
    # float32 drift (tests/grid.py) in each row. Allowed: 0.1%.
    drift = float32_drift_bound(STEPS, 4 * lr, max(np.abs(x).max() for x in x0))
    diff = np.abs(got[0] - want_kernel)
    assert np.mean(diff > drift) <= 1e-3
    assert np.max(diff) <= STEPS * 4 * lr
    np.testing.assert_allclose(got[1], want_bias, rtol=0, atol=drift)


# --- The plan, the options around it, and the memory ------------------------

def _layers_model():
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(128, name="wide"),
                              keras.layers.Dense(1, name="out")])
    return model


def test_quantized_variables_go_portable_and_small_ones_keep_their_path():
    model = _layers_model()
    optimizer = keras_adam.Adam(moment_dtype="8bit")
    optimizer.build(model.trainable_variables)
    plan = optimizer.update_plan()
    kernel = model.get_layer("wide").kernel  # 8,192 elements: quantized
    fast = {"tensorflow": "tensorflow-fused", "torch": "torch-multi-tensor",
            "jax": "portable"}[BACKEND]
    assert plan[kernel.path].method == "portable"
    if fast != "portable":
        assert "8-bit codes" in plan[kernel.path].reason
    for variable in model.trainable_variables[1:]:
        assert plan[variable.path].method == fast  # float32 moments: the kernel is exact
    m, v, v_max = optimizer.slots(kernel)
    assert (keras.backend.standardize_dtype(m.dtype), keras.backend.standardize_dtype(v.dtype),
            v_max) == ("int8", "uint8", None)
    bias_m = optimizer.slots(model.get_layer("wide").bias)[0]
    assert keras.backend.standardize_dtype(bias_m.dtype) == "float32"


def test_options_that_fix_the_storage_cannot_change_after_build():
    optimizer = keras_adam.Adam(moment_dtype="8bit")
    with pytest.raises(ValueError, match="`fused=True` and `moment_dtype='8bit'`"):
        optimizer.fused = True
    assert optimizer.fused is None
    optimizer.build(_layers_model().trainable_variables)
    for name, value in [("min_8bit_size", 0), ("moment_block_size", 64),
                        ("moment_dtype", None)]:
        with pytest.raises(ValueError, match=f"`{name}` cannot change once the optimizer"):
            setattr(optimizer, name, value)


def _state_bytes(optimizer):
    """Bytes of the optimizer's state (every variable but the step and the learning rate)."""
    return sum(math.prod(v.shape) * np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize
               for v in optimizer.variables[2:])


@pytest.mark.parametrize("amsgrad", [False, True])
def test_state_bytes_per_parameter(amsgrad):
    variable = keras.Variable(np.zeros((512, 1024), "float32"))
    bytes_per = {}
    for moment_dtype in (None, "bfloat16", "8bit"):
        optimizer = keras_adam.Adam(moment_dtype=moment_dtype, amsgrad=amsgrad)
        optimizer.build([variable])
        bytes_per[moment_dtype] = _state_bytes(optimizer) / (512 * 1024)
    slots = 3 if amsgrad else 2
    assert bytes_per[None] == 4 * slots and bytes_per["bfloat16"] == 2 * slots
    # One byte per code, plus one float32 scale per 256 codes.
    assert bytes_per["8bit"] == slots * (1 + 4 / 256)


def test_a_file_with_other_moments_is_refused_naming_moment_dtype(tmp_path):
    from backend_run import model_with, train

    def compiled(**kwargs):
        model = model_with(keras_adam.Adam(**kwargs))
        model.optimizer.build(model.trainable_variables)
        return model

    quantized = dict(moment_dtype="8bit", moment_block_size=4, min_8bit_size=16)
    saved = compiled(**quantized)
    train(saved, 0, 3)
    path = str(tmp_path / "m.weights.h5")
    saved.save_weights(path)
    target = compiled()
    before = [_np(v).copy() for v in target.optimizer.variables]
    with pytest.raises(ValueError, match="The file holds 8-bit moments .moment_dtype='8bit'.,"
                                         " and this optimizer has moment_dtype=None"):
        target.load_weights(path)
    for a, b in zip(target.optimizer.variables, before):
        np.testing.assert_array_equal(_np(a), b)
    with pytest.raises(ValueError, match="This optimizer has moment_dtype='8bit', and the file"):
        compiled(**quantized).load_weights(str(_saved_float(tmp_path, compiled, train)))
    # Another block size: the scales' shapes differ.
    with pytest.raises(ValueError, match="follows moment_block_size"):
        compiled(**dict(quantized, moment_block_size=8)).load_weights(path)


def _saved_float(tmp_path, compiled, train):
    model = compiled()
    train(model, 0, 3)
    path = tmp_path / "float.weights.h5"
    model.save_weights(str(path))
    return path


# --- Lazy sparse updates: untouched rows keep their codes -------------------

@pytest.mark.skipif(BACKEND != "tensorflow", reason="row-sparse gradients exist only on TensorFlow")
@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_lazy_rows_keep_codes_and_scales_and_touched_rows_follow_the_emulation(mode):
    import tensorflow as tf

    rows, dim, lr = 64, 96, 1e-2  # 6,144 elements: quantized, one block per row
    rng = np.random.default_rng(4)
    table = rng.normal(size=(rows, dim)).astype("float32")
    variable = keras.Variable(table)
    optimizer = keras_adam.Adam(learning_rate=lr, moment_dtype="8bit", sparse_updates="lazy",
                                amsgrad=True)
    optimizer.build([variable])
    state = {"theta": table.astype(np.float64)}
    for name in ("m", "v", "v_max"):
        state[name] = np.zeros((rows, dim))

    def apply(grads):
        optimizer.apply(grads, [variable])

    if mode == "graph":
        apply = tf.function(apply)
    bound = (1 - 0.9) ** 2 / ((1 - 0.999) * (1 - 0.9 ** 2 / 0.999))
    for t in range(1, 7):
        touched = np.sort(rng.choice(rows, size=10, replace=False))
        values = rng.normal(size=(10, dim)).astype("float32")
        before = [_np(s).copy() for s in optimizer.variables[2:]] + [_np(variable).copy()]
        apply([tf.IndexedSlices(tf.constant(values), tf.constant(touched.astype("int32")),
                                tf.constant([rows, dim]))])
        after = [_np(s) for s in optimizer.variables[2:]] + [_np(variable)]
        untouched = np.setdiff1d(np.arange(rows), touched)
        for a, b in zip(after, before):
            np.testing.assert_array_equal(a[untouched], b[untouched])  # codes, scales, theta
        # The touched rows: the 8-bit emulation of the rule on those rows, global t.
        floor = state["m"][touched] ** 2 / bound
        row_state = reference.State(t - 1, state["m"][touched],
                                    np.maximum(state["v"][touched], floor),
                                    np.maximum(state["v_max"][touched], floor))
        theta, new = reference.step(state["theta"][touched], values, row_state,
                                    learning_rate=lr, amsgrad=True)
        state["theta"][touched] = theta
        for name in ("m", "v", "v_max"):
            codes, scales = reference.quantize(getattr(new, name), name == "m", dim)
            state[name][touched] = reference.dequantize(codes, scales, name == "m", dim)
    # As in test_matches_the_8bit_reference: float32 drift almost everywhere
    # (tests/grid.py: 6 steps of at most 4 lr, lr = 1e-2, on |theta| < 5),
    # the rule's bound where a value sat on a rounding boundary.
    from grid import float32_drift_bound

    diff = np.abs(_np(variable) - state["theta"])
    assert np.mean(diff > float32_drift_bound(6, 4 * lr, 5.0)) <= 1e-3
    assert np.max(diff) <= 6 * 4 * lr


# --- model.fit with Keras's options, compiled and not ------------------------

FIT_ROWS = [
    ("defaults", {}, "float32"),
    ("ema", dict(use_ema=True, ema_momentum=0.9), "float32"),
    ("accumulation", dict(gradient_accumulation_steps=2), "float32"),
    ("adamw-clipnorm", dict(weight_decay=0.05, clipnorm=1.0), "float32"),
    ("mixed_float16", {}, "mixed_float16"),
    ("mixed_bfloat16", {}, "mixed_bfloat16"),
]


def _fit_loss(moment_dtype, kwargs, policy, jit, seed=0):
    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(seed)
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(512, 64)).astype("float32")
        y = np.tanh(x @ rng.normal(size=(64, 1)) / 8).astype("float32")
        model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(128, activation="relu"),
                                  keras.layers.Dense(1, dtype="float32")])
        model.compile(optimizer=keras_adam.Adam(learning_rate=3e-3, moment_dtype=moment_dtype,
                                                **kwargs),
                      loss="mse", jit_compile=jit)
        history = model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
        return history.history["loss"][-1], model
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _assert_tracks(kwargs, policy, jit):
    full, _ = _fit_loss(None, kwargs, policy, jit)
    quantized, model = _fit_loss("8bit", kwargs, policy, jit)
    kernel = model.layers[0].kernel
    adam = getattr(model.optimizer, "inner_optimizer", model.optimizer)  # mixed_float16: LSO
    assert keras.backend.standardize_dtype(adam.slots(kernel)[0].dtype) == "int8"
    # 48 steps, each update within ~1% of float32's (test_fifty_steps_track_float32
    # measures 0.5%): the loss, which falls ~5x here, ends within 5% of float32's.
    assert abs(quantized - full) <= 0.05 * full


@pytest.mark.parametrize("kwargs,policy", [r[1:] for r in FIT_ROWS], ids=[r[0] for r in FIT_ROWS])
def test_fit_tracks_float32_moments(kwargs, policy):
    # jit_compile="auto", as users run it: a tf.function on TensorFlow's CPU,
    # XLA on JAX, eager on torch.
    _assert_tracks(kwargs, policy, "auto")


@pytest.mark.slow
def test_fit_with_jit_compile_tracks_float32_moments():
    # XLA on TensorFlow and JAX, torch.compile on torch.
    _assert_tracks({}, "float32", True)


# --- Full training: the final loss within 2% of float32's (issue #15) ---------

@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_full_training_ends_within_two_percent_of_float32(model_name):
    # examples/memory.py's runs: the main example's MLP (its 64 x 64 kernel in
    # 8 bits) and a small CNN (its 3x3x16x32 kernel in 8 bits), 640 and 256
    # steps, 3 seeds. Measured 8-bit / float32 mean final loss: MLP 0.990
    # (TensorFlow), 0.985 (JAX), 0.970 (torch); CNN 0.998-1.000. bfloat16
    # moments give 1.147 on the MLP. The MLP's final loss varies by +-30%
    # across seeds, so the two runs' difference is mostly where each
    # trajectory happens to end: the
    # check is one-sided at 2% (no worse than float32), and a lower loss is
    # bounded only loosely (10%: beyond that, suspect the run, not luck).
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "memory.py"
    spec = importlib.util.spec_from_file_location("memory", path)
    memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory)
    losses = {}
    for moment_dtype in (None, "8bit"):
        runs = [memory.train(model_name, seed, moment_dtype) for seed in range(3)]
        losses[moment_dtype] = np.mean([r[0] for r in runs])
        if moment_dtype == "8bit":
            assert runs[0][2] is not None  # some tensor really is stored in 8 bits
    assert 0.9 * losses[None] <= losses["8bit"] <= 1.02 * losses[None]


@pytest.mark.slow
def test_any_shape_can_be_quantized():
    # min_8bit_size=0 quantizes even a scalar; an empty variable keeps float
    # moments. With a gradient of ones every element is its block's largest,
    # stored exactly, so the run is the float32 rule's: the reference within
    # float32 drift (3 steps of lr on |theta| = 1).
    from grid import float32_drift_bound

    shapes = [(), (5,), (3, 4, 5), (2, 0)]
    variables = [keras.Variable(np.ones(s, "float32")) for s in shapes]
    optimizer = keras_adam.Adam(moment_dtype="8bit", min_8bit_size=0, moment_block_size=3,
                                amsgrad=True)
    optimizer.build(variables)
    for _ in range(3):
        optimizer.apply([keras.ops.ones(s) for s in shapes], variables)
    want, _ = reference.run(np.ones(1), [np.ones(1)] * 3, amsgrad=True)
    for variable in variables[:3]:
        assert keras.backend.standardize_dtype(optimizer.slots(variable)[0].dtype) == "int8"
        np.testing.assert_allclose(_np(variable), want[0], rtol=0,
                                   atol=float32_drift_bound(3, 1e-3, 1.0))
    assert keras.backend.standardize_dtype(optimizer.slots(variables[3])[0].dtype) == "float32"
