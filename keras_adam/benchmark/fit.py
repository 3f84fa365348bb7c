"""The `fit` case: `model.fit` steps with keras_adam against `keras.optimizers.Adam`.

What a user feels is the whole training step, not the optimizer's part of
it. For four models a user would train, each optimizer's model runs whole
`model.fit` epochs of `STEPS` batches (after warm-up epochs), alternating
epoch by epoch in one process; ms per step is an epoch's time over `STEPS`.

The optimizer's share of a step is measured the same way, against a model
whose optimizer changes nothing (`NoUpdate` in `_no_update`: Keras's whole
apply pipeline, each gradient summed, no update): share = (step - step
without update) / step.
It is the time keras_adam's update adds to forward, backward and Keras's
own per-step work.

The models (synthetic data; the default `jit_compile="auto"`, which on a CPU
is XLA on JAX and none on TensorFlow and torch):
  mlp           the main example's Dense 3-64-64-1, batch 64
  cnn           Conv2D 16 and 32 (3x3) on 28x28x1 images, 10 classes, batch 64
  recommender   Embedding tables of 100,000 users and 50,000 items (dim 32),
                dot product, batch 256; TensorFlow gives it IndexedSlices
                gradients, so keras_adam runs it exact and lazy
  transformer   an encoder block (4-head attention over 32 tokens of width 64,
                feed-forward 128), vocabulary 2,000, batch 32

The recommender and the transformer are also timed with keras_adam's memory
formats (`FORMATS`): 8-bit moments, bfloat16 moments, and pure bfloat16
(the model built under the "bfloat16" dtype policy, its weights written with
stochastic rounding; its share is against a no-update model of the same
policy). Each is given as a ratio to keras_adam's float32 step too (lazy
on the recommender where its gradients are sparse).

The transformer is also timed with per-variable hyperparameters (`GROUPS`):
AdamW-style decoupled weight decay with three groups, as a fine-tuning
recipe sets them (the embedding at a tenth of the learning rate, no decay on
biases and LayerNorm), against the same decay without groups.
"""

import statistics

import numpy as np

from keras_adam import _sparse
from keras_adam.benchmark import timing

STEPS = 16
MODELS = ("mlp", "cnn", "recommender", "transformer")
# The models timed with the memory formats too, and the formats:
# {name: (keras_adam.Adam kwargs, dtype policy of the model or None)}.
FORMAT_MODELS = ("recommender", "transformer")
FORMATS = {
    "8bit moments": ({"moment_dtype": "8bit"}, None),
    "bfloat16 moments": ({"moment_dtype": "bfloat16"}, None),
    "pure bfloat16": ({}, "bfloat16"),
}
# The models timed with and without groups, and the two variants:
# {name: keras_adam.Adam kwargs}; the second's step is given over the first's.
GROUP_MODELS = ("transformer",)
DECAY = {"weight_decay": 0.01}
GROUPS = {
    "weight decay": DECAY,
    "weight decay, 3 groups": {**DECAY, "groups": {
        r".*embedding.*": {"learning_rate_multiplier": 0.1},
        r".*/(bias|gamma|beta)": {"weight_decay": 0.0}}},
}


