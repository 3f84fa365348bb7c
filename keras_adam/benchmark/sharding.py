"""The `sharding` case: `shard_state=True` against whole state, on N devices (JAX).

`model.fit`-style steps (`train_on_batch`) of an MLP under
`keras.distribution.DataParallel`, with keras_adam's state whole on every
device and sharded across them, in one process:

  - optimizer-state bytes per device, summed over the slots' addressable
    shards (what each device holds), and in all;
  - ms per step, interleaved, after warm-up;
  - the collectives in the compiled train step, counted in XLA's optimized
    HLO (from a compile of each variant in a process of its own, with
    XLA's dump turned on).

JAX fixes its device count when it is imported, so the case runs in a
subprocess (`python -m keras_adam.benchmark.sharding`); without enough real
devices it asks XLA for N virtual CPU devices, which share the machine's
cores: the step times then say what the sharding costs in work, not what a
real interconnect costs.
"""

import argparse
import glob
import json
import math
import os
import re
import subprocess
import sys
import tempfile

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")


def run_in_subprocess(devices, repeats, min_seconds, width=1024):
    """The case's result (a dict), measured in fresh processes with `devices` devices."""
    result = json.loads(_child(devices, ["--repeats", str(repeats), "--min-seconds",
                                         str(min_seconds), "--width", str(width)]))
    for variant in ("whole", "sharded"):
        with tempfile.TemporaryDirectory() as dump:
            _child(devices, ["--compile-only", variant, "--width", str(width)],
                   f"--xla_dump_to={dump}")
            result[variant]["collectives"] = count_collectives(dump)
    return result


def _child(devices, argv, extra_flags=""):
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "2",
           "XLA_FLAGS": " ".join(filter(None, [
               os.environ.get("XLA_FLAGS", ""),
               f"--xla_force_host_platform_device_count={devices}", extra_flags]))}
    done = subprocess.run(
        [sys.executable, "-m", "keras_adam.benchmark.sharding", "--devices", str(devices), *argv],
        env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the sharding case failed:\n{done.stderr[-3000:]}")
    return done.stdout


def count_collectives(dump_dir):
    """{collective: count} in the optimized HLO of the compiled train step."""
    files = glob.glob(os.path.join(dump_dir, "*train_step*after_optimizations.txt"))
    if not files:
        raise RuntimeError(f"no train step HLO was dumped in {dump_dir}")
    text = open(max(files, key=os.path.getsize)).read()
    # An op appears as `= <type> all-gather(` (or `all-gather-start(` when async).
    return {op: len(re.findall(rf" {op}(?:-start)?\(", text)) for op in COLLECTIVES}


def _model(keras, keras_adam, width, shard):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((width,))] + [
        keras.layers.Dense(width, activation="relu") for _ in range(3)] + [keras.layers.Dense(1)])
    model.compile(keras_adam.Adam(shard_state=shard), "mse")
    return model


def _state_bytes(model):
    """(bytes on device 0, bytes in all) of the optimizer's m, v, v_max."""
    device = total = 0
    for variable in model.trainable_variables:
        for slot in model.optimizer.slots(variable):
            if slot is not None:
                device += slot.value.addressable_shards[0].data.nbytes
                total += slot.value.nbytes
    return device, total


def _measure(args):
    import jax
    import keras
    import numpy as np

    import keras_adam
    from keras_adam.benchmark import timing

    devices = jax.devices()[:args.devices]
    if len(devices) < args.devices:
        raise RuntimeError(f"{args.devices} devices asked for, {len(devices)} found")
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    batch = 8 * args.devices
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, args.width)).astype("float32")
    y = rng.normal(size=(batch, 1)).astype("float32")
    variants = ["whole", "sharded"] if args.compile_only is None else [args.compile_only]
    models = {v: _model(keras, keras_adam, args.width, v == "sharded") for v in variants}
    for model in models.values():
        model.train_on_batch(x, y)  # compiles
    if args.compile_only is not None:
        return {}
    steps = {v: (lambda m=m: m.train_on_batch(x, y)) for v, m in models.items()}
    timings = timing.time_interleaved(steps, args.repeats, args.min_seconds)
    result = {"devices": args.devices, "device_kind": devices[0].device_kind,
              "parameters": sum(math.prod(v.shape) for v in models["whole"].trainable_weights),
              "batch": batch}
    for v, model in models.items():
        device, total = _state_bytes(model)
        result[v] = {"state_bytes_per_device": device, "state_bytes": total,
                     "step_ms": timing.summary(timings[v])}
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m keras_adam.benchmark.sharding")
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--min-seconds", type=float, default=0.1)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--compile-only", choices=["whole", "sharded"], default=None)
    print(json.dumps(_measure(parser.parse_args(argv))))


if __name__ == "__main__":
    main()
