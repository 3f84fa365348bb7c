"""A training process killed with SIGKILL mid-epoch resumes to the uninterrupted result."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).with_name("preemption_run.py")
TIMEOUT = 180


def _run(*args):
    result = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)],
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]


def _arrays(path):
    """(weights and optimizer variables, the epochs this process ran)."""
    with np.load(path) as f:
        return [f[f"arr_{i}"] for i in range(len(f.files) - 1)], list(f["epochs_run"])


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_sigkill_mid_epoch_then_restart_matches_uninterrupted(tmp_path):
    marker = tmp_path / "paused"
    # Epoch 2 (0-based), batch 4 of 10: in the middle of an epoch, after two
    # epoch-end backups have been written.
    victim = subprocess.Popen(
        [sys.executable, str(SCRIPT), *map(str, [tmp_path / "backup", tmp_path / "never.npz", 2, 4, marker])],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT
    while not marker.exists():
        assert victim.poll() is None, victim.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the training process never reached the pause"
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    assert (tmp_path / "backup").exists()
    assert not (tmp_path / "never.npz").exists()

    _run(tmp_path / "backup", tmp_path / "resumed.npz")
    _run(tmp_path / "fresh-backup", tmp_path / "uninterrupted.npz")
    (resumed, resumed_epochs) = _arrays(tmp_path / "resumed.npz")
    (uninterrupted, all_epochs) = _arrays(tmp_path / "uninterrupted.npz")
    # The restart really resumed: it replayed the interrupted epoch 2 and ran
    # epoch 3, starting from the epoch-end backup rather than from scratch.
    assert resumed_epochs == [2, 3] and all_epochs == [0, 1, 2, 3]
    assert len(resumed) == len(uninterrupted)
    # Same ops on the same restored values in the same order: bit for bit.
    # (The arrays include the step counter, m, v, v_max and the schedule's
    # learning rate is a function of that counter.)
    for a, b in zip(resumed, uninterrupted):
        np.testing.assert_array_equal(a, b)
