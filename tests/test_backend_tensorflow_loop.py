"""TensorFlow on a CPU: the whole-variable step of 8-bit codes, bfloat16 moments
and stochastically rounded weights as one C loop in an op that updates the
variables in place (`keras_adam.backends.tf_rows`).

Skips only where the TensorFlow backend is not the active one.
"""

import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
from grid import (
    C_LOOP_LAYOUTS,
    C_LOOP_SHAPES,
    C_LOOP_SHORT_BLOCKS,
    c_loop_gradients,
    assert_c_loop_bits,
    c_loop_variables,
)


pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="TensorFlow backend only"
)
tf = pytest.importorskip("tensorflow")



@pytest.fixture
def counted(monkeypatch):
    """The variables the op updated, one entry per call."""
    from keras_adam.backends import tf_rows

    calls = []
    real_update = tf_rows.WithLoop.update

    def counting_update(self, gradient, variable, *rest):
        done = real_update(self, gradient, variable, *rest)
        if done:
            calls.append(variable.name)
        return done

    monkeypatch.setattr(tf_rows.WithLoop, "update", counting_update)
    return calls


def _run(loop, mode, kwargs, dtype, gradients):
    """The variables and the optimizer's state after `gradients`' steps of
    `apply`, eager, in a tf.function or with XLA (`mode`), or "op-by-op" (the
    step function not compiled, run eagerly, the loop off): their paths and
    values (float32 arrays: exact for bfloat16 and 8-bit codes)."""
    from keras_adam import _whole
    from keras_adam.backends import tensorflow as tf_backend
    from keras_adam.backends import tf_rows

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tf_rows, "enabled", loop)
        patch.setattr(_whole, "_SHARED", {})  # (functions are shared by optimizers)
        if mode == "op-by-op":
            patch.setattr(tf_backend, "compiled", lambda fn: fn)
        variables, optimizer = c_loop_variables(kwargs, dtype)
        apply = lambda g: optimizer.apply(g, variables)  # noqa: E731
        if mode in ("function", "xla"):
            apply = tf.function(apply, jit_compile=mode == "xla")
        for grads in gradients:
            apply([tf.convert_to_tensor(g, dtype) for g in grads])
        everything = variables + list(optimizer.variables)
        return ([v.path for v in everything],
                [np.asarray(keras.ops.cast(v.value, "float32")) for v in everything])


@pytest.mark.parametrize("kwargs,dtype", [r[1:] for r in C_LOOP_LAYOUTS],
                         ids=[r[0] for r in C_LOOP_LAYOUTS])
def test_the_c_loop_has_the_bits_of_the_step_run_op_by_op(counted, kwargs, dtype):
    """The loop rounds each operation once, in IEEE float32, in the step's order
    (rows.c is compiled without fused multiply-adds), and draws the same
    random bits from the same keys and positions. The oracle is the step
    function run op by op (not compiled, the loop off): each operation is a
    kernel of its own, one rounding each. So the weights, the moments and
    their codes must be equal bit for bit, in a tf.function and eagerly.
    (XLA's cluster fuses multiplications into additions and may differ in
    the last bit.) The variable whose 8-bit rows end in a shorter block takes
    the cluster in both: it is compared with the cluster."""
    eight_bit = kwargs.get("moment_dtype") == "8bit"
    gradients = c_loop_gradients(eight_bit)
    paths, op_by_op = _run(False, "op-by-op", kwargs, dtype, gradients)
    _, cluster = _run(False, "function", kwargs, dtype, gradients)
    assert not counted
    _, looped = _run(True, "function", kwargs, dtype, gradients)
    covered = len(C_LOOP_SHAPES) - eight_bit
    assert len(counted) == covered and C_LOOP_SHORT_BLOCKS not in counted or not eight_bit, counted
    _, eager = _run(True, "eager", kwargs, dtype, gradients)
    assert len(counted) == covered * (1 + len(gradients)), counted
    if not eight_bit:
        assert np.isinf(op_by_op[paths.index("adam/w1_v")][0, 0])
    assert_c_loop_bits(paths, eight_bit, op_by_op, cluster, looped, eager)


@pytest.mark.parametrize("moment_dtype,dtype", [("bfloat16", "float32"), ("bfloat16", "bfloat16"),
                                                 ("8bit", "float32"), ("8bit", "bfloat16")])
