"""`groups`: per-variable hyperparameters, one step counter, one state.

The oracles: separate keras_adam optimizers, each with one group's values
and the same method options, applied to that group's variables; and
`torch.optim.AdamW` with param groups (epsilon_placement="paper", the
placement torch uses).
"""

import re
import warnings

import keras
import numpy as np
import pytest
from grid import float32_drift_bound, gradient_sequence, initial_values, run_optimizer

import keras_adam

# Four variables, named so that the patterns below split them three ways:
# "backbone_kernel" and "backbone_bias" match the first pattern (first match
# wins over ".*bias"), "head_bias" the second, "head_kernel" none.
NAMES = ["backbone_kernel", "backbone_bias", "head_kernel", "head_bias"]
SHAPES = [(9, 8), (8,), (8, 3), (3,)]
GROUPS = {
    r"backbone_.*": {"learning_rate_multiplier": 0.1, "beta_1": 0.8, "epsilon": 1e-4},
    r".*bias": {"weight_decay": 0.0, "beta_2": 0.99},
}
BASE = dict(learning_rate=1e-2, weight_decay=0.05)
MEMBERS = {r"backbone_.*": [0, 1], r".*bias": [3], None: [2]}
STEPS = 30
SEQUENCE = gradient_sequence(STEPS, SHAPES, seed=3)
X0 = initial_values(SHAPES, seed=4)


def _group_kwargs(pattern, base):
    """The constructor arguments of a separate optimizer with `pattern`'s values."""
    kwargs = dict(base)
    overrides = dict(GROUPS.get(pattern, {}))
    kwargs["learning_rate"] = base["learning_rate"] * overrides.pop(
        "learning_rate_multiplier", 1.0)
    kwargs.update(overrides)
    return kwargs


def _bound(kwargs):
    # Each variable's update is the separate optimizer's up to float32
    # rounding: lr * multiplier is formed in float32 here and in double
    # there (one ulp of lr, 6e-8 relative, inside UPDATE_REL_ERR), and the
    # rest is the same arithmetic. Steps move theta by at most ~lr each.
    return float32_drift_bound(STEPS, kwargs.get("learning_rate", 1e-2), 3.0)


# (id, method options shared by the grouped and the separate optimizers)
PATHS = [
    ("default-path", {}),  # TensorFlow's kernel, torch's multi-tensor kernel, JAX portable
    ("portable", dict(fused=False)),
    ("amsgrad-nesterov", dict(amsgrad=True, nesterov=True)),
    ("skip-nonfinite", dict(skip_nonfinite=True)),
    ("paper-epsilon", dict(epsilon_placement="paper")),
]


@pytest.mark.parametrize("options", [p[1] for p in PATHS], ids=[p[0] for p in PATHS])
def test_each_variable_moves_as_a_separate_optimizer_with_its_groups_values(options):
    base = dict(BASE, **options)
    grouped = keras_adam.Adam(groups=GROUPS, **base)
    got = run_optimizer(grouped, X0, SEQUENCE, names=NAMES)
    for pattern, members in MEMBERS.items():
        kwargs = _group_kwargs(pattern, base)
        alone = keras_adam.Adam(**kwargs)
        want = run_optimizer(alone, [X0[i] for i in members],
                             [[g[i] for i in members] for g in SEQUENCE],
                             names=[NAMES[i] for i in members])
        for i, variable in zip(members, want):
            np.testing.assert_allclose(got[i].numpy(), variable.numpy(), rtol=0,
                                       atol=_bound(kwargs), err_msg=NAMES[i])
    # One counter for all groups.
    assert int(keras.ops.convert_to_numpy(grouped.iterations)) == STEPS


def test_a_group_with_no_overrides_is_bit_identical_to_no_groups():
    plain = run_optimizer(keras_adam.Adam(**BASE), X0, SEQUENCE, names=NAMES)
    grouped = run_optimizer(keras_adam.Adam(groups={"head_.*": {}}, **BASE), X0, SEQUENCE,
                            names=NAMES)
    for a, b in zip(plain, grouped):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_a_schedule_is_scaled_by_the_multiplier():
    schedule = keras.optimizers.schedules.ExponentialDecay(1e-2, decay_steps=5, decay_rate=0.5)

    class Scaled(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            return 0.1 * schedule(step)

    grouped = keras_adam.Adam(learning_rate=schedule, groups={"backbone_.*": {
        "learning_rate_multiplier": 0.1}})
    got = run_optimizer(grouped, X0, SEQUENCE, names=NAMES)
    alone = run_optimizer(keras_adam.Adam(learning_rate=Scaled()), X0[:2],
                          [g[:2] for g in SEQUENCE], names=NAMES[:2])
    rest = run_optimizer(keras_adam.Adam(learning_rate=schedule), X0[2:],
                         [g[2:] for g in SEQUENCE], names=NAMES[2:])
    for g, w in zip(got, alone + rest):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=0, atol=_bound({}))


