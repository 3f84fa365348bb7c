"""The state seam: every path reads and writes m, v, v_max through `keras_adam._state.Storage`.

A storage format is one subclass. The test format below stores the moments
negated (exact in floating point, and wrong if read or written raw). Every
update path must then give bit for bit the results of the standard format,
while the stored slots hold the negated numbers. A path that bypassed the
seam would read -v as v and fail.
"""

import keras
import numpy as np
import pytest
from grid import UNIT_ROUNDOFF, gradient_sequence, initial_values, run_optimizer

import keras_adam
from keras_adam import _state

STEPS = 5


class Negated(_state.Storage):
    """Test-only format: stores -m, -v, -v_max."""

    def in_place_reason(self, variable):
        return "the test format stores negated moments"

    def _decode_values(self, slot, values, dtype):
        return -super()._decode_values(slot, values, dtype)

    def _encode_values(self, slot, value):
        return super()._encode_values(slot, -value)


def _negated_format(patch):
    patch.setattr(_state, "for_options",
                  lambda options, assign, *_: Negated(options["amsgrad"], assign))


def _stored(optimizer, variables):
    return [[keras.ops.convert_to_numpy(s) for s in optimizer.slots(v) if s is not None]
            for v in variables]


@pytest.mark.parametrize("kwargs", [{}, dict(amsgrad=True, nesterov=True)],
                         ids=["defaults", "amsgrad-nesterov"])
def test_a_storage_format_is_one_class(kwargs, monkeypatch):
    sequence, x0 = gradient_sequence(STEPS), initial_values()
    standard = keras_adam.Adam(fused=False, **kwargs)
    expected = run_optimizer(standard, x0, sequence)
    with monkeypatch.context() as patch:
        _negated_format(patch)
        negated = keras_adam.Adam(**kwargs)
        got = run_optimizer(negated, x0, sequence)
    # The plan sees the format: no fused kernel may update its slots in place.
    assert all(r.method == "portable" for r in negated.update_plan().values())
    g_max = np.abs(np.concatenate([g.ravel() for s in sequence for g in s])).max()
    _assert_same_to_rounding(got, expected, _stored(negated, got), _stored(standard, expected),
                             g_max)


def _assert_same_to_rounding(got, expected, slots_got, slots_expected, g_max):
    # The negated format's dense steps run as one compiled function
    # (`keras_adam._whole`: XLA on TensorFlow, torch.compile, jax.jit), the
    # standard format's op by op. A compiler may contract a multiply and an
    # add into one FMA: about one rounding (u) per step, relative to the
    # largest gradient for m (which mixes signs), and to |theta| for theta.
    # A path that bypassed the seam would read -v as v: NaN, far outside.
    tol = 2 * STEPS * UNIT_ROUNDOFF
    for a, b in zip(got, expected):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b),
                                   rtol=tol, atol=0)
    for slots_a, slots_b in zip(slots_got, slots_expected):
        for a, b in zip(slots_a, slots_b):
            np.testing.assert_allclose(a, -b, rtol=tol, atol=tol * g_max * g_max)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="row-sparse gradients exist only on TensorFlow")
def test_lazy_rows_go_through_the_seam(monkeypatch):
    import tensorflow as tf

    def train(optimizer):
        table = keras.Variable(np.ones((10, 3), "float32"))
        optimizer.build([table])
        rng = np.random.default_rng(0)
        for _ in range(3):
            # A dense step first, so that every row's moments are non-zero.
            optimizer.apply([tf.constant(rng.normal(size=(10, 3)), tf.float32)], [table])
            grad = tf.IndexedSlices(tf.constant(rng.normal(size=(4, 3)), tf.float32),
                                    tf.constant([1, 4, 4, 7]), tf.constant([10, 3]))
            optimizer.apply([grad], [table])
        return table.numpy(), [s.numpy() for s in optimizer.slots(table)]

    kwargs = dict(sparse_updates="lazy", amsgrad=True, weight_decay=0.1)
    theta_s, slots_s = train(keras_adam.Adam(fused=False, **kwargs))
    with monkeypatch.context() as patch:
        _negated_format(patch)
        theta_n, slots_n = train(keras_adam.Adam(**kwargs))
    assert len(slots_n) == 3
    # Gradients are standard normal: |g| < 5 for these 42 draws.
    _assert_same_to_rounding([theta_n], [theta_s], [slots_n], [slots_s], g_max=5.0)


def _trained(shapes, dtype, kwargs, steps, rng):
    """(variables of `shapes`, an Adam(learning_rate=1e-2, **kwargs)) after `steps`
    steps on gradients drawn from `rng`."""
    variables = [keras.Variable(rng.normal(size=s), dtype=dtype) for s in shapes]
    optimizer = keras_adam.Adam(learning_rate=1e-2, **kwargs)
    for _ in range(steps):
        optimizer.apply([keras.ops.convert_to_tensor(rng.normal(size=s), dtype)
                         for s in shapes], variables)
    return variables, optimizer


@pytest.mark.parametrize("kwargs,dtype", [
    (dict(moment_dtype="8bit", min_8bit_size=1), "float32"),
    (dict(moment_dtype="bfloat16"), "float32"),
    (dict(weight_rounding="stochastic"), "bfloat16")],
    ids=["8bit", "bfloat16-moments", "pure-bfloat16"])
