"""keras_adam's own options: validated on every assignment, fixed after build where they must be.

`Adam`'s constructor arguments beyond `keras.optimizers.Optimizer`'s live in
one `Options` record. Each field is checked as the constructor checks it
(`keras_adam._validation`), on construction and on every later assignment
(`optimizer.beta_1 = 0.95`), and a refused assignment leaves the old value.
Combinations that cannot mean what they say are refused too (`fused=True`
where no kernel computes the rule, the 8-bit options without 8-bit moments).

Some options decide which variables `build` creates, and in which dtype and
layout: once the optimizer is built (`fix`), they cannot change. Everything
else that follows from the options (which path updates each variable) is
derived from them when it is needed, so nothing has to be kept in sync.
"""

import copy

from keras_adam import _groups
from keras_adam import _quantize
from keras_adam import _rounding
from keras_adam import _rule
from keras_adam import _sparse
from keras_adam import _state
from keras_adam import _validation as check
from keras_adam import backends
from keras_adam._state import EIGHT_BIT
from keras_adam._state import MIN_8BIT_SIZE

# name: (check, default). The order is the constructor's.
FIELDS = {
    "beta_1": (check.unit_interval, 0.9),
    "beta_2": (check.unit_interval, 0.999),
    "epsilon": (check.non_negative, 1e-7),
    "amsgrad": (check.boolean, False),
    "nesterov": (check.boolean, False),
    "bias_correction": (check.boolean, True),
    "epsilon_placement": (check.one_of(_rule.EPSILON_PLACEMENTS), "hat"),
    "sparse_updates": (check.one_of(_sparse.SPARSE_UPDATES), "exact"),
    "moment_dtype": (check.one_of(_state.MOMENT_DTYPES, optional=True), None),
    "fused": (check.optional_boolean, None),
    "skip_nonfinite": (check.boolean, False),
    "shard_state": (check.boolean, False),
    "moment_block_size": (check.integer(minimum=1), _quantize.BLOCK_SIZE),
    "min_8bit_size": (check.integer(minimum=0), MIN_8BIT_SIZE),
    "weight_rounding": (check.one_of(_rounding.ROUNDINGS, optional=True), None),
    "groups": (lambda name, value: _groups.validate(value), None),
}

# These decide the optimizer's variables (m, v, v_max, the 8-bit scales, the
# compensations, skipped_steps, the rounding seed): their number, dtype and layout.
# `groups` too: they assign each variable its group (and its moments' dtype).
FIXED_AFTER_BUILD = ("amsgrad", "moment_dtype", "skip_nonfinite", "shard_state",
                     "moment_block_size", "min_8bit_size", "weight_rounding", "groups")


class Options:
    """The values of `FIELDS`, each validated, and their combination checked.

    Args:
        **values: a value for each name in `FIELDS` (missing ones take the
            default).

    Raises:
        ValueError, TypeError: as the constructor documents, naming the
            argument.
    """

    def __init__(self, **values):
        unknown = set(values) - set(FIELDS)
        if unknown:
            raise TypeError(f"Unknown option(s): {sorted(unknown)}")
        self._values = {}
        self._fixed = False
        for name, (validate, default) in FIELDS.items():
            self._values[name] = validate(name, values.get(name, default))
        self._hyper = _check_combination(self._values)

    def __getitem__(self, name):
        return self._values[name]

    def set(self, name, value):
        """Assigns one option after checking it; a refused value changes nothing."""
        value = FIELDS[name][0](name, value)
        if self._fixed and name in FIXED_AFTER_BUILD and value != self._values[name]:
            raise ValueError(
                f"`{name}` cannot change once the optimizer is built: its variables "
                "(m, v, v_max, skipped_steps) already exist in their layout and dtype. "
                "Create a new optimizer instead."
            )
        candidate = dict(self._values, **{name: value})
        self._hyper = _check_combination(candidate)
        self._values = candidate

    def fix(self):
        """From now on (the optimizer is built) `FIXED_AFTER_BUILD` cannot change."""
        self._fixed = True

    def hyper(self):
        """The rule's hyperparameters as a frozen record (what the update paths receive);
        made once per change of the options, since every step asks for it."""
        return self._hyper

    def config(self):
        """{name: value} for every field, as `get_config` records them."""
        return copy.deepcopy(self._values)


def _check_combination(values):
    """Refuses combinations that cannot mean what they say; returns their `Hyper`."""
    eight_bit = values["moment_dtype"] == EIGHT_BIT
    in_a_group = any(overrides.get("moment_dtype") == EIGHT_BIT
                     for overrides in (values["groups"] or {}).values())
    if eight_bit and values["fused"]:
        raise ValueError(
            "`fused=True` and `moment_dtype='8bit'` cannot be combined: the fused "
            "kernels update float m and v in place, and 8-bit moments are stored as "
            "codes with a scale per block. Use fused=None (variables that keep "
            "float32 moments still take the kernel) or another moment_dtype."
        )
    if not (eight_bit or in_a_group) and (values["moment_block_size"] != _quantize.BLOCK_SIZE
                          or values["min_8bit_size"] != MIN_8BIT_SIZE):
        raise ValueError(
            "`moment_block_size` and `min_8bit_size` apply only with "
            "moment_dtype='8bit' (for the optimizer or a group). Received: "
            f"moment_dtype={values['moment_dtype']!r}, "
            f"moment_block_size={values['moment_block_size']}, "
            f"min_8bit_size={values['min_8bit_size']}"
        )
    hyper = _rule.Hyper(**{name: values[name] for name in _rule.HYPER_FIELDS})
    # Raises where fused=True cannot hold for these options.
    backends.fast_path(hyper, values["fused"])
    return hyper
