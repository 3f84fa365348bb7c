"""Adam against SGD on a bumpy 1-D function with noisy gradients.

Run:  python examples/playground.py [--start 4] [--steps 200] [--noise 0.5] [--adam-lr 0.1]
                                    [--sgd-lr 0.1] [--beta-1 0.9] [--beta-2 0.999] [--seed 0]
                                    [--output playground.png]

Minimises f(x) = 0.2 x^2 + 0.6 sin(1.5 x) from `--start`, where each step sees
f'(x) plus Gaussian noise of scale `--noise`. Three runs share one noise
sequence: keras_adam.Adam with bias correction, keras_adam.Adam without it,
and keras.optimizers.SGD. It prints a table (final x, distance to the
minimum, mean |step| over the first 10 steps) and, if matplotlib is installed
(`pip install -e .[examples]`), writes a PNG with the trajectories, the step
sizes, and Adam's m_hat and v_hat over time.

What to look for: Adam's steps start at about lr whatever the gradient's size
(bias correction on), or at (1 - beta_1)/sqrt(1 - beta_2) * lr = 3.2 lr with
the default betas when it is off; they shrink as m_hat / sqrt(v_hat) falls
near the minimum, where the noise dominates the signal (automatic annealing).
SGD's steps follow the gradient's size instead.
"""

import argparse

import keras
import numpy as np

import keras_adam


def f(x):
    return 0.2 * x**2 + 0.6 * np.sin(1.5 * x)


def f_prime(x):
    return 0.4 * x + 0.9 * np.cos(1.5 * x)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--start", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--noise", type=float, default=0.5, help="gradient noise scale")
    parser.add_argument("--adam-lr", type=float, default=0.1)
    parser.add_argument("--sgd-lr", type=float, default=0.1)
    parser.add_argument("--beta-1", type=float, default=0.9)
    parser.add_argument("--beta-2", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="playground.png", help="where to write the PNG")
    args = parser.parse_args(argv)
    if args.steps < 10:
        parser.error(f"--steps must be at least 10. Received: {args.steps}")
    if args.noise < 0:
        parser.error(f"--noise must be >= 0. Received: {args.noise}")
    return args


def run(optimizer, start, noise):
    """x after each step, and for Adam its m_hat and v_hat after each step."""
    x = keras.Variable(np.array([start], "float32"))
    xs, m_hats, v_hats = [start], [], []
    for t, n in enumerate(noise, start=1):
        g = f_prime(float(xs[-1])) + n
        optimizer.apply([keras.ops.convert_to_tensor(np.array([g], "float32"))], [x])
        xs.append(float(keras.ops.convert_to_numpy(x)[0]))
        if isinstance(optimizer, keras_adam.Adam):
            m, v, _ = optimizer.slots(x)
            c1 = 1 - optimizer.beta_1**t if optimizer.bias_correction else 1.0
            c2 = 1 - optimizer.beta_2**t if optimizer.bias_correction else 1.0
            m_hats.append(float(keras.ops.convert_to_numpy(m)[0]) / c1)
            v_hats.append(float(keras.ops.convert_to_numpy(v)[0]) / c2)
    return np.array(xs), np.array(m_hats), np.array(v_hats)


def main(argv=None):
    args = parse_args(argv)
    grid = np.linspace(-10, 10, 200_001)
    minimum = grid[np.argmin(f(grid))]  # the global minimum, to 1e-4
    noise = np.random.default_rng(args.seed).normal(scale=args.noise, size=args.steps)

    adam = dict(learning_rate=args.adam_lr, beta_1=args.beta_1, beta_2=args.beta_2)
    runs = {
        "Adam (bias correction)": run(keras_adam.Adam(**adam), args.start, noise),
        "Adam (no bias correction)": run(
            keras_adam.Adam(bias_correction=False, **adam), args.start, noise),
        "SGD": run(keras.optimizers.SGD(learning_rate=args.sgd_lr), args.start, noise),
    }

    print(f"f(x) = 0.2 x^2 + 0.6 sin(1.5 x); minimum near x = {minimum:.4f}; start {args.start}, "
          f"{args.steps} steps, gradient noise {args.noise}")
    print(f"{'optimizer':<28}{'final x':>10}{'|x - min|':>12}{'mean |step|, steps 1-10':>26}")
    for label, (xs, _, _) in runs.items():
        early = np.mean(np.abs(np.diff(xs[:11])))
        print(f"{label:<28}{xs[-1]:>10.4f}{abs(xs[-1] - minimum):>12.4f}{early:>26.4f}")
    print(f"(Adam's first step is lr = {args.adam_lr} with bias correction, and "
          f"(1 - beta_1)/sqrt(1 - beta_2) lr = "
          f"{(1 - args.beta_1) / np.sqrt(1 - args.beta_2) * args.adam_lr:.3f} without.)")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: `pip install -e .[examples]` to get the plot.")
        return runs

    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    for label, (xs, _, _) in runs.items():
        axes[0].plot(xs, label=label)
        axes[1].semilogy(np.maximum(np.abs(np.diff(xs)), 1e-6), label=label)
    axes[0].axhline(minimum, color="k", linestyle=":", label="minimum")
    axes[0].set_ylabel("x")
    axes[0].legend()
    axes[1].set_ylabel("|step|")
    axes[1].axhline(args.adam_lr, color="gray", linestyle=":", label="Adam lr")
    axes[1].legend()
    _, m_hat, v_hat = runs["Adam (bias correction)"]
    axes[2].plot(np.arange(1, len(m_hat) + 1), m_hat, label="m_hat")
    axes[2].plot(np.arange(1, len(v_hat) + 1), np.sqrt(v_hat), label="sqrt(v_hat)")
    axes[2].set_ylabel("Adam (bias correction)")
    axes[2].set_xlabel("step")
    axes[2].legend()
    fig.suptitle("f(x) = 0.2 x² + 0.6 sin(1.5 x), noisy gradients")
    fig.tight_layout()
    fig.savefig(args.output, dpi=90)
    print(f"wrote {args.output}")
    return runs


if __name__ == "__main__":
    main()