def _builders(keras):
    """{model name: (build() -> uncompiled model, loss, x, y, batch size, whether its
    gradients are mostly embedding rows, for which keras_adam's lazy mode is timed too)}."""
    rng = np.random.default_rng(0)
    layers = keras.layers

    def mlp():
        return keras.Sequential([keras.Input((3,)), layers.Dense(64, activation="relu"),
                                 layers.Dense(64, activation="relu"), layers.Dense(1)])

    def cnn():
        return keras.Sequential([
            keras.Input((28, 28, 1)), layers.Conv2D(16, 3, activation="relu"),
            layers.MaxPooling2D(), layers.Conv2D(32, 3, activation="relu"),
            layers.GlobalAveragePooling2D(), layers.Dense(10)])

    def recommender():
        user, item = keras.Input((), dtype="int32"), keras.Input((), dtype="int32")
        u = layers.Embedding(100_000, 32)(user)
        i = layers.Embedding(50_000, 32)(item)
        return keras.Model([user, item], layers.Dot(axes=-1)([u, i]))

    def transformer():
        tokens = keras.Input((32,), dtype="int32")
        h = layers.Embedding(2_000, 64)(tokens)
        h = layers.LayerNormalization()(h + layers.MultiHeadAttention(4, 16)(h, h))
        ffn = layers.Dense(64)(layers.Dense(128, activation="relu")(h))
        h = layers.LayerNormalization()(h + ffn)
        return keras.Model(tokens, layers.Dense(2)(layers.GlobalAveragePooling1D()(h)))

    x_mlp = rng.normal(size=(64 * STEPS, 3)).astype("float32")
    ids = [rng.integers(0, n, size=256 * STEPS).astype("int32") for n in (100_000, 50_000)]
    sparse_ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return {
        "mlp": (mlp, "mse", x_mlp, (x_mlp @ [2.0, -1.0, 3.0] + 1.5).astype("float32"), 64,
                False),
        "cnn": (cnn, sparse_ce, rng.normal(size=(64 * STEPS, 28, 28, 1)).astype("float32"),
                rng.integers(0, 10, size=64 * STEPS), 64, False),
        "recommender": (recommender, "mse", ids,
                        rng.normal(size=256 * STEPS).astype("float32"), 256, True),
        "transformer": (transformer, sparse_ce,
                        rng.integers(0, 2_000, size=(32 * STEPS, 32)).astype("int32"),
                        rng.integers(0, 2, size=32 * STEPS), 32, False),
    }


def _no_update(keras):
    class NoUpdate(keras.optimizers.Optimizer):
        """Keras's apply pipeline, and every gradient summed, but no update.

        The sum keeps the backward pass: a gradient nobody reads would be
        pruned from the compiled step (tf.function, XLA), and the baseline
        would lose it. It reads each gradient once, 1/7 of Adam's memory
        traffic (see `cases`), so shares are understated by about that much
        of the update's time.
        """

        def build(self, variables):
            super().build(variables)
            self._sink = self.add_variable((), name="sink")

        def update_step(self, gradient, variable, learning_rate):
            # A tf.IndexedSlices: sum its rows.
            values = gradient.values if _sparse.is_sparse(gradient) else gradient
            self._sink.assign_add(keras.ops.cast(keras.ops.sum(values), self._sink.dtype))

    return NoUpdate(learning_rate=0.0)


def variants(keras, keras_adam, sparse, formats=False, groups=False):
    """{name: (() -> optimizer, the model's dtype policy or None)}: keras_adam (exact
    and lazy where gradients are sparse), its memory `FORMATS` if `formats`
    (lazy where gradients are sparse), its `GROUPS` variants if `groups`, the
    built-in, and the no-update baselines."""
    default = {"sparse_updates": "lazy"} if sparse else {}
    found = {"keras_adam": (lambda: keras_adam.Adam(), None)}
    if sparse:
        found = {"keras_adam exact": (lambda: keras_adam.Adam(), None),
                 "keras_adam lazy": (lambda: keras_adam.Adam(**default), None)}
    for name, (kwargs, policy) in (FORMATS.items() if formats else ()):
        label = f"keras_adam{' lazy' if sparse else ''}, {name}"
        found[label] = (lambda kw={**default, **kwargs}: keras_adam.Adam(**kw), policy)
    for name, kwargs in (GROUPS.items() if groups else ()):
        label = f"keras_adam{' lazy' if sparse else ''}, {name}"
        found[label] = (lambda kw={**default, **kwargs}: keras_adam.Adam(**kw), None)
    found["builtin"] = (lambda: keras.optimizers.Adam(), None)
    for policy in sorted({policy for _, policy in found.values() if policy}):
        found[f"no update, {policy}"] = (lambda: _no_update(keras), policy)
    found["no update"] = (lambda: _no_update(keras), None)
    return found


