"""Where Adam's state lives: the slots m, v, v_max of each variable, read and written here only.

The rule (`keras_adam._rule.rule`) takes m, v and v_max as arrays of the
update's compute dtype and returns new ones; how they are stored is this
module's business. Every path goes through one `Storage` object, which
knows the slots by the model variable's position i among the variables the
optimizer is built with:

    storage.create(variables, add_like, add_new, overwritten)
    storage.read(i, rows=None, bound=None)        -> (m, v, v_max) in compute dtype
    storage.write(i, m, v, v_max, rows=None)
    storage.subtract(i, variable, delta, assign_sub, rows=None)   theta <- theta - delta
    storage.slots(i)                              -> the Keras variables themselves
    storage.held(i)                               -> per slot, the variables holding it
    storage.decode(i, values, bound=None)         -> `read` as a function of their tensors
    storage.encode(i, m, v, v_max)                -> the tensors `write` would assign
    storage.state_variables(i)                    -> {role: variable}, scales included
    storage.in_place_reason(variable)             -> why a fused kernel may not
                                                     update the slots in place, or None

`rows` selects rows of a row-sparse update (the lazy sparse path); `bound`
is the rule's moment bound K for this step (`keras_adam._rule.moment_bound`),
which 8-bit storage needs when it reads. A storage format is one subclass:
`StoredAs` (another dtype) and `Blockwise8bit` (8-bit codes with a scale
per block, `keras_adam._quantize`) override `_new_slot` or `_stored_dtype`,
`compute_dtype`, `in_place_reason`, and `_decode_values`/`_encode_values`
(with `_held` where a slot is held in several variables; `given_shapes` and
`_decode_given`/`_encode_given` where its tensors can be given in a shape
that serves every variable, for a compiled function of any length); no
update path changes. Where the slots live across devices is the
`placement`'s business (`keras_adam._sharding`). With `groups` that set
different `moment_dtype`s, `Grouped` holds one format per dtype and routes
each call by the model variable's position.

A storage object never holds the optimizer: it receives the functions that
create variables (`create`) and the one that assigns them (the optimizer's
`assign`, which is tf.distribute-aware and scatters row updates on
TensorFlow).

The slots are created in the order of `keras.optimizers.Adam` in Keras 3.15
(after the base class's variables: m and v interleaved per model variable,
then all v_max; with 8-bit moments each quantized slot is followed by its
scales, `<path>_m_scale`). `.keras` files store optimizer variables by
position, so this order is part of the file format. (`Grouped` creates each
format's slots in turn, in this order within each.)
"""

import copy
import dataclasses
import math
import warnings

import keras
from keras import ops

from keras_adam import _quantize
from keras_adam import _rounding
from keras_adam import _rule
from keras_adam import _sharding
from keras_adam import backends

# The dtypes `Adam(moment_dtype=...)` may store the moments in.
MOMENT_DTYPES = ("float32", "bfloat16", "float16", "8bit")
EIGHT_BIT = "8bit"
# With "8bit", variables with fewer elements keep float32 moments (`Blockwise8bit`).
MIN_8BIT_SIZE = 4096


