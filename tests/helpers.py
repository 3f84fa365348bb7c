"""Running helper scripts in fresh Python processes, shared by the tests that need one.

A Keras backend, JAX's device count and TensorFlow's runtime settings are
fixed when they are first imported, so some tests run a script
(tests/*_run.py, or `python -m keras_adam.benchmark`) in a new process.
Every such process gets the same environment: this one's, without a
multi-worker TF_CONFIG, with an explicit KERAS_BACKEND (the active one unless
a test names another) and TensorFlow's C++ logging quieted.
"""

import os
import subprocess
import sys

import keras
import pytest

# Seconds a helper process may take: a hung collective or a stuck worker must
# fail its test rather than hang the run. Most scripts take under a minute on
# a 2-core CPU; a test whose script does more passes its own.
TIMEOUT = 240
# The end of a failed process's output shown in the test's failure.
OUTPUT_TAIL = 4000


def script_env(backend=None, **extra):
    """The environment of a helper process: a copy of this one, with `extra` on top."""
    env = dict(os.environ)
    # A TF_CONFIG left in the environment would make every helper a worker of
    # that cluster; the multi-worker test passes its own through `extra`.
    env.pop("TF_CONFIG", None)
    env["KERAS_BACKEND"] = backend or keras.backend.backend()
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.update(extra)
    return env


def start_python(*argv, backend=None, env=None, **popen_kwargs):
    """`sys.executable *argv` started with `script_env`, for tests that run processes together."""
    return subprocess.Popen([sys.executable, *map(str, argv)],
                            env=script_env(backend, **(env or {})), text=True, **popen_kwargs)


def run_python(*argv, backend=None, env=None, timeout=TIMEOUT):
    """Runs `sys.executable *argv` to completion; returns the CompletedProcess.

    `argv` is a script's path and its arguments, or "-m" and a module's. The
    test fails, showing the end of the process's output, if it exits with a
    non-zero status or runs past `timeout` seconds.
    """
    argv = [str(a) for a in argv]
    try:
        result = subprocess.run([sys.executable, *argv], env=script_env(backend, **(env or {})),
                                capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{' '.join(argv)} ran past {timeout} s:\n{_tail(error.stdout, error.stderr)}")
    if result.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited with {result.returncode}:\n"
                    f"{_tail(result.stdout, result.stderr)}")
    return result


def _tail(stdout, stderr):
    def text(stream):
        return stream.decode(errors="replace") if isinstance(stream, bytes) else stream or ""

    return (text(stdout) + text(stderr))[-OUTPUT_TAIL:]
