"""Trains a small MLP with keras_adam under a tf.distribute strategy; saves the weights.

Not a test file: tests/test_distribute_tensorflow.py runs it in subprocesses,
because logical devices and multi-worker clusters must be configured before
TensorFlow starts. Usage:

    python distributed_run.py single OUT.npz OPTIONS_JSON
    python distributed_run.py mirrored OUT.npz OPTIONS_JSON     (2 logical CPUs)
    TF_CONFIG=... python distributed_run.py worker OUT.npz OPTIONS_JSON

Every mode sees the same data, initial weights and global batches, so all must
reach the same weights up to float32 rounding of the gradient all-reduce.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

GLOBAL_BATCH = 32
STEPS = 24


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(GLOBAL_BATCH * STEPS, 6)).astype("float32")
    y = np.tanh(x @ rng.normal(size=(6, 1))).astype("float32")
    return x, y


def build_model(keras):
    model = keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(16, activation="tanh"),
        keras.layers.Dense(1),
    ])
    rng = np.random.default_rng(1)
    model.set_weights([rng.normal(scale=0.5, size=w.shape).astype("float32")
                       for w in model.get_weights()])
    return model


def train_custom_loop(keras, keras_adam, strategy, options, worker_index, num_workers):
    """optimizer.apply inside strategy.run (model.fit is broken for MWMS, keras#20585)."""
    x, y = data()
    with strategy.scope():
        model = build_model(keras)
        optimizer = keras_adam.Adam(**options)
        optimizer.build(model.trainable_variables)

    @tf.function
    def step(xb, yb):
        def replica_step(xb, yb):
            with tf.GradientTape() as tape:
                # Sum over local examples / global batch: the all-reduced sum
                # of the replicas' gradients is then the global-batch mean's.
                loss = tf.reduce_sum(tf.square(model(xb) - yb)) / GLOBAL_BATCH
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply(grads, model.trainable_variables)

        strategy.run(replica_step, args=(xb, yb))

    local = GLOBAL_BATCH // num_workers
    for s in range(STEPS):
        lo = s * GLOBAL_BATCH + worker_index * local
        step(tf.constant(x[lo:lo + local]), tf.constant(y[lo:lo + local]))
    return model, optimizer


def main():
    mode, out, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    # An option of this script, not of the optimizer: the Keras dtype policy.
    policy = options.pop("dtype_policy", None)
    if mode == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    import keras

    import keras_adam

    if policy is not None:
        keras.config.set_dtype_policy(policy)
    replicas_differ = 0.0
    if mode == "single":
        model, optimizer = train_custom_loop(
            keras, keras_adam, tf.distribute.get_strategy(), options, 0, 1)
    elif mode == "mirrored":
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        assert strategy.num_replicas_in_sync == 2
        x, y = data()
        with strategy.scope():
            model = build_model(keras)
            optimizer = keras_adam.Adam(**options)
            model.compile(optimizer=optimizer, loss="mse")
        model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
        # Each replica's copy of every model and optimizer variable: they must
        # hold the same bits (the weight rounding's random numbers included).
        for variable in model.trainable_variables + optimizer.variables:
            first, *others = [np.asarray(tf.cast(r, tf.float32))
                              for r in strategy.experimental_local_results(variable.value)]
            for other in others:
                replicas_differ = max(replicas_differ, float(np.max(np.abs(first - other))))
    elif mode == "worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
        model, optimizer = train_custom_loop(
            keras, keras_adam, strategy, options, task, strategy.num_replicas_in_sync)
    else:
        raise SystemExit(f"unknown mode {mode!r}")

    slots = [np.asarray(tf.cast(s.value, tf.float32)) for v in model.trainable_variables
             for s in optimizer.slots(v) if s is not None]
    np.savez(out, *[np.asarray(w, np.float32) for w in model.get_weights()], *slots,
             iterations=int(optimizer.iterations.numpy()), replicas_differ=replicas_differ)


if __name__ == "__main__":
    main()