def _built(keras, build, policy):
    """The model of `build`, under dtype `policy` if given (the global policy restored)."""
    if policy is None:
        return build()
    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        return build()
    finally:
        keras.config.set_dtype_policy(before)


def fit_steps(keras, keras_adam, repeats, names=MODELS, sparse=False, progress=print,
              group_models=GROUP_MODELS):
    """One row per model and keras_adam variant: ms per fit step against the built-in's
    (and, for the memory formats, against keras_adam's float32 step; for the
    groups, against the same decay without groups)."""
    builders = _builders(keras)
    rows = []
    for name in names:
        build, loss, x, y, batch, embedding_rows = builders[name]
        epochs, policies = {}, {}
        found = variants(keras, keras_adam, sparse and embedding_rows, name in FORMAT_MODELS,
                         name in group_models)
        for variant, (make, policy) in found.items():
            keras.utils.set_random_seed(0)
            model = _built(keras, build, policy)
            model.compile(optimizer=make(), loss=loss)
            epochs[variant], policies[variant] = (
                lambda m=model: m.fit(x, y, batch_size=batch, epochs=1, shuffle=False,
                                      verbose=0)), policy
        progress(f"{'fit':>10} {name} ...")
        # min_seconds=0: one epoch of STEPS steps per sample, after two warm-up epochs.
        samples = timing.time_interleaved(epochs, repeats, min_seconds=0)
        per_step = {v: [ms / STEPS for ms in s] for v, s in samples.items()}
        medians = {v: statistics.median(s) for v, s in per_step.items()}
        float32 = medians["keras_adam lazy" if "keras_adam lazy" in medians else "keras_adam"]
        for variant, policy in policies.items():
            if variant == "builtin" or variant.startswith("no update"):
                continue
            ours, bare = medians[variant], medians[_bare(policy)]
            base = _base(variant, float32, medians)
            rows.append({
                "model": name, "variant": variant,
                "keras_adam_ms": timing.summary(per_step[variant]),
                "builtin_ms": timing.summary(per_step["builtin"]),
                "no_update_ms": timing.summary(per_step[_bare(policy)]),
                "speedup": medians["builtin"] / ours,
                "vs_base": None if base is None else ours / base,
                "keras_adam_share": (ours - bare) / ours,
                "builtin_share": (medians["builtin"] - medians["no update"]) / medians["builtin"],
            })
    return rows


def _base(variant, float32, medians):
    """The step a variant's is compared with: keras_adam's float32 step for a memory
    format, the same decay without groups for groups, None for the others."""
    kind = variant.split(", ", 1)[-1]
    if kind in FORMATS:
        return float32
    if kind in GROUPS and kind != next(iter(GROUPS)):
        return medians[variant.replace(kind, next(iter(GROUPS)))]
    return None


def _bare(policy):
    return "no update" if policy is None else f"no update, {policy}"


def format_rows(rows):
    lines = [
        f"model.fit steps ({STEPS} per epoch, medians over epochs; share = the optimizer's "
        "part of a step, against a no-update optimizer; vs base = a memory format's "
        "step over keras_adam's float32 step, and groups' over the same decay without "
        "groups):",
        "",
        "| model | variant | keras_adam ms/step (min-max) | built-in ms/step (min-max) "
        "| speed-up | vs base | keras_adam share | built-in share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ours, builtin = r["keras_adam_ms"], r["builtin_ms"]
        vs = "-" if r["vs_base"] is None else f"{r['vs_base']:.2f}x"
        lines.append(
            f"| {r['model']} | {r['variant']} "
            f"| {ours['median']:.2f} ({ours['min']:.2f}-{ours['max']:.2f}) "
            f"| {builtin['median']:.2f} ({builtin['min']:.2f}-{builtin['max']:.2f}) "
            f"| {r['speedup']:.2f}x | {vs} | {100 * r['keras_adam_share']:.0f}% "
            f"| {100 * r['builtin_share']:.0f}% |")
    return "\n".join(lines)
