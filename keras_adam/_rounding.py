"""Writing a float32 result into a 16-bit float variable without losing small updates.

A bfloat16 weight keeps 8 significant bits: writing theta - step back with
round-to-nearest drops every step below half a unit in the last place
(ulp, 2^-8 relative), so small updates vanish and training stalls. Two
remedies (Zamirai et al., 2020), chosen by `Adam(weight_rounding=...)`:

"stochastic": round x to one of its two neighbours y_lo <= x <= y_hi in the
    16-bit format, up with probability (x - y_lo) / (y_hi - y_lo). Then
    E[write] = x exactly: the updates survive on average. bfloat16 is
    float32's upper half, so this is adding 16 random bits to the half it
    drops and truncating (`stochastic_bfloat16`, a few integer operations);
    float16 takes the general form (`stochastic`).

"compensated": Kahan summation. A compensation c in the variable's dtype
    keeps what the write dropped:

        target = (theta + c) - step           (float32)
        theta  = round_nearest(target)
        c      = round_nearest(target - theta)

    so theta + c follows the float32 trajectory to within c's own rounding
    (2^-9 of c, and |c| <= half an ulp of theta).

"nearest": round to nearest (what an assignment does).

The randomness is counter-based: the uniform number for an element is a
hash of (seed, step t, stream, element index), where the stream names the
variable and the slot. It needs no state beyond one saved seed, so a run is
reproducible from `keras.utils.set_random_seed`, resumes bit for bit from a
file (t and the seed are saved), gives every tf.distribute replica the same
bits, and draws the same numbers for an element whether a step updates the
whole variable or some of its rows (the index is the element's position in
the whole variable).
"""

import numpy as np
from keras import ops

from keras_adam import backends

ROUNDINGS = ("nearest", "stochastic", "compensated")
SIXTEEN_BIT = ("bfloat16", "float16")

# The 16-bit formats: significand bits after the point, smallest normal
# exponent (below it values are subnormal, with that exponent's spacing).
_FORMATS = {"bfloat16": (7, -126), "float16": (10, -14)}

# Multipliers of the integer mixer below (odd 32-bit constants with good
# avalanche; written as int32, the same bits).
_MIX_1 = 0x7FEB352D
_MIX_2 = 0x846CA68B - (1 << 32)
_GOLDEN = 0x9E3779B9 - (1 << 32)


def rounding_for(dtype, weight_rounding):
    """The rounding a variable of `dtype` gets: nearest for all but 16-bit floats, whose
    default (None) is "stochastic"."""
    if dtype not in SIXTEEN_BIT:
        return "nearest"
    return weight_rounding or "stochastic"


def _logical_shift(x, k):
    """x >> k on int32 bits as unsigned (the backends shift signed ints arithmetically)."""
    return ops.bitwise_and(ops.right_shift(x, k), (1 << (32 - k)) - 1)


def _mix(x):
    """A bijective 32-bit integer hash on int32 (multiplications wrap modulo 2^32)."""
    x = ops.bitwise_xor(x, _logical_shift(x, 16))
    x = x * _MIX_1
    x = ops.bitwise_xor(x, _logical_shift(x, 15))
    x = x * _MIX_2
    return ops.bitwise_xor(x, _logical_shift(x, 16))


def _stream_key(seed, t, stream):
    key = _mix(ops.cast(t, "int32") * _GOLDEN + stream)
    return _mix(ops.bitwise_xor(ops.cast(seed, "int32"), key))


# One opaque operation under torch.compile: Inductor inlines a scalar into
# every element's expression, and `random_bits`' mix refers to its input
# eight times, the key's two mixes theirs too, so the key's expression was
# expanded some 500 times per stream: minutes of compiling for a small model.
_stream_key_operation = backends.opaque(_stream_key, "stream_key")


def stream_key(seed, t, stream):
    """The int32 key of one stream at step `t` (see `random_bits`); a vector of
    keys for a vector of streams."""
    return _stream_key_operation(seed, t, stream)


def random_bits(seed, t, stream, index, key=None):
    """32 random bits (int32), one per element of `index`.

    Args:
        seed: a scalar int32 tensor (the optimizer's saved rounding seed).
        t: the 1-based step, a scalar int tensor.
        stream: an int (or scalar int32 tensor) naming the variable and slot.
        index: int32 positions of the elements in their whole variable.
        key: `stream_key(seed, t, stream)` if already computed (then the
            first three are not used): a compiled function shared by several
            variables takes their keys as arguments (`keras_adam._whole`).
    """
    key = stream_key(seed, t, stream) if key is None else key
    # The key is mixed in before the multiplication: torch.compile's Inductor
    # (torch 2.13, CPU) miscompiles arange * a large constant into code that
    # corrupts the heap, for some shapes.
    return _mix(ops.bitwise_xor(index, key) * _GOLDEN)


class Keys:
    """The `stream_key`s of variables' streams at one step, as
    `keras_adam._state.Storage` takes them in place of (seed, t).

    Either one variable's four keys, an int32 vector indexed by kind (0: the
    variable, 1-3: m, v, v_max); or the row form, for tensors given in rows
    of one or several variables joined (`keras_adam._whole`): each row's
    four keys, (rows, 4), and `firsts`, each row's first element's position
    in its own variable (a row lies in one variable). An element's index is
    its position in its own variable.
    """

    def __init__(self, keys, firsts=None):
        self.keys, self.firsts = keys, firsts

    def key(self, kind, shape):
        """The key of stream `kind` for the elements of a tensor of `shape` (in
        the row form, of as many rows as the keys: `shape` is not needed)."""
        if self.firsts is None:
            return self.keys[kind]
        return ops.expand_dims(self.keys[:, kind], 1)

    def index(self, shape):
        """`element_index` of the elements of a tensor of `shape`."""
        if self.firsts is None:
            return element_index(shape)
        return ops.expand_dims(self.firsts, 1) + ops.expand_dims(
            ops.arange(shape[1], dtype="int32"), 0)