class Storage:
    """m, v (and v_max) in each variable's own dtype, as `keras.optimizers.Adam` stores them.

    Args:
        amsgrad: whether v_max slots exist.
        assign: `assign(variable, value)`, the optimizer's assignment (a
            row-sparse `value` assigns those rows only).
        placement: the slots' device layout (`keras_adam._sharding.Placement`);
            defaults to each variable's own layout, as Keras's.
        weight_rounding: the `weight_rounding` option: how a 16-bit float
            variable (and its moments stored in 16 bits) is written
            (`keras_adam._rounding`). Defaults to None.
    """

    # Whether `read` uses the moment bound (callers skip computing it if not).
    needs_bound = False

    def __init__(self, amsgrad, assign, placement=None, weight_rounding=None):
        self.amsgrad = amsgrad
        self.placement = placement or _sharding.Placement(shard=False)
        self.weight_rounding = weight_rounding
        self._assign = assign
        self._variables = None
        self._slots = None
        self._compensation = None
        # Each variable's position among all the optimizer's (`Grouped` sets
        # them where a format holds some variables only): its random stream.
        self.positions = None
        self._dtypes = {}  # `step_dtypes`'

    def create(self, var_list, add_like, add_new, overwritten):
        """Creates the slots for `var_list` (see the module docstring for the order).

        Args:
            var_list: the model variables, in the optimizer's order.
            add_like: `add_like(variable, name)` creates a variable shaped,
                typed and placed as `variable` (Keras's
                `add_variable_from_reference`).
            add_new: `add_new(shape=, dtype=, layout=, name=)` creates one
                variable (Keras's `add_variable`).
            overwritten: predicate for the variables Keras overwrites with
                their gradient; they get no slots (None).
        """
        def slots(names):
            made = {name: [] for name in names}
            for variable in var_list:  # m and v interleaved per variable
                for name in names:
                    made[name].append(None if overwritten(variable) else
                                      self._new_slot(variable, name, add_like, add_new))
            return [made[name] for name in names]

        m, v = slots(["m", "v"])
        v_max = slots(["v_max"])[0] if self.amsgrad else [None] * len(m)
        # Kahan compensations, in the variable's dtype and layout, after
        # every slot (files of other roundings keep their layout).
        self._compensation = [
            add_like(variable, "compensation")
            if self.rounding(variable) == "compensated" and not overwritten(variable)
            else None for variable in var_list]
        self._variables = list(var_list)
        self._slots = list(zip(m, v, v_max))
        for index in range(len(var_list)):  # at build, outside any autocast scope
            self.step_dtypes(index)

    def _new_slot(self, variable, name, add_like, add_new):
        """The slot `name` of `variable`: the name `keras.optimizers.Adam` gives
        it, the stored dtype (`_stored_dtype`) and its placement's layout."""
        dtype = self._stored_dtype(variable)
        layout = self.placement.layout(variable)
        if dtype == variable.dtype and layout is getattr(variable, "_layout", None):
            # Keras's own way: on TensorFlow it also colocates the
            # slot with its variable (parameter servers).
            return add_like(variable, name)
        return add_new(shape=variable.shape, dtype=dtype, layout=layout,
                       name=f"{variable.path.replace('/', '_')}_{name}")

    def slots(self, index):
        """The (m, v, v_max) Keras variables of model variable `index`; v_max is
        None without amsgrad, all three for a variable Keras overwrites."""
        return self._slots[index]

    def held(self, index):
        """The Keras variables holding model variable `index`'s m, v and v_max: a
        tuple per slot (empty where there is none), in the order `decode` takes
        their tensors and `encode` returns them (8-bit: the codes, then the scales)."""
        return tuple(() if slot is None else self._held(slot) for slot in self.slots(index))

    def _held(self, slot):
        return (slot,)

    def decode(self, index, values, bound=None, given=False):
        """`read(index, bound=bound)` as a pure function of `values`, the tensors of
        `held(index)` (in their `given_shapes` if `given`): it reads no variable,
        so that a compiler can fuse it with the rule (`keras_adam._whole`)."""
        dtype = self.compute_dtype(self._variables[index])
        decode = self._decode_given if given else self._decode_values
        return tuple(decode(slot, held, dtype) if held else None
                     for slot, held in zip(self.slots(index), values))

    def encode(self, index, m, v, v_max, noise=None, given=False):
        """What `write(index, m, v, v_max, noise=noise)` assigns to `held(index)`, as a
        pure function (of m, v, v_max in the variable's `given_shapes` if `given`)."""
        encode = self._encode_given if given else self._encode_values
        return tuple(
            () if slot is None else
            encode(slot, self._rounded(value, slot, index, kind + 1, None, noise))
            for kind, (slot, value) in enumerate(zip(self.slots(index), (m, v, v_max))))

    def layout_key(self, index, shapes=True):
        """What `decode` and `encode` depend on besides their tensors: equal keys
        mean one compiled function serves both variables (`keras_adam._whole`).
        Without `shapes`, for a function that takes the tensors in their
        `given_shapes`, of any length."""
        return (type(self), self.compute_dtype(self._variables[index]), tuple(
            tuple((h.dtype, tuple(h.shape) if shapes else None) for h in held)
            for held in self.held(index)))

    def stand_in(self, index):
        """A copy of this storage whose variable 0 stands for model variable `index`:
        the same `decode`, `encode` and `round_weight` (their tensors are
        arguments) from the shapes and dtypes of its variable and slots alone.

        It holds no variable, so that a compiled function made from it may serve
        other optimizers' variables of the same `layout_key` (`keras_adam._whole`)
        without keeping this optimizer's variables alive.
        """
        twin = copy.copy(self)
        twin._assign, twin.positions = None, None
        twin._variables = [_Spec.of(self._variables[index])]
        twin._slots = [tuple(None if s is None else _Spec.of(s) for s in self.slots(index))]
        twin._compensation, twin._dtypes = [None], {0: self.step_dtypes(index)}
        return twin

    def given_shapes(self, index):
        """(the variable's, (each of `held(index)`'s, per slot)): shapes in which
        `decode`, `encode` and `round_weight` of model variable `index` may be
        given its tensors (with `given=True`), -1 standing for any length, so
        that one compiled function serves every variable of a layout; or None.

        Here every one is flat: they work element by element, each element's
        random stream from its position in the tensor given, which flattening
        keeps.
        """
        return (-1,), tuple(tuple((-1,) for _ in held) for held in self.held(index))

    def state_variables(self, index):
        """{role: Keras variable} for every variable holding model variable `index`'s state.

        The roles are "m", "v", "v_max" here; a format that stores more (the
        8-bit scales) adds its own. `keras_adam._saving` names them in files.
        """
        state = {role: slot for role, slot in zip(("m", "v", "v_max"), self.slots(index))
                 if slot is not None}
        if self._compensation[index] is not None:
            state["compensation"] = self._compensation[index]
        return state

    def rounding(self, variable):
        """How `variable` is written: "nearest", "stochastic" or "compensated"."""
        return _rounding.rounding_for(keras.backend.standardize_dtype(variable.dtype),
                                      self.weight_rounding)

    def step_dtypes(self, index):
        """(model variable `index`'s dtype; how it is written, `rounding`; the dtype
        of its update's arithmetic, `compute_dtype`; whether a moment of it is
        stored in 16 bits): fixed once its slots exist, and asked for at every
        step. Worked out once per variable, when its slots are made: a Keras
        variable's `dtype` consults the autocast scope (some microseconds, for
        each of a step's variables), and reads the scope's dtype within one."""
        if index not in self._dtypes:
            variable = self._variables[index]
            self._dtypes[index] = (
                keras.backend.standardize_dtype(variable.dtype), self.rounding(variable),
                self.compute_dtype(variable),
                any(slot is not None and
                    keras.backend.standardize_dtype(slot.dtype) in _rounding.SIXTEEN_BIT
                    for slot in self.slots(index)))
        return self._dtypes[index]

    def _stored_dtype(self, variable):
        return variable.dtype

    def compute_dtype(self, variable):
        """The dtype of the update's arithmetic for `variable`: its own, or float32
        where a 16-bit variable is written with stochastic or compensated rounding."""
        dtype = keras.backend.standardize_dtype(variable.dtype)
        return dtype if self.rounding(variable) == "nearest" else _rule.wide_dtype(dtype)

    def in_place_reason(self, variable):
        """Why a fused kernel may not update the slots in place, or None.

        Fused kernels read and write m and v as arrays of the variable's dtype.
        """
        return None

    def read(self, index, rows=None, bound=None):
        """(m, v, v_max) of model variable `index` (or of its `rows`) in the compute dtype.

        `bound` is this step's moment bound K (`_rule.moment_bound`), or None;
        only a format whose storage can break the bound uses it.
        """
        dtype = self.compute_dtype(self._variables[index])
        return tuple(
            None if slot is None else self._decode(slot, dtype, rows)
            for slot in self.slots(index)
        )

    def write(self, index, m, v, v_max, rows=None, noise=None):
        """Stores new m, v (and v_max) for model variable `index` (or for its `rows`).

        `noise` is (seed, t) where the variable is written with stochastic or
        compensated rounding: moments stored in 16 bits are then rounded
        stochastically too, so that their small updates survive as well.
        """
        for kind, (slot, value) in enumerate(zip(self.slots(index), (m, v, v_max))):
            if slot is not None:
                value = self._rounded(value, slot, index, kind + 1, rows, noise)
                self._assign(slot, self._encode(slot, value, rows))

    def round_weight(self, index, target, noise):
        """Model variable `index`'s new value, in its dtype, from the float32 `target`,
        written by its stochastic rounding (stream kind 0), as a pure function of
        `target` and `noise` (`keras_adam._whole`)."""
        return self._rounded(target, self._variables[index], index, 0, None, noise)

    def _rounded(self, value, slot, index, kind, rows, noise):
        """`value` stochastically rounded to a 16-bit `slot`'s dtype where `noise` says so
        (`slot`: a moment slot, or the variable itself for kind 0)."""
        dtype = keras.backend.standardize_dtype(slot.dtype)
        if noise is None or dtype not in _rounding.SIXTEEN_BIT:
            return value
        value = ops.cast(value, "float32")
        if dtype == "bfloat16":  # the cheap form, exact for bfloat16 (`stochastic_bfloat16`)
            return _rounding.stochastic_bfloat16(value, self._bits(value, index, kind, rows, noise))
        u = self._uniform(value, index, kind, rows, noise)
        return _rounding.stochastic(value, dtype, u)

    def _uniform(self, value, index, kind, rows, noise):
        return _rounding.uniform_from_bits(self._bits(value, index, kind, rows, noise))

    def _bits(self, value, index, kind, rows, noise):
        seed, t, stream, elements = self._stream(index, kind, rows, noise, value)
        key = noise.key(kind, ops.shape(value)) if isinstance(noise, _rounding.Keys) else None
        return _rounding.random_bits(seed, t, stream, elements, key)

    def _stream(self, index, kind, rows, noise, value):
        # One stream per (variable, slot): kind 0 is the variable, 1-3 m, v, v_max.
        # `noise` is (seed, t), or the streams' keys (`_rounding.Keys`, for a
        # compiled function that serves several variables: `keras_adam._whole`).
        if isinstance(noise, _rounding.Keys):
            # A compiled function's (`keras_adam._whole`): the tensor may be the
            # variable flattened or in rows, whose positions are the same, or
            # variables' rows joined (`Keys.index`).
            return None, None, None, noise.index(ops.shape(value))
        elements = _rounding.element_index(self._variables[index].shape, rows)
        seed, t = noise
        return seed, t, 4 * self.position(index) + kind, elements

    def stream_count(self):
        """The number of random streams: four per variable of the optimizer."""
        return 4 * (len(self._variables) if self.positions is None else
                    max(self.positions, default=-1) + 1)

    def position(self, index):
        """Model variable `index`'s position among all the optimizer's variables."""
        return index if self.positions is None else self.positions[index]

    def moment_noise(self, index, noise, t):
        """How model variable `index`'s moments stored in 16 bits are written (`write`'s
        `noise`; None where none is stored in 16 bits).

        With the variable's own noise where it is written by a rounding; for a
        float32 or float64 variable (`moment_dtype="bfloat16"`), stochastically
        with seed 0: a bfloat16 v <- beta_2 v + (1 - beta_2) g^2 written to
        nearest stops moving once (1 - beta_2) g^2 is under half an ulp of v
        (v stalls at 0.25 g^2 with beta_2 = 0.999), and stochastic rounding
        keeps E[v] on the float32 trajectory. The streams depend on the step
        and the position only, so a run repeats and resumes bit for bit. A
        16-bit variable written to nearest keeps nearest moments (None).
        """
        dtype, _, _, sixteen = self.step_dtypes(index)
        if noise is not None or not sixteen:  # no 16-bit moment: nothing to draw
            return noise
        return None if dtype in _rounding.SIXTEEN_BIT else (0, t)

    def subtract(self, index, variable, delta, assign_sub, rows=None, decay=None, noise=None):
        """theta <- theta - delta for model variable `index` (or its `rows`), by its rounding.

        Args:
            delta: the rule's step, in the compute dtype.
            assign_sub: the optimizer's `assign_sub` (scatters row updates).
            rows: the rows a lazy sparse update touches, or None.
            decay: (weight_decay, lr) where decoupled decay is applied here,
                to the same theta as the step (Keras decays just before it):
                theta <- theta - delta - lr * weight_decay * theta.
            noise: (seed, t) for a 16-bit variable written with stochastic or
                compensated rounding: the new value is computed in float32
                from theta (+ its compensation) and written by
                `keras_adam._rounding`. None: rounded to nearest.
        """
        if noise is not None or decay is not None:
            dtype = self.compute_dtype(variable)
            theta = variable if rows is None else backends.gather_rows(variable, rows)
            theta = ops.cast(theta, dtype)
            compensation = self._compensation[index]
            if compensation is not None:  # Kahan: theta's lost low bits
                c = compensation if rows is None else backends.gather_rows(compensation, rows)
                theta = theta + ops.cast(c, dtype)
            if decay is not None:
                weight_decay, lr = decay
                delta += theta * ops.cast(weight_decay, dtype) * lr
        if noise is None:
            delta = ops.cast(delta, variable.dtype)
            return assign_sub(variable, delta if rows is None else
                              backends.row_slices(delta, rows))
        target = theta - delta
        dtype = keras.backend.standardize_dtype(variable.dtype)
        if compensation is None:
            values = self._rounded(target, variable, index, 0, rows, noise)
        else:
            values, c = _rounding.compensated(target, dtype)
            self._assign(compensation, c if rows is None else backends.row_slices(c, rows))
        self._assign(variable, values if rows is None else backends.row_slices(values, rows))

    def _decode(self, slot, dtype, rows):
        stored = slot if rows is None else backends.gather_rows(slot, rows)
        return self._decode_values(slot, (stored,), dtype)

    def _decode_values(self, slot, values, dtype):
        return ops.cast(values[0], dtype)

    def _decode_given(self, slot, values, dtype):
        # `_decode_values` of tensors in their `given_shapes`: the same where the
        # format works element by element.
        return self._decode_values(slot, values, dtype)

    def _encode(self, slot, value, rows):
        (value,) = self._encode_values(slot, value)
        return value if rows is None else backends.row_slices(value, rows)

    def _encode_values(self, slot, value):
        return (ops.cast(value, slot.dtype),)

    def _encode_given(self, slot, value):
        return self._encode_values(slot, value)


