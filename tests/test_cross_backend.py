"""A .keras file saved under one backend resumes under another; JAX DataParallel.

The helper processes (tests/backend_run.py) run with an explicit
KERAS_BACKEND. Each backend pair runs once, in the suite of its source
backend, rather than three times (once per backend suite).
"""

import importlib.util
from pathlib import Path

import keras
import numpy as np
import pytest
from grid import FUSED_TF_STEP_REL, UNIT_ROUNDOFF, float32_drift_bound
from helpers import run_python

SCRIPT = Path(__file__).with_name("backend_run.py")
pytestmark = [pytest.mark.subprocess, pytest.mark.slow]


def _need(*backends):
    for backend in backends:
        if importlib.util.find_spec(backend) is None:
            pytest.skip(f"{backend} is not installed")


def _run(backend, mode, out, **env):
    run_python(SCRIPT, mode, out, backend=backend, env=env)


def _arrays(path):
    with np.load(path) as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


@pytest.mark.parametrize("source,target", [("tensorflow", "jax"), ("jax", "torch")],
                         ids=["tensorflow-to-jax", "jax-to-torch"])
def test_keras_file_moves_between_backends(tmp_path, source, target):
    if keras.backend.backend() != source:
        pytest.skip(f"runs once, in the {source} suite")
    _need(source, target)
    _run(source, "save", tmp_path)
    _run(target, "resume", tmp_path)

    saved, loaded = _arrays(tmp_path / "saved.npz"), _arrays(tmp_path / "loaded.npz")
    assert len(saved) == len(loaded)
    for a, b in zip(saved, loaded):
        np.testing.assert_array_equal(a, b)  # the state itself is carried over exactly

    continued, resumed = _arrays(tmp_path / "continued.npz"), _arrays(tmp_path / "resumed.npz")
    assert int(resumed[4]) == int(continued[4]) == 9  # the step counter, after 4 weights
    # The same 4 steps of the same rule under two backends, each within the
    # float32 drift bound (tests/grid.py) of the exact run: 4 steps of
    # lr = 1e-2 on |w| < 2. Their kernels (matmul, tanh) give gradients that
    # differ by float32 roundoff, a few u relative; Adam's step, a ratio of
    # the gradients' EMAs, changes by as much, inside the bound's update term
    # (1e-6 relative). TensorFlow's steps take its fused kernel, whose step
    # differs from the rule's by up to FUSED_TF_STEP_REL relative: 4 steps of
    # lr. Measured: 3.6e-7 (TensorFlow to JAX), 3e-8 (JAX to torch).
    atol = 2 * float32_drift_bound(4, 1e-2, 2.0) + 4 * 1e-2 * FUSED_TF_STEP_REL
    for a, b in zip(continued[:4], resumed[:4]):
        np.testing.assert_allclose(a, b, rtol=0, atol=atol)
    assert not np.array_equal(resumed[0], loaded[0])  # training did continue


def test_jax_data_parallel_matches_a_single_device(tmp_path):
    if keras.backend.backend() != "jax":
        pytest.skip("keras.distribution.DataParallel runs in the jax suite")
    _run("jax", "data_parallel", tmp_path, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    single, parallel = _arrays(tmp_path / "single.npz"), _arrays(tmp_path / "parallel.npz")
    assert len(single) == len(parallel)
    # 16 steps; the two devices' gradients are summed by a collective instead
    # of in one reduction (~1e-7 relative); Adam is scale-invariant, so each
    # step changes by ~1e-7 relative: far inside the float32 drift bound.
    _assert_same_training(single, parallel)


def test_jax_model_parallel_shards_m_and_v_like_their_variable(tmp_path):
    # Issue #14: under keras.distribution.ModelParallel, m, v (and v_max, and
    # moments stored in another dtype) follow their variable's layout, and
    # training gives a single device's weights.
    if keras.backend.backend() != "jax":
        pytest.skip("keras.distribution.ModelParallel runs in the jax suite")
    import json

    _run("jax", "model_parallel", tmp_path, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    with open(tmp_path / "sharding.json") as f:
        report = json.load(f)
    assert any(r["sharded"] for r in report), "the layout map sharded nothing"
    assert all(r["same"] for r in report), [r for r in report if not r["same"]]
    single, parallel = _arrays(tmp_path / "single.npz"), _arrays(tmp_path / "parallel.npz")
    assert len(single) == len(parallel)
    # As for DataParallel above: the same 16 steps, with the matmuls and the
    # gradient sums split across devices (~1e-7 relative per step).
    _assert_same_training(single, parallel)


# backend_run.py's data_parallel and model_parallel modes: 2 epochs of 8
# batches at lr = 1e-2, on weights |w| < 2.
PARALLEL_STEPS = 16
# m and v are EMAs of g. In each run every step's multiply and add round by u
# each (~2u relative per step, as in test_parity_builtin.py), and the
# gradients' ~1e-7 (2u) relative difference passes into m, and doubled into
# v (an EMA of g^2), without growing: the EMA averages it.
SLOT_RTOL = 2 * (2 * PARALLEL_STEPS + 4) * UNIT_ROUNDOFF


def _assert_same_training(single, parallel):
    """The arrays backend_run.py dumps: 4 weights, the step counter, the learning
    rate, then m and v of each weight."""
    weights, counters, slots = slice(0, 4), slice(4, 6), slice(6, None)
    atol = 2 * float32_drift_bound(PARALLEL_STEPS, 1e-2, 2.0)
    for a, b in zip(single[weights], parallel[weights]):
        np.testing.assert_allclose(a, b, rtol=0, atol=atol)
    for a, b in zip(single[counters], parallel[counters]):
        np.testing.assert_array_equal(a, b)
    assert int(single[4]) == PARALLEL_STEPS
    m_pairs = list(zip(single[slots], parallel[slots]))[0::2]
    v_pairs = list(zip(single[slots], parallel[slots]))[1::2]
    for a, b in m_pairs:
        # m mixes signs: where it crosses zero, its rounding is relative to the
        # largest values it has summed, about its largest entry.
        np.testing.assert_allclose(a, b, rtol=SLOT_RTOL, atol=SLOT_RTOL * np.abs(b).max())
    for a, b in v_pairs:
        np.testing.assert_allclose(a, b, rtol=SLOT_RTOL)
