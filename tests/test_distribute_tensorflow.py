"""keras_adam under tf.distribute: MirroredStrategy and MultiWorkerMirroredStrategy.

Each run is a real subprocess (tests/distributed_run.py); the multi-worker test
starts two workers on 127.0.0.1 and compares both with a single-process run.
"""

import json
import socket
import subprocess
from pathlib import Path

import keras
import numpy as np
import pytest
from grid import float32_drift_bound
from helpers import TIMEOUT, start_python

pytestmark = [
    pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                       reason="tf.distribute is TensorFlow's"),
    pytest.mark.subprocess,
    pytest.mark.slow,
]
pytest.importorskip("tensorflow")

SCRIPT = Path(__file__).with_name("distributed_run.py")

OPTIONS = [("fused", {}), ("amsgrad", dict(amsgrad=True)), ("portable", dict(fused=False)),
           # The 6 x 16 kernel in 8 bits (blocks of 8), the rest float32.
           ("8bit", dict(moment_dtype="8bit", amsgrad=True, moment_block_size=8,
                         min_8bit_size=16))]


def _start(mode, out, options, **env):
    # Started together and waited for together: the workers of one cluster
    # must run at the same time.
    return start_python(SCRIPT, mode, out, json.dumps(options), backend="tensorflow", env=env,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait(*processes):
    for p in processes:
        try:
            output, _ = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for q in processes:
                q.kill()
            raise
        assert p.returncode == 0, output[-3000:]


def _load(path):
    with np.load(path) as f:
        arrays = [f[k] for k in sorted((k for k in f.files if k.startswith("arr_")),
                                       key=lambda k: int(k[4:]))]
        return arrays, int(f["iterations"])


def _assert_same_run(a, b):
    (arrays_a, it_a), (arrays_b, it_b) = _load(a), _load(b)
    assert it_a == it_b == 24
    assert len(arrays_a) == len(arrays_b)
    # The replicas' gradients are summed by an all-reduce rather than in one
    # reduction: ~1e-7 relative differences in g. Adam's step is invariant to
    # the scale of g, so each step changes by ~1e-7 relative, far below the
    # float32 drift bound of tests/grid.py for 24 steps of lr=1e-3 with
    # |w| < 3 (8.7e-6 for two runs), used here for weights and slots alike.
    # Measured: 1.2e-7, while training moves the weights by ~2e-2. 8-bit codes
    # must be equal.
    atol = 2 * float32_drift_bound(24, 1e-3, 3.0)
    for x, y in zip(arrays_a, arrays_b):
        np.testing.assert_allclose(x, y, rtol=0, atol=atol)


@pytest.mark.parametrize("options", [o[1] for o in OPTIONS], ids=[o[0] for o in OPTIONS])
def test_mirrored_strategy_matches_single_device(tmp_path, options):
    single, mirrored = tmp_path / "single.npz", tmp_path / "mirrored.npz"
    _wait(_start("single", single, options), _start("mirrored", mirrored, options))
    _assert_same_run(single, mirrored)


@pytest.mark.parametrize("rounding", ["stochastic", "compensated"])
def test_replicas_write_the_same_bits_with_bfloat16_weight_rounding(tmp_path, rounding):
    # The rounding's random numbers hash (seed, t, variable, element): no
    # replica-local state, so every replica writes the same bits.
    out = tmp_path / "mirrored.npz"
    _wait(_start("mirrored", out, dict(weight_rounding=rounding, dtype_policy="bfloat16")))
    with np.load(out) as f:
        assert int(f["iterations"]) == 24
        assert float(f["replicas_differ"]) == 0.0


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_multi_worker_mirrored_matches_single_process(tmp_path):
    options = {}
    workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    processes = [
        _start("worker", tmp_path / f"worker{i}.npz", options,
               TF_CONFIG=json.dumps({"cluster": {"worker": workers},
                                     "task": {"type": "worker", "index": i}}))
        for i in range(2)
    ]
    single = _start("single", tmp_path / "single.npz", options)
    _wait(*processes, single)
    _assert_same_run(tmp_path / "worker0.npz", tmp_path / "worker1.npz")
    _assert_same_run(tmp_path / "single.npz", tmp_path / "worker0.npz")
