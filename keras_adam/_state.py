"""Where Adam's state lives: the slots m, v, v_max of each variable, read and written here only.

The rule (`keras_adam._rule.rule`) takes m, v and v_max as arrays of the
update's compute dtype and returns new ones; how they are stored is this
module's business. Every path goes through one `Moments` object:

    moments.read(variable, rows=None)             -> (m, v, v_max) in compute dtype
    moments.write(variable, m, v, v_max, rows=None)
    moments.slots(variable)                       -> the Keras variables themselves
    moments.in_place_reason(variable)             -> why a fused kernel may not
                                                     update the slots in place, or None

`rows` selects rows of a row-sparse update (the lazy sparse path). A new
storage format for the moments (another dtype today, quantized blocks later)
is one subclass that overrides `_create` (or `_stored_dtype`),
`compute_dtype`, `in_place_reason`, `read` and `write`; no update path
changes. Where the slots live across devices is the `placement`'s
business (`keras_adam._sharding`).

The slots are created in the order of `keras.optimizers.Adam` in Keras 3.15
(after the base class's variables: m and v interleaved per model variable,
then all v_max). `.keras` files store optimizer variables by position, so
this order is part of the file format.
"""

import keras
from keras import ops

from keras_adam import _rule
from keras_adam import _sharding
from keras_adam import backends

# The dtypes `Adam(moment_dtype=...)` may store the moments in.
MOMENT_DTYPES = ("float32", "bfloat16", "float16")


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
        """One list per name, one slot per variable (None where Keras overwrites it).

        Each slot gets the name `keras.optimizers.Adam` gives it, the stored
        dtype (`_stored_dtype`) and its placement's layout.
        """
        slots = tuple([] for _ in names)
        for variable in var_list:
            for i, name in enumerate(names):
                if self._owner._overwrite_variable_with_gradient(variable):
                    slots[i].append(None)
                    continue
                dtype = self._stored_dtype(variable)
                layout = self.placement.layout(variable)
                if dtype == variable.dtype and layout is getattr(variable, "_layout", None):
                    # Keras's own way: on TensorFlow it also colocates the
                    # slot with its variable (parameter servers).
                    slot = self._owner.add_variable_from_reference(variable, name)
                else:
                    slot = self._owner.add_variable(
                        shape=variable.shape, dtype=dtype, layout=layout,
                        name=f"{variable.path.replace('/', '_')}_{name}")
                slots[i].append(slot)
        return slots

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


def for_options(optimizer, amsgrad, moment_dtype, shard_state=False):
    """The `Moments` for an optimizer's options."""
    placement = _sharding.Placement(shard_state)
    if moment_dtype is None:
        return Moments(optimizer, amsgrad, placement)
    return StoredAs(optimizer, amsgrad, moment_dtype, placement)
