"""`Adam.update_plan()`: which path each variable takes and why, and that it is the path that runs.

The plan is decided at `build`. These tests check what it says for each
backend and option, and that it agrees with what actually executes: the
fused kernel ops in TensorFlow's graph, the calls of torch's multi-tensor
kernel.
"""

import keras
import numpy as np
import pytest

import keras_adam

BACKEND = keras.backend.backend()
FAST = {"tensorflow": "tensorflow-fused", "torch": "torch-multi-tensor", "jax": None}[BACKEND]


def _built(variables, **kwargs):
    optimizer = keras_adam.Adam(**kwargs)
    optimizer.build(variables)
    return optimizer


def _variables(*dtypes):
    return [keras.Variable(np.ones((3, 2)), dtype=d, name=f"w{i}") for i, d in enumerate(dtypes)]


def test_plan_names_every_variable_with_a_path_and_a_reason():
    variables = _variables("float32", "float32")
    plan = _built(variables).update_plan()
    assert list(plan) == [v.path for v in variables]
    for route in plan.values():
        assert route.method == (FAST or "portable")
        assert route.reason
    text = str(plan)
    assert all(v.path in text for v in variables)


@pytest.mark.parametrize(
    "kwargs,dtypes,reason",
    [
        (dict(fused=False), ("float32",), "fused=False"),
        (dict(epsilon=0.0), ("float32",), "epsilon=0"),
        ({}, ("bfloat16",), "exact only for .*bfloat16"),
        (dict(moment_dtype="bfloat16"), ("float32",), "moment_dtype='bfloat16'"),
    ],
    ids=["fused-false", "epsilon-zero", "bfloat16-variable", "bfloat16-moments"],
)
def test_portable_routes_say_why(kwargs, dtypes, reason):
    route = next(iter(_built(_variables(*dtypes), **kwargs).update_plan().values()))
    assert route.method == "portable"
    # On JAX no variable has a fast path, whatever the options: the reason
    # names the backend, except where the options already rule it out.
    if BACKEND == "jax" and reason not in ("fused=False", "epsilon=0"):
        reason = "backend is 'jax'"
    assert __import__("re").search(reason, route.reason), route.reason


def test_mixed_dtypes_get_a_route_each():
    plan = _built(_variables("float32", "bfloat16")).update_plan()
    paths = [route.method for route in plan.values()]
    assert paths == [FAST or "portable", "portable"]


def test_nesterov_has_no_fast_path_with_bias_correction():
    route = next(iter(_built(_variables("float32"), nesterov=True).update_plan().values()))
    assert route.method == "portable"
    if BACKEND == "tensorflow":
        assert "1 - beta_1^(t+1)" in route.reason
    if BACKEND == "torch":
        assert "Nesterov" in route.reason


def test_sparse_field_says_what_row_sparse_gradients_get():
    for mode in ("exact", "lazy"):
        optimizer = _built(_variables("float32"), sparse_updates=mode)
        route = next(iter(optimizer.update_plan().values()))
        # Only TensorFlow makes row-sparse gradients.
        assert route.sparse == (mode if BACKEND == "tensorflow" else "none")


def test_plan_and_slots_before_build_say_to_build_first():
    optimizer = keras_adam.Adam()
    with pytest.raises(ValueError, match=r"update_plan\(\) needs a built optimizer.*build"):
        optimizer.update_plan()
    with pytest.raises(ValueError, match=r"slots\(\) needs a built optimizer.*build"):
        optimizer.slots(keras.Variable(np.ones(2)))


def test_overwritten_variables_are_planned_as_such():
    variable = keras.Variable(np.ones(2), name="counter")
    variable.overwrite_with_gradient = True
    plan = _built([variable, *_variables("float32")]).update_plan()
    assert plan[variable.path].method == "overwritten"


def _kernel_runs(optimizer, variables, grads, monkeypatch):
    """How many variables the backend's fast kernel updated in one apply."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        @tf.function
        def step():
            optimizer.apply(grads, variables)

        ops = step.get_concrete_function().graph.get_operations()
        return sum(op.type.startswith("ResourceApplyAdam") for op in ops)
    if BACKEND == "torch":
        import torch

        counted = []
        real = torch._fused_adam_
        monkeypatch.setattr(torch, "_fused_adam_",
                            lambda params, *a, **k: (counted.append(len(params)),
                                                     real(params, *a, **k)))
        optimizer.apply(grads, variables)
        return sum(counted)
    optimizer.apply(grads, variables)
    return 0


@pytest.mark.parametrize("kwargs", [{}, dict(amsgrad=True), dict(fused=False),
                                    dict(moment_dtype="bfloat16"), dict(nesterov=True)],
                         ids=["defaults", "amsgrad", "fused-false", "bfloat16-moments", "nesterov"])
def test_the_plan_is_what_runs(kwargs, monkeypatch):
    variables = _variables("float32", "float32", "bfloat16")
    optimizer = _built(variables, **kwargs)
    planned_fast = sum(r.method == FAST for r in optimizer.update_plan().values())
    grads = [keras.ops.ones(v.shape, dtype=v.dtype) for v in variables]
    assert _kernel_runs(optimizer, variables, grads, monkeypatch) == planned_fast
    if FAST is not None and kwargs in ({}, dict(amsgrad=True)):
        assert planned_fast == 2  # the two float32 variables
