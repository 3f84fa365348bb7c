"""The whole-variable step of the layouts given in rows, as one C loop on CPU
tensors (torch).

`keras_adam._whole` gives its compiled step the layouts whose elements draw
random numbers (bfloat16 moments, bfloat16 variables written with
stochastic rounding) in rows, with each row's stream keys, and 8-bit codes
one block per row. On a CPU, Inductor (torch 2.13) writes each bitcast of
stochastic rounding as a store, a scalar loop and a load, loads 16-bit
values and 8-bit codes in partial vectors, and splits the 8-bit step into
seven loops over the variable: those steps ran at 2.4-5 times float32's
on 16 million parameters. The same arithmetic written as C loops
(`rows.c`: one pass over each row or block), which the C compiler
vectorises whole, runs at 0.95-1.2 times float32's with bfloat16 moments
or weights, and 2.3-3.2 with 8-bit moments, whose codec is bound by its
arithmetic (three AVX-512 CPUs, docs/precision.md).

The loop is compiled at first use (`rows.build`; once per layout and
machine, kept in the cache directory), with the C compiler `CC`,
else `gcc` (GCC's OpenMP runtime is the one torch loads, and runs its
threads), without fused multiply-adds, so the results are the compiled
step's, bit for bit
(tests/test_backend_torch.py), but for NaN: a NaN's sign and payload bits,
and the codes of a block whose scale is NaN, may differ. Small variables of one layout, which
`_whole` would join into one call, are taken where they lie, in one call
of the loop (`many`): nothing is copied in or out. Where no compiler is
found or compiling fails, or for what the loop does not cover (float16,
float64, blocks over 4096, tensors off the CPU or not contiguous,
torch.compile tracing around the step), the compiled step runs as before.
"""

import ctypes
import operator
import threading

import numpy as np
import torch

from keras_adam.backends import libraries, rows


# Set to False to run the compiled step instead (the benchmark's comparison).
enabled = True



