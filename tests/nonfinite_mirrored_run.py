"""Subprocess for tests/test_nonfinite.py: skip_nonfinite under MirroredStrategy.

Two logical CPUs (configured before TensorFlow starts, hence a process of its
own). A custom loop calls optimizer.apply inside strategy.run, once with a
sequence holding NaN gradients (on both replicas) and Inf gradients (on one
replica only) and skip_nonfinite=True, once with the same sequence without
those steps. Exits non-zero, saying why, unless the
weights and every optimizer variable agree bit for bit and 2 steps were
skipped.
"""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_adam  # noqa: E402

STEPS, BAD = 8, {2: np.nan, 5: np.inf}


def run(sequence, **kwargs):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        optimizer = keras_adam.Adam(learning_rate=1e-2, **kwargs)
        optimizer.build(model.trainable_variables)

    @tf.function
    def step(grads, second_replica_grads):
        def replica_step(g, g2):
            # Replica 1 may see other gradients than replica 0 (a NaN only
            # there must stop the step on both). tf.identity inside the
            # replica: the gradients then live on its device, as computed ones
            # do (a constant has no device, and Keras's all-reduce refuses it
            # as a destination).
            second = tf.distribute.get_replica_context().replica_id_in_sync_group == 1
            g = [tf.identity(tf.where(second, b, a)) for a, b in zip(g, g2)]
            optimizer.apply(g, model.trainable_variables)

        strategy.run(replica_step, args=(grads, second_replica_grads))

    for grads, second in sequence:
        step([tf.constant(g) for g in grads], [tf.constant(g) for g in second])
    return model, optimizer


def main():
    rng = np.random.default_rng(0)
    clean = [[rng.normal(size=(4, 3)).astype("float32"), rng.normal(size=(3,)).astype("float32")]
             for _ in range(STEPS)]
    poisoned = [[g.copy() for g in grads] for grads in clean]
    for k, value in BAD.items():
        poisoned[k][0][1, 1] = value
    # Step 2: NaN on both replicas; step 5: Inf on replica 1 only.
    sequence = [(poisoned[k] if k == 2 else clean[k], poisoned[k]) for k in range(STEPS)]
    model_a, opt_a = run(sequence, skip_nonfinite=True)
    model_b, opt_b = run([(g, g) for k, g in enumerate(clean) if k not in BAD])
    skipped = int(opt_a.skipped_steps.numpy())
    if skipped != len(BAD):
        sys.exit(f"skipped_steps={skipped}, expected {len(BAD)}")
    a = [v.numpy() for v in model_a.weights] + [
        v.numpy() for v in opt_a.variables if v is not opt_a.skipped_steps]
    b = [v.numpy() for v in model_b.weights] + [v.numpy() for v in opt_b.variables]
    for x, y in zip(a, b):
        if not np.array_equal(x, y):
            sys.exit(f"state differs: max |diff| {np.max(np.abs(x - y))}")
    print("ok", skipped)


if __name__ == "__main__":
    main()
