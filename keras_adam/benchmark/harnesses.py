"""How each backend's trainer runs an optimizer step, and the machine's memory bandwidth.

A harness builds fresh variables for an optimizer, precomputes the
gradients, and returns a zero-argument step that applies them the way that
backend's trainer does: TensorFlow inside tf.function (with and without XLA),
JAX as jax.jit of stateless_apply with donated state, torch eagerly under
no_grad. Its `bandwidth` is GB/s of `a += b` on 256 MiB float32 arrays (reads
two arrays, writes one), the roofline's denominator. A harness may also have
a `reference_step`: the framework's own optimizer on the same shapes (torch:
`torch.optim.Adam(fused=True)`), timed in the same interleaved run.
"""

import statistics

from keras_adam.benchmark import timing


def _add_gb_per_s(step, n, repeats, min_seconds):
    """GB/s of a step that adds one n-float32 array into another (reads 2, writes 1)."""
    seconds = statistics.median(timing.time_repeats(step, repeats, min_seconds)) / 1e3
    return 3 * 4 * n / seconds / 1e9


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

        return _add_gb_per_s(step, n, repeats, min_seconds)

    def gradients(self, case):
        tf = self.tf
        if case.sparse_rows:
            rows, dim = case.shapes[0]
            indices = tf.random.uniform((case.sparse_rows,), 0, rows, dtype=tf.int64, seed=7)
            values = tf.random.normal((case.sparse_rows, dim), seed=8)
            return [tf.IndexedSlices(values, indices, tf.constant(case.shapes[0], tf.int64))]
        return [tf.random.normal(s, seed=100 + i) for i, s in enumerate(case.shapes)]

    def step(self, keras, optimizer, shapes, grads, xla, dtype="float32"):
        variables = [keras.Variable(self.tf.random.normal(s, seed=i), name=f"w{i}", dtype=dtype)
                     for i, s in enumerate(shapes)]
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

        return _add_gb_per_s(step, n, repeats, min_seconds)

    def gradients(self, case):
        keys = self.jax.random.split(self.jax.random.key(100), len(case.shapes))
        return [self.jax.random.normal(k, s) for k, s in zip(keys, case.shapes)]

    def step(self, keras, optimizer, shapes, grads, xla, dtype="float32"):
        keys = self.jax.random.split(self.jax.random.key(0), len(shapes))
        variables = [keras.Variable(self.jax.random.normal(k, s), name=f"w{i}", dtype=dtype)
                     for i, (k, s) in enumerate(zip(keys, shapes))]
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

        return _add_gb_per_s(step, n, repeats, min_seconds)

    def gradients(self, case):
        gen = self.torch.Generator(device=self.device).manual_seed(100)
        return [self.torch.randn(s, generator=gen, device=self.device) for s in case.shapes]

    def step(self, keras, optimizer, shapes, grads, xla, dtype="float32"):
        gen = self.torch.Generator(device=self.device).manual_seed(0)
        variables = [keras.Variable(self.torch.randn(s, generator=gen, device=self.device),
                                    name=f"w{i}", dtype=dtype) for i, s in enumerate(shapes)]
        optimizer.build(variables)

        def step():
            # As Keras's torch trainer applies gradients: without autograd
            # recording (the trainable variables are Parameters).
            with self.torch.no_grad():
                optimizer.apply(grads, variables)
            self._sync()

        return step

    def reference_step(self, shapes, grads):
        """`torch.optim.Adam(fused=True)` on the same shapes: what a PyTorch user compares with."""
        torch = self.torch
        gen = torch.Generator(device=self.device).manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen, device=self.device))
                  for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer = torch.optim.Adam(params, lr=1e-3, eps=1e-7, fused=True)

        def step():
            optimizer.step()
            self._sync()

        return step


HARNESSES = {"tensorflow": TensorFlowHarness, "jax": JaxHarness, "torch": TorchHarness}