def uniform(seed, t, stream, index):
    """Uniform numbers in [0, 1) with 24 random bits (`random_bits`'s high ones)."""
    return uniform_from_bits(random_bits(seed, t, stream, index))


def uniform_from_bits(bits):
    """`random_bits`' output as uniform numbers in [0, 1), from its 24 high bits."""
    return ops.cast(_logical_shift(bits, 8), "float32") * (2.0 ** -24)


def element_index(shape, rows=None):
    """int32 positions in the whole variable of the elements of a (rows of a)
    variable of `shape`; `rows` are the row indices of a row-sparse update."""
    if rows is None:
        # The dimensions are not made numbers: they may be symbols while a
        # compiler traces the function for every length (`keras_adam._whole`).
        size = 1
        for d in shape:
            size = size * d
        return ops.reshape(ops.arange(size, dtype="int32"), shape)
    size = 1
    for d in shape:
        size *= int(d)
    row_size = size // int(shape[0]) if shape and int(shape[0]) else 0
    within = ops.reshape(ops.arange(row_size, dtype="int32"), (1, *shape[1:]))
    rows = ops.reshape(ops.cast(rows, "int32"), (-1,) + (1,) * (len(shape) - 1))
    return rows * row_size + within


def _exponent(x, min_exponent):
    """The exponent of |x| from its float32 bits (exact, unlike log2), at least `min_exponent`."""
    exponent = ops.bitwise_and(ops.right_shift(ops.view(x, "int32"), 23), 0xFF) - 127
    return ops.maximum(exponent, min_exponent)


def _power_of_two(exponent):
    """2^exponent from its float32 bits, floored at 2^-126: a 16-bit format's
    subnormal spacing is below float32's normals (values under 1e-36)."""
    return ops.view(ops.left_shift(ops.maximum(exponent + 127, 1), 23), "float32")


def stochastic(x, dtype, u):
    """`x` (float32) rounded to `dtype` up or down at random: E[result] = x.

    y = nearest(x); d = x - y is exact (Sterbenz). The neighbour on d's side
    is y + sign(d) * s, s the format's spacing there (half below a power of
    two); it is taken with probability |d| / s, so E = y + d = x. `u` holds
    uniform numbers in [0, 1), one per element.
    """
    mantissa, min_exponent = _FORMATS[dtype]
    # y = nearest(x) on the format's grid, x / s rounded half to even, times s
    # (s: the spacing at |x|): exact, as scaling by powers of two is. The
    # round trip float32 -> dtype -> float32 computes the same, but
    # torch.compile's Inductor may drop it (it keeps 16-bit values in float32).
    grid = _power_of_two(_exponent(x, min_exponent) - mantissa)
    y = ops.round(x / grid) * grid
    d = x - y
    # The exponent of |y| from its float32 bits (exact, unlike log2).
    exponent = _exponent(y, min_exponent)
    spacing = _power_of_two(exponent - mantissa)
    power_of_two = ops.equal(ops.abs(y), _power_of_two(exponent))
    toward_zero = ops.less(d * y, 0.0)
    below = ops.logical_and(ops.logical_and(power_of_two, toward_zero),
                            ops.greater(exponent, min_exponent))
    spacing = ops.where(below, spacing * 0.5, spacing)
    away = ops.less(u * spacing, ops.abs(d))
    # Where y is not finite (overflow, NaN) d is NaN and `away` False: y stays.
    result = ops.where(away, y + ops.sign(d) * spacing, y)
    return ops.cast(result, dtype)


def stochastic_bfloat16(x, bits):
    """`x` (float32) rounded to bfloat16 up or down at random, from 16 random bits.

    bfloat16 is float32's upper 16 bits. Adding a uniform 16-bit number r to
    the 16 bits that bfloat16 drops (as integers, on the magnitude: the sign
    is the top bit) carries into the kept bits with probability
    dropped / 2^16, which is x's distance to its lower neighbour (in
    magnitude) in units of the spacing; truncating then gives E[result] = x
    exactly, as `stochastic` does, in a few integer operations: the form for
    bfloat16 weights and moments, written at every step. Infinities and NaN
    are kept.
    """
    r = _logical_shift(bits, 16)             # the 16 best-mixed bits
    carried = ops.bitwise_and(ops.view(x, "int32") + r, -65536)  # & 0xFFFF0000
    result = ops.where(ops.isfinite(x), ops.view(carried, "float32"), x)
    return ops.cast(result, "bfloat16")


def compensated(target, dtype):
    """(theta, c) in `dtype` with theta + c = `target` (float32) to within c's rounding."""
    theta = ops.cast(target, dtype)
    c = ops.cast(target - ops.cast(theta, "float32"), dtype)
    return theta, c


def new_seed(add_variable):
    """The saved int32 seed of the rounding's counter-based randomness (`uniform`).

    Drawn from NumPy's global generator, which `keras.utils.set_random_seed`
    seeds, so a seeded run repeats; saved with the optimizer's state, so a
    resumed run continues the same sequence.

    Args:
        add_variable: the optimizer's `add_variable`.
    """
    seed = add_variable(shape=(), dtype="int32", name="rounding_seed", aggregation="none")
    seed.assign(np.random.randint(0, 2**31 - 1))
    return seed
