"""Row-sparse gradients (tf.IndexedSlices): exact mode = dense update; lazy = touched rows only.

Lazy tests start from a table whose m and v are non-zero in every row (a few
dense warm-up steps), so that lazy and dense updates genuinely differ, and
every sparse step repeats some indices.
"""

import keras
import numpy as np
import pytest
from grid import UNIT_ROUNDOFF, float32_drift_bound

import keras_adam
from keras_adam import reference

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="IndexedSlices exist only on TensorFlow"
)
tf = pytest.importorskip("tensorflow")

ROWS, DIM, WARM, SPARSE_STEPS, LR = 40, 3, 3, 6, 1e-2
# 1 - float32(0.999) is 1.3e-5 relative away from 0.001: the error of v after
# a step of TensorFlow's fused kernel (keras_adam/backends/tensorflow.py).
KERNEL_V_REL = 1.3e-5


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(ROWS, DIM)).astype("float32")
    warm = [rng.normal(size=(ROWS, DIM)).astype("float32") for _ in range(WARM)]
    sparse = []
    for _ in range(SPARSE_STEPS):
        rows = rng.choice(ROWS, size=8, replace=False)
        # Two rows appear twice: pairs of duplicates, summed exactly (a + b is
        # the same in any order), so exact mode can be compared bit for bit.
        indices = np.concatenate([rows, rows[:2]]).astype("int32")
        values = rng.normal(size=(indices.size, DIM)).astype("float32")
        sparse.append((indices, values))
    return table, warm, sparse


def _slices(indices, values):
    return tf.IndexedSlices(tf.constant(values), tf.constant(indices), tf.constant([ROWS, DIM]))


def _dense_of(indices, values):
    g = np.zeros((ROWS, DIM), "float64")
    np.add.at(g, indices, values)
    return g


def _state(optimizer, variable):
    return [variable.numpy().copy()] + [s.numpy().copy() for s in optimizer.slots(variable)
                                        if s is not None]


def _run(optimizer, table, warm, sparse, as_dense=False, mode="eager", on_step=None):
    variable = keras.Variable(table)
    optimizer.build([variable])

    def step(grad):
        optimizer.apply([grad], [variable])

    if mode == "graph":
        step = tf.function(step)
    for g in warm:
        step(tf.constant(g))
    for indices, values in sparse:
        before = _state(optimizer, variable)
        grad = _slices(indices, values)
        step(tf.convert_to_tensor(grad) if as_dense else grad)
        if on_step:
            on_step(indices, before, _state(optimizer, variable))
    return variable


EXACT_OPTIONS = [
    ("defaults", {}), ("portable", dict(fused=False)), ("amsgrad", dict(amsgrad=True)),
    ("weight-decay", dict(weight_decay=0.1)), ("clipnorm", dict(clipnorm=0.5)),
    ("clipvalue", dict(clipvalue=0.3)),
]


@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("kwargs", [o[1] for o in EXACT_OPTIONS], ids=[o[0] for o in EXACT_OPTIONS])
def test_exact_mode_equals_the_dense_update(kwargs, mode):
    table, warm, sparse = _problem()
    ours = keras_adam.Adam(learning_rate=LR, **kwargs)
    dense = keras_adam.Adam(learning_rate=LR, **kwargs)
    a = _run(ours, table, warm, sparse, mode=mode)
    b = _run(dense, table, warm, sparse, as_dense=True, mode=mode)
    # Duplicates are summed into the same float32 numbers either way and the
    # same dense update follows: identical, clipping included.
    for x, y in zip(_state(ours, a), _state(dense, b)):
        np.testing.assert_array_equal(x, y)


LAZY_OPTIONS = [
    ("defaults", {}),
    ("amsgrad", dict(amsgrad=True)),
    ("weight-decay", dict(weight_decay=0.2)),
    ("nesterov-paper", dict(nesterov=True, epsilon_placement="paper")),
    ("uncorrected", dict(bias_correction=False)),
    ("clipnorm", dict(clipnorm=0.5)),
]


