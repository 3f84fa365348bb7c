"""`shard_state=True`: m, v, v_max split across data-parallel devices (keras_adam._sharding).

The multi-device runs happen in a subprocess on 8 virtual CPU devices
(tests/sharding_run.py) and belong to the JAX suite, the one backend with
`keras.distribution`. What it does elsewhere (nothing, with a warning) is
tested in every suite.
"""

import ast
import json
import math
import os
import time
import warnings

import keras
import numpy as np
import pytest
from helpers import run_python

import keras_adam

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(mode, out):
    # The "equal" mode trains every model and option set of sharding_run.py
    # on 4 and 8 devices: about two minutes on a 2-core CPU.
    run_python(os.path.join(HERE, "sharding_run.py"), mode, out, backend="jax",
               env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, timeout=600)


def _jax_only():
    if keras.backend.backend() != "jax":
        pytest.skip("keras.distribution runs in the jax suite")


def _expected_axis(shape, n, taken=()):
    """The rule of keras_adam._sharding, restated: the largest dimension n divides
    (the first of equal ones) among those not `taken` by the variable's own
    layout, for tensors of at least 4096 elements."""
    if n == 1 or math.prod(shape) < 4096:
        return None
    free = [d for d, size in enumerate(shape) if size % n == 0 and d not in taken]
    if not free:
        return None
    return max(free, key=lambda d: (shape[d], -d))


@pytest.mark.subprocess
def test_placement_picks_the_largest_divisible_dimension(tmp_path):
    _jax_only()
    _run("placement", tmp_path)
    with open(tmp_path / "placement.json") as f:
        chosen = json.load(f)
    # Written out by hand for 8 devices: () and (8,) are small; 4100 and
    # (100, 81) have no dimension divisible by 8; (96, 96) ties, the first wins.
    expected = {"()": None, "(8,)": None, "(4096,)": 0, "(4100,)": None, "(64, 128)": 1,
                "(128, 64)": 0, "(96, 96)": 0, "(100, 81)": None, "(3, 4096)": 1,
                "(5, 7, 1024)": 2}
    for shape, axis in expected.items():
        axes = chosen[shape]["axes"]
        got = axes.index("batch") if axes and "batch" in axes else None
        assert got == axis, (shape, chosen[shape])
        assert got == _expected_axis(ast.literal_eval(shape), 8)
        assert ("sharded 8 ways" in chosen[shape]["words"]) == (axis is not None)


@pytest.fixture(scope="session")
def equal_runs(tmp_path_factory):
    """sharding_run.py's "equal" mode, run once for all the tests that read it.

    pytest-xdist's workers may take those tests apart (its `xdist_group`
    mark does not hold them together under pytest 9), and each would run
    it: the two runs then took the JAX suite's two workers for about 150 s
    each. The workers share the directory above their own temporary ones:
    the first to claim the run's directory there runs it, and the others
    wait for its files.
    """
    _jax_only()
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    out = shared / "sharding_equal"
    try:
        out.mkdir()
    except FileExistsError:  # another worker runs it
        _wait_for(out)
    else:
        try:
            _run("equal", out)
        except BaseException:  # pytest.fail's exception included
            (out / "failed").touch()
            raise
        (out / "done").touch()
    with open(out / "equal.json") as f:
        layouts = json.load(f)
    return np.load(out / "equal.npz"), layouts


def _wait_for(out, timeout=660):  # the run's own limit (`_run`), and a minute
    deadline = time.monotonic() + timeout
    while not (out / "done").exists():
        if (out / "failed").exists():
            pytest.fail("the shared sharding run failed in another pytest-xdist worker")
        if time.monotonic() > deadline:
            pytest.fail(f"another pytest-xdist worker's sharding run took over {timeout} s")
        time.sleep(1)


def _weights(arrays, key):
    found, i = [], 0
    while f"{key}/{i}" in arrays.files:
        found.append(arrays[f"{key}/{i}"])
        i += 1
    assert found, key
    return found


@pytest.mark.subprocess
@pytest.mark.slow  # equal_runs: about two minutes
def test_sharded_training_equals_unsharded(equal_runs):
    arrays, layouts = equal_runs
    runs = sorted(key.rsplit("/", 1)[0] for key in layouts if key.endswith("/sharded"))
    assert len(runs) == 2 * 8 * 2 + 3  # models x options x device counts, + three on 8
    for run in runs:
        whole, sharded = _weights(arrays, f"{run}/whole"), _weights(arrays, f"{run}/sharded")
        error = _max_difference(whole, sharded)
        model, options, _ = run.split("/")
        if options in BFLOAT16_OPTIONS:
            # The update is element-wise, but the sharded step is another XLA
            # program, whose float32 results may differ in the last bit
            # (measured with float32 state: 1.5e-8 after 20 steps). A
            # bfloat16 store can turn such a bit into one rounding of m the
            # other way (2**-8 of m), and the runs then drift apart. Any last-
            # bit change does that: the same optimizer without sharding on 4
            # devices instead of 8 (another all-reduce order) drifts as much
            # (measured: 6.2e-3 for bfloat16 alone, 3.5e-4 with every
            # option). Sharding may move the weights no further than that.
            # bfloat16 moments are written with stochastic rounding, which
            # turns such a bit into a rounding of m or v the other way as
            # rarely, but one flip early moves the weights by its own amount:
            # at most every step's m and v of an element one bfloat16 ulp off
            # (2^-8 + 2^-9 relative in its step), each step at most 2 lr
            # (Nesterov), STEPS = 20 steps of lr = 1e-2.
            other = _weights(arrays, f"{model}/{options}/{4 if run.endswith('/8') else 8}/whole")
            flips = 20 * 2 * 1e-2 * (2**-8 + 2**-9)
            tolerance = max(1e-6, _max_difference(whole, other), flips)
        else:
            # float32 state: only those last bits; 1e-6 is the bound asked of
            # sharding.
            tolerance = 1e-6
        assert error <= tolerance, (run, error, tolerance)


