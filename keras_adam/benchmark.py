"""Times one optimizer step of keras_adam.Adam beside keras.optimizers.Adam.

Run:  python -m keras_adam.benchmark [--cases large,many-small,mlp,embedding] [--repeats 15]
                                      [--xla both|off|on] [--backend tensorflow|jax|torch]
                                      [--intra-op-threads N] [--json]

Both optimizers run in the same process on the same variables' shapes, with
gradients precomputed, so only the update is timed, the way each backend's
trainer runs it: TensorFlow inside tf.function (with and without XLA), JAX
as jax.jit of stateless_apply with donated state, torch eagerly. Each repeat times a batch
of steps and reports milliseconds per step; the table gives the median and the
min-max range over repeats, the speed-up of keras_adam over the built-in
(ratio of medians), and the effective memory traffic against the bandwidth
measured on this machine in the same run.

Adam's roofline: per float32 parameter a step reads g, theta, m, v and writes
theta, m, v: 7 x 4 = 28 bytes. A step can be no faster than
28 * parameters / bandwidth (for lazy sparse updates: 28 bytes per element of
the rows in the gradient).

The "embedding" case (1,000,000 x 64 table, a tf.IndexedSlices gradient of
~1,000 rows) compares keras_adam's exact and lazy sparse modes.
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

BYTES_PER_PARAMETER = 28
CASES = {
    # name: list of variable shapes
    "large": [(2000, 2000)] * 4,
    "many-small": [(100, 200)] * 200,
    "mlp": [(784, 512), (512,), (512, 512), (512,), (512, 10), (10,)],
    # One embedding table; its gradient is a tf.IndexedSlices of ~1,000 rows.
    "embedding": [(1_000_000, 64)],
    # Not an optimizer step: the epoch-time cost of keras_adam.callbacks.AdamMonitor.
    "monitor": [],
}
EMBEDDING_ROWS = 1000
# The variants of keras_adam each case compares with the built-in.
VARIANTS = {
    "embedding": {"exact": {}, "lazy": {"sparse_updates": "lazy"}},
}
DEFAULT_VARIANTS = {"keras_adam": {}}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m keras_adam.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated subset of {list(CASES)}")
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats per measurement")
    parser.add_argument("--min-seconds", type=float, default=0.1,
                        help="each repeat runs enough steps to last about this long")
    parser.add_argument("--xla", choices=["both", "off", "on"], default="both")
    parser.add_argument("--backend", choices=["tensorflow", "jax", "torch"],
                        default=os.environ.get("KERAS_BACKEND", "tensorflow"),
                        help="Keras backend to benchmark (set before Keras is imported); "
                             "defaults to $KERAS_BACKEND, else tensorflow")
    parser.add_argument("--intra-op-threads", type=int, default=None, metavar="N",
                        help="TensorFlow only: tf.config.threading intra-op threads for the "
                             "whole run (default: TensorFlow's choice, one per core)")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args(argv)
    if args.intra_op_threads is not None:
        if args.backend != "tensorflow":
            parser.error("--intra-op-threads applies to --backend tensorflow only")
        if args.intra_op_threads < 1:
            parser.error(f"--intra-op-threads must be >= 1. Received: {args.intra_op_threads}")
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1. Received: {args.repeats}")
    return args


def progress(message):
    print(message, file=sys.stderr, flush=True)


def _calibrate(fn, min_seconds):
    """Calls per timed sample so that a sample lasts about `min_seconds`."""
    fn()  # trace / compile
    fn()
    start = time.perf_counter()
    fn()
    return max(1, int(min_seconds / max(time.perf_counter() - start, 1e-6)))


def _sample(fn, calls):
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def time_repeats(fn, repeats, min_seconds):
    """Milliseconds per call, one entry per repeat."""
    calls = _calibrate(fn, min_seconds)
    return [_sample(fn, calls) for _ in range(repeats)]


def time_interleaved(fns, repeats, min_seconds):
    """Like `time_repeats` for several functions, alternating them within each repeat.

    On a noisy machine, load that comes and goes then affects all of them alike
    rather than whichever happened to run during it; the order is reversed on
    every other repeat so neither always runs first.
    """
    calls = {name: _calibrate(fn, min_seconds) for name, fn in fns.items()}
    samples = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            samples[name].append(_sample(fns[name], calls[name]))
    return samples


class TensorFlowHarness:
    """Steps inside tf.function (with or without XLA), as model.fit runs them."""

    xla_modes = (False, True)
    sparse = True

    def __init__(self, intra_op_threads=None):
        import tensorflow as tf

        if intra_op_threads is not None:
            # Process-wide, and only possible before TensorFlow's runtime starts.
            tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
        # Read back, so the report shows what TensorFlow runs with (0: its default).
        self.intra_op_threads = tf.config.threading.get_intra_op_parallelism_threads()
        self.tf = tf

    def bandwidth(self, repeats, min_seconds):
        """GB/s of `a += b` on 64M-float32 (256 MiB) variables: reads 2, writes 1 array."""
        tf, n = self.tf, 64 * 1024 * 1024
        a, b = tf.Variable(tf.zeros(n)), tf.Variable(tf.ones(n))

        @tf.function
        def step():
            a.assign_add(b, read_value=False)

        return 3 * 4 * n / (statistics.median(time_repeats(step, repeats, min_seconds)) / 1e3) / 1e9

    def gradients(self, case, shapes):
        tf = self.tf
        if case == "embedding":
            rows, dim = shapes[0]
            indices = tf.random.uniform((EMBEDDING_ROWS,), 0, rows, dtype=tf.int64, seed=7)
            values = tf.random.normal((EMBEDDING_ROWS, dim), seed=8)
            return [tf.IndexedSlices(values, indices, tf.constant(shapes[0], tf.int64))]
        return [tf.random.normal(s, seed=100 + i) for i, s in enumerate(shapes)]

    def step(self, keras, optimizer, shapes, grads, xla):
        variables = [keras.Variable(self.tf.random.normal(s, seed=i)) for i, s in enumerate(shapes)]
        optimizer.build(variables)

        @self.tf.function(jit_compile=xla)
        def step():
            optimizer.apply(grads, variables)

        return step


class JaxHarness:
    """jax.jit of stateless_apply with donated state, as the JAX trainer runs it."""

    xla_modes = (True,)
    sparse = False

    def __init__(self):
        import jax

        self.jax = jax

    def bandwidth(self, repeats, min_seconds):
        jax, n = self.jax, 64 * 1024 * 1024
        add = jax.jit(lambda a, b: a + b, donate_argnums=0)
        state = {"a": jax.numpy.zeros(n), "b": jax.numpy.ones(n)}

        def step():
            state["a"] = add(state["a"], state["b"])
            state["a"].block_until_ready()

        return 3 * 4 * n / (statistics.median(time_repeats(step, repeats, min_seconds)) / 1e3) / 1e9

    def gradients(self, case, shapes):
        keys = self.jax.random.split(self.jax.random.key(100), len(shapes))
        return [self.jax.random.normal(k, s) for k, s in zip(keys, shapes)]

    def step(self, keras, optimizer, shapes, grads, xla):
        keys = self.jax.random.split(self.jax.random.key(0), len(shapes))
        variables = [keras.Variable(self.jax.random.normal(k, s)) for k, s in zip(keys, shapes)]
        optimizer.build(variables)
        apply = self.jax.jit(lambda t, o, g: optimizer.stateless_apply(o, g, t),
                             donate_argnums=(0, 1))
        state = {"t": [v.value for v in variables], "o": [v.value for v in optimizer.variables]}

        def step():
            state["t"], state["o"] = apply(state["t"], state["o"], grads)
            self.jax.block_until_ready(state["t"])

        return step


class TorchHarness:
    """Eager optimizer.apply, as Keras's torch trainer runs it."""

    xla_modes = (False,)
    sparse = False

    def __init__(self):
        import torch

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"

    def _sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def bandwidth(self, repeats, min_seconds):
        torch, n = self.torch, 64 * 1024 * 1024
        a = torch.zeros(n, device=self.device)
        b = torch.ones(n, device=self.device)

        def step():
            a.add_(b)
            self._sync()

        return 3 * 4 * n / (statistics.median(time_repeats(step, repeats, min_seconds)) / 1e3) / 1e9

    def gradients(self, case, shapes):
        gen = self.torch.Generator(device=self.device).manual_seed(100)
        return [self.torch.randn(s, generator=gen, device=self.device) for s in shapes]

    def step(self, keras, optimizer, shapes, grads, xla):
        gen = self.torch.Generator(device=self.device).manual_seed(0)
        variables = [keras.Variable(self.torch.randn(s, generator=gen, device=self.device))
                     for s in shapes]
        optimizer.build(variables)

        def step():
            # As Keras's torch trainer applies gradients: without autograd
            # recording (the trainable variables are Parameters).
            with self.torch.no_grad():
                optimizer.apply(grads, variables)
            self._sync()

        return step


