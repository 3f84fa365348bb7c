"""`keras_adam.Adam`, `AdamW` and `LazyAdam`: Adam as a Keras 3 optimizer.

This module holds Keras's hooks and the public API; every feature lives in
a module of its own, which receives data and never this optimizer (the
docs/design.md is the map). The rule is
`keras_adam._rule.rule`; `Adam.update_step` applies it with `keras.ops` on
any backend (the portable path), and every fast path is tested equal to it.
"""


import keras
import numpy as np
from keras import ops
from keras.optimizers import Optimizer

from keras_adam import _decay
from keras_adam import _groups
from keras_adam import _nonfinite
from keras_adam import _options
from keras_adam import _plan
from keras_adam import _quantize
from keras_adam import _rounding
from keras_adam import _rule
from keras_adam import _saving
from keras_adam import _sparse
from keras_adam import _state
from keras_adam import _validation as check
from keras_adam import _whole
from keras_adam import backends
from keras_adam import serialization
from keras_adam._per_step import PerStepCache
from keras_adam._per_step import Step


class _Option:
    """An option of `keras_adam._options.FIELDS` as an attribute: read from the
    optimizer's `Options`, and checked there as the constructor checks it on
    every assignment (`optimizer.beta_1 = 1.5` raises the constructor's error)."""

    def __set_name__(self, owner, name):
        if name not in _options.FIELDS:
            raise TypeError(f"{name!r} is not an option of keras_adam._options.FIELDS")
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        return obj._options[self.name]

    def __set__(self, obj, value):
        obj._options.set(self.name, value)



def _with_options(cls):
    """Class decorator: an `_Option` attribute for each of `_options.FIELDS`."""
    for name in _options.FIELDS:
        option = _Option()
        option.__set_name__(cls, name)
        setattr(cls, name, option)
    return cls


