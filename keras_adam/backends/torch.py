"""PyTorch's fused multi-tensor Adam kernel, one call for all of its variables per step.

`torch._fused_adam_` updates lists of params, exp_avgs (m), exp_avg_sqs (v)
and max_exp_avg_sqs (v_max) in one call. For each element, with the step
count t it is given and weight_decay = 0:

    m <- m + (g - m) * (1 - beta_1)          (= beta_1 * m + (1 - beta_1) * g)
    v <- beta_2 * v + (1 - beta_2) * g^2
    [v_max <- max(v_max, v), used as v below]
    theta <- theta - lr / (1 - beta_1^t) * m / (sqrt(v) / sqrt(1 - beta_2^t) + eps)

That is our rule with epsilon_placement="paper". In the folded form of
`_rule.fold_step_size`, D = (sqrt(v) + epsilon') / sqrt(c2) for either
placement, so the kernel is exact with eps = epsilon' / sqrt(c2): epsilon for
"paper", epsilon / sqrt(c2) for "hat". Without bias correction,
t = 2^40 makes beta^t = 0 in double precision for every beta < 1 - 1e-11, so
c1 = c2 = 1. The kernel takes the betas as Python floats (double), so unlike
TensorFlow's kernel it forms 1 - beta_2 exactly. It has no Nesterov option:
those variables use the portable path. Decoupled weight decay is applied by
Keras before this step, so the kernel's own is 0.
"""

import contextlib
import functools
import math
import operator
import os
import threading
import types
import warnings

import keras
import numpy as np
import torch
from torch._dynamo import config as dynamo_config
from torch.fx.experimental import _config as shape_config
# Keras's private modules that `_keras_device` and `_keras_scope_active` read.
from keras.src.backend.common import stateless_scope as _keras_stateless_scope
from keras.src.backend.common import variables as _keras_variables
from keras.src.backend.torch import core as _keras_torch_core

from keras_adam import _rule

# beta^(2^40) underflows to 0 in double for beta < 1 - 1e-11.
_NO_BIAS_CORRECTION_STEP = 2.0**40


