"""The house rule: helper modules receive data and never read the optimizer's privates.

`keras_adam/optimizer.py` holds Keras's hooks and the public API; every other
module of the package (the storage formats, saving, the plan, sparse
updates, the fast paths, the benchmark) receives what it needs as
arguments. This test watches every private attribute read on the optimizer
while it trains, saves and loads with many options, and fails if one comes
from a module other than `keras_adam.optimizer` (Keras's own base class may
read its own attributes).
"""

import sys

import keras
import numpy as np

import keras_adam

WATCHED = "keras_adam"
OWNER = "keras_adam.optimizer"


class Watched(keras_adam.Adam):
    """Adam that notes which module reads each of its private attributes."""

    def __getattribute__(self, name):
        if name.startswith("_") and not name.startswith("__"):
            module = sys._getframe(1).f_globals.get("__name__", "")
            if module.split(".")[0] == WATCHED and module != OWNER:
                object.__getattribute__(self, "__dict__").setdefault(
                    "reads_from_helpers", set()).add(f"{module}: {name}")
        return super().__getattribute__(name)


def _model():
    return keras.Sequential([
        keras.Input((4,)),
        keras.layers.Embedding(64, 80, name="table"),  # 5,120 elements: 8-bit
        keras.layers.Flatten(),
        keras.layers.Dense(1, name="out"),
    ])


def _train_save_load(tmp_path, **kwargs):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 64, size=(32, 4))
    y = rng.normal(size=(32, 1)).astype("float32")
    model = _model()
    optimizer = Watched(**kwargs)
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    optimizer.apply([np.full(v.shape, np.nan, "float32") for v in model.trainable_variables])
    str(optimizer.update_plan())
    for variable in model.trainable_variables:
        optimizer.moments(variable)
    path = str(tmp_path / "model.weights.h5")
    model.save_weights(path)
    other = _model()
    other_optimizer = Watched(**kwargs)
    other.compile(optimizer=other_optimizer, loss="mse")
    other.optimizer.build(other.trainable_variables)
    other.load_weights(path)
    Watched.from_config(optimizer.get_config())
    return [o.__dict__.get("reads_from_helpers", set()) for o in (optimizer, other_optimizer)]


def test_helpers_do_not_read_the_optimizers_privates(tmp_path):
    for kwargs in [
        dict(amsgrad=True, weight_decay=0.01, skip_nonfinite=True, moment_dtype="8bit",
             sparse_updates="lazy", use_ema=True),
        dict(nesterov=True, moment_dtype="bfloat16", gradient_accumulation_steps=2),
        dict(epsilon_placement="paper"),
    ]:
        reads = set().union(*_train_save_load(tmp_path, **kwargs))
        assert not reads, f"helper modules read private attributes ({kwargs}): {sorted(reads)}"


def test_the_watch_sees_a_helper_that_reads_a_private():
    # The check above can fail: a helper-module frame reading a private is noted.
    optimizer = Watched()
    helper_globals = {"__name__": "keras_adam._state", "optimizer": optimizer}
    exec("optimizer._options", helper_globals)  # noqa: S102 - a frame in a helper module
    assert optimizer.__dict__["reads_from_helpers"] == {"keras_adam._state: _options"}
