"""The optimizer's variables in saved files: by position, as Keras stores them, and by role.

Keras stores an optimizer's variables by position ("0", "1", ...) and, when
the counts differ, only warns and skips them: training then silently starts
again from t = 0 with zero moments. keras_adam refuses instead:

- Saving writes the positions exactly as Keras does, plus "slot_roles" (an
  attribute of the entry in Keras's H5 files, so that the built-in Adam
  still counts only the positions; one more entry elsewhere, and in the
  files of keras_adam 0.2): each variable's role (`iteration`, `learning_rate`, `m[i]`,
  `v[i]`, `v_max[i]`, `m_scale[i]`, `v_scale[i]`, `v_max_scale[i]` (8-bit
  moments), `average[i]`, `accumulator[i]`, for model variable i,
  and `skipped_steps`)
  and the path of the model variable it belongs to, as UTF-8 text in a uint8
  array (every Keras store holds numeric arrays).
- Loading checks everything before assigning anything. With roles in the
  file, they must be ours, in order; otherwise a ValueError names the
  missing and the extra ones (role and model variable). Without them (files
  of keras_adam 0.1, or of `keras.optimizers.Adam`/`AdamW`, whose layout is
  ours), the count must match. Every shape must match.
- An optimizer that is not built yet (a model whose optimizer Keras could
  not build at load time) keeps what `read` returned and applies it at
  `build`, where the same checks run against the slots it creates.

This module never holds the optimizer: it receives the optimizer's
variables and their roles (`roles`), which the optimizer names.

Roles rather than paths are compared: a model variable's path depends on
names that Keras assigns per process (`sequential_3`), so two runs of the
same program can legitimately differ in paths; they cannot differ in roles.
"""

import keras
import numpy as np

ROLES_KEY = "slot_roles"


def roles(variables, named):
    """[(role, model variable path)] for each of `variables`, in order.

    Args:
        variables: the optimizer's variables (`optimizer.variables`).
        named: (variable, role, model variable path) for each variable the
            optimizer knows the role of; any other is named by its own path.
    """
    known = {id(variable): (role, path) for variable, role, path in named}
    return [known.get(id(v), (v.path, "")) for v in variables]


def _attributes(store):
    """The attributes of the H5 group a Keras H5 store is writing or reading, or None.

    A private seam of Keras's `H5IOStore` (Keras 3.15), touched here only:
    roles kept as an attribute of the entry are not one more entry, so
    `keras.optimizers.Adam`, which counts the entries against its variables,
    loads the positions of a keras_adam file (default options: the same
    layout). tests/test_keras_seams.py fails if the attribute moves.
    """
    group = getattr(store, "_h5_entry_group", None)
    return getattr(group, "attrs", None)


def save(store, variables, roles):
    """Writes `variables` by position and their `roles` (see the module docstring)."""
    for i, variable in enumerate(variables):
        store[str(i)] = variable.numpy()
    text = "\n".join(f"{role} {path}" for role, path in roles)
    attributes = _attributes(store) if variables else None
    if attributes is not None:
        attributes[ROLES_KEY] = text
    else:  # another store: one more entry, as UTF-8 bytes
        store[ROLES_KEY] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def read(store, name):
    """(saved roles or None, values by position) from `store`, checked for gaps.

    `name` is the optimizer's, for the error message.
    """
    keys = set(store.keys())
    text = None
    attributes = _attributes(store)
    if attributes is not None and ROLES_KEY in attributes:
        text = attributes[ROLES_KEY]
        text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
    if ROLES_KEY in keys:  # files of keras_adam 0.2, and other stores
        text = bytes(np.asarray(store[ROLES_KEY], dtype=np.uint8)).decode("utf-8")
        keys.discard(ROLES_KEY)
    saved_roles = None
    if text is not None:
        saved_roles = [tuple(line.split(" ", 1)) for line in text.split("\n")]
    values = [store[str(i)] for i in range(len(keys)) if str(i) in keys]
    if len(values) != len(keys):
        raise ValueError(
            f"The saved state of optimizer {name!r} is not a list of "
            f"positions 0..{len(keys) - 1}: found entries {sorted(keys)}."
        )
    return saved_roles, values