class MultiTensor:
    """`torch._fused_adam_` over every variable planned for it, once per step."""

    name = "torch-multi-tensor"
    exact_because = "torch._fused_adam_, with epsilon' / sqrt(c2) as its eps"
    per_variable = False

    @staticmethod
    def portable_when(hyper):
        return "under torch.compile (jit_compile=True), which fuses the portable ops itself"

    @classmethod
    def option_reason(cls, hyper):
        if hyper.nesterov:
            return "torch._fused_adam_ has no Nesterov option"
        return None

    def portable_now(self, hyper):
        # Under torch.compile (Keras's jit_compile=True on torch) the in-place
        # multi-tensor kernel fails Inductor's functionalization.
        if torch.compiler.is_compiling():
            return "the in-place kernel fails torch.compile's functionalization"
        return None

    def __init__(self):
        # The tensor lists of the last steps' sets of variables (one per
        # group of values), for the same variables (see `_tensors`).
        self._cached = {}
        self._step_tensor = None  # (t, device, the kernel's step tensor)

    def decay(self, decays):
        """Decoupled weight decay on variables this path updates: for each
        (rate, step, variables) of `decays`, its variables multiplied by
        1 - rate * step's lr, all in one foreach kernel (one factor per tensor),
        their tensors read from the cache."""
        variables = [variable for _, _, group in decays for variable in group]
        if not variables:
            return
        params = self._cache(("decay", tuple(map(id, variables))), variables,
                             lambda: [v.value for v in variables], decays[0][1])
        factors, start = [], 0
        for rate, step, group in decays:
            mine = params[start:start + len(group)]
            factors += [_decay_factor(rate, step.lr, mine, _numbers(step)[1])] * len(group)
            start += len(group)
        if all(isinstance(f, float) for f in factors):
            _multiply(params, factors)
            return
        for param, factor in zip(params, factors):  # 16-bit: Keras's tensor factors
            _multiply([param], factor)

    def apply(self, items, hyper, step):
        """One fused Adam step on all (gradient, variable, (m, v, v_max)) triples."""
        if not items:
            return []
        t, lr = _numbers(step)
        c1, c2 = _rule.bias_factors_float(t, hyper.beta_1, hyper.beta_2, hyper.bias_correction)
        _, epsilon = _rule.fold_step_size(
            lr, c1, c2, hyper.epsilon, hyper.epsilon_placement, sqrt=math.sqrt
        )
        kernel_step = float(t) if hyper.bias_correction else _NO_BIAS_CORRECTION_STEP
        with torch.no_grad():
            for device, params, ms, vs, v_maxes, positions in self._tensors(items, step):
                gs = [_like(items[i][0], p) for i, p in zip(positions, params)]
                steps = [self._kernel_step(kernel_step, device)] * len(params)
                torch._fused_adam_(
                    params, gs, ms, vs, v_maxes, steps,
                    lr=lr, beta1=hyper.beta_1, beta2=hyper.beta_2, weight_decay=0.0,
                    eps=epsilon / math.sqrt(c2), amsgrad=hyper.amsgrad, maximize=False,
                )
        return []

    def _tensors(self, items, step):
        """Per (device, dtype): params, m, v, v_max tensors, and the items' positions.

        Reading a Keras variable's `value` costs some microseconds of checks
        (stateless scope, autocast), three times per variable and step: more
        than the kernel itself for small variables. Outside a
        StatelessScope and an autocast scope `value` is the variable's own
        Parameter, which assignments update in place, so the lists of the
        last step are reused while the same variables come. Inside such a
        scope (`stateless_apply`), `value` is read as before.
        """
        variables = [variable for _, variable, _ in items]
        slots = [slot for _, _, triple in items for slot in triple]
        key = (tuple(map(id, variables)), tuple(map(id, slots)))
        return self._cache(key, (variables, slots), lambda: _grouped(items), step)

    def _cache(self, key, keep, build, step):
        """`build()`, remembered under `key` while no Keras scope is active (`_tensors`).

        `keep` holds the variables whose ids make the key, so that no id is reused.
        Whether a scope is active is asked once per `step`.
        """
        if step.memo("torch: keras scope", _keras_scope_active):
            return build()
        if key not in self._cached:
            if len(self._cached) >= 16:
                self._cached.clear()
            self._cached[key] = (keep, build())
        return self._cached[key][1]

    def _kernel_step(self, kernel_step, device):
        # One step tensor per step and device, shared by the groups' kernel calls.
        cached = self._step_tensor
        if cached is None or cached[:2] != (kernel_step, device):
            tensor = torch.tensor(kernel_step, dtype=torch.float32, device=device)
            cached = self._step_tensor = (kernel_step, device, tensor)
        return cached[2]


def _like(g, param):
    # The kernel takes gradients of its parameter's dtype and device, contiguous
    # (a gradient may come as a CPU tensor for a GPU variable).
    if g.dtype != param.dtype or g.device != param.device:
        g = g.to(device=param.device, dtype=param.dtype)
    return g.contiguous()


def _grouped(items):
    """[(device, params, ms, vs, v_maxes, positions)], one per (device, dtype)."""
    groups = {}
    for i, (_, variable, (m, v, v_max)) in enumerate(items):
        param = variable.value
        if param.numel() == 0:  # nothing to update; CUDA's kernel refuses empty tensors
            continue
        group = groups.setdefault((param.device, param.dtype), ([], [], [], [], []))
        group[0].append(param)
        group[1].append(m.value)
        group[2].append(v.value)
        if v_max is not None:
            group[3].append(v_max.value)
        group[4].append(i)
    return [(device, *lists) for (device, _), lists in groups.items()]


def decay(variables, weight_decay, lr):
    """Decoupled weight decay as Keras's torch optimizer applies it: each variable
    multiplied by 1 - weight_decay * lr, in one foreach kernel."""
    if variables:
        params = [v.value for v in variables]
        _multiply(params, _decay_factor(weight_decay, lr, params))


def _numbers(step):
    """(t, lr) of `step` as Python numbers, read once per step (each `.item()`
    costs some microseconds, asked by every kernel call and decay)."""
    def read():
        if step.parent is not None:  # a group's: t as the step it scales read it
            return _numbers(step.parent)[0], _number(_values(step)[1])
        iterations, lr = (_number(x) for x in _values(step))
        return int(iterations) + 1, lr

    return step.memo("torch: t, lr", read)


