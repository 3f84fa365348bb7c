"""Helper processes for tests that need a particular Keras backend or device setup.

Not a test file: tests/test_cross_backend.py runs it in subprocesses, because
the Keras backend and JAX's device count are fixed when they are first imported.
tests/test_persistence.py imports its model, data and training loop.

    KERAS_BACKEND=A python backend_run.py save DIR      train 5 steps, save DIR/model.keras
                                                        and DIR/saved.npz; train 4 more:
                                                        DIR/continued.npz
    KERAS_BACKEND=B python backend_run.py resume DIR    load DIR/model.keras: DIR/loaded.npz;
                                                        train 4 more: DIR/resumed.npz
    KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
        python backend_run.py data_parallel DIR         DIR/single.npz and DIR/parallel.npz
    KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
        python backend_run.py model_parallel DIR        DIR/single.npz, DIR/parallel.npz and
                                                        DIR/sharding.json (whether each slot
                                                        is laid out as its variable)
"""

import os
import sys

import keras
import numpy as np

import keras_adam

N, M, BATCH = 5, 4, 16
rng = np.random.default_rng(0)
X = rng.normal(size=((N + M) * BATCH, 4)).astype("float32")
Y = np.tanh(X @ rng.normal(size=(4, 1))).astype("float32")


def model_with(optimizer):
    model = keras.Sequential([keras.Input((4,)),
                              keras.layers.Dense(8, activation="tanh", name="hidden"),
                              keras.layers.Dense(1, name="out")])
    init = np.random.default_rng(1)
    model.set_weights([init.normal(scale=0.5, size=w.shape).astype("float32")
                       for w in model.get_weights()])
    model.compile(optimizer=optimizer, loss="mse")
    return model


def train(model, first, last):
    for s in range(first, last):
        model.train_on_batch(X[BATCH * s:BATCH * (s + 1)], Y[BATCH * s:BATCH * (s + 1)])


def dump(model, path):
    np.savez(path, *model.get_weights(),
             *[keras.ops.convert_to_numpy(v) for v in model.optimizer.variables])


def main():
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "save":
        model = model_with(keras_adam.Adam(amsgrad=True, learning_rate=1e-2))
        train(model, 0, N)
        model.save(os.path.join(out, "model.keras"))
        dump(model, os.path.join(out, "saved.npz"))
        train(model, N, N + M)
        dump(model, os.path.join(out, "continued.npz"))
    elif mode == "resume":
        model = keras.models.load_model(os.path.join(out, "model.keras"))
        assert type(model.optimizer) is keras_adam.Adam
        dump(model, os.path.join(out, "loaded.npz"))
        train(model, N, N + M)
        dump(model, os.path.join(out, "resumed.npz"))
    elif mode == "data_parallel":
        import jax

        assert len(jax.devices()) == 2, jax.devices()
        x = X[:BATCH * 8]
        y = Y[:BATCH * 8]
        single = model_with(keras_adam.Adam(learning_rate=1e-2))
        single.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
        dump(single, os.path.join(out, "single.npz"))
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=keras.distribution.list_devices()))
        parallel = model_with(keras_adam.Adam(learning_rate=1e-2))
        parallel.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
        dump(parallel, os.path.join(out, "parallel.npz"))
    elif mode == "model_parallel":
        import json

        import jax

        assert len(jax.devices()) == 4, jax.devices()
        x, y = X[:BATCH * 8], Y[:BATCH * 8]
        single = model_with(keras_adam.Adam(learning_rate=1e-2))
        single.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
        dump(single, os.path.join(out, "single.npz"))
        mesh = keras.distribution.DeviceMesh(
            shape=(2, 2), axis_names=["batch", "model"], devices=keras.distribution.list_devices())
        layout_map = keras.distribution.LayoutMap(mesh)
        # The hidden layer's 8 units split in two (LayoutMap keys match whole paths).
        layout_map[".*hidden/kernel"] = (None, "model")
        layout_map[".*hidden/bias"] = ("model",)
        keras.distribution.set_distribution(
            keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch"))
        parallel = model_with(keras_adam.Adam(learning_rate=1e-2))
        parallel.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
        dump(parallel, os.path.join(out, "parallel.npz"))
        # Every slot must be laid out as its variable, also with moments
        # stored apart (moment_dtype) and with amsgrad's v_max.
        half = keras_adam.Adam(moment_dtype="bfloat16", amsgrad=True)
        half.build(parallel.trainable_variables)
        report = []
        for optimizer in (parallel.optimizer, half):
            for variable in parallel.trainable_variables:
                for slot in optimizer.slots(variable):
                    if slot is not None:
                        report.append({
                            "variable": variable.path,
                            "sharded": not variable.value.sharding.is_fully_replicated,
                            "same": slot.value.sharding.is_equivalent_to(
                                variable.value.sharding, len(variable.shape)),
                        })
        with open(os.path.join(out, "sharding.json"), "w") as f:
            json.dump(report, f)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
