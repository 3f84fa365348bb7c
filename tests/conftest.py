import os

import keras
import pytest


def pytest_report_header(config):
    requested = os.environ.get("KERAS_BACKEND")
    return f"keras backend: {keras.backend.backend()} (KERAS_BACKEND={requested})"


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Fixed seeds and a clean global state for every test."""
    keras.utils.set_random_seed(1234)
    yield
    keras.backend.clear_session()
