"""Trains with keras.callbacks.BackupAndRestore; optionally pauses mid-epoch to be killed.

Not a test file: tests/test_preemption.py runs it as real subprocesses.

    python preemption_run.py BACKUP_DIR OUT.npz [PAUSE_EPOCH PAUSE_BATCH MARKER]

With the pause arguments, after that batch it writes MARKER and sleeps until
the test kills it with SIGKILL. Without them it trains to the end (resuming
from BACKUP_DIR if a backup is there) and saves the weights and every
optimizer variable to OUT.npz.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_adam  # noqa: E402

EPOCHS, BATCH = 4, 16


class PauseToBeKilled(keras.callbacks.Callback):
    def __init__(self, epoch, batch, marker):
        super().__init__()
        self.epoch, self.batch, self.marker, self.current = epoch, batch, marker, None

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.current, batch) == (self.epoch, self.batch):
            with open(self.marker, "w") as f:
                f.write(f"{self.current} {batch}")
            while True:  # the parent sends SIGKILL
                time.sleep(1)


def main():
    backup_dir, out = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(160, 4)).astype("float32")
    y = np.tanh(x @ rng.normal(size=(4, 1))).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(1)])
    init = np.random.default_rng(1)
    model.set_weights([init.normal(scale=0.5, size=w.shape).astype("float32")
                       for w in model.get_weights()])
    schedule = keras.optimizers.schedules.ExponentialDecay(1e-2, decay_steps=7, decay_rate=0.7)
    model.compile(optimizer=keras_adam.Adam(learning_rate=schedule, amsgrad=True), loss="mse")

    # save_freq="epoch": Keras restores the epoch but not the batch, so a
    # mid-epoch backup would replay that epoch's first batches. Resuming from
    # the last epoch-end backup and replaying the whole interrupted epoch (in
    # the same order: shuffle=False) is exact.
    callbacks = [keras.callbacks.BackupAndRestore(backup_dir, save_freq="epoch")]
    if len(sys.argv) > 3:
        callbacks.append(PauseToBeKilled(int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]))
    epochs_run = []
    callbacks.append(keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: epochs_run.append(epoch)))
    model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0,
              callbacks=callbacks)
    np.savez(out, *model.get_weights(), *[v.numpy() for v in model.optimizer.variables],
             epochs_run=np.array(epochs_run))


if __name__ == "__main__":
    main()
