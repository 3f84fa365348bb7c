"""Which variables decoupled weight decay skips, recorded so that a saved optimizer keeps it.

Keras's `exclude_from_weight_decay(var_list=..., var_names=...)` keeps its
exclusions in the optimizer object only: a reloaded optimizer decays every
variable again. keras_adam records them in `get_config()` as

    {"var_names": [name patterns], "var_indices": [positions]}

where a position counts among the variables the optimizer is built with
(a reloaded model has them in the same order), and applies the positions
itself on load.
"""

import warnings

from keras_adam import _validation as check


class Exclusions:
    """Weight-decay exclusions as `get_config()` records them.

    Args:
        var_names: the name patterns given to `exclude_from_weight_decay`.
        var_indices: positions excluded by a loaded config.
        recorded: whether there are exclusions to record at all (the config
            field is None if not).
    """

    def __init__(self, var_names=(), var_indices=(), recorded=False):
        self.var_names = list(var_names)
        self.var_indices = list(var_indices)
        self.recorded = recorded

    @classmethod
    def from_config(cls, value):
        """From a config's `exclude_from_weight_decay` field (checked first; None: no
        exclusions)."""
        if value is None:
            return cls()
        value = check.decay_exclusions(value)
        return cls(value["var_names"], value["var_indices"], recorded=True)

    def excludes(self, index):
        """Whether a loaded config excluded the variable at position `index`."""
        return index in self.var_indices

    def config(self, variable_keys, keras_excluded):
        """The config field.

        Args:
            variable_keys: Keras's key (`_var_key`) of each variable the
                optimizer is built with, in order; None before `build`
                (positions are not known yet).
            keras_excluded: the keys Keras excludes by `var_list`.
        """
        if not self.recorded:
            return None
        positions = set(self.var_indices)
        if variable_keys is None and keras_excluded:
            warnings.warn(
                "Variables excluded from weight decay by `var_list` are saved by their "
                "position once the optimizer is built; this optimizer is not built yet, "
                "so its config does not hold them.", stacklevel=4)
        positions |= {i for i, key in enumerate(variable_keys or ()) if key in keras_excluded}
        return {"var_names": list(self.var_names), "var_indices": sorted(positions)}