def test_the_c_loop_writes_nan_where_the_step_run_op_by_op_does(moment_dtype, dtype):
    """A NaN gradient poisons its elements' moments and weights, and an 8-bit
    block's scale (its absmax; then the whole block from the next step on).
    The oracle is the step function run op by op: every float the loop
    writes must be NaN exactly where the oracle's is, with the same bits
    elsewhere. (A NaN's own sign and payload bits, and the codes of a block
    whose scale is NaN, may differ: codes are compared where their block's
    scale is finite.)"""
    kwargs = dict(moment_dtype=moment_dtype)
    if moment_dtype == "8bit":
        kwargs["min_8bit_size"] = 1
    gradients = c_loop_gradients(moment_dtype == "8bit", nan=True)
    paths, want = _run(False, "op-by-op", kwargs, dtype, gradients)
    _, got = _run(True, "function", kwargs, dtype, gradients)
    assert np.isnan(want[1]).any()
    if moment_dtype == "8bit":  # (a whole row: its block poisoned)
        assert np.isnan(want[1]).all(axis=1).any()
    for path, a, b in zip(paths, want, got):
        if moment_dtype == "8bit" and C_LOOP_SHORT_BLOCKS in path:
            continue  # (the cluster: not the loop)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=path)
        if moment_dtype == "8bit" and path.endswith(("_m", "_v")):
            scale = want[paths.index(path + "_scale")]
            finite = np.repeat(np.isfinite(scale), a.size // scale.size).reshape(a.shape)
            assert finite.any()
            np.testing.assert_array_equal(a[finite], b[finite], err_msg=path)
        else:
            np.testing.assert_array_equal(a[~np.isnan(a)], b[~np.isnan(b)], err_msg=path)


def test_under_xla_the_cluster_runs(counted):
    """jit_compile=True traces the step into an XLA program, where the op has
    no kernel: the cluster runs. The oracle is the same run with the loop
    off."""
    kwargs, gradients = dict(moment_dtype="8bit", min_8bit_size=1), c_loop_gradients(True)
    _, want = _run(False, "xla", kwargs, "float32", gradients)
    _, got = _run(True, "xla", kwargs, "float32", gradients)
    assert not counted
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("compiler", ["absent", "failing"])
def test_without_a_compiler_the_cluster_runs(monkeypatch, compiler):
    """Where no C++ compiler is found, or it fails (`CXX=false`), the op is not
    built and the cluster runs: the oracle is the same run with the loop off."""
    from keras_adam.backends import tf_rows

    kwargs, gradients = dict(moment_dtype="bfloat16"), c_loop_gradients(False)
    _, want = _run(False, "function", kwargs, "float32", gradients)
    monkeypatch.setattr(tf_rows, "_OPS", [])
    monkeypatch.setattr(tf_rows, "_LOOPS", {})
    if compiler == "absent":
        monkeypatch.setattr(shutil, "which", lambda name: None)
    else:
        assert shutil.which("false")
        monkeypatch.setenv("CXX", "false")
    _, got = _run(True, "function", kwargs, "float32", gradients)
    assert tf_rows._OPS == [None] and set(tf_rows._LOOPS.values()) == {None}
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a, b)


@pytest.mark.subprocess
def test_a_saved_training_step_loads_where_the_layout_is_compiled(tmp_path):
    """A SavedModel whose training step ran the op holds it: a fresh process
    loads it once keras_adam has compiled the same layout there (one step of
    an optimizer with the same options), and its two further steps write the
    saving process's bits (the oracle: that process's own two steps after
    saving). Before that, loading fails naming the op."""
    from helpers import run_python

    script = Path(__file__).with_name("tf_saved_step_run.py")
    directory = tmp_path / "trainer"
    run_python(script, "save", directory, tmp_path / "saved.npy")
    failed = run_python(script, "load", directory, tmp_path / "plain.npy")
    assert "KerasAdamStep" in failed.stdout and not (tmp_path / "plain.npy").exists()
    run_python(script, "prepare-load", directory, tmp_path / "loaded.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "loaded.npy"),
                                  np.load(tmp_path / "saved.npy"))


def test_the_op_refuses_what_its_layout_does_not_describe():
    """The op runs what a graph (perhaps a loaded one) gives it: a variable of
    another size or dtype than its layout's, or a graph of another version,
    fails with an error naming it, before the loop touches memory."""
    from keras_adam.backends import tf_rows

    kwargs, gradients = dict(moment_dtype="bfloat16"), c_loop_gradients(False)
    _run(True, "function", kwargs, "float32", gradients[:1])  # (the op and this layout built)
    # bfloat16 moments of float32 variables (rows.py's MACROS)
    layout = [0, 1, 1, 2, 2, 0, 0, 0, 0, 0, 0]
    theta = tf.Variable(tf.ones((4, 8)))
    m = tf.Variable(tf.zeros((4, 8), tf.bfloat16))

    # beta_1, 1 - beta_1, beta_2, 1 - beta_2, Nesterov's, alpha, epsilon, rate, lr, K
    scalars = tf.constant([0.9, 0.1, 0.999, 0.001, 0.0, 1e-3, 1e-7, 0.0, 1e-3, 0.0])

    def step(v, version=tf_rows.VERSION):
        tf_rows._OPS[0].keras_adam_step(
            scalars, tf.zeros(4, tf.int32), tf.ones((4, 8)), [theta.handle, m.handle, v.handle],
            layout=layout, length=0, threads=1, version=version)

    with pytest.raises(tf.errors.InvalidArgumentError, match="variable 2 is bfloat16 of 28"):
        step(tf.Variable(tf.zeros((4, 7), tf.bfloat16)))
    with pytest.raises(tf.errors.InvalidArgumentError, match="variable 2 is float of 32"):
        step(tf.Variable(tf.zeros((4, 8))))
    with pytest.raises(tf.errors.FailedPreconditionError, match="version 99"):
        step(tf.Variable(tf.zeros((4, 8), tf.bfloat16)), version=99)
    np.testing.assert_array_equal(theta.numpy(), 1.0)  # untouched
    step(tf.Variable(tf.zeros((4, 8), tf.bfloat16)))  # (the layout's own: it runs)
    # m = 0.1 g, v = 0.001 g^2 from zero, theta -= alpha m / (sqrt(v) + epsilon),
    # with g = 1: a few float32 roundings of the closed form.
    np.testing.assert_allclose(theta.numpy(), 1.0 - 1e-3 * 0.1 / (np.sqrt(0.001) + 1e-7),
                               rtol=1e-6)