def test_exclusions_win_over_a_groups_weight_decay():
    optimizer = keras_adam.Adam(learning_rate=1e-2, groups={".*": {"weight_decay": 0.5}})
    optimizer.exclude_from_weight_decay(var_names=["head_kernel"])
    zeros = [[np.zeros(s, "float32") for s in SHAPES]] * 3
    variables = run_optimizer(optimizer, X0, zeros, names=NAMES)
    # Zero gradients: only the decay moves theta, by (1 - lr * wd) per step.
    for i, variable in enumerate(variables):
        factor = 1.0 if NAMES[i] == "head_kernel" else (1 - 1e-2 * 0.5) ** 3
        np.testing.assert_allclose(variable.numpy(), X0[i] * factor, rtol=1e-6)


def test_torch_adamw_with_param_groups():
    torch = pytest.importorskip("torch")
    base = dict(learning_rate=1e-2, weight_decay=0.05, epsilon=1e-7,
                epsilon_placement="paper")
    ours = run_optimizer(keras_adam.Adam(groups=GROUPS, **base), X0, SEQUENCE, names=NAMES)
    params = [torch.tensor(x, dtype=torch.float32, requires_grad=True) for x in X0]
    param_groups = []
    for pattern, members in MEMBERS.items():
        kwargs = _group_kwargs(pattern, base)
        param_groups.append(dict(
            params=[params[i] for i in members], lr=kwargs["learning_rate"],
            betas=(kwargs.get("beta_1", 0.9), kwargs.get("beta_2", 0.999)),
            eps=kwargs["epsilon"], weight_decay=kwargs["weight_decay"]))
    reference = torch.optim.AdamW(param_groups)
    for grads in SEQUENCE:
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g)
        reference.step()
    for i, (a, p) in enumerate(zip(ours, params)):
        # The same float32 drift bound: the two compute the same update in
        # float32, with operations in a different order.
        np.testing.assert_allclose(a.numpy(), p.detach().numpy(), rtol=0,
                                   atol=_bound(base), err_msg=NAMES[i])


def test_moment_dtype_per_group_stores_each_groups_moments_its_way():
    optimizer = keras_adam.Adam(
        moment_block_size=8, min_8bit_size=16,
        groups={"backbone_kernel": {"moment_dtype": "8bit"},
                "head_.*": {"moment_dtype": "bfloat16"}})
    variables = run_optimizer(optimizer, X0, SEQUENCE[:3], names=NAMES)
    dtypes = [keras.backend.standardize_dtype(optimizer.slots(v)[0].dtype) for v in variables]
    assert dtypes == ["int8", "float32", "bfloat16", "bfloat16"]
    # The 8-bit group's update is the 8-bit optimizer's (same codec, same
    # arithmetic: bit for bit), the float32 variable's the plain one's.
    alone = run_optimizer(keras_adam.Adam(moment_dtype="8bit", moment_block_size=8,
                                          min_8bit_size=16), X0[:1],
                          [g[:1] for g in SEQUENCE[:3]], names=NAMES[:1])
    np.testing.assert_array_equal(variables[0].numpy(), alone[0].numpy())
    plain = run_optimizer(keras_adam.Adam(), X0[1:2], [g[1:2] for g in SEQUENCE[:3]],
                          names=NAMES[1:2])
    np.testing.assert_array_equal(variables[1].numpy(), plain[0].numpy())


def test_the_plan_shows_each_variables_group():
    optimizer = keras_adam.Adam(groups=GROUPS)
    run_optimizer(optimizer, X0, SEQUENCE[:1], names=NAMES)
    plan = optimizer.update_plan()
    assert [route.group for route in plan.values()] == [
        "backbone_.*", "backbone_.*", "", ".*bias"]
    assert "group 'backbone_.*'" in str(plan)


