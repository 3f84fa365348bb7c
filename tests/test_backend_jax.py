"""JAX on a CPU: the whole-variable step of 8-bit codes, bfloat16 moments and
stochastically rounded weights as one C loop in the jitted program
(`keras_adam.backends.jax_rows`).

Skips only where the JAX backend is not the active one.
"""

import shutil

import keras
import numpy as np
import pytest
from grid import (
    C_LOOP_LAYOUTS,
    C_LOOP_SHAPES,
    c_loop_gradients,
    assert_c_loop_bits,
    c_loop_variables,
)

import keras_adam

pytestmark = pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX backend only")
jax = pytest.importorskip("jax")



def _run(monkeypatch, loop, jit, kwargs, dtype, gradients):
    """The variables and the optimizer's state after `gradients`' steps of
    `stateless_apply`, jitted with donated state or op by op: their paths and
    values (float32 arrays: exact for bfloat16 and 8-bit codes)."""
    from keras_adam.backends import jax_rows

    monkeypatch.setattr(jax_rows, "enabled", loop)
    variables, optimizer = c_loop_variables(kwargs, dtype)
    apply = lambda t, o, g: optimizer.stateless_apply(o, g, t)  # noqa: E731
    if jit:
        apply = jax.jit(apply, donate_argnums=(0, 1))
    theta, state = [v.value for v in variables], [v.value for v in optimizer.variables]
    for grads in gradients:
        theta, state = apply(theta, state, [keras.ops.convert_to_tensor(g, dtype) for g in grads])
    paths = [v.path for v in variables] + [v.path for v in optimizer.variables]
    return paths, [np.asarray(keras.ops.cast(x, "float32")) for x in list(theta) + list(state)]


@pytest.mark.parametrize("kwargs,dtype", [r[1:] for r in C_LOOP_LAYOUTS],
                         ids=[r[0] for r in C_LOOP_LAYOUTS])
def test_the_c_loop_has_the_bits_of_the_step_run_op_by_op(monkeypatch, kwargs, dtype):
    """The loop rounds each operation once, in IEEE float32, in the step's order
    (rows.c is compiled without fused multiply-adds), and draws the same
    random bits from the same keys and positions. The oracle is the step
    function run op by op (the loop switched off, not jitted): each of its
    operations is a program of its own, one rounding each. So the weights,
    the moments and their codes must be equal bit for bit, jitted and not.
    (Jitted without the loop, XLA fuses multiplications into additions and
    may differ in the last bit.) The variable whose 8-bit rows end in a
    shorter block takes the step function in both: it is compared with the
    jitted step function."""
    from keras_adam.backends import jax_rows

    eight_bit = kwargs.get("moment_dtype") == "8bit"
    calls = []
    real_call = jax_rows._call

    def counting_call(target, arguments, *rest):
        calls.append(arguments[0])
        return real_call(target, arguments, *rest)

    monkeypatch.setattr(jax_rows, "_call", counting_call)
    gradients = c_loop_gradients(eight_bit)
    paths, op_by_op = _run(monkeypatch, False, False, kwargs, dtype, gradients)
    _, fused = _run(monkeypatch, False, True, kwargs, dtype, gradients)
    assert not calls
    _, looped = _run(monkeypatch, True, True, kwargs, dtype, gradients)
    covered = len(C_LOOP_SHAPES) - eight_bit
    assert len(calls) == covered and calls[0][0] == eight_bit, calls  # traced once each
    _, eager = _run(monkeypatch, True, False, kwargs, dtype, gradients)
    assert len(calls) == covered * (1 + len(gradients)), calls
    if not eight_bit:
        v = op_by_op[paths.index("adam/w1_v")]
        assert np.isinf(v[0, 0])
    assert_c_loop_bits(paths, eight_bit, op_by_op, fused, looped, eager)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_c_loop_writes_nan_where_the_step_run_op_by_op_does(monkeypatch, dtype):
    """bfloat16 moments: a NaN gradient poisons its elements' moments and
    weights. The oracle is the step function run op by op: every float the
    loop writes must be NaN exactly where the oracle's is, with the same bits
    elsewhere (a NaN's own sign and payload bits may differ)."""
    kwargs = dict(moment_dtype="bfloat16")
    gradients = c_loop_gradients(False, nan=True)
    paths, want = _run(monkeypatch, False, False, kwargs, dtype, gradients)
    _, got = _run(monkeypatch, True, True, kwargs, dtype, gradients)
    assert np.isnan(want[1]).any()
    for path, a, b in zip(paths, want, got):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=path)
        np.testing.assert_array_equal(a[~np.isnan(a)], b[~np.isnan(b)], err_msg=path)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_nan_gradient_poisons_its_8bit_block(monkeypatch, dtype):
    """8-bit codes: a NaN moment makes its block's scale NaN (the absmax of a
    block holding NaN, as NumPy's `amax` and torch's give it), so the whole
    block's moments and weights are NaN from the next step on, as on torch
    and TensorFlow. (The step function jitted or run op by op on a CPU takes
    XLA's maximum, which passes over NaN: the NaN element's code becomes 0
    and the rest of its block carries on.) The oracle: the blocks that saw a
    NaN gradient (from the gradients themselves) are NaN in the loop's
    weights and scales; every other block has the bits of the step run op by
    op."""
    kwargs = dict(moment_dtype="8bit", min_8bit_size=1)
    gradients = c_loop_gradients(True, nan=True)
    paths, want = _run(monkeypatch, False, False, kwargs, dtype, gradients)
    _, got = _run(monkeypatch, True, True, kwargs, dtype, gradients)
    for k in (1, 3):  # w1 (blocks of 30: one a row) and w3 (of 256)
        poisoned = np.isnan(gradients[2][k]).any(axis=1)
        assert 0 < poisoned.sum() < len(poisoned)
        for path, a, b in zip(paths, want, got):
            if path != f"w{k}" and not path.startswith(f"adam/w{k}_"):
                continue
            if path.endswith("scale") or path == f"w{k}":
                assert np.isnan(b[poisoned]).all(), path
            np.testing.assert_array_equal(a[~poisoned], b[~poisoned], err_msg=path)


