"""Blockwise 8-bit codes for Adam's moments: the codec, with `keras.ops` only.

A tensor is cut into blocks along its rows: a variable of shape
(R, d_1, ..., d_k) is viewed as R rows of C = d_1 * ... * d_k elements (a
1-D or 0-D variable is one row), and each row into ceil(C / B) blocks of at
most B elements (`block_size`, 256 by default; the last block of a row may
be shorter). A block never spans two rows, so updating some rows of an
embedding table (lazy sparse updates) leaves every other row's codes and
scales bit for bit.

Each block b keeps one float32 scale s_b = max |x| over the block (absmax)
and one 8-bit code per element. The codes index two 256-entry tables,
non-linear so that small values keep relative precision:

    m (signed, int8 code j in -127..127):    q_m(j) = (j / 127)^3
    v (unsigned, uint8 code k in 0..255):    q_v(k) = ((k / 255)^3)^2

so that m and sqrt(v), the two factors of Adam's step m / sqrt(v), follow
the same cubic law. Decoding is x = q(code) * s_b; encoding picks the code
whose value is nearest to x / s_b (ties to the smaller magnitude). The
largest |x| of a block is stored exactly (code +-127 or 255). Relative
spacing near the top of the range is 3/127 (m) and 6/255 (v), so a value
near its block's absmax is stored within 1.2% (m) and 1.2% (v); the
smallest non-zero values are 5e-7 (m) and 3.6e-15 (v) of the absmax, and
anything smaller is stored as 0.

Decoding looks the codes up in the two float32 tables (`M_TABLE`,
`V_TABLE`, indexed by the stored byte), so it is the same bit for bit on
every backend; encoding inverts the law with a root and then compares with
the midpoint between the two neighbouring table values, one lookup.
"""

import dataclasses
import math

import numpy as np
from keras import ops

BLOCK_SIZE = 256

# Largest code magnitude of each table, and the cube of it.
_J = 127
_K = 255


# The tables: correctly rounded float32 values of the laws, from float64.
# `_M_VALUES[j + 127]` is q_m(j); `_V_VALUES[k]` is q_v(k).
_M_VALUES = ((np.arange(-_J, _J + 1) / _J) ** 3).astype(np.float32)
_V_VALUES = (((np.arange(_K + 1) / _K) ** 3) ** 2).astype(np.float32)
# Midpoints between neighbouring magnitudes: a code is the nearest value.
_M_MIDPOINTS = ((_M_VALUES[_J:-1].astype(np.float64) + _M_VALUES[_J + 1:]) / 2).astype(np.float32)
_V_MIDPOINTS = ((_V_VALUES[:-1].astype(np.float64) + _V_VALUES[1:]) / 2).astype(np.float32)

# The same tables indexed by the stored byte (an int8 code j is the byte
# j mod 256; byte 128, j = -128, is never written and decodes as -1).
M_TABLE = np.concatenate([_M_VALUES[_J:], [-1.0], _M_VALUES[:_J]]).astype(np.float32)
V_TABLE = _V_VALUES


@dataclasses.dataclass(frozen=True)
class Blocking:
    """How one tensor is cut into blocks.

    Attributes:
        rows: R, the first dimension (1 for 0-D and 1-D tensors).
        cols: C, the elements per row.
        block: elements per block (B, or C when a row is shorter).
        blocks: blocks per row, ceil(C / block).
        scale_shape: the shape of the tensor of scales: (R, blocks), or
            (blocks,) for 0-D and 1-D tensors.
    """

    rows: int
    cols: int
    block: int
    blocks: int
    scale_shape: tuple


def blocking(shape, block_size=BLOCK_SIZE):
    """The `Blocking` of a tensor of `shape` (see the module docstring)."""
    shape = tuple(int(d) for d in shape)
    rows = shape[0] if len(shape) >= 2 else 1
    cols = math.prod(shape) // rows if rows else math.prod(shape[1:])
    block = max(1, min(block_size, cols))
    blocks = -(-cols // block)
    scale_shape = (rows, blocks) if len(shape) >= 2 else (blocks,)
    return Blocking(rows, cols, block, blocks, scale_shape)


def _to_blocks(x, b):
    """(n, blocks, block) view of x (n rows of `b.cols`), zero-padding each row's last block."""
    x = ops.reshape(x, (-1, b.cols))
    pad = b.blocks * b.block - b.cols
    if pad:
        x = ops.pad(x, [(0, 0), (0, pad)])
    return ops.reshape(x, (-1, b.blocks, b.block))


def _from_blocks(x, b, shape):
    x = ops.reshape(x, (-1, b.blocks * b.block))
    if b.blocks * b.block != b.cols:
        x = x[:, :b.cols]
    # The number of rows may be unknown while tracing (gathered rows).
    return ops.reshape(x, (-1, *shape[1:]) if len(shape) else ())


def _scale_shape(b, shape):
    return b.scale_shape if len(shape) < 2 else (-1, b.blocks)


def _nearest(a, top, midpoints, root):
    """The code in 0..top whose table value is nearest to a in [0, 1] (int32).

    `root` inverts the law approximately; comparing with the midpoint of the
    two neighbouring values makes the choice exact whatever its rounding.
    """
    low = ops.cast(ops.clip(ops.floor(root(a) * top), 0, top - 1), "int32")
    above = ops.take(ops.convert_to_tensor(midpoints), low) < a
    return low + ops.cast(above, "int32")


def encode(x, signed, b):
    """(codes, scales) of float32 `x`: int8 codes for m (`signed`), uint8 for v.

    `x` has the shape of the tensor `b` describes, or n of its rows.
    """
    shape = ops.shape(x)
    blocks = _to_blocks(x, b)
    magnitude = ops.abs(blocks)
    scales = ops.max(magnitude, axis=-1)
    a = magnitude / ops.expand_dims(ops.where(scales > 0, scales, 1.0), -1)
    if signed:
        j = _nearest(a, _J, _M_MIDPOINTS, lambda y: ops.power(y, 1.0 / 3.0))
        codes = ops.cast(ops.where(blocks < 0, -j, j), "int8")
    else:
        k = _nearest(a, _K, _V_MIDPOINTS, lambda y: ops.power(y, 1.0 / 6.0))
        codes = ops.cast(k, "uint8")
    return _from_blocks(codes, b, shape), ops.reshape(scales, _scale_shape(b, shape))


def decode(codes, scales, signed, b):
    """float32 values of `codes` with their blocks' `scales` (the inverse of `encode`)."""
    shape = ops.shape(codes)
    index = ops.cast(_to_blocks(codes, b), "int32")
    if signed:
        q = ops.take(ops.convert_to_tensor(_M_VALUES), index + _J)
    else:
        q = ops.take(ops.convert_to_tensor(_V_VALUES), index)
    x = q * ops.expand_dims(ops.reshape(scales, (-1, b.blocks)), -1)
    return _from_blocks(x, b, shape)
