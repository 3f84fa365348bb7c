"""The playground example runs, and its first steps are the paper's closed forms."""

import importlib.util
from pathlib import Path

import numpy as np

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_playground(tmp_path, capsys):
    playground = _load("playground")
    output = tmp_path / "plot.png"
    runs = playground.main(["--steps", "20", "--noise", "0.3", "--output", str(output)])
    printed = capsys.readouterr().out
    assert "Adam (bias correction)" in printed and "SGD" in printed
    # Step 1 moves x by lr (bias correction) or by (1-b1)/sqrt(1-b2) lr = 0.316
    # (without), whatever the gradient; float32 x near 4 has ulp 5e-7.
    xs, m_hat, v_hat = runs["Adam (bias correction)"]
    assert abs(abs(xs[1] - xs[0]) - 0.1) < 1e-5
    xs_off, _, _ = runs["Adam (no bias correction)"]
    assert abs(abs(xs_off[1] - xs_off[0]) - 0.1 * 0.1 / np.sqrt(0.001)) < 1e-5
    # m_hat after step 1 is the first gradient itself; v_hat its square
    assert abs(v_hat[0] - m_hat[0] ** 2) < 1e-4 * m_hat[0] ** 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "pip install -e .[examples]" in printed
    else:
        assert output.stat().st_size > 0
