"""The epoch-time cost of `keras_adam.callbacks.AdamMonitor` (`--cases monitor`).

Not an optimizer step: whole `model.fit` epochs of the mlp case's model,
alternating with and without the callback.
"""

import statistics

import numpy as np

from keras_adam.benchmark import timing


def monitor_overhead(keras, keras_adam, repeats):
    """Epoch time of the mlp case's model under model.fit, with and without AdamMonitor.

    Dense 784-512-512-10 on 4,096 synthetic samples, batch 128 (32 steps an
    epoch); epochs alternate between the two, one epoch each per repeat. The
    same callback object is reused, as a user's would be across epochs.
    """
    from keras_adam.callbacks import AdamMonitor

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4096, 784)).astype("float32")
    y = rng.integers(0, 10, size=4096)
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(512, activation="relu"),
                              keras.layers.Dense(512, activation="relu"), keras.layers.Dense(10)])
    model.compile(optimizer=keras_adam.Adam(),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    def epoch(callbacks):
        return lambda: model.fit(x, y, batch_size=128, epochs=1, verbose=0, callbacks=callbacks)

    # min_seconds=0: one epoch per sample (after the harness's warm-up epochs).
    samples = timing.time_interleaved(
        {"without": epoch([]), "with": epoch([AdamMonitor()])}, repeats, min_seconds=0
    )
    without, with_ = (statistics.median(samples[k]) for k in ("without", "with"))
    return {"epoch_ms_without": timing.summary(samples["without"]),
            "epoch_ms_with": timing.summary(samples["with"]), "overhead": with_ / without - 1}
