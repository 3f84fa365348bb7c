"""Writes the `.keras` files that tests/test_legacy_files.py loads.

These files pin the on-disk format: they were written by keras_adam 0.1.0
(commit 943ed6f, before the redesign of issue #13) on the TensorFlow backend,
and every later version must load them with the same optimizer state. Do not
regenerate them with a newer keras_adam; add new files beside them instead.

Run from the repository root with the version to pin on the path:

    KERAS_BACKEND=tensorflow python tests/data/make_legacy_files.py

Each case saves `<name>.keras` after N steps, and `<name>.npz` with every
optimizer variable at that point (`variables_*`, by position) and the model's
weights after M further steps of the same optimizer (`continued_*`), so the
test can check both the loaded state and how training continues from it.
"""

import os
import sys

import keras
import numpy as np

import keras_adam

N, M = 5, 4
CASES = {
    "adam_defaults": dict(),
    "adam_amsgrad_paper": dict(amsgrad=True, epsilon_placement="paper", epsilon=1e-8),
    "adam_bfloat16_moments": dict(moment_dtype="bfloat16", fused=False),
    "adamw_nesterov": dict(weight_decay=0.01, nesterov=True),
}


def model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="hidden"),
                             keras.layers.Dense(1, name="out")])


def gradients(model, steps, seed):
    """Fixed gradients per step, shaped like the model's trainable variables."""
    rng = np.random.default_rng(seed)
    return [[rng.normal(size=v.shape).astype("float32") for v in model.trainable_variables]
            for _ in range(steps)]


def main(out_dir):
    for name, kwargs in CASES.items():
        cls = keras_adam.AdamW if "weight_decay" in kwargs else keras_adam.Adam
        net = model()
        net.compile(optimizer=cls(learning_rate=1e-2, **kwargs), loss="mse")
        net.optimizer.build(net.trainable_variables)
        grads = gradients(net, N + M, seed=1)
        for g in grads[:N]:
            net.optimizer.apply(g, net.trainable_variables)
        net.save(os.path.join(out_dir, f"{name}.keras"))
        # As float32: exact for bfloat16 moments, which .npz cannot hold.
        saved = [keras.ops.convert_to_numpy(keras.ops.cast(v, "float32"))
                 for v in net.optimizer.variables]
        for g in grads[N:]:
            net.optimizer.apply(g, net.trainable_variables)
        continued = [keras.ops.convert_to_numpy(v) for v in net.trainable_variables]
        np.savez(os.path.join(out_dir, f"{name}.npz"),
                 **{f"variables_{i}": a for i, a in enumerate(saved)},
                 **{f"continued_{i}": a for i, a in enumerate(continued)})
        print(name, keras_adam.__version__, len(saved), "optimizer variables")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__)))