def _clip(g, kwargs):
    """Keras clips the (deduplicated) gradient by its norm before the step."""
    if "clipnorm" in kwargs:
        norm = np.sqrt(np.sum(g**2))
        g = g * kwargs["clipnorm"] / max(norm, kwargs["clipnorm"])
    return g


@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("kwargs", [o[1] for o in LAZY_OPTIONS], ids=[o[0] for o in LAZY_OPTIONS])
def test_lazy_mode_matches_the_reference_row_by_row(kwargs, mode):
    table, warm, sparse = _problem()
    optimizer = keras_adam.Adam(learning_rate=LR, sparse_updates="lazy", **kwargs)
    ref_options = {k: v for k, v in kwargs.items() if k != "clipnorm"}

    # The float64 reference: dense warm-up steps for every row, then for each
    # sparse step only the touched rows advance, each with the global t.
    theta = table.astype("float64")
    state = reference.init_state(theta)
    for t, g in enumerate(warm):
        theta, state = reference.step(theta, _clip(g, kwargs), state, learning_rate=LR,
                                      **ref_options)
    for t, (indices, values) in enumerate(sparse, start=WARM):
        rows = np.unique(indices)
        g = _clip(_dense_of(indices, values), kwargs)[rows]
        rows_state = reference.State(t=t, m=state.m[rows], v=state.v[rows],
                                     v_max=state.v_max[rows])
        theta_rows, rows_state = reference.step(theta[rows], g, rows_state, learning_rate=LR,
                                                **ref_options)
        theta[rows], state.m[rows], state.v[rows] = theta_rows, rows_state.m, rows_state.v
        state.v_max[rows] = rows_state.v_max

    def untouched_rows_unchanged(indices, before, after):
        untouched = np.setdiff1d(np.arange(ROWS), indices)
        for b, a in zip(before, after):
            np.testing.assert_array_equal(a[untouched], b[untouched])

    variable = _run(optimizer, table, warm, sparse, mode=mode,
                    on_step=untouched_rows_unchanged if mode == "eager" else None)
    steps = WARM + SPARSE_STEPS
    # Float32 against float64 over 9 steps of at most ~4 lr each (tests/grid.py).
    atol = float32_drift_bound(steps, 4 * LR, np.abs(theta).max())
    np.testing.assert_allclose(variable.numpy(), theta, rtol=0, atol=atol)
    m, v, v_max = optimizer.slots(variable)
    # The WARM dense steps take TensorFlow's fused kernel, which forms
    # 1 - beta_2 from float32(beta_2): v is 1.3e-5 relative off from them on
    # (keras_adam/backends/tensorflow.py); then ~2u relative per step for v's
    # multiply and add, as in tests/grid.py.
    v_rtol = KERNEL_V_REL + 2 * steps * UNIT_ROUNDOFF
    np.testing.assert_allclose(v.numpy(), state.v, rtol=v_rtol)
    if kwargs.get("amsgrad"):
        np.testing.assert_allclose(v_max.numpy(), state.v_max, rtol=v_rtol)
    else:
        assert v_max is None
    # m mixes signs, so its error is relative to the largest gradient: 2u per
    # step, plus the kernel's float32(beta_1) (1 - beta_1 off by 2.4e-7).
    g_max = max(np.abs(g).max() for g in warm + [v for _, v in sparse])
    m_atol = (2 * steps * UNIT_ROUNDOFF + 2.4e-7) * g_max
    np.testing.assert_allclose(m.numpy(), state.m, rtol=0, atol=m_atol)


def test_lazy_and_exact_really_differ():
    # Guards the tests above: from non-zero moments, rows absent from the
    # gradient move under exact mode (momentum) but not under lazy mode.
    table, warm, sparse = _problem()
    exact = _run(keras_adam.Adam(learning_rate=LR), table, warm, sparse)
    lazy = _run(keras_adam.Adam(learning_rate=LR, sparse_updates="lazy"), table, warm, sparse)
    never = np.setdiff1d(np.arange(ROWS), np.concatenate([i for i, _ in sparse]))
    assert never.size > 0
    assert np.all(np.abs(exact.numpy()[never] - lazy.numpy()[never]) > 1e-4)


