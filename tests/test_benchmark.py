"""The benchmark module runs on the active backend and its report adds up.

No timing is asserted (the machine is noisy); the checks are that every case
runs, and that the derived columns follow from the measured ones.
"""

import json
import os
import subprocess
import sys

import keras
import pytest

from keras_adam import benchmark

BACKEND = keras.backend.backend()
TINY = ["--repeats", "1", "--min-seconds", "0.001"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--cases", "large,huge"], "unknown case"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--intra-op-threads", "0", "--backend", "tensorflow"], "--intra-op-threads must be >= 1"),
        (["--intra-op-threads", "1", "--backend", "jax"], "tensorflow only"),
    ],
)
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_mlp_case_report(capsys):
    benchmark.main(["--cases", "mlp", "--backend", BACKEND, "--json", *TINY])
    report = json.loads(capsys.readouterr().out)
    assert report["backend"] == BACKEND
    bandwidth = report["bandwidth_gb_per_s"]
    assert bandwidth > 0
    # Dense 784-512-512-10: kernels and biases.
    params = 784 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10
    xla_modes = {"tensorflow": {False, True}, "jax": {True}, "torch": {False}}[BACKEND]
    assert {r["xla"] for r in report["results"]} == xla_modes
    for r in report["results"]:
        assert (r["case"], r["variant"], r["parameters"]) == ("mlp", "keras_adam", params)
        ours, builtin = r["keras_adam_ms"]["median"], r["builtin_ms"]["median"]
        assert r["keras_adam_ms"]["min"] <= ours <= r["keras_adam_ms"]["max"]
        # The derived columns, recomputed from the measured ones (float64).
        assert r["speedup"] == pytest.approx(builtin / ours, rel=1e-12)
        gbps = params * benchmark.BYTES_PER_PARAMETER / (ours / 1e3) / 1e9
        assert r["keras_adam_gb_per_s"] == pytest.approx(gbps, rel=1e-12)
        assert r["fraction_of_bandwidth"] == pytest.approx(gbps / bandwidth, rel=1e-12)
        assert r["roofline_ms"] == pytest.approx(
            params * benchmark.BYTES_PER_PARAMETER / bandwidth / 1e6, rel=1e-12)
    table = benchmark.format_table(report)
    assert table.count("| mlp | keras_adam |") == len(report["results"])


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow backend only")
def test_intra_op_threads_reach_tensorflow():
    # A fresh process: the setting is only possible before TF's runtime starts.
    # The report's value is read back from tf.config, not echoed from argv.
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run(
        [sys.executable, "-m", "keras_adam.benchmark", "--cases", "mlp", "--xla", "off",
         "--intra-op-threads", "1", "--json", *TINY],
        env=env, capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    report = json.loads(out)
    assert report["intra_op_threads"] == 1
    assert "intra-op threads 1" in benchmark.format_table(report)
