"""The whole-variable step of `keras_adam._whole`, on a CPU, as the C loop of
`rows.c`: in a TensorFlow op that updates the variables in place
(TensorFlow without XLA around the step), and as a custom call in the
programs that XLA compiles (with XLA around the step).

`_whole` compiles its step function as one XLA cluster per variable, whose
results TensorFlow then assigns: XLA's loops recompute the decode, write
the new moments out for the blocks' maxima, and copy the moments before
overwriting them; the 8-bit step took about 6 times float32's. Without XLA
around the step, the step is one op, `KerasAdamStep` (`tf_rows.cc`), which
locks the variables as ResourceApplyAdam does and runs rows.c's loop on
their buffers: one pass over each row or block. Where XLA compiles the
step (`jit_compile=True`, and the cluster itself), the step function
becomes one op that only XLA compiles, `KerasAdamStepValues` (`tf_xla.cc`):
one HLO custom-call of the same loop whose results alias theta and the
moments, so that the variables' buffers are written in place there too.

The op's library is compiled against TensorFlow's headers (`tf.sysconfig`;
about 9 s), the custom call's against XLA's (about a minute), and each
layout's loop (`rows.build`, some tenths of a second), with `CXX` (else
`g++`) and `CC` (else `gcc`): each once per machine (per TensorFlow
version, compiler and CPU), kept in the cache directory (`libraries`) and
loaded from there by later processes.
Each operation rounds once, as the step's operations run one by one do:
the op's results are those of the step run op by op
(tests/test_backend_tensorflow_loop.py); the custom call's moments too, and
its weights within the ulps that XLA's rounding of the step's scalars moves
them; XLA's cluster fuses multiplications into additions and may differ in
the last bit. The op runs where the step is not compiled by XLA, outside
Keras's StatelessScope (`stateless_apply` must not write the variables it
reads); the custom call where XLA compiles it, on a machine without GPUs or
TPUs. Both run with every variable on a CPU and for the layouts the loop
covers; elsewhere, and without a compiler, the XLA cluster runs.
"""

import ctypes
import logging
import os
import threading

import keras
import tensorflow as tf

# The same private seam as keras_adam.backends.tensorflow: whether the graph
# being traced is compiled by XLA.
from tensorflow.python.ops import control_flow_util

from keras_adam.backends import libraries, rows

_OP_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tf_rows.cc")
_XLA_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tf_xla.cc")
_HEADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tf_loops.h")

_log = logging.getLogger("keras_adam")

# Set to False to run the XLA cluster instead (the benchmark's comparison;
# read when a step is traced).
enabled = True

# The op's `version` attribute: the meaning of its layout, its inputs and its
# arithmetic (rows.c). A graph saved with another version fails to run
# rather than run other arithmetic; change it with any of those.
VERSION = 1


class WithLoop:
    """`compiled` (`_whole`'s step function as an XLA cluster, on a CPU the C
    loop's custom call inside it: `in_programs`), and `update`: the same step
    as the C loop of `step` (`rows.Step`) in an op on the variables
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


def in_programs(fn, step, given):
    """`fn` (a step function of `_whole`, `(gradient, theta, values, fields, state)`
    -> (theta', values')) as XLA traces it: on a machine of CPUs only, the same
    step as one custom call of the C loop of `step` (`rows.Step`) where the loop
    covers the call (`tf_xla.cc`), its results aliasing theta's and the
    moments' buffers; else `fn`. `given`: as for `WithLoop`."""
    def run(gradient, theta, values, fields, state):
        written = [theta] + [x for slot in values for x in slot]
        if enabled and not _accelerators() and all(_on_cpu(x) for x in written):
            arguments = _arguments(step, given, gradient, theta, values, fields, state)
            if arguments is not None and _registered_in_programs(arguments[0]):
                results = _in_program(arguments, gradient, written)
                rest = iter(results[1:])
                return results[0], tuple(tuple(next(rest) for _ in slot) for slot in values)
        return fn(gradient, theta, values, fields, state)

    return run


def _in_program(arguments, gradient, written):
    """The op that XLA compiles into the custom call: the tensors `written`
    (theta, then the moments'), stepped."""
    layout, length, keys, scalars = arguments
    configuration = " ".join(str(int(x)) for x in (
        VERSION, _described(gradient)[1], length, _threads(), *layout))
    return _XLA[0].keras_adam_step_values(scalars, keys, gradient, written,
                                          configuration=configuration)


def _accelerators():
    """Whether TensorFlow sees a GPU or TPU (where programs may be compiled for
    it: the custom call is registered for the host only)."""
    return any(d.device_type in ("GPU", "TPU") for d in tf.config.list_logical_devices())


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
_OPS = []  # the op library's module, or None where it failed to build
_XLA = []  # the library of the op that XLA compiles, or None where it failed to build
_LOOPS = {}  # layout -> its loop's loaded library, or None where it cannot be compiled
_REGISTERED = {"op": set(), "xla": set()}  # the layouts whose loops each library may call