def _on_cpu(step):
    """Whether `step`'s counter and learning rate, and the tensors Keras makes now,
    are on the CPU (asked once per step): there, `step_scalars` makes the
    tensors `_rule.step_scalars` would make."""
    def ask():
        if step.parent is not None:  # a group's: the step it scales asked for the rest
            lr = _values(step)[1]
            return _on_cpu(step.parent) and not (isinstance(lr, torch.Tensor) and not lr.is_cpu)
        return _keras_device().type == "cpu" and not any(
            isinstance(x, torch.Tensor) and not x.is_cpu for x in _values(step))

    return step.memo("torch: on the CPU", ask)


def _values(step):
    # The step's counter and learning rate, a variable's tensor read once per step:
    # outside Keras's scopes its own tensor (`value` asks them, some
    # microseconds a read), within one what `value` gives there.
    def read():
        if step.parent is not None:  # a group's: the counter as the step it scales read it
            return [_values(step.parent)[0], getattr(step.lr, "value", step.lr)]
        direct = not _keras_scope_active()
        return [own_tensor(x) if direct and isinstance(x, keras.Variable)
                else getattr(x, "value", x) for x in (step.iterations, step.lr)]

    return step.memo("torch: values", read)


def _keras_device():
    """The device Keras makes new tensors on: a device scope's, else its default
    (an accelerator where one is found).

    Keras 3.15 has no public accessor (asking it to make a tensor costs
    several microseconds a step); this module alone reads it, and
    tests/test_backend_torch.py's test of the scalars' fallbacks (under a
    "meta" device scope) fails if it moves.
    """
    return _device(_keras_torch_core.get_device())


@functools.lru_cache(maxsize=16)
def _device(name):
    return torch.device(name)


def step_numbers(hyper, step, dtype):
    """The fields of `_rule.step_scalars(hyper, step.t, step.lr, dtype)` as NumPy
    float32 numbers (None where a field is None), bit for bit, from t and
    lr read as numbers once per step: in float32, on a CPU, outside
    torch.compile; None elsewhere.

        c1 = -expm1(t ln(beta_1)),  c2 = -expm1(t ln(beta_2)),
        c1_next = -expm1((t + 1) ln(beta_1))
        alpha = lr * sqrt(c2) / c1,  epsilon' = epsilon * sqrt(c2) ("paper")
        nesterov_momentum = beta_1 * c1 / c1_next

    Through Keras's ops these are some twenty dispatches on 0-d tensors at
    every step, as long as the C loop's arithmetic on a small model. Here
    every correctly rounded operation (a product, quotient or sum of two
    float32 values, a negation, a double rounded to float32) is NumPy's
    float32 arithmetic, which rounds as torch's does; expm1 and sqrt are
    torch's own kernels, since torch computes them with its own
    approximations (its float32 sqrt is not correctly rounded on AVX-512
    CPUs: one result in five is an ulp off). The C loop takes these numbers
    as they are (`keras_adam._whole.Whole.again`); `step_scalars` makes
    them tensors. tests/test_backend_torch.py compares every field's bits
    with `_rule.step_scalars`'s over a grid of steps, rates and options.
    """
    if dtype != "float32" or torch.compiler.is_compiling():
        return None
    t = step.number()
    if t is None:
        return None
    lr = _numbers(step)[1]
    f32 = np.float32
    beta_1, one_minus_beta_1, beta_2, one_minus_beta_2, epsilon, log_beta_1, log_beta_2 = \
        _constants(hyper)
    with np.errstate(all="ignore"):  # inf and NaN as torch's give them, without warnings
        if hyper.bias_correction:
            c1, c2, c1_next = _bias_factors(log_beta_1, log_beta_2, t)
        else:
            c1 = c2 = c1_next = f32(1.0)
        sqrt_c2 = _square_root(c2)
        lr = f32(lr)
        # `_rule.fold_step_size`, in its order of operations.
        alpha = lr * sqrt_c2 / c1
        if hyper.epsilon_placement == "paper":
            epsilon = epsilon * sqrt_c2
        nesterov_momentum = beta_1 * c1 / c1_next if hyper.nesterov else None
    return (lr, beta_1, one_minus_beta_1, beta_2, one_minus_beta_2, c1, c2,
            nesterov_momentum, alpha, epsilon)


