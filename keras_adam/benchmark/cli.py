"""The command line, `python -m keras_adam.benchmark`: arguments, the backend launcher, output.

Keras fixes its backend when it is first imported, and `python -m
keras_adam.benchmark` imports keras_adam (so Keras) before the arguments are
read. When `--backend` names another backend, `main` starts the module again
in a fresh process with KERAS_BACKEND set.
"""

import argparse
import json
import os
import sys

from keras_adam.benchmark import cases
from keras_adam.benchmark import fit
from keras_adam.benchmark import report


def parse_args(argv=None):
    import keras_adam.benchmark as package

    parser = argparse.ArgumentParser(prog="python -m keras_adam.benchmark",
                                     description=package.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(cases.DEFAULT_NAMES),
                        help=f"comma-separated subset of {cases.NAMES} (default: all "
                             f"but {cases.WARMUP})")
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
    parser.add_argument("--devices", type=int, default=8, metavar="N",
                        help="the sharding case (JAX): devices of the data-parallel mesh; "
                             "without N real ones, N virtual CPU devices (default 8)")
    parser.add_argument("--moments-on", default="large", metavar="CASES",
                        help="the moments case: the step cases it times each moment_dtype "
                             "on, comma-separated (default: large)")
    parser.add_argument("--fit-models", default=",".join(fit.MODELS), metavar="MODELS",
                        help="the fit case: the models it times, comma-separated "
                             f"(default: {','.join(fit.MODELS)})")
    parser.add_argument("--c-loop", choices=["on", "off"], default="on",
                        help="off: the memory formats' steps take the compiled step function "
                             "instead of the C loop on a CPU (the comparison of "
                             "docs/precision.md; default on)")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="the results as JSON: printed instead of the table, or with "
                             "PATH written there (the table is still printed)")
    args = parser.parse_args(argv)
    if args.intra_op_threads is not None:
        if args.backend != "tensorflow":
            parser.error("--intra-op-threads applies to --backend tensorflow only")
        if args.intra_op_threads < 1:
            parser.error(f"--intra-op-threads must be >= 1. Received: {args.intra_op_threads}")
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in args.cases if c not in cases.NAMES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {cases.NAMES}")
    args.moments_on = [c.strip() for c in args.moments_on.split(",") if c.strip()]
    unknown = [c for c in args.moments_on if c not in cases.CASES]
    if unknown or not args.moments_on:
        parser.error(f"--moments-on takes cases of {list(cases.CASES)}. Received: "
                     f"{args.moments_on}")
    args.fit_models = [m.strip() for m in args.fit_models.split(",") if m.strip()]
    unknown = [m for m in args.fit_models if m not in fit.MODELS]
    if unknown or not args.fit_models:
        parser.error(f"--fit-models takes models of {list(fit.MODELS)}. Received: "
                     f"{args.fit_models}")
    if args.devices < 2:
        parser.error(f"--devices must be >= 2. Received: {args.devices}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1. Received: {args.repeats}")
    return args


def main(argv=None):
    args = parse_args(argv)
    import keras

    if keras.backend.backend() != args.backend:
        env = {**os.environ, "KERAS_BACKEND": args.backend}
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        argv = sys.argv[1:] if argv is None else list(argv)
        os.execve(sys.executable, [sys.executable, "-m", "keras_adam.benchmark", *argv], env)
    if args.c_loop == "off":
        from keras_adam import backends

        backends.use_c_loop(False)
    result = report.run(args)
    if args.json == "-":
        print(json.dumps(result, indent=2))
        return
    if args.json is not None:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        report.progress(f"results written to {args.json}")
    print(report.format_table(result))
