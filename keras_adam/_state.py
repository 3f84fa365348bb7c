"""Where Adam's state lives: the slots m, v, v_max of each variable, read and written here only.

The rule (`keras_adam._rule.rule`) takes m, v and v_max as arrays of the
update's compute dtype and returns new ones; how they are stored is this
module's business. Every path goes through one `Moments` object:

    moments.read(variable, rows=None)             -> (m, v, v_max) in compute dtype
    moments.write(variable, m, v, v_max, rows=None)
    moments.slots(variable)                       -> the Keras variables themselves
    moments.in_place_reason(variable)             -> why a fused kernel may not
                                                     update the slots in place, or None

`rows` selects rows of a row-sparse update (the lazy sparse path). A storage
format is one subclass: `StoredAs` (another dtype) and `Blockwise8bit`
(8-bit codes with a scale per block, `keras_adam._quantize`) override
`_new_slot` or `_stored_dtype`, `compute_dtype`, `in_place_reason`, and
`read`/`write` or `_decode`/`_encode`; no update path changes. Where the
slots live across devices is the `placement`'s business
(`keras_adam._sharding`).

The slots are created in the order of `keras.optimizers.Adam` in Keras 3.15
(after the base class's variables: m and v interleaved per model variable,
then all v_max; with 8-bit moments each quantized slot is followed by its
scales, `<path>_m_scale`). `.keras` files store optimizer variables by
position, so this order is part of the file format.
"""

import math

import keras
from keras import ops

from keras_adam import _quantize
from keras_adam import _rule
from keras_adam import _sharding
from keras_adam import backends

# The dtypes `Adam(moment_dtype=...)` may store the moments in.
MOMENT_DTYPES = ("float32", "bfloat16", "float16", "8bit")
EIGHT_BIT = "8bit"
# With "8bit", variables with fewer elements keep float32 moments (`Blockwise8bit`).
MIN_8BIT_SIZE = 4096


class Moments:
    """m, v (and v_max) in each variable's own dtype, as `keras.optimizers.Adam` stores them.

    Args:
        optimizer: the owning `keras.optimizers.Optimizer`: it creates the
            variables (`add_variable*`) and assigns them (`assign`, which is
            tf.distribute-aware and scatters row updates on TensorFlow).
        amsgrad: whether v_max slots exist.
        placement: the slots' device layout (`keras_adam._sharding.Placement`);
            defaults to each variable's own layout, as Keras's.
    """

    def __init__(self, optimizer, amsgrad, placement=None):
        self._owner = optimizer
        self.amsgrad = amsgrad
        self.placement = placement or _sharding.Placement(shard=False)
        self._slots = None

    def create(self, var_list):
        """Creates the slots for `var_list` (see the module docstring for the order)."""
        m, v = self._create(var_list, ["m", "v"])
        v_max = self._create(var_list, ["v_max"])[0] if self.amsgrad else [None] * len(m)
        self._slots = list(zip(m, v, v_max))

    def _create(self, var_list, names):
        """One list per name, one slot per variable (None where Keras overwrites it)."""
        slots = tuple([] for _ in names)
        for variable in var_list:
            for i, name in enumerate(names):
                if self._owner._overwrite_variable_with_gradient(variable):
                    slots[i].append(None)
                else:
                    slots[i].append(self._new_slot(variable, name))
        return slots

    def _new_slot(self, variable, name):
        """The slot `name` of `variable`: the name `keras.optimizers.Adam` gives
        it, the stored dtype (`_stored_dtype`) and its placement's layout."""
        dtype = self._stored_dtype(variable)
        layout = self.placement.layout(variable)
        if dtype == variable.dtype and layout is getattr(variable, "_layout", None):
            # Keras's own way: on TensorFlow it also colocates the
            # slot with its variable (parameter servers).
            return self._owner.add_variable_from_reference(variable, name)
        return self._owner.add_variable(
            shape=variable.shape, dtype=dtype, layout=layout,
            name=f"{variable.path.replace('/', '_')}_{name}")

    def state_variables(self, variable):
        """{role: Keras variable} for every variable holding `variable`'s state.

        The roles are "m", "v", "v_max" here; a format that stores more (the
        8-bit scales) adds its own. `keras_adam._saving` names them in files.
        """
        return {kind: slot for kind, slot in zip(("m", "v", "v_max"), self.slots(variable))
                if slot is not None}

    def _stored_dtype(self, variable):
        return variable.dtype

    def slots(self, variable):
        """The (m, v, v_max) Keras variables of a model variable; v_max is None without amsgrad."""
        return self._slots[self._owner._get_variable_index(variable)]

    def compute_dtype(self, variable):
        """The dtype of the update's arithmetic for `variable`."""
        return keras.backend.standardize_dtype(variable.dtype)

    def in_place_reason(self, variable):
        """Why a fused kernel may not update the slots in place, or None.

        Fused kernels read and write m and v as arrays of the variable's dtype.
        """
        return None

    def read(self, variable, rows=None):
        """(m, v, v_max) of `variable` (or of its `rows`) in the compute dtype."""
        dtype = self.compute_dtype(variable)
        return tuple(
            None if slot is None else self._decode(slot, dtype, rows)
            for slot in self.slots(variable)
        )

    def write(self, variable, m, v, v_max, rows=None):
        """Stores new m, v (and v_max) for `variable` (or for its `rows`)."""
        for slot, value in zip(self.slots(variable), (m, v, v_max)):
            if slot is not None:
                self._owner.assign(slot, self._encode(slot, value, rows))

    def _decode(self, slot, dtype, rows):
        stored = slot if rows is None else backends.gather_rows(slot, rows)
        return ops.cast(stored, dtype)

    def _encode(self, slot, value, rows):
        value = ops.cast(value, slot.dtype)
        return value if rows is None else backends.row_slices(value, rows)


