"""rows.c's tuning macros change no bit: the loop compiled with and without
prefetch requests, and with a row taken whole or in short pieces, writes the
same bits. The oracle is the loop with rows.c's default row pieces and
without prefetch requests (as the product compiles it on AMD's CPUs),
whose bits the backends' tests hold to the step run op by op
(test_backend_torch.py, test_backend_jax.py,
test_backend_tensorflow_loop.py)."""

import ctypes

import numpy as np
import pytest

from keras_adam.backends import rows

pytestmark = pytest.mark.backend_independent

F32, BF16 = rows.F32, rows.BF16
# (layout: rows.MACROS' values) bfloat16 moments; pure bfloat16 (weights
# written with stochastic rounding, amsgrad's v_max, a decay rate,
# Nesterov); 8-bit codes with their moment bound.
BFLOAT16_MOMENTS = (0, F32, F32, BF16, BF16, 0, 0, 0, 0, 0, 0)
PURE_BFLOAT16 = (0, BF16, BF16, BF16, BF16, BF16, 1, 1, 1, 0, 0)
EIGHT_BIT = (1, F32, F32, 1, 1, 0, 0, 0, 0, 0, 1)
# beta_1, 1 - beta_1, beta_2, 1 - beta_2, Nesterov's factor, alpha, epsilon,
# decay rate, lr, K (rows.c's order)
SCALARS = np.array([0.9, 0.1, 0.999, 0.001, 0.9, 1e-2, 1e-7, 0.01, 1e-2, 1e3], np.float32)


def _loaded(layout, kind, macros):
    path = rows.build(layout, kind, macros=macros)
    assert path is not None, "rows.c did not compile"
    return ctypes.CDLL(path)


def _assert_compiled_apart(layout, first, second):
    """The two sets of macros give two programs (a macro that rows.c no longer
    reads would make the comparisons below compare a loop with itself)."""
    paths = [rows.build(layout, "test_apart", macros=macros) for macros in (first, second)]
    with open(paths[0], "rb") as a, open(paths[1], "rb") as b:
        assert a.read() != b.read(), (first, second)


