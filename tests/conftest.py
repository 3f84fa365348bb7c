import os
import shutil
import tempfile

# pytest-xdist's workers share the machine's cores. Give each its share of
# OpenMP threads before torch loads: oversubscribed, OpenMP's spinning
# threads make torch's CPU kernels 4x slower (measured with one busy core).
if os.environ.get("PYTEST_XDIST_WORKER"):
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

import keras  # noqa: E402
import pytest


def _full_float32_matmuls():
    # On a GPU the frameworks may multiply float32 matrices in TF32 (10-bit
    # mantissas); the tests' tolerances are derived for float32. No-op on CPU.
    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    elif backend == "jax":
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
    elif backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_tensor_float_32_execution(False)


_full_float32_matmuls()


def pytest_configure(config):
    # keras_adam keeps what it compiles (its C loops, TensorFlow's op and XLA
    # custom call) in a cache directory, by default under ~/.cache. The tests
    # build libraries of their own (other macros, an edited source), so a run
    # keeps them in a directory of its own, which its pytest-xdist workers and
    # the processes they start inherit, removed at the end. A
    # KERAS_ADAM_CACHE_DIR set for the run is used as it is (a developer's
    # persistent one: TensorFlow's XLA library takes about a minute).
    if "KERAS_ADAM_CACHE_DIR" not in os.environ and not os.environ.get("PYTEST_XDIST_WORKER"):
        where = tempfile.mkdtemp(prefix="keras_adam_tests_")
        os.environ["KERAS_ADAM_CACHE_DIR"] = where
        config.add_cleanup(lambda: shutil.rmtree(where, True))


def pytest_report_header(config):
    requested = os.environ.get("KERAS_BACKEND")
    return f"keras backend: {keras.backend.backend()} (KERAS_BACKEND={requested})"


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Fixed seeds and a clean global state for every test."""
    keras.utils.set_random_seed(1234)
    yield
    # Without Python's full garbage collection, which clear_session runs by
    # default: 0.25-0.5 s a test with a framework's objects loaded, some
    # minutes of each run. Python's own collection still frees cycles; tests
    # that need an object gone collect it themselves.
    keras.backend.clear_session(free_memory=False)