# Steps whose bias factors one call of torch's expm1 computes: 3 x 5 = 15
# exponents. On a CPU torch computes expm1 lane by lane with one vector code
# (Sleef's), the tail of a tensor too, so that each element's result does
# not depend on the tensor's length or the element's place: each factor has
# the bits of Keras's op on its own 0-d tensor (the test compares them, over
# blocks and across them).
_BIAS_STEPS = 5
# (ln(beta_1), ln(beta_2), first step) -> (c1, c2, c1_next of the block's
# steps). Blocks begin at multiples of `_BIAS_STEPS`: optimizers of the same
# betas at other steps keep their own.
_BIAS = {}
_BIAS_KEPT = 64


def _bias_factors(log_beta_1, log_beta_2, t):
    """(c1, c2, c1_next) at step `t` as `_rule.bias_factors` forms them (NumPy
    float32), from a block of `_BIAS_STEPS` steps computed at once:

        c = 1 - beta^t = -expm1(t ln(beta)),  c1_next: c1 at t + 1

    A call of torch's kernel costs some microseconds, at every step
    otherwise (as much as a small model's C loop takes for a variable)."""
    first = t - t % _BIAS_STEPS
    key = (float(log_beta_1), float(log_beta_2), first)
    block = _BIAS.get(key)
    if block is None:
        f32 = np.float32
        steps = np.array([f32(first + i) for i in range(_BIAS_STEPS)])  # each rounded alone
        exponents = np.concatenate([steps * log_beta_1, steps * log_beta_2,
                                    (steps + f32(1.0)) * log_beta_1])
        block = _keep(_BIAS, _BIAS_KEPT, key,  # (each optimizer's and group's betas)
                      np.split(-torch.expm1(torch.from_numpy(exponents)).numpy(), 3))
    i = t - first
    return block[0][i], block[1][i], block[2][i]


# sqrt(c2) by c2's bits: c2 reaches 1 after some thousands of steps (at once
# without bias correction), and a call of torch's kernel costs microseconds.
_ROOTS = {}
_ROOTS_KEPT = 256


def _square_root(x):
    """sqrt of the NumPy float32 `x` by torch's kernel, on a tensor of one element
    as Keras's op on a 0-d tensor takes it (torch's float32 sqrt is MKL's
    vector routine on x86, not correctly rounded: its bits are taken, not
    reasoned about)."""
    key = int(x.view(np.uint32))
    root = _ROOTS.get(key)
    if root is None:
        root = _keep(_ROOTS, _ROOTS_KEPT, key,
                     torch.sqrt(torch.from_numpy(np.array([x]))).numpy()[0])
    return root


def _keep(cache, kept, key, value):
    """`value`, kept in `cache` under `key`; the cache emptied first where it holds
    `kept` values (a schedule's or a run's values, each step new, would
    otherwise grow it without end)."""
    if len(cache) >= kept:
        cache.clear()
    cache[key] = value
    return value


def step_scalars(hyper, step, dtype):
    """`_rule.step_scalars(hyper, step.t, step.lr, dtype)`, bit for bit, made from
    `step.scalar_numbers` (`step_numbers`) where there are some; None
    elsewhere. The fields are 0-d float32 CPU tensors, as Keras makes them,
    one per value: a value the last steps had (beta_1 at every step; alpha
    once c1 and c2 reach 1) is the same tensor again (`_scalar_tensors`)."""
    numbers = step.scalar_numbers(hyper, dtype)
    return None if numbers is None else _rule.Scalars(*_scalar_tensors(numbers))


def step_number(step):
    """t = iterations + 1 of `step` as a Python int, read once per step: on a CPU,
    outside torch.compile, where Keras's `iterations + 1` does not wrap
    around (`_wraps`); None elsewhere."""
    if torch.compiler.is_compiling() or not _on_cpu(step):
        return None
    t = _numbers(step)[0]
    return None if _wraps(step, t) else t


_CPU = torch.device("cpu")
# 0-d float32 CPU tensors by field and value's bits (-0.0 and 0.0 apart, each
# NaN its own): most of a step's scalars are the last step's values (beta_1,
# beta_2 and their complements at every step; lr, c1, c2 and alpha once the
# bias factors reach 1 or the schedule holds), and a tensor made costs more
# than a dict lookup. Nothing writes them (the rule's ops and the compiled
# functions read their scalars). Per field: two fields of one value (lr and
# 1 - beta_2, both 0.001) are two tensors, since a compiled function taking
# one tensor twice would be compiled again for it.
_TENSORS = {}
_TENSORS_KEPT = 256


