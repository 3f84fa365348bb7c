"""Times one optimizer step of keras_adam.Adam beside keras.optimizers.Adam.

Run:  python -m keras_adam.benchmark
          [--cases large,many-small,mlp,embedding,monitor,fit,moments,memory,sharding,
                   warmup]
          [--repeats 15] [--xla both|off|on] [--backend tensorflow|jax|torch]
          [--intra-op-threads N] [--devices 8] [--moments-on CASES]
          [--fit-models mlp,cnn,recommender,transformer] [--json [PATH]]

Progress goes to stderr as the cases run; the table (or, with `--json`
alone, the JSON report) to stdout; `--json PATH` also writes the JSON there.

Both optimizers run in the same process on the same variables' shapes, with
gradients precomputed, so only the update is timed, the way each backend's
trainer runs it: TensorFlow inside tf.function (with and without XLA), JAX
as jax.jit of stateless_apply with donated state, torch eagerly. Each repeat
times a batch of steps and reports milliseconds per step; the table gives the
median and the min-max range over repeats, the speed-up of keras_adam over
the built-in (ratio of medians), and the effective memory traffic against
the bandwidth measured on this machine in the same run. On torch, a
reference column times `torch.optim.Adam(fused=True)` on the same shapes.

Adam's roofline: per float32 parameter a step reads g, theta, m, v and writes
theta, m, v: 7 x 4 = 28 bytes. A step can be no faster than
28 * parameters / bandwidth (for lazy sparse updates: 28 bytes per element of
the rows in the gradient).

The "embedding" case (1,000,000 x 64 table, a tf.IndexedSlices gradient of
1,000 rows) compares keras_adam's exact and lazy sparse modes. Three cases
are not a lone step: "monitor" is the epoch-time cost of AdamMonitor; "fit"
times whole model.fit steps of four models with keras_adam and the built-in,
and the optimizer's share of a step; "moments" compares moment_dtype
float32, bfloat16 and 8bit (state bytes per parameter, step time);
"memory" tabulates the training state's bytes per parameter (weights,
gradients, optimizer state) for float32, mixed_bfloat16 and pure bfloat16
with each moment format and weight rounding (nothing is timed);
"sharding" (JAX) compares shard_state=True with whole state on `--devices`
devices. "warmup" (only when named) times the first epochs of the fit
case's Transformer in fresh processes, with empty and with warm compile
caches: the wait for keras_adam's compiled steps.

Modules: `timing` (the harness), `cases` (what is timed, its roofline),
`harnesses` (each backend's step and bandwidth), `monitor` (AdamMonitor's
cost), `fit` (model.fit steps), `moments` (moment_dtype's bytes and time, training memory),
`sharding` (shard_state on N devices), `warmup` (first epochs in fresh processes),
`report` (running and the table), `cli` (arguments and the launcher).
"""

from keras_adam.benchmark.cases import BYTES_PER_PARAMETER
from keras_adam.benchmark.cli import main
from keras_adam.benchmark.cli import parse_args
from keras_adam.benchmark.report import format_table

__all__ = ["BYTES_PER_PARAMETER", "format_table", "main", "parse_args"]
