"""torch's fused multi-tensor kernel (torch._fused_adam_): equal to the portable rule.

Skips only where the torch backend is not the active one.
"""

import math
import os

import keras
import numpy as np
import pytest
from grid import (
    C_LOOP_LAYOUTS,
    UNIT_ROUNDOFF,
    float32_drift_bound,
    gradient_sequence,
    initial_values,
    run_optimizer,
)

import keras_adam

pytestmark = pytest.mark.skipif(keras.backend.backend() != "torch", reason="torch backend only")
torch = pytest.importorskip("torch")

# 100 steps: c1 ~ 1 by the end while c2 = 0.095, both regimes crossed.
STEPS = 100
# The slots are EMAs: ~2u relative per step for each of the two paths.
SLOT_REL = 2 * 2 * STEPS * UNIT_ROUNDOFF
SEQUENCE = gradient_sequence(STEPS, seed=5)
X0 = initial_values(seed=6)

FUSED_OPTIONS = [
    ("defaults", {}),
    ("amsgrad", dict(amsgrad=True)),
    ("paper", dict(epsilon_placement="paper", epsilon=1e-3)),
    ("hat-large-epsilon", dict(epsilon=1e-3)),
    ("uncorrected", dict(bias_correction=False)),
    ("weight-decay", dict(weight_decay=0.1, learning_rate=1e-2)),
    ("zero-beta_1", dict(beta_1=0.0)),
]


@pytest.mark.parametrize("kwargs", [o[1] for o in FUSED_OPTIONS], ids=[o[0] for o in FUSED_OPTIONS])
def test_fused_matches_portable(kwargs):
    fused = keras_adam.Adam(fused=True, **kwargs)
    portable = keras_adam.Adam(fused=False, **kwargs)
    a = run_optimizer(fused, X0, SEQUENCE)
    b = run_optimizer(portable, X0, SEQUENCE)
    lr = kwargs.get("learning_rate", 1e-3)
    for i, (x, y) in enumerate(zip(a, b)):
        # Both compute the rule with accurate float32 coefficients in a
        # different order: each is within the drift bound of the exact result.
        bound = 2 * float32_drift_bound(STEPS, 4 * lr, np.abs(y.numpy()).max())
        np.testing.assert_allclose(x.numpy(), y.numpy(), rtol=0, atol=bound)
        # EMAs: ~2u relative per step for each path. m mixes signs, so its
        # error is relative to each column's gradient scale, not to m itself.
        g_scale = np.abs(np.stack([step[i] for step in SEQUENCE])).max(axis=0)
        for s, t, atol in zip(fused.slots(x), portable.slots(y),
                              [SLOT_REL * g_scale, 1e-12, 1e-12]):
            if t is None:
                assert s is None
                continue
            error = np.abs(s.numpy() - t.numpy())
            allowed = atol + SLOT_REL * np.abs(t.numpy())
            assert np.all(error <= allowed), f"worst excess {np.max(error - allowed):.3g}"


def test_float64_fused_matches_portable():
    x0 = [x.astype("float64") for x in X0]
    seq = [[g.astype("float64") for g in step] for step in SEQUENCE]
    a = run_optimizer(keras_adam.Adam(fused=True), x0, seq)
    b = run_optimizer(keras_adam.Adam(fused=False), x0, seq)
    for x, y in zip(a, b):
        # float64 roundoff (1e-16) accumulated over 100 steps, generously.
        np.testing.assert_allclose(x.numpy(), y.numpy(), rtol=0, atol=1e-12)


def test_the_kernel_runs_once_per_step_for_all_variables(monkeypatch):
    # Fails if Keras stops routing apply() through _backend_update_step (the
    # private seam overridden in keras_adam/optimizer.py).
    calls = []
    real = torch._fused_adam_

    def counting(params, *args, **kwargs):
        calls.append(len(params))
        return real(params, *args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adam_", counting)
    run_optimizer(keras_adam.Adam(), X0, SEQUENCE[:3])
    assert calls == [len(X0)] * 3
    calls.clear()
    run_optimizer(keras_adam.Adam(fused=False), X0, SEQUENCE[:3])
    run_optimizer(keras_adam.Adam(nesterov=True), X0, SEQUENCE[:3])  # no Nesterov kernel
    assert calls == []


def test_fused_true_refuses_nesterov_and_bfloat16():
    with pytest.raises(ValueError, match="`fused=True` is not possible: .*Nesterov"):
        keras_adam.Adam(fused=True, nesterov=True)
    with pytest.raises(ValueError, match="`fused=True` is not possible: .*bfloat16"):
        keras_adam.Adam(fused=True).build([keras.Variable(np.ones(3), dtype="bfloat16")])


@pytest.mark.slow
def test_fit_with_jit_compile():
    # jit_compile=True is torch.compile here: the fused kernel steps aside
    # (it fails Inductor's functionalization) and the portable rule is compiled.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 3)).astype("float32")
    y = (x @ np.array([[2.0], [-1.0], [3.0]])).astype("float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(8), keras.layers.Dense(1)])
    model.compile(optimizer=keras_adam.Adam(learning_rate=1e-2), loss="mse", jit_compile=True)
    history = model.fit(x, y, epochs=10, batch_size=32, verbose=0)
    # A linear target and model: the MSE (~14 at the start) falls far below 10%.
    assert history.history["loss"][-1] < 0.1 * history.history["loss"][0]


def _variables(seed):
    return [keras.Variable(x) for x in initial_values(seed=seed)]


def test_the_kernel_follows_assignments_and_stateless_apply():
    """The kernel reuses last step's tensors (backends/torch.py `_tensors`); it must
    still see assignments, and leave the variables alone under stateless_apply."""
    # On the variables' device (Keras's default), as Keras's trainer gives them.
    grads = [keras.ops.convert_to_tensor(g) for g in SEQUENCE[0]]
    runs = {}
    for fused in (True, False):
        variables = _variables(7)
        optimizer = keras_adam.Adam(fused=fused)
        optimizer.build(variables)
        optimizer.apply(grads, variables)
        # Assignments between steps (as load_weights or a callback would do).
        for variable in variables:
            variable.assign(variable.numpy() * 0.5)
        optimizer.slots(variables[0])[0].assign(np.ones(variables[0].shape, "float32"))
        optimizer.apply(grads, variables)
        # A stateless step after stateful ones: new values returned, none assigned.
        before = [v.numpy().copy() for v in variables]
        state = [keras.ops.convert_to_numpy(v) for v in optimizer.variables]
        new_variables, new_state = optimizer.stateless_apply(
            [keras.ops.convert_to_tensor(s) for s in state], grads,
            [keras.ops.convert_to_tensor(b) for b in before])
        for variable, b in zip(variables, before):
            np.testing.assert_array_equal(variable.numpy(), b)
        for v, s in zip(optimizer.variables, state):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), s)
        runs[fused] = before + [keras.ops.convert_to_numpy(x) for x in new_variables]
    for a, b in zip(runs[True], runs[False]):
        # Three steps of the kernel against the portable rule: a few float32
        # roundings apart (test_fused_matches_portable bounds 100 steps).
        np.testing.assert_allclose(a, b, rtol=0, atol=3 * float32_drift_bound(
            3, 4e-3, np.abs(b).max()))