def _scalar_tensors(values):
    """0-d float32 CPU tensors of `values` (NumPy float32 values, or None: None)."""
    bits = np.array([0.0 if x is None else x for x in values], np.float32).view(np.uint32)
    tensors = []
    for field, (x, key) in enumerate(zip(values, bits.tolist())):
        tensor = None if x is None else _TENSORS.get((field, key))
        if tensor is None and x is not None:
            tensor = _keep(_TENSORS, _TENSORS_KEPT, (field, key), torch.scalar_tensor(
                float(x), dtype=torch.float32, device=_CPU))
        tensors.append(tensor)
    return tensors


def step_count(step):
    """`step.iterations + 1` as Keras's operator makes it (a 0-d tensor of the
    counter's dtype on the CPU), from the counter read as a number: on a CPU,
    outside torch.compile; None elsewhere. The random streams of stochastic
    rounding take it at every step; Keras's operator is a dispatch of some
    microseconds more."""
    t = step.number()
    counter = _values(step)[0] if t is not None else None
    if not isinstance(counter, torch.Tensor) or counter.dtype not in (torch.int32, torch.int64):
        return None
    return torch.tensor(t, dtype=counter.dtype, device=_CPU)


def _wraps(step, t):
    # Whether Keras's `iterations + 1` wraps around in the counter's dtype (at its
    # largest value): left to Keras's operator, whose result the rule then takes.
    counter = _values(step)[0]
    return (isinstance(counter, torch.Tensor) and not counter.dtype.is_floating_point
            and t > _largest(counter.dtype))


@functools.lru_cache(maxsize=16)
def _largest(dtype):
    return torch.iinfo(dtype).max


@functools.lru_cache(maxsize=64)
def _constants(hyper):
    """`hyper`'s float32 constants as `_rule.step_scalars` rounds them: beta_1,
    1 - beta_1, beta_2, 1 - beta_2 and epsilon (each formed in double), and
    ln(beta_1), ln(beta_2) (`_rule.log_beta`)."""
    return tuple(np.float32(x) for x in (
        hyper.beta_1, 1.0 - hyper.beta_1, hyper.beta_2, 1.0 - hyper.beta_2, hyper.epsilon,
        _rule.log_beta(hyper.beta_1), _rule.log_beta(hyper.beta_2)))


def _decay_factor(weight_decay, lr, params, lr_number=None):
    """Keras's factor 1 - weight_decay * lr, with the same bits, cheaply.

    Keras forms it from the learning rate's float32 tensor: weight_decay is
    rounded to float32, and the product and the difference are float32
    operations. NumPy's float32 arithmetic rounds each the same way (IEEE),
    without three tensor ops. A float32 or float64 variable multiplied by
    that float32 value, given as a Python float (exact), gives what the
    0-d tensor gives; for 16-bit variables, whose kernels may round a tensor
    factor to their own dtype first, the factor is formed as Keras forms it.
    `lr_number`, if given, is lr's value, already read.
    """
    lr = getattr(lr, "value", lr)  # a Keras variable's tensor
    if not isinstance(lr, torch.Tensor) or lr.dtype != torch.float32 or \
            any(p.dtype not in (torch.float32, torch.float64) for p in params):
        return 1 - weight_decay * lr
    lr_number = lr.item() if lr_number is None else lr_number
    return float(np.float32(1) - np.float32(weight_decay) * np.float32(lr_number))


def _multiply(params, factor):
    with torch.no_grad():  # in place on Parameters that require grad
        torch._foreach_mul_(params, factor)


def _number(value):
    """A Keras variable, tensor or Python number as a Python number.

    `.item()` on the tensor itself: `keras.ops.convert_to_numpy` costs tens
    of microseconds per call, a visible part of a small model's step.
    """
    value = getattr(value, "value", value)  # a Keras variable's tensor
    return value.item() if isinstance(value, torch.Tensor) else float(value)


def take_rows(x, indices):
    """`keras_adam.backends.take_rows` on torch."""
    return torch.index_select(x, 0, indices)


