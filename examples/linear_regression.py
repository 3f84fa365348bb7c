"""Fit y = X·w + b with keras_adam.Adam and print the learned weights beside the true ones.

Run:  python examples/linear_regression.py
Synthetic data, a single Dense(1) layer, a few seconds on a CPU.
"""

import keras
import numpy as np

import keras_adam


def main():
    rng = np.random.default_rng(0)
    true_w = np.array([0.5, -2.0, 3.0, 1.25], dtype="float32")
    true_b = -0.75
    x = rng.normal(size=(2048, true_w.size)).astype("float32")
    y = (x @ true_w + true_b + 0.01 * rng.normal(size=2048)).astype("float32")

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((true_w.size,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras_adam.Adam(learning_rate=0.05), loss="mse")
    history = model.fit(x, y, batch_size=64, epochs=15, verbose=0)

    kernel, bias = model.layers[0].get_weights()
    print(f"final loss: {history.history['loss'][-1]:.6f}")
    print(f"{'':>6}{'true':>10}{'learned':>10}")
    for i, w in enumerate(true_w):
        print(f"{'w' + str(i):>6}{w:>10.4f}{kernel[i, 0]:>10.4f}")
    print(f"{'b':>6}{true_b:>10.4f}{bias[0]:>10.4f}")
    return {"true": np.append(true_w, true_b), "learned": np.append(kernel[:, 0], bias[0])}


if __name__ == "__main__":
    main()
