"""Times one optimizer step of keras_adam.Adam beside keras.optimizers.Adam.

Run:  python -m keras_adam.benchmark [--cases large,many-small,mlp] [--repeats 15]
                                      [--xla both|off|on] [--backend tensorflow] [--json]

Both optimizers run in the same process on the same variables' shapes, with
gradients precomputed, so only the update is timed. Each repeat times a batch
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

BYTES_PER_PARAMETER = 28
CASES = {
    # name: list of variable shapes
    "large": [(2000, 2000)] * 4,
    "many-small": [(100, 200)] * 200,
    "mlp": [(784, 512), (512,), (512, 512), (512,), (512, 10), (10,)],
    # One embedding table; its gradient is a tf.IndexedSlices of ~1,000 rows.
    "embedding": [(1_000_000, 64)],
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
    parser.add_argument("--backend", choices=["tensorflow"], default="tensorflow",
                        help="Keras backend to benchmark (set before Keras is imported)")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args(argv)
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


def measure_bandwidth(tf, repeats, min_seconds):
    """GB/s of `a += b` on 64M-float32 (256 MiB) variables: reads 2, writes 1 array."""
    n = 64 * 1024 * 1024
    a = tf.Variable(tf.zeros(n))
    b = tf.Variable(tf.ones(n))
    @tf.function
    def step():
        a.assign_add(b, read_value=False)

    ms = statistics.median(time_repeats(step, repeats, min_seconds))
    return 3 * 4 * n / (ms / 1e3) / 1e9


def gradients(tf, case, shapes):
    """Precomputed gradients: dense, or for "embedding" ~1,000 random rows (repeats included)."""
    if case == "embedding":
        rows, dim = shapes[0]
        indices = tf.random.uniform((EMBEDDING_ROWS,), 0, rows, dtype=tf.int64, seed=7)
        values = tf.random.normal((EMBEDDING_ROWS, dim), seed=8)
        return [tf.IndexedSlices(values, indices, tf.constant(shapes[0], tf.int64))]
    return [tf.random.normal(s, seed=100 + i) for i, s in enumerate(shapes)]


def optimizer_step(tf, keras, optimizer, shapes, grads, jit_compile):
    """A compiled function applying one step of `optimizer` to fresh variables."""
    variables = [keras.Variable(tf.random.normal(s, seed=i)) for i, s in enumerate(shapes)]
    optimizer.build(variables)

    @tf.function(jit_compile=jit_compile)
    def step():
        optimizer.apply(grads, variables)

    return step


def run(args):
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    import keras_adam

    progress("measuring memory bandwidth ...")
    bandwidth = measure_bandwidth(tf, args.repeats, args.min_seconds)
    progress(f"  {bandwidth:.1f} GB/s")
    xla_modes = {"both": [False, True], "off": [False], "on": [True]}[args.xla]
    results = []
    for case in args.cases:
        shapes = CASES[case]
        params = sum(int(_prod(s)) for s in shapes)
        grads = gradients(tf, case, shapes)
        variants = VARIANTS.get(case, DEFAULT_VARIANTS)
        # The sparse case is about the default (non-XLA) path that model.fit
        # takes for embeddings on CPU; it runs without XLA only.
        for xla in xla_modes if case != "embedding" else [False]:
            progress(f"{case:>10} xla={'on' if xla else 'off'} ...")
            steps = {name: optimizer_step(tf, keras, keras_adam.Adam(**kwargs), shapes, grads, xla)
                     for name, kwargs in variants.items()}
            steps["builtin"] = optimizer_step(
                tf, keras, keras.optimizers.Adam(), shapes, grads, xla)
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
        "cpus": os.cpu_count(), "keras": keras.__version__, "tensorflow": tf.__version__,
        "keras_adam": keras_adam.__version__, "results": results,
    }


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
        f"tensorflow {report['tensorflow']}; measured bandwidth "
        f"{report['bandwidth_gb_per_s']:.1f} GB/s; {report['repeats']} repeats",
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
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    report = run(args)
    print(json.dumps(report, indent=2) if args.json else format_table(report))


if __name__ == "__main__":
    main()