def join(tensors, shape):
    """`keras_adam.backends.join` on torch: each tensor flattened and concatenated
    in one call (`flatten_dense_tensors`, as DDP joins gradients into buckets)."""
    with torch.no_grad():
        return torch._utils._flatten_dense_tensors(tensors).view(shape)


def split_like(x, like):
    """`keras_adam.backends.split_like` on torch: views of `x`, in one call."""
    return torch._utils._unflatten_dense_tensors(x.reshape(-1), like)


def copy_into(targets, values):
    """`keras_adam.backends.copy_into` on torch: one foreach copy, not recorded."""
    with torch.no_grad():
        torch._foreach_copy_(targets, values)


def reshaped(x, shape):
    """`x` detached and reshaped, as a tensor of its own over `x`'s memory: not a
    view, where `x.reshape` gives one.

    A compiled function guards on the inputs' views: on whether an input is
    one, and on its base's shape (a variable of 4 x 16 x 64 given in rows of
    256 failed the guard set by one of 2000 x 64 in rows of 64, and the
    function was traced again, seconds of a first step). A tensor of its
    own (`Tensor.set_` on the same storage) has no base to guard on.
    """
    view = x.detach().reshape(shape)
    # Traced into an outer graph (Keras's jit_compile=True), the function is
    # inlined, with no guards of its own (and Dynamo cannot trace `set_`).
    if view._base is None or torch.compiler.is_compiling():
        return view  # (no base: reshape copied, x not contiguous)
    own = torch.empty(0, dtype=view.dtype, device=view.device)
    return own.set_(view.untyped_storage(), view.storage_offset(), view.size(), view.stride())


def assign_all(pairs):
    """Each (Keras variable, tensor) of `pairs` assigned in one foreach copy, as
    `variable.assign(tensor)` would (tensors of the variable's shape); False,
    assigning nothing, inside a Keras scope, where a variable's `value` is
    not its own tensor and assignments go through the scope.

    A tensor that is the variable's own memory (a step written in place,
    `in_place`) is already assigned: it is not copied onto itself."""
    if _keras_scope_active():
        return False
    if torch.compiler.is_compiling():
        # Traced (jit_compile=True): nothing was written in place, and comparing
        # data pointers would break the graph.
        targets, values = [variable.value for variable, _ in pairs], [v for _, v in pairs]
        written = []
    else:
        targets, values, written = [], [], []
        for variable, value in pairs:
            target = variable.value
            if value.data_ptr() == target.data_ptr() and value.numel() == target.numel():
                written.append(target)
            else:
                targets.append(target)
                values.append(value)
    if written:
        # Written through a tensor of its own over the same memory: autograd
        # learns of it as of a copy (a graph that saved the tensor then raises).
        torch.autograd.graph.increment_version(written)
    if targets:
        with torch.no_grad():
            torch._foreach_copy_(targets, values)
    return True


def writes_in_place():
    """`keras_adam.backends.whole_in_place` on torch: not while torch.compile traces
    (Keras's jit_compile=True: the step is traced into the outer graph, which
    assigns its results), nor in a Keras scope, where a variable's `value`
    may be another tensor than its own (`stateless_apply` must not write
    into the state it is given)."""
    return not torch.compiler.is_compiling() and not _keras_scope_active()


# `keras_adam.backends.own_tensors`' tensor a Keras variable holds, which its
# `value` returns outside Keras's scopes (Keras 3.15's torch `Variable` keeps
# it as `_value`; this module alone reads it, and tests/test_backend_torch.py's
# in-place test fails if it moves: the results would not reach the
# variables). An attrgetter: read for each tensor of a step's variables.
own_tensor = operator.attrgetter("_value")


def plain(x):
    """`x` (a tensor or None) as `keras_adam.backends.plain` gives it."""
    return x.detach() if isinstance(x, torch.nn.Parameter) else x


