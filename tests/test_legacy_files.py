"""`.keras` files written by an earlier keras_adam still load, with their whole state.

The files in tests/data were written by keras_adam 0.1.0 on TensorFlow;
tests/data/make_legacy_files.py says how. Each holds a model and its
optimizer after N steps; the `.npz` beside it holds every optimizer variable
at that point (by position) and the model's weights after M more steps
taken by that version.
"""

import os
import sys

import keras
import numpy as np
import pytest
from grid import float32_drift_bound

import keras_adam

DATA = os.path.join(os.path.dirname(__file__), "data")
sys.path.insert(0, DATA)
import make_legacy_files as legacy  # noqa: E402

CASES = sorted(legacy.CASES)


@pytest.mark.parametrize("name", CASES)
def test_legacy_file_loads_with_its_state_and_continues(name):
    model = keras.models.load_model(os.path.join(DATA, f"{name}.keras"))
    optimizer = model.optimizer
    assert isinstance(optimizer, keras_adam.Adam)
    for key, value in legacy.CASES[name].items():
        assert optimizer.get_config()[key] == value
    saved = np.load(os.path.join(DATA, f"{name}.npz"))
    stored = [saved[f"variables_{i}"] for i in range(len(optimizer.variables))]
    assert f"variables_{len(stored)}" not in saved, "the file holds more variables than loaded"
    assert int(keras.ops.convert_to_numpy(optimizer.iterations)) == legacy.N
    for variable, value in zip(optimizer.variables, stored):
        # Loading copies the stored numbers: identical, whatever the backend.
        loaded = keras.ops.convert_to_numpy(keras.ops.cast(variable, "float32"))
        np.testing.assert_array_equal(loaded, value, err_msg=variable.path)

    grads = legacy.gradients(model, legacy.N + legacy.M, seed=1)
    for g in grads[legacy.N:]:
        optimizer.apply(g, model.trainable_variables)
    for variable, i in zip(model.trainable_variables, range(len(model.trainable_variables))):
        want = saved[f"continued_{i}"]
        got = keras.ops.convert_to_numpy(variable)
        if legacy.CASES[name].get("moment_dtype") == "bfloat16":
            # bfloat16 moments are now written with stochastic rounding where
            # that version rounded them to nearest: each write differs by at
            # most one bfloat16 ulp (2^-8 relative) of m and of v, so the step
            # m / sqrt(v) by at most 2^-8 + 2^-9 = 6e-3 relative, and theta by
            # M steps of at most ~4 lr (lr = 1e-2) times that, plus the drift.
            bound = legacy.M * 4e-2 * 6e-3 + 2 * float32_drift_bound(
                legacy.M, 4e-2, np.abs(want).max())
            np.testing.assert_allclose(got, want, rtol=0, atol=bound, err_msg=variable.path)
        elif keras.backend.backend() == "tensorflow":
            # The same paths and kernels as the version that wrote the file, on
            # the same float32 operations, so the continuation is bit for bit
            # the one that version took.
            np.testing.assert_array_equal(got, want, err_msg=variable.path)
        else:
            # Another backend rounds differently; each run is within the float32
            # drift bound (tests/grid.py) of the exact one over M steps of at
            # most ~4 lr (lr = 1e-2), so they are within twice it of each other.
            bound = 2 * float32_drift_bound(legacy.M, 4e-2, np.abs(want).max())
            np.testing.assert_allclose(got, want, rtol=0, atol=bound, err_msg=variable.path)