def test_the_decay_factor_has_the_bits_of_keras_tensor_formula():
    # Keras's torch optimizer multiplies each variable by 1 - weight_decay * lr
    # formed from lr's float32 tensor; the fast path forms it in NumPy float32.
    # Oracle: Keras's own expression on the tensor, applied by the same kernel;
    # exact equality, since both should round identically at every operation.
    from keras_adam.backends import torch as torch_path

    rng = np.random.default_rng(3)
    for dtype in (torch.float32, torch.float64):
        for lr_value in [1e-3, 3e-4, 0.1, *rng.uniform(1e-6, 1.0, 20)]:
            for weight_decay in [0.01, 0.05, 0.1, 0.3, *rng.uniform(0.0, 1.0, 5)]:
                lr = torch.tensor(lr_value, dtype=torch.float32)
                params = [torch.tensor(rng.normal(size=64), dtype=dtype)]
                want = [params[0].clone()]
                torch._foreach_mul_(want, 1 - weight_decay * lr)
                factor = torch_path._decay_factor(weight_decay, lr, params)
                assert isinstance(factor, float)
                torch._foreach_mul_(params, factor)
                torch.testing.assert_close(params[0], want[0], rtol=0, atol=0)


# Steps where the bias factors change fastest (1..200), then spread over the
# float32 range of t, past 2^24, where t itself rounds.
SCALAR_STEPS = [*range(1, 201), *np.unique(np.geomspace(201, 2**31, 150).astype(np.int64)),
                2**24 + 1, 2**24 + 3]
SCALAR_OPTIONS = [
    *[dict(nesterov=n, bias_correction=b, epsilon_placement=p)
      for n in (False, True) for b in (True, False) for p in ("hat", "paper")],
    dict(beta_1=0.5, beta_2=0.95, nesterov=True, epsilon_placement="paper"),
    dict(beta_1=0.0, beta_2=0.0, epsilon=1e-2, nesterov=True),  # ln(0) = -inf
    dict(beta_1=0.99, beta_2=0.9999, epsilon=0.0, epsilon_placement="paper"),
]


def _scalar_hyper(**options):
    from keras_adam import _rule

    return _rule.Hyper(**{"beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7, "amsgrad": False,
                          "nesterov": False, "bias_correction": True,
                          "epsilon_placement": "hat", **options})


@pytest.mark.parametrize("options", SCALAR_OPTIONS,
                         ids=["-".join(f"{k}={v}" for k, v in o.items()) for o in SCALAR_OPTIONS])
def test_the_step_scalars_have_the_bits_of_the_rules_ops(options):
    # The fast path forms the step's scalars from t and lr read as numbers
    # (backends/torch.py `step_scalars`). Oracle: `_rule.step_scalars`, the
    # same formulas through Keras's ops on torch tensors. Exact equality for
    # every field: the fast path must make the same float32 roundings and
    # call the same expm1 and sqrt kernels. The learning rate as Keras gives
    # it (a float32 variable), as a Python float and a float64 tensor, and a
    # group's (`Step.scaled`).
    import dataclasses

    from keras_adam import _per_step
    from keras_adam import _rule
    from keras_adam import backends

    hyper = _scalar_hyper(**options)
    rng = np.random.default_rng(4)
    with keras.device("cpu"):  # the fast path's device (Keras's default on a GPU machine is not)
        iterations = keras.Variable(0, dtype="int64", trainable=False)
        rates = [keras.Variable(x, dtype="float32", trainable=False)
                 for x in [1e-3, 0.1234567, 3.0, rng.uniform(1e-6, 1.0)]]
        rates += [0.01, torch.tensor(rng.uniform(1e-6, 1.0), dtype=torch.float64)]
        for i, lr in enumerate(rates):
            for t in SCALAR_STEPS:
                iterations.assign(t - 1)
                step = _per_step.Step(iterations, lr)
                if i == 0:
                    step = step.scaled(0.37)
                assert backends.step_scalars(hyper, step, "float32") is not None
                fast = step.scalars(hyper, "float32")
                want = _rule.step_scalars(hyper, iterations + 1, step.lr, "float32")
                for field in dataclasses.fields(want):
                    a, b = getattr(fast, field.name), getattr(want, field.name)
                    if b is None:
                        assert a is None, field.name
                        continue
                    assert (a.dtype, a.device, a.shape) == (b.dtype, b.device, ()), field.name
                    assert a.numpy().tobytes() == b.numpy().tobytes(), (
                        f"{field.name} at t={t}, lr={lr}: {a.item()!r} != {b.item()!r}")


def test_the_step_count_is_the_tensor_keras_makes():
    # t = iterations + 1, made from the counter read as a number on a CPU
    # (backends/torch.py `step_count`). Oracle: Keras's operator on the
    # counter variable: the same value, dtype, device and shape.
    from keras_adam import _per_step
    from keras_adam import backends

    with keras.device("cpu"):
        for dtype in ("int64", "int32"):
            counter = keras.Variable(0, dtype=dtype, trainable=False)
            for value in (0, 1, 41, 2**31 - 2):
                counter.assign(value)
                step = _per_step.Step(counter, 1e-3)
                assert backends.step_count(step) is not None
                got, want = step.t, counter + 1
                assert (got.dtype, got.device, got.shape) == (want.dtype, want.device, want.shape)
                assert int(got) == int(want) == value + 1
        # At the counter's largest value Keras's operator wraps around: left to it.
        counter.assign(2**31 - 1)
        step = _per_step.Step(counter, 1e-3)
        assert backends.step_count(step) is None
        assert backends.step_scalars(_scalar_hyper(), step, "float32") is None
        assert int(step.t) == int(counter + 1)
    with keras.device("meta"):
        assert backends.step_count(_per_step.Step(counter, 1e-3)) is None


def test_the_step_number_is_the_counter_a_stateless_scope_gives():
    # t read as a number (`Step.number`): the variable's own tensor outside
    # Keras's scopes, the scope's value within one (as `stateless_apply`
    # runs). Oracle: the value the scope maps the counter to, plus one.
    from keras_adam import _per_step

    with keras.device("cpu"):
        counter = keras.Variable(4, dtype="int64", trainable=False)
        with keras.StatelessScope(state_mapping=[(counter, torch.tensor(41))]):
            step = _per_step.Step(counter, 1e-3)
            assert step.number() == 42 == int(step.t)
            assert step.scaled(0.5).number() == 42  # (a group's: the step it scales)
        assert _per_step.Step(counter, 1e-3).number() == 5


