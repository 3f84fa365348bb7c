"""Row-sparse gradients (tf.IndexedSlices): deduplication, and the exact and lazy modes.

`keras.layers.Embedding` on TensorFlow gives a gradient holding only the rows
in the batch, possibly with repeated indices. Every part of how keras_adam
treats one lives here; `keras_adam.optimizer.Adam` keeps only the hooks:

    Adam.apply                -> deduplicate_all: sum repeated rows (before
                                 Keras clips, so clipping sees the dense
                                 gradient's numbers)
    Adam._backend_update_step -> the gradients say which variables a lazy
                                 update takes this step
    Adam.update_step          -> densify ("exact": the whole variable decays,
                                 then steps), or rows_and_values ("lazy": the
                                 rule on those rows, read and written by
                                 `keras_adam._state.Storage` with `rows`; only
                                 those rows decay)

"exact": the update of the dense equivalent gradient. "lazy": for the rows r
present, with the global step t,

    theta_r <- theta_r - lr * weight_decay * theta_r     (if weight decay applies)
    m_r, v_r, v_max_r, theta_r: `keras_adam._rule.rule` on row r

and every other row of theta, m, v and v_max stays bit for bit (their moments
do not decay: that is what makes the update lazy).
"""

from keras import ops

from keras_adam import backends

SPARSE_UPDATES = ("exact", "lazy")


def is_sparse(gradient):
    """True for a row-sparse gradient (tf.IndexedSlices; only TensorFlow makes them)."""
    # dense_shape first: a torch tensor has an `indices` method (asked per
    # variable and step, several times).
    return hasattr(gradient, "dense_shape") and hasattr(gradient, "indices")


def deduplicate(gradient):
    """The same gradient with each row index once, the values of repeated indices summed."""
    rows, position = backends.unique_rows(gradient.indices)
    values = ops.segment_sum(gradient.values, position, num_segments=ops.shape(rows)[0])
    return backends.row_slices(values, rows, gradient.dense_shape)


def densify(gradient):
    """A dense tensor for `gradient`, which may be row-sparse.

    Duplicate indices are summed *before* g^2 is taken, so the update equals
    that of the dense gradient. (keras.optimizers.Adam squares each duplicate
    slice and then sums, which differs from its own dense update.)
    `ops.convert_to_tensor` leaves IndexedSlices as they are, hence the scatter.
    """
    if not is_sparse(gradient):
        return gradient
    indices = ops.expand_dims(gradient.indices, -1)
    # The scatter needs the shape in the indices' dtype. They differ in real
    # gradients: an Embedding fed by keras.Input(dtype="int64") gives int64
    # indices with an int32 dense_shape.
    shape = ops.cast(gradient.dense_shape, indices.dtype)
    return ops.scatter(indices, gradient.values, shape)


def deduplicate_all(grads):
    """`grads` with every row-sparse gradient deduplicated (dense ones as they are)."""
    if not any(is_sparse(g) for g in grads):
        return grads
    return [deduplicate(g) if is_sparse(g) else g for g in grads]


def rows_and_values(gradient):
    """(rows, values) of a row-sparse gradient, each row once: the lazy update's input.

    Deduplicated again although `Adam.apply` already did: an all-reduce
    across tf.distribute replicas may concatenate their rows.
    """
    gradient = deduplicate(gradient)
    return gradient.indices, gradient.values
