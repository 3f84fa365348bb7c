"""The `warmup` case: how long the first epoch waits for compiling, in fresh processes.

keras_adam compiles a whole variable's step on first use where its moments
are 8-bit codes or 16 bits, or where a 16-bit variable is written with
stochastic rounding (`keras_adam._whole`): on a CPU, its C loop (and on
TensorFlow the op that runs it), kept in keras_adam's cache directory;
else torch.compile on torch (Dynamo traces the function; Inductor writes
C++, compiles it and caches it on disk), an XLA cluster on TensorFlow, on
JAX the jitted training step. What
a user waits for is the first epoch. For float32 and each of
`fit.FORMATS`, the fit case's Transformer runs epochs of `fit.STEPS` steps
in fresh processes:

  cold    the first epoch of a new process, with empty compile caches (a new
          TORCHINDUCTOR_CACHE_DIR and KERAS_ADAM_CACHE_DIR)
  warm    the first epoch of a new process, with the caches the cold one
          left (a script run again)
  second  in the cold process, the first epoch of a second model of the
          same layers with a new optimizer (a search's next trial)
  later   that model's second epoch: the steady state

Seconds of wall clock, one run each: a compilation happens once per process
and cache, so it cannot be repeated in one. The float32 row is Keras's own
first-epoch cost (tracing its train function); the other rows add
keras_adam's compilations to it.

Run as a module, it is the child: `python -m keras_adam.benchmark.warmup
--variant NAME [--second]` prints its epochs' seconds as JSON.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from keras_adam.benchmark import fit

MODEL = "transformer"
VARIANTS = ("float32", *fit.FORMATS)


def run(backend, progress=print):
    """The case's rows: one per variant, its cold, warm, second and later epochs (s)."""
    rows = []
    for variant in VARIANTS:
        with tempfile.TemporaryDirectory() as cache:
            progress(f"    warmup: {variant}, a process with empty caches ...")
            cold = _child(backend, variant, cache, second=True)
            progress(f"    warmup: {variant}, a process with the caches it left ...")
            warm = _child(backend, variant, cache, second=False)
        rows.append({"variant": variant, "cold_s": cold["first"], "warm_s": warm["first"],
                     "second_s": cold["second"], "later_s": cold["later"]})
    return rows


def _child(backend, variant, cache, second):
    env = {**os.environ, "KERAS_BACKEND": backend, "TORCHINDUCTOR_CACHE_DIR": cache,
           "KERAS_ADAM_CACHE_DIR": os.path.join(cache, "keras_adam")}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    argv = [sys.executable, "-m", "keras_adam.benchmark.warmup", "--variant", variant]
    done = subprocess.run(argv + (["--second"] if second else []), env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the warmup case failed ({variant}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def epochs(variant, second=False):
    """{"first": s} of a new model's first epoch; with `second`, also a second
    model's first ("second") and second ("later") epochs, in this process."""
    import keras

    import keras_adam

    build, loss, x, y, batch, _ = fit._builders(keras)[MODEL]
    kwargs, policy = ({}, None) if variant == "float32" else fit.FORMATS[variant]

    def timed_epochs(count):
        model = fit._built(keras, build, policy)
        model.compile(optimizer=keras_adam.Adam(**kwargs), loss=loss)
        seconds = []
        for _ in range(count):
            start = time.perf_counter()
            model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=False)
            seconds.append(time.perf_counter() - start)
        return seconds

    result = {"first": timed_epochs(1)[0]}
    if second:
        result["second"], result["later"] = timed_epochs(2)
    return result


def format_rows(rows):
    lines = [
        f"First epochs ({fit.STEPS} steps of the fit case's {MODEL}, seconds, one run each): "
        "cold = a new process with empty compile caches; warm = a new process with the "
        "caches the cold one left; second = a second model and optimizer in the cold "
        "process; later = that model's second epoch:",
        "",
        "| variant | cold s | warm s | second s | later s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['cold_s']:.1f} | {r['warm_s']:.1f} "
                     f"| {r['second_s']:.1f} | {r['later_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description="The warmup case's child process.")
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--second", action="store_true")
    args = parser.parse_args(argv)
    print(json.dumps(epochs(args.variant, args.second)))


if __name__ == "__main__":
    main()