# The option sets of sharding_run.OPTIONS that store bfloat16 moments. 8-bit
# moments ("8bit", "model-parallel-8bit") are held to 1e-6: a last-bit
# difference would have to land within rounding of a midpoint between two
# codes to matter (measured: 0 on the MLP, 7e-9 on the embedding model).
# "pure-bfloat16" keeps the variables in bfloat16 too, written with stochastic
# rounding by the same element-indexed streams sharded or not: a last-bit
# difference flips a weight's rounding as rarely, and the model's own
# bfloat16 forward pass drifts as much with another all-reduce order
# (measured: sharded against whole 0 on the MLP, 4.9e-4, one bfloat16 ulp,
# on the embedding model; 4 against 8 devices 4.5e-2 and 4.6e-3).
BFLOAT16_OPTIONS = {"bfloat16", "all", "pure-bfloat16"}


def _max_difference(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


@pytest.mark.subprocess
@pytest.mark.slow  # equal_runs, when it runs first
def test_each_device_holds_its_share_of_the_state(equal_runs):
    _, layouts = equal_runs
    for key, slots in layouts.items():
        n = int(key.split("/")[2])
        if key.endswith("/whole"):
            for slot in slots:
                assert "batch" not in slot["spec"], (key, slot)
            continue
        device_total, expected = 0, 0
        for slot in slots:
            # ModelParallel: a (4, 2) mesh whose "model" axis splits the Dense
            # kernels' dimension 1; "batch" has 4 devices.
            taken = (1,) if "model" in slot["spec"] else ()
            own = 2 if taken else 1
            data_devices = 4 if "model-parallel" in key else n
            axis = _expected_axis(slot["shape"], data_devices, taken)
            assert (slot["spec"].index("batch") if "batch" in slot["spec"] else None) == axis
            share = slot["total_bytes"] // own // (data_devices if axis is not None else 1)
            assert set(slot["device_bytes"]) == {share}, (key, slot)
            device_total += share
            expected += slot["total_bytes"] // own
        if "mlp/default" in key or "embedding/default" in key:
            # The big tensors dominate: the device keeps well under half.
            assert device_total < expected / 2, (key, device_total, expected)


@pytest.mark.subprocess
@pytest.mark.slow
def test_sharded_state_resumes_on_fewer_devices(tmp_path):
    _jax_only()
    _run("resume", tmp_path)
    arrays = np.load(tmp_path / "resume.npz")
    uninterrupted = _weights(arrays, "uninterrupted")
    saved = _weights(arrays, "saved")
    for n in (4, 1):
        # The state comes back exactly, on any number of devices.
        for a, b in zip(saved, _weights(arrays, f"loaded-{n}")):
            np.testing.assert_array_equal(a, b)
        # The Embedding table's slots (1000 x 16) split 4 ways, or not at all.
        elements = arrays[f"device-elements-{n}/0"]
        assert elements[2] == elements[3] == 16000 // n
        # Continued training: the same as not stopping, up to the order of the
        # gradient all-reduce over another number of devices (float32 sums
        # in another order; measured 4e-8), under the 1e-6 asked of it.
        error = max(float(np.max(np.abs(a - b)))
                    for a, b in zip(uninterrupted, _weights(arrays, f"resumed-{n}")))
        assert error <= 1e-6, (n, error)


def _model():
    model = keras.Sequential([keras.Input((70,)), keras.layers.Dense(64)])
    model.build((None, 70))
    return model


def test_shard_state_without_sharding_changes_nothing():
    """One device (no distribution), or TensorFlow/torch: the plan says so, the math is the same."""
    grads = [np.random.default_rng(i).normal(size=v.shape).astype("float32")
             for i, v in enumerate(_model().trainable_variables)]
    results = []
    for shard in (False, True):
        model = _model()
        model.set_weights([np.ones_like(w) for w in model.get_weights()])
        optimizer = keras_adam.Adam(shard_state=shard)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            optimizer.build(model.trainable_variables)
        warned = [w for w in caught if "shard_state" in str(w.message)]
        if shard:
            plan = optimizer.update_plan()
            if keras.backend.backend() == "jax":
                assert not warned
                assert all("no keras.distribution is set" in r.state for r in plan.values())
            else:
                assert len(warned) == 1 and "JAX only" in str(warned[0].message)
                assert all("mirrors optimizer state" in r.state for r in plan.values())
            assert "state as its variable" in str(plan)
        else:
            assert not warned
            assert all(r.state == "" for r in optimizer.update_plan().values())
        for _ in range(3):
            optimizer.apply(grads, model.trainable_variables)
        results.append(model.get_weights())
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_shard_state_is_configured_and_fixed_once_built():
    optimizer = keras_adam.Adam(shard_state=True)
    config = optimizer.get_config()
    assert config["shard_state"] is True
    assert keras_adam.Adam.from_config(config).shard_state is True
    # Configs from before the option load with the default.
    del config["shard_state"]
    assert keras_adam.Adam.from_config(config).shard_state is False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer.build(_model().trainable_variables)
    with pytest.raises(ValueError, match="`shard_state` cannot change once the optimizer"):
        optimizer.shard_state = False
    assert optimizer.shard_state is True
