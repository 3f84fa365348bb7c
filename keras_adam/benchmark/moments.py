"""Optimizer state in float32, bfloat16 and 8 bits: bytes per parameter and step time.

`python -m keras_adam.benchmark --cases moments`.

On the large case's shapes (four 2000 x 2000 variables), one keras_adam step
per stored format, and one of pure bfloat16 training (bfloat16 variables and
moments, the variables written with stochastic rounding), timed interleaved
with float32 moments in the same run,
the way the backend's trainer runs it (`harnesses`), with and without XLA
where the backend has both. The state bytes are measured from the
optimizer's variables (every one but the step counter and the learning
rate): 8 per parameter for float32 m and v, 4 for bfloat16, and for 8 bits
one byte per code plus one float32 scale per block of 256: 2 + 8/256.
"""

import math
import statistics

from keras_adam.benchmark import cases as case_table
from keras_adam.benchmark import timing

# name: (moment_dtype, the variables' and gradients' dtype). "pure bfloat16" is
# bfloat16 variables (written with stochastic rounding, the default) and their
# default moments (bfloat16): the whole step of pure bfloat16 training.
FORMATS = {"float32": (None, "float32"), "bfloat16": ("bfloat16", "float32"),
           "8bit": ("8bit", "float32"), "pure bfloat16": (None, "bfloat16")}


def variable_bytes(keras, variable):
    """The bytes a Keras variable holds."""
    import numpy as np

    itemsize = np.dtype(keras.backend.standardize_dtype(variable.dtype)).itemsize
    return math.prod(variable.shape) * itemsize


def state_bytes(keras, optimizer):
    """Bytes of every optimizer variable but the step counter and the learning rate."""
    # Keras names those two "iteration" and "learning_rate" (public variable names).
    skip = {"iteration", "learning_rate"}
    return sum(variable_bytes(keras, v) for v in optimizer.variables if v.name not in skip)


def moment_formats(keras, keras_adam, harness, xla_modes, repeats, min_seconds, progress,
                   case=None):
    """One row per (XLA mode, format): bytes per parameter and ms per step vs float32.

    `case` defaults to the large case (`cases.CASES["large"]`).
    """
    case = case or case_table.CASES["large"]
    grads = harness.gradients(case)
    rows = []
    for xla in xla_modes:
        progress(f"   moments xla={'on' if xla else 'off'}: {', '.join(FORMATS)} ...")
        optimizers = {name: keras_adam.Adam(moment_dtype=moments)
                      for name, (moments, _) in FORMATS.items()}
        steps = {}
        for name, optimizer in optimizers.items():
            dtype = FORMATS[name][1]
            given = grads if dtype == "float32" else [keras.ops.cast(g, dtype) for g in grads]
            steps[name] = harness.step(keras, optimizer, case.shapes, given, xla, dtype)
        timings = timing.time_interleaved(steps, repeats, min_seconds)
        base = statistics.median(timings["float32"])
        for name, optimizer in optimizers.items():
            rows.append({
                "case": case.name, "format": name, "xla": xla, "parameters": case.parameters,
                "bytes_per_parameter": state_bytes(keras, optimizer) / case.parameters,
                "step_ms": timing.summary(timings[name]),
                "vs_float32": statistics.median(timings[name]) / base,
            })
    return rows


def format_rows(rows):
    lines = [
        "moment_dtype per case, keras_adam steps timed together with float32 moments:",
        "",
        "| case | moments | XLA | state bytes / parameter | step ms (min-max) | vs float32 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = r["step_ms"]
        lines.append(
            f"| {r.get('case', 'large')} | {r['format']} | {'on' if r['xla'] else 'off'} "
            f"| {r['bytes_per_parameter']:.3f} "
            f"| {ms['median']:.2f} ({ms['min']:.2f}-{ms['max']:.2f}) | {r['vs_float32']:.2f} |")
    return "\n".join(lines)


def training_bytes(keras, model):
    """Bytes per parameter of training state: weights, gradients and optimizer state.

    Measured from the model's trainable variables (their dtype; the gradient
    of a variable has its dtype, as Keras's trainers compute it) and the
    optimizer's variables (`state_bytes`). Returns a dict with the three parts
    and their sum, each per parameter.
    """
    variables = model.trainable_variables
    parameters = sum(math.prod(v.shape) for v in variables)
    weights = sum(variable_bytes(keras, v) for v in variables)
    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)
    state = state_bytes(keras, optimizer)
    return {"weights": weights / parameters, "gradients": weights / parameters,
            "optimizer": state / parameters, "total": (2 * weights + state) / parameters}


# (label, dtype policy, optimizer: "builtin" or keras_adam's kwargs)
MEMORY_RUNS = [
    ("float32 + keras.optimizers.Adam", "float32", "builtin"),
    ("mixed_bfloat16 + keras.optimizers.Adam", "mixed_bfloat16", "builtin"),
] + [
    (f"bfloat16 + keras_adam, moments {moment or 'bfloat16'}, {rounding}", "bfloat16",
     dict(moment_dtype=moment, weight_rounding=rounding))
    for moment in (None, "float32", "8bit")
    for rounding in ("nearest", "stochastic", "compensated")
]


def memory_rows(keras, keras_adam, width=1024, layers=3):
    """Training bytes per parameter (`training_bytes`) of an MLP of `layers` dense
    layers of `width`, for each of `MEMORY_RUNS`; nothing is timed."""
    rows = []
    previous = keras.config.dtype_policy()
    try:
        for label, policy, optimizer in MEMORY_RUNS:
            keras.config.set_dtype_policy(policy)
            model = keras.Sequential([keras.Input((width,))] + [
                keras.layers.Dense(width) for _ in range(layers)])
            model.compile(optimizer=keras.optimizers.Adam() if optimizer == "builtin"
                          else keras_adam.Adam(**optimizer), loss="mse")
            model.optimizer.build(model.trainable_variables)
            rows.append({"run": label, **training_bytes(keras, model)})
    finally:
        keras.config.set_dtype_policy(previous)
    return rows


def format_memory_rows(rows):
    lines = ["| training state | weights | gradients | optimizer | bytes / parameter |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['weights']:.2f} | {r['gradients']:.2f} | "
                     f"{r['optimizer']:.2f} | {r['total']:.2f} |")
    return "\n".join(lines)
