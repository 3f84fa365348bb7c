"""The option grid, tolerances and small helpers shared by the tests.

Every configuration the suite runs is listed here, with an id, so that one
table answers "what is tested?". `test_grid_covers_every_switch` fails when a
new constructor argument is added without a row here.
"""

import itertools

import keras
import numpy as np

# --- Tolerances -----------------------------------------------------------
# float32's unit roundoff is u = 6e-8. One Adam step is about ten float32
# operations, so the update itself agrees with float64 to ~1e-6 relative, and
# each step moves theta by at most ~lr (a few lr with nesterov or without bias
# correction). Rounding theta after the subtraction adds up to |theta| * u.
# Over N steps the absolute difference is therefore bounded by
#     N * (step_bound * 1e-6 + max|theta| * 6e-8).
UPDATE_REL_ERR = 1e-6
UNIT_ROUNDOFF = 6e-8


def float32_drift_bound(steps, step_bound, max_abs_theta):
    """The accumulated float32-vs-exact bound described above."""
    return steps * (step_bound * UPDATE_REL_ERR + max_abs_theta * UNIT_ROUNDOFF)


# TensorFlow's fused kernel (ResourceApplyAdam) forms 1 - beta_2 from
# float32(beta_2) = 0.999 + 1.3e-8: its v is off by up to 1.3e-5 relative to
# the rule's, so each step by half of that, on top of the drift above.
FUSED_TF_V_REL = 1.3e-5
FUSED_TF_STEP_REL = FUSED_TF_V_REL / 2


# --- The option grid ------------------------------------------------------
# Arguments that keras.optimizers.Optimizer owns; parity with the built-in
# (test_parity_builtin.py) covers them. Everything else must appear below.
KERAS_BASE_ARGUMENTS = {
    "weight_decay", "clipnorm", "clipvalue", "global_clipnorm", "use_ema",
    "ema_momentum", "ema_overwrite_frequency", "loss_scale_factor",
    "gradient_accumulation_steps", "name",
    # Keras's exclude_from_weight_decay(), kept in the config so that it is
    # saved; tests/test_keras_seams.py checks which variables decay.
    "exclude_from_weight_decay",
}
SWITCHES = {
    "amsgrad": (False, True),
    "nesterov": (False, True),
    "bias_correction": (True, False),
    "epsilon_placement": ("hat", "paper"),
}


def _switch_rows():
    names = list(SWITCHES)
    for values in itertools.product(*(SWITCHES[n] for n in names)):
        kwargs = dict(zip(names, values))
        ident = "-".join(
            f"{n}={v}" for n, v in kwargs.items() if v != SWITCHES[n][0]
        )
        yield (ident or "defaults", kwargs)


HYPERPARAMETER_ROWS = [
    # Fast decay rates: c1 and c2 both reach ~1 inside the run, so the run
    # crosses from the bias-corrected regime into the steady state.
    ("fast-betas", dict(beta_1=0.5, beta_2=0.95)),
    ("large-epsilon-paper", dict(epsilon=1e-2, epsilon_placement="paper")),
    ("large-epsilon-hat", dict(epsilon=1e-2, epsilon_placement="hat")),
    ("lr-0.01-weight-decay", dict(learning_rate=0.01, weight_decay=0.05)),
    ("beta_1-zero-amsgrad", dict(beta_1=0.0, amsgrad=True)),
    # On TensorFlow the rows above take the fused kernel wherever it is exact;
    # these force the portable path for the same options.
    ("portable", dict(fused=False)),
    ("portable-amsgrad-paper", dict(fused=False, amsgrad=True, epsilon_placement="paper")),
    ("fused-nesterov-uncorrected", dict(fused=None, nesterov=True, bias_correction=False)),
    # Dense gradients get the standard update in either sparse mode.
    ("lazy-dense-gradients", dict(sparse_updates="lazy")),
    # Moments stored apart from the variable (float32 here: the same numbers;
    # bfloat16 moments have their own tolerance in test_precision.py).
    ("moment-float32-amsgrad", dict(moment_dtype="float32", amsgrad=True)),
    # 8-bit moments: these variables are smaller than min_8bit_size, so their
    # moments stay float32 and exact (test_eight_bit.py tests quantized ones).
    ("8bit-small-variables", dict(moment_dtype="8bit", moment_block_size=256,
                                  min_8bit_size=4096)),
    # With finite gradients the switch changes nothing (test_nonfinite.py
    # covers the steps it skips).
    ("skip-nonfinite", dict(skip_nonfinite=True)),
    # On one device the placement of the state is all it changes, so the
    # numbers are the same (TensorFlow and torch warn that it has no effect);
    # test_sharding.py runs it on 8 devices.
    ("shard-state", dict(shard_state=True)),
    # float32 variables are written exactly as before under every rounding
    # (test_rounding.py covers the 16-bit variables it changes).
    ("weight-rounding-compensated", dict(weight_rounding="compensated")),
    # One group holding every variable: the rule with the group's values
    # (`effective` gives them to the reference). tests/test_groups.py tests
    # several groups against separate optimizers and torch's param groups.
    ("groups-all", dict(groups={".*": dict(learning_rate_multiplier=0.5, beta_1=0.5,
                                           beta_2=0.95, epsilon=1e-3)})),
]