def test_lazy_mode_with_dense_gradients_is_standard_adam():
    table, warm, _ = _problem()
    a = _run(keras_adam.Adam(sparse_updates="lazy"), table, warm, [])
    b = _run(keras_adam.Adam(), table, warm, [])
    np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("cls,kwargs", [(keras_adam.LazyAdam, {}), (keras_adam.Adam, {}),
                                        (keras_adam.Adam, dict(sparse_updates="lazy"))],
                         ids=["LazyAdam", "exact", "lazy"])
def test_fit_with_an_embedding_layer(cls, kwargs):
    rng = np.random.default_rng(0)
    users, items = 200, 500
    u = rng.integers(0, users // 2, size=2048)  # users 100..199 never appear
    i = rng.integers(0, items, size=2048)
    y = ((u % 7) / 7.0 + (i % 5) / 5.0).astype("float32")

    user_in, item_in = keras.Input((), dtype="int32"), keras.Input((), dtype="int32")
    user_emb = keras.layers.Embedding(users, 8)
    item_emb = keras.layers.Embedding(items, 8)
    score = keras.layers.Dot(axes=1)([user_emb(user_in), item_emb(item_in)])
    out = keras.layers.Dense(1)(keras.layers.Concatenate()([score, user_emb(user_in)]))
    model = keras.Model([user_in, item_in], out)
    model.compile(optimizer=cls(learning_rate=1e-2, **kwargs), loss="mse")
    initial = user_emb.embeddings.numpy().copy()
    history = model.fit([u, i], y, batch_size=64, epochs=5, verbose=0)
    # The targets have variance ~0.2; the model fits them far below that.
    assert history.history["loss"][-1] < 0.5 * history.history["loss"][0]
    # Rows that never appear keep their initial values in both modes: lazily
    # by construction, exactly because their m stays 0. (Rows seen earlier do
    # differ between modes: test_lazy_and_exact_really_differ.)
    np.testing.assert_array_equal(user_emb.embeddings.numpy()[users // 2:], initial[users // 2:])
    assert not np.array_equal(user_emb.embeddings.numpy()[:users // 2], initial[:users // 2])


@pytest.mark.parametrize("mode", ["exact", "lazy"])
@pytest.mark.parametrize("index_dtype,shape_dtype", [("int32", "int32"), ("int64", "int64"),
                                                      ("int64", "int32"), ("int32", "int64")])
def test_index_and_shape_dtypes(index_dtype, shape_dtype, mode):
    # Issue #14: int64 indices with an int32 dense_shape (what an Embedding fed
    # by an int64 Input gives) crashed the exact mode's densify. Every
    # combination must give what int32/int32 gives, bit for bit (the same
    # numbers through the same ops; only index types differ).
    table, warm, sparse = _problem()
    results = []
    for dtypes in [("int32", "int32"), (index_dtype, shape_dtype)]:
        variable = keras.Variable(table)
        optimizer = keras_adam.Adam(learning_rate=LR, sparse_updates=mode)
        for g in warm:
            optimizer.apply([tf.constant(g)], [variable])
        for indices, values in sparse:
            grad = tf.IndexedSlices(tf.constant(values), tf.constant(indices, dtypes[0]),
                                    tf.constant([ROWS, DIM], dtypes[1]))
            optimizer.apply([grad], [variable])
        results.append(_state(optimizer, variable))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", ["exact", "lazy"])
def test_fit_with_int64_ids(mode):
    # Issue #14: model.fit with an int64 Input feeding an Embedding.
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, size=(256, 1)).astype("int64")
    y = (ids[:, 0] % 5 / 5.0).astype("float32")
    inputs = keras.Input((1,), dtype="int64")
    out = keras.layers.Dense(1)(keras.layers.Flatten()(keras.layers.Embedding(50, 4)(inputs)))
    model = keras.Model(inputs, out)
    model.compile(optimizer=keras_adam.Adam(learning_rate=1e-2, sparse_updates=mode), loss="mse")
    history = model.fit(ids, y, batch_size=32, epochs=3, verbose=0)
    # The targets (0 to 0.8) have variance 0.08; 24 steps of lr 1e-2 lower the loss.
    assert np.isfinite(history.history["loss"]).all()
    assert history.history["loss"][-1] < history.history["loss"][0]
