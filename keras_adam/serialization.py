"""Registration with Keras' serialization and validation of incoming configs.

After `import keras_adam`, "keras_adam>Adam" (and the other public classes)
resolve through `keras.saving` and `keras.optimizers.get`, so `load_model`
needs no `custom_objects`. A config is data: it is checked field by field
before anything is constructed, and nothing in it is executed.
"""

import inspect

import keras

PACKAGE = "keras_adam"


def register(cls):
    """Class decorator: registers `cls` as "keras_adam>ClassName"."""
    return keras.saving.register_keras_serializable(package=PACKAGE)(cls)


def constructor_arguments(cls):
    """Names that `cls(**config)` accepts, collected along its MRO.

    Subclasses often take `**kwargs` and forward them (keras_adam's classes
    forward Keras's own arguments to Keras's base optimizer), so each
    class's own named parameters are gathered, Keras's base classes included.
    """
    names = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                names.add(p.name)
    return names


def check_config(cls, config):
    """Raises a clear error if `config` could not have come from `get_config`.

    Unknown keys are a ValueError listing what is allowed; value and type checks
    are the constructor's own (see `keras_adam._validation`), so they run when
    `from_config` constructs the optimizer.
    """
    if not isinstance(config, dict):
        raise TypeError(
            f"{cls.__name__} config must be a dict. "
            f"Received: config of type {type(config).__name__}"
        )
    allowed = constructor_arguments(cls)
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(
            f"Unknown field(s) in {cls.__name__} config: {unknown}. "
            f"Allowed fields: {sorted(allowed)}"
        )