GRID = list(_switch_rows()) + HYPERPARAMETER_ROWS
GRID_IDS = [ident for ident, _ in GRID]
GRID_KWARGS = [kwargs for _, kwargs in GRID]


# (id, keras_adam.Adam kwargs, variables' dtype): each layout the C loop of the
# whole-variable step takes (keras_adam/backends/rows.c, on torch and JAX),
# each of its macros set once.
C_LOOP_LAYOUTS = [
    ("bfloat16-moments", dict(moment_dtype="bfloat16"), "float32"),
    ("bfloat16-moments-amsgrad-nesterov",
     dict(moment_dtype="bfloat16", amsgrad=True, nesterov=True), "float32"),
    ("bfloat16-moments-epsilon-0", dict(moment_dtype="bfloat16", epsilon=0.0), "float32"),
    ("pure-bfloat16", {}, "bfloat16"),
    ("pure-bfloat16-weight-decay", dict(weight_decay=0.1), "bfloat16"),
    ("bfloat16-float32-moments-amsgrad", dict(moment_dtype="float32", amsgrad=True),
     "bfloat16"),
    ("pure-bfloat16-paper-uncorrected",
     dict(epsilon_placement="paper", epsilon=1e-3, bias_correction=False), "bfloat16"),
    ("8bit", dict(moment_dtype="8bit", min_8bit_size=1), "float32"),
    ("8bit-amsgrad-nesterov",
     dict(moment_dtype="8bit", min_8bit_size=1, amsgrad=True, nesterov=True), "float32"),
    ("8bit-bfloat16-weight-decay", dict(moment_dtype="8bit", min_8bit_size=1,
                                        weight_decay=0.1), "bfloat16"),
    ("8bit-beta_2-0-unbounded", dict(moment_dtype="8bit", min_8bit_size=1, beta_2=0.0),
     "float32"),
]

# The variables of the C loop's tests (tests/test_backend_jax.py,
# test_backend_tensorflow_loop.py), named w0..w4: rows of 8, 30 and 256
# (8-bit: blocks of 8, 30, 256), a flat odd one, and an odd-sized large one
# whose 8-bit rows end in a shorter block, which the loop does not take.
C_LOOP_SHAPES = [(4, 8), (40, 30), (15,), (300, 256), (3, 65537)]
C_LOOP_SHORT_BLOCKS = "w4"


def c_loop_variables(kwargs, dtype):
    """`C_LOOP_SHAPES`' variables (w0..w4, of `dtype`) and keras_adam.Adam(
    learning_rate=1e-2, **kwargs) built on them, from fixed seeds (the
    stochastic rounding's streams' too)."""
    import keras_adam

    keras.utils.set_random_seed(5)
    rng = np.random.default_rng(13)
    variables = [keras.Variable(rng.normal(size=s), dtype=dtype, name=f"w{i}")
                 for i, s in enumerate(C_LOOP_SHAPES)]
    optimizer = keras_adam.Adam(learning_rate=1e-2, **kwargs)
    optimizer.build(variables)
    return variables, optimizer


def assert_c_loop_bits(paths, eight_bit, op_by_op, compiled, looped, eager):
    """The C loop's values (`looped` in a compiled step, `eager`) equal to the
    step run op by op, bit for bit, for every variable the loop takes; the
    short-blocked variable's, under 8-bit codes, to the compiled step's. Each
    a list of float32 arrays in `paths`' order."""
    for path, want, compiled_want, got, got_eager in zip(paths, op_by_op, compiled, looped,
                                                          eager):
        if eight_bit and C_LOOP_SHORT_BLOCKS in path:
            np.testing.assert_array_equal(got, compiled_want, err_msg=path)
        else:
            np.testing.assert_array_equal(got, want, err_msg=path)
            np.testing.assert_array_equal(got_eager, want, err_msg=path)