HARNESSES = {"tensorflow": TensorFlowHarness, "jax": JaxHarness, "torch": TorchHarness}


def run(args):
    import keras

    import keras_adam

    if keras.backend.backend() != args.backend:
        raise RuntimeError(
            f"Keras runs on {keras.backend.backend()!r}, not {args.backend!r}: "
            "run through main(), which restarts with KERAS_BACKEND set"
        )

    options = {} if args.intra_op_threads is None else {"intra_op_threads": args.intra_op_threads}
    harness = HARNESSES[args.backend](**options)
    progress(f"backend {args.backend}; measuring memory bandwidth ...")
    bandwidth = harness.bandwidth(args.repeats, args.min_seconds)
    progress(f"  {bandwidth:.1f} GB/s")
    wanted = {"both": (False, True), "off": (False,), "on": (True,)}[args.xla]
    results, monitor = [], None
    for case in args.cases:
        if case == "monitor":
            progress("   monitor: AdamMonitor on the mlp model's epochs ...")
            monitor = monitor_overhead(keras, keras_adam, args.repeats)
            continue
        if case == "embedding" and not harness.sparse:
            progress(f"{case:>10}: skipped ({args.backend} has no sparse gradients)")
            continue
        shapes = CASES[case]
        params = sum(int(_prod(s)) for s in shapes)
        grads = harness.gradients(case, shapes)
        variants = VARIANTS.get(case, DEFAULT_VARIANTS)
        xla_modes = [x for x in harness.xla_modes if x in wanted]
        # The sparse case is about the default (non-XLA) path that model.fit
        # takes for embeddings on CPU; it runs without XLA only.
        if case == "embedding":
            xla_modes = [False]
        for xla in xla_modes:
            progress(f"{case:>10} xla={'on' if xla else 'off'} ...")
            steps = {name: harness.step(keras, keras_adam.Adam(**kwargs), shapes, grads, xla)
                     for name, kwargs in variants.items()}
            steps["builtin"] = harness.step(keras, keras.optimizers.Adam(), shapes, grads, xla)
            timings = time_interleaved(steps, args.repeats, args.min_seconds)
            builtin = statistics.median(timings["builtin"])
            for name, kwargs in variants.items():
                ours = statistics.median(timings[name])
                # Bytes the variant must move: the whole table, or for lazy
                # updates only the rows in the gradient.
                touched = params
                if kwargs.get("sparse_updates") == "lazy":
                    touched = EMBEDDING_ROWS * shapes[0][1]
                traffic = touched * BYTES_PER_PARAMETER
                gbps = traffic / (ours / 1e3) / 1e9
                results.append({
                    "case": case, "variant": name, "xla": xla, "parameters": params,
                    "variables": len(shapes),
                    "keras_adam_ms": _summary(timings[name]),
                    "builtin_ms": _summary(timings["builtin"]),
                    "speedup": builtin / ours,
                    "keras_adam_gb_per_s": gbps,
                    "fraction_of_bandwidth": gbps / bandwidth,
                    "roofline_ms": traffic / bandwidth / 1e6,
                })
    return {
        "backend": args.backend, "bandwidth_gb_per_s": bandwidth, "repeats": args.repeats,
        "cpus": os.cpu_count(), "intra_op_threads": getattr(harness, "intra_op_threads", None),
        "keras": keras.__version__,
        "framework": _framework_version(args.backend),
        "keras_adam": keras_adam.__version__, "results": results, "monitor": monitor,
    }