def test_a_groups_step_reads_the_counter_and_device_once(monkeypatch):
    # A group's step (`Step.scaled`) takes t, and whether the step runs on the
    # CPU, from the step it scales: Keras's device and the counter are asked
    # once per step, not once per group. Oracle: the parent's values, and
    # the count of asks.
    from keras_adam import _per_step
    from keras_adam.backends import torch as torch_backend

    asked = []
    real = torch_backend._keras_device
    monkeypatch.setattr(torch_backend, "_keras_device", lambda: asked.append(1) or real())
    with keras.device("cpu"):
        counter = keras.Variable(6, dtype="int64", trainable=False)
        rate = keras.Variable(1e-3, dtype="float32", trainable=False)
        step = _per_step.Step(counter, rate)
        groups = [step.scaled(m) for m in (0.5, 0.25, 2.0)]
        hyper = _scalar_hyper()
        for group, m in zip(groups, (0.5, 0.25, 2.0)):
            numbers = group.scalar_numbers(hyper, "float32")
            assert group.number() == step.number() == 7
            assert numbers[0] == np.float32(np.float32(1e-3) * np.float32(m))  # (lr)
    assert len(asked) == 1


def test_the_streams_positions_are_checked_once_per_batch():
    # `many` checks a batch's streams' positions (int64, each under the count of
    # streams / 4, one per variable) once, then remembers the array in the
    # batch's `kept`. Oracle: the rule itself, on arrays that break it.
    from keras_adam.backends import torch_rows

    positions, kept = np.array([0, 1, 2], np.int64), {}
    assert torch_rows._streams_cover((0, 1, 12, positions), 3, kept)
    assert kept["covered"][0] is positions
    # The same array against another count of variables or of streams: refused.
    assert not torch_rows._streams_cover((0, 1, 12, positions), 2, kept)
    assert not torch_rows._streams_cover((0, 1, 8, positions), 3, kept)
    assert torch_rows._streams_cover((0, 1, 12, positions), 3, kept)
    # Positions past the streams, or of another dtype: refused.
    assert not torch_rows._streams_cover((0, 1, 12, np.array([0, 1, 3], np.int64)), 3, {})
    assert not torch_rows._streams_cover((0, 1, 12, np.array([0, 1, 2], np.int32)), 3, {})


def test_the_step_scalars_take_keras_ops_where_the_numbers_do_not_serve(monkeypatch):
    # In float64 (the fast path is float32 only), under torch.compile and off
    # the CPU (variables there, or Keras making tensors elsewhere: "meta"
    # stands for an accelerator) the scalars come from `_rule.step_scalars`;
    # in float32, eagerly, on the CPU, not.
    from keras_adam import _per_step
    from keras_adam import _rule
    from keras_adam import backends

    calls = []
    original = _rule.step_scalars
    monkeypatch.setattr(_rule, "step_scalars", lambda *a: calls.append(a[-1]) or original(*a))
    hyper = _scalar_hyper()
    with keras.device("cpu"):
        iterations = keras.Variable(4, dtype="int64", trainable=False)
        _per_step.Step(iterations, 1e-3).scalars(hyper, "float32")
        assert calls == []
        _per_step.Step(iterations, 1e-3).scalars(hyper, "float64")
        assert calls == ["float64"]
    with keras.device("meta"):
        assert backends.step_scalars(hyper, _per_step.Step(iterations, 1e-3), "float32") is None
        elsewhere = keras.Variable(4, dtype="int64", trainable=False)
    assert backends.step_scalars(hyper, _per_step.Step(elsewhere, 1e-3), "float32") is None
    with keras.device("cpu"):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert backends.step_scalars(hyper, _per_step.Step(iterations, 1e-3), "float32") is None


