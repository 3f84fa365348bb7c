"""A PyTorch recipe with param groups, ported to keras_adam's `groups`, with the same numbers.

Run:  python examples/param_groups.py

The recipe, as a PyTorch user writes it for fine-tuning:

    no_decay = biases and LayerNorm weights
    torch.optim.AdamW([
        {"params": backbone_decay,    "lr": 1e-4, "weight_decay": 0.01},
        {"params": backbone_no_decay, "lr": 1e-4, "weight_decay": 0.0},
        {"params": head_decay,        "weight_decay": 0.01},
        {"params": head_no_decay,     "weight_decay": 0.0},
    ], lr=1e-3, eps=1e-8)

In keras_adam it is one optimizer with one step counter: patterns matched
in full against each variable's path, the first match winning, so the more
specific pattern comes first. torch's `eps` is Algorithm 1's epsilon:
`epsilon_placement="paper"`.

The script trains the same model (Dense -> LayerNormalization -> ReLU ->
Dense) from the same weights on the same batches, with keras_adam on the
active Keras backend and, if torch is installed, with torch.optim.AdamW; it
prints both final losses and the largest difference between the weights.
"""

import keras
import numpy as np

import keras_adam

GROUPS = {
    r".*backbone_.*/(bias|gamma|beta)": {"learning_rate_multiplier": 0.1, "weight_decay": 0.0},
    r".*backbone_.*": {"learning_rate_multiplier": 0.1},
    r".*/(bias|gamma|beta)": {"weight_decay": 0.0},
}
LR, WEIGHT_DECAY, EPS = 1e-3, 0.01, 1e-8
STEPS, BATCH = 200, 32


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS * BATCH, 8)).astype("float32")
    y = np.sin(x @ rng.normal(size=(8, 1))).astype("float32")
    return x, y


def build_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, name="backbone_dense"),
        keras.layers.LayerNormalization(name="backbone_norm"),
        keras.layers.ReLU(),
        keras.layers.Dense(1, name="head"),
    ])


def train_keras(x, y):
    model = build_model()
    initial = [w.copy() for w in model.get_weights()]
    optimizer = keras_adam.AdamW(learning_rate=LR, weight_decay=WEIGHT_DECAY, epsilon=EPS,
                                 epsilon_placement="paper", groups=GROUPS)
    model.compile(optimizer=optimizer, loss="mse")
    history = model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    print(optimizer.update_plan())
    return initial, model.get_weights(), history.history["loss"][-1]


def train_torch(initial, x, y):
    """The same model and recipe in PyTorch; None if torch is not installed."""
    try:
        import torch
    except ImportError:
        return None
    w1, b1, gamma, beta, w2, b2 = (torch.tensor(w, requires_grad=True) for w in initial)
    optimizer = torch.optim.AdamW([
        {"params": [w1], "lr": LR * 0.1, "weight_decay": WEIGHT_DECAY},
        {"params": [b1, gamma, beta], "lr": LR * 0.1, "weight_decay": 0.0},
        {"params": [w2], "weight_decay": WEIGHT_DECAY},
        {"params": [b2], "weight_decay": 0.0},
    ], lr=LR, eps=EPS)
    losses = []
    for step in range(STEPS):
        xb = torch.tensor(x[step * BATCH:(step + 1) * BATCH])
        yb = torch.tensor(y[step * BATCH:(step + 1) * BATCH])
        h = torch.nn.functional.layer_norm(xb @ w1 + b1, (16,), gamma, beta, eps=1e-3)
        loss = torch.mean((torch.relu(h) @ w2 + b2 - yb) ** 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    weights = [w.detach().numpy() for w in (w1, b1, gamma, beta, w2, b2)]
    # Keras reports the mean loss over the epoch.
    return weights, float(np.mean(losses))


def main():
    x, y = data()
    initial, ours, loss = train_keras(x, y)
    print(f"keras_adam.AdamW with groups  mean loss {loss:.6f}")
    result = train_torch(initial, x, y)
    if result is None:
        print("torch is not installed: no comparison")
        return {"keras_adam": loss}
    weights, torch_loss = result
    difference = max(float(np.max(np.abs(a - b))) for a, b in zip(ours, weights))
    print(f"torch.optim.AdamW param groups mean loss {torch_loss:.6f}")
    print(f"largest weight difference: {difference:.2e}")
    return {"keras_adam": loss, "torch": torch_loss, "max_weight_difference": difference}


if __name__ == "__main__":
    main()
