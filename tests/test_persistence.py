"""Optimizer state survives .keras files, TF checkpoints and SavedModels; resumed = uninterrupted.

Resumption is checked bit for bit: the resumed run executes the same ops on
the same values in the same order as the uninterrupted one, so any lost or
altered state (m, v, v_max, t, EMA copies, accumulators, the schedule's
position) shows up as a difference.
"""

import hashlib
import json
import zipfile

import keras
import numpy as np
import pytest

import keras_adam

# The model, data and steps are those of the cross-backend helper: N steps
# before saving, M after loading, batches of 16.
from backend_run import BATCH, M, N, X, Y  # noqa: E402
from backend_run import model_with as _model  # noqa: E402
from backend_run import train as _train  # noqa: E402


def _schedule():
    return keras.optimizers.schedules.ExponentialDecay(1e-2, decay_steps=3, decay_rate=0.5)


# (id, optimizer factory): one row per kind of optimizer state.
STATES = [
    ("defaults", lambda: keras_adam.Adam()),
    ("amsgrad", lambda: keras_adam.Adam(amsgrad=True)),
    ("ema", lambda: keras_adam.Adam(use_ema=True, ema_momentum=0.5)),
    # N = 5 is not a multiple of 3: the saved accumulators hold a partial sum.
    ("accumulation", lambda: keras_adam.Adam(gradient_accumulation_steps=3)),
    ("schedule", lambda: keras_adam.Adam(learning_rate=_schedule())),
    ("adamw-nesterov", lambda: keras_adam.AdamW(nesterov=True, epsilon_placement="paper")),
    ("portable", lambda: keras_adam.Adam(fused=False, amsgrad=True)),
    # The hidden kernel (4 x 8) is quantized, in blocks of 4; the rest keeps
    # float32 moments: codes, scales and float slots side by side.
    ("8bit", lambda: keras_adam.Adam(moment_dtype="8bit", amsgrad=True, moment_block_size=4,
                                     min_8bit_size=16)),
    # Groups: the hidden kernel's moments in 8 bits at half the lr, the biases
    # with their own beta_2 and no decay, the output kernel the optimizer's.
    ("groups", lambda: keras_adam.Adam(
        weight_decay=0.01, moment_block_size=4, min_8bit_size=16, groups={
            ".*hidden/kernel": {"moment_dtype": "8bit", "learning_rate_multiplier": 0.5},
            ".*bias": {"weight_decay": 0.0, "beta_2": 0.99}})),
]
IDS = [s[0] for s in STATES]
FACTORIES = [s[1] for s in STATES]


def _state(model):
    return [w.copy() for w in model.get_weights()] + [
        v.numpy().copy() for v in model.optimizer.variables]


def _step(optimizer):
    # With gradient accumulation `iterations` is computed, not a Variable.
    return int(keras.ops.convert_to_numpy(optimizer.iterations))


def _assert_identical(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def _uninterrupted(factory):
    model = _model(factory())
    _train(model, 0, N + M)
    return _state(model)


@pytest.mark.parametrize("factory", FACTORIES, ids=IDS)
def test_keras_file_resume_is_identical(tmp_path, factory):
    model = _model(factory())
    _train(model, 0, N)
    before = _state(model)
    model.save(tmp_path / "model.keras")

    loaded = keras.models.load_model(tmp_path / "model.keras")  # safe_mode, no custom_objects
    assert type(loaded.optimizer) is type(model.optimizer)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    assert _step(loaded.optimizer) == _step(model.optimizer)
    assert float(loaded.optimizer.learning_rate) == float(model.optimizer.learning_rate)
    _assert_identical(_state(loaded), before)

    _train(loaded, N, N + M)
    _assert_identical(_state(loaded), _uninterrupted(factory))


@pytest.mark.parametrize("kind", ["amsgrad", "8bit", "groups"])
def test_checkpoint_manager_with_deferred_restoration(tmp_path, kind):
    tf = pytest.importorskip("tensorflow")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("tf.train.Checkpoint needs the TensorFlow backend")
    factory = FACTORIES[IDS.index(kind)]
    model = _model(factory())
    _train(model, 0, N)
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(model=model, optimizer=model.optimizer), tmp_path, max_to_keep=2)
    manager.save()

    fresh = _model(factory())
    assert not fresh.optimizer.built  # restoration is deferred until build
    status = tf.train.Checkpoint(model=fresh, optimizer=fresh.optimizer).restore(
        manager.latest_checkpoint)
    fresh.optimizer.build(fresh.trainable_variables)
    status.assert_consumed()
    _assert_identical(_state(fresh), _state(model))

    _train(fresh, N, N + M)
    _assert_identical(_state(fresh), _uninterrupted(factory))


