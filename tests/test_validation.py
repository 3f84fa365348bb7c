"""Bad constructor input gets an error that names the argument."""

import math

import keras
import numpy as np
import pytest

import keras_adam

# (id, kwargs, exception type, regex that must appear in the message)
ERRORS = [
    ("lr-negative", dict(learning_rate=-1e-3), ValueError, r"`learning_rate`.*-0\.001"),
    ("lr-nan", dict(learning_rate=math.nan), ValueError, r"`learning_rate`.*nan"),
    ("lr-inf", dict(learning_rate=math.inf), ValueError, r"`learning_rate`.*inf"),
    # A learning rate of the wrong type is a ValueError, as keras.optimizers.Adam raises.
    ("lr-string", dict(learning_rate="0.001"), ValueError, r"`learning_rate`.*'0\.001'"),
    ("lr-bool", dict(learning_rate=True), ValueError, r"`learning_rate`"),
    ("exclusions-not-a-dict", dict(exclude_from_weight_decay=["bias"]), ValueError,
     r"`exclude_from_weight_decay` must be None or a dict"),
    ("exclusions-unknown-key", dict(exclude_from_weight_decay={"names": ["bias"]}), ValueError,
     r"`exclude_from_weight_decay` must be None or a dict with keys "
     r"\('var_names', 'var_indices'\)"),
    ("exclusions-not-strings", dict(exclude_from_weight_decay={"var_names": [1]}), ValueError,
     r"`exclude_from_weight_decay\['var_names'\]` must be a list of strings"),
    ("exclusions-negative-index", dict(exclude_from_weight_decay={"var_indices": [-1]}),
     ValueError, r"`exclude_from_weight_decay\['var_indices'\]` must be a list of ints >= 0"),
    ("beta_1-one", dict(beta_1=1.0), ValueError,
     r"`beta_1` must be in \[0, 1\)\. Received: beta_1=1\.0"),
    ("beta_1-negative", dict(beta_1=-0.1), ValueError, r"`beta_1` must be in \[0, 1\)"),
    ("beta_1-nan", dict(beta_1=math.nan), ValueError, r"`beta_1`"),
    ("beta_1-string", dict(beta_1="0.9"), TypeError, r"`beta_1`"),
    ("beta_2-one", dict(beta_2=1.0), ValueError, r"`beta_2` must be in \[0, 1\)"),
    ("beta_2-above", dict(beta_2=1.5), ValueError, r"`beta_2`.*1\.5"),
    ("epsilon-negative", dict(epsilon=-1e-8), ValueError, r"`epsilon`.*>= 0"),
    ("epsilon-nan", dict(epsilon=math.nan), ValueError, r"`epsilon`"),
    ("placement-unknown", dict(epsilon_placement="torch"), ValueError,
     r"`epsilon_placement` must be one of \('hat', 'paper'\)\. "
     r"Received: epsilon_placement='torch'"),
    ("placement-none", dict(epsilon_placement=None), ValueError, r"`epsilon_placement`"),
    ("amsgrad-int", dict(amsgrad=1), TypeError, r"`amsgrad` must be a bool"),
    ("amsgrad-string", dict(amsgrad="True"), TypeError, r"`amsgrad`"),
    ("nesterov-none", dict(nesterov=None), TypeError, r"`nesterov` must be a bool"),
    ("shard_state-string", dict(shard_state="yes"), TypeError, r"`shard_state` must be a bool"),
    ("bias_correction-int", dict(bias_correction=0), TypeError,
     r"`bias_correction` must be a bool"),
    ("weight_rounding-unknown", dict(weight_rounding="up"), ValueError,
     r"`weight_rounding` must be one of \('nearest', 'stochastic', 'compensated'\)\. "
     r"Received: weight_rounding='up'"),
    ("weight_decay-negative", dict(weight_decay=-0.1), ValueError, r"`weight_decay`"),
    ("sparse-unknown", dict(sparse_updates="dense"), ValueError,
     r"`sparse_updates` must be one of \('exact', 'lazy'\)\. Received: sparse_updates='dense'"),
    ("moment-dtype-unknown", dict(moment_dtype="float8"), ValueError,
     r"`moment_dtype` must be one of \('float32', 'bfloat16', 'float16', '8bit'\)"),
    ("fused-8bit", dict(fused=True, moment_dtype="8bit"), ValueError,
     r"`fused=True` and `moment_dtype='8bit'` cannot be combined"),
    ("block-size-zero", dict(moment_dtype="8bit", moment_block_size=0), ValueError,
     r"`moment_block_size` must be an int >= 1\. Received: moment_block_size=0"),
    ("block-size-float", dict(moment_dtype="8bit", moment_block_size=256.0), ValueError,
     r"`moment_block_size` must be an int"),
    ("min-size-negative", dict(moment_dtype="8bit", min_8bit_size=-1), ValueError,
     r"`min_8bit_size` must be an int >= 0"),
    ("block-size-without-8bit", dict(moment_block_size=128), ValueError,
     r"`moment_block_size` and `min_8bit_size` apply only with moment_dtype='8bit' "
     r"\(for the optimizer or a group\)\. Received: moment_dtype=None"),
    ("fused-epsilon-zero", dict(fused=True, epsilon=0.0), ValueError,
     r"`fused=True` is not possible: with epsilon=0"),
    ("fused-string", dict(fused="auto"), TypeError, r"`fused` must be a bool"),
    ("unknown-kwarg", dict(betas=(0.9, 0.999)), ValueError, r"betas"),
    ("two-clips", dict(clipnorm=1.0, clipvalue=1.0), ValueError, r"clipnorm.*clipvalue"),
]


@pytest.mark.parametrize("kwargs,exc,pattern", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_bad_argument_is_refused(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        keras_adam.Adam(**kwargs)


def test_adamw_requires_weight_decay():
    with pytest.raises(ValueError, match="`weight_decay`"):
        keras_adam.AdamW(weight_decay=None)


@pytest.mark.parametrize(
    "learning_rate",
    [
        0.0,
        1,  # an int is taken as the float 1.0 (keras.optimizers.Adam refuses it)
        np.float32(1e-3),
        keras.optimizers.schedules.ExponentialDecay(1e-3, 10, 0.9),
        lambda: 1e-3,
    ],
    ids=["zero", "int", "numpy", "schedule", "callable"],
)
def test_accepted_learning_rates(learning_rate):
    optimizer = keras_adam.Adam(learning_rate=learning_rate)
    assert float(optimizer.learning_rate) == pytest.approx(
        learning_rate() if callable(learning_rate) and not hasattr(learning_rate, "get_config")
        else 1e-3 if hasattr(learning_rate, "get_config") else float(learning_rate)
    )


def test_boundary_values_are_accepted():
    optimizer = keras_adam.Adam(beta_1=0.0, beta_2=0.0, epsilon=0.0, amsgrad=np.bool_(True))
    assert optimizer.amsgrad is True and optimizer.epsilon == 0.0