# (groups, exception, regex naming what is wrong)
ERRORS = [
    ({"x": {"lr": 0.1}}, ValueError, r"groups\['x'\].*unknown key.*'lr'"),
    ({"(": {}}, ValueError, r"'\(' is not a valid regular expression"),
    ({"x": {"beta_1": 1.5}}, ValueError, r"groups\['x'\].*beta_1.*\[0, 1\)"),
    ({"x": {"learning_rate_multiplier": -1.0}}, ValueError,
     r"groups\['x'\].*learning_rate_multiplier"),
    ({"x": {"moment_dtype": "int4"}}, ValueError, r"groups\['x'\].*moment_dtype"),
    ({"x": 0.1}, TypeError, r"groups\['x'\].*dict"),
    ("x", TypeError, r"`groups` must be"),
]


@pytest.mark.parametrize("value,exc,pattern", ERRORS)
def test_bad_groups_name_the_pattern_and_key(value, exc, pattern):
    with pytest.raises(exc, match=pattern):
        keras_adam.Adam(groups=value)
    with pytest.raises(exc, match=pattern):  # the same check on a config
        keras_adam.Adam.from_config(dict(keras_adam.Adam().get_config(), groups=value))


def test_a_pattern_that_matches_nothing_warns_naming_it():
    optimizer = keras_adam.Adam(groups={"encoder/.*": {"weight_decay": 0.0}})
    with pytest.warns(UserWarning, match=r"'encoder/\.\*' matches no variable"):
        optimizer.build([keras.Variable(np.ones(3, "float32"), name="w")])


def test_patterns_match_the_whole_path():
    # "kernel" does not match "head_kernel": the pattern must match in full.
    optimizer = keras_adam.Adam(groups={"kernel": {"beta_1": 0.5}, "head_k.*": {}})
    with pytest.warns(UserWarning, match="'kernel' matches no variable"):
        optimizer.build([keras.Variable(np.ones(3, "float32"), name="head_kernel")])
    assert [r.group for r in optimizer.update_plan().values()] == ["head_k.*"]


def test_groups_are_in_the_config_and_fixed_after_build():
    optimizer = keras_adam.Adam(groups=[("a.*", {"beta_1": 0.5}), ("b", {})])
    config = optimizer.get_config()
    assert config["groups"] == {"a.*": {"beta_1": 0.5}, "b": {}}
    assert list(config["groups"]) == ["a.*", "b"]  # the order is kept
    assert keras_adam.Adam.from_config(config).get_config()["groups"] == config["groups"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer.build([keras.Variable(np.ones(3, "float32"), name="a1")])
    with pytest.raises(ValueError, match="`groups` cannot change once the optimizer is built"):
        optimizer.groups = {}


def test_loading_with_other_groups(tmp_path):
    def model(groups):
        m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="hidden"),
                              keras.layers.Dense(1, name="out")])
        eight_bit = dict(moment_block_size=8, min_8bit_size=16)
        m.compile(optimizer=keras_adam.Adam(groups=groups, **eight_bit), loss="mse")
        return m

    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    y = x[:, :1]
    first = model({".*hidden/kernel": {"moment_dtype": "8bit"}})
    first.fit(x, y, epochs=1, verbose=0)
    path = str(tmp_path / "m.weights.h5")
    first.save_weights(path)
    # Other multipliers and rates load: the state is stored the same way.
    other = model({".*hidden/kernel": {"moment_dtype": "8bit", "learning_rate_multiplier": 2.0}})
    other.optimizer.build(other.trainable_variables)
    other.load_weights(path)
    for a, b in zip(first.optimizer.variables, other.optimizer.variables):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a),
                                      keras.ops.convert_to_numpy(b))
    # Another moment_dtype is a clear error naming moment_dtype.
    changed = model({".*hidden/kernel": {"moment_dtype": "bfloat16"},
                     ".*out/kernel": {"moment_dtype": "8bit"}})
    changed.optimizer.build(changed.trainable_variables)
    with pytest.raises(ValueError, match="moment_dtype"):
        changed.load_weights(path)