def test_without_a_compiler_the_whole_step_falls_back_with_one_warning(monkeypatch):
    """8-bit moments' whole-variable step (keras_adam/_whole.py) is compiled by
    torch.compile (where the C loop of the rows does not take it: switched off
    here, as where no C compiler is found). Where compiling fails (no C
    compiler), the step must run the same function uncompiled, and say so
    once."""
    import warnings

    from torch._dynamo.exc import TorchDynamoException

    from keras_adam.backends import torch as torch_path
    from keras_adam.backends import torch_rows

    monkeypatch.setattr(torch_rows, "enabled", False)

    def failing_compile(fn, **kwargs):
        def compiled(*args):
            raise TorchDynamoException("no C compiler found")
        return compiled

    from keras_adam import _whole

    def run(compile_with):
        monkeypatch.setattr(torch, "compile", compile_with)
        monkeypatch.setattr(torch_path, "_WARNED", [])
        monkeypatch.setattr(_whole, "_SHARED", {})  # compiled anew, not shared
        variables = [keras.Variable(x) for x in initial_values(seed=8)]
        optimizer = keras_adam.Adam(moment_dtype="8bit", min_8bit_size=1, learning_rate=1e-2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for grads in SEQUENCE[:3]:
                optimizer.apply([keras.ops.convert_to_tensor(g) for g in grads], variables)
        messages = [str(w.message) for w in caught if "torch.compile" in str(w.message)]
        return [v.numpy() for v in variables], messages

    # Oracle: the same function never compiled (torch.compile as the identity).
    want, none = run(lambda fn, **kwargs: fn)
    got, messages = run(failing_compile)
    assert none == []
    assert len(messages) == 1 and "no C compiler found" in messages[0], messages
    for a, b in zip(got, want):
        # The fallback runs that very function eagerly: the same bits.
        np.testing.assert_array_equal(a, b)


# (id, keras_adam.Adam kwargs, variables' dtype, shapes, torch.compile calls flat
# and shaped, Dynamo graphs flat): 16-bit layouts are element-wise, given flat
# (in rows where they draw random numbers); 8-bit codes are given one block
# per row where each row is whole blocks ((2, 257): a row ends in a shorter
# block, so that variable keeps its shape and its own function).
GIVEN_SHAPES = [
    ("pure-bfloat16", {}, "bfloat16", [(6, 5), (2, 3, 4), (9,)], 1, 3, 1),
    # The rows of 1 first: the graph is traced from them.
    ("pure-bfloat16-odd-first", {}, "bfloat16", [(9,), (6, 5), (2, 3, 4)], 1, 3, 1),
    ("8bit", dict(moment_dtype="8bit", min_8bit_size=1), "float32",
     [(6, 5), (2, 3, 4), (9,), (2, 257)], 1, 4, 3),
    ("pure-bfloat16-8bit", dict(moment_dtype="8bit", min_8bit_size=1), "bfloat16",
     [(6, 5), (2, 3, 4), (9,)], 1, 3, 2),
]


@pytest.mark.parametrize("kwargs,dtype,shapes,flat_compiles,shaped_compiles,graphs",
                         [g[1:] for g in GIVEN_SHAPES], ids=[g[0] for g in GIVEN_SHAPES])
def test_one_compiled_function_serves_every_shape_of_a_layout(
        monkeypatch, kwargs, dtype, shapes, flat_compiles, shaped_compiles, graphs):
    """The whole-variable step takes the tensors in the storage's `given_shapes`
    (flat, or one 8-bit block per row), one torch.compile with dynamic shapes
    for every shape of a layout. Each element's random stream follows its
    position, which these shapes keep, and each block's codes its block:
    the bits must equal the step given each variable in its own shape."""
    from keras_adam import backends

    compiles, options = [], []
    real_compile = torch.compile

    def counting_compile(fn, **kwargs):
        compiles.append(kwargs.get("dynamic"))
        options.append(kwargs.get("options"))
        return real_compile(fn, **kwargs)

    from keras_adam import _whole

    def run(any_length):
        monkeypatch.setattr(backends, "whole_any_length", lambda: any_length)
        monkeypatch.setattr(torch, "compile", counting_compile)
        monkeypatch.setattr(_whole, "_SHARED", {})  # compiled here, not by earlier tests
        compiles.clear()
        options.clear()
        keras.utils.set_random_seed(3)
        rng = np.random.default_rng(4)
        variables = [keras.Variable(rng.normal(size=s), dtype=dtype) for s in shapes]
        optimizer = keras_adam.Adam(learning_rate=1e-3, **kwargs)
        for _ in range(3):
            grads = [keras.ops.convert_to_tensor(rng.normal(size=s), dtype) for s in shapes]
            optimizer.apply(grads, variables)
        state = [x for v in variables for x in optimizer.slots(v) if x is not None]
        state += [x for x in optimizer.variables if x.path.endswith("_scale")]
        return [keras.ops.convert_to_numpy(keras.ops.cast(x, "float32"))
                for x in variables + state], list(compiles), list(options)

    from torch._dynamo.utils import counters
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    from keras_adam.backends import torch as torch_backend

    # A compiler failure would fall back to the eager function (the same bits)
    # with one warning: none here, each graph compiled and run. The compiled
    # function is what is tested, not the rows' C loop that CPU tensors take.
    from keras_adam.backends import torch_rows

    monkeypatch.setattr(torch_rows, "enabled", False)
    monkeypatch.setattr(torch_backend, "_WARNED", [])
    # As on a CPU with vectors wider than 256 bits, on every CPU (on an AVX2
    # one, 256 bits is Inductor's own choice too).
    monkeypatch.setattr(torch_backend, "_narrow_width", lambda: 256)

    # Compiled afresh, not read from the on-disk caches of earlier runs (which
    # skip the pass that would restart).
    counters.clear()
    with inductor_config.patch(fx_graph_cache=False), \
            functorch_config.patch(enable_autograd_cache=False):
        flat, flat_calls, flat_options = run(True)
    # Each graph Dynamo captured went once to AOT autograd: Dynamo never
    # restarted its analysis, which a Python float traced as a symbol (the
    # codec's constants, epsilon) makes it do under dynamic shapes, its
    # tracing done twice (`backends.torch.compiled`).
    assert counters["aot_autograd"]["total"] == counters["stats"]["unique_graphs"] > 0
    # One graph per function on the element-wise layout, though its variables
    # come in rows of 2, 8 and (the odd-sized one) 1, and each row's keys are
    # a row of 4. 8-bit codes are one block per row: a
    # variable of one block alone is one row, which torch compiles apart
    # (a second graph of its function).
    assert counters["stats"]["unique_graphs"] == graphs
    assert not torch_backend._WARNED
    shaped, shaped_calls, shaped_options = run(False)
    assert flat_calls.count(True) == flat_compiles and len(flat_calls) == flat_compiles + (
        1 if (2, 257) in shapes else 0)
    assert shaped_calls == [False] * shaped_compiles
    # The functions given in rows (element-wise, rounding stochastically) are
    # compiled for 256-bit vectors where Inductor would take wider ones; the
    # others, and every function given in its own shapes, with its choice.
    # On a CPU with AVX-512, the bits below are those of the two widths.
    rows = kwargs.get("moment_dtype") != "8bit"
    assert flat_options == [{"cpp.simdlen": 256} if rows else None] * len(flat_calls)
    assert shaped_options == [None] * shaped_compiles
    assert len(flat) == len(shaped)
    for a, b in zip(flat, shaped):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("widths,want", [
    ([512, 256, 128], 256), ([256, 128], None), ([128], None), ([], None), (None, None)])
def test_rows_take_256_bit_vectors_only_where_wider_ones_exist(monkeypatch, widths, want):
    """`_narrow_width` from Inductor's list of vector instruction sets (faked here:
    AVX-512 and AVX2, AVX2 alone, NEON, none, a probe that fails), and never
    where the user chose the width."""
    from torch._inductor import config as inductor_config
    from torch._inductor import cpu_vec_isa

    from keras_adam.backends import torch as torch_backend

    # The seam itself: Inductor's list, and its sets' widths (fails if torch moves them).
    assert all(isa.bit_width() > 0 for isa in cpu_vec_isa.valid_vec_isa_list())

    class FakeISA:
        def __init__(self, width):
            self.width = width

        def bit_width(self):
            return self.width

    def listed():
        if widths is None:
            raise OSError("the probe failed")
        return [FakeISA(w) for w in widths]

    monkeypatch.setattr(cpu_vec_isa, "valid_vec_isa_list", listed)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    torch_backend._narrow_width.cache_clear()
    try:
        assert torch_backend._narrow_width() == want
        want_options = None if want is None else {"cpp.simdlen": 256}
        assert torch_backend._vector_options(True) == want_options
        assert torch_backend._vector_options(False) is None
        torch_backend._narrow_width.cache_clear()
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
        assert torch_backend._narrow_width() is None
        torch_backend._narrow_width.cache_clear()
        monkeypatch.delenv("ATEN_CPU_CAPABILITY")
        with inductor_config.patch({"cpp.simdlen": 512}):
            assert torch_backend._narrow_width() is None
    finally:
        torch_backend._narrow_width.cache_clear()


@pytest.mark.parametrize("device,narrowed", [("cpu", True), ("meta", False)])
def test_only_a_function_first_called_on_a_cpu_takes_the_rows_width(monkeypatch, device,
                                                                    narrowed):
    """`compiled(fn, rows=True)` passes the rows' options to torch.compile where its
    first call's tensors are on a CPU (the options concern Inductor's CPU code),
    and none elsewhere ("meta" stands for another device); without `rows`, none."""
    from keras_adam.backends import torch as torch_backend

    seen = []

    def recording_compile(fn, **kwargs):
        seen.append(kwargs.get("options"))
        return fn

    monkeypatch.setattr(torch, "compile", recording_compile)
    monkeypatch.setattr(torch_backend, "_narrow_width", lambda: 256)
    x = torch.ones(4, device=device)
    for rows in (True, False):
        step = torch_backend.compiled(lambda t: t * 2, any_length=True, rows=rows)
        step(x)
        step(x)  # made once
    assert seen == [{"cpp.simdlen": 256} if narrowed else None, None]


@pytest.mark.parametrize("scalars", ["numbers", "keras-ops"])
def test_a_schedule_after_a_constant_learning_rate_takes_the_same_graph(monkeypatch, scalars):
    """The compiled whole-variable step that optimizers share (keras_adam/_whole.py)
    is given the learning rate as a plain tensor: Keras gives a constant one
    as its variable's Parameter and a schedule's as a tensor, and a compiled
    function guards on the types of the tensors it is given. An optimizer with
    a schedule after one with a constant rate must take the first one's
    graph, and end bit for bit where it would with the cache emptied (the
    oracle). Given the Parameter as it is, the same two compile two graphs."""
    from torch._dynamo.utils import counters

    from keras_adam import _whole
    from keras_adam import backends
    from keras_adam.backends import torch_rows

    # The compiled function's graphs, not the rows' C loop that CPU tensors take.
    monkeypatch.setattr(torch_rows, "enabled", False)
    # The step's scalars made as plain tensors from numbers on a CPU
    # (`backends.torch.step_scalars`), or through Keras's ops, as off the CPU,
    # where the learning rate is the variable's Parameter.
    if scalars == "keras-ops":
        monkeypatch.setattr(backends, "step_scalars", lambda *args: None)
    shapes = [(64, 32), (300,)]

    def train(learning_rate):
        rng = np.random.default_rng(4)
        variables = [keras.Variable(rng.normal(size=s), dtype="float32") for s in shapes]
        optimizer = keras_adam.Adam(learning_rate=learning_rate, moment_dtype="bfloat16")
        for _ in range(3):
            optimizer.apply([keras.ops.convert_to_tensor(rng.normal(size=s), "float32")
                             for s in shapes], variables)
        return [keras.ops.convert_to_numpy(x) for x in variables]

    def schedule():
        return keras.optimizers.schedules.ExponentialDecay(1e-2, 2, 0.5)

    def graphs_added_by_a_schedule():
        monkeypatch.setattr(_whole, "_SHARED", {})
        counters.clear()
        train(1e-3)
        first = counters["stats"]["unique_graphs"]
        assert first > 0
        trained = train(schedule())
        return counters["stats"]["unique_graphs"] - first, trained

    added, shared = graphs_added_by_a_schedule()
    assert added == 0
    monkeypatch.setattr(_whole, "_SHARED", {})
    for a, b in zip(shared, train(schedule())):
        np.testing.assert_array_equal(a, b)
    if scalars == "keras-ops":
        # The test can fail: with the Parameter given as it is, a second graph.
        monkeypatch.setattr(backends, "plain", tuple)
        added, _ = graphs_added_by_a_schedule()
        assert added == 1


# Small variables of one layout and step run as one compiled call on their
# tensors joined along rows (keras_adam._whole `Whole.together`); w2's group
# (lr x 0.5) runs apart, and sits between the others, whose batch it must not
# split. 8-bit codes: rows are blocks, rows of 8 {w0, w1, w3, w5}, of 16 {w4}
# and of 5 {w6}: 4 calls, also with bfloat16 weights (each row's random
# numbers for the weights from its own variable's stream). bfloat16 moments:
# rows of 16, or the largest power of two under 16 that divides the size and
# leaves two rows: {w0} (32 elements: rows of 16), {w1, w3, w4, w5} (24, 40,
# 16, 16: rows of 8), {w6} (15: rows of 1), {w2}: 4 calls. Alone (each
# counted large), w6 is rows of 5 (`_whole._row_length`: the largest odd
# divisor of an odd size): its elements' streams must not depend on the rows.
TOGETHER_SHAPES = [(4, 8), (3, 8), (8,), (5, 8), (16,), (2, 8), (3, 5)]


@pytest.mark.parametrize("moment_dtype,dtype,calls_per_step", [
    ("8bit", "float32", 4), ("8bit", "bfloat16", 4), ("bfloat16", "float32", 4)])
def test_small_variables_run_together_with_the_bits_of_one_call_each(
        monkeypatch, moment_dtype, dtype, calls_per_step):
    """Joining the small variables of one layout into one call must give every
    variable, slot and scale the bits of one call per variable (the oracle:
    the same optimizer with no variable counted small), in `apply` and in
    `stateless_apply` (a Keras scope: the results assigned one by one).
    The buffers kept for a set of variables are freed once a step runs
    without that set."""
    import gc
    import weakref

    from keras_adam import _whole
    from keras_adam import backends

    calls = []
    real_compile = backends.compile_whole

    def counting_compile(fn, **kwargs):
        compiled = real_compile(fn, **kwargs)

        def run(*args):
            calls.append(1)
            return compiled(*args)
        return run

    monkeypatch.setattr(backends, "compile_whole", counting_compile)
    # Functions compiled here (counting), not those of earlier optimizers.
    monkeypatch.setattr(_whole, "_SHARED", {})

    def run(below):
        monkeypatch.setattr(_whole, "TOGETHER_BELOW", below)
        keras.utils.set_random_seed(5)  # the seed of bfloat16 weights' rounding
        rng = np.random.default_rng(11)
        variables = [keras.Variable(rng.normal(size=s), dtype=dtype, name=f"w{i}")
                     for i, s in enumerate(TOGETHER_SHAPES)]
        eight_bit = {"min_8bit_size": 1} if moment_dtype == "8bit" else {}
        optimizer = keras_adam.Adam(
            learning_rate=1e-2, moment_dtype=moment_dtype, **eight_bit,
            groups={"w2": {"learning_rate_multiplier": 0.5}})
        steps = [[keras.ops.convert_to_tensor(rng.normal(size=s), dtype)
                  for s in TOGETHER_SHAPES] for _ in range(6)]
        for i, grads in enumerate(steps[:5]):
            # The fourth step updates some of the variables: another set joined
            # (the buffers kept for a set follow it: `Whole._joined`).
            picked = [0, 1, 4] if i == 3 else range(len(TOGETHER_SHAPES))
            calls.clear()
            optimizer.apply([grads[j] for j in picked], [variables[j] for j in picked])
            if below and i == 3:  # only the subset's sets hold buffers now
                kept = [weakref.ref(b) for buffers, _ in optimizer._whole._joins.values()
                        for b in buffers]
        if below:
            # The last step's sets replaced the subset's: their buffers are freed.
            gc.collect()
            assert kept and not any(r() is not None for r in kept)
        per_step = len(calls)
        state = [keras.ops.convert_to_tensor(v) for v in optimizer.variables]
        new_variables, new_state = optimizer.stateless_apply(
            state, steps[5], [keras.ops.convert_to_tensor(v) for v in variables])
        values = list(variables) + list(optimizer.variables) + new_variables + new_state
        return [keras.ops.convert_to_numpy(keras.ops.cast(x, "float32")) for x in values], \
            per_step

    together, together_calls = run(_whole.TOGETHER_BELOW)
    alone, alone_calls = run(0)
    assert (together_calls, alone_calls) == (calls_per_step, len(TOGETHER_SHAPES))
    assert len(together) == len(alone)
    for a, b in zip(together, alone):
        # The same element-wise function on the same elements (8-bit blocks are
        # rows, which concatenating keeps whole): the same bits.
        np.testing.assert_array_equal(a, b)


# 8-bit codes with bfloat16 weights (stochastic rounding) and bfloat16 moments
# (stochastic too): between them, every tensor the step writes.
@pytest.mark.parametrize("moment_dtype,dtype", [("8bit", "bfloat16"), ("bfloat16", "float32")])
@pytest.mark.parametrize("loop", [False, True], ids=["compiled", "c-loop"])
def test_the_step_written_in_place_has_the_bits_of_the_step_assigned(
        monkeypatch, moment_dtype, dtype, loop):
    """Outside Keras's scopes the compiled step writes theta and the moments into
    the variables' own memory (`backends.whole_in_place`). The oracle is the
    same step returning its results, which are then assigned: the bits
    must be equal (a read after a write within the step would differ).
    Written in place, a variable of its own call needs no copy at all (nor,
    by the C loop on a CPU, joined ones); and `stateless_apply` must leave
    the tensors it is given untouched."""
    from keras_adam import _whole
    from keras_adam import backends
    from keras_adam.backends import torch_rows

    monkeypatch.setattr(torch_rows, "enabled", loop)

    shapes = [(40, 300), (6, 8), (4, 8)]  # one of its own call, two joined
    copied = []
    real_copy = torch._foreach_copy_

    def counting_copy(targets, values):
        copied.extend(tuple(t.shape) for t in targets)
        return real_copy(targets, values)

    real_in_place = backends.whole_in_place

    def run(in_place):
        monkeypatch.setattr(backends, "whole_in_place", real_in_place if in_place else bool)
        monkeypatch.setattr(_whole, "TOGETHER_BELOW", 64)  # the small ones are joined
        monkeypatch.setattr(_whole, "_SHARED", {})
        keras.utils.set_random_seed(5)
        rng = np.random.default_rng(12)
        variables = [keras.Variable(rng.normal(size=s), dtype=dtype) for s in shapes]
        eight_bit = {"min_8bit_size": 1} if moment_dtype == "8bit" else {}
        optimizer = keras_adam.Adam(learning_rate=1e-2, moment_dtype=moment_dtype, **eight_bit)
        steps = [[keras.ops.convert_to_tensor(rng.normal(size=s), dtype) for s in shapes]
                 for _ in range(4)]
        # A graph that saved a variable's tensor: after a step, autograd must know
        # that the tensor changed (a copy tells it; a write in place must too).
        weight = variables[0].value
        saved = (weight * weight).sum()
        monkeypatch.setattr(torch, "_foreach_copy_", counting_copy)
        copied.clear()
        for grads in steps[:3]:
            optimizer.apply(grads, variables)
        monkeypatch.setattr(torch, "_foreach_copy_", real_copy)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            saved.backward()
        state = [keras.ops.copy(keras.ops.convert_to_tensor(v)) for v in optimizer.variables]
        given = [keras.ops.copy(x) for x in state]
        weights = [keras.ops.copy(keras.ops.convert_to_tensor(v)) for v in variables]
        new_variables, new_state = optimizer.stateless_apply(state, steps[3], weights)
        for before, after in zip(given, state):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(before),
                                          keras.ops.convert_to_numpy(after))
        values = list(variables) + list(optimizer.variables) + new_variables + new_state
        return [keras.ops.convert_to_numpy(keras.ops.cast(x, "float32")) for x in values], \
            list(copied)

    written, written_copies = run(True)
    assigned, assigned_copies = run(False)
    assert len(written) == len(assigned)
    for a, b in zip(written, assigned):
        np.testing.assert_array_equal(a, b)
    # Assigned, every variable is copied at every step; written in place, only
    # the joined small ones (their results are in the joined tensors), and by
    # the C loop none (it takes them where they lie).
    assert (40, 300) in assigned_copies
    if loop:
        assert not written_copies, written_copies
    else:
        assert written_copies and max(math.prod(s) for s in written_copies) <= 6 * 8


