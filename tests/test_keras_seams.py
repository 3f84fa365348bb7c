"""Issue #14: the seams with Keras. State that does not match is refused (never
skipped), weight-decay exclusions survive saving, runs migrate to and from the
built-in Adam, names and errors are Keras's, and assignments are validated."""

import os
import zipfile
import json

import keras
import numpy as np
import pytest
from grid import UNIT_ROUNDOFF, float32_drift_bound

import keras_adam

DATA = os.path.join(os.path.dirname(__file__), "data")


def _model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="hidden"),
                             keras.layers.Dense(1, name="out")])


def _train(model, steps, seed=1):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        # As tensors: the built-in Adam on torch refuses NumPy gradients.
        grads = [keras.ops.convert_to_tensor(rng.normal(size=v.shape).astype("float32"))
                 for v in model.trainable_variables]
        model.optimizer.apply(grads, model.trainable_variables)


def _values(optimizer):
    return [keras.ops.convert_to_numpy(v).copy() for v in optimizer.variables]


def _compiled(optimizer):
    model = _model()
    model.compile(optimizer=optimizer, loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


# --- Strict, named state loading --------------------------------------------

def test_weights_file_with_other_slots_is_refused_and_nothing_changes(tmp_path):
    saved = _compiled(keras_adam.Adam())
    _train(saved, 3)
    path = str(tmp_path / "m.weights.h5")
    saved.save_weights(path)

    target = _compiled(keras_adam.Adam(amsgrad=True))
    _train(target, 2, seed=5)
    before = _values(target.optimizer)
    missing = r"Missing from the file: \['v_max\[0\] \(sequential\w*/hidden/kernel\)'"
    with pytest.raises(ValueError, match=missing):
        target.load_weights(path)
    for a, b in zip(_values(target.optimizer), before):
        np.testing.assert_array_equal(a, b)


def test_tampered_keras_file_is_refused_naming_the_slots(tmp_path):
    model = _compiled(keras_adam.Adam(amsgrad=True))
    _train(model, 3)
    path = str(tmp_path / "m.keras")
    model.save(path)
    # Flip amsgrad in the stored config: the file then holds v_max slots that
    # the configured optimizer does not have (Keras itself only warns).
    tampered = str(tmp_path / "tampered.keras")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tampered, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(data)
                config["compile_config"]["optimizer"]["config"]["amsgrad"] = False
                data = json.dumps(config).encode()
            dst.writestr(item, data)
    with pytest.raises(ValueError, match=r"In the file but not in this optimizer: \['v_max\[0\]"):
        keras.models.load_model(tampered)


def test_legacy_file_with_another_count_is_refused():
    # Files of keras_adam 0.1 name no slots: a count mismatch still raises.
    model = _compiled(keras_adam.Adam(amsgrad=True))
    before = _values(model.optimizer)
    with pytest.raises(ValueError, match=r"has 10 variables, and this optimizer has 14"):
        model.load_weights(os.path.join(DATA, "adam_defaults.keras"))
    for a, b in zip(_values(model.optimizer), before):
        np.testing.assert_array_equal(a, b)


def test_builtin_adam_file_loads(tmp_path):
    builtin = _compiled(keras.optimizers.Adam(amsgrad=True))
    _train(builtin, 4)
    path = str(tmp_path / "builtin.weights.h5")
    builtin.save_weights(path)
    ours = _compiled(keras_adam.Adam(amsgrad=True))
    ours.load_weights(path)
    for a, b in zip(_values(ours.optimizer), _values(builtin.optimizer)):
        np.testing.assert_array_equal(a, b)


def test_state_loaded_before_build_is_applied_at_build():
    source = _compiled(keras_adam.Adam())
    _train(source, 3)
    store = {}
    source.optimizer.save_own_variables(store)
    fresh = keras_adam.Adam()
    fresh.load_own_variables(store)  # not built: kept until build
    model = _model()
    fresh.build(model.trainable_variables)
    for a, b in zip(_values(fresh), _values(source.optimizer)):
        np.testing.assert_array_equal(a, b)


# --- Weight-decay exclusions persist ----------------------------------------

def _adamw_with_exclusions(model):
    optimizer = keras_adam.AdamW(learning_rate=1e-2, weight_decay=0.5)
    optimizer.exclude_from_weight_decay(var_list=[model.layers[1].kernel], var_names=["bias"])
    model.compile(optimizer=optimizer, loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


def _decayed(optimizer, model):
    return [optimizer._use_weight_decay(v) for v in model.trainable_variables]


def test_exclusions_survive_get_config_and_keras_files(tmp_path):
    model = _adamw_with_exclusions(_model())
    # hidden/kernel decays; both biases (by name) and out/kernel (by variable) do not.
    assert _decayed(model.optimizer, model) == [True, False, False, False]
    config = model.optimizer.get_config()
    rebuilt = keras_adam.AdamW.from_config(config)
    rebuilt.build(model.trainable_variables)
    assert _decayed(rebuilt, model) == [True, False, False, False]

    _train(model, 2)
    path = str(tmp_path / "w.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert _decayed(loaded.optimizer, loaded) == [True, False, False, False]
    _train(model, 3, seed=9)
    _train(loaded, 3, seed=9)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)


# --- Migration ----------------------------------------------------------------

N, M = 6, 6


@pytest.mark.parametrize("builtin_cls,kwargs", [
    (keras.optimizers.Adam, dict(amsgrad=True)),
    (keras.optimizers.AdamW, dict(weight_decay=0.1)),
], ids=["adam-amsgrad", "adamw"])
def test_migration_from_keras_and_back_continues_the_run(builtin_cls, kwargs):
    # N steps with one optimizer, convert, M more == N + M with the first.
    reference = _compiled(builtin_cls(learning_rate=1e-2, **kwargs))
    _train(reference, N + M)

    model = _compiled(builtin_cls(learning_rate=1e-2, **kwargs))
    rng = np.random.default_rng(1)
    grads = [[keras.ops.convert_to_tensor(rng.normal(size=v.shape).astype("float32"))
              for v in model.trainable_variables] for _ in range(N + M)]
    for g in grads[:N // 2]:
        model.optimizer.apply(g, model.trainable_variables)
    ours = keras_adam.from_keras(model.optimizer)
    assert type(ours) is (keras_adam.AdamW if builtin_cls is keras.optimizers.AdamW
                          else keras_adam.Adam)
    assert int(keras.ops.convert_to_numpy(ours.iterations)) == N // 2
    for g in grads[N // 2:N]:
        ours.apply(g, model.trainable_variables)
    back = keras_adam.to_keras(ours)
    # isinstance: on torch, Keras constructs its own torch subclasses.
    assert isinstance(back, builtin_cls) and not isinstance(back, keras_adam.Adam)
    assert isinstance(back, keras.optimizers.AdamW) == (builtin_cls is keras.optimizers.AdamW)
    for g in grads[N:]:
        back.apply(g, model.trainable_variables)
    # Each optimizer is within the float32 drift bound of the exact run
    # (tests/grid.py), steps at most ~lr = 1e-2.
    for a, b in zip(model.trainable_variables, reference.trainable_variables):
        bound = 2 * float32_drift_bound(N + M, 1e-2, 1.0)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(a),
                                   keras.ops.convert_to_numpy(b), rtol=0, atol=bound)
    # Slots: ~2u relative per step for each (tests/grid.py); m mixes signs,
    # so its floor is that error times the largest gradient (|g| < 4 here).
    for a, b in zip(back.variables, reference.optimizer.variables):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b),
                                   rtol=2 * 2 * (N + M) * UNIT_ROUNDOFF,
                                   atol=2 * 2 * (N + M) * UNIT_ROUNDOFF * 4)


def test_migration_refuses_what_cannot_be_expressed():
    with pytest.raises(TypeError, match="keras.optimizers.Adam or AdamW"):
        keras_adam.from_keras(keras.optimizers.SGD())
    with pytest.raises(ValueError, match="`nesterov=True`"):
        keras_adam.to_keras(keras_adam.Adam(nesterov=True))
    with pytest.raises(ValueError, match="`epsilon_placement='paper'`"):
        keras_adam.to_keras(keras_adam.Adam(epsilon_placement="paper"))


# --- Keras-like identity and errors ------------------------------------------

def test_default_names_are_keras_automatic_names():
    assert [keras_adam.Adam().name, keras_adam.Adam().name] == ["adam", "adam_1"]
    assert keras_adam.AdamW().name == "adam_w"
    assert keras_adam.LazyAdam().name == "lazy_adam"
    assert keras_adam.Adam(name="mine").name == "mine"


@pytest.mark.parametrize("value", ["0.001", True, None, [1e-3]])
def test_learning_rate_of_the_wrong_type_is_the_builtins_error(value):
    with pytest.raises(ValueError):
        keras.optimizers.Adam(learning_rate=value)
    with pytest.raises(ValueError, match="`learning_rate`"):
        keras_adam.Adam(learning_rate=value)


@pytest.mark.parametrize("name,value,exc", [
    ("beta_1", 1.5, ValueError), ("beta_2", -0.1, ValueError), ("epsilon", -1.0, ValueError),
    ("amsgrad", "yes", TypeError), ("epsilon_placement", "torch", ValueError),
    ("sparse_updates", "dense", ValueError), ("moment_dtype", "int8", ValueError),
])
def test_assignments_are_validated_like_the_constructor(name, value, exc):
    optimizer = keras_adam.Adam()
    before = getattr(optimizer, name)
    with pytest.raises(exc, match=f"`{name}`"):
        setattr(optimizer, name, value)
    assert getattr(optimizer, name) == before


def test_assigned_options_replan_and_slot_options_are_fixed_after_build():
    optimizer = keras_adam.Adam()
    optimizer.nesterov = True
    optimizer.build(_model().trainable_variables)
    # Nesterov with bias correction has no fused kernel on any backend.
    assert {r.method for r in optimizer.update_plan().values()} == {"portable"}
    optimizer.nesterov = False
    fast = {"tensorflow": "tensorflow-fused", "torch": "torch-multi-tensor",
            "jax": "portable"}[keras.backend.backend()]
    assert {r.method for r in optimizer.update_plan().values()} == {fast}
    with pytest.raises(ValueError, match="`amsgrad` cannot change once the optimizer is built"):
        optimizer.amsgrad = True
    assert optimizer.amsgrad is False


def test_migration_keeps_weight_decay_exclusions():
    model = _model()
    builtin = keras.optimizers.AdamW(weight_decay=0.1)
    builtin.exclude_from_weight_decay(var_list=[model.layers[0].kernel], var_names=["bias"])
    builtin.build(model.trainable_variables)
    ours = keras_adam.from_keras(builtin)
    want = [builtin._use_weight_decay(v) for v in model.trainable_variables]
    assert want == [False, False, True, False]
    assert [ours._use_weight_decay(v) for v in model.trainable_variables] == want
    back = keras_adam.to_keras(ours)
    assert [back._use_weight_decay(v) for v in model.trainable_variables] == want


# --- Refusals say what they left, and name the option that differs ---------

def _eight_bit_model(min_8bit_size):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="hidden"),
                              keras.layers.Dense(1, name="out")])
    model.compile(optimizer=keras_adam.Adam(moment_dtype="8bit", moment_block_size=8,
                                            min_8bit_size=min_8bit_size), loss="mse")
    return model