class StoredAs(Storage):
    """m, v (and v_max) stored in one dtype (`moment_dtype`), whatever the variable's.

    The update is computed in float32 (float64 for float64 variables) and the
    moments are rounded to `dtype` when stored: float32 moments keep
    bfloat16/float16 variables accurate; bfloat16 moments halve the state of
    float32 variables.
    """

    def __init__(self, amsgrad, assign, dtype, placement=None, weight_rounding=None):
        super().__init__(amsgrad, assign, placement, weight_rounding)
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


class Blockwise8bit(Storage):
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
    quantization kept it. The reader passes K (`bound`).

    Variables with fewer than `min_size` elements keep float32 moments (the
    variable's dtype for float64), as `StoredAs("float32")`: their state is
    small, their blocks would be mostly scale, and biases and norms are
    where precision matters most.

    Args:
        amsgrad, assign, placement: as for `Storage`.
        block_size: elements per block (B).
        min_size: the fewest elements a variable needs to be quantized.
    """

    needs_bound = True

    def __init__(self, amsgrad, assign, placement=None, block_size=_quantize.BLOCK_SIZE,
                 min_size=MIN_8BIT_SIZE, weight_rounding=None):
        super().__init__(amsgrad, assign, placement, weight_rounding)
        self.block_size = block_size
        self.min_size = min_size
        # id(code slot) -> (its scale variable, `Blocking`, signed)
        self._codes = {}
        # Whole variables: the codec compiled as one cluster (a number of rows
        # that varies per step would compile again each time: left as ops).
        self._encode_whole = backends.compiled(_quantize.encode)
        self._decode_whole = backends.compiled(_quantize.decode)

    def create(self, var_list, add_like, add_new, overwritten):
        """As `Storage.create`; warns, naming `min_8bit_size`, when no variable is
        large enough to be quantized (then every moment stays float32)."""
        super().create(var_list, add_like, add_new, overwritten)
        candidates = [v for v in var_list if not overwritten(v)]
        if candidates and not any(self.quantizes(v) for v in candidates):
            largest = max(math.prod(v.shape) for v in candidates)
            warnings.warn(
                f"moment_dtype='8bit' quantizes none of the {len(candidates)} variables: "
                f"the largest has {largest} elements, fewer than min_8bit_size="
                f"{self.min_size}, so every moment stays float32. Lower min_8bit_size to "
                "store them in 8 bits.", stacklevel=4)

    def quantizes(self, variable):
        """Whether `variable`'s moments are stored as 8-bit codes (never for an empty one)."""
        return math.prod(variable.shape) >= max(self.min_size, 1)

    def _stored_dtype(self, variable):
        return _rule.wide_dtype(keras.backend.standardize_dtype(variable.dtype))

    def _new_slot(self, variable, name, add_like, add_new):
        if not self.quantizes(variable):
            return super()._new_slot(variable, name, add_like, add_new)
        signed = name == "m"
        prefix = f"{variable.path.replace('/', '_')}_{name}"
        codes = add_new(shape=variable.shape, dtype="int8" if signed else "uint8",
                        layout=self.placement.layout(variable), name=prefix)
        blocks = _quantize.blocking(variable.shape, self.block_size)
        scale = add_new(shape=blocks.scale_shape, dtype="float32",
                        layout=self.placement.replicated(blocks.scale_shape),
                        name=f"{prefix}_scale")
        self._codes[id(codes)] = (scale, blocks, signed)
        return codes

    def state_variables(self, index):
        state = super().state_variables(index)
        for role, slot in list(state.items()):
            if id(slot) in self._codes:
                state[f"{role}_scale"] = self._codes[id(slot)][0]
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

    def read(self, index, rows=None, bound=None):
        return self._floored(index, *super().read(index, rows), bound)

    def decode(self, index, values, bound=None, given=False):
        return self._floored(index, *super().decode(index, values, given=given), bound)

    def _floored(self, index, m, v, v_max, bound):
        # v and v_max raised to m^2 / K (see the class docstring).
        if m is None or bound is None or not self.quantizes(self._variables[index]):
            return m, v, v_max
        floor = m * m / ops.cast(bound, m.dtype)
        return (m, ops.maximum(v, floor),
                None if v_max is None else ops.maximum(v_max, floor))

    def layout_key(self, index, shapes=True):
        return (super().layout_key(index, shapes), self.block_size, self.min_size)

    def stand_in(self, index):
        twin = super().stand_in(index)
        twin._codes = {id(spec): (None,) + self._codes[id(slot)][1:]
                       for spec, slot in zip(twin._slots[0], self.slots(index))
                       if slot is not None and id(slot) in self._codes}
        return twin

    def given_shapes(self, index):
        """Flat where the moments are not quantized. Codes are decoded per block of a
        row (`_quantize.blocking`): where a row is whole blocks of L elements,
        the variable and its codes are given as (-1, L), one block per row, and
        the scales as (-1, 1); where a row ends in a shorter block, None."""
        if not self.quantizes(self._variables[index]):
            return super().given_shapes(index)
        # The blocking made with the codes (asked every step: no divisor search).
        blocks = self._codes[id(self.slots(index)[0])][1]
        if blocks.blocks_per_row * blocks.block_length != blocks.cols:
            return None
        rows = (-1, blocks.block_length)
        return rows, tuple(
            tuple(rows if h is slot else (-1, 1) for h in held) if slot is not None else ()
            for slot, held in zip(self.slots(index), self.held(index)))

    def _held(self, slot):
        return (slot, self._codes[id(slot)][0]) if id(slot) in self._codes else (slot,)

    def _decode_values(self, slot, values, dtype, decode=_quantize.decode, blocks=None):
        if id(slot) not in self._codes:
            return super()._decode_values(slot, values, dtype)
        _, stored, signed = self._codes[id(slot)]
        blocks = stored if blocks is None else blocks
        return ops.cast(decode(values[0], values[1], signed, blocks), dtype)

    def _encode_values(self, slot, value, encode=_quantize.encode, blocks=None):
        if id(slot) not in self._codes:
            return super()._encode_values(slot, value)
        _, stored, signed = self._codes[id(slot)]
        blocks = stored if blocks is None else blocks
        return encode(ops.cast(value, "float32"), signed, blocks)

    # Codes given one block per row (`given_shapes`): the blocking is the tensors' shape.
    def _decode_given(self, slot, values, dtype):
        if id(slot) not in self._codes:
            return super()._decode_given(slot, values, dtype)
        return self._decode_values(
            slot, values, dtype, blocks=_quantize.row_blocking(ops.shape(values[0])))

    def _encode_given(self, slot, value):
        if id(slot) not in self._codes:
            return super()._encode_given(slot, value)
        return self._encode_values(slot, value, blocks=_quantize.row_blocking(ops.shape(value)))

    def _decode(self, slot, dtype, rows):
        if id(slot) not in self._codes:
            return super()._decode(slot, dtype, rows)
        scale = self._codes[id(slot)][0]
        if rows is None:
            return self._decode_values(slot, (slot.value, scale.value), dtype,
                                       decode=self._decode_whole)
        values = (backends.gather_rows(slot, rows), backends.gather_rows(scale, rows))
        return self._decode_values(slot, values, dtype)

    def write(self, index, m, v, v_max, rows=None, noise=None):
        if not self.quantizes(self._variables[index]):
            return super().write(index, m, v, v_max, rows, noise)
        for slot, value in zip(self.slots(index), (m, v, v_max)):
            if slot is None:
                continue
            scale = self._codes[id(slot)][0]
            if rows is None:
                codes, scales = self._encode_values(slot, value, encode=self._encode_whole)
            else:
                codes, scales = self._encode_values(slot, value)
                codes = backends.row_slices(codes, rows)
                scales = backends.row_slices(scales, rows)
            self._assign(slot, codes)
            self._assign(scale, scales)


@dataclasses.dataclass(frozen=True, eq=False)
class _Spec:
    """A variable's shape and dtype, in its place in a `Storage.stand_in`."""

    shape: tuple
    dtype: str

    @classmethod
    def of(cls, variable):
        return cls(tuple(variable.shape), keras.backend.standardize_dtype(variable.dtype))


def for_options(options, assign, var_list=(), moment_dtypes=None):
    """The storage for an optimizer's `keras_adam._options.Options`.

    Args:
        options: the optimizer's options.
        assign: the optimizer's `assign`.
        var_list: the model variables, in the optimizer's order.
        moment_dtypes: each variable's moment_dtype where groups set them
            (`keras_adam._groups`), or None: `options["moment_dtype"]` for all.
    """
    no_sharding = _sharding.backend_reason()
    if options["shard_state"] and no_sharding is not None:
        warnings.warn(f"`shard_state=True` has no effect here: {no_sharding}.", stacklevel=3)
    amsgrad, rounding = options["amsgrad"], options["weight_rounding"]
    placement = _sharding.Placement(options["shard_state"])

    def storage(moment_dtype):
        if moment_dtype is None:
            return Storage(amsgrad, assign, placement, rounding)
        if moment_dtype == EIGHT_BIT:
            return Blockwise8bit(amsgrad, assign, placement, options["moment_block_size"],
                                 options["min_8bit_size"], rounding)
        return StoredAs(amsgrad, assign, moment_dtype, placement, rounding)

    kinds = list(dict.fromkeys(moment_dtypes or [options["moment_dtype"]]))
    if len(kinds) == 1:
        return storage(kinds[0])
    return Grouped([storage(kind) for kind in kinds],
                   [kinds.index(kind) for kind in moment_dtypes], var_list)


class Grouped:
    """Several storage formats in one optimizer: each variable's moments stored by its
    group's `moment_dtype` (`keras_adam._groups`).

    Every format is a `Storage` of its own over the variables that use it, and
    this object routes each call by the model variable's position. The slots
    are created format by format, in the order of `formats`, each in its own
    order (see the module docstring): the layout of a file follows the groups.

    Args:
        formats: the `Storage` objects, one per moment_dtype in use.
        choice: for each model variable (by position), the index of its format.
        var_list: the model variables, in the optimizer's order.
    """

    def __init__(self, formats, choice, var_list):
        self.formats = list(formats)
        self.amsgrad = self.formats[0].amsgrad
        self.placement = self.formats[0].placement
        self.needs_bound = any(f.needs_bound for f in self.formats)
        self._choice = list(choice)
        self._local = []  # position -> (format, its position there)
        for which, storage in enumerate(self.formats):
            storage.positions = [i for i, c in enumerate(self._choice) if c == which]
        for i, which in enumerate(self._choice):
            storage = self.formats[which]
            self._local.append((storage, storage.positions.index(i)))
        # The calls that receive a model variable find its format by its path.
        self._by_path = {v.path: self.formats[c] for v, c in zip(var_list, self._choice)}

    def create(self, var_list, add_like, add_new, overwritten):
        """Creates every format's slots (see `Storage.create`)."""
        for which, storage in enumerate(self.formats):
            storage.create([v for v, c in zip(var_list, self._choice) if c == which],
                           add_like, add_new, overwritten)

    def _format(self, variable):
        return self._by_path[variable.path]

    def rounding(self, variable):
        return self.formats[0].rounding(variable)

    def compute_dtype(self, variable):
        return self._format(variable).compute_dtype(variable)

    def in_place_reason(self, variable):
        return self._format(variable).in_place_reason(variable)

    def slots(self, index):
        storage, local = self._local[index]
        return storage.slots(local)

    def state_variables(self, index):
        storage, local = self._local[index]
        return storage.state_variables(local)

    def read(self, index, rows=None, bound=None):
        storage, local = self._local[index]
        return storage.read(local, rows, bound)

    def held(self, index):
        storage, local = self._local[index]
        return storage.held(local)

    def decode(self, index, values, bound=None, given=False):
        storage, local = self._local[index]
        return storage.decode(local, values, bound, given)

    def encode(self, index, m, v, v_max, noise=None, given=False):
        storage, local = self._local[index]
        return storage.encode(local, m, v, v_max, noise, given)

    def position(self, index):
        return index

    def stream_count(self):
        return 4 * len(self._choice)

    def moment_noise(self, index, noise, t):
        storage, local = self._local[index]
        return storage.moment_noise(local, noise, t)

    def step_dtypes(self, index):
        storage, local = self._local[index]
        return storage.step_dtypes(local)

    def layout_key(self, index, shapes=True):
        storage, local = self._local[index]
        return storage.layout_key(local, shapes)

    def given_shapes(self, index):
        storage, local = self._local[index]
        return storage.given_shapes(local)

    def stand_in(self, index):
        storage, local = self._local[index]
        return storage.stand_in(local)

    def round_weight(self, index, target, noise):
        storage, local = self._local[index]
        return storage.round_weight(local, target, noise)

    def write(self, index, m, v, v_max, rows=None, noise=None):
        storage, local = self._local[index]
        return storage.write(local, m, v, v_max, rows, noise)

    def subtract(self, index, variable, delta, assign_sub, rows=None, decay=None, noise=None):
        storage, local = self._local[index]
        return storage.subtract(local, variable, delta, assign_sub, rows, decay, noise)