def assign(saved, variables, ours, name, moment_dtype):
    """Checks what `read` returned against `variables` and their roles `ours`, then
    assigns every value; assigns nothing if any check fails.

    Args:
        saved: `read`'s result.
        variables: the optimizer's variables.
        ours: their roles (`roles`).
        name: the optimizer's name, and `moment_dtype` its option, for the
            error messages.

    Raises:
        ValueError: naming the slots that differ.
    """
    saved_roles, values = saved
    variables, ours = _without_new_state(variables, ours, saved_roles, len(values))
    if saved_roles is not None:
        if [r for r, _ in saved_roles] != [r for r, _ in ours]:
            saved_set = {r for r, _ in saved_roles}
            our_set = {r for r, _ in ours}
            missing = [_describe(r, p) for r, p in ours if r not in saved_set]
            extra = [_describe(r, p) for r, p in saved_roles if r not in our_set]
            raise ValueError(
                f"The saved state does not match optimizer {name!r}; {LEFT} "
                f"Missing from the file: {missing or 'none'}. "
                f"In the file but not in this optimizer: {extra or 'none'}"
                + ("" if missing or extra else "; the same slots in another order")
                + "." + _format_hint(saved_roles, ours, moment_dtype)
                + " Check amsgrad, use_ema, gradient_accumulation_steps, moment_dtype and "
                "the model's trainable variables against those the file was saved with."
            )
    elif len(values) != len(ours):
        raise ValueError(
            f"The saved state of optimizer {name!r} has {len(values)} variables, and "
            f"this optimizer has {len(ours)}: "
            f"{[_describe(r, p) for r, p in ours]}; {LEFT} The file "
            "names no slots (it predates keras_adam 0.2, or comes from "
            "keras.optimizers.Adam). Check amsgrad, use_ema, "
            "gradient_accumulation_steps and the model's trainable variables."
        )
    for (role, path), variable, value in zip(ours, variables, values):
        if tuple(variable.shape) != tuple(np.shape(value)):
            raise ValueError(
                f"The saved {_describe(role, path)} of optimizer {name!r} has shape "
                f"{tuple(np.shape(value))}, and this optimizer's has "
                f"{tuple(variable.shape)}; {LEFT}"
                + (" The scales' shape follows moment_block_size: load with the one the "
                   "file was saved with." if role.split("[")[0].endswith("_scale") else "")
            )
        saved_kind, our_kind = np.asarray(value).dtype.kind, _kind(variable)
        if (saved_kind in "iu") != (our_kind in "iu"):
            # Files without roles: 8-bit codes and float moments must not be
            # mistaken for each other, whatever the count.
            raise ValueError(
                f"The saved {_describe(role, path)} of optimizer {name!r} is "
                f"{np.asarray(value).dtype}, and this optimizer's is "
                f"{variable.dtype}: 8-bit codes and float moments do not convert; "
                f"{LEFT} Load with the moment_dtype the file was saved with."
            )
    for variable, value in zip(variables, values):
        variable.assign(value)


# What a refusal leaves: the optimizer as it was. `model.load_weights` and
# `load_model` load the model's own weights before the optimizer's, so
# those are the file's by then; the message says so rather than "nothing".
LEFT = ("the optimizer's state was not loaded and is as it was (loading a model or "
        "its weights loads the model's weights, before the optimizer's: those are "
        "the file's).")


# State that a file written without it may lack: the weight rounding's seed
# and Kahan compensations (16-bit variables). Such a file loads; these keep
# their fresh values (a new seed; compensation 0, exact for the loaded theta).
_NEW_STATE = ("rounding_seed", "compensation")


def _without_new_state(variables, ours, saved_roles, saved_count):
    """`variables` and `ours` without the `_NEW_STATE` entries the file lacks."""
    def new(role):
        return role.split("[")[0] in _NEW_STATE

    if saved_roles is not None:
        in_file = {r for r, _ in saved_roles}
        keep = [not new(r) or r in in_file for r, _ in ours]
    elif saved_count != len(ours):  # a file without roles: only by count
        keep = [not new(r) for r, _ in ours]
    else:
        return variables, ours
    return ([v for v, k in zip(variables, keep) if k], [o for o, k in zip(ours, keep) if k])


def _kind(variable):
    return np.dtype(keras.backend.standardize_dtype(variable.dtype)).kind


def _format_hint(saved_roles, ours, moment_dtype):
    """A sentence naming moment_dtype when one side holds 8-bit scales and the other not."""
    def scaled(roles):
        return {r.split("[")[1] for r, _ in roles if r.split("[")[0].endswith("_scale")}

    saved, here = scaled(saved_roles), scaled(ours)
    if saved == here:
        return ""
    if saved and not here:
        if moment_dtype == "8bit":
            return (" Both use moment_dtype='8bit', but the file holds 8-bit codes for "
                    "variables this optimizer keeps in float32: check min_8bit_size (the "
                    "fewest elements a quantized variable has) against the one the file "
                    "was saved with.")
        return (f" The file holds 8-bit moments (moment_dtype='8bit'), and this optimizer "
                f"has moment_dtype={moment_dtype!r}: load it with "
                "moment_dtype='8bit' (8-bit codes are not converted).")
    if here and not saved:
        return (" This optimizer has moment_dtype='8bit', and the file holds float "
                "moments for the variables it quantizes: load it with the moment_dtype it "
                "was saved with, or, if that was '8bit' too, with its min_8bit_size "
                "(float moments are not converted to 8-bit codes).")
    return (" Both hold 8-bit moments, for different variables: check min_8bit_size "
            "against the one the file was saved with.")


def _describe(role, path):
    return f"{role} ({path})" if path else role