def c_loop_gradients(eight_bit, nan=False):
    """Four steps' gradients of `C_LOOP_SHAPES`: with `nan`, NaN in part of w1's
    first row and of w3's sixth at the third step; otherwise, without 8-bit
    codes (whose block of an infinite absmax would be NaN), a gradient of
    1e30 whose square overflows v to infinity (kept by the rounding)."""
    rng = np.random.default_rng(7)
    steps = [[rng.normal(size=s) for s in C_LOOP_SHAPES] for _ in range(4)]
    if nan:
        steps[2][1][0, :20] = np.nan
        steps[2][3][5, 3:70] = np.nan
    elif not eight_bit:
        steps[1][1][0, 0] = 1e30
    return steps


# --- Problems and runners -------------------------------------------------
SHAPES = [(7, 5), (11,)]


def gradient_sequence(steps, shapes=SHAPES, seed=0):
    """Fixed random gradients, one list per step.

    Each column gets its own scale from 1e-4 to 1e2 (Adam is meant to be
    invariant to it), and about 10% of entries are exactly zero (so some
    coordinates see g = 0 steps, where only momentum moves them).
    """
    rng = np.random.default_rng(seed)
    sequence = []
    scales = [10.0 ** rng.uniform(-4, 2, size=shape[-1:]) for shape in shapes]
    for _ in range(steps):
        grads = []
        for shape, scale in zip(shapes, scales):
            g = rng.normal(size=shape) * scale
            g[rng.random(size=shape) < 0.1] = 0.0
            grads.append(g.astype("float32"))
        sequence.append(grads)
    return sequence


def initial_values(shapes=SHAPES, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape).astype("float32") for shape in shapes]


def run_optimizer(optimizer, x0, sequence, compiled=True, names=None):
    """Applies `sequence` with `optimizer` to fresh variables; returns the variables.

    With `compiled`, each step runs as `model.fit` runs it: inside one
    `tf.function` on TensorFlow; on JAX as `jax.jit` of `stateless_apply`
    (the JAX trainer's path). Eager steps cost ~10 ms each, which would make
    the 1,000-step parity runs slow. `names` names the variables (their paths).
    """
    variables = [keras.Variable(x, name=None if names is None else names[i])
                 for i, x in enumerate(x0)]
    optimizer.build(variables)
    if compiled and keras.backend.backend() == "jax":
        return _run_jax_stateless(optimizer, variables, sequence)

    def step(grads):
        optimizer.apply(grads, variables)

    if compiled and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        step = tf.function(step, jit_compile=False)
    for grads in sequence:
        step([keras.ops.convert_to_tensor(g) for g in grads])
    return variables


def _run_jax_stateless(optimizer, variables, sequence):
    import jax

    @jax.jit
    def step(trainable, optimizer_state, grads):
        return optimizer.stateless_apply(optimizer_state, grads, trainable)

    trainable = [v.value for v in variables]
    state = [v.value for v in optimizer.variables]
    for grads in sequence:
        trainable, state = step(trainable, state, grads)
    for variable, value in zip(variables + optimizer.variables, trainable + state):
        variable.assign(value)
    return variables


def effective(kwargs):
    """`kwargs` with a group that holds every variable (pattern ".*") resolved: its
    values in place of the optimizer's, lr multiplied. Other groups: unchanged."""
    groups = kwargs.get("groups") or {}
    if list(groups) != [".*"]:
        return kwargs
    out = {k: v for k, v in kwargs.items() if k != "groups"}
    overrides = dict(groups[".*"])
    multiplier = overrides.pop("learning_rate_multiplier", 1.0)
    out["learning_rate"] = kwargs.get("learning_rate", 1e-3) * multiplier
    out.update(overrides)
    return out


def reference_options(kwargs):
    """The subset of constructor kwargs that `keras_adam.reference.step` takes."""
    keys = (
        "learning_rate beta_1 beta_2 epsilon amsgrad nesterov bias_correction "
        "epsilon_placement weight_decay"
    ).split()
    return {k: kwargs[k] for k in keys if k in kwargs}
