"""`keras_adam._rule.rule`, the one statement of the update, against the float64 reference.

The rule is a pure function of (g, m, v, v_max) and the step's scalars, so it
can be checked one step at a time, from arbitrary (non-zero) moments and any
t, without an optimizer around it.
"""

import keras
import numpy as np
import pytest
from grid import GRID_IDS, GRID_KWARGS, effective, reference_options

from keras_adam import _rule
from keras_adam import reference

# JAX computes in float32 unless x64 is enabled; elsewhere float64 shows the
# rule's algebra alone. Tolerances: a few float64 roundings (1e-15 relative);
# in float32, the ~10 operations of one step give 1e-6 relative (tests/grid.py).
DTYPE = "float32" if keras.backend.backend() == "jax" else "float64"
RTOL = 1e-6 if DTYPE == "float32" else 1e-12

RULE_KEYS = ("beta_1", "beta_2", "epsilon", "amsgrad", "nesterov", "bias_correction",
             "epsilon_placement")
DEFAULTS = dict(beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False, nesterov=False,
                bias_correction=True, epsilon_placement="hat")


def _hyper(kwargs):
    return _rule.Hyper(**{k: kwargs.get(k, DEFAULTS[k]) for k in RULE_KEYS})


@pytest.mark.parametrize("t", [1, 7, 300])
@pytest.mark.parametrize("kwargs", GRID_KWARGS, ids=GRID_IDS)
def test_one_step_of_the_rule_is_algorithm_1(kwargs, t):
    kwargs = effective(kwargs)  # a group holding every variable: its values
    rng = np.random.default_rng(t)
    g = rng.normal(size=(5, 4)) * 10.0 ** rng.uniform(-3, 2, size=(1, 4))
    m = rng.normal(size=(5, 4)) * 0.1
    v = rng.uniform(0, 1, size=(5, 4)) * 0.01
    v_max = v + rng.uniform(0, 0.01, size=(5, 4))
    lr = kwargs.get("learning_rate", 1e-3)
    hyper = _hyper(kwargs)

    state = reference.State(t=t - 1, m=m, v=v, v_max=v_max)
    options = {k: v for k, v in reference_options(kwargs).items() if k != "weight_decay"}
    theta, want = reference.step(np.zeros_like(g), g, state, **{**options, "learning_rate": lr})

    def tensor(x):
        return keras.ops.convert_to_tensor(x, dtype=DTYPE)

    s = _rule.step_scalars(hyper, tensor(t), tensor(lr), DTYPE)
    m1, v1, v_max1, step = _rule.rule(
        tensor(g), tensor(m), tensor(v), tensor(v_max) if hyper.amsgrad else None, s, hyper)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(step), -theta, rtol=RTOL, atol=0)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(m1), want.m, rtol=RTOL, atol=0)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(v1), want.v, rtol=RTOL, atol=0)
    if hyper.amsgrad:
        np.testing.assert_allclose(keras.ops.convert_to_numpy(v_max1), want.v_max, rtol=RTOL)
    else:
        assert v_max1 is None


@pytest.mark.parametrize("placement", ["hat", "paper"])
def test_float_and_tensor_folds_agree(placement):
    # The host-side (Python float) bias factors and fold, used by the torch
    # kernel's arguments and AdamMonitor, are the tensor ones in float64.
    t, lr, eps = 12, 3e-3, 1e-6
    c1, c2 = _rule.bias_factors_float(t, 0.9, 0.999, True)
    alpha, eps_folded = _rule.fold_step_size(lr, c1, c2, eps, placement, sqrt=np.sqrt)
    hyper = _rule.Hyper(0.9, 0.999, eps, False, False, True, placement)
    s = _rule.step_scalars(hyper, keras.ops.convert_to_tensor(t, DTYPE),
                           keras.ops.convert_to_tensor(lr, DTYPE), DTYPE)
    for host, device in [(c1, s.c1), (c2, s.c2), (alpha, s.alpha), (eps_folded, s.epsilon)]:
        np.testing.assert_allclose(float(device), host, rtol=RTOL)
    # Closed forms: c = 1 - beta^t, alpha = lr sqrt(c2) / c1.
    np.testing.assert_allclose(c1, 1 - 0.9**t, rtol=1e-14)
    np.testing.assert_allclose(alpha, lr * np.sqrt(1 - 0.999**t) / (1 - 0.9**t), rtol=1e-14)


def test_a_pickled_hyper_hashes_as_a_new_one_in_another_process():
    """`Hyper` caches its hash, and a string's hash differs between processes
    (PYTHONHASHSEED): unpickled in another process, a Hyper must hash as one
    made there with the same values, or a dict of compiled functions keyed
    by it would miss (or two keys of equal Hypers coexist). The oracle is
    the other process's own Hyper."""
    import os
    import pickle
    import subprocess
    import sys

    hyper = _hyper({"epsilon_placement": "paper"})
    hash(hyper)  # cached in this process
    child = ("import pickle, sys\n"
             "from keras_adam import _rule\n"
             "got = pickle.loads(sys.stdin.buffer.read())\n"
             "new = _rule.Hyper(**{f: getattr(got, f) for f in _rule.HYPER_FIELDS})\n"
             "print(got == new, hash(got) == hash(new), {new: 1}.get(got))\n")
    # A seed other than this process's: the string field hashes otherwise.
    seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    done = subprocess.run([sys.executable, "-c", child], input=pickle.dumps(hyper),
                          capture_output=True, timeout=300,
                          env={**os.environ, "PYTHONHASHSEED": seed})
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.decode().split()[-3:] == ["True", "True", "1"], done.stdout