def _bfloat16(x):
    """x's float32 bits cut to bfloat16's (uint16)."""
    return (np.asarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _element_wise(library, layout, row_count, length):
    """theta, m, v (and v_max) after three steps of `library`'s keras_adam_rows
    on `row_count` rows of `length`, from the same seeded values."""
    rng = np.random.default_rng(3)
    size = row_count * length
    theta_bf16 = layout[1] == BF16
    theta = rng.normal(size=size).astype(np.float32)
    theta = _bfloat16(theta) if theta_bf16 else theta
    slots = [_bfloat16(np.abs(rng.normal(size=size)) * scale) if code == BF16 else None
             for code, scale in zip(layout[3:6], (1e-2, 1e-4, 1e-4))]
    keys = rng.integers(-2**31, 2**31, size=(row_count, 4)).astype(np.int32)
    firsts = (np.arange(row_count) * length).astype(np.int32)
    function = library.keras_adam_rows
    function.restype = None
    for _ in range(3):
        gradient = rng.normal(size=size).astype(np.float32)
        gradient = _bfloat16(gradient) if layout[2] == BF16 else gradient
        function(ctypes.c_int64(size), ctypes.c_int64(length),
                 ctypes.c_void_p(theta.ctypes.data), ctypes.c_void_p(gradient.ctypes.data),
                 *(ctypes.c_void_p(x.ctypes.data if x is not None else None) for x in slots),
                 ctypes.c_void_p(keys.ctypes.data), ctypes.c_void_p(firsts.ctypes.data),
                 ctypes.c_void_p(SCALARS.ctypes.data), ctypes.c_int(2))
    return [theta] + [x for x in slots if x is not None]


def _blocks(library, block_count, length):
    """theta and the codes and scales after three steps of `library`'s
    keras_adam_blocks (8-bit m and v, float32 theta, no keys)."""
    rng = np.random.default_rng(4)
    size = block_count * length
    theta = rng.normal(size=size).astype(np.float32)
    m = rng.integers(-127, 128, size=size).astype(np.int8)
    v = rng.integers(0, 256, size=size).astype(np.uint8)
    m_scale = np.full(block_count, 1e-2, np.float32)
    v_scale = np.full(block_count, 1e-4, np.float32)
    function = library.keras_adam_blocks
    function.restype = None
    for _ in range(3):
        gradient = rng.normal(size=size).astype(np.float32)
        function(ctypes.c_int64(size), ctypes.c_int64(length),
                 *(ctypes.c_void_p(x.ctypes.data) for x in (theta, gradient, m, m_scale, v,
                                                            v_scale)),
                 ctypes.c_void_p(None), ctypes.c_void_p(None), ctypes.c_void_p(None),
                 ctypes.c_void_p(None), ctypes.c_void_p(SCALARS.ctypes.data), ctypes.c_int(2))
    return [theta, m, m_scale, v, v_scale]


def _assert_same_bits(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


@pytest.mark.parametrize("layout", [BFLOAT16_MOMENTS, PURE_BFLOAT16],
                         ids=["bfloat16-moments", "pure-bfloat16"])
def test_a_row_taken_in_pieces_has_the_bits_of_a_row_taken_whole(layout):
    """A row of 2^30 elements or more is taken in pieces (each position counted
    in 32 bits from the row's first): pieces of 7 here, in rows of 45, must
    give each element its own random bits and the same step."""
    _assert_compiled_apart(layout, ["-DAHEAD=0"], ["-DAHEAD=0", "-DPIECE=7"])
    whole = _loaded(layout, "test_whole", ["-DAHEAD=0"])
    pieces = _loaded(layout, "test_pieces", ["-DAHEAD=0", "-DPIECE=7"])
    _assert_same_bits(_element_wise(pieces, layout, 3, 45),
                      _element_wise(whole, layout, 3, 45))


def test_prefetching_changes_no_bit():
    """Prefetch requests (compiled off on AMD's CPUs, on elsewhere) only ask for
    cache lines: both builds run on this CPU and write the same bits."""
    _assert_compiled_apart(EIGHT_BIT, ["-DAHEAD=4096"], ["-DAHEAD=0"])
    for layout in (BFLOAT16_MOMENTS, PURE_BFLOAT16):
        _assert_same_bits(
            _element_wise(_loaded(layout, "test_ahead", ["-DAHEAD=4096"]), layout, 40, 300),
            _element_wise(_loaded(layout, "test_no_ahead", ["-DAHEAD=0"]), layout, 40, 300))
    _assert_same_bits(_blocks(_loaded(EIGHT_BIT, "test_ahead", ["-DAHEAD=4096"]), 60, 256),
                      _blocks(_loaded(EIGHT_BIT, "test_no_ahead", ["-DAHEAD=0"]), 60, 256))


def test_prefetching_is_compiled_off_for_amd_cpus_only():
    assert rows.prefetch_macros("AuthenticAMD") == ["-DAHEAD=0"]
    assert rows.prefetch_macros("GenuineIntel") == []


def _blocks_in_numpy(block_count, length):
    """_blocks' three steps as NumPy's float32 operations, one rounding each in
    rows.c's order (NumPy's +, *, / and sqrt are IEEE float32's, its rint
    rounds half to even as C's rintf): keras_adam._quantize's decoding, the
    moment bound, the rule, the absmax and the codes, block by block."""
    rng = np.random.default_rng(4)
    f = np.float32
    size = block_count * length
    theta = rng.normal(size=size).astype(f)
    m = rng.integers(-127, 128, size=size).astype(np.int8)
    v = rng.integers(0, 256, size=size).astype(np.uint8)
    m_scale = np.full(block_count, 1e-2, f)
    v_scale = np.full(block_count, 1e-4, f)
    b1, one_b1, b2, one_b2, _, alpha, epsilon, _, _, bound = SCALARS
    m_unit, v_unit = f(1.0 / (127.0 * 127.0)), f(1.0 / (255.0 * 255.0))
    for _ in range(3):
        g = rng.normal(size=size).astype(f)
        j = m.astype(f)
        half = j * np.abs(j) * m_unit
        m_values = half * np.abs(half) * np.repeat(m_scale, length)
        k = v.astype(f)
        square = k * k * v_unit
        fourth = square * square
        v_values = fourth * fourth * np.repeat(v_scale, length)
        v_values = np.maximum(v_values, m_values * m_values / bound)
        m_values = b1 * m_values + one_b1 * g
        v_values = b2 * v_values + one_b2 * (g * g)
        theta = theta - alpha * m_values / (np.sqrt(v_values) + epsilon)
        m_scale = np.abs(m_values).reshape(block_count, length).max(axis=1)
        v_scale = v_values.reshape(block_count, length).max(axis=1)
        m_inverse = np.repeat(f(1) / np.where(m_scale > 0, m_scale, f(1)), length)
        v_inverse = np.repeat(f(1) / np.where(v_scale > 0, v_scale, f(1)), length)
        j = np.rint(np.sqrt(np.sqrt(np.abs(m_values) * m_inverse)) * f(127))
        m = np.where(m_values < 0, -j, j).astype(np.int8)
        v = np.rint(np.sqrt(np.sqrt(np.sqrt(v_values * v_inverse))) * f(255)).astype(np.uint8)
    return [theta, m, m_scale, v, v_scale]


@pytest.mark.parametrize("length", [1, 15, 63, 64, 65, 127, 250, 256, 1000])
def test_blocks_of_every_length_have_the_bits_of_numpys_step(length):
    """The 8-bit loop runs each block in whole multiples of its vector lanes,
    a block's last elements in copies padded with zeros: lengths below,
    at and past those multiples (and this machine's vector widths) must
    give the bits of the same operations run by NumPy, element by element."""
    library = _loaded(EIGHT_BIT, "test_lengths", ["-DAHEAD=0"])
    _assert_same_bits(_blocks(library, 7, length), _blocks_in_numpy(7, length))
