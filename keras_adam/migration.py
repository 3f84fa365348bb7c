"""Moving a run between `keras.optimizers.Adam`/`AdamW` and keras_adam, state included.

    ours = keras_adam.from_keras(model.optimizer)     # mid-training, built or not
    builtin = keras_adam.to_keras(ours)               # and back

Both optimizers keep their variables in the same layout (the step counter,
the learning rate, EMA copies, gradient accumulators, then m and v per model
variable, then v_max), so the state is copied by position after the layouts
are checked to agree. The converted optimizer is built on the same model
variables; assign it to the model (`model.optimizer = ...`, or compile with
it) and training continues from the same t, m, v and v_max.
"""

import keras

from keras_adam.optimizer import Adam
from keras_adam.optimizer import AdamW

# Keras base-optimizer arguments that both sides take as they are.
_SHARED = ("weight_decay", "clipnorm", "clipvalue", "global_clipnorm", "use_ema",
           "ema_momentum", "ema_overwrite_frequency", "loss_scale_factor",
           "gradient_accumulation_steps", "name", "beta_1", "beta_2", "epsilon", "amsgrad")
# keras_adam options and the only values of them that the built-in computes
# (skip_nonfinite adds a variable the built-in does not have).
_BUILTIN_ONLY = [("nesterov", False), ("bias_correction", True), ("epsilon_placement", "hat"),
                 ("sparse_updates", "exact"), ("skip_nonfinite", False)]


def from_keras(optimizer):
    """The keras_adam optimizer equal to a `keras.optimizers.Adam` or `AdamW`, state included.

    Args:
        optimizer: a `keras.optimizers.Adam` or `keras.optimizers.AdamW`,
            built (its state is copied) or not.

    Returns:
        `keras_adam.AdamW` for an AdamW, else `keras_adam.Adam`, with the same
        configuration (and the defaults that reproduce the built-in's update:
        epsilon placement "hat", bias correction, no Nesterov), the same
        learning rate or schedule, the same weight-decay exclusions and, if
        built, the same variables' values.

    Raises:
        TypeError: if `optimizer` is not a `keras.optimizers.Adam`/`AdamW`.
    """
    if not isinstance(optimizer, keras.optimizers.Adam) or isinstance(optimizer, Adam):
        raise TypeError(
            "`from_keras` takes a keras.optimizers.Adam or AdamW. Received: "
            f"optimizer of type {type(optimizer).__module__}.{type(optimizer).__name__}"
        )
    return _convert(optimizer, AdamW if isinstance(optimizer, keras.optimizers.AdamW) else Adam)


def to_keras(optimizer):
    """The `keras.optimizers.Adam` or `AdamW` equal to a keras_adam optimizer, state included.

    Raises:
        TypeError: if `optimizer` is not a keras_adam optimizer.
        ValueError: naming the option, where the built-in cannot compute this
            optimizer's update or hold its state (nesterov, bias_correction=False,
            epsilon_placement="paper", sparse_updates="lazy", skip_nonfinite).
    """
    if not isinstance(optimizer, Adam):
        raise TypeError(
            "`to_keras` takes a keras_adam optimizer. Received: optimizer of type "
            f"{type(optimizer).__module__}.{type(optimizer).__name__}"
        )
    unsupported = [(name, getattr(optimizer, name)) for name, builtin in _BUILTIN_ONLY
                   if getattr(optimizer, name) != builtin]
    if unsupported:
        name, value = unsupported[0]
        raise ValueError(
            f"keras.optimizers.Adam has no equivalent of `{name}={value!r}`: it has "
            + ", ".join(f"{n}={v!r}" for n, v in _BUILTIN_ONLY) + " only."
        )
    return _convert(optimizer, keras.optimizers.AdamW if isinstance(optimizer, AdamW)
                    else keras.optimizers.Adam)


def _convert(source, cls):
    """A `cls` optimizer with `source`'s configuration, exclusions and (if built) state."""
    config = source.get_config()
    kwargs = {k: config[k] for k in _SHARED if k in config}
    kwargs["learning_rate"] = _learning_rate(source)
    target = cls(**kwargs)
    _copy_exclusions(source, target)
    if source.built:
        target.build(source._trainable_variables)
        _copy_state(source, target)
    return target


def _learning_rate(optimizer):
    lr = optimizer._learning_rate
    if isinstance(lr, keras.Variable):
        return float(keras.ops.convert_to_numpy(lr))
    return lr  # a schedule or a callable: the same object


def _copy_exclusions(source, target):
    # Keras keeps excluded variables by `_var_key` and excluded names as one
    # "|"-joined pattern.
    keys = set(getattr(source, "_exclude_from_weight_decay", set()))
    pattern = getattr(source, "_exclude_from_weight_decay_pattern", None)
    names = pattern.pattern.split("|") if pattern is not None else None
    variables = [v for v in getattr(source, "_trainable_variables", [])
                 if source._var_key(v) in keys]
    if names or keys:
        target.exclude_from_weight_decay(var_list=variables or None, var_names=names)
        # Keys of variables not resolved above (source not built) still apply.
        target._exclude_from_weight_decay = set(target._exclude_from_weight_decay) | keys


def _copy_state(source, target):
    if len(source.variables) != len(target.variables):
        raise ValueError(
            f"Cannot copy the state of {source.name!r} ({len(source.variables)} variables) "
            f"into {target.name!r} ({len(target.variables)}): their layouts differ."
        )
    for a, b in zip(source.variables, target.variables):
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(
                f"Cannot copy {a.path} {tuple(a.shape)} into {b.path} {tuple(b.shape)}: "
                "their layouts differ."
            )
    for a, b in zip(source.variables, target.variables):
        b.assign(keras.ops.cast(a, b.dtype))
