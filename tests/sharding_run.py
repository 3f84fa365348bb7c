"""Runs `shard_state=True` on 8 virtual CPU devices, for tests/test_sharding.py.

JAX fixes its device count when it is first imported, so this runs in a
fresh process with XLA_FLAGS=--xla_force_host_platform_device_count=8 and
KERAS_BACKEND=jax:

    python sharding_run.py equal DIR     DIR/equal.npz: weights after 20 steps of model.fit,
                                         sharded and not, per model, options and device count;
                                         DIR/equal.json: each run's slot layouts and bytes
    python sharding_run.py resume DIR    DIR/resume.npz: an uninterrupted 8-device run and
                                         runs saved after 10 steps on 8 devices and continued
                                         on 4 devices and on one
    python sharding_run.py placement DIR DIR/placement.json: the dimension chosen for shapes
"""

import json
import os
import sys

import jax
import keras
import numpy as np

import keras_adam
from keras_adam import _sharding

STEPS, BATCH = 20, 32
rng = np.random.default_rng(0)
X_DENSE = rng.normal(size=(STEPS * BATCH, 32)).astype("float32")
X_IDS = rng.integers(0, 1000, size=(STEPS * BATCH, 6)).astype("int32")
Y = rng.normal(size=(STEPS * BATCH, 4)).astype("float32")

OPTIONS = {
    "default": {},
    "amsgrad": dict(amsgrad=True),
    "weight-decay": dict(weight_decay=0.05),
    "bfloat16": dict(moment_dtype="bfloat16"),
    "all": dict(amsgrad=True, weight_decay=0.05, moment_dtype="bfloat16", nesterov=True),
    # Every kernel and the embedding table in 8 bits (each has >= 4096 elements).
    "8bit": dict(moment_dtype="8bit", amsgrad=True),
    # Groups: the kernels' moments in 8 bits at half the lr, the biases with
    # their own beta_2 and no decay; every other variable the optimizer's.
    "groups": dict(weight_decay=0.05, groups={
        ".*(kernel|embeddings)": {"moment_dtype": "8bit", "learning_rate_multiplier": 0.5},
        ".*bias": {"weight_decay": 0.0, "beta_2": 0.99}}),
    # The model's variables in bfloat16 (POLICIES), written with stochastic
    # rounding, their moments too.
    "pure-bfloat16": dict(weight_rounding="stochastic"),
}
# The dtype policy an option set's model is built under (default: float32).
POLICIES = {"pure-bfloat16": "bfloat16"}


def mlp():
    return keras.Sequential([
        keras.Input((32,)), keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(64, activation="relu"), keras.layers.Dense(4)])


def embedding():
    return keras.Sequential([
        keras.Input((6,), dtype="int32"), keras.layers.Embedding(1000, 16),
        keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(4)])


MODELS = {"mlp": (mlp, X_DENSE), "embedding": (embedding, X_IDS)}


def data_parallel(n):
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=jax.devices()[:n]))


def compiled(model_name, options, shard, policy=None):
    build, _ = MODELS[model_name]
    keras.utils.set_random_seed(1)
    keras.config.set_dtype_policy(policy or "float32")
    try:
        model = build()
    finally:
        keras.config.set_dtype_policy("float32")
    model.compile(keras_adam.Adam(learning_rate=1e-2, shard_state=shard, **options), "mse")
    return model


def fit(model, x, first, last):
    model.fit(x[first * BATCH:last * BATCH], Y[first * BATCH:last * BATCH],
              batch_size=BATCH, epochs=1, shuffle=False, verbose=0)


def slot_report(optimizer, model):
    """Per slot: its sharding spec and the bytes one device holds against the whole."""
    report = []
    for variable in model.trainable_variables:
        for slot in optimizer.slots(variable):
            if slot is None:
                continue
            value = slot.value
            report.append({
                "slot": slot.path,
                "shape": list(value.shape),
                "spec": [a for a in value.sharding.spec] + [None] * (
                    len(value.shape) - len(value.sharding.spec)),
                "device_bytes": [int(s.data.nbytes) for s in value.addressable_shards],
                "total_bytes": int(value.nbytes),
            })
    return report


