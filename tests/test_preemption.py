"""A training process killed with SIGKILL mid-epoch resumes to the uninterrupted result."""

import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import run_python, start_python

SCRIPT = Path(__file__).with_name("preemption_run.py")
TIMEOUT = 180
pytestmark = [pytest.mark.subprocess, pytest.mark.slow]


def _arrays(path):
    """(weights and optimizer variables, the epochs this process ran)."""
    with np.load(path) as f:
        return [f[f"arr_{i}"] for i in range(len(f.files) - 1)], list(f["epochs_run"])


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_sigkill_mid_epoch_then_restart_matches_uninterrupted(tmp_path):
    marker = tmp_path / "paused"
    # Epoch 2 (0-based), batch 4 of 10: in the middle of an epoch, after two
    # epoch-end backups have been written. Started, not run: this process
    # waits for the pause, then kills it.
    victim = start_python(SCRIPT, tmp_path / "backup", tmp_path / "never.npz", 2, 4, marker,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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

    run_python(SCRIPT, tmp_path / "backup", tmp_path / "resumed.npz", timeout=TIMEOUT)
    run_python(SCRIPT, tmp_path / "fresh-backup", tmp_path / "uninterrupted.npz", timeout=TIMEOUT)
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
