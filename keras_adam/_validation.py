"""Checks for constructor arguments and config fields.

Each check names the argument, the value received and what is allowed, and
returns the value in canonical form (a Python float or bool). The same checks
serve `Adam.__init__` and `Adam.from_config`, so a config can never build an
optimizer that the constructor would refuse.
"""

import math
import numbers

import numpy as np
from keras.optimizers.schedules import LearningRateSchedule


def _is_real(value):
    # bool is an int subclass; `beta_1=True` is a mistake, not the number 1.
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _require_real(name, value, allowed):
    if not _is_real(value):
        raise TypeError(
            f"`{name}` must be {allowed}. "
            f"Received: {name}={value!r} of type {type(value).__name__}"
        )
    return float(value)


def learning_rate(value):
    """A finite float >= 0, a LearningRateSchedule, or a zero-argument callable.

    A value of the wrong type is a ValueError, as `keras.optimizers.Adam`
    raises for it.
    """
    if isinstance(value, LearningRateSchedule) or callable(value):
        return value
    allowed = "a float >= 0, a LearningRateSchedule or a callable"
    if not _is_real(value):
        raise ValueError(
            f"`learning_rate` must be {allowed}. "
            f"Received: learning_rate={value!r} of type {type(value).__name__}"
        )
    lr = float(value)
    if not (math.isfinite(lr) and lr >= 0.0):
        raise ValueError(
            f"`learning_rate` must be {allowed}. Received: learning_rate={value!r}"
        )
    return lr


def unit_interval(name, value):
    """A float in [0, 1), as the decay rates beta_1 and beta_2 must be."""
    beta = _require_real(name, value, "a float in [0, 1)")
    if not 0.0 <= beta < 1.0:  # False for NaN too
        raise ValueError(f"`{name}` must be in [0, 1). Received: {name}={value!r}")
    return beta


def non_negative(name, value, optional=False):
    """A finite float >= 0 (or None when `optional`)."""
    if optional and value is None:
        return None
    allowed = "a finite float >= 0" + (" or None" if optional else "")
    x = _require_real(name, value, allowed)
    if not (math.isfinite(x) and x >= 0.0):
        raise ValueError(f"`{name}` must be {allowed}. Received: {name}={value!r}")
    return x


def boolean(name, value):
    """A real bool: 0, 1, "yes" or None are refused rather than guessed at."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"`{name}` must be a bool (True or False). "
            f"Received: {name}={value!r} of type {type(value).__name__}"
        )
    return bool(value)


def integer(minimum):
    """A check for an int >= `minimum` (a bool, a float or a string is refused)."""
    def check(name, value):
        if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)) \
                or value < minimum:
            raise ValueError(
                f"`{name}` must be an int >= {minimum}. Received: {name}={value!r}"
            )
        return int(value)
    return check


def optional_boolean(name, value):
    """None (meaning: choose automatically) or a real bool."""
    return None if value is None else boolean(name, value)


def choice(name, value, allowed):
    """One of the strings in `allowed`."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(
            f"`{name}` must be one of {tuple(allowed)}. Received: {name}={value!r}"
        )
    return value


def one_of(allowed, optional=False):
    """A check for one of the strings in `allowed` (or None when `optional`)."""
    def check(name, value):
        if optional and value is None:
            return None
        return choice(name, value, allowed)
    return check


def decay_exclusions(value):
    """{"var_names": [str], "var_indices": [int >= 0]}: weight-decay exclusions in a config."""
    kinds = {"var_names": (str, "strings"), "var_indices": (int, "ints >= 0")}
    if not isinstance(value, dict) or set(value) - set(kinds):
        raise ValueError(
            "`exclude_from_weight_decay` must be None or a dict with keys "
            f"{tuple(kinds)}, each a list. Received: exclude_from_weight_decay={value!r}"
        )
    out = {}
    for key, (kind, words) in kinds.items():
        items = value.get(key) or []
        if not isinstance(items, (list, tuple)) or not all(
            isinstance(x, kind) and not isinstance(x, bool) and (kind is str or x >= 0)
            for x in items
        ):
            raise ValueError(
                f"`exclude_from_weight_decay[{key!r}]` must be a list of {words}. "
                f"Received: {items!r}"
            )
        out[key] = list(items)
    return out