def _registered(layout):
    """Whether `layout`'s loop is registered with the op (compiled and loaded at
    first use); False where the op or the loop cannot be compiled."""
    return _registered_with("op", _OPS, _build_op, layout)


def _registered_in_programs(layout):
    """Whether `layout`'s loop is registered with the op that XLA's programs call
    (`tf_xla.cc`, compiled at first use or taken from the cache); False where
    it or the loop cannot be compiled."""
    return _registered_with("xla", _XLA, _build_xla, layout)


def _registered_with(kind, holder, build, layout):
    if layout in _REGISTERED[kind]:
        return True
    with _LOCK:
        if not holder:
            holder.append(build())
        if holder[0] is None:
            return False
        if layout not in _LOOPS:
            _LOOPS[layout] = _load_loop(layout)
        if _LOOPS[layout] is None:
            return False
        if layout not in _REGISTERED[kind]:
            loop = getattr(_LOOPS[layout],
                           "keras_adam_blocks_many" if layout[0] else "keras_adam_rows_many")
            values = (ctypes.c_int64 * len(layout))(*[int(x) for x in layout])
            holder[0].register(values, len(layout), ctypes.cast(loop, ctypes.c_void_p).value)
            _REGISTERED[kind].add(layout)
    return True


def _load_loop(layout):
    """`layout`'s loop compiled and loaded (kept loaded while the ops may call
    it), or None."""
    def load(library):
        loaded = ctypes.CDLL(library)
        getattr(loaded, "keras_adam_blocks_many" if layout[0] else "keras_adam_rows_many")
        return loaded

    return libraries.loaded(lambda: rows.build(layout, "tf"), load, (OSError, AttributeError))


def _build_op():
    """The op's library (`tf.load_op_library`), compiled with TensorFlow's flags
    once per TensorFlow and compiler into the cache directory (`libraries`),
    else into this process's directory."""
    cxx = rows.cxx()
    if cxx is None:
        return None
    flags = ["-O2", "-shared", "-fPIC", "-w", *tf.sysconfig.get_compile_flags()]
    links = tf.sysconfig.get_link_flags()

    def build():
        return libraries.compiled(
            "tf_op", _identity((_OP_SOURCE, _HEADER), flags, links, cxx),
            lambda path: rows.run([cxx, *flags, _OP_SOURCE, "-o", path, *links]),
            rows.directory)

    def load(library):
        module = tf.load_op_library(library)
        registry = ctypes.CDLL(library).keras_adam_tf_register
        registry.restype = None
        registry.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
        module.register = registry
        return module

    return libraries.loaded(build, load, (tf.errors.OpError, OSError, AttributeError),
                            again=(tf.errors.NotFoundError,))


def _build_xla():
    """The library of `tf_xla.cc`, loaded and registered with XLA; compiled once
    per source, TensorFlow and compiler into the cache directory
    (`libraries`), else into this process's directory. None where it
    cannot be compiled or loaded."""
    cxx = rows.cxx()
    if cxx is None:
        return None
    include = tf.sysconfig.get_include()
    flags = ["-O2", "-shared", "-fPIC", "-w", *tf.sysconfig.get_compile_flags(),
             # (headers that XLA's include, which the wheel keeps apart)
             f"-I{include}/external/highwayhash", f"-I{include}/external/farmhash_archive/src"]
    links = [*tf.sysconfig.get_link_flags(), "-l:libtensorflow_cc.so.2"]  # (XLA's registries)

    def make(path):
        _log.warning("keras_adam: compiling its XLA custom call against TensorFlow's "
                     "headers (about a minute, once per TensorFlow version and compiler; "
                     "kept in %s)", os.path.dirname(path))
        return rows.run([cxx, *flags, _XLA_SOURCE, "-o", path, *links], timeout=600)

    def load(library):
        module = tf.load_op_library(library)
        loaded = ctypes.CDLL(library)
        register = loaded.keras_adam_xla_register
        register_loop = loaded.keras_adam_xla_register_loop
        return module, register, register_loop

    found = libraries.loaded(
        lambda: libraries.compiled("tf_xla", _identity((_XLA_SOURCE, _HEADER), flags, links,
                                                       cxx), make, rows.directory),
        load, (tf.errors.OpError, OSError, AttributeError), again=(tf.errors.NotFoundError,))
    if found is None:
        return None
    module, register, register_loop = found
    register.restype, register.argtypes = None, []
    register_loop.restype = None
    register_loop.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    register()
    module.register = register_loop
    return module


def _identity(sources, flags, links, cxx):
    """What a library compiled against TensorFlow's headers depends on
    (`libraries.key`): its sources, TensorFlow's version and build, the
    flags and the compiler; None where a source cannot be read."""
    try:
        return (libraries.contents(*sources), tf.__version__, tf.version.GIT_VERSION,
                flags, links, libraries.compiler(cxx))
    except OSError:
        return None
