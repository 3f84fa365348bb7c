"""Training in pure bfloat16: what the optimizer's write does to the final loss.

Run:  python examples/bfloat16_training.py [--model mlp|cnn|transformer] [--seeds 3]
          [--first-seed 0] [--epochs 2] [--samples 2048]
          [--runs mixed,stochastic,compensated,8bit]

One small model (a regression MLP, a small CNN, or a one-block Transformer
encoder built from keras.layers), the same data (2,048 samples, or
--samples; an epoch is samples / 32 steps), start and number of steps,
trained nine ways: float32; mixed_bfloat16 (float32 weights, bfloat16
compute) with keras.optimizers.Adam, with keras_adam, and with keras_adam's
8-bit moments; and pure bfloat16 (weights, gradients and arithmetic in
bfloat16) with keras.optimizers.Adam, and with keras_adam writing the
weights with nearest, stochastic and compensated rounding, plus stochastic
rounding with 8-bit moments. Prints the final loss and the training state's
bytes per parameter (weights + gradients + optimizer state) side by side
(the mean over the seeds), and each final loss over that of mixed precision
with keras_adam.

Every run of a seed starts from the same weights: drawn in float32 and
rounded to bfloat16 (`start`). Built under the "bfloat16" policy, Keras's
initializers would draw other random values than under float32, and a
comparison of final losses would then mostly compare starts.

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

# {id: (label, dtype policy, optimizer, keras_adam.Adam kwargs)}
RUNS = {
    "float32": ("float32", "float32", "keras.optimizers.Adam", None),
    "mixed-builtin": ("mixed_bfloat16", "mixed_bfloat16", "keras.optimizers.Adam", None),
    "mixed": ("mixed_bfloat16, keras_adam", "mixed_bfloat16", "keras_adam", {}),
    "mixed-8bit": ("mixed_bfloat16, keras_adam, 8-bit moments", "mixed_bfloat16",
                   "keras_adam", dict(moment_dtype="8bit", min_8bit_size=1024)),
    "builtin": ("bfloat16, keras.optimizers.Adam", "bfloat16", "keras.optimizers.Adam", None),
    "nearest": ("bfloat16, nearest", "bfloat16", "keras_adam", dict(weight_rounding="nearest")),
    "stochastic": ("bfloat16, stochastic", "bfloat16", "keras_adam",
                   dict(weight_rounding="stochastic")),
    "compensated": ("bfloat16, compensated", "bfloat16", "keras_adam",
                    dict(weight_rounding="compensated")),
    "8bit": ("bfloat16, stochastic, 8-bit moments", "bfloat16", "keras_adam",
             dict(weight_rounding="stochastic", moment_dtype="8bit", min_8bit_size=1024)),
}
# What the pure bfloat16 runs are measured against: mixed precision with the
# same optimizer. (On TensorFlow, keras.optimizers.Adam updates v of an
# embedding row that appears several times in a batch by the sum of the
# squared gradients, not by the square of their sum; keras_adam, like Adam
# on the dense gradient, by the latter.)
BASELINE = "mixed"


MODELS = ("mlp", "cnn", "transformer")


def data(model_name="mlp", seed=0, samples=2048):
    """(x, y): `samples` samples of a smooth target (batches of 32)."""
    rng = np.random.default_rng(seed)
    n = samples
    if model_name == "cnn":
        x = rng.normal(size=(n, 12, 12, 1)).astype("float32")
        # The mean |3x3 filter response| of each image: a non-linear statistic.
        windows = np.lib.stride_tricks.sliding_window_view(x[..., 0], (3, 3), axis=(1, 2))
        y = np.abs(np.einsum("nijkl,kl->nij", windows, rng.normal(size=(3, 3))))
        return x, (y.mean(axis=(1, 2)) - 0.8).astype("float32")[:, None]
    if model_name == "transformer":
        x = rng.integers(0, 64, size=(n, 16)).astype("int32")
        # A token's weight times its position's: a target that needs both.
        score = rng.normal(size=64)[x] * rng.normal(size=16)
        return x, np.tanh(score.sum(axis=1) / 4).astype("float32")[:, None]
    x = rng.normal(size=(n, 32)).astype("float32")
    w = rng.normal(size=(32, 1)) / np.sqrt(32)
    return x, (np.tanh(x @ w) + 0.1 * rng.normal(size=(n, 1))).astype("float32")


class Positions(keras.layers.Layer):
    """A learned vector per position, added to the tokens' embeddings."""

    def build(self, input_shape):
        self.table = self.add_weight(shape=tuple(input_shape[1:]), initializer="uniform")

    def call(self, x):
        return x + self.table


