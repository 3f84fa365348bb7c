"""Training in pure bfloat16: what the optimizer's write does to the final loss.

Run:  python examples/bfloat16_training.py

One small regression MLP, the same data, start and number of steps, trained
seven ways: float32; mixed_bfloat16 (float32 weights, bfloat16 compute);
and pure bfloat16 (weights, gradients and arithmetic in bfloat16) with
keras.optimizers.Adam, and with keras_adam writing the weights with nearest,
stochastic and compensated rounding, plus stochastic rounding with 8-bit
moments. Prints the final loss and the training state's bytes per parameter
(weights + gradients + optimizer state) side by side.

keras.optimizers.Adam does not train in pure bfloat16: it computes with
beta_2 in the variable's dtype, and bfloat16(0.999) = 1, so every step is 0.
Nearest rounding loses every update below half a unit in the last place;
stochastic rounding keeps them on average, compensated rounding exactly.
"""

import argparse

import keras
import numpy as np

import keras_adam
from keras_adam.benchmark import moments

RUNS = [
    ("float32", "float32", "keras.optimizers.Adam", None),
    ("mixed_bfloat16", "mixed_bfloat16", "keras.optimizers.Adam", None),
    ("bfloat16, keras.optimizers.Adam", "bfloat16", "keras.optimizers.Adam", None),
    ("bfloat16, nearest", "bfloat16", "keras_adam", dict(weight_rounding="nearest")),
    ("bfloat16, stochastic", "bfloat16", "keras_adam", dict(weight_rounding="stochastic")),
    ("bfloat16, compensated", "bfloat16", "keras_adam", dict(weight_rounding="compensated")),
    ("bfloat16, stochastic, 8-bit moments", "bfloat16", "keras_adam",
     dict(weight_rounding="stochastic", moment_dtype="8bit", min_8bit_size=1024)),
]


def data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2048, 32)).astype("float32")
    w = rng.normal(size=(32, 1)) / np.sqrt(32)
    y = (np.tanh(x @ w) + 0.1 * rng.normal(size=(2048, 1))).astype("float32")
    return x, y


def train(policy, optimizer_name, kwargs, epochs, seed=0):
    """(final loss, training bytes per parameter) of one run."""
    x, y = data()
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([keras.Input((32,)), keras.layers.Dense(64, activation="relu"),
                                  keras.layers.Dense(64, activation="relu"),
                                  keras.layers.Dense(1)])
        if optimizer_name == "keras_adam":
            optimizer = keras_adam.Adam(learning_rate=1e-3, **kwargs)
        else:
            optimizer = keras.optimizers.Adam(learning_rate=1e-3)
        model.compile(optimizer=optimizer, loss="mse")
        model.fit(x, y, batch_size=32, epochs=epochs, verbose=0, shuffle=False)
        # The loss of the trained weights on the whole set, in float32.
        prediction = np.asarray(model.predict(x, verbose=0, batch_size=512), "float32")
        loss = float(np.mean((prediction - y) ** 2))
        return loss, moments.training_bytes(keras, model)["total"]
    finally:
        keras.config.set_dtype_policy(previous)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="64 steps per epoch")
    args = parser.parse_args(argv)
    rows = []
    print(f"backend: {keras.backend.backend()}, {args.epochs * 64} steps")
    print(f"{'run':<38} {'final loss':>10} {'bytes/param':>12}")
    for label, policy, optimizer_name, kwargs in RUNS:
        loss, per_parameter = train(policy, optimizer_name, kwargs or {}, args.epochs)
        rows.append((label, loss, per_parameter))
        print(f"{label:<38} {loss:>10.4f} {per_parameter:>12.2f}")
    return rows


if __name__ == "__main__":
    main()