def in_place(fn):
    """`fn`, a whole variable's step `(gradient, theta, values, fields, state) ->
    (theta', values')` (`keras_adam._whole`), writing theta' and values'
    into theta and values and returning nothing.

    Compiled, Inductor stores the results straight into the inputs' memory
    (the copies fuse into the step's loops): where theta and values are the
    variables' own tensors (`reshaped`), the step makes no new tensor of
    their size and no second pass to assign them.
    """
    def step(gradient, theta, values, fields, state):
        new_theta, new_values = fn(gradient, theta, values, fields, state)
        theta.copy_(new_theta)
        for slot, new_slot in zip(values, new_values):
            for x, new in zip(slot, new_slot):
                x.copy_(new)

    return step


def _keras_scope_active():
    """Whether a Keras StatelessScope or AutocastScope is active: then a variable's
    `value` may be another tensor than its Parameter.

    Keras has no public accessor for either (Keras 3.15); this module alone
    touches them. tests/test_backend_torch.py fails if they move: it runs
    the kernel under `stateless_apply` and after a variable's assignment.
    """
    return (_keras_stateless_scope.in_stateless_scope()
            or _keras_variables.get_autocast_scope() is not None)


def opaque(fn, name):
    """`keras_adam.backends.opaque` on torch: a custom operation (torch.library)
    running `fn` eagerly, called in its place while torch.compile traces."""

    @torch.library.custom_op(f"keras_adam::{name}", mutates_args=())
    def operation(args: list[torch.Tensor]) -> torch.Tensor:
        return torch.as_tensor(fn(*args), dtype=torch.int32).clone()

    @operation.register_fake
    def _(args):
        shape = torch.broadcast_shapes(*(a.shape for a in args))
        return torch.empty(shape, dtype=torch.int32, device=_device_of(args))

    def run(*args):
        if not torch.compiler.is_compiling():
            return fn(*args)
        return operation([_int_tensor(a) for a in args])

    return run


def _int_tensor(value):
    value = getattr(value, "value", value)  # a Keras variable's tensor
    if isinstance(value, torch.Tensor):
        return value
    return torch.tensor(value, dtype=torch.int32)


def _device_of(tensors):
    # Python numbers become CPU scalars, which broadcast onto any device.
    devices = [t.device for t in tensors if t.device.type != "cpu"]
    return devices[0] if devices else tensors[0].device


def compiled(fn, any_length=False, rows=False):
    """`fn` compiled by torch.compile (Inductor: its element-wise ops fuse into a
    few loops), or `fn` itself, with one warning, where compiling fails (no C
    compiler, an unsupported platform). With `any_length`, `fn` is compiled
    with dynamic shapes: one compilation serves every length (torch still
    specializes lengths 0 and 1, except with `rows`, and compiles again per
    rank). With `rows`, on a CPU, `fn` is compiled for 256-bit vectors where
    Inductor would take wider ones (`_vector_options`).

    Each call gets a fresh copy of `fn`'s code: Dynamo keeps its compiled
    graphs per code object, up to a small limit (8), and the functions made
    from one closure share a code object; past the limit they would all run
    uncompiled. Under an outer torch.compile (Keras's `jit_compile=True`),
    `fn` is traced into the outer graph.
    """
    code = fn.__code__.replace()
    fresh = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__,
                               fn.__closure__)
    state = {"failed": False, "compiled": None}

    def compiled_fn(*args):
        # Made at the first call, when the tensors' device is known (`cpp.simdlen`
        # concerns Inductor's CPU code only); `_settings`' lock, held around
        # the call, makes it once. A function first called on another device
        # keeps Inductor's choice.
        if state["compiled"] is None:
            cpu = any(isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in args)
            state["compiled"] = torch.compile(fresh, dynamic=any_length,
                                              options=_vector_options(rows and cpu))
        return state["compiled"](*args)

    def run(*args):
        if torch.compiler.is_compiling():
            return fn(*args)
        # Without autograd: a variable's tensor requires grad, and the compiled
        # function would otherwise be wrapped for a backward pass (some tenths
        # of a millisecond per call), which an update never takes; and `fn`
        # may write into a variable's Parameter (`in_place`).
        with torch.no_grad():
            if state["failed"]:
                return fn(*args)
            try:
                with _settings(any_length, rows):
                    return compiled_fn(*args)
            except Exception as error:  # noqa: BLE001 - any compiler failure falls back
                if not _backend_failure(error):
                    raise
                state["failed"] = True
                _warn_once(error)
                return fn(*args)

    return run


