"""Train the same MLP with keras_adam.Adam and keras.optimizers.Adam; print both final losses.

Run:  python examples/mlp_regression.py
Target y = X·[2, -1, 3] + 1.5 on 3 features; two Dense(64, relu) layers and
one output. Both runs start from the same weights and see the same batches,
so with default options the two losses differ only by float32 rounding, grown
wherever a ReLU unit crosses its kink in one run and not the other (measured:
1e-5 relative on TensorFlow, up to 2e-4 on torch).
"""

import keras
import numpy as np

import keras_adam


def build_model():
    return keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(1),
    ])


def main():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4096, 3)).astype("float32")
    y = (x @ np.array([2.0, -1.0, 3.0]) + 1.5).astype("float32")[:, None]

    keras.utils.set_random_seed(0)
    initial = build_model().get_weights()
    losses = {}
    for label, optimizer in [
        ("keras_adam.Adam", keras_adam.Adam(learning_rate=1e-3)),
        ("keras.optimizers.Adam", keras.optimizers.Adam(learning_rate=1e-3)),
    ]:
        model = build_model()
        model.set_weights(initial)
        model.compile(optimizer=optimizer, loss="mse")
        history = model.fit(x, y, batch_size=64, epochs=10, shuffle=False, verbose=0)
        losses[label] = history.history["loss"][-1]

    for label, loss in losses.items():
        print(f"{label:<24} final loss {loss:.6e}")
    a, b = losses.values()
    print(f"relative difference: {abs(a - b) / b:.2e}")
    return losses


if __name__ == "__main__":
    main()
