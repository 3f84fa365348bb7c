"""Fast paths per Keras backend, chosen once, and the row primitives of sparse updates.

Requirement: this package imports a framework (tensorflow, torch, jax) only
inside that framework's own module here, and only when
`keras.backend.backend()` names it. Importing `keras_adam` must never pull in
a framework that the active Keras backend does not use.

A fast path computes exactly the rule of `keras_adam._rule.rule` (the
portable path) and is tested equal to it. It receives data, never the
optimizer: the rule's `Hyper`, the step's `Step` (t, lr, scalars), and
(gradient, variable, slots) triples, slots being the variable's (m, v, v_max)
Keras variables. Each backend module defines one class with this interface:

    name            the path's name in the optimizer's plan
    exact_because   why it computes the rule exactly (shown in the plan)
    per_variable    True: called from `update_step` for one variable (so that
                    tf.distribute's per-variable update holds); False: called
                    once per step with all of its variables (multi-tensor)
    option_reason(hyper)                 classmethod: why not for these options
    portable_when(hyper)                 when the portable rule runs in its place
                                         (a compile context), in words ("" if never)
    portable_now(hyper)                  why the portable rule runs in its place in
                                         the current compile context, or None
    apply(items, hyper, step)            updates the (gradient, variable, slots)
                                         triples; returns those it did not
    decay(variables, weight_decay, step) multi-tensor paths only: `decay` below,
                                         with the step's lr, on variables the
                                         path updates

Both kernels update a variable's slots in place and are exact for the same
dtypes, so which variables they may take is decided here (`variable_reason`).
`apply_together` runs a multi-tensor path once per group of values, and
`decay` applies decoupled weight decay as Keras computes it on the backend.
The backend modules import nothing from this package.
"""

import keras
from keras import ops

# The C loop's options (framework-free, `rows.py`).
from keras_adam.backends.rows import Step as LoopStep

# Both fused kernels (TensorFlow's and torch's) are exact for these dtypes only:
# TensorFlow's takes beta_2 in the variable's dtype, and bfloat16 rounds 0.999
# to 1 (v would stay 0).
FUSED_DTYPES = ("float32", "float64")


def fast_path(hyper, fused):
    """(fast path instance, None), or (None, reason) where none applies.

    Raises:
        ValueError: if `fused` is True and no fast path computes this rule.
    """
    reason = _option_reason(hyper, fused)
    if reason is not None:
        if fused:
            raise ValueError(
                f"`fused=True` is not possible: {reason}. "
                "Use fused=None to choose automatically, or fused=False."
            )
        return None, reason
    return _fast_path_class()(), None


def apply_together(fast, items, methods, settings):
    """Runs a multi-tensor fast path over every variable planned for it: first
    their decoupled decay (one call, each distinct (rate, lr) its factor), then
    the kernel, once per distinct (Hyper, Step), that is once per group of values.

    Args:
        fast: the fast path (`per_variable` False).
        items: (gradient, variable, slots) per variable of this step.
        methods: each variable's method this step (`keras_adam._plan.methods_now`).
        settings: each variable's (rule's `Hyper`, `Step`, decay rate or None).

    Returns:
        The (gradient, variable) pairs left for the per-variable update:
        other methods', and any the fast path gave back.
    """
    rest, together, decays = [], {}, {}
    for item, method, (hyper, step, rate) in zip(items, methods, settings):
        if method != fast.name:
            rest.append(item)
            continue
        together.setdefault((hyper, id(step)), (hyper, step, []))[2].append(item)
        if rate:  # a rate of 0 (a group's "no decay") multiplies by 1: skipped
            decays.setdefault((rate, id(step)), (rate, step, []))[2].append(item[1])
    fast.decay(list(decays.values()))
    for hyper, step, mine in together.values():
        rest += list(fast.apply(mine, hyper, step))
    return [(g, v) for g, v, _ in rest]


def decay(variables, weight_decay, lr):
    """Decoupled weight decay, theta <- theta - lr * weight_decay * theta, computed as
    Keras's optimizer computes it on this backend (so that a group's decay is
    bit for bit a separate optimizer's)."""
    if keras.backend.backend() == "torch":
        from keras_adam.backends import torch

        return torch.decay(variables, weight_decay, lr)
    for variable in variables:
        lr_, wd = ops.cast(lr, variable.dtype), ops.cast(weight_decay, variable.dtype)
        variable.assign(variable - variable * wd * lr_)


