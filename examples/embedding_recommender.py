"""A synthetic recommender with a million items: LazyAdam against keras.optimizers.Adam.

Run:  python examples/embedding_recommender.py

User and item embeddings (10,000 users, 1,000,000 items, 16 dimensions), a dot
product plus biases, fitted to synthetic ratings. On the TensorFlow backend an
Embedding's gradient is a tf.IndexedSlices holding only the rows in the batch:
keras_adam.LazyAdam updates just those rows, while keras.optimizers.Adam
densifies the gradient and updates all 16 million item parameters every step.
Prints the time per epoch and the final loss of each (the first epoch
includes tracing).
"""

import time

import keras
import numpy as np

import keras_adam

USERS, ITEMS, DIM = 10_000, 1_000_000, 16
SAMPLES, BATCH, EPOCHS = 16_384, 1024, 3


def build_model():
    user = keras.Input((), dtype="int32", name="user")
    item = keras.Input((), dtype="int32", name="item")
    user_vec = keras.layers.Embedding(USERS, DIM, name="user_embedding")(user)
    item_vec = keras.layers.Embedding(ITEMS, DIM, name="item_embedding")(item)
    item_bias = keras.layers.Embedding(ITEMS, 1, name="item_bias")(item)
    score = keras.layers.Dot(axes=1)([user_vec, item_vec])
    rating = keras.layers.Add()([score, keras.layers.Reshape((1,))(item_bias)])
    return keras.Model([user, item], rating)


class EpochTimer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.start)


def main():
    rng = np.random.default_rng(0)
    # Ratings from hidden low-rank factors, for the users and items sampled.
    users = rng.integers(0, USERS, SAMPLES).astype("int32")
    items = rng.integers(0, ITEMS, SAMPLES).astype("int32")
    user_factors = rng.normal(size=(USERS, 4)).astype("float32")
    item_factors = rng.normal(size=(SAMPLES, 4)).astype("float32")  # one per sample
    ratings = np.sum(user_factors[users] * item_factors, axis=1, keepdims=True) / 2

    keras.utils.set_random_seed(0)
    initial = build_model().get_weights()
    for label, optimizer in [
        ("keras_adam.LazyAdam", keras_adam.LazyAdam(learning_rate=0.01)),
        ("keras.optimizers.Adam", keras.optimizers.Adam(learning_rate=0.01)),
    ]:
        model = build_model()
        model.set_weights(initial)
        model.compile(optimizer=optimizer, loss="mse")
        timer = EpochTimer()
        history = model.fit([users, items], ratings, batch_size=BATCH, epochs=EPOCHS,
                            verbose=0, callbacks=[timer])
        per_epoch = ", ".join(f"{s:.2f}" for s in timer.seconds)
        loss = history.history["loss"][-1]
        print(f"{label:<22} seconds per epoch: {per_epoch}   final loss {loss:.4f}")


if __name__ == "__main__":
    main()