def test_the_compiled_8bit_step_equals_the_uncompiled_one_where_a_row_ends_in_a_short_block(
        monkeypatch):
    """Rows of 257 and 263 elements are one block of 256 and a short block of 1
    or 7 (no divisor of the row in (128, 256]). torch.compile once mis-indexed
    the last column of such rows (garbage weights, codes of -128); the
    compiled whole-variable step must follow the same function run eagerly."""
    steps, lr = 5, 1e-3

    from keras_adam import _whole

    def run(compile_with):
        monkeypatch.setattr(torch, "compile", compile_with)
        monkeypatch.setattr(_whole, "_SHARED", {})  # compiled by `compile_with`
        rng = np.random.default_rng(7)
        shapes = [(2, 257), (263,)]
        variables = [keras.Variable(rng.normal(size=s), dtype="float32") for s in shapes]
        optimizer = keras_adam.Adam(learning_rate=lr, moment_dtype="8bit", min_8bit_size=1)
        for _ in range(steps):
            grads = [keras.ops.convert_to_tensor(rng.normal(size=s), "float32") for s in shapes]
            optimizer.apply(grads, variables)
        return [keras.ops.convert_to_numpy(v) for v in variables]

    real_compile = torch.compile
    want = run(lambda fn, **kwargs: fn)
    got = run(real_compile)
    for a, b in zip(got, want):
        # A compiler may fuse a multiply-add, and a code may then flip at a
        # boundary: m off by one code (at most 3.1% of it) moves a step by at
        # most ~5% of lr. The bug gave garbage (1e12, or a code of -128).
        np.testing.assert_allclose(a, b, rtol=0, atol=steps * 0.05 * lr)


