"""XLA_FLAGS=--xla_cpu_copy_insertion_use_region_analysis=true (docs/speed.md).

Under XLA with the state updated in place, XLA's default analysis copies
each moment before the step (fused loops read it, and one of them
overwrites it); the flag's analysis finds the order that needs no copy.
The docs recommend the flag on CPUs: it must change no bit of the steps of
bfloat16 moments, 8-bit moments and pure bfloat16, and (the docs' claim)
remove the moments' copies, counted in the compiled program (the C loop's
custom call, which a CPU runs, copies none either way): JAX's compiled
step, and on TensorFlow the cluster's optimized HLO as
`experimental_get_compiler_ir` compiles it (a compilation of its own, with
the same flags; the steps whose bits are compared run the cluster XLA
compiles for them).
"""

from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import run_python

SCRIPT = Path(__file__).with_name("xla_flags_run.py")
FLAG = "--xla_cpu_copy_insertion_use_region_analysis=true"
pytestmark = [pytest.mark.subprocess, pytest.mark.slow,
              pytest.mark.skipif(keras.backend.backend() not in ("jax", "tensorflow"),
                                 reason="XLA_FLAGS: JAX and TensorFlow only")]


def test_region_analysis_changes_no_bit_and_removes_the_copies(tmp_path):
    # The oracle: the same steps compiled with XLA's default analysis, which
    # keeps a copy of every buffer it cannot prove safe to overwrite. A copy
    # wrongly left out would let a fused loop read a moment already
    # overwritten: other bits.
    run_python(SCRIPT, tmp_path / "default.npz", env={"XLA_FLAGS": ""})
    run_python(SCRIPT, tmp_path / "flag.npz", env={"XLA_FLAGS": FLAG})
    with np.load(tmp_path / "default.npz") as d, np.load(tmp_path / "flag.npz") as f:
        assert sorted(d.files) == sorted(f.files)
        for name in d.files:
            if not name.endswith("/copies"):
                np.testing.assert_array_equal(d[name], f[name], err_msg=name)
        # The bfloat16 moments' step: the moments copied by default (at least
        # the large variable's m and v), none with the flag.
        assert int(d["bfloat16/copies"]) >= 2
        assert int(f["bfloat16/copies"]) == 0
        # The C loop of a CPU (one custom call whose results alias the state
        # given up for the new values) copies no moment (bfloat16, 8-bit
        # codes), with or without the flag.
        assert all(int(x[f"c-loop/{name}/copies"]) == 0 for x in (d, f)
                   for name in ("bfloat16", "8bit", "pure-bfloat16"))