def build(model_name):
    """The model, built under the current dtype policy."""
    layers = keras.layers
    if model_name == "cnn":
        return keras.Sequential([
            keras.Input((12, 12, 1)), layers.Conv2D(16, 3, activation="relu"),
            layers.Conv2D(32, 3, activation="relu"), layers.GlobalAveragePooling2D(),
            layers.Dense(1)])
    if model_name == "transformer":
        tokens = keras.Input((16,), dtype="int32")
        h = Positions()(layers.Embedding(64, 32)(tokens))
        h = layers.LayerNormalization()(h + layers.MultiHeadAttention(2, 16)(h, h))
        h = layers.LayerNormalization()(
            h + layers.Dense(32)(layers.Dense(64, activation="relu")(h)))
        return keras.Model(tokens, layers.Dense(1)(layers.GlobalAveragePooling1D()(h)))
    return keras.Sequential([keras.Input((32,)), layers.Dense(64, activation="relu"),
                             layers.Dense(64, activation="relu"), layers.Dense(1)])


def start(model_name, seed):
    """The initial weights of every run of `seed`: drawn in float32, rounded to
    bfloat16 (so that a bfloat16 model holds them exactly)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        keras.utils.set_random_seed(seed)
        weights = build(model_name).get_weights()
    finally:
        keras.config.set_dtype_policy(previous)
    return [keras.ops.convert_to_numpy(keras.ops.cast(keras.ops.cast(w, "bfloat16"), w.dtype))
            for w in weights]


def train(policy, optimizer_name, kwargs, epochs, seed=0, model_name="mlp", samples=2048):
    """(final loss, training bytes per parameter) of one run."""
    x, y = data(model_name, samples=samples)
    weights = start(model_name, seed)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        keras.utils.set_random_seed(seed)
        model = build(model_name)
        model.set_weights(weights)
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
    parser.add_argument("--epochs", type=int, default=2, help="passes over the samples")
    parser.add_argument("--samples", type=int, default=2048,
                        help="the training set's size; an epoch is samples / 32 steps")
    parser.add_argument("--model", choices=MODELS, default="mlp")
    parser.add_argument("--seeds", type=int, default=1, help="runs per row, averaged")
    parser.add_argument("--first-seed", type=int, default=0, help="the seeds' first")
    parser.add_argument("--runs", default=",".join(RUNS), metavar="IDS",
                        help=f"the runs, comma-separated, of {', '.join(RUNS)} (default: all)")
    args = parser.parse_args(argv)
    if args.samples < 32 or args.samples % 32:
        parser.error(f"--samples takes a multiple of 32. Received: {args.samples}")
    ids = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in ids if r not in RUNS]
    if unknown or not ids:
        parser.error(f"--runs takes ids of {list(RUNS)}. Received: {ids}")
    rows = []
    steps = args.epochs * args.samples // 32
    print(f"backend: {keras.backend.backend()}, {args.model}, {steps} steps, "
          f"{args.seeds} seed(s)")
    print(f"{'run':<42} {'final loss':>10} {'x mixed':>8} {'bytes/param':>12}")
    baseline = None
    for run_id in ([BASELINE] if BASELINE in ids else []) + [r for r in ids if r != BASELINE]:
        label, policy, optimizer_name, kwargs = RUNS[run_id]
        runs = [train(policy, optimizer_name, kwargs or {}, args.epochs, seed, args.model,
                      args.samples)
                for seed in range(args.first_seed, args.first_seed + args.seeds)]
        loss, per_parameter = float(np.mean([r[0] for r in runs])), runs[0][1]
        baseline = loss if run_id == BASELINE else baseline
        ratio = f"{loss / baseline:.3f}" if baseline else "-"
        rows.append((label, loss, per_parameter))
        print(f"{label:<42} {loss:>10.4f} {ratio:>8} {per_parameter:>12.2f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