@pytest.mark.parametrize("kwargs,dtype", [r[1:] for r in C_LOOP_LAYOUTS],
                         ids=[r[0] for r in C_LOOP_LAYOUTS])
def test_the_rows_loop_has_the_bits_of_the_compiled_step(monkeypatch, kwargs, dtype):
    """On CPU tensors the element-wise layouts given in rows run as one C loop
    (`backends.torch_rows`). The oracle is the function it stands for,
    compiled by torch.compile (the loop switched off): every operation is one
    IEEE float32 rounding in both (neither fuses a multiply-add), and every
    random bit the same hash of the same keys and positions, so the
    variables, the moments and `stateless_apply`'s results must be equal bit
    for bit. The shapes give small variables in rows of 16 (three: taken
    where they lie in one call, one of them over several of the loop's
    units of 256), 8 and 1, one of its own call (rows of 256) and an odd
    one (rows of 3); a gradient of 1e30 overflows v to infinity (kept by
    the rounding). 8-bit codes are given one block per row: rows of 8
    (three variables), 30, 15 and 256; the odd one ends in a short block
    and keeps its shape (the compiled step)."""
    from keras_adam import _whole
    from keras_adam.backends import torch_rows

    shapes = [(4, 8), (6, 8), (40, 30), (3, 8), (15,), (300, 256), (3, 65537)]
    eight_bit = kwargs.get("moment_dtype") == "8bit"
    calls, many = [], []  # the layouts of the loop's calls, of one variable and several
    real_call, real_many = torch_rows._call, torch_rows._call_many

    def counting_call(*args):
        calls.append(args[1][0])
        return real_call(*args)

    def counting_many(table, keys, scalars, parts, before=None):
        done = real_many(table, keys, scalars, parts, before)
        many.append((table.layout, len(parts)) if done else None)
        return done

    monkeypatch.setattr(torch_rows, "_call", counting_call)
    monkeypatch.setattr(torch_rows, "_call_many", counting_many)

    def run(loop):
        monkeypatch.setattr(torch_rows, "enabled", loop)
        monkeypatch.setattr(_whole, "_SHARED", {})
        keras.utils.set_random_seed(5)  # the seed of bfloat16 weights' rounding
        rng = np.random.default_rng(13)
        variables = [keras.Variable(rng.normal(size=s), dtype=dtype) for s in shapes]
        optimizer = keras_adam.Adam(learning_rate=1e-2, **kwargs)
        steps = [[rng.normal(size=s) for s in shapes] for _ in range(5)]
        if not eight_bit:  # (codes of a block whose absmax is infinite are NaN's)
            steps[1][0][0, 0] = 1e30
        steps = [[keras.ops.convert_to_tensor(g, dtype) for g in grads] for grads in steps]
        for grads in steps[:4]:
            optimizer.apply(grads, variables)
        v = keras.ops.convert_to_numpy(keras.ops.cast(optimizer.slots(variables[0])[1],
                                                      "float32"))
        assert eight_bit or np.isinf(v[0, 0])
        assert np.isfinite(variables[0].numpy().astype("float32")).all()
        state = [keras.ops.convert_to_tensor(v) for v in optimizer.variables]
        new_variables, new_state = optimizer.stateless_apply(
            state, steps[4], [keras.ops.convert_to_tensor(v) for v in variables])
        values = list(variables) + list(optimizer.variables) + new_variables + new_state
        return [keras.ops.convert_to_numpy(keras.ops.cast(x, "float32")) for x in values]

    compiled = run(False)
    assert not calls and not many
    looped = run(True)
    # The loop ran for every call given in rows. At the first step `apply`
    # writes in place: three variables (given in rows of 16; 8-bit, in
    # blocks of 8) in one call where they lie, and at least two more alone
    # (the large one and the one of 15), each taking its keys by its
    # position. At the 3 steps after, 8-bit codes run so again (a call per
    # block length); element-wise, all 7 variables run as one call (each
    # one row of the loop, `Whole.again`). `stateless_apply` (not in place)
    # joins the small ones and gives each row its keys: at least 2 calls.
    joined = [n for _, n in many if n > 1]
    assert joined == ([3] * 4 if eight_bit else [3] + [7] * 3), many
    assert sum(n == 1 for _, n in many) >= 2 * (4 if eight_bit else 1), many
    assert len(calls) >= 2 and len(set(calls + [m for m, _ in many])) == 1, (calls, many)
    assert calls[0][0] == eight_bit
    for a, b in zip(looped, compiled):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("moment_dtype,dtype", [("bfloat16", "float32"), ("bfloat16", "bfloat16"),
                                                 ("8bit", "float32"), ("8bit", "bfloat16")])