@pytest.mark.parametrize("kind", ["amsgrad", "8bit", "groups"])
def test_saved_model_training_step_continues_the_run(tmp_path, kind):
    tf = pytest.importorskip("tensorflow")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("SavedModel needs the TensorFlow backend")

    class Trainer(tf.Module):
        def __init__(self, model, optimizer):
            super().__init__()
            self.model, self.optimizer = model, optimizer

        @tf.function(input_signature=[tf.TensorSpec([None, 4]), tf.TensorSpec([None, 1])])
        def train(self, x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(self.model(x) - y))
            grads = tape.gradient(loss, self.model.trainable_variables)
            self.optimizer.apply(grads, self.model.trainable_variables)
            return loss

        @tf.function(input_signature=[])
        def state(self):
            return [v.value for v in self.model.trainable_variables] + [
                v.value for v in self.optimizer.variables]

    model = _model(FACTORIES[IDS.index(kind)]())
    original = Trainer(model, model.optimizer)
    model.optimizer.build(model.trainable_variables)
    for step in range(N):
        original.train(X[BATCH * step:BATCH * (step + 1)], Y[BATCH * step:BATCH * (step + 1)])
    tf.saved_model.save(original, str(tmp_path / "trainer"))
    restored = tf.saved_model.load(str(tmp_path / "trainer"))
    _assert_identical([t.numpy() for t in restored.state()], [t.numpy() for t in original.state()])

    for step in range(N, N + M):
        batch = (X[BATCH * step:BATCH * (step + 1)], Y[BATCH * step:BATCH * (step + 1)])
        original.train(*batch)
        restored.train(*batch)
    _assert_identical([t.numpy() for t in restored.state()], [t.numpy() for t in original.state()])
    assert int(restored.state()[4].numpy()) == N + M  # the step counter, after 4 weights


def test_export_gives_a_serving_artifact(tmp_path):
    tf = pytest.importorskip("tensorflow")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("model.export writes a TensorFlow SavedModel")
    model = _model(keras_adam.Adam())
    _train(model, 0, N)
    model.export(str(tmp_path / "serving"), verbose=False)
    serving = tf.saved_model.load(str(tmp_path / "serving"))
    # The same float32 graph on the same inputs: only kernel choice can differ
    # (matmul blocking), a few ulps of outputs of size ~1.
    np.testing.assert_allclose(serving.serve(X[:32]).numpy(), model.predict(X[:32], verbose=0),
                               rtol=1e-6, atol=1e-6)


# --- Bad or hostile files ------------------------------------------------------

def _saved(tmp_path):
    model = _model(keras_adam.Adam(amsgrad=True))
    _train(model, 0, 2)
    path = tmp_path / "good.keras"
    model.save(path)
    return path


def _tampered(path, change, out):
    with zipfile.ZipFile(path) as zin:
        config = json.loads(zin.read("config.json"))
        config["compile_config"]["optimizer"]["config"].update(change)
        with zipfile.ZipFile(out, "w") as zout:
            for name in zin.namelist():
                zout.writestr(name, json.dumps(config) if name == "config.json" else zin.read(name))
    return out


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "change,exc,pattern",
    [
        (dict(betas=[0.9, 0.999]), ValueError, r"Unknown field.*betas"),
        (dict(amsgrad="yes"), TypeError, r"`amsgrad` must be a bool"),
        (dict(beta_1=2.0), ValueError, r"`beta_1` must be in \[0, 1\)"),
        (dict(epsilon=-1.0), ValueError, r"`epsilon`"),
        (dict(epsilon_placement="torch"), ValueError, r"`epsilon_placement`"),
    ],
    ids=["unknown-field", "wrong-type", "out-of-range", "negative-epsilon", "bad-choice"],
)
def test_tampered_optimizer_config_names_the_field(tmp_path, change, exc, pattern):
    bad = _tampered(_saved(tmp_path), change, tmp_path / "bad.keras")
    digest = _digest(bad)
    with pytest.raises(exc, match=pattern):
        keras.models.load_model(bad)
    assert _digest(bad) == digest  # a failed load leaves the file untouched


def test_config_code_is_never_executed(tmp_path):
    from keras.src.utils import python_utils  # only to craft the hostile payload

    marker = tmp_path / "executed"

    def payload(path=str(marker)):
        with open(path, "w") as f:
            f.write("x")
        return 0.1

    lam = {"class_name": "__lambda__", "config": {"value": python_utils.func_dump(payload)}}
    bad = _tampered(_saved(tmp_path), dict(learning_rate=lam), tmp_path / "bad.keras")
    with pytest.raises(ValueError, match="deserialization of a Python lambda"):
        keras.models.load_model(bad)  # safe_mode=True
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage-weights"])
def test_corrupt_file_raises_instead_of_half_loading(tmp_path, damage):
    good = _saved(tmp_path)
    bad = tmp_path / "bad.keras"
    if damage == "truncated":
        data = good.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    else:
        with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
            for name in zin.namelist():
                zout.writestr(name, b"\x00" * 64 if name.endswith(".h5") else zin.read(name))
    digest = _digest(bad)
    with pytest.raises(Exception):
        keras.models.load_model(bad)
    assert _digest(bad) == digest
