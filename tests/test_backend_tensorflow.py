"""TensorFlow's fused kernels: equal to the portable rule, eager, in tf.function and XLA.

Skips only where the TensorFlow backend is not the active one.
"""

import keras
import numpy as np
import pytest
from grid import (
    FUSED_TF_STEP_REL,
    FUSED_TF_V_REL,
    UNIT_ROUNDOFF,
    float32_drift_bound,
    gradient_sequence,
    initial_values,
)

import keras_adam

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="TensorFlow backend only"
)
tf = pytest.importorskip("tensorflow")

# 100 steps: c1 reaches 1 - 0.9^100 ~ 1 while c2 is still 0.095, so both the
# bias-corrected start and the c1 ~ 1 regime are crossed.
STEPS = 100
SEQUENCE = gradient_sequence(STEPS, seed=3)
X0 = initial_values(seed=4)

# Options for which the fused kernel computes the rule (backends/__init__.py).
FUSED_OPTIONS = [
    ("defaults", {}),
    ("amsgrad", dict(amsgrad=True)),
    ("paper", dict(epsilon_placement="paper", epsilon=1e-3)),
    ("amsgrad-paper", dict(amsgrad=True, epsilon_placement="paper", epsilon=1e-3)),
    ("uncorrected", dict(bias_correction=False)),
    ("nesterov-uncorrected", dict(nesterov=True, bias_correction=False)),
    ("weight-decay", dict(weight_decay=0.1, learning_rate=1e-2)),
]
# The kernel forms 1 - beta_2 from float32(beta_2): v is off by up to
# FUSED_TF_V_REL = 1.3e-5 relative, so each step by half of that,
# FUSED_TF_STEP_REL = 6.5e-6 relative (tests/grid.py), on top of the usual
# float32 drift of both paths. Measured on theta: 1.2e-7 with the defaults,
# 9.5e-7 without bias correction (there c2 = 1 cannot follow the kernel's
# beta_2).
# The slots: the kernel's beta_2, plus 2u per step for each path.
SLOT_RTOL = FUSED_TF_V_REL + 2 * 2 * STEPS * UNIT_ROUNDOFF


def _run(kwargs, mode, dtype="float32"):
    optimizer = keras_adam.Adam(**kwargs)
    variables = [keras.Variable(x.astype(dtype)) for x in X0]
    optimizer.build(variables)

    def step(grads):
        optimizer.apply(grads, variables)

    if mode != "eager":
        step = tf.function(step, jit_compile=(mode == "xla"))
    for grads in SEQUENCE:
        step([tf.constant(g, dtype) for g in grads])
    return optimizer, variables


def _compare(kwargs, fused, portable, variables_fused, variables_portable):
    lr = kwargs.get("learning_rate", 1e-3)
    for a, b in zip(variables_fused, variables_portable):
        bound = 2 * float32_drift_bound(STEPS, 4 * lr, np.abs(b.numpy()).max())
        bound += STEPS * 4 * lr * FUSED_TF_STEP_REL
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=bound)
        for slot_a, slot_b in zip(fused.slots(a), portable.slots(b)):
            if slot_b is None:
                assert slot_a is None
                continue
            np.testing.assert_allclose(slot_a.numpy(), slot_b.numpy(), rtol=SLOT_RTOL,
                                       atol=1e-12)


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
@pytest.mark.parametrize("kwargs", [o[1] for o in FUSED_OPTIONS], ids=[o[0] for o in FUSED_OPTIONS])
def test_fused_matches_portable(kwargs, mode):
    fused, vf = _run({**kwargs, "fused": True}, mode)
    portable, vp = _run({**kwargs, "fused": False}, mode)
    _compare(kwargs, fused, portable, vf, vp)


def test_float64_fused_matches_portable_closely():
    # In float64 the kernel's beta rounding is 1e-16-sized: the paths agree to
    # float64 roundoff accumulated over 100 steps (100 * 1e-15, generously).
    # (This caught epsilon passing through float32 on its way to the kernel.)
    fused, vf = _run({"fused": True}, "graph", "float64")
    portable, vp = _run({"fused": False}, "graph", "float64")
    for a, b in zip(vf, vp):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("placement", ["hat", "paper"])
def test_fused_first_step_is_lr(placement):
    # Paper, section 2.1: with bias correction, m_hat = g and v_hat = g^2 at
    # step 1, so the step is lr * g / (|g| + eps_eff), with eps_eff = eps for
    # "paper" and eps / sqrt(1 - beta_2) for "hat" (3.2e-6 at |g| = 1). The
    # kernel runs beta_2' = float32(0.999), so this holds only if c2 is
    # computed for that beta_2' too; with c2 for 0.999 the step is 1 + 6.4e-6
    # times too large (the error this test caught). Tolerance: theta_1 in
    # float32 after a few roundings (m, v, sqrt, lr', divide) of u each: 1e-6.
    g = np.array([1.0, -3.0, 250.0, -7e3], "float32")
    theta = keras.Variable(np.zeros(4, "float32"))
    optimizer = keras_adam.Adam(fused=True, epsilon_placement=placement)
    optimizer.apply([tf.constant(g)], [theta])
    # The kernel really runs for this optimizer's options (not the portable path).
    assert "ResourceApplyAdam" in _op_types(
        keras_adam.Adam(fused=True, epsilon_placement=placement), [keras.Variable(g)],
        grads=[tf.constant(g)])
    eps_eff = 1e-7 / np.sqrt(1 - 0.999) if placement == "hat" else 1e-7
    g64 = g.astype("float64")
    np.testing.assert_allclose(-theta.numpy() / 1e-3, g64 / (np.abs(g64) + eps_eff), rtol=1e-6)