def _fast_path_class():
    backend = keras.backend.backend()
    if backend == "tensorflow":
        from keras_adam.backends import tensorflow

        return tensorflow.Fused
    if backend == "torch":
        from keras_adam.backends import torch

        return torch.MultiTensor
    return None


def _option_reason(hyper, fused):
    if fused is False:
        return "fused=False"
    if hyper.epsilon == 0:
        return "with epsilon=0 the kernels return NaN where v = 0; the portable path steps 0 there"
    cls = _fast_path_class()
    if cls is None:
        return (
            "fused kernels exist for TensorFlow (ResourceApplyAdam) and torch "
            f"(torch._fused_adam_), but the Keras backend is {keras.backend.backend()!r}"
            + ("; XLA fuses the portable ops" if keras.backend.backend() == "jax" else "")
        )
    return cls.option_reason(hyper)


def variable_reason(variable, storage):
    """Why a fused kernel cannot update `variable` (its dtype, its moments' storage), or None."""
    dtype = keras.backend.standardize_dtype(variable.dtype)
    if dtype not in FUSED_DTYPES:
        return f"the fused kernels are exact only for {FUSED_DTYPES}; the variable is {dtype}"
    return storage.in_place_reason(variable)


def step_numbers(hyper, step, dtype):
    """The fields of `_rule.step_scalars` of `step` (a `keras_adam._per_step.Step`)
    in `dtype` as numbers (NumPy float32; None for a field that is None),
    bit for bit, where the backend computes them from the step's numbers
    (torch, eager, on a CPU, float32: `torch.step_numbers`); None elsewhere."""
    if keras.backend.backend() != "torch":
        return None
    from keras_adam.backends import torch

    return torch.step_numbers(hyper, step, dtype)


def step_scalars(hyper, step, dtype):
    """`_rule.step_scalars` of `step` in `dtype`, bit for bit, made from
    `step_numbers` where there are some (`torch.step_scalars`); None elsewhere."""
    if keras.backend.backend() != "torch":
        return None
    from keras_adam.backends import torch

    return torch.step_scalars(hyper, step, dtype)


def step_number(step):
    """`step.iterations + 1` (a `keras_adam._per_step.Step`'s t) as a Python int,
    where the backend reads the counter as a number (torch, eager, on a CPU,
    where Keras's `iterations + 1` does not wrap around: `torch.step_number`);
    None elsewhere."""
    if keras.backend.backend() != "torch":
        return None
    from keras_adam.backends import torch

    return torch.step_number(step)


def step_count(step):
    """`step.iterations + 1` (a `keras_adam._per_step.Step`'s t) as Keras makes it,
    where the backend makes the same tensor faster from the counter read as a
    number (torch, eager, on a CPU: `torch.step_count`); None elsewhere."""
    if keras.backend.backend() != "torch":
        return None
    from keras_adam.backends import torch

    return torch.step_count(step)


def makes_sparse_gradients():
    """Whether this backend gives row-sparse gradients (tf.IndexedSlices) at all."""
    return keras.backend.backend() == "tensorflow"


def trace_key():
    """An identity for the graph being built, or None outside graph building.

    On TensorFlow, tf.function and each tf.cond branch build a separate graph;
    a tensor from one must not be used in another.
    """
    if keras.backend.backend() != "tensorflow":
        return None
    from keras_adam.backends import tensorflow

    return tensorflow.trace_key()


def opaque(fn, name):
    """`fn`, an element-wise function of integer tensors (broadcast together) with an
    int32 result, as one opaque operation for torch.compile: Inductor then calls
    it as a kernel of its own and reads its result once, where it would
    otherwise inline the whole expression into every consumer (see
    `keras_adam._rounding.stream_key`). `fn` itself elsewhere.

    `name` names the registered torch operation (`keras_adam::name`).
    """
    if keras.backend.backend() != "torch":
        return fn
    from keras_adam.backends import torch

    return torch.opaque(fn, name)


def compiled(fn):
    """`fn` compiled by XLA as one cluster, fused into a few passes over memory,
    where the backend would otherwise run one pass per op (TensorFlow, even
    inside a tf.function without XLA); `fn` elsewhere (JAX's jit and
    torch.compile fuse it with the rest of the step themselves).

    For whole tensors of fixed shapes only: each new shape compiles again.
    """
    if keras.backend.backend() != "tensorflow":
        return fn
    from keras_adam.backends import tensorflow

    return tensorflow.compiled(fn)