def equal(out):
    weights, layouts = {}, {}
    for n in (4, 8):
        data_parallel(n)
        for model_name, (_, x) in MODELS.items():
            for option_name, options in OPTIONS.items():
                for shard in (False, True):
                    key = f"{model_name}/{option_name}/{n}/{'sharded' if shard else 'whole'}"
                    model = compiled(model_name, options, shard, POLICIES.get(option_name))
                    fit(model, x, 0, STEPS)
                    for i, w in enumerate(model.get_weights()):
                        weights[f"{key}/{i}"] = np.asarray(w, "float32")  # bfloat16 exactly
                    layouts[key] = slot_report(model.optimizer, model)
    # ModelParallel: a (4, 2) mesh, the Dense kernels split on "model".
    mesh = keras.distribution.DeviceMesh((4, 2), ["batch", "model"], jax.devices())
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*dense.*kernel"] = (None, "model")
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch"))
    for name, options in [("model-parallel", dict(amsgrad=True)),
                          ("model-parallel-8bit", dict(amsgrad=True, moment_dtype="8bit"))]:
        for shard in (False, True):
            key = f"mlp/{name}/8/{'sharded' if shard else 'whole'}"
            model = compiled("mlp", options, shard)
            fit(model, X_DENSE, 0, STEPS)
            for i, w in enumerate(model.get_weights()):
                weights[f"{key}/{i}"] = w
            layouts[key] = slot_report(model.optimizer, model)
    # A custom loop: eager optimizer.apply on sharded slots.
    data_parallel(8)
    for shard in (False, True):
        key = f"mlp/eager-apply/8/{'sharded' if shard else 'whole'}"
        model = compiled("mlp", dict(amsgrad=True), shard)
        model.optimizer.build(model.trainable_variables)
        grads = [keras.ops.convert_to_tensor(
            np.random.default_rng(i).normal(size=v.shape).astype("float32"))
            for i, v in enumerate(model.trainable_variables)]
        for _ in range(3):
            model.optimizer.apply(grads, model.trainable_variables)
        for i, w in enumerate(model.get_weights()):
            weights[f"{key}/{i}"] = w
        layouts[key] = slot_report(model.optimizer, model)
    np.savez(os.path.join(out, "equal.npz"), **weights)
    with open(os.path.join(out, "equal.json"), "w") as f:
        json.dump(layouts, f)


def resume(out):
    half = STEPS // 2
    results = {}
    data_parallel(8)
    model = compiled("embedding", dict(amsgrad=True, weight_decay=0.05), True)
    fit(model, X_IDS, 0, half)
    path = os.path.join(out, "model.keras")
    model.save(path)
    results["saved"] = [keras.ops.convert_to_numpy(v) for v in model.optimizer.variables]
    fit(model, X_IDS, half, STEPS)
    results["uninterrupted"] = model.get_weights()
    for n in (4, 1):
        if n == 1:
            keras.distribution.set_distribution(None)
        else:
            data_parallel(n)
        loaded = keras.models.load_model(path)
        # Elements of each slot that device 0 holds, and the slots' paths.
        results[f"device-elements-{n}"] = [np.array([
            slot.value.addressable_shards[0].data.size for slot in loaded.optimizer.variables])]
        results[f"loaded-{n}"] = [keras.ops.convert_to_numpy(v) for v in loaded.optimizer.variables]
        fit(loaded, X_IDS, half, STEPS)
        results[f"resumed-{n}"] = loaded.get_weights()
    np.savez(os.path.join(out, "resume.npz"), **{
        f"{key}/{i}": np.asarray(w) for key, ws in results.items() for i, w in enumerate(ws)})


def placement(out):
    """The dimension `shard_state` picks, for shapes chosen to exercise each rule."""
    shapes = [(), (8,), (4096,), (4100,), (64, 128), (128, 64), (96, 96), (100, 81), (3, 4096),
              (5, 7, 1024)]
    data_parallel(8)
    chosen = {}
    placement = _sharding.Placement(shard=True)
    for shape in shapes:
        variable = keras.Variable(np.zeros(shape, "float32"))
        layout = placement.layout(variable)
        axes = list(layout.axes) if layout is not None else None
        chosen[str(shape)] = {"axes": axes, "words": placement.describe(variable)}
    with open(os.path.join(out, "placement.json"), "w") as f:
        json.dump(chosen, f)


if __name__ == "__main__":
    assert len(jax.devices()) == 8, jax.devices()
    {"equal": equal, "resume": resume, "placement": placement}[sys.argv[1]](sys.argv[2])