def _op_types(optimizer, variables, jit_compile=False, grads=None):
    """The op types in the graph of one `apply` step."""
    @tf.function(jit_compile=jit_compile)
    def step(grads):
        optimizer.apply(grads, variables)

    grads = grads or [tf.constant(g) for g in SEQUENCE[0]]
    graph = step.get_concrete_function(grads).graph
    return {op.type for op in graph.get_operations()}


@pytest.mark.parametrize(
    "kwargs,kernel",
    [({}, "ResourceApplyAdam"), (dict(amsgrad=True), "ResourceApplyAdamWithAmsgrad"),
     (dict(epsilon_placement="paper"), "ResourceApplyAdam")],
    ids=["adam", "amsgrad", "paper"],
)
def test_auto_selects_the_kernel(kwargs, kernel):
    variables = [keras.Variable(x) for x in X0]
    assert kernel in _op_types(keras_adam.Adam(**kwargs), variables)
    variables = [keras.Variable(x) for x in X0]
    assert kernel not in _op_types(keras_adam.Adam(fused=False, **kwargs), variables)


def test_amsgrad_under_xla_falls_back_to_portable():
    # ResourceApplyAdamWithAmsgrad has no XLA kernel: if the XLA-context check
    # (a private TF seam, backends/tensorflow.py) broke, this would fail to compile.
    variables = [keras.Variable(x) for x in X0]
    ops_in_graph = _op_types(keras_adam.Adam(amsgrad=True), variables, jit_compile=True)
    assert "ResourceApplyAdamWithAmsgrad" not in ops_in_graph
    _, vx = _run(dict(amsgrad=True), "xla")
    _, vg = _run(dict(amsgrad=True, fused=False), "graph")
    for a, b in zip(vx, vg):
        bound = 2 * float32_drift_bound(STEPS, 4e-3, np.abs(b.numpy()).max())
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=bound)


def test_bfloat16_variables_use_the_portable_path():
    variable = keras.Variable(np.ones(4), dtype="bfloat16")
    optimizer = keras_adam.Adam()
    optimizer.build([variable])
    assert "ResourceApplyAdam" not in _op_types(optimizer, [variable],
                                                grads=[tf.ones(4, "bfloat16")])
    optimizer.apply([tf.ones(4, "bfloat16")], [variable])
    # First step: lr * sign(g) = 1e-3, then rounded to bfloat16 near 1 (ulp 2^-7):
    # 1 - 0.001 rounds back to 1.0. The kernel would have produced -1e5 (beta_2
    # rounds to 1 in bfloat16, v stays 0); the portable path must stay finite.
    assert np.all(np.isfinite(variable.numpy().astype("float32")))
    assert np.all(np.abs(variable.numpy().astype("float32") - 1.0) <= 2 ** -7)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [(dict(nesterov=True), "1 - beta_1\\^\\(t\\+1\\)"),
     (dict(nesterov=True, amsgrad=True, bias_correction=False), "no Nesterov option")],
    ids=["nesterov-corrected", "nesterov-amsgrad"],
)
def test_fused_true_refuses_what_the_kernel_cannot_compute(kwargs, pattern):
    with pytest.raises(ValueError, match=f"`fused=True` is not possible: .*{pattern}"):
        keras_adam.Adam(fused=True, **kwargs)


def test_fused_true_refuses_bfloat16_at_build():
    optimizer = keras_adam.Adam(fused=True)
    with pytest.raises(ValueError, match="`fused=True` is not possible: .*bfloat16"):
        optimizer.build([keras.Variable(np.ones(3), dtype="bfloat16")])


def test_fit_with_jit_compile():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 3)).astype("float32")
    y = (x @ np.array([[2.0], [-1.0], [3.0]])).astype("float32")
    for kwargs in ({}, dict(amsgrad=True)):
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(8), keras.layers.Dense(1)])
        model.compile(optimizer=keras_adam.Adam(learning_rate=1e-2, **kwargs), loss="mse",
                      jit_compile=True)
        history = model.fit(x, y, epochs=10, batch_size=32, verbose=0)
        # A linear target and a linear model: the loss must fall by far more
        # than 90% in 80 steps of lr = 1e-2 (starting MSE ~14).
        assert history.history["loss"][-1] < 0.1 * history.history["loss"][0]