@serialization.register
@_with_options  # optimizer.beta_1 etc., validated on every assignment
class Adam(Optimizer):
    """Adam (Kingma & Ba, 2014) with AMSGrad, Nesterov and bias-correction switches.

    At step t = iterations + 1, with gradient g, each variable theta is updated:

        m      <- beta_1 * m + (1 - beta_1) * g
        v      <- beta_2 * v + (1 - beta_2) * g^2
        v_max  <- max(v_max, v); v_max replaces v below        (amsgrad=True)
        c1     =  1 - beta_1^t,   c2 = 1 - beta_2^t            (1, 1 if bias_correction=False)
        m_hat  =  m / c1
               or beta_1 * m / (1 - beta_1^(t+1)) + (1 - beta_1) * g / c1   (nesterov=True)
        D      =  (sqrt(v) + epsilon) / sqrt(c2)               (epsilon_placement="hat")
               or sqrt(v / c2) + epsilon                       (epsilon_placement="paper")
        theta  <- theta - lr * m_hat / D

    `epsilon` is epsilon-hat ("hat", as `keras.optimizers.Adam`) or Algorithm
    1's epsilon ("paper", as `torch.optim.Adam`). Clipping, EMA, loss scaling and
    gradient accumulation are Keras's. docs/options.md gives each argument in full
    (bfloat16 rounding: Zamirai et al., 2020; 8-bit: Dettmers et al., 2022).

    Args:
        learning_rate: lr: a float >= 0, a schedule or a callable. Defaults to `0.001`.
        beta_1, beta_2: floats in [0, 1). Default to `0.9` and `0.999`.
        epsilon: float >= 0, placed by `epsilon_placement`. Defaults to `1e-7`.
        amsgrad: bool, the v_max step (Reddi et al., 2018). Defaults to `False`.
        nesterov: bool, the look-ahead m_hat (Dozat, 2016). Defaults to `False`.
        bias_correction: bool, divide by c1 and c2. Defaults to `True`.
        epsilon_placement: `"hat"` or `"paper"`. Defaults to `"hat"`.
        sparse_updates: `"exact"` or `"lazy"` (IndexedSlices' rows only). Defaults to `"exact"`.
        moment_dtype: None, "float32", "bfloat16", "float16" or "8bit". Defaults to `None`.
        fused: None (a kernel where exact), True (require one) or False. Defaults to `None`.
        skip_nonfinite: bool, NaN/Inf gradients only count `skipped_steps`. Defaults to `False`.
        shard_state: bool, split m, v over JAX's data-parallel devices. Defaults to `False`.
        moment_block_size: int >= 1, elements per 8-bit block. Defaults to `256`.
        min_8bit_size: int >= 0, smaller variables keep float32 moments. Defaults to `4096`.
        weight_decay: None or a float >= 0, decoupled weight decay. Defaults to `None`.
        exclude_from_weight_decay: None or `get_config()`'s record of it. Defaults to `None`.
        weight_rounding: None, "nearest", "stochastic" or "compensated". Defaults to `None`.
        groups: None or {regex: overrides}: per-variable values. Defaults to `None`.
        **kwargs: `clipnorm`, `use_ema`, `gradient_accumulation_steps`, `name`...: Keras's.

    Raises:
        ValueError, TypeError: naming the argument and what is allowed.

    Example:

    >>> import keras, keras_adam
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer=keras_adam.Adam(learning_rate=1e-3), loss="mse")

    References:
        Kingma & Ba 2014, arXiv:1412.6980 (Algorithm 1; epsilon-hat: section 2); Reddi
        et al. 2018; Dozat 2016; Loshchilov & Hutter 2019 (decoupled weight decay).
    """

    def __init__(
        self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False,
        nesterov=False, bias_correction=True, epsilon_placement="hat", sparse_updates="exact",
        moment_dtype=None, fused=None, skip_nonfinite=False, shard_state=False,
        moment_block_size=_quantize.BLOCK_SIZE, min_8bit_size=_state.MIN_8BIT_SIZE,
        weight_decay=None, exclude_from_weight_decay=None, weight_rounding=None, groups=None,
        **kwargs,
    ):
        # Keras's own arguments (clipnorm, use_ema, name...) go to Keras, which checks them.
        super().__init__(
            learning_rate=check.learning_rate(learning_rate),
            weight_decay=check.non_negative("weight_decay", weight_decay, optional=True),
            **kwargs)
        arguments = locals()  # each one named in `_options.FIELDS` is checked there
        self._options = _options.Options(**{name: arguments[name] for name in _options.FIELDS})
        self._storage = self._skipped_steps = self._rounding_seed = self._groups = None
        self._loaded_before_build = None  # `_saving.read`'s result, applied at build
        self._plans = _plan.Plans()
        self._per_step, self._whole = PerStepCache(), _whole.Whole()
        self._decay_exclusions = _decay.Exclusions.from_config(exclude_from_weight_decay)
        if self._decay_exclusions.var_names:
            super().exclude_from_weight_decay(var_names=self._decay_exclusions.var_names)

    def build(self, var_list):
        """Plans each variable's update (`fused=True` refuses first), then makes m, v, v_max."""
        if self.built:
            return
        self._groups = _groups.assign(self._options["groups"], var_list)
        storage = _state.for_options(self._options, self.assign, var_list, [
            g.get("moment_dtype", self._options["moment_dtype"]) for g in self._groups])
        self._plans.get(self._options, var_list, storage, self._overwrite_variable_with_gradient,
                        self._groups)
        super().build(var_list)
        storage.create(var_list, self.add_variable_from_reference, self.add_variable,
                       self._overwrite_variable_with_gradient)
        self._storage = storage
        self._options.fix()
        if self._options["skip_nonfinite"]:
            self._skipped_steps = _nonfinite.new_counter(self.add_variable)
        if any(storage.rounding(v) != "nearest" for v in var_list):
            self._rounding_seed = _rounding.new_seed(self.add_variable)
        if self._loaded_before_build is not None:
            loaded, self._loaded_before_build = self._loaded_before_build, None
            self._assign_loaded(loaded)

    def _plan_now(self):  # (fast path or None, routes) for the current options
        return self._plans.get(self._options, self._trainable_variables, self._storage,
                               self._overwrite_variable_with_gradient, self._groups)

    def update_plan(self):
        """{variable path: `keras_adam._plan.Route`}: each variable's update method and why
        (`print()` it). A ValueError before `build`, or if a `fused=True` cannot hold."""
        self._index(None, "update_plan()")
        _, routes = self._plan_now()
        return _plan.Plan(zip((v.path for v in self._trainable_variables), routes))

    def slots(self, variable):
        """A model variable's (m, v, v_max) Keras variables (v_max None without amsgrad)."""
        index = self._index(variable, "slots()")
        return self._storage.slots(index)

    def state_variables(self, variable):
        """{role: variable}: "m", "v", "v_max", "m_scale"..., "compensation" where they exist."""
        index = self._index(variable, "state_variables()")
        return self._storage.state_variables(index)

    def moments(self, variable):
        """m, v (and v_max, else None) of a model variable in the update's compute dtype,
        whatever the storage: 8-bit codes decoded as the next step reads them."""
        index = self._index(variable, "moments()")
        hyper = self._groups[index].hyper(self._options.hyper())
        return self._storage.read(index, bound=_rule.moment_bound(
            hyper.beta_1, hyper.beta_2, self.iterations))

    def _index(self, variable, what):
        """`variable`'s position (None for None), once the optimizer is built."""
        if self._storage is None:
            raise ValueError(f"{type(self).__name__}.{what} needs a built optimizer: call "
                             "`optimizer.build(model.trainable_variables)` first (or train "
                             "one step).")
        return None if variable is None else self._get_variable_index(variable)

    @property
    def skipped_steps(self):
        """The (saved) count of steps skipped for NaN/Inf gradients, or None."""
        return self._skipped_steps

    def apply(self, grads, trainable_variables=None):
        """As `keras.optimizers.Optimizer.apply`; with `skip_nonfinite`, only for finite grads."""
        # NumPy arrays become tensors, as clipping and the torch kernel need. Sparse
        # rows are summed before Keras clips: clipping sees the dense gradient.
        grads = _sparse.deduplicate_all(
            [ops.convert_to_tensor(g) if isinstance(g, np.ndarray) else g for g in grads])
        if not self._options["skip_nonfinite"]:
            return self._apply_now(grads, trainable_variables)
        variables = trainable_variables
        variables = self._trainable_variables if variables is None else variables
        if not self.built:  # before the cond: no variable may be created in a branch
            with keras.name_scope(self.name, caller=self):
                self.build(variables)
        _nonfinite.apply_if_finite(grads, variables, self._apply_now,
                                   lambda: self._skipped_steps.assign_add(1))

    def _apply_now(self, grads, trainable_variables=None):
        with self._per_step:  # Keras's `apply`, with per-step values cached
            return super().apply(grads, trainable_variables)

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        """As Keras's (JAX's trainer); with `skip_nonfinite`, a step with NaN or Inf
        gradients returns every value unchanged but `skipped_steps`."""
        if not self._options["skip_nonfinite"]:
            return super().stateless_apply(optimizer_variables, grads, trainable_variables)
        self._index(None, "stateless_apply()")
        return _nonfinite.stateless_apply_if_finite(
            grads, (self._trainable_variables, trainable_variables),
            (self.variables, optimizer_variables),
            lambda: self._apply_now(grads), lambda: self._skipped_steps.assign_add(1))

    def _apply_weight_decay(self, variables):
        """A private seam of Keras's BaseOptimizer: each variable decays with its update
        instead (`_update`); tests/test_parity_builtin.py's AdamW rows check it."""

    def _use_weight_decay(self, variable):
        # A private seam of keras' BaseOptimizer, asked before decaying a variable (on
        # TensorFlow the tf.Variable inside a Keras variable: ask with the latter).
        try:
            index = self._get_variable_index(variable)
        except (KeyError, AttributeError):
            return self.weight_decay is not None and super()._use_weight_decay(variable)
        return self._decay_rate(index) is not None

    def _decay_rate(self, index):
        # Its group's rate, else the optimizer's; None where an exclusion says so.
        rate = self._groups[index].get("weight_decay", self.weight_decay)
        if rate is None or self._decay_exclusions.excludes(index) or \
                not super()._use_weight_decay(self._trainable_variables[index]):
            return None
        return rate

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """As Keras's, and kept in `get_config()` (`keras_adam._decay`). Call it before `build`."""
        super().exclude_from_weight_decay(var_list=var_list, var_names=var_names)
        self._decay_exclusions = _decay.Exclusions(var_names or [], recorded=True)

    def save_own_variables(self, store):
        """Every optimizer variable by position, as Keras stores them, plus their roles."""
        _saving.save(store, self.variables, self._roles())

    def load_own_variables(self, store):
        """Loads what `save_own_variables` (or an earlier version, or the built-in) saved;
        refuses state that does not match, naming it (`keras_adam._saving`)."""
        loaded = _saving.read(store, self.name)
        if self.built:
            return self._assign_loaded(loaded)
        self._loaded_before_build = loaded  # checked and applied by `build`

    def _assign_loaded(self, loaded):
        _saving.assign(loaded, self.variables, self._roles(), self.name,
                       self._options["moment_dtype"])

    def _roles(self):  # each of `self.variables`'s role in saved files
        return _saving.roles(self.variables, _named_variables(self))

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        # A private seam of keras' BaseOptimizer, touched here only. On torch, one
        # multi-tensor kernel updates every variable planned for it (decay too);
        # the rest are updated one by one (on TensorFlow by Keras's own,
        # tf.distribute-aware loop), small ones' whole steps together.
        fast, hyper, indices, methods = self._methods_now(grads, trainable_variables)
        if fast is not None and not fast.per_variable and fast.name in methods:
            items, settings, step = [], [], self._step(learning_rate)
            for g, v, i in zip(grads, trainable_variables, indices):
                items.append((g, v, self._storage.slots(i)))
                settings.append((*self._groups[i].settings(hyper, step), self._decay_rate(i)))
            rest = backends.apply_together(fast, items, methods, settings)
            if not rest:
                return
            grads, trainable_variables = map(list, zip(*rest))
            fast, hyper, indices, methods = self._methods_now(grads, trainable_variables)
        with self._whole.together():
            if not backends.plain_update_loop() or type(self).update_step is not Adam.update_step:
                return super()._backend_update_step(grads, trainable_variables, learning_rate)
            # Keras's own loop, without asking each variable's method again
            # (some microseconds a variable: a model of many small variables
            # pays them at every step). Where a subclass defines its own
            # `update_step`, Keras's loop calls it.
            step = self._step(learning_rate)
            items = list(zip(grads, trainable_variables, indices, methods))
            # The whole steps that the last step ran as some calls of C loops run
            # so again, without their per-variable routing (`Whole.again`).
            left = self._whole.again(
                self._storage, [(i, v, _sparse.densify(g)) for g, v, i, method in items
                                if method == _plan.WHOLE],
                lambda i: self._whole_facts(i, hyper, step, numbers=True), self._decay_rate,
                self._groups.__getitem__)
            for g, v, i, method in items:
                if i in left or method != _plan.WHOLE:
                    self._update(g, v, i, method, fast, hyper, step)

    def _methods_now(self, grads, variables):
        """(fast path, Hyper, each variable's index and update method this step)."""
        (fast, routes), hyper = self._plan_now(), self._options.hyper()
        indices = [self._get_variable_index(v) for v in variables]
        methods = _plan.methods_now([routes[i] for i in indices],
                                    [_sparse.is_sparse(g) for g in grads], fast, hyper)
        return fast, hyper, indices, methods

    def _step(self, learning_rate):
        """This step's `Step` (t, lr and its scalars), once per apply and graph."""
        return self._per_step.get(
            ("step", backends.trace_key()), lambda: Step(self.iterations, learning_rate))

    def _facts(self, index, hyper, step, numbers=False):
        """Model variable `index`'s group's (Hyper, Step) at `step`, its compute dtype,
        its rounding's (seed, t) or None, this step's Scalars and moment bound
        K (or None), how its 16-bit moments are written, and its decay rate
        (or None).

        With `numbers`, for a C loop: t and the Scalars' fields as numbers
        where the backend forms them so (`Step.number`,
        `Step.scalar_numbers`), else as tensors."""
        hyper, step = self._groups[index].settings(hyper, step)
        storage = self._storage
        _, rounding, dtype, _ = storage.step_dtypes(index)  # dtype: the portable path's
        scalars = step.scalar_numbers(hyper, dtype) if numbers else None
        if scalars is None:
            scalars, t = step.scalars(hyper, dtype), step.t
        else:  # (both numbers, or neither: the backend reads t as one for the fields)
            t = step.number()
        noise = None if rounding == "nearest" else (self._rounding_seed, t)
        bound = step.moment_bound(hyper) if storage.needs_bound else None
        return (hyper, step, dtype, noise, scalars, bound,
                storage.moment_noise(index, noise, t), self._decay_rate(index))

    def _whole_facts(self, index, hyper, step, numbers=False):
        """What `_whole.apply` takes for model variable `index` besides its tensors:
        the rule's (Hyper, Scalars) and (moment bound, moments' noise, decay
        rate in the step); and the decoupled decay before the step, (rate, lr),
        none where the rate is None or 0, or None. A variable written by a
        rounding decays in its step, from the step's theta; the others before
        it, computed as Keras's own. `numbers`: as `_facts`."""
        hyper, step, _, noise, scalars, bound, moment_noise, rate = self._facts(
            index, hyper, step, numbers)
        inside = rate if noise is not None else None
        before = (rate, step.lr) if noise is None else None
        return (hyper, scalars), (bound, moment_noise, inside or None), before

    def update_step(self, gradient, variable, learning_rate):
        """Applies one Adam step to `variable` by the method its plan names (`update_plan`)."""
        fast, hyper, (index,), (method,) = self._methods_now([gradient], [variable])
        return self._update(gradient, variable, index, method, fast, hyper,
                            self._step(learning_rate))

    def _update(self, gradient, variable, index, method, fast, hyper, step):
        # `update_step` of model variable `index` by `method` this step.
        storage, rows = self._storage, None
        if method == _plan.WHOLE:  # as one compiled function (`keras_adam._whole`)
            rule, state, before = self._whole_facts(index, hyper, step)
            if before and before[0]:
                backends.decay([variable], *before)
            return self._whole.apply(storage, index, variable, _sparse.densify(gradient), rule,
                                     state, self.assign)
        hyper, step, dtype, noise, scalars, bound, moment_noise, rate = self._facts(
            index, hyper, step)
        if method == _plan.LAZY:  # only the rows present change (`keras_adam._sparse`)
            rows, gradient = _sparse.rows_and_values(gradient)
        else:
            gradient = _sparse.densify(gradient)
            if noise is None and rate:  # decoupled decay before the step, as Keras's own
                backends.decay([variable], rate, step.lr)
            if fast is not None and method == fast.name and fast.per_variable:
                return fast.apply([(gradient, variable, storage.slots(index))], hyper, step)
        # Lazy rows and 16-bit variables written by a rounding decay here, from
        # the theta of the step (the others have decayed already).
        rate = rate if rows is not None or noise is not None else None
        decay = (rate, scalars.lr) if rate else None
        m, v, v_max = storage.read(index, rows, bound)
        m, v, v_max, delta = _rule.rule(ops.cast(gradient, dtype), m, v, v_max, scalars, hyper)
        storage.write(index, m, v, v_max, rows, moment_noise)
        storage.subtract(index, variable, delta, self.assign_sub, rows, decay, noise)

    def get_config(self):
        config = super().get_config()
        config.update(self._options.config())
        # Keras keeps the variables excluded by `var_list` by `_var_key`.
        keys = [self._var_key(v) for v in self._trainable_variables] if self.built else None
        config["exclude_from_weight_decay"] = self._decay_exclusions.config(
            keys, getattr(self, "_exclude_from_weight_decay", set()))
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """From `get_config()`'s output, checked first: an unknown field, a wrong type
        or value raises the constructor's error naming it. `config` is not modified."""
        serialization.check_config(cls, config)
        return super().from_config(dict(config), custom_objects=custom_objects)