def test_another_min_8bit_size_is_named_and_the_message_says_what_was_loaded(tmp_path):
    import warnings

    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    saved = _eight_bit_model(16)  # the 4 x 8 kernel in 8 bits
    saved.fit(x, x[:, :1], verbose=0)
    path = str(tmp_path / "m.weights.h5")
    saved.save_weights(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # min_8bit_size=4096 quantizes nothing: it warns
        other = _eight_bit_model(4096)
        other.optimizer.build(other.trainable_variables)
    before = [keras.ops.convert_to_numpy(v).copy() for v in other.optimizer.variables]
    with pytest.raises(ValueError, match="min_8bit_size") as refused:
        other.load_weights(path)
    message = str(refused.value)
    assert "nothing was loaded" not in message
    assert "optimizer's state was not loaded" in message
    # What the message says is what happened: the model's weights are the
    # file's (Keras loads them first), the optimizer's variables are untouched.
    for a, b in zip(other.get_weights(), saved.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(other.optimizer.variables, before):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), b)


def test_eight_bit_that_quantizes_nothing_warns_once_naming_min_8bit_size():
    # A LoRA-like set of small adapters: every one is under min_8bit_size.
    variables = [keras.Variable(np.zeros((64, 8), "float32")),
                 keras.Variable(np.zeros((8, 64), "float32"))]
    with pytest.warns(UserWarning, match="min_8bit_size=4096") as caught:
        keras_adam.Adam(moment_dtype="8bit").build(variables)
    assert len([w for w in caught if "min_8bit_size" in str(w.message)]) == 1
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one variable is quantized: no warning
        keras_adam.Adam(moment_dtype="8bit", min_8bit_size=512).build(
            [keras.Variable(np.zeros((64, 8), "float32"))])


