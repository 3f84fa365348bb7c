"""Where Adam's state lives across devices: `shard_state=True` (ZeRO stage 1) on JAX.

Under `keras.distribution.DataParallel` every device holds a whole copy of
each variable and, by default, of its slots m, v, v_max: with N devices the
state costs N times what it needs to. With `shard_state=True`, each slot
gets its variable's layout with the data-parallel mesh axis (the
distribution's `batch_dim_name`; for `ModelParallel`, the data axis of its
mesh) added on one dimension, so each of the N data-parallel devices keeps
1/N of m, v and v_max (Rajbhandari et al., 2020, ZeRO stage 1).

Nothing else changes: Keras's JAX trainer keeps every optimizer variable in
the sharding it was created with, and XLA's SPMD partitioner computes each
device's 1/N of m, v and the step from the replicated, all-reduced gradient,
then all-gathers the step into the replicated variable. The rule is
element-wise, so each element gets the same arithmetic as without sharding.

The dimension: the largest one that is not sharded already and whose size
N divides (the first of equal ones). A slot keeps its variable's layout when
  - it has fewer than `MIN_ELEMENTS` elements: sharding would save under
    3 * MIN_ELEMENTS * 4 bytes (48 KiB of float32 m, v, v_max) per device,
    and each sharded variable adds an all-gather per step, whose fixed cost
    dominates for small tensors;
  - no free dimension is divisible by N (the update would need padding);
  - the variable's layout already uses the data axis;
  - there is one data-parallel device, or no distribution is set (one device:
    nothing to share), or the backend is not JAX (see `backend_reason`).
"""

import math

import keras

# Below this many elements a variable's slots stay replicated (module docstring).
MIN_ELEMENTS = 4096

REPLICATED = "as its variable"


class Placement:
    """The layout of each slot: its variable's, or that with the data axis added.

    Args:
        shard: `shard_state`: whether to shard the slots at all.
    """

    def __init__(self, shard):
        self.shard = shard
        self._distribution = keras.distribution.distribution() if shard else None

    def layout(self, variable):
        """The layout for `variable`'s slots (`None`: the backend's default placement)."""
        sharded, _ = self._plan(variable)
        return sharded if sharded is not None else getattr(variable, "_layout", None)

    def replicated(self, shape):
        """A layout keeping a tensor of `shape` whole on every device, or None
        (the backend's default) when no distribution is set.

        Explicit, because a `LayoutMap` matches variables by path: a small
        companion tensor (an 8-bit block's scales) must not inherit the
        layout meant for the variable it belongs to.
        """
        distribution = keras.distribution.distribution() if backend_reason() is None else None
        if distribution is None:
            return None
        return keras.distribution.TensorLayout([None] * len(shape), distribution.device_mesh)

    def describe(self, variable):
        """Where `variable`'s slots live, in words ("" without `shard_state`)."""
        if not self.shard:
            return ""
        _, words = self._plan(variable)
        return words

    def _plan(self, variable):
        """(the sharded layout, or None to keep the variable's; why, in words)."""
        reason = backend_reason()
        if reason is None and self._distribution is None:
            reason = "no keras.distribution is set"
        if reason is not None:
            return None, f"state {REPLICATED}: {reason}"
        mesh = self._distribution.device_mesh
        data_axis = self._distribution.batch_dim_name
        n = mesh.shape[mesh.axis_names.index(data_axis)]
        own = getattr(variable, "_layout", None)
        spec = list(own.axes) if own is not None else [None] * len(variable.shape)
        shape = tuple(variable.shape)
        if n == 1:
            return None, f"state {REPLICATED}: one device on the data axis {data_axis!r}"
        if data_axis in spec:
            return None, f"state {REPLICATED}: its layout already uses the data axis {data_axis!r}"
        if math.prod(shape) < MIN_ELEMENTS:
            return None, (f"state {REPLICATED}: fewer than {MIN_ELEMENTS} elements "
                          "(the saving is smaller than an all-gather's cost)")
        free = [d for d in range(len(shape)) if spec[d] is None and shape[d] % n == 0]
        if not free:
            return None, (f"state {REPLICATED}: no unsharded dimension of {shape} "
                          f"is divisible by {n}")
        axis = max(free, key=lambda d: (shape[d], -d))
        spec[axis] = data_axis
        return (keras.distribution.TensorLayout(spec, mesh),
                f"state sharded {n} ways over {data_axis!r} along dimension {axis}")


def backend_reason():
    """Why slots cannot be sharded on this backend, or None (JAX).

    TensorFlow's tf.distribute strategies mirror each variable, slots
    included, on every replica, and the torch backend has no Keras
    distribution: neither offers a placement for a slot that differs from
    its variable's, and a home-made one would re-implement the strategy.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        return None
    return (f"the {backend} backend mirrors optimizer state on every replica "
            "(shard_state applies on JAX only)")