def _named_variables(optimizer):
    """(variable, role, model variable path) for every optimizer variable whose role
    is known: Keras's own (a private seam: Keras names no public accessor for the
    learning-rate variable, EMA averages or accumulators; tests/test_persistence.py
    fails if they move) and the moments' (`keras_adam._state`)."""
    # `iterations` is a tensor (the optimizer steps) under gradient
    # accumulation; the counter variable itself is `_iterations`.
    named = [(optimizer._iterations, "iteration", "")]
    for role, variable in [("learning_rate", getattr(optimizer, "_learning_rate", None)),
                           ("skipped_steps", optimizer.skipped_steps),
                           ("rounding_seed", optimizer._rounding_seed)]:
        if isinstance(variable, keras.Variable):
            named.append((variable, role, ""))
    model_variables = optimizer._trainable_variables
    for kind, variables in [
            ("average", getattr(optimizer, "_model_variables_moving_average", None)),
            ("accumulator", getattr(optimizer, "_accumulated_gradients", None))]:
        for i, variable in enumerate(variables or []):
            if variable is not None:
                named.append((variable, f"{kind}[{i}]", model_variables[i].path))
    if optimizer._storage is not None:
        for i, model_variable in enumerate(model_variables):
            for role, variable in optimizer.state_variables(model_variable).items():
                named.append((variable, f"{role}[{i}]", model_variable.path))
    return named


