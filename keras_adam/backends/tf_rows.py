"""The whole-variable step of `keras_adam._whole`, on a CPU, as the C loop of
`rows.c` in a TensorFlow op that updates the variables in place
(TensorFlow without XLA around the step).

`_whole` compiles its step function as one XLA cluster per variable, whose
results TensorFlow then assigns: XLA's loops recompute the decode, write
the new moments out for the blocks' maxima, and the assignments copy; the
8-bit step took about 6 times float32's. Here the step is one op,
`KerasAdamStep` (`tf_rows.cc`), which locks the variables as
ResourceApplyAdam does and runs rows.c's loop on their buffers: one pass
over each row or block.

The op's library is compiled once per process against TensorFlow's headers
(`tf.sysconfig`; about 7 s), and each layout's loop once (`rows.build`,
some tenths of a second), with `CXX` (else `g++`) and `CC` (else `gcc`).
Each operation rounds once, as the step's operations run one by one do:
the results are those of the step run op by op
(tests/test_backend_tensorflow_loop.py);
XLA's cluster fuses multiplications into additions and may differ in the
last bit. The op runs where the step is not compiled by XLA
(`jit_compile=True` traces the op into a cluster, where it has no kernel),
outside Keras's StatelessScope (`stateless_apply` must not write the
variables it reads), with every variable on a CPU, and for the layouts the
loop covers; elsewhere, and without a compiler, the XLA cluster runs.
"""

import ctypes
import os
import shutil
import threading

import keras
import tensorflow as tf

# The same private seam as keras_adam.backends.tensorflow: whether the graph
# being traced is compiled by XLA.
from tensorflow.python.ops import control_flow_util

from keras_adam.backends import rows

_OP_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tf_rows.cc")

# Set to False to run the XLA cluster instead (the benchmark's comparison).
enabled = True

# The op's `version` attribute: the meaning of its layout, its inputs and its
# arithmetic (rows.c). A graph saved with another version fails to run
# rather than run other arithmetic; change it with any of those.
VERSION = 1


class WithLoop:
    """`compiled` (`_whole`'s step function as an XLA cluster), and `update`: the
    same step as the C loop of `step` (`rows.Step`) on the variables
    themselves. `given`: the storage's `given_shapes` of the variable
    (8-bit: its codes one block per row), or None."""

    def __init__(self, compiled, step, given):
        self.compiled, self.step, self.given = compiled, step, given

    def __call__(self, *args):
        return self.compiled(*args)

    def update(self, gradient, variable, held, fields, state):
        """theta and the moments of `variable` (held in `held`, `Storage.held`)
        updated in place by the op; False, having done nothing, where the op
        does not cover the call."""
        if not enabled or _elsewhere():
            return False
        arguments = _arguments(self.step, self.given, gradient, variable, held, fields, state)
        if arguments is None:
            return False
        layout, length, keys, scalars = arguments
        if not _registered(layout):
            return False
        written = [variable] + [h for slot in held for h in slot]
        _OPS[0].keras_adam_step(scalars, keys, gradient, [_handle(x) for x in written],
                                layout=[int(x) for x in layout], length=length,
                                threads=_threads(), version=VERSION)
        return True


def _elsewhere():
    """Whether the step is traced for XLA or in a Keras StatelessScope (Keras
    3.15 has no public accessor; keras_adam.backends.torch reads the same)."""
    from keras.src.backend.common import stateless_scope

    return (stateless_scope.in_stateless_scope()
            or control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


def _handle(variable):
    """A Keras variable's or tf.Variable's resource handle (a replica's, under
    tf.distribute, as the fused kernels take it)."""
    return variable.handle


def _on_cpu(x):
    """Whether a Keras variable (its tf.Variable's device) or tensor is off any
    accelerator."""
    device = getattr(getattr(x, "value", x), "device", "") or ""
    return "GPU" not in device.upper() and "TPU" not in device.upper()


def _arguments(step, given, gradient, variable, held, fields, state):
    """(the loop's layout, its 8-bit block length or 0, the stream keys, the
    scalars as a float32 tensor), or None where the op does not cover the
    call."""
    bound, keys = state
    written = [variable] + [h for slot in held for h in slot]
    if keys is not None and (len(keys) != 1 or keys[0].dtype != tf.int32
                             or tuple(keys[0].shape) != (4,)):
        return None
    if tuple(gradient.shape) != tuple(variable.shape) or \
            any(d is None for x in written for d in x.shape) or \
            not all(_on_cpu(x) for x in written):
        return None
    found = rows.layout(step, given, _described(variable), _described(gradient),
                        tuple(tuple(_described(h) for h in slot) for slot in held), bound,
                        keys is not None)
    scalars = rows.scalars(fields, step.rate, bound)
    if found is None or any(not isinstance(x, (int, float)) and (
            x.dtype != tf.float32 or len(tuple(x.shape)) != 0) for x in scalars):
        return None
    (layout, length), keys = found, tf.zeros((4,), tf.int32) if keys is None else keys[0]
    return layout, length, keys, tf.stack([tf.cast(x, tf.float32) for x in scalars])


def _described(x):
    """A variable's or tensor's (dtype's Keras name, number of elements), as
    `rows.layout` takes it (its shape known)."""
    size = 1
    for d in x.shape:
        size *= int(d)
    return keras.backend.standardize_dtype(x.dtype), size


def _threads():
    """The loop's threads: TensorFlow's intra-op threads where set, else this
    process's CPUs."""
    if tf.config.threading.get_intra_op_parallelism_threads():
        return tf.config.threading.get_intra_op_parallelism_threads()
    affinity = getattr(os, "sched_getaffinity", None)  # (Linux only)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


_LOCK = threading.Lock()
_OPS = []  # the op library's module and ctypes handle, or None where it failed to build
_LOOPS = {}  # layout -> its loaded library, or None where it cannot be compiled


def _registered(layout):
    """Whether `layout`'s loop is registered with the op (compiled and loaded at
    first use); False where the op or the loop cannot be compiled."""
    if layout not in _LOOPS:
        with _LOCK:
            if not _OPS:
                _OPS.append(_build_op())
            if layout not in _LOOPS:
                _LOOPS[layout] = None if _OPS[0] is None else _register(layout)
    return _LOOPS[layout] is not None


def _build_op():
    """The op's library (`tf.load_op_library`), compiled with TensorFlow's flags."""
    where = rows.directory()
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if where is None or cxx is None:
        return None
    library = os.path.join(where, "tf_op.so")
    if not rows.run([cxx, "-O2", "-shared", "-fPIC", "-w", *tf.sysconfig.get_compile_flags(),
                     _OP_SOURCE, "-o", library, *tf.sysconfig.get_link_flags()]):
        return None
    try:
        module = tf.load_op_library(library)
        registry = ctypes.CDLL(library).keras_adam_tf_register
    except (tf.errors.OpError, OSError, AttributeError):
        return None
    registry.restype = None
    registry.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    module.register = registry
    return module


def _register(layout):
    library = rows.build(layout, "tf")
    if library is None:
        return None
    try:
        library = ctypes.CDLL(library)
        loop = getattr(library, "keras_adam_blocks_many" if layout[0] else "keras_adam_rows_many")
    except (OSError, AttributeError):
        return None
    values = (ctypes.c_int64 * len(layout))(*[int(x) for x in layout])
    _OPS[0].register(values, len(layout), ctypes.cast(loop, ctypes.c_void_p).value)
    return library  # (kept loaded while the op may call its loop)