def monitor_overhead(keras, keras_adam, repeats):
    """Epoch time of the mlp case's model under model.fit, with and without AdamMonitor.

    Dense 784-512-512-10 on 4,096 synthetic samples, batch 128 (32 steps an
    epoch); epochs alternate between the two, one epoch each per repeat.
    """
    from keras_adam.callbacks import AdamMonitor

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4096, 784)).astype("float32")
    y = rng.integers(0, 10, size=4096)
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(512, activation="relu"),
                              keras.layers.Dense(512, activation="relu"), keras.layers.Dense(10)])
    model.compile(optimizer=keras_adam.Adam(),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=128, epochs=1, verbose=0)  # trace and build
    samples = {"without": [], "with": []}
    for r in range(repeats):
        for label in ("without", "with") if r % 2 == 0 else ("with", "without"):
            callbacks = [AdamMonitor()] if label == "with" else []
            start = time.perf_counter()
            model.fit(x, y, batch_size=128, epochs=1, verbose=0, callbacks=callbacks)
            samples[label].append((time.perf_counter() - start) * 1e3)
    without, with_ = (statistics.median(samples[k]) for k in ("without", "with"))
    return {"epoch_ms_without": _summary(samples["without"]),
            "epoch_ms_with": _summary(samples["with"]), "overhead": with_ / without - 1}


