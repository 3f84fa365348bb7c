"""TensorFlow on a CPU: the whole-variable step of 8-bit codes, bfloat16 moments
and stochastically rounded weights as one C loop, in an op that updates the
variables in place and, under XLA, as a custom call in XLA's program
(`keras_adam.backends.tf_rows`).

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


@pytest.fixture
def in_programs(monkeypatch):
    """The custom calls traced into XLA's programs, one entry per call: the
    number of elements of its variable."""
    from keras_adam.backends import tf_rows

    calls = []
    real_call = tf_rows._in_program

    def counting_call(arguments, gradient, written):
        calls.append(int(np.prod(gradient.shape)))
        return real_call(arguments, gradient, written)

    monkeypatch.setattr(tf_rows, "_in_program", counting_call)
    return calls


def _run(loop, mode, kwargs, dtype, gradients, moved=None):
    """The variables and the optimizer's state after `gradients`' steps of
    `apply`, eager, in a tf.function or with XLA (`mode`), or "op-by-op" (the
    step function not compiled, run eagerly, the loop off): their paths and
    values (float32 arrays: exact for bfloat16 and 8-bit codes). Given a list
    `moved`, each variable's sum over the steps of |theta_t - theta_t-1| and
    its largest |theta_t| are appended to it (a pair of float64 arrays)."""
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
        before = [np.asarray(keras.ops.cast(v.value, "float64")) for v in variables]
        total, largest = [np.zeros_like(b) for b in before], [np.abs(b) for b in before]
        for grads in gradients:
            apply([tf.convert_to_tensor(g, dtype) for g in grads])
            after = [np.asarray(keras.ops.cast(v.value, "float64")) for v in variables]
            total = [t + np.abs(a - b) for t, a, b in zip(total, after, before)]
            largest = [np.maximum(x, np.abs(a)) for x, a in zip(largest, after)]
            before = after
        if moved is not None:
            moved.extend(zip(total, largest))
        everything = variables + list(optimizer.variables)
        return ([v.path for v in everything],
                [np.asarray(keras.ops.cast(v.value, "float32")) for v in everything])


@pytest.mark.parametrize("kwargs,dtype", [r[1:] for r in C_LOOP_LAYOUTS],
                         ids=[r[0] for r in C_LOOP_LAYOUTS])
def test_the_c_loop_has_the_bits_of_the_step_run_op_by_op(counted, in_programs, kwargs, dtype):
    """The loop rounds each operation once, in IEEE float32, in the step's order
    (rows.c is compiled without fused multiply-adds), and draws the same
    random bits from the same keys and positions. The oracle is the step
    function run op by op (not compiled, the loop off): each operation is a
    kernel of its own, one rounding each. So the weights, the moments and
    their codes must be equal bit for bit, in a tf.function, eagerly (the
    op) and with XLA around the step (the custom call in XLA's program).
    (XLA's cluster fuses multiplications into additions and may differ in
    the last bit.) The variable whose 8-bit rows end in a shorter block takes
    the cluster in all: it is compared with the cluster."""
    eight_bit = kwargs.get("moment_dtype") == "8bit"
    gradients = c_loop_gradients(eight_bit)
    moved = []
    paths, op_by_op = _run(False, "op-by-op", kwargs, dtype, gradients, moved)
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
    assert not in_programs
    _, xla = _run(True, "xla", kwargs, dtype, gradients)
    assert len(in_programs) == covered, in_programs  # (traced once)
    _, xla_cluster = _run(False, "xla", kwargs, dtype, gradients)
    _assert_xla_bits(paths, eight_bit, op_by_op, xla_cluster, xla, dtype, len(gradients), moved)


def _assert_xla_bits(paths, eight_bit, op_by_op, xla_cluster, xla, dtype, steps, moved):
    """Under XLA the loop is the custom call's, but the step's scalars (alpha
    from lr and the powers of the betas) are computed by XLA, which may round
    alpha otherwise than the ops run one by one. The moments do not depend on
    alpha: they, their codes and their scales must equal the oracle's bit for
    bit. theta may differ: at each step, its step alpha m / (sqrt(v) +
    epsilon) by a few float32 ulps of the step (2^-21 of |step| bounds four),
    and theta - step's rounding, or its stochastic rounding, by one ulp of
    theta's dtype at theta's size then; so by at most `steps` ulps at the
    largest |theta_t| of the oracle's steps, plus 2^-21 of the sum of the
    steps' sizes (from the oracle's thetas, each step within an ulp of theta
    of the true one: the ulps counted once more). `moved`: `_run`'s pairs.
    The short-blocked 8-bit variable runs XLA's cluster in both: compared
    with it, bit for bit."""
    thetas = iter(moved)
    for path, want, cluster_want, got in zip(paths, op_by_op, xla_cluster, xla):
        if eight_bit and C_LOOP_SHORT_BLOCKS in path:
            np.testing.assert_array_equal(got, cluster_want, err_msg=path)
        elif path.startswith("adam/"):
            np.testing.assert_array_equal(got, want, err_msg=path)
        else:
            step_sizes, largest = next(thetas)
            ulp = np.spacing(largest.astype(np.float32)) * (2.0 ** 16 if dtype == "bfloat16"
                                                             else 1.0)
            allowed = steps * ulp + 2.0 ** -21 * (step_sizes + steps * ulp)
            bad = np.abs(got.astype(np.float64) - want) > allowed
            assert not bad.any(), (path, want[bad][:5], got[bad][:5], allowed[bad][:5])


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


def test_under_xla_the_custom_call_writes_nan_where_the_step_run_op_by_op_does(
        counted, in_programs):
    """jit_compile=True traces the step into an XLA program, where the op does
    not run: the loop runs as a custom call in the program, where a NaN
    gradient poisons what it poisons op by op (the oracle), as for the op
    (the test above, on 8-bit codes of float32 variables). Elsewhere the
    values are those of the oracle as `_assert_xla_bits` compares them (the
    step's scalars are XLA's)."""
    kwargs, gradients = dict(moment_dtype="8bit", min_8bit_size=1), c_loop_gradients(True, True)
    moved = []
    paths, want = _run(False, "op-by-op", kwargs, "float32", gradients, moved)
    _, got = _run(True, "xla", kwargs, "float32", gradients)
    assert not counted and len(in_programs) == len(C_LOOP_SHAPES) - 1
    kept = []  # per path, the oracle's, the custom call's and `moved` where compared
    for path, a, b in zip(paths, want, got):
        sizes = None if path.startswith("adam/") else moved[int(path[1:])]
        if C_LOOP_SHORT_BLOCKS in path:
            continue  # (the cluster: not the loop)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=path)
        where = ~np.isnan(a)
        if path.endswith(("_m", "_v")):
            scale = want[paths.index(path + "_scale")]
            where = np.repeat(np.isfinite(scale), a.size // scale.size).reshape(a.shape)
        kept.append((path, a[where], b[where],
                     None if sizes is None else tuple(x[where] for x in sizes)))
    paths, a, b, sizes = zip(*kept)
    _assert_xla_bits(paths, True, a, a, b, "float32", len(gradients),
                     [x for x in sizes if x is not None])


def test_a_program_of_another_configuration_fails_naming_it():
    """The custom call runs what a program gives it (perhaps a loaded one): a
    configuration of another version, or of other sizes or dtypes than the
    program's tensors, fails when XLA compiles it, and one of a layout whose
    loop this process has not compiled fails the step; each with an error
    naming it, having written nothing."""
    from keras_adam.backends import tf_rows

    kwargs, gradients = dict(moment_dtype="bfloat16"), c_loop_gradients(False)
    _run(True, "xla", kwargs, "float32", gradients[:1])  # (the library and this layout built)
    theta = tf.Variable(tf.ones((4, 8)))
    m, v = (tf.Variable(tf.zeros((4, 8), tf.bfloat16)) for _ in range(2))
    # beta_1, 1 - beta_1, beta_2, 1 - beta_2, Nesterov's, alpha, epsilon, rate, lr, K
    scalars = tf.constant([0.9, 0.1, 0.999, 0.001, 0.0, 1e-3, 1e-7, 0.0, 1e-3, 0.0])

    def step(configuration):
        @tf.function(jit_compile=True)
        def run():
            results = tf_rows._XLA[0].keras_adam_step_values(
                scalars, tf.zeros(4, tf.int32), tf.ones((4, 8)), [theta, m, v],
                configuration=configuration)
            for x, y in zip([theta, m, v], results):
                x.assign(y)
        run()

    # version, elements, 8-bit block length, threads, then the layout (rows.py's
    # MACROS: bfloat16 moments of float32 variables)
    layout = "0 1 1 2 2 0 0 0 0 0 0"
    with pytest.raises(tf.errors.OpError, match="another keras_adam"):
        step(f"99 32 0 1 {layout}")
    with pytest.raises(tf.errors.OpError, match="argument 2 is f32.4,8.; the configuration "
                                                "needs 31 elements"):
        step(f"{tf_rows.VERSION} 31 0 1 {layout}")
    with pytest.raises(tf.errors.OpError, match="argument 4 is bf16.4,8.; the configuration "
                                                "needs 32 elements of F32"):
        step(f"{tf_rows.VERSION} 32 0 1 0 1 1 1 1 0 0 0 0 0 0")  # (float32 moments)
    with pytest.raises(tf.errors.OpError, match="threads 0"):
        step(f"{tf_rows.VERSION} 32 0 0 {layout}")
    with pytest.raises(tf.errors.OpError, match=r"layout \[0,1,1,2,2,0,0,0,0,0,1\]"):
        step(f"{tf_rows.VERSION} 32 0 1 0 1 1 2 2 0 0 0 0 0 1")
    np.testing.assert_array_equal(theta.numpy(), 1.0)  # untouched
    step(f"{tf_rows.VERSION} 32 0 1 {layout}")  # (the layout's own: it runs)
    # m = 0.1 g, v = 0.001 g^2 from zero, theta -= alpha m / (sqrt(v) + epsilon),
    # with g = 1: a few float32 roundings of the closed form.
    np.testing.assert_allclose(theta.numpy(), 1.0 - 1e-3 * 0.1 / (np.sqrt(0.001) + 1e-7),
                               rtol=1e-6)


@pytest.mark.parametrize("mode", ["function", "xla"])
@pytest.mark.parametrize("compiler", ["absent", "failing"])
def test_without_a_compiler_the_cluster_runs(monkeypatch, tmp_path, compiler, mode):
    """Where no C++ compiler is found, or it fails (`CXX=false`), neither the op
    nor the custom call is built and the cluster runs, in a tf.function and
    under XLA: the oracle is the same run with the loop off."""
    from keras_adam.backends import tf_rows

    kwargs, gradients = dict(moment_dtype="bfloat16"), c_loop_gradients(False)
    _, want = _run(False, mode, kwargs, "float32", gradients)
    monkeypatch.setattr(tf_rows, "_OPS", [])
    monkeypatch.setattr(tf_rows, "_XLA", [])
    monkeypatch.setattr(tf_rows, "_LOOPS", {})
    monkeypatch.setattr(tf_rows, "_REGISTERED", {"op": set(), "xla": set()})
    monkeypatch.setenv("KERAS_ADAM_CACHE_DIR", str(tmp_path))  # (nothing cached)
    if compiler == "absent":
        monkeypatch.setattr(shutil, "which", lambda name: None)
    else:
        assert shutil.which("false")
        monkeypatch.setenv("CXX", "false")
    _, got = _run(True, mode, kwargs, "float32", gradients)
    assert (tf_rows._XLA if mode == "xla" else tf_rows._OPS) == [None]
    assert tf_rows._LOOPS == {}  # (no loop compiled for a library that failed)
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