def test_a_later_optimizer_reuses_the_compiled_steps_and_frees_the_first(monkeypatch, kwargs,
                                                                           dtype):
    """Where the backend shares them (torch, TensorFlow), the whole-variable steps
    (keras_adam/_whole.py) are compiled once per process: a second optimizer of
    the same layouts compiles none and ends bit for bit where an optimizer
    compiling its own ends (the oracle: the cache emptied). On every backend
    the compiled functions keep no optimizer's variables alive."""
    import gc
    import weakref

    from keras_adam import _whole
    from keras_adam import backends

    made = []
    real_compile = backends.compile_whole

    def counting_compile(fn, **kwargs):
        made.append(1)
        return real_compile(fn, **kwargs)

    monkeypatch.setattr(backends, "compile_whole", counting_compile)
    monkeypatch.setattr(_whole, "_SHARED", {})
    shapes = [(64, 32), (32,), (300, 40)]

    def train():
        keras.utils.set_random_seed(3)
        variables, optimizer = _trained(shapes, dtype, kwargs, 3, np.random.default_rng(4))
        values = [keras.ops.convert_to_numpy(keras.ops.cast(x, "float32"))
                  for x in list(variables) + list(optimizer.variables)]
        return values, optimizer

    first, optimizer = train()
    first_made = len(made)
    assert first_made > 0
    slot = weakref.ref(optimizer.variables[-1])
    del optimizer
    gc.collect()
    assert slot() is None  # nothing shared holds the first optimizer's state
    second, _ = train()
    shared = backends.whole_shared()
    assert len(made) == (1 if shared else 2) * first_made  # none for the second
    monkeypatch.setattr(_whole, "_SHARED", {})
    fresh, _ = train()
    assert len(made) == (2 if shared else 3) * first_made
    for a, b, c in zip(first, second, fresh):
        np.testing.assert_array_equal(b, c)
        np.testing.assert_array_equal(a, c)


def test_rows_of_a_large_odd_variable_keep_their_keys_small():
    """A variable whose writes draw random numbers is given in rows, each with its
    four stream keys and first position (24 bytes a row): a large odd-sized
    one takes its largest odd divisor under 256, not rows of one element."""
    from keras_adam import _whole

    assert _whole._row_length(4 * 2000 * 2000) == 256
    assert _whole._row_length(255 * 1001) == 255  # 255255 = 255 x 1001
    assert _whole._row_length(3 * 65537) == 3  # 65537 is prime
    assert _whole._row_length(65537) == 1  # prime: no divisor
    assert _whole._row_length(15) == 1  # small ones are joined in rows of one


@pytest.mark.parametrize("kwargs,dtype", [
    (dict(moment_dtype="8bit", min_8bit_size=1), "float32"),
    (dict(weight_rounding="stochastic"), "bfloat16")], ids=["8bit", "pure-bfloat16"])
@pytest.mark.parametrize("joined", [False, True], ids=["alone", "joined"])
def test_the_compiled_step_is_given_tensors_not_variables(monkeypatch, kwargs, dtype, joined):
    """The whole-variable step (keras_adam/_whole.py) is given tensors: never a
    variable, which a compiled function would read inside itself (on
    TensorFlow a resource passed into the XLA cluster), and on torch never a
    tensor that requires grad or is a view (the compiled function guards on
    both, and compiles again where a later call differs), nor the step's
    scalars as variables. Rows of 257 and
    263 end in a short 8-bit block: on torch they keep their own shapes."""
    from keras_adam import _whole
    from keras_adam import backends

    given, scalars = [], []

    def spying(make_function):
        def make(*args, **options):
            compiled = make_function(*args, **options)

            def run(gradient, theta, values, fields, state):
                given.extend([gradient, theta] + [x for slot in values for x in slot])
                scalars.extend(x for x in fields if x is not None)
                return compiled(gradient, theta, values, fields, state)
            return run
        return make

    # Every function `Whole.apply` takes: compiled for the optimizer, or shared
    # (torch, TensorFlow: those of earlier tests serve, wrapped by the spy as
    # they are taken; those compiled here leave with the test's copy of the
    # cache).
    if backends.whole_shared():
        monkeypatch.setattr(_whole, "_SHARED", dict(_whole._SHARED))
        monkeypatch.setattr(_whole, "_shared", spying(_whole._shared))
    else:
        monkeypatch.setattr(backends, "compile_whole", spying(backends.compile_whole))
    joins = []
    real_join = backends.join

    def counting_join(tensors, shape):
        joins.append(len(tensors))
        return real_join(tensors, shape)

    monkeypatch.setattr(backends, "join", counting_join)
    if not joined:
        monkeypatch.setattr(_whole, "TOGETHER_BELOW", 0)
    # (16, 8), (4, 8) and (8, 16) share a row length (8-bit: blocks of 8, or of
    # 16; bfloat16 rows of 16), and are joined where the backend joins.
    shapes = [(2, 257), (263,), (16, 8), (4, 8), (8, 16), (12,)]
    _trained(shapes, dtype, kwargs, 2, np.random.default_rng(9))
    assert given
    assert bool(joins) == (joined and backends.whole_any_length()), joins
    # The step's scalars too: a variable given to a function that optimizers
    # share would be kept by its traces (TensorFlow).
    for x in given + scalars:
        assert not isinstance(x, keras.Variable) and not hasattr(x, "assign"), type(x)
    if keras.backend.backend() == "torch":
        import torch

        for x in given + scalars:
            # Not a Parameter (the learning rate's, for one): a later optimizer
            # with a schedule (a plain tensor) would compile the shared step again.
            assert type(x) is torch.Tensor, type(x)
        for x in given:
            assert not x.requires_grad
            if not joined:  # a joined tensor is a view of the one it was flattened into
                assert x._base is None