def whole_compiler():
    """How `compile_whole` compiles on this backend, in words for the plan."""
    return {"tensorflow": "decode, rule and encode compiled as one XLA cluster (on a CPU, "
                          "one C loop where the moments are 8-bit codes or the weights or "
                          "moments are written with stochastic rounding: an op without XLA "
                          "around the step, a custom call in XLA's program with it)",
            "torch": "decode, rule and encode compiled as one function by torch.compile "
                     "(on a CPU, one C loop where the moments are 8-bit codes or the weights "
                     "or moments are written with stochastic rounding)",
            "jax": "decode, rule and encode in one function that jit compiles with the "
                   "step (on a CPU, one C loop where the moments are 8-bit codes or the "
                   "weights or moments are written with stochastic rounding)",
            }.get(keras.backend.backend(), "decode, rule and encode in one function")


def whole_any_length():
    """Whether `compile_whole(fn, any_length=True)` makes one function for tensors
    of every length (in a storage's `given_shapes`): on torch (torch.compile
    with dynamic shapes).
    TensorFlow's cluster is traced per shape (Keras's bit views need a known
    last dimension), compiled in well under a second; JAX traces `fn` into
    the training step, with its shapes."""
    return keras.backend.backend() == "torch"


def whole_shared():
    """Whether one `compile_whole` function may serve the optimizers of a process:
    on torch, where compiling takes seconds (Dynamo traces it anew for each
    new function), and on TensorFlow, where each new tf.function is traced
    and compiled by XLA again, per shape. It is given tensors, not the
    optimizer's variables, which its traces would keep: the step's scalars
    are computed ones, the learning rate read (on torch a Parameter, given
    detached by `plain`). Not on JAX, which traces `fn` into each training
    step anyway."""
    return keras.backend.backend() in ("torch", "tensorflow")


def reshape(x, shape):
    """`ops.reshape(x, shape)`; on torch the tensor's own method, without Keras's
    dispatch (tens of microseconds a call, for each tensor of a variable's
    compiled step: `keras_adam._whole`), and detached: a compiled
    function guards on whether its inputs require grad, and a variable's do
    where joined variables' do not."""
    if keras.backend.backend() == "torch":
        from keras_adam.backends import torch

        return torch.reshaped(x, shape)
    return ops.reshape(x, shape)


def take_rows(x, indices):
    """`ops.take(x, indices, axis=0)` for int32 `indices`; on torch `index_select`,
    without Keras's conversions of the indices (a step's rows of stream keys,
    `keras_adam._whole`; timed alone on 250,000 rows: 4.3 ms through Keras,
    0.7 ms here)."""
    if keras.backend.backend() == "torch":
        from keras_adam.backends import torch

        return torch.take_rows(x, indices)
    return ops.take(x, indices, axis=0)


def view(x, shape):
    """`ops.reshape(x, shape)`; on torch the tensor's own method, detached, a view
    where it can be (without Keras's dispatch)."""
    if keras.backend.backend() == "torch":
        return x.detach().reshape(shape)
    return ops.reshape(x, shape)


def join(tensors, shape):
    """`tensors` flattened, one after another, in `shape` (-1 for the rows): a new
    tensor, not recorded by autograd, as `reshape`'s tensors are not. Only
    torch joins (`whole_any_length`): one call for all, with no dispatch
    per tensor, where a step joins many small variables' tensors
    (`keras_adam._whole`)."""
    from keras_adam.backends import torch

    return torch.join(tensors, shape)


def split_like(x, like):
    """`x`'s elements cut, in order, into views of the shapes of `like`'s tensors:
    `join`'s inverse (on torch), or `x` in the shape of the one tensor."""
    if len(like) == 1:
        return [view(x, like[0].shape)]
    from keras_adam.backends import torch

    return torch.split_like(x, like)


def copy_into(targets, values):
    """Each of `values` copied into the tensor of `targets` at its position (of one
    shape each), as one foreach copy: on torch, where `whole_in_place()`
    (the targets are variables' own tensors)."""
    from keras_adam.backends import torch

    torch.copy_into(targets, values)


def assign_all(assign, pairs):
    """`assign(variable, value)` for each (variable, value) of `pairs`; on torch one
    foreach copy for all, outside Keras's scopes (`torch.assign_all`)."""
    if keras.backend.backend() == "torch":
        from keras_adam.backends import torch

        if torch.assign_all(pairs):
            return
    for variable, value in pairs:
        assign(variable, value)


