"""Blockwise 8-bit codes for Adam's moments: the codec, with `keras.ops` only.

A tensor is cut into blocks along its rows: a variable of shape
(R, d_1, ..., d_k) is viewed as R rows of C = d_1 * ... * d_k elements (a
1-D or 0-D variable is one row), and each row into ceil(C / B) blocks of at
most B elements (`block_size`, 256 by default): equal blocks of a divisor
of C between B/2 and B when there is one (a row of 2000 is 8 blocks of
250), else blocks of B with the last one zero-padded while it is encoded.
A block never spans two rows, so updating some rows of an embedding table
(lazy sparse updates) leaves every other row's codes and scales bit for bit.

Each block b keeps one float32 scale s_b = max |x| over the block (absmax)
and one 8-bit code per element. The codes index two 256-entry tables,
non-linear so that values far below their block's absmax keep relative
precision:

    m (signed, int8 code j in -127..127):   q_m(j) = sign(j) (|j| / 127)^4
    v (unsigned, uint8 code k in 0..255):   q_v(k) = (k / 255)^8

so that m and sqrt(v), the two factors of Adam's step m / sqrt(v), follow
the same quartic law. Decoding is x = q(code) * s_b. Encoding rounds in the
law's own scale, where the codes are evenly spaced:

    j = sign(x) round(127 (|x| / s_b)^(1/4)),   k = round(255 (v / s_b)^(1/8))

(fourth and eighth roots are two and three square roots: cheap on every
backend, unlike a search of the table). The largest |x| of a block is
stored exactly (code +-127 or 255). The relative gap between neighbouring
values is 4 / |j| for m and 8 / k for v: at most 3.1% near the absmax, so
values there are stored within 1.6% (m) and 1.6% (v, 0.8% in sqrt(v)). The
smallest non-zero values are 3.8e-9 (m) and 5.6e-20 (v) of the absmax;
smaller ones are stored as 0.

The tables are the float32 formulas below, multiplications of exact
integers by float32 constants, so `decode` gives the tables' values bit for
bit on every backend, compiled or not (`M_TABLE`, `V_TABLE`, indexed by the
stored byte).
"""

import dataclasses
import math

import numpy as np
from keras import ops

BLOCK_SIZE = 256

# Largest code magnitude of each table.
_M_CODE_MAX = 127
_V_CODE_MAX = 255
# 1 / 127^2 and 1 / 255^2 in float32; times 127^2 and 255^2 they give exactly 1.
_M_UNIT = float(np.float32(1.0 / _M_CODE_MAX ** 2))
_V_UNIT = float(np.float32(1.0 / _V_CODE_MAX ** 2))


def _m_values(j, absolute=ops.abs):
    """q_m(j) = sign(j) (|j| / 127)^4, for float32 codes (exact integers)."""
    half = j * absolute(j) * _M_UNIT        # sign(j) (j / 127)^2
    return half * absolute(half)


def _v_values(k):
    """q_v(k) = (k / 255)^8, for float32 codes (exact integers)."""
    square = k * k * _V_UNIT                 # (k / 255)^2
    fourth = square * square
    return fourth * fourth


# The tables, indexed by the stored byte (an int8 code j is the byte j mod 256;
# byte 128, j = -128, is never written).
# The same float32 operations in NumPy (np.float32 * Python float stays float32).
M_TABLE = _m_values(np.arange(256, dtype=np.uint8).view(np.int8).astype(np.float32), np.abs)
V_TABLE = _v_values(np.arange(256, dtype=np.uint8).astype(np.float32))


@dataclasses.dataclass(frozen=True)
class Blocking:
    """How one tensor is cut into blocks.

    Attributes:
        rows: R, the first dimension (1 for 0-D and 1-D tensors).
        cols: C, the elements per row.
        block_length: elements per block: C when a row is shorter than B, a
            divisor of C in (B/2, B] if there is one, else B.
        blocks_per_row: ceil(C / block_length).
        scale_shape: the shape of the tensor of scales: (R, blocks_per_row),
            or (blocks_per_row,) for 0-D and 1-D tensors.
    """

    rows: int
    cols: int
    block_length: int
    blocks_per_row: int
    scale_shape: tuple