@pytest.mark.parametrize("builtin_class", [keras.optimizers.Adam, keras.optimizers.AdamW])
def test_a_keras_adam_file_loads_into_the_builtin_with_t_m_v(tmp_path, builtin_class):
    import warnings

    ours_class = keras_adam.Adam if builtin_class is keras.optimizers.Adam else keras_adam.AdamW
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")

    def model(optimizer):
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(1)])
        m.compile(optimizer=optimizer, loss="mse")
        return m

    ours = model(ours_class())
    ours.fit(x, x[:, :1], batch_size=8, verbose=0)  # t = 4
    path = str(tmp_path / "ours.weights.h5")
    ours.save_weights(path)
    builtin = model(builtin_class())
    builtin.optimizer.build(builtin.trainable_variables)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Keras warns, and skips, on a count mismatch
        builtin.load_weights(path)
    assert int(keras.ops.convert_to_numpy(builtin.optimizer.iterations)) == 4
    for variable in ours.trainable_variables:
        index = ours.optimizer._get_variable_index(variable)
        m, v, _ = ours.optimizer.slots(variable)
        for slot, theirs in ((m, builtin.optimizer._momentums[index]),
                             (v, builtin.optimizer._velocities[index])):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(theirs),
                                          keras.ops.convert_to_numpy(slot))
    # And back: keras_adam still reads its roles from the file.
    again = model(ours_class())
    again.optimizer.build(again.trainable_variables)
    again.load_weights(path)
    for a, b in zip(again.optimizer.variables, ours.optimizer.variables):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a),
                                      keras.ops.convert_to_numpy(b))