def compile_whole(fn, any_length=False, in_place=False, rows=False, loop=None):
    """`fn` (a whole variable's step, `keras_adam._whole`) compiled for eager callers:
    one XLA cluster on TensorFlow, torch.compile on torch; as is on JAX, whose
    jit compiles it with the training step. With `any_length`, one compiled
    function serves tensors of every length (with `rows`, given in rows, also
    rows of length 1: `torch._settings`). With `in_place` (where
    `whole_in_place()`), the function writes its results into its inputs
    theta and values and returns nothing. `loop` is ((rounds, rate, nesterov,
    epsilon_zero) of `_whole`'s step function, the storage's `given_shapes`
    of the variable): on a CPU the same step then runs as one C loop
    (`rows.c`) where it covers the call: on torch, for a function given in
    those shapes (`torch_rows`); on JAX, as a custom call in the jitted
    program (`jax_rows`); on TensorFlow, the function's `update` runs an op
    that writes the variables themselves, and the function XLA compiles
    calls the loop as a custom call (`tf_rows`)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        if loop is None:
            return compiled(fn)
        from keras_adam.backends import tf_rows

        step = LoopStep(*loop[0])
        return tf_rows.WithLoop(compiled(tf_rows.in_programs(fn, step, loop[1])), step, loop[1])
    if backend == "torch":
        from keras_adam.backends import torch
        from keras_adam.backends import torch_rows

        step = torch.compiled(torch.in_place(fn) if in_place else fn, any_length, rows)
        if loop is not None and any_length:
            step = torch_rows.with_loop(step, LoopStep(*loop[0]), in_place)
        return step
    if backend == "jax" and loop is not None:
        from keras_adam.backends import jax_rows

        return jax_rows.with_loop(fn, LoopStep(*loop[0]), loop[1])
    return fn


def use_c_loop(on):
    """Whether the memory formats' steps may take the C loop on a CPU (`rows.c`,
    `compile_whole`'s `loop`), for the steps traced or run from now on (a
    compiled step function already traced, which optimizers of the same
    layouts share, keeps its choice); off, they take the compiled step
    function (the benchmark's `--c-loop off`, set before any step)."""
    backend = keras.backend.backend()
    if backend == "torch":
        from keras_adam.backends import torch_rows as module
    elif backend == "jax":
        from keras_adam.backends import jax_rows as module
    else:
        from keras_adam.backends import tf_rows as module
    module.enabled = bool(on)


def own_tensors(groups):
    """The own tensors of each of `groups` (tuples of Keras variables), as a
    list of tuples, where `whole_in_place()` (on torch, outside Keras's
    scopes): their Parameters, read without Keras's checks of the scopes and
    the device (some microseconds each, for each tensor of each of a step's
    variables)."""
    from keras_adam.backends import torch

    own = torch.own_tensor
    return [tuple(map(own, group)) for group in groups]


def plain(values):
    """`values` (tensors or None) as a tuple of plain tensors: on torch a Parameter
    is detached (the same memory, so it reads the variable's value at each
    call), since a compiled function guards on its inputs' types."""
    if keras.backend.backend() != "torch":
        return tuple(values)
    from keras_adam.backends import torch

    return tuple(map(torch.plain, values))


def plain_update_loop():
    """Whether Keras's optimizer updates the variables one by one in a plain loop
    of `update_step` (`_backend_update_step`): on torch and JAX. TensorFlow's
    runs each in tf.distribute's update."""
    return keras.backend.backend() != "tensorflow"


def whole_in_place():
    """Whether `compile_whole(fn, in_place=True)` may be called now: on torch, outside
    an outer torch.compile and Keras's scopes (`torch.writes_in_place`).

    A compiled step that returns its results writes them to new tensors,
    which are then copied into the variables: one more pass over theta and
    the moments, and their size again in memory while it lasts. Written in
    place, the results go straight into the variables' memory. TensorFlow's
    and JAX's functions are pure (XLA reuses donated buffers itself)."""
    if keras.backend.backend() != "torch":
        return False
    from keras_adam.backends import torch

    return torch.writes_in_place()


# Row primitives. Row-sparse gradients exist only on TensorFlow, so only its
# module implements these; `keras_adam._sparse` and `keras_adam._state` call them.

def unique_rows(indices):
    """(rows, position): each index once, and where each entry of `indices` went."""
    from keras_adam.backends import tensorflow

    return tensorflow.unique_rows(indices)


def gather_rows(variable, rows):
    """`variable[rows]`, reading only those rows."""
    from keras_adam.backends import tensorflow

    return tensorflow.gather_rows(variable, rows)


def row_slices(values, rows, dense_shape=None):
    """A row-sparse tensor: `values` for `rows`; assigning it scatters those rows only."""
    from keras_adam.backends import tensorflow

    return tensorflow.row_slices(values, rows, dense_shape)
