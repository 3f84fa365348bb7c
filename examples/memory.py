"""Adam's state in float32, bfloat16 and 8 bits: bytes and final loss, side by side.

Run:  python examples/memory.py [--seeds 3]

Two models, each trained from the same start with `moment_dtype` None
(float32 moments, as keras.optimizers.Adam), "bfloat16" and "8bit":

- the main example's MLP (3-64-64-1, 10 epochs; its 64 x 64 kernel is the
  one tensor with 4,096 elements, so the only one stored in 8 bits), and
- a small CNN (two 3x3 convolutions, 8 epochs; the second kernel, 4,608
  elements, is stored in 8 bits) learning a non-linear image statistic.

For each it prints the optimizer's state bytes (measured from its variables,
without the step counter and learning rate), the bytes per parameter of the
quantized tensors, and the mean final loss over the seeds with its ratio to
float32's. Small tensors keep float32 moments in 8-bit mode (min_8bit_size),
so a model of small tensors saves little: the saving is where the memory is.
"""

import argparse
import math
import sys
from pathlib import Path

import keras
import numpy as np

import keras_adam
from keras_adam.benchmark import moments

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mlp_regression  # noqa: E402

MOMENT_DTYPES = (None, "bfloat16", "8bit")


def mlp_data(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4096, 3)).astype("float32")
    y = (x @ np.array([2.0, -1.0, 3.0]) + 1.5).astype("float32")[:, None]
    return mlp_regression.build_model, (x, y), dict(batch_size=64, epochs=10)


def cnn_data(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(1024, 12, 12, 1)).astype("float32")
    # The target: mean |3x3 filter response| of each image (non-linear).
    windows = np.lib.stride_tricks.sliding_window_view(x[..., 0], (3, 3), axis=(1, 2))
    y = np.abs(np.einsum("nijkl,kl->nij", windows, rng.normal(size=(3, 3))))
    y = y.mean(axis=(1, 2)).astype("float32")[:, None]

    def build():
        return keras.Sequential([
            keras.Input((12, 12, 1)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(1),
        ])

    return build, (x, y), dict(batch_size=32, epochs=8)


MODELS = {"mlp": mlp_data, "cnn": cnn_data}


def state_bytes(model):
    """(all state bytes, bytes per parameter of the 8-bit tensors or None)."""
    optimizer = model.optimizer
    total = moments.state_bytes(keras, optimizer)
    quantized = [v for v in model.trainable_variables
                 if keras.backend.standardize_dtype(optimizer.slots(v)[0].dtype) == "int8"]
    if not quantized:
        return total, None
    # Codes and their scales; the scales are not public, the optimizer's state is.
    per = sum(moments.variable_bytes(keras, s) for v in quantized
              for s in optimizer.state_variables(v).values())
    return total, per / sum(math.prod(v.shape) for v in quantized)


def train(model_name, seed, moment_dtype):
    """(final loss, state bytes, bytes per parameter of the 8-bit tensors)."""
    build, (x, y), fit_args = MODELS[model_name](seed)
    keras.utils.set_random_seed(seed)
    model = build()
    optimizer = keras_adam.Adam(learning_rate=1e-3, moment_dtype=moment_dtype)
    model.compile(optimizer=optimizer, loss="mse")
    history = model.fit(x, y, shuffle=False, verbose=0, **fit_args)
    return (history.history["loss"][-1], *state_bytes(model))


def compare(model_name, seeds):
    """{moment_dtype: (mean final loss, state bytes, bytes per 8-bit parameter)}."""
    rows = {}
    for moment_dtype in MOMENT_DTYPES:
        runs = [train(model_name, seed, moment_dtype) for seed in range(seeds)]
        rows[moment_dtype] = (float(np.mean([r[0] for r in runs])), runs[0][1], runs[0][2])
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    results = {}
    for name in MODELS:
        rows = compare(name, args.seeds)
        results[name] = rows
        print(f"{name} ({args.seeds} seeds, {keras.backend.backend()})")
        print(f"  {'moments':<10} {'state bytes':>12} {'B/param (8-bit tensors)':>24} "
              f"{'final loss':>11} {'vs float32':>10}")
        for moment_dtype, (loss, total, per) in rows.items():
            label = moment_dtype or "float32"
            per_text = "-" if per is None else f"{per:.3f}"
            print(f"  {label:<10} {total:>12,} {per_text:>24} {loss:>11.4e} "
                  f"{loss / rows[None][0]:>10.4f}")
    return results


if __name__ == "__main__":
    main()
