"""Helper process: XLA-compiled steps of each memory format, as XLA_FLAGS compiles them.

Not a test file: tests/test_xla_flags.py runs it in subprocesses, because XLA
reads XLA_FLAGS once per process.

    KERAS_BACKEND=jax|tensorflow [XLA_FLAGS=...] python xla_flags_run.py OUT.npz

Trains two variables for four steps with bfloat16 moments, 8-bit moments and
in pure bfloat16: on JAX `jax.jit` of `stateless_apply` with the state donated
(as Keras's JAX trainer runs it), on TensorFlow `optimizer.apply` in a
tf.function with jit_compile=True. Writes every variable and optimizer
variable after the last step (as float32), and the number of copies of
bfloat16 tensors and of 8-bit codes in each format's compiled step
(`copies`). The formats run as the step function XLA compiles (the C loop
that runs them on a CPU switched off: what runs on other devices), and
again with the loop ("c-loop/" + the format's name): on JAX and on
TensorFlow a custom call in XLA's program.
"""

import sys

import keras
import numpy as np

import keras_adam

# name: (keras_adam.Adam kwargs, the variables' dtype). 300 x 200 is over
# min_8bit_size; the bias keeps float32 moments under "8bit".
FORMATS = {"bfloat16": (dict(moment_dtype="bfloat16"), "float32"),
           "8bit": (dict(moment_dtype="8bit"), "float32"),
           "pure-bfloat16": ({}, "bfloat16")}
SHAPES = [(300, 200), (200,)]
STEPS = 4


def train(kwargs, dtype):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    variables = [keras.Variable(rng.normal(size=s), dtype=dtype) for s in SHAPES]
    optimizer = keras_adam.Adam(learning_rate=1e-2, **kwargs)
    optimizer.build(variables)
    grads = [[keras.ops.convert_to_tensor(rng.normal(size=s), dtype) for s in SHAPES]
             for _ in range(STEPS)]
    if keras.backend.backend() == "jax":
        import jax

        apply = jax.jit(lambda t, o, g: optimizer.stateless_apply(o, g, t),
                        donate_argnums=(0, 1))
        text = apply.lower([v.value for v in variables], [v.value for v in optimizer.variables],
                           grads[0]).compile().as_text()
        copies = _bfloat16_copies(text) + _copies(text, ("s8", "u8"))
        state = ([jax.numpy.copy(v.value) for v in variables],
                 [jax.numpy.copy(v.value) for v in optimizer.variables])
        for g in grads:
            state = apply(*state, g)
        values = list(state[0]) + list(state[1])
    else:
        import tensorflow as tf

        step = tf.function(lambda g: optimizer.apply(g, variables), jit_compile=True)
        # The cluster's optimized HLO, as XLA compiles it for these gradients.
        text = step.experimental_get_compiler_ir(grads[0])(stage="optimized_hlo")
        copies = _bfloat16_copies(text) + _copies(text, ("s8", "u8"))
        for g in grads:
            step(g)
        values = [v.value for v in variables + list(optimizer.variables)]
    arrays = [keras.ops.convert_to_numpy(keras.ops.cast(x, "float32")) for x in values]
    return arrays, copies


def _bfloat16_copies(text):
    """Copies of bfloat16 tensors in an HLO module's entry computation: with
    bfloat16 moments, the moments' (no other tensor of the step is bfloat16)."""
    return _copies(text, ("bf16",))


def _copies(text, dtypes):
    """Copies of tensors of HLO's `dtypes` in a module's entry computation (8-bit
    codes: s8 and u8)."""
    entry = text[text.index("ENTRY"):].splitlines()
    return sum(" copy(" in line and any(f"= {d}[" in line for d in dtypes) for line in entry)


def main(out):
    results = {}
    from keras_adam import _whole
    from keras_adam.backends import use_c_loop

    for prefix, loop in [("", False), ("c-loop/", True)]:
        use_c_loop(loop)
        _whole._SHARED.clear()  # (the compiled steps, traced with the switch as it was)
        for name, (kwargs, dtype) in FORMATS.items():
            arrays, copies = train(kwargs, dtype)
            for i, x in enumerate(arrays):
                results[f"{prefix}{name}/{i}"] = x
            results[f"{prefix}{name}/copies"] = np.asarray(copies)
    np.savez(out, **results)


if __name__ == "__main__":
    main(sys.argv[1])
