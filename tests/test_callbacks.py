"""AdamMonitor: its statistics against closed forms and the float64 reference."""

import csv

import keras
import numpy as np
import pytest

import keras_adam
from keras_adam import reference
from keras_adam.callbacks import AdamMonitor


def _model(optimizer):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="hidden"),
                              keras.layers.Dense(1, name="out")])
    model.compile(optimizer=optimizer, loss="mse")
    return model


def _monitor(model):
    monitor = AdamMonitor()
    monitor.set_model(model)
    return monitor


def _apply(model, grads_per_step):
    for grads in grads_per_step:
        model.optimizer.apply([keras.ops.convert_to_tensor(g) for g in grads],
                              model.trainable_variables)


def _grads(model, steps, seed=0):
    rng = np.random.default_rng(seed)
    return [[rng.normal(size=v.shape).astype("float32") for v in model.trainable_variables]
            for _ in range(steps)]


def test_first_step_closed_form():
    # After step 1 (epsilon = 0): m_hat = g and v_hat = g^2, so every step is
    # exactly lr (1 in units of lr) and every snr is 1; the bound is 3.16.
    # 1e-5: on TensorFlow the fused kernel's v is up to 1.3e-5 relative off
    # (it forms 1 - beta_2 in float32; README), so sqrt(v) by 6.5e-6.
    model = _model(keras_adam.Adam(epsilon=0.0))
    _apply(model, _grads(model, 1))
    stats = _monitor(model).statistics()
    for layer in ("hidden", "out"):
        assert stats[f"adam/{layer}/step_median"] == pytest.approx(1.0, rel=1e-5)
        assert stats[f"adam/{layer}/step_max"] == pytest.approx(1.0, rel=1e-5)
        assert stats[f"adam/{layer}/snr_median"] == pytest.approx(1.0, rel=1e-5)
        assert stats[f"adam/{layer}/at_bound"] == 0.0


def test_uncorrected_first_step_sits_at_the_bound():
    # Without bias correction step 1 is (1 - b1) / sqrt(1 - b2) = 3.16 lr for
    # every parameter: exactly the section 2.1 bound, so at_bound is 1.
    model = _model(keras_adam.Adam(epsilon=0.0, bias_correction=False))
    _apply(model, _grads(model, 1))
    stats = _monitor(model).statistics()
    assert stats["adam/hidden/step_median"] == pytest.approx(0.1 / np.sqrt(0.001), rel=1e-5)
    assert stats["adam/hidden/at_bound"] == 1.0


@pytest.mark.parametrize("kwargs", [{}, dict(amsgrad=True, epsilon_placement="paper")],
                         ids=["defaults", "amsgrad-paper"])
def test_statistics_match_the_reference(kwargs):
    model = _model(keras_adam.Adam(**kwargs))
    sequence = _grads(model, 30, seed=1)
    _apply(model, sequence)
    stats = _monitor(model).statistics()

    eps = 1e-7
    for layer, indices in (("hidden", [0, 1]), ("out", [2, 3])):
        m_hat, v_hat, steps = [], [], []
        for i in indices:
            _, state = reference.run(np.zeros(sequence[0][i].shape), [s[i] for s in sequence],
                                     **kwargs)
            c1, c2 = 1 - 0.9**30, 1 - 0.999**30
            v = state.v_max if kwargs.get("amsgrad") else state.v
            mh = np.abs(state.m).ravel() / c1
            denom = ((np.sqrt(v) + eps) / np.sqrt(c2) if "epsilon_placement" not in kwargs
                     else np.sqrt(v / c2) + eps).ravel()
            m_hat.append(mh), v_hat.append(v.ravel() / c2), steps.append(mh / denom)
        step = np.concatenate(steps)
        snr = np.concatenate(m_hat) / np.sqrt(np.concatenate(v_hat))
        # The slots are float32 EMAs over 30 steps: ~2u per step relative
        # (u = grid.UNIT_ROUNDOFF), 30 * 2u = 4e-6 for v, and m, which mixes
        # signs, relative to |g| ~ 1, where its median is ~0.3: 1e-4 covers both.
        assert stats[f"adam/{layer}/step_median"] == pytest.approx(np.median(step), rel=1e-4)
        assert stats[f"adam/{layer}/step_max"] == pytest.approx(np.max(step), rel=1e-4)
        assert stats[f"adam/{layer}/snr_median"] == pytest.approx(np.median(snr), rel=1e-4)


def test_fit_writes_history_and_csv(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 3)).astype("float32"), rng.normal(size=(64, 1)).astype("float32")
    model = _model(keras_adam.Adam())
    path = tmp_path / "log.csv"
    history = model.fit(x, y, epochs=2, batch_size=16, verbose=0,
                        callbacks=[AdamMonitor(), keras.callbacks.CSVLogger(str(path))])
    keys = [f"adam/{layer}/{stat}" for layer in ("hidden", "out")
            for stat in ("step_median", "step_max", "snr_median", "at_bound")]
    for key in keys:
        assert len(history.history[key]) == 2
        assert np.isfinite(history.history[key]).all()
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and set(keys) <= set(rows[0])