def test_a_file_with_the_roles_as_an_entry_still_loads():
    # keras_adam 0.2 wrote the roles as one more entry, "slot_roles"; a store
    # without H5 attributes does too.
    from keras_adam import _saving

    store = {}
    variables = [keras.Variable(np.arange(3.0, dtype="float32"))]
    _saving.save(store, variables, [("m[0]", "w")])
    assert set(store) == {"0", _saving.ROLES_KEY}
    roles, values = _saving.read(store, "adam")
    assert roles == [("m[0]", "w")]
    np.testing.assert_array_equal(values[0], np.arange(3.0))


def test_a_subclass_update_step_is_called_for_each_variable_at_each_step():
    # Keras's contract: `update_step` runs once per variable and step. keras_adam
    # loops over the variables itself where Keras's loop is a plain one; a
    # subclass that defines `update_step` must still see every call.
    seen = []

    class Recording(keras_adam.Adam):
        def update_step(self, gradient, variable, learning_rate):
            seen.append(tuple(variable.shape))  # (on TensorFlow a tf.Variable)
            return super().update_step(gradient, variable, learning_rate)

    model, plain = _model(), _model()
    for m, optimizer in ((model, Recording(moment_dtype="bfloat16")),
                         (plain, keras_adam.Adam(moment_dtype="bfloat16"))):
        m.compile(optimizer=optimizer, loss="mse")
        optimizer.build(m.trainable_variables)
        _train(m, 3)
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    assert seen == shapes * 3
    # The override delegates: the same arithmetic as the class it extends.
    for a, b in zip(model.trainable_variables, plain.trainable_variables):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
