"""What the benchmark times: each case's variable shapes, its variants and its memory traffic.

Adam's roofline: per float32 parameter a step reads g, theta, m, v and writes
theta, m, v: 7 x 4 = 28 bytes. A step can be no faster than
28 * parameters / bandwidth (for lazy sparse updates: 28 bytes per element of
the rows in the gradient).
"""

import dataclasses

BYTES_PER_PARAMETER = 28


@dataclasses.dataclass(frozen=True)
class StepCase:
    """One optimizer step on variables of `shapes`, for keras_adam's `variants` and the built-in.

    Attributes:
        name: the case's name on the command line and in the table.
        shapes: one shape per variable.
        variants: {variant name: keras_adam.Adam kwargs}, each timed beside
            keras.optimizers.Adam.
        sparse_rows: if set, the gradient of the (single) variable is a
            row-sparse tf.IndexedSlices of this many rows. Such a case needs a
            backend with sparse gradients and runs without XLA only: it is
            about the default path model.fit takes for embeddings on CPU.
    """

    name: str
    shapes: tuple
    variants: dict = dataclasses.field(default_factory=lambda: {"keras_adam": {}})
    sparse_rows: int = None

    @property
    def parameters(self):
        return sum(_prod(s) for s in self.shapes)

    def touched(self, kwargs):
        """Parameters a variant must read and write: all, or only the gradient's rows if lazy."""
        if self.sparse_rows and kwargs.get("sparse_updates") == "lazy":
            return self.sparse_rows * self.shapes[0][1]
        return self.parameters

    def xla_modes(self, available, wanted):
        modes = [x for x in available if x in wanted]
        return [x for x in modes if not x] if self.sparse_rows else modes


MLP_SHAPES = ((784, 512), (512,), (512, 512), (512,), (512, 10), (10,))

CASES = {
    case.name: case
    for case in [
        StepCase("large", ((2000, 2000),) * 4),
        StepCase("many-small", ((100, 200),) * 200),
        StepCase("mlp", MLP_SHAPES),
        StepCase("embedding", ((1_000_000, 64),),
                 variants={"exact": {}, "lazy": {"sparse_updates": "lazy"},
                           "lazy-8bit": {"sparse_updates": "lazy", "moment_dtype": "8bit"}},
                 sparse_rows=1000),
        # The mlp's variables (named w0..w5 by the harnesses) with and without
        # three groups, as a fine-tuning recipe sets them: the first kernel at a
        # tenth of the lr, no decay on the biases, the rest the optimizer's.
        StepCase("groups", MLP_SHAPES, variants={
            "no-groups": {"weight_decay": 0.01},
            "3-groups": {"weight_decay": 0.01, "groups": {
                "w0": {"learning_rate_multiplier": 0.1}, "w[135]": {"weight_decay": 0.0}}},
        }),
    ]
}
# Not an optimizer step: the epoch-time cost of keras_adam.callbacks.AdamMonitor
# (keras_adam/benchmark/monitor.py).
MONITOR = "monitor"
# Not an optimizer step either: shard_state=True against whole state on
# several devices, JAX only (keras_adam/benchmark/sharding.py).
SHARDING = "sharding"
# Whole model.fit steps of four models (keras_adam/benchmark/fit.py).
FIT = "fit"
# moment_dtype float32 / bfloat16 / 8bit: state bytes and step time
# (keras_adam/benchmark/moments.py).
MOMENTS = "moments"
# Training state's bytes per parameter (weights, gradients, optimizer state)
# for float32, mixed and pure bfloat16 training; nothing timed
# (keras_adam/benchmark/moments.py).
MEMORY = "memory"
# The first epochs' wait for compiling, in fresh processes; minutes on torch, so
# only when asked for (keras_adam/benchmark/warmup.py).
WARMUP = "warmup"
NAMES = [*CASES, MONITOR, FIT, MOMENTS, MEMORY, SHARDING, WARMUP]
DEFAULT_NAMES = [name for name in NAMES if name != WARMUP]


def derive(ours_ms, builtin_ms, touched, bandwidth_gb_per_s):
    """The table's derived columns from the measured medians (ms) and bandwidth (GB/s)."""
    traffic = touched * BYTES_PER_PARAMETER
    gbps = traffic / (ours_ms / 1e3) / 1e9
    return {
        "speedup": builtin_ms / ours_ms,
        "keras_adam_gb_per_s": gbps,
        "fraction_of_bandwidth": gbps / bandwidth_gb_per_s,
        "roofline_ms": traffic / bandwidth_gb_per_s / 1e6,
    }


def _prod(shape):
    n = 1
    for d in shape:
        n *= d
    return n
