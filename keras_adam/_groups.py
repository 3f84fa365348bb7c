"""`groups`: per-variable hyperparameters in one optimizer, as PyTorch's param groups.

    groups = {
        r".*(bias|gamma|beta)": {"weight_decay": 0.0},
        r"backbone/.*": {"learning_rate_multiplier": 0.1},
        r"embedding/.*": {"moment_dtype": "8bit"},
    }

Each pattern is matched in full against a variable's `path` (as Keras's
`OptimizerMap` matches), in order: the first match wins, and variables that
match no pattern use the optimizer's own values. A group may set:

    learning_rate_multiplier  lr_g = multiplier * lr (lr from the schedule, if
                              any), used wherever the variable uses lr: the
                              step and decoupled weight decay, as torch's
                              per-group lr
    weight_decay              the decoupled decay rate (None: no decay)
    beta_1, beta_2, epsilon   the rule's own
    moment_dtype              how the group's m, v, v_max are stored

Each variable's update is then exactly what a separate optimizer with its
group's values computes, with one step counter t and one state for all:

    theta <- theta - lr_g * weight_decay_g * theta
    theta <- Adam step with (beta_1, beta_2, epsilon)_g and lr_g

Weight-decay exclusions (`exclude_from_weight_decay`) win over a group's
`weight_decay`.
"""

import dataclasses
import functools
import re
import warnings

from keras_adam import _state
from keras_adam import _validation as check

# key: its check (as the constructor checks the argument of the same name).
KEYS = {
    "learning_rate_multiplier": check.non_negative,
    "weight_decay": lambda name, value: check.non_negative(name, value, optional=True),
    "beta_1": check.unit_interval,
    "beta_2": check.unit_interval,
    "epsilon": check.non_negative,
    "moment_dtype": check.one_of(_state.MOMENT_DTYPES, optional=True),
}
# The keys that are fields of the rule's `Hyper`.
HYPER_KEYS = ("beta_1", "beta_2", "epsilon")


def validate(value):
    """The `groups` argument in canonical form: {pattern: {key: value}}, in order.

    Accepts None (no groups), a mapping, or a list of (pattern, overrides)
    pairs. Raises ValueError or TypeError naming the pattern and the key.
    """
    if value is None:
        return None
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, (list, tuple)) and all(
            isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        pairs = [tuple(p) for p in value]
    else:
        raise TypeError(
            "`groups` must be None or an ordered mapping {pattern: {key: value}} (or a "
            f"list of (pattern, overrides) pairs). Received: groups={value!r}")
    groups = {}
    for pattern, overrides in pairs:
        if not isinstance(pattern, str):
            raise TypeError(f"`groups`: each pattern must be a string (a regular "
                            f"expression). Received: {pattern!r}")
        if pattern in groups:
            raise ValueError(f"`groups`: the pattern {pattern!r} appears twice.")
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"`groups`: {pattern!r} is not a valid regular expression: "
                             f"{error}.") from None
        if not isinstance(overrides, dict):
            raise TypeError(f"`groups[{pattern!r}]` must be a dict of overrides. "
                            f"Received: {overrides!r}")
        unknown = sorted(set(overrides) - set(KEYS))
        if unknown:
            raise ValueError(f"`groups[{pattern!r}]`: unknown key(s) {unknown}. "
                             f"Allowed keys: {list(KEYS)}")
        groups[pattern] = {}
        for key, value in overrides.items():
            try:
                groups[pattern][key] = KEYS[key](key, value)
            except (TypeError, ValueError) as error:
                raise type(error)(f"`groups[{pattern!r}]`: {error}") from None
    return groups


@dataclasses.dataclass(frozen=True)
class Group:
    """One variable's group: its pattern ("" for none) and overrides."""

    pattern: str = ""
    overrides: tuple = ()  # sorted (key, value) pairs

    # Asked per variable and step: computed once per group.
    @functools.cached_property
    def _values(self):
        return dict(self.overrides)

    def get(self, key, default):
        return self._values.get(key, default)

    @functools.cached_property
    def multiplier(self):
        return self._values.get("learning_rate_multiplier", 1.0)

    def settings(self, hyper, step):
        """(Hyper, Step) for this group's variables: the optimizer's `hyper` and this
        `step` (`keras_adam._per_step.Step`) with the group's values."""
        if not self.overrides:
            return hyper, step
        return self.hyper(hyper), step.scaled(self.multiplier)

    def hyper(self, base):
        """The rule's `Hyper` with this group's beta_1, beta_2 and epsilon."""
        return _with_values(base, self.overrides)


@functools.lru_cache(maxsize=256)
def _with_values(base, overrides):
    changes = {k: v for k, v in overrides if k in HYPER_KEYS}
    return dataclasses.replace(base, **changes) if changes else base


NO_GROUP = Group()


def assign(groups, variables):
    """Each variable's `Group` (`NO_GROUP` where no pattern matches).

    Warns, naming it, for a pattern that matches no variable.
    """
    if not groups:
        return [NO_GROUP] * len(variables)
    compiled = [(pattern, re.compile(pattern), tuple(sorted(overrides.items())))
                for pattern, overrides in groups.items()]
    found, used = [], set()
    for variable in variables:
        group = NO_GROUP
        for pattern, regex, overrides in compiled:
            if regex.fullmatch(variable.path):
                group = Group(pattern, overrides)
                used.add(pattern)
                break
        found.append(group)
    for pattern in groups:
        if pattern not in used:
            warnings.warn(f"`groups`: the pattern {pattern!r} matches no variable (it is "
                          "matched in full against each variable's `path`).", stacklevel=4)
    return found


def layerwise_decay(layers, decay, top_multiplier=1.0):
    """Layer-wise learning-rate decay: groups giving each layer lr * decay^depth.

    The last layer in `layers` gets `top_multiplier`, the one before it
    `top_multiplier * decay`, and so on down to the first, as in the BERT/ViT
    fine-tuning recipe (Clark et al., 2020, ELECTRA; Bao et al., 2022, BEiT).

    Args:
        layers: the layers from input to output (e.g. an embedding, the
            transformer blocks, the head). Each may be a Keras layer or a
            list of layers that share a depth.
        decay: float in (0, 1]: the factor per layer.
        top_multiplier: float >= 0: the last layer's multiplier. Defaults to 1.

    Returns:
        {pattern: {"learning_rate_multiplier": ...}} for `Adam(groups=...)`;
        each pattern matches the variables of one layer by their path.
    """
    decay = check.non_negative("decay", decay)
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"`decay` must be in (0, 1]. Received: decay={decay!r}")
    top_multiplier = check.non_negative("top_multiplier", top_multiplier)
    groups = {}
    depth = len(layers)
    for i, entry in enumerate(layers):
        multiplier = top_multiplier * decay ** (depth - 1 - i)
        for layer in entry if isinstance(entry, (list, tuple)) else [entry]:
            paths = sorted({v.path for v in layer.weights})
            if not paths:
                continue
            pattern = "|".join(re.escape(p) for p in paths)
            groups[pattern] = {"learning_rate_multiplier": multiplier}
    return groups