def blocking(shape, block_size=BLOCK_SIZE):
    """The `Blocking` of a tensor of `shape` (see the module docstring)."""
    shape = tuple(int(d) for d in shape)
    rows = shape[0] if len(shape) >= 2 else 1
    cols = math.prod(shape) // rows if rows else math.prod(shape[1:])
    block = max(1, min(block_size, cols))
    # A block size that divides the row, if one is within a factor 2 of
    # block_size (2000 = 8 x 250): no padding to copy at every step.
    block = next((d for d in range(block, block // 2, -1) if cols % d == 0), block)
    blocks = -(-cols // block)
    scale_shape = (rows, blocks) if len(shape) >= 2 else (blocks,)
    return Blocking(rows, cols, block, blocks, scale_shape)


def row_blocking(shape):
    """The `Blocking` of a tensor given one block per row, (N, L): N blocks of L.

    Its numbers are the tensor's own dimensions, not computed from them, so
    that a compiler tracing them as symbols (torch.compile with dynamic
    shapes) serves every N and L with one function.
    """
    rows, length = shape
    return Blocking(rows, length, length, 1, (rows, 1))


def _pieces(x, b):
    """x (n rows of `b.cols`) as arrays of (n, blocks, length): each row's whole
    blocks of `b.block_length`, then, where a row ends in a shorter block,
    that block as (n, 1, rest).

    Not by zero-padding the last block and slicing the padding off after the
    arithmetic: fused with the rest of a step, that pattern is mis-indexed by
    Inductor's CPU code (torch 2.13: the last column read garbage). The short
    block computed on its own gives the same values (zeros never raise a
    block's absmax).
    """
    x = ops.reshape(x, (-1, b.cols))
    whole = b.cols // b.block_length
    full = whole * b.block_length
    if full == b.cols:
        return [ops.reshape(x, (-1, whole, b.block_length))]
    tail = ops.reshape(x[:, full:], (-1, 1, b.cols - full))
    return [ops.reshape(x[:, :full], (-1, whole, b.block_length)), tail] if whole else [tail]


def _joined(pieces, shape):
    """The inverse of `_pieces`: their elements as a tensor of `shape` (n rows)."""
    rows = [ops.reshape(p, (-1, p.shape[1] * p.shape[2])) for p in pieces]
    x = rows[0] if len(rows) == 1 else ops.concatenate(rows, axis=1)
    # The number of rows may be unknown while tracing (gathered rows).
    return ops.reshape(x, (-1, *shape[1:]) if len(shape) else ())


def _scale_pieces(scales, pieces):
    """(n, blocks) scales cut as `_pieces` cuts the blocks."""
    if len(pieces) == 1:
        return [scales]
    whole = pieces[0].shape[1]
    return [scales[:, :whole], scales[:, whole:]]


def _scale_shape(b, shape):
    return b.scale_shape if len(shape) < 2 else (-1, b.blocks_per_row)


def encode(x, signed, b):
    """(codes, scales) of float32 `x`: int8 codes for m (`signed`), uint8 for v.

    `x` has the shape of the tensor `b` describes, or n of its rows.
    """
    shape = ops.shape(x)
    codes, scales = zip(*(_encode_blocks(blocks, signed) for blocks in _pieces(x, b)))
    scales = scales[0] if len(scales) == 1 else ops.concatenate(scales, axis=1)
    return _joined(codes, shape), ops.reshape(scales, _scale_shape(b, shape))


def _encode_blocks(blocks, signed):
    """(codes, scales) of (n, blocks, length) float32 `blocks`."""
    magnitude = ops.abs(blocks)
    scales = ops.amax(magnitude, axis=-1)  # ops.max breaks a torch.compile graph (Keras 3.15)
    # One division per block, then a multiplication per element (a may then
    # exceed 1 by an ulp; the code still rounds to the top one).
    a = magnitude * ops.expand_dims(1.0 / ops.where(scales > 0, scales, 1.0), -1)
    root = ops.sqrt(ops.sqrt(a))             # a^(1/4)
    if signed:
        j = ops.round(root * _M_CODE_MAX)
        return ops.cast(ops.where(blocks < 0, -j, j), "int8"), scales
    return ops.cast(ops.round(ops.sqrt(root) * _V_CODE_MAX), "uint8"), scales


def decode(codes, scales, signed, b):
    """float32 values of `codes` with their blocks' `scales` (the inverse of `encode`)."""
    shape = ops.shape(codes)
    pieces = _pieces(codes, b)
    scales = _scale_pieces(ops.reshape(scales, (-1, b.blocks_per_row)), pieces)
    values = []
    for c, scale in zip(pieces, scales):
        c = ops.cast(c, "float32")
        q = _m_values(c) if signed else _v_values(c)
        values.append(q * ops.expand_dims(scale, -1))
    return _joined(values, shape)
