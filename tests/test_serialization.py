"""Config round trips, registration, and loading a saved model without custom_objects."""

import copy
import inspect

import keras
import numpy as np
import pytest

import keras_adam

NON_DEFAULT = dict(
    learning_rate=0.02, beta_1=0.8, beta_2=0.99, epsilon=1e-5, amsgrad=True, nesterov=True,
    bias_correction=False, epsilon_placement="paper", weight_decay=0.01, clipnorm=2.0,
    sparse_updates="lazy", fused=False,
    use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=5, loss_scale_factor=8.0,
    gradient_accumulation_steps=2, name="my_adam",
)


@pytest.mark.parametrize("cls", [keras_adam.Adam, keras_adam.AdamW, keras_adam.LazyAdam])
def test_config_holds_every_constructor_argument(cls):
    params = set(inspect.signature(keras_adam.Adam.__init__).parameters) - {"self", "kwargs"}
    config = cls().get_config()
    assert params <= set(config), f"missing from get_config: {params - set(config)}"


@pytest.mark.parametrize("cls", [keras_adam.Adam, keras_adam.AdamW, keras_adam.LazyAdam])
def test_from_config_round_trip(cls):
    optimizer = cls(**NON_DEFAULT)
    config = optimizer.get_config()
    for key, value in NON_DEFAULT.items():
        assert config[key] == pytest.approx(value), key
    snapshot = copy.deepcopy(config)
    rebuilt = cls.from_config(config)
    assert type(rebuilt) is cls
    assert rebuilt.get_config() == snapshot
    assert config == snapshot  # the caller's dict is left alone


def test_schedule_round_trip():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=7, decay_rate=0.5)
    rebuilt = keras_adam.Adam.from_config(keras_adam.Adam(learning_rate=schedule).get_config())
    assert isinstance(rebuilt._learning_rate, keras.optimizers.schedules.ExponentialDecay)
    assert rebuilt._learning_rate.get_config() == schedule.get_config()


@pytest.mark.parametrize("name,cls", [("keras_adam>Adam", keras_adam.Adam),
                                      ("keras_adam>AdamW", keras_adam.AdamW),
                                      ("keras_adam>LazyAdam", keras_adam.LazyAdam)])
def test_string_lookup(name, cls):
    assert type(keras.optimizers.get(name)) is cls


def test_serialize_deserialize():
    optimizer = keras_adam.Adam(amsgrad=True, epsilon_placement="paper")
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(restored) is keras_adam.Adam
    assert restored.get_config() == optimizer.get_config()


@pytest.mark.parametrize(
    "change,exc,pattern",
    [
        (dict(betas=[0.9, 0.999]), ValueError, r"Unknown field.*betas"),
        (dict(amsgrad="yes"), TypeError, r"`amsgrad`"),
        (dict(beta_2=1.0), ValueError, r"`beta_2`"),
        (dict(epsilon_placement="torch"), ValueError, r"`epsilon_placement`"),
        (dict(learning_rate="0.1"), ValueError, r"`learning_rate`"),
    ],
    ids=["unknown", "wrong-type", "out-of-range", "bad-choice", "string-lr"],
)
def test_bad_config_names_the_field(change, exc, pattern):
    config = {**keras_adam.Adam().get_config(), **change}
    with pytest.raises(exc, match=pattern):
        keras_adam.Adam.from_config(config)


def test_load_model_without_custom_objects(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 3)).astype("float32"), rng.normal(size=(64, 1)).astype("float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(1)])
    model.compile(optimizer=keras_adam.Adam(amsgrad=True, epsilon_placement="paper"), loss="mse")
    model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)

    loaded = keras.models.load_model(path)  # safe_mode=True, no custom_objects
    assert type(loaded.optimizer) is keras_adam.Adam
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    assert len(loaded.optimizer.variables) == len(model.optimizer.variables)
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())  # stored, not recomputed
    assert int(loaded.optimizer.iterations.numpy()) == 8


@pytest.mark.backend_independent
def test_the_installed_keras_is_in_the_declared_range():
    # setup.cfg declares the Keras range the suite is run on; a Keras outside
    # it is untested, and so is a declared range this run does not reach.
    import configparser
    from pathlib import Path

    from packaging.requirements import Requirement

    config = configparser.ConfigParser()
    config.read(Path(__file__).resolve().parent.parent / "setup.cfg")
    requirements = [Requirement(line) for line in
                    config["options"]["install_requires"].split("\n") if line.strip()]
    (keras_requirement,) = [r for r in requirements if r.name == "keras"]
    assert keras.__version__ in keras_requirement.specifier
