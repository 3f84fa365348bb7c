"""`skip_nonfinite=True`: a NaN or Inf gradient changes nothing but the counter.

The oracle is the same optimizer run on the same sequence with the bad steps
removed: every variable (theta, m, v, v_max, the step counter t, EMA and
accumulators) must then agree bit for bit, since the finite steps run the
same operations on the same numbers.
"""

import keras
import numpy as np
import pytest
from grid import gradient_sequence, initial_values, run_optimizer

import keras_adam

BACKEND = keras.backend.backend()
STEPS = 12
BAD = {3: np.nan, 7: np.inf, 8: -np.inf}  # step -> value put into one gradient entry


def _sequences():
    clean = gradient_sequence(STEPS, seed=11)
    poisoned = []
    for k, grads in enumerate(clean):
        grads = [g.copy() for g in grads]
        if k in BAD:
            grads[k % 2].flat[k] = BAD[k]  # one entry of one variable
        poisoned.append(grads)
    return poisoned, [g for k, g in enumerate(clean) if k not in BAD]


def _values(optimizer, variables):
    return ([keras.ops.convert_to_numpy(v) for v in variables]
            + [keras.ops.convert_to_numpy(v) for v in optimizer.variables
               if v is not optimizer.skipped_steps])


CASES = [
    ("defaults", {}),
    ("amsgrad-portable", dict(amsgrad=True, fused=False)),
    ("weight-decay-clipnorm", dict(weight_decay=0.1, clipnorm=1.0)),
    ("ema", dict(use_ema=True, ema_momentum=0.9)),
    ("accumulation", dict(gradient_accumulation_steps=2)),
]


@pytest.mark.parametrize("kwargs", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_steps_are_skipped_exactly(kwargs):
    poisoned, clean = _sequences()
    x0 = initial_values()
    skipping = keras_adam.Adam(skip_nonfinite=True, **kwargs)
    got = run_optimizer(skipping, x0, poisoned)
    reference = keras_adam.Adam(**kwargs)
    want = run_optimizer(reference, x0, clean)
    assert int(keras.ops.convert_to_numpy(skipping.skipped_steps)) == len(BAD)
    # Every optimizer variable, the step counter included, as without the bad steps.
    assert len(skipping.variables) == len(reference.variables) + 1
    for a, b in zip(_values(skipping, got), _values(reference, want)):
        np.testing.assert_array_equal(a, b)


def test_without_the_switch_a_nan_poisons_the_state():
    # Guards the test above: the poisoned sequence really does harm.
    poisoned, _ = _sequences()
    optimizer = keras_adam.Adam()
    run_optimizer(optimizer, initial_values(), poisoned)
    m, v, _ = optimizer.slots(optimizer._trainable_variables[1])
    assert not np.isfinite(keras.ops.convert_to_numpy(v)).all()


def test_eager_steps_are_skipped_too():
    poisoned, clean = _sequences()
    x0 = initial_values()
    skipping = keras_adam.Adam(skip_nonfinite=True)
    got = run_optimizer(skipping, x0, poisoned, compiled=False)
    want = run_optimizer(keras_adam.Adam(), x0, clean, compiled=False)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    assert int(keras.ops.convert_to_numpy(skipping.skipped_steps)) == len(BAD)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.function(jit_compile=True): TensorFlow")
def test_under_xla():
    import tensorflow as tf

    poisoned, clean = _sequences()
    results = []
    for sequence, kwargs in [(poisoned, dict(skip_nonfinite=True)), (clean, {})]:
        optimizer = keras_adam.Adam(**kwargs)
        variables = [keras.Variable(x) for x in initial_values()]
        optimizer.build(variables)
        step = tf.function(lambda g: optimizer.apply(g, variables), jit_compile=True)
        for grads in sequence:
            step([tf.constant(g) for g in grads])
        results.append([v.numpy() for v in variables])
    # XLA compiles the finite branch as its own computation; it keeps the
    # same elementwise arithmetic (measured: identical), so bit for bit.
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_inside_a_loss_scale_optimizer():
    # The wrapper checks the (scaled) gradients first and skips the inner
    # apply; the inner counter then stays 0 and the state is untouched.
    # run_optimizer steps as each trainer does (jax: stateless_apply; an eager
    # stateful LossScaleOptimizer.apply fails on JAX upstream, for the
    # built-in Adam too).
    poisoned, _ = _sequences()
    inner = keras_adam.Adam(skip_nonfinite=True)
    outer = keras.optimizers.LossScaleOptimizer(inner)
    variables = run_optimizer(outer, initial_values(), poisoned[:5])
    assert int(keras.ops.convert_to_numpy(inner.skipped_steps)) == 0
    assert int(keras.ops.convert_to_numpy(inner.iterations)) == 4
    for variable in variables:
        for slot in inner.slots(variable):
            if slot is not None:
                assert np.isfinite(keras.ops.convert_to_numpy(slot)).all()


def test_the_counter_is_saved(tmp_path):
    poisoned, _ = _sequences()
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras_adam.Adam(skip_nonfinite=True), loss="mse")
    model.optimizer.build(model.trainable_variables)
    for k in range(4):
        grads = [np.full(v.shape, np.nan if k == 1 else 0.5, "float32")
                 for v in model.trainable_variables]
        model.optimizer.apply(grads, model.trainable_variables)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.optimizer.skip_nonfinite is True
    assert int(keras.ops.convert_to_numpy(loaded.optimizer.skipped_steps)) == 1
    assert int(keras.ops.convert_to_numpy(loaded.optimizer.iterations)) == 3


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute is TensorFlow's")
def test_under_mirrored_strategy():
    from pathlib import Path

    from helpers import run_python

    result = run_python(Path(__file__).with_name("nonfinite_mirrored_run.py"),
                        backend="tensorflow")
    assert result.stdout.strip().endswith("ok 2")


def test_model_fit_skips_a_bad_batch():
    # The trainers' own paths (TensorFlow's train_step in tf.function, JAX's
    # jitted stateless_apply, torch's eager step): a batch whose input holds a
    # NaN gives NaN gradients; with the switch, fitting with it equals fitting
    # without it.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5]])).astype("float32")
    bad = x.copy()
    bad[16] = np.nan  # in the second batch of 16

    def fit(inputs, targets, **kwargs):
        keras.utils.set_random_seed(3)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(1)])
        model.compile(optimizer=keras_adam.Adam(learning_rate=1e-2, **kwargs), loss="mse")
        model.fit(inputs, targets, batch_size=16, epochs=1, shuffle=False, verbose=0)
        return model

    skipping = fit(bad, y, skip_nonfinite=True)
    keep = np.r_[0:16, 32:64]
    reference = fit(x[keep], y[keep])
    assert int(keras.ops.convert_to_numpy(skipping.optimizer.skipped_steps)) == 1
    for a, b in zip(skipping.get_weights(), reference.get_weights()):
        np.testing.assert_array_equal(a, b)
