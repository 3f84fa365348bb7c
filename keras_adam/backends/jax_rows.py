"""The whole-variable step of `keras_adam._whole`, on a CPU, as the C loop of
`rows.c` inside the XLA program that `jax.jit` compiles (JAX).

XLA compiles `_whole`'s step function as several loops over the variable,
and copies the donated moments before overwriting them: on a CPU, bfloat16
moments took 2.3-2.9 times float32's step and 8-bit codes 6-7 times
(docs/precision.md). Here the step is one custom call (`jax.ffi.ffi_call`)
of rows.c's loop, linked with the handler of `jax_rows.cc`: one pass over
each row or block, writing theta and the moments into their own buffers
(each result aliases its argument: with donated buffers, as Keras's
trainer and `jax.jit(..., donate_argnums=...)` give them, no copy).

The loop is compiled at first trace, once per layout and machine
(`rows.build`, about two seconds: the C++ handler includes XLA's headers;
kept in the cache directory, `libraries`), with `CC` (else `gcc`) and
`CXX` (else `g++`). Each operation rounds once,
so the results are those of the step run op by op, bit for bit
(tests/test_backend_jax.py; XLA's compiled step fuses multiplications
into additions and may differ in the last bit), but for NaN: a NaN
moment makes its 8-bit block's scale NaN (XLA's maximum passes over it).
The call is chosen per platform when the
program is compiled (`jax.lax.platform_dependent`): on another device the
step function runs as before. Where no compiler is found or compiling
fails, for what the loop does not cover (float16, float64, 8-bit rows
that end in a shorter block, blocks over 4096, a rule in another dtype
than float32), and under a `keras.distribution` (the custom call has no
sharding rule), the step function runs.
"""

import ctypes
import threading

import jax
import jax.numpy as jnp
import keras
import numpy as np

from keras_adam.backends import libraries, rows

_HANDLER = __file__.rsplit(".", 1)[0] + ".cc"

# Set to False to run the step function instead (the benchmark's comparison).
enabled = True


def with_loop(fn, step, given):
    """`fn` (a step function of `_whole`, `(gradient, theta, values, fields, state)`
    -> (theta', values')), run as the C loop of `step` (`rows.Step`) on a CPU
    where the loop covers the call. `given` is the storage's `given_shapes`
    of the variable (8-bit: its codes one block per row), or None."""
    def run(gradient, theta, values, fields, state):
        # (Compiled only where programs run on a CPU by default: elsewhere the
        # loop would never be chosen.)
        if enabled and keras.distribution.distribution() is None and \
                jax.default_backend() == "cpu":
            arguments = _arguments(step, given, gradient, theta, values, fields, state)
            target = None if arguments is None else _target(arguments[0])
            if target is not None:
                return jax.lax.platform_dependent(
                    cpu=lambda: _call(target, arguments, gradient, theta, values),
                    default=lambda: fn(gradient, theta, values, fields, state))
        return fn(gradient, theta, values, fields, state)

    return run


def _arguments(step, given, gradient, theta, values, fields, state):
    """(the loop's layout, its 8-bit block length or 0, the stream keys, the
    scalars), or None where the loop does not cover the call."""
    bound, keys = state
    if keys is not None and (len(keys) != 1 or keys[0].dtype != jnp.int32
                             or keys[0].shape != (4,)):
        return None  # (the row form of several variables' keys: not on JAX)
    found = rows.layout(step, given, _described(theta), _described(gradient),
                        tuple(tuple(_described(x) for x in slot) for slot in values), bound,
                        keys is not None)
    scalars = rows.scalars(fields, step.rate, bound)
    if found is None or any(not isinstance(x, (int, float)) and (
            x.dtype != jnp.float32 or x.size != 1) for x in scalars):
        return None
    (layout, length), keys = found, jnp.zeros((4,), jnp.int32) if keys is None else keys[0]
    return layout, length, keys, jnp.stack([jnp.reshape(jnp.asarray(x, jnp.float32), ())
                                            for x in scalars])


def _described(x):
    """An array's (dtype's Keras name, number of elements), as `rows.layout` takes it."""
    return keras.backend.standardize_dtype(x.dtype), x.size


def _call(target, arguments, gradient, theta, values):
    """The custom call: theta' and the values' tensors, in `values`' structure."""
    _, length, keys, scalars = arguments
    written = [theta] + [x for slot in values for x in slot]
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in written]
    first = 3  # the scalars, the keys, the gradient, then the tensors written
    # Under jax.vmap, one call per element: each its own random streams.
    results = jax.ffi.ffi_call(
        target, shapes, input_output_aliases={first + i: i for i in range(len(written))},
        vmap_method="sequential")(
        scalars, keys, gradient, *written, length=np.int64(length))
    rest = iter(results[1:])
    return results[0], tuple(tuple(next(rest) for _ in slot) for slot in values)


_LOCK = threading.Lock()
_TARGETS = {}  # layout -> (the registered target's name, its library), or None


def _target(layout):
    """The name of the custom call registered for `layout`, or None where the
    loop cannot be compiled."""
    if layout not in _TARGETS:
        with _LOCK:
            if layout not in _TARGETS:
                _TARGETS[layout] = _register(layout)
    return None if _TARGETS[layout] is None else _TARGETS[layout][0]


def _register(layout):
    def load(library):
        loaded = ctypes.CDLL(library)
        return loaded, loaded.keras_adam_step

    found = libraries.loaded(lambda: rows.build(layout, "jax", (_HANDLER, [jax.ffi.include_dir()])),
                             load, (OSError, AttributeError))
    if found is None:
        return None
    loaded, step = found
    name = "keras_adam_step_" + "_".join(str(int(x)) for x in layout)
    try:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(step), platform="cpu")
    except (ValueError, RuntimeError):
        return None
    return name, loaded  # (the library kept loaded while its target is registered)