def test_the_rows_loop_writes_nan_where_the_compiled_step_does(monkeypatch, moment_dtype, dtype):
    """A NaN gradient poisons its elements' moments and weights (and an 8-bit
    block's scale). The oracle is the compiled step (the loop switched off):
    every float the loop writes must be NaN exactly where the compiled
    step's is, with the same bits elsewhere. (A NaN's own sign and payload
    bits, and the codes of a block whose scale is NaN, may differ: integer
    codes are compared only where the compiled step's codes decode to a
    number, in blocks whose scale is finite.)"""
    from keras_adam import _whole
    from keras_adam.backends import torch_rows

    shapes = [(40, 300), (300, 256)]  # joined with none: each its own call
    eight_bit = {"min_8bit_size": 1} if moment_dtype == "8bit" else {}

    def run(loop):
        monkeypatch.setattr(torch_rows, "enabled", loop)
        monkeypatch.setattr(_whole, "_SHARED", {})
        keras.utils.set_random_seed(3)
        rng = np.random.default_rng(1)
        variables = [keras.Variable(rng.normal(size=s), dtype=dtype) for s in shapes]
        optimizer = keras_adam.Adam(learning_rate=1e-2, moment_dtype=moment_dtype, **eight_bit)
        for _ in range(3):
            grads = [rng.normal(size=s) for s in shapes]
            grads[0][0, :40] = np.nan
            grads[1][5, 3:70] = np.nan
            optimizer.apply([keras.ops.convert_to_tensor(g, dtype) for g in grads], variables)
        return [keras.ops.convert_to_numpy(keras.ops.convert_to_tensor(x))
                for x in list(variables) + list(optimizer.variables)]

    compiled, looped = run(False), run(True)
    assert np.isnan(compiled[0].astype("float32")).any()
    for i, (a, b) in enumerate(zip(compiled, looped)):
        assert a.shape == b.shape and a.dtype == b.dtype
        if a.dtype.kind == "f" or a.dtype == keras.ops.convert_to_numpy(
                keras.ops.ones((), "bfloat16")).dtype:
            a32, b32 = a.astype("float32"), b.astype("float32")
            np.testing.assert_array_equal(np.isnan(a32), np.isnan(b32))
            np.testing.assert_array_equal(a32[~np.isnan(a32)], b32[~np.isnan(b32)])
        elif a.dtype in (np.int8, np.uint8):  # 8-bit codes, followed by their blocks' scales
            scale = compiled[i + 1]
            finite = np.repeat(np.isfinite(scale), a.shape[1] // scale.shape[1], axis=1)
            assert finite.shape == a.shape and not finite.all()
            np.testing.assert_array_equal(a[finite], b[finite])
        else:  # the step count
            np.testing.assert_array_equal(a, b)


def _three_bfloat16_steps(monkeypatch):
    """A variable's value after three steps with bfloat16 moments, its compiled
    functions made afresh."""
    from keras_adam import _whole

    monkeypatch.setattr(_whole, "_SHARED", {})
    rng = np.random.default_rng(3)
    variables = [keras.Variable(rng.normal(size=(40, 30)), dtype="float32")]
    optimizer = keras_adam.Adam(learning_rate=1e-2, moment_dtype="bfloat16")
    for _ in range(3):
        optimizer.apply([keras.ops.convert_to_tensor(rng.normal(size=(40, 30)), "float32")],
                        variables)
    return variables[0].numpy()


@pytest.mark.parametrize("compiler", ["absent", "failing"])
def test_without_a_c_compiler_the_rows_take_the_compiled_step(monkeypatch, compiler):
    """Where no C compiler is found, or it fails (`CC=false`: every set of
    options refused), the rows' C loop is not made and the compiled step
    runs (the same bits as ever: the oracle is the loop switched off)."""
    import shutil

    from keras_adam.backends import torch_rows

    def run():
        return _three_bfloat16_steps(monkeypatch)

    monkeypatch.setattr(torch_rows, "enabled", False)
    want = run()
    monkeypatch.setattr(torch_rows, "enabled", True)
    monkeypatch.setattr(torch_rows, "_FUNCTIONS", {})
    if compiler == "absent":
        monkeypatch.setattr(shutil, "which", lambda name: None)
    else:
        assert shutil.which("false")
        monkeypatch.setenv("CC", "false")
    got = run()
    assert torch_rows._FUNCTIONS and set(torch_rows._FUNCTIONS.values()) == {None}
    np.testing.assert_array_equal(got, want)


def test_a_damaged_loop_in_the_cache_is_compiled_again_in_the_process(tmp_path, monkeypatch):
    """A library of the C loop found damaged in the cache directory (cut short, or
    overwritten) fails to load: it is removed, compiled afresh and loaded,
    and the step runs the loop in this very process. Oracle: the loop's
    bits against the compiled function's (`torch_rows.enabled` off)."""
    from keras_adam.backends import rows
    from keras_adam.backends import torch_rows

    monkeypatch.setenv("KERAS_ADAM_CACHE_DIR", str(tmp_path / "cache"))

    def run():
        monkeypatch.setattr(torch_rows, "_FUNCTIONS", {})
        return _three_bfloat16_steps(monkeypatch)

    monkeypatch.setattr(torch_rows, "enabled", False)
    want = run()
    monkeypatch.setattr(torch_rows, "enabled", True)
    # The step's layout, asked for without loading anything (a library loaded
    # in this process and then damaged on disk would be damaged in memory).
    layouts = []
    with monkeypatch.context() as patch:
        patch.setattr(torch_rows, "_function", lambda layout: layouts.append(layout))
        run()
    assert layouts
    library = rows.build(layouts[0], "torch")  # (compiled into the cache, not loaded)
    assert library is not None and os.path.dirname(library) == str(tmp_path / "cache")
    with open(library, "r+b") as f:
        f.truncate(100)  # (cut short)
    got = run()
    assert torch_rows._FUNCTIONS and None not in torch_rows._FUNCTIONS.values()
    assert os.path.getsize(library) > 100  # (compiled again in its place)
    np.testing.assert_array_equal(got, want)


# The rule's options that change the step's scalars: nesterov's momentum
# factor, epsilon' (placement "paper") and, with amsgrad, a third moment.
_OTHER_RULE = {"nesterov": True, "epsilon_placement": "paper", "amsgrad": True}


@pytest.mark.parametrize("moment_dtype,dtype,options", [
    ("bfloat16", "float32", {}), ("8bit", "float32", {}), ("bfloat16", "bfloat16", {}),
    ("8bit", "bfloat16", {}), ("bfloat16", "float32", _OTHER_RULE),
    ("8bit", "float32", _OTHER_RULE)], ids=[
        "bfloat16-float32", "8bit-float32", "bfloat16-bfloat16", "8bit-bfloat16",
        "bfloat16-float32-nesterov-paper-amsgrad", "8bit-float32-nesterov-paper-amsgrad"])
def test_steps_run_again_by_the_c_loop_have_the_bits_of_keras_update_loop(
        monkeypatch, moment_dtype, dtype, options):
    """From the second step, the whole steps that the last one ran by the C loop's
    `many` run again without each variable's routing (`Whole.again`). The
    oracle: the same optimizer as a subclass that defines `update_step`,
    which Keras's own loop calls for each variable (no step runs again).
    Groups of another lr and decay, a group of the optimizer's values until
    they are assigned, a decay exclusion, a schedule, a variable too large
    to be joined, a step that updates a subset, a gradient that is not
    contiguous (its batch takes `apply`), a gradient of another dtype (a
    joined call refused: its batches run alone), and tensors moved to new
    memory (the addresses kept between steps are stale) on the way. The
    steps run again take the step's scalars as numbers
    (`Step.scalar_numbers`), the others as tensors."""
    from keras_adam import _whole

    ran_again, given_scalars = [], []
    real_again, real_batch = _whole.Whole.again, _whole.Whole._again

    def counting_again(self, storage, calls, *rest):
        left = real_again(self, storage, calls, *rest)
        ran_again.append(len(calls) - len(left))
        return left

    def recording_batch(self, storage, found, indices, given, kept, facts, *rest):
        given_scalars.append(type(facts[1][1]))
        return real_batch(self, storage, found, indices, given, kept, facts, *rest)

    monkeypatch.setattr(_whole.Whole, "again", counting_again)
    monkeypatch.setattr(_whole.Whole, "_again", recording_batch)

    class PerVariable(keras_adam.AdamW):
        def update_step(self, gradient, variable, learning_rate):
            return super().update_step(gradient, variable, learning_rate)

    # w0 and w5 are joined in one call while w0's group has the optimizer's values.
    shapes = [(30, 20), (20,), (40, 10), (10,), (300, 256), (30, 20)]

    def run(cls):
        keras.utils.set_random_seed(5)  # the seed of bfloat16 weights' rounding
        rng = np.random.default_rng(12)
        variables = [keras.Variable(rng.normal(size=s), dtype=dtype, name=f"w{i}")
                     for i, s in enumerate(shapes)]
        eight_bit = {"min_8bit_size": 1} if moment_dtype == "8bit" else {}
        schedule = keras.optimizers.schedules.ExponentialDecay(1e-2, 1, 0.9)
        optimizer = cls(learning_rate=schedule, weight_decay=0.05, moment_dtype=moment_dtype,
                        **eight_bit, **options, groups={"w2": {"learning_rate_multiplier": 0.5},
                                             "w3": {"weight_decay": 0.2},
                                             # the optimizer's own values, until assigned
                                             "w0": {"beta_1": 0.9, "weight_decay": 0.05}})
        optimizer.exclude_from_weight_decay(var_names=["w1"])
        for i in range(11):
            if i == 2:  # w0's group keeps its values, the others take these
                optimizer.beta_1, optimizer.weight_decay = 0.95, 0.1
            picked = [0, 2, 3, 5] if i == 3 else range(len(shapes))
            grads = [keras.ops.convert_to_tensor(rng.normal(size=shapes[j]), dtype)
                     for j in picked]
            if i == 4:  # not contiguous: the C loop refuses it, `apply` takes its batch
                grads[0] = grads[0].t().contiguous().t()
                assert not grads[0].is_contiguous()
            if i in (7, 8, 9):
                # w5's gradient in the other dtype, which the loop takes, but not
                # in a call whose first gradient is of the variables' dtype: w5's
                # call joined with w1's and w4's (element-wise) is refused; from
                # the next step on, each runs alone.
                grads[5] = keras.ops.cast(grads[5], "float32" if dtype == "bfloat16"
                                          else "bfloat16")
            if i == 10:
                # Tensors moved to new memory under the same Parameters (as
                # torch's `module.to` may), after two steps of every variable:
                # the batches' tables kept since the last step must be made again.
                moved = optimizer.state_variables(variables[5]).values()
                for x in [variables[0], variables[5], *moved]:
                    x.value.data = x.value.data.clone()
            optimizer.apply(grads, [variables[j] for j in picked])
        values = list(variables) + list(optimizer.variables)
        return [keras.ops.convert_to_numpy(keras.ops.cast(x, "float32")) for x in values]

    again = run(keras_adam.AdamW)
    # (the C loop runs on every layout here; after the joined call refused at
    # step 7, each of its batches alone; the last step, tensors moved, too)
    assert ran_again[8:] == [len(shapes)] * 3, ran_again
    assert given_scalars and set(given_scalars) == {tuple}, given_scalars
    ran_again.clear()
    one_by_one = run(PerVariable)
    assert not any(ran_again)
    assert len(again) == len(one_by_one)
    for a, b in zip(again, one_by_one):
        # The same C loop on the same tensors with the same scalars and the
        # same decay before it: the same bits.
        np.testing.assert_array_equal(a, b)