def _framework_version(backend):
    module = __import__(backend)
    return f"{backend} {module.__version__}"


def _prod(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def _summary(samples):
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def format_table(report):
    lines = [
        f"backend {report['backend']}, {report['cpus']} CPUs, keras {report['keras']}, "
        f"{report['framework']}; measured bandwidth "
        f"{report['bandwidth_gb_per_s']:.1f} GB/s; {report['repeats']} repeats"
        + (f"; intra-op threads {report['intra_op_threads']}"
           if report.get("intra_op_threads") else ""),
        "",
        "| case | variant | XLA | params | keras_adam ms (min-max) | built-in ms (min-max) "
        "| speed-up | keras_adam GB/s | % of bandwidth | roofline ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        ours, builtin = r["keras_adam_ms"], r["builtin_ms"]
        lines.append(
            f"| {r['case']} | {r['variant']} | {'on' if r['xla'] else 'off'} | {r['parameters']:,} "
            f"| {ours['median']:.2f} ({ours['min']:.2f}-{ours['max']:.2f}) "
            f"| {builtin['median']:.2f} ({builtin['min']:.2f}-{builtin['max']:.2f}) "
            f"| {r['speedup']:.2f}x | {r['keras_adam_gb_per_s']:.1f} "
            f"| {100 * r['fraction_of_bandwidth']:.0f}% | {r['roofline_ms']:.2f} |"
        )
    monitor = report.get("monitor")
    if monitor:
        w, wo = monitor["epoch_ms_with"], monitor["epoch_ms_without"]
        lines += ["", f"AdamMonitor on the mlp model (32 steps an epoch): epoch "
                  f"{wo['median']:.0f} ms ({wo['min']:.0f}-{wo['max']:.0f}) without, "
                  f"{w['median']:.0f} ms ({w['min']:.0f}-{w['max']:.0f}) with: "
                  f"overhead {100 * monitor['overhead']:+.1f}%"]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    import keras

    if keras.backend.backend() != args.backend:
        # `python -m keras_adam.benchmark` imports keras_adam, and so Keras,
        # before the arguments are read; the backend is fixed at that import.
        # Start again with KERAS_BACKEND set.
        env = {**os.environ, "KERAS_BACKEND": args.backend}
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        argv = sys.argv[1:] if argv is None else list(argv)
        os.execve(sys.executable, [sys.executable, "-m", "keras_adam.benchmark", *argv], env)
    report = run(args)
    print(json.dumps(report, indent=2) if args.json else format_table(report))


if __name__ == "__main__":
    main()