@serialization.register
class AdamW(Adam):
    """Adam with decoupled weight decay on by default (Loshchilov & Hutter, 2019).

    Exactly `keras_adam.Adam` with `weight_decay=0.004` (and Keras's automatic
    name `"adam_w"`) by
    default, as `keras.optimizers.AdamW`. Before each Adam step,

        theta <- theta - lr * weight_decay * theta

    Args:
        learning_rate: as for `Adam`. Defaults to `0.001`.
        weight_decay: Float >= 0. Defaults to `0.004`.
        name: Defaults to `None`: `"adam_w"`, `"adam_w_1"`, ...
        **kwargs: every other argument of `keras_adam.Adam`.
    """

    def __init__(self, learning_rate=0.001, weight_decay=0.004, name=None, **kwargs):
        if weight_decay is None:
            raise ValueError(
                "`weight_decay` must be a float >= 0 for AdamW; use keras_adam.Adam "
                "for no weight decay. Received: weight_decay=None"
            )
        super().__init__(
            learning_rate=learning_rate, weight_decay=weight_decay, name=name, **kwargs
        )


@serialization.register
class LazyAdam(Adam):
    """Adam with lazy sparse updates by default: for huge embedding tables.

    Exactly `keras_adam.Adam` with `sparse_updates="lazy"` (and Keras's
    automatic name `"lazy_adam"`) by default. For a `tf.IndexedSlices`
    gradient, only the rows present are updated (theta, m, v, v_max; global t), and all other rows
    stay bit for bit. Dense gradients get the standard Adam update. A
    replacement for `tfa.optimizers.LazyAdam`, which does not work with Keras 3.

    Args:
        learning_rate: as for `Adam`. Defaults to `0.001`.
        sparse_updates: Defaults to `"lazy"`.
        name: Defaults to `None`: `"lazy_adam"`, `"lazy_adam_1"`, ...
        **kwargs: every other argument of `keras_adam.Adam`.
    """

    def __init__(self, learning_rate=0.001, sparse_updates="lazy", name=None, **kwargs):
        super().__init__(
            learning_rate=learning_rate, sparse_updates=sparse_updates, name=name, **kwargs
        )