def test_every_n_batches_adds_to_batch_logs():
    seen = []

    class Recorder(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append("adam/out/step_median" in logs)

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 3)).astype("float32"), rng.normal(size=(64, 1)).astype("float32")
    _model(keras_adam.Adam()).fit(x, y, epochs=1, batch_size=16, verbose=0,
                                  callbacks=[AdamMonitor(every_n_batches=2), Recorder()])
    assert seen == [False, True, False, True]


def test_works_inside_a_loss_scale_optimizer():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 3)).astype("float32"), rng.normal(size=(32, 1)).astype("float32")
    model = _model(keras.optimizers.LossScaleOptimizer(keras_adam.Adam()))
    history = model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[AdamMonitor()])
    assert np.isfinite(history.history["adam/hidden/step_median"][0])


def test_refuses_a_foreign_optimizer():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 3)).astype("float32"), rng.normal(size=(8, 1)).astype("float32")
    model = _model(keras.optimizers.Adam())
    with pytest.raises(TypeError, match="AdamMonitor reads the slots of a keras_adam optimizer"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[AdamMonitor()])


@pytest.mark.parametrize("bad", [0, -1, 2.5, "3"])
def test_bad_every_n_batches(bad):
    with pytest.raises(ValueError, match="`every_n_batches`"):
        AdamMonitor(every_n_batches=bad)


def test_works_inside_a_multi_optimizer_per_sub_optimizer():
    # Issue #14: each keras_adam sub-optimizer reports its own layers under
    # its name; a non-keras_adam sub-optimizer (SGD, for "out") is left out.
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 3)).astype("float32"), rng.normal(size=(32, 1)).astype("float32")
    hidden_adam = keras_adam.Adam(learning_rate=1e-2, name="hidden_adam")
    multi = keras.optimizers.MultiOptimizer(keras.optimizers.OptimizerMap(
        default_optimizer=keras.optimizers.SGD(), optimizer_map={".*hidden.*": hidden_adam}))
    model = _model(multi)
    history = model.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0,
                        callbacks=[AdamMonitor()])
    assert set(k for k in history.history if k.startswith("adam/")) == {
        f"adam/hidden_adam/hidden/{s}" for s in ("step_median", "step_max", "snr_median",
                                                  "at_bound", "stalled")}
    # The hidden layer's step_max from its slots by the closed form of the
    # module docstring (placement "hat"), in float64: |m / c1| / D.
    t = int(keras.ops.convert_to_numpy(hidden_adam.iterations))
    c1, c2 = 1 - 0.9**t, 1 - 0.999**t
    steps = []
    for variable in model.layers[0].trainable_variables:
        m, v = [keras.ops.convert_to_numpy(s).astype("float64")
                for s in hidden_adam.slots(variable)[:2]]
        steps.append(np.abs(m / c1) / ((np.sqrt(v) + 1e-7) / np.sqrt(c2)))
    want = max(s.max() for s in steps)
    # float64 on both sides, from the same float32 slots: a few roundings.
    assert history.history["adam/hidden_adam/hidden/step_max"][0] == pytest.approx(want, rel=1e-12)


def test_refuses_a_multi_optimizer_without_keras_adam():
    model = _model(keras.optimizers.MultiOptimizer(
        keras.optimizers.OptimizerMap(default_optimizer=keras.optimizers.SGD())))
    x = np.zeros((8, 3), "float32")
    with pytest.raises(TypeError, match="with no keras_adam sub-optimizer"):
        model.fit(x, x[:, :1], epochs=1, verbose=0, callbacks=[AdamMonitor()])


def test_eight_bit_moments_are_reported_decoded():
    # AdamMonitor on 8-bit moments reads their values, not their codes: after
    # step 1 (epsilon = 0) every step is lr and every snr 1 in float32; 8-bit
    # m and v are each within one code's rounding (1.6% near a block's top,
    # more for small values), so the medians are within 5%. Read as raw codes
    # (127 for m, 255 for v) the statistics would be off by orders of magnitude.
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(128, name="wide")])
    model.compile(optimizer=keras_adam.Adam(epsilon=0.0, moment_dtype="8bit"), loss="mse")
    _apply(model, _grads(model, 1))
    assert keras.backend.standardize_dtype(
        model.optimizer.slots(model.layers[0].kernel)[0].dtype) == "int8"
    stats = _monitor(model).statistics()
    layer = next(k for k in stats if k.endswith("/step_median"))
    assert stats[layer] == pytest.approx(1.0, rel=0.05)
    assert stats[layer.replace("step_median", "snr_median")] == pytest.approx(1.0, rel=0.05)