@pytest.mark.parametrize("compiler", ["absent", "failing"])
def test_without_a_compiler_the_step_function_runs(monkeypatch, compiler):
    """Where no C compiler is found, or it fails (`CC=false`), no loop is
    registered and the jitted step function runs: the oracle is the same
    program with the loop switched off (the same bits)."""
    from keras_adam.backends import jax_rows

    kwargs, gradients = dict(moment_dtype="bfloat16"), c_loop_gradients(False)
    _, want = _run(monkeypatch, False, True, kwargs, "float32", gradients)
    monkeypatch.setattr(jax_rows, "_TARGETS", {})
    if compiler == "absent":
        monkeypatch.setattr(shutil, "which", lambda name: None)
    else:
        assert shutil.which("false")
        monkeypatch.setenv("CC", "false")
    _, got = _run(monkeypatch, True, True, kwargs, "float32", gradients)
    assert jax_rows._TARGETS and set(jax_rows._TARGETS.values()) == {None}
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a, b)


def test_under_a_distribution_the_step_function_runs(monkeypatch):
    """The custom call has no sharding rule: under a `keras.distribution`
    (whose variables may be sharded) the step function runs."""
    from keras_adam.backends import jax_rows

    calls = []
    real_call = jax_rows._call

    def counting_call(*args):
        calls.append(args)
        return real_call(*args)

    monkeypatch.setattr(jax_rows, "_call", counting_call)
    distribution = keras.distribution.DataParallel(devices=jax.devices()[:1])
    with distribution.scope():
        variable = keras.Variable(np.ones((40, 30)), dtype="float32")
        optimizer = keras_adam.Adam(moment_dtype="bfloat16")
        optimizer.apply([keras.ops.ones((40, 30))], [variable])
    assert not calls
    assert np.all(variable.numpy() < 1)
    optimizer.apply([keras.ops.ones((40, 30))], [variable])  # (outside it: the loop)
    assert len(calls) == 1