def with_loop(compiled, step, in_place):
    """`compiled` (the step function, `(gradient, theta, values, fields, state)`),
    run as the C loop of `step` where the loop covers the call.

    With `in_place`, the loop writes theta and the values where they are and
    returns None, as `compiled` does; otherwise it writes copies and returns
    (theta', values'). In place, the function's `many(parts, given, fields,
    state)` runs the step of several variables as one call of the loop on
    their tensors where they lie: `parts` holds each variable's (gradient,
    theta, the values' tensors one after another) in any shapes, `given`
    the first's shapes in `keras_adam._whole`'s layout (8-bit: the blocks'
    length, which all share; element-wise, the others may be given in rows
    of another length), `fields` the step's scalars (tensors, or numbers
    where the step gives them so: `_scalars`), and `state` (bound,
    streams) has as streams, where random bits are drawn, (seed, t, the
    count of streams, each variable's position: its streams are
    4 position .. 4 position + 3; t a tensor or an int), whose keys the
    loop's library works out (`_rounding.stream_key`). It returns False,
    having done nothing, where the loop does not cover them; else `before`
    (a function, or None) runs once their tensors are checked, before the
    loop writes them.
    `kept`, a dict the caller keeps per batch of variables, holds their
    tensors' addresses between steps (`_Table`) and their streams' positions
    found covered (`_streams_cover`).
    """
    def run(gradient, theta, values, fields, state):
        if enabled and not torch.compiler.is_compiling():
            arguments = _arguments(step, gradient, theta, values, fields, state)
            if arguments is not None:
                functions = _function(arguments[0])
                if functions is not None:
                    return _call(functions[0], arguments, gradient, theta, values, in_place)
        return compiled(gradient, theta, values, fields, state)

    def many(parts, given, fields, state, before=None, kept=None):
        if not (enabled and in_place) or torch.compiler.is_compiling():
            return False
        bound, streams = state
        if streams is not None and not _streams_cover(streams, len(parts), kept):
            return False
        table = None if kept is None else kept.get("table")
        if table is None or not table.holds(parts, bound, streams):
            table = _Table.of(step, parts, given, fields, (bound, streams))
            if table is None:
                return False
            if kept is not None:
                kept["table"] = table
        scalars = _scalars(fields, step.rate, bound)
        if scalars is None:
            return False
        keys = None
        if streams is not None:  # each stream's key, as rows of 4 (a variable's)
            seed, t, count, positions = streams
            keys = np.empty((count // 4, 4), np.int32)
            table.functions[2](count, _integer(seed), _integer(t), keys.ctypes.data)
            keys = (keys, positions)
        return _call_many(table, keys, scalars, parts, before)

    run.many = many
    return run


def _layout(step, gradient, theta, values, bound, keyed):
    """The loop's layout (`rows.MACROS`' values) for one call's tensors, or None where
    the loop does not cover them (`rows.layout`; theta given in rows, 8-bit
    codes one block per row); `keyed`: whether the call has streams' keys."""
    tensors = (theta, gradient, *(x for slot in values for x in slot))
    if theta.dim() != 2 or not all(type(x) in _PLAIN and x.is_cpu and x.is_contiguous()
                                   for x in tensors):
        return None
    found = rows.layout(step, (tuple(theta.shape),), _described(theta), _described(gradient),
                        tuple(tuple(_described(x) for x in slot) for slot in values), bound,
                        keyed)
    return None if found is None else found[0]


# Keras's names of the dtypes `rows.layout` takes (a dict: some microseconds
# less per call than `keras.backend.standardize_dtype`).
_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.int8: "int8",
          torch.uint8: "uint8"}


def _described(x):
    """A tensor's (dtype's Keras name, number of elements), as `rows.layout` takes it."""
    return _NAMES.get(x.dtype, str(x.dtype)), x.numel()


def _keys_cover(keys, rows):
    """Whether `keys` (each row's four stream keys, each row's first position) are
    int32 CPU tensors of `rows` rows."""
    if len(keys) != 2:
        return False
    row_keys, firsts = keys
    return (row_keys.dtype == torch.int32 and firsts.dtype == torch.int32
            and tuple(row_keys.shape) == (rows, 4) and tuple(firsts.shape) == (rows,)
            and row_keys.is_cpu and firsts.is_cpu and row_keys.is_contiguous()
            and firsts.is_contiguous())


def _streams_cover(streams, count, kept=None):
    """Whether `streams` (seed, t, the count of streams, each variable's position)
    hold `count` variables' streams: seed and t integers or 0-d CPU tensors,
    and an int64 array of positions under count / 4. `kept` (`many`'s, per
    batch) remembers the positions found covered."""
    seed, t, streams_count, positions = streams
    values = [getattr(x, "value", x) for x in (seed, t)]  # a Keras variable's tensor
    if not all(isinstance(x, int) or (isinstance(x, torch.Tensor) and x.numel() == 1
                                      and x.is_cpu) for x in values):
        return False
    # The positions are the same array at every step (`_whole`'s, per set of
    # variables, never written): checked once per batch (NumPy's min and max
    # cost microseconds a call).
    checked = (positions, count, streams_count)
    last = None if kept is None else kept.get("covered")
    if last is not None and last[0] is positions and last[1:] == checked[1:]:
        return True
    covered = (streams_count % 4 == 0 and positions.dtype == np.int64
               and positions.shape == (count,) and 0 <= positions.min()
               and positions.max() < streams_count // 4)
    if covered and kept is not None:
        kept["covered"] = checked
    return covered


def _integer(x):
    """A Python int, or a Keras variable's or 0-d tensor's value, as an int."""
    return int(getattr(x, "value", x))


def _arguments(step, gradient, theta, values, fields, state, checked=False):
    """(the loop's layout, its keys, the scalars), or None where the loop does not
    cover the call (with `checked`, the keys are checked already: `many`'s
    streams, `_streams_cover`)."""
    bound, keys = state
    layout = _layout(step, gradient, theta, values, bound, keys is not None)
    if layout is None or (keys is not None and not checked and
                          not _keys_cover(keys, theta.shape[0])):
        return None
    scalars = _scalars(fields, step.rate, bound)
    return None if scalars is None else (layout, keys, scalars)


# `_scalars`' last arguments and array, one tuple read and replaced whole (an
# optimizer in another thread may replace it meanwhile): the same fields serve
# a step's variables.
_LAST = (None, None, None, None)
# Tensors whose memory the loop may address (a subclass may have none: a fake
# or distributed tensor).
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _scalars(fields, rate, bound):
    """The step's `_rule.Scalars` fields (0-d float32 CPU tensors, or numbers:
    `keras_adam._per_step.Step.scalar_numbers`), the decay rate and the
    moment bound K (a tensor or a Python float) as the loop's float32 array,
    read once per step (each `.item()` costs microseconds)."""
    global _LAST
    last = _LAST
    if last[0] is fields and last[1] == rate and last[2] is bound:
        return last[3]
    values = rows.scalars(fields, rate, bound)
    if any(isinstance(x, torch.Tensor) and (x.dtype != torch.float32 or x.numel() != 1
                                            or not x.is_cpu) for x in values):
        return None
    # float32, as the step's `ops.cast(rate, dtype)` rounds the rate.
    array = np.array([float(x) for x in values], dtype=np.float32)
    _LAST = (fields, rate, bound, array)
    return array


def _written(theta, values):
    """theta and the values' tensors, which the loop writes (outside torch's
    view), as torch's own in-place operations mark them: autograd then
    refuses a graph that saved their old values instead of using the new."""
    return [theta] + [x for slot in values for x in slot]


def _call(function, arguments, gradient, theta, values, in_place):
    layout, keys, scalars = arguments
    if not in_place:
        theta = theta.clone()
        values = tuple(tuple(x.clone() for x in slot) for slot in values)
    if theta.numel():
        pointers = [x.data_ptr() for slot in values for x in slot]
        if layout[0]:  # 8-bit: codes and scales per slot, v_max's absent without amsgrad
            pointers += [None] * (6 - len(pointers))
        else:
            pointers += [None] * (3 - len(pointers))
        keys = (None, None) if keys is None else (keys[0].data_ptr(), keys[1].data_ptr())
        function(theta.numel(), theta.shape[1], theta.data_ptr(), gradient.data_ptr(),
                 *pointers, *keys, scalars.ctypes.data, torch.get_num_threads())
        if in_place:
            torch.autograd.graph.increment_version(_written(theta, values))
    return None if in_place else (theta, values)


class _Table:
    """The addresses of a `many` call's tensors (rows.c's table: each variable's
    theta, gradient, then its values' tensors), checked once and kept
    between steps by the caller (`many`'s `kept`): a model of many small
    variables would otherwise check each tensor's dtype, size, device and
    layout at every step, some microseconds a variable. At each step only
    the gradients (new tensors) are checked and their addresses written;
    theta and the values' tensors must be the same tensors at the same
    addresses (a Keras variable assigned keeps its tensor: Keras's torch
    `Variable` copies into it), else the table is made again. Their dtypes,
    sizes and layout are not read again (some microseconds a variable): a
    Parameter given another view of the same memory (`p.data =
    p.data.view(...)`) is outside what a Keras variable allows."""

    def __init__(self, functions, layout, kind, length, gradient, parts, addresses, sizes):
        self.functions, self.layout, self.length = functions, layout, length
        # Whether the bound K and the streams are absent: the layout's (`rows.layout`).
        self.kind, self.gradient = kind, gradient  # (the gradients' dtype)
        self.sizes = sizes  # each variable's elements
        self.written = [x for part in parts for x in part[1:]]  # theta and the values
        self.addresses = np.array(addresses, dtype=np.uintp)
        self.stride = len(addresses) // len(parts)
        self.held = self.addresses.reshape(len(parts), self.stride)[:, [0] + list(
            range(2, len(parts[0])))].ravel().tolist()
        self.numels = sizes.tolist()
        self.offsets = np.zeros(len(parts), np.int64)  # rows.c's key rows, without keys

    @classmethod
    def of(cls, step, parts, given, fields, state):
        """The table of `parts` in the `given` shapes, or None where the loop does
        not cover them: the first part tells the layout (its tensors in the
        given shapes), and every part must match it (dtypes, sizes in whole
        rows, CPU, contiguous)."""
        shapes = iter([given[0], given[0]] + [s for slot in given[1] for s in slot])
        shaped = iter([x.reshape(next(shapes)) for x in parts[0]])
        first = (next(shaped), next(shaped), tuple(tuple(next(shaped) for _ in slot)
                                                   for slot in given[1]))
        arguments = _arguments(step, *first, fields, state, checked=True)
        functions = None if arguments is None else _function(arguments[0])
        if functions is None:
            return None
        layout, length = arguments[0], given[0][1]
        shares = [(x.dtype, s[1] == length) for x, s in zip(
            parts[0], [given[0], given[0]] + [s for slot in given[1] for s in slot])]
        if not layout[0]:  # element-wise: each variable one row (rows.c), of any length
            length = 1
        # Each variable's tensors' addresses (rows.c: 8 or 5, absent ones 0),
        # gathered in Python lists and made one array.
        absent = (0,) * ((8 if layout[0] else 5) - len(parts[0]))
        addresses, sizes = [], []
        for part in parts:
            size = part[1].numel()
            if size % length or len(part) != len(shares):
                return None
            count = size // length
            for x, (dtype, whole) in zip(part, shares):
                if x.dtype != dtype or x.numel() != (size if whole else count) or \
                        type(x) not in _PLAIN or not x.is_cpu or not x.is_contiguous():
                    return None
            # theta, gradient, then the values (rows.c's order)
            addresses.append(part[1].data_ptr())
            addresses.append(part[0].data_ptr())
            addresses.extend(x.data_ptr() for x in part[2:])
            addresses.extend(absent)
            sizes.append(count * length)
        return cls(functions, layout, (state[0] is None, state[1] is None), length,
                   shares[0][0], parts, addresses, np.array(sizes, dtype=np.int64))

    def holds(self, parts, bound, streams):
        """Whether the table serves `parts` as they are now: the same theta and
        values' tensors at the same addresses, and gradients of the layout's."""
        if len(parts) != len(self.numels) or self.kind != (bound is None, streams is None):
            return False
        written = [x for part in parts for x in part[1:]]
        return (all(map(operator.is_, written, self.written))
                and [x.data_ptr() for x in written] == self.held
                and all(_gradient(part[0], self.gradient, n)
                        for part, n in zip(parts, self.numels)))

    def with_gradients(self, parts):
        """The table's addresses with this step's gradients'."""
        self.addresses[1::self.stride] = [part[0].data_ptr() for part in parts]
        return self.addresses


def _gradient(x, dtype, size):
    """Whether `x` is a plain contiguous CPU tensor of `dtype` and `size` elements."""
    return (type(x) in _PLAIN and x.dtype == dtype and x.is_cpu and x.is_contiguous()
            and x.numel() == size)


def _call_many(table, keys, scalars, parts, before=None):
    """The loop of several variables (`with_loop`'s `many`) of `table` (`_Table`,
    which serves `parts`), after `before()` where given; else False, having
    written nothing. The keys, where given, are the streams' key table and
    each variable's row in it."""
    addresses = table.with_gradients(parts)
    offsets = table.offsets if keys is None else keys[1]
    if before is not None:
        before()
    if not table.functions[1](len(parts), table.sizes.ctypes.data, table.length,
                              addresses.ctypes.data, None,  # (in place)
                              None if keys is None else keys[0].ctypes.data,
                              offsets.ctypes.data, scalars.ctypes.data, torch.get_num_threads()):
        # No memory for its table of 8 bytes a variable. Once `before` has
        # written, the step cannot be left to another path, which would
        # write it again.
        if before is not None:
            raise MemoryError("keras_adam's C loop could not allocate its table of "
                              f"{len(parts)} variables")
        return False
    torch.autograd.graph.increment_version(table.written)
    return True


_LOCK = threading.Lock()
_FUNCTIONS = {}  # layout -> the loaded functions, or None where compiling failed


def _function(layout):
    """The loops compiled for `layout`, loaded (one variable's, several's, and the
    streams' keys'), or None where they cannot be compiled."""
    if layout in _FUNCTIONS:
        return _FUNCTIONS[layout]
    with _LOCK:
        if layout not in _FUNCTIONS:
            _FUNCTIONS[layout] = libraries.loaded(
                lambda: rows.build(layout, "torch"),
                lambda library: _load(library, layout[0]), (OSError, AttributeError))
        return _FUNCTIONS[layout]


def _load(library, eight_bit):
    name = "keras_adam_blocks" if eight_bit else "keras_adam_rows"
    loaded = ctypes.CDLL(library)
    one, many = getattr(loaded, name), getattr(loaded, name + "_many")
    keys = loaded.keras_adam_stream_keys  # (the keys of `many`'s streams)
    one.restype, many.restype = None, ctypes.c_int
    integer, pointer = ctypes.c_int64, ctypes.c_void_p
    one.argtypes = [integer, integer] + [pointer] * (11 if eight_bit else 8) + [ctypes.c_int]
    many.argtypes = [integer, pointer, integer] + [pointer] * 5 + [ctypes.c_int]
    keys.restype, keys.argtypes = None, [integer, integer, integer, pointer]
    return one, many, keys