class StoredAs(Moments):
    """m, v (and v_max) stored in one dtype (`moment_dtype`), whatever the variable's.

    The update is computed in float32 (float64 for float64 variables) and the
    moments are rounded to `dtype` when stored: float32 moments keep
    bfloat16/float16 variables accurate; bfloat16 moments halve the state of
    float32 variables.
    """

    def __init__(self, optimizer, amsgrad, dtype, placement=None):
        super().__init__(optimizer, amsgrad, placement)
        self.dtype = dtype

    def _stored_dtype(self, variable):
        return self.dtype

    def compute_dtype(self, variable):
        return _rule.wide_dtype(keras.backend.standardize_dtype(variable.dtype))

    def in_place_reason(self, variable):
        dtype = keras.backend.standardize_dtype(variable.dtype)
        if dtype == self.dtype:
            return None
        return (f"the fused kernels keep m and v in the variable's dtype; the variable "
                f"is {dtype} and moment_dtype={self.dtype!r}")


class Blockwise8bit(Moments):
    """m, v (and v_max) as blockwise 8-bit codes with a float32 scale per block (`"8bit"`).

    Each block of `block_size` elements of a row (`keras_adam._quantize`)
    stores 8-bit codes and its absmax s_b: m with the signed quartic table,
    v and v_max with the unsigned one. A step decodes them to float32,
    applies the float32 rule, and encodes the results:

        m = q_m(code) * s_b,  v = q_v(code) * s_b            (read)
        v <- max(v, m^2 / K), v_max <- max(v_max, m^2 / K)   (read)
        m, v, v_max <- rule(g, m, v, v_max)                  (float32)
        s_b, code <- absmax of each block, code rounded in   (write)
                     the table's law (`keras_adam._quantize`)

    The second line is the guard against quantization's one dangerous error:
    the float32 rule keeps m^2 <= K v (`keras_adam._rule.moment_bound`), so
    its step is at most lr * sqrt(K) * sqrt(c2) / c1; a v rounded to 0 where
    m is not would break that and divide by epsilon alone. Raising v to
    m^2 / K restores the float32 rule's own bound, and changes nothing where
    quantization kept it.

    Variables with fewer than `min_size` elements keep float32 moments (the
    variable's dtype for float64), as `StoredAs("float32")`: their state is
    small, their blocks would be mostly scale, and biases and norms are
    where precision matters most.

    Args:
        optimizer, amsgrad, placement: as for `Moments`.
        block_size: elements per block (B).
        min_size: the fewest elements a variable needs to be quantized.
    """

    def __init__(self, optimizer, amsgrad, placement=None, block_size=_quantize.BLOCK_SIZE,
                 min_size=MIN_8BIT_SIZE):
        super().__init__(optimizer, amsgrad, placement)
        self.block_size = block_size
        self.min_size = min_size
        # id(code slot) -> (its scale variable, `Blocking`, signed)
        self._codes = {}
        # Whole variables: the codec fused (rows vary in number: left as ops).
        self._encode_whole = backends.one_pass(_quantize.encode)
        self._decode_whole = backends.one_pass(_quantize.decode)

    def quantizes(self, variable):
        """Whether `variable`'s moments are stored as 8-bit codes (never for an empty one)."""
        return math.prod(variable.shape) >= max(self.min_size, 1)

    def _stored_dtype(self, variable):
        return _rule.wide_dtype(keras.backend.standardize_dtype(variable.dtype))

    def _new_slot(self, variable, name):
        if not self.quantizes(variable):
            return super()._new_slot(variable, name)
        signed = name == "m"
        prefix = f"{variable.path.replace('/', '_')}_{name}"
        codes = self._owner.add_variable(
            shape=variable.shape, dtype="int8" if signed else "uint8",
            layout=self.placement.layout(variable), name=prefix)
        blocks = _quantize.blocking(variable.shape, self.block_size)
        scale = self._owner.add_variable(
            shape=blocks.scale_shape, dtype="float32",
            layout=self.placement.replicated(blocks.scale_shape), name=f"{prefix}_scale")
        self._codes[id(codes)] = (scale, blocks, signed)
        return codes

    def state_variables(self, variable):
        state = super().state_variables(variable)
        for kind, slot in list(state.items()):
            if id(slot) in self._codes:
                state[f"{kind}_scale"] = self._codes[id(slot)][0]
        return state

    def compute_dtype(self, variable):
        return self._stored_dtype(variable)

    def in_place_reason(self, variable):
        if self.quantizes(variable):
            return ("moment_dtype='8bit' stores m and v as 8-bit codes with a scale per "
                    "block; the fused kernels update float m and v in place")
        dtype = keras.backend.standardize_dtype(variable.dtype)
        if self._stored_dtype(variable) != dtype:
            return (f"with moment_dtype='8bit' this variable's moments are float32 (fewer "
                    f"than {self.min_size} elements), and the variable is {dtype}")
        return None

    def read(self, variable, rows=None):
        m, v, v_max = super().read(variable, rows)
        if m is None or not self.quantizes(variable):
            return m, v, v_max
        owner = self._owner
        bound = _rule.moment_bound(owner.beta_1, owner.beta_2, owner.iterations)
        if bound is None:
            return m, v, v_max
        floor = m * m / ops.cast(bound, m.dtype)
        return (m, ops.maximum(v, floor),
                None if v_max is None else ops.maximum(v_max, floor))

    def _decode(self, slot, dtype, rows):
        if id(slot) not in self._codes:
            return super()._decode(slot, dtype, rows)
        scale, blocks, signed = self._codes[id(slot)]
        if rows is None:
            decoded = self._decode_whole(slot.value, scale.value, signed, blocks)
        else:
            codes, scales = backends.gather_rows(slot, rows), backends.gather_rows(scale, rows)
            decoded = _quantize.decode(codes, scales, signed, blocks)
        return ops.cast(decoded, dtype)

    def write(self, variable, m, v, v_max, rows=None):
        if not self.quantizes(variable):
            return super().write(variable, m, v, v_max, rows)
        for slot, value in zip(self.slots(variable), (m, v, v_max)):
            if slot is None:
                continue
            scale, blocks, signed = self._codes[id(slot)]
            encode = _quantize.encode if rows is not None else self._encode_whole
            codes, scales = encode(ops.cast(value, "float32"), signed, blocks)
            if rows is not None:
                codes = backends.row_slices(codes, rows)
                scales = backends.row_slices(scales, rows)
            self._owner.assign(slot, codes)
            self._owner.assign(scale, scales)


def for_options(optimizer, amsgrad, moment_dtype, shard_state=False,
                block_size=_quantize.BLOCK_SIZE, min_8bit_size=MIN_8BIT_SIZE):
    """The `Moments` for an optimizer's options."""
    placement = _sharding.Placement(shard_state)
    if moment_dtype is None:
        return Moments(optimizer, amsgrad, placement)
    if moment_dtype == EIGHT_BIT:
        return Blockwise8bit(optimizer, amsgrad, placement, block_size, min_8bit_size)
    return StoredAs(optimizer, amsgrad, moment_dtype, placement)