def _vector_options(rows):
    """Inductor's options for a function given in rows (`keras_adam._whole`: the
    element-wise layouts that round stochastically): vectors of 256 bits
    where the CPU has wider ones (AVX-512), else Inductor's own choice (None).

    Stochastic rounding reads a float32's bits (`_rounding.stochastic_bfloat16`:
    one bitcast to int32 and one back per rounded tensor; `_rounding.stochastic`,
    for float16, five), and Inductor (torch 2.13, CPU) writes a vectorised
    bitcast as a store of the vector, a scalar loop and a load. With 512-bit
    vectors that round trip is several
    times slower than with 256-bit ones (on one AVX-512 CPU: 5.1 ms
    against 2.0 for a bitcast there and back of 4,000,000 float32, other
    kernels equal), a large share of the rows' kernels. The 8-bit layouts
    have no bitcast and are faster with the wider vectors: they keep them.
    Only this function's compilation is changed (torch.compile's `options`),
    and not where the user chose the width (`ATEN_CPU_CAPABILITY`, or
    Inductor's `cpp.simdlen`).
    """
    width = _narrow_width() if rows else None
    return None if width is None else {"cpp.simdlen": width}


@functools.cache
def _narrow_width():
    """256 where Inductor can compile for 256-bit vectors and wider ones, else None."""
    # Inductor's list of the vector instruction sets it can compile for here
    # (torch 2.13 keeps it in `torch._inductor.cpu_vec_isa`; this module alone
    # reads it, and tests/test_backend_torch.py fails if it moves). Probing
    # them compiles a test program per set (once per cache directory) and
    # loads it (once per process): no more than Inductor's own first CPU
    # compilation does.
    try:
        from torch._inductor import config as inductor_config
        from torch._inductor import cpu_vec_isa

        if "ATEN_CPU_CAPABILITY" in os.environ or inductor_config.cpp.simdlen is not None:
            return None  # the user's choice
        widths = [isa.bit_width() for isa in cpu_vec_isa.valid_vec_isa_list()]
    except Exception:  # noqa: BLE001 - a moved seam or option: Inductor's own choice
        return None
    return 256 if 256 in widths and max(widths) > 256 else None


# The compiler's settings are process-wide: the compiled calls that set them
# run one at a time (a thread's step waits for another's compiling).
_SETTINGS = threading.RLock()


@contextlib.contextmanager
def _settings(any_length, rows):
    """Within it, the compiler's settings that the whole-variable step needs:

    - Dynamo compiles the Python floats a function reads (the codec's
      constants, the rule's epsilon) as constants. Compiled with dynamic
      shapes, it would trace them as symbols, then restart its analysis to
      fix them: the tracing done twice, seconds of a first step.
    - With dynamic shapes (`any_length`), two lengths equal at the first call
      are not taken to be equal for good ("duck" shapes): a row length of 4
      and the four keys of each row (`_whole._row_keys`) would make a second
      graph.
    - Given in rows (`rows`), a length of 1 is compiled with the others, not
      apart (nor a single row): the rows of 1 of odd-sized variables take
      the same graph, one compilation (some seconds of a cold start) fewer.
      Only there: on the 8-bit layouts (given one block per row) this mode
      makes Inductor 2.13 fail (a KeyError in its scheduler).
    """
    # Set and restored by hand: the configs' own `patch` takes some 60 us a
    # call, more than a small variable's arithmetic.
    settings = ((dynamo_config, "specialize_float", True),
                (shape_config, "use_duck_shape", not any_length),
                (shape_config, "backed_size_oblivious", rows))
    with _SETTINGS:
        changed = [(config, name, value, getattr(config, name))
                   for config, name, value in settings if getattr(config, name) != value]
        try:
            for config, name, value, _ in changed:
                setattr(config, name, value)
            yield
        finally:
            for config, name, _, saved in changed:
                setattr(config, name, saved)


def _backend_failure(error):
    # Dynamo and Inductor's own errors (a missing compiler among them), not
    # an error of `fn` itself, which eager execution would raise too.
    module = type(error).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor"))


_WARNED = []


def _warn_once(error):
    if not _WARNED:
        _WARNED.append(True)
        warnings.warn(
            "torch.compile is not available here, so keras_adam updates variables with "
            "8-bit or 16-bit moments op by op (correct, but several times slower): "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
            stacklevel=3)