def test_layerwise_decay_gives_each_layer_decay_to_its_depth():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="embed"),
                              keras.layers.Dense(4, name="block"),
                              keras.layers.Dense(1, name="head")])
    groups = keras_adam.layerwise_decay(model.layers, decay=0.5)
    multipliers = {}
    for variable in model.trainable_variables:
        for pattern, overrides in groups.items():
            if re.fullmatch(pattern, variable.path):
                # The path without the model's own name.
                multipliers[variable.path.split("/", 1)[1]] = overrides[
                    "learning_rate_multiplier"]
                break
    # The closed form: the last layer 1, each one below it half the one above.
    assert multipliers == {"embed/kernel": 0.25, "embed/bias": 0.25, "block/kernel": 0.5,
                           "block/bias": 0.5, "head/kernel": 1.0, "head/bias": 1.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every pattern matches a variable
        keras_adam.Adam(groups=groups).build(model.trainable_variables)
    with pytest.raises(ValueError, match="`decay` must be in"):
        keras_adam.layerwise_decay(model.layers, decay=1.5)


def test_lazy_sparse_rows_per_group():
    tf = pytest.importorskip("tensorflow")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("row-sparse gradients exist only on TensorFlow")
    rng = np.random.default_rng(5)
    tables = [rng.normal(size=(20, 4)).astype("float32") for _ in range(2)]
    steps = [[tf.IndexedSlices(tf.constant(rng.normal(size=(3, 4)).astype("float32")),
                               tf.constant(rng.integers(0, 20, size=3)), tf.constant([20, 4]))
              for _ in range(2)] for _ in range(10)]
    groups = {"user": {"learning_rate_multiplier": 0.5, "weight_decay": 0.2, "beta_1": 0.7}}
    grouped = keras_adam.LazyAdam(learning_rate=1e-2, weight_decay=0.1, groups=groups)
    got = [keras.Variable(t, name=n) for t, n in zip(tables, ["user", "item"])]
    grouped.build(got)
    for grads in steps:
        grouped.apply(grads, got)
    assert [r.sparse for r in grouped.update_plan().values()] == ["lazy", "lazy"]
    for i, kwargs in enumerate([dict(learning_rate=5e-3, weight_decay=0.2, beta_1=0.7),
                                dict(learning_rate=1e-2, weight_decay=0.1)]):
        alone = keras_adam.LazyAdam(**kwargs)
        want = keras.Variable(tables[i])
        alone.build([want])
        for grads in steps:
            alone.apply([grads[i]], [want])
        # Rows never in a gradient are bit for bit the start's in both; the
        # rest agree within the float32 drift bound (see _bound).
        np.testing.assert_allclose(got[i].numpy(), want.numpy(), rtol=0, atol=_bound(kwargs))
        untouched = sorted(set(range(20)) - {int(j) for g in steps for j in g[i].indices})
        np.testing.assert_array_equal(got[i].numpy()[untouched], tables[i][untouched])


@pytest.mark.slow
def test_a_zero_multiplier_freezes_its_group_under_jit_compile():
    # model.fit with jit_compile=True: XLA on TensorFlow and JAX, torch.compile
    # on torch. lr * 0 = 0 and no decay: the first layer must not move at all,
    # while the loss falls through the second.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 3)).astype("float32")
    y = (x @ np.array([[2.0], [-1.0], [3.0]])).astype("float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(8, name="first"),
                              keras.layers.Dense(1, name="second")])
    frozen = [w.numpy().copy() for w in model.layers[0].weights]
    optimizer = keras_adam.Adam(learning_rate=1e-2, weight_decay=0.01,
                                groups={".*first/.*": {"learning_rate_multiplier": 0.0}})
    model.compile(optimizer=optimizer, loss="mse", jit_compile=True)
    history = model.fit(x, y, epochs=4, batch_size=32, verbose=0)
    for before, after in zip(frozen, model.layers[0].weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(after), before)
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_the_torch_kernel_runs_once_per_distinct_set_of_values(monkeypatch):
    torch = pytest.importorskip("torch")
    if keras.backend.backend() != "torch":
        pytest.skip("the multi-tensor kernel is torch's")
    calls = []
    kernel = torch._fused_adam_

    def counting(params, *args, **kwargs):
        calls.append(len(params))
        return kernel(params, *args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adam_", counting)
    # Three sets of rule values and lr (weight_decay alone does not change
    # the kernel's arguments: the decay runs before it).
    optimizer = keras_adam.Adam(groups={"backbone_.*": {"learning_rate_multiplier": 0.1},
                                        "head_bias": {"beta_2": 0.99},
                                        "head_kernel": {"weight_decay": 0.0}})
    run_optimizer(optimizer, X0, SEQUENCE[:2], names=NAMES)
    assert {r.method for r in optimizer.update_plan().values()} == {"torch-multi-tensor"}
    assert sorted(calls) == sorted([2, 1, 1] * 2)
