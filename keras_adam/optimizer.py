"""`keras_adam.Adam`, `AdamW` and `LazyAdam`: Adam as a Keras 3 optimizer.

This module holds Keras's hooks and the public API; every feature lives in
a module of its own, which receives data and never this optimizer (the
README's "How the code is laid out" is the map). The rule is
`keras_adam._rule.rule`; `Adam.update_step` applies it with `keras.ops` on
any backend (the portable path), and every fast path is tested equal to it.
"""


import keras
import numpy as np
from keras import ops
from keras.optimizers import Optimizer

from keras_adam import _decay
from keras_adam import _nonfinite
from keras_adam import _options
from keras_adam import _plan
from keras_adam import _quantize
from keras_adam import _rule
from keras_adam import _saving
from keras_adam import _sparse
from keras_adam import _state
from keras_adam import _validation as check
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



@serialization.register
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

    `learning_rate` is lr (alpha in the paper), `beta_1` and `beta_2` the
    decay rates, `epsilon` the paper's epsilon-hat ("hat", the default, as
    `keras.optimizers.Adam` and TensorFlow's kernels) or epsilon ("paper",
    Algorithm 1, as `torch.optim.Adam` and `optax.adam`); the two agree when
    epsilon = 0. Decoupled weight decay (theta <- theta - lr * weight_decay *
    theta, before the step), clipping, EMA, loss scaling and gradient
    accumulation are `keras.optimizers.Optimizer`'s and behave as for
    `keras.optimizers.Adam`. The README's option table and sections give
    each option in full.

    Args:
        learning_rate: A float >= 0, a `LearningRateSchedule` or a callable
            returning the value. Defaults to `0.001`.
        beta_1: Float in [0, 1). Decay rate of m. Defaults to `0.9`.
        beta_2: Float in [0, 1). Decay rate of v. Defaults to `0.999`.
        epsilon: Float >= 0, placed by `epsilon_placement`. Defaults to `1e-7`.
        amsgrad: Bool. Use max(v_max, v) for v (Reddi et al., 2018). Defaults to `False`.
        nesterov: Bool. The look-ahead m_hat (Dozat, 2016). Defaults to `False`.
        bias_correction: Bool. Divide by c1 and c2. Defaults to `True`.
        epsilon_placement: `"hat"` or `"paper"`. Defaults to `"hat"`.
        sparse_updates: `"exact"` (the dense update) or `"lazy"` (only the
            rows a tf.IndexedSlices gradient holds change). Defaults to `"exact"`.
        moment_dtype: `None` (the variable's dtype), `"float32"`,
            `"bfloat16"`, `"float16"` or `"8bit"` (blockwise codes, Dettmers
            et al., 2022): how m, v and v_max are stored. Defaults to `None`.
        fused: `None` (a backend kernel wherever it computes this rule
            exactly: TensorFlow's `ResourceApplyAdam`, torch's
            `_fused_adam_`), `True` (require it) or `False`. Defaults to `None`.
        skip_nonfinite: Bool. A step with NaN or Inf gradients changes
            nothing but `skipped_steps`. Defaults to `False`.
        shard_state: Bool. On JAX under a `keras.distribution`, split m, v,
            v_max across the data-parallel devices. Defaults to `False`.
        moment_block_size: Int >= 1. With `"8bit"`: elements per block.
            Defaults to `256`.
        min_8bit_size: Int >= 0. With `"8bit"`: smaller variables keep
            float32 moments. Defaults to `4096`.
        exclude_from_weight_decay: `None` or {"var_names": [...],
            "var_indices": [...]}, as `get_config()` records the exclusions
            of `exclude_from_weight_decay()`. Defaults to `None`.
        weight_rounding: `None`, `"nearest"`, `"stochastic"` or
            `"compensated"`: how a bfloat16/float16 variable's new value,
            computed in float32, is written (`keras_adam._rounding`; Zamirai
            et al., 2020). `None` is `"stochastic"` for them; float32 and
            float64 variables are unaffected. Defaults to `None`.
        weight_decay, clipnorm, clipvalue, global_clipnorm, use_ema,
        ema_momentum, ema_overwrite_frequency, loss_scale_factor,
        gradient_accumulation_steps, name: see `keras.optimizers.Optimizer`.

    Raises:
        ValueError, TypeError: for a value out of range or of the wrong type,
            naming the argument; for `fused=True` where no kernel computes
            the rule (at construction, or at `build` for what depends on
            the variables); for the 8-bit options without `"8bit"`.

    Example:

    >>> import keras, keras_adam
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer=keras_adam.Adam(learning_rate=1e-3), loss="mse")

    References:
        - Kingma & Ba, "Adam: A Method for Stochastic Optimization", 2014,
          arXiv:1412.6980 (Algorithm 1; epsilon-hat at the end of section 2).
        - Reddi, Kale & Kumar, "On the Convergence of Adam and Beyond", 2018.
        - Dozat, "Incorporating Nesterov Momentum into Adam", 2016.
        - Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019.
        - Dettmers et al., "8-bit Optimizers via Block-wise Quantization", 2022.
        - Zamirai et al., "Revisiting BFloat16 Training", 2020.
    """

    # keras_adam's options (`keras_adam._options.FIELDS`), validated on every assignment.
    (beta_1, beta_2, epsilon, amsgrad, nesterov, bias_correction, epsilon_placement,
     sparse_updates, moment_dtype, fused, skip_nonfinite, shard_state, moment_block_size,
     min_8bit_size, weight_rounding) = (_Option() for _ in _options.FIELDS)

    def __init__(
        self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False,
        nesterov=False, bias_correction=True, epsilon_placement="hat",
        sparse_updates="exact", moment_dtype=None, fused=None, skip_nonfinite=False,
        shard_state=False, moment_block_size=_quantize.BLOCK_SIZE,
        min_8bit_size=_state.MIN_8BIT_SIZE, weight_decay=None, clipnorm=None,
        clipvalue=None, global_clipnorm=None, use_ema=False, ema_momentum=0.99,
        ema_overwrite_frequency=None, loss_scale_factor=None,
        gradient_accumulation_steps=None, name=None, exclude_from_weight_decay=None,
        weight_rounding=None, **kwargs,
    ):
        super().__init__(
            learning_rate=check.learning_rate(learning_rate),
            weight_decay=check.non_negative("weight_decay", weight_decay, optional=True),
            clipnorm=clipnorm, clipvalue=clipvalue, global_clipnorm=global_clipnorm,
            use_ema=use_ema, ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps, name=name, **kwargs,
        )
        self._options = _options.Options(
            beta_1=beta_1, beta_2=beta_2, epsilon=epsilon, amsgrad=amsgrad,
            nesterov=nesterov, bias_correction=bias_correction,
            epsilon_placement=epsilon_placement, sparse_updates=sparse_updates,
            moment_dtype=moment_dtype, fused=fused, skip_nonfinite=skip_nonfinite,
            shard_state=shard_state, moment_block_size=moment_block_size,
            min_8bit_size=min_8bit_size, weight_rounding=weight_rounding,
        )
        self._storage = None
        self._plans = {}  # options -> (fast path, routes): see `_plan_now`
        self._skipped_steps = None
        self._rounding_seed = None
        self._loaded_before_build = None  # `_saving.read`'s result, applied at build
        self._per_step = PerStepCache()
        self._decay_exclusions = None
        if exclude_from_weight_decay is not None:
            exclusions = _decay.Exclusions.from_config(exclude_from_weight_decay)
            self.exclude_from_weight_decay(var_names=exclusions.var_names or None)
            self._decay_exclusions = exclusions

    def build(self, var_list):
        """Creates the slots m and v (and v_max with amsgrad) in the order of the file
        format (`keras_adam._state`), after planning each variable's update method,
        so that `fused=True` can refuse a variable before anything is created."""
        if self.built:
            return
        options = self._options
        storage = _state.for_options(options, self.assign)
        self._plan_now(var_list, storage)
        super().build(var_list)
        storage.create(var_list, self.add_variable_from_reference, self.add_variable,
                       self._overwrite_variable_with_gradient)
        self._storage = storage
        options.fix()
        if options["skip_nonfinite"]:
            # After the slots: the layout of optimizers without it is unchanged.
            # Assigned only in the cross-replica context under tf.distribute
            # (as LossScaleOptimizer's counters): no aggregation.
            self._skipped_steps = self.add_variable(
                shape=(), dtype="int", name="skipped_steps", aggregation="none",
            )
        if any(storage.rounding(v) != "nearest" for v in var_list):
            # The seed of the rounding's counter-based randomness
            # (`keras_adam._rounding`): drawn from NumPy's generator, which
            # `keras.utils.set_random_seed` seeds, and saved with the state.
            self._rounding_seed = self.add_variable(
                shape=(), dtype="int32", name="rounding_seed", aggregation="none")
            self._rounding_seed.assign(np.random.randint(0, 2**31 - 1))
        if self._loaded_before_build is not None:
            loaded, self._loaded_before_build = self._loaded_before_build, None
            _saving.assign(loaded, self.variables, self._roles(), self.name,
                           options["moment_dtype"])

    def _plan_now(self, var_list=None, storage=None):
        """(fast path or None, routes) for the current options, decided once per set of
        options (they may be assigned after build) and kept."""
        options = self._options
        hyper = options.hyper()
        key = (hyper, options["fused"], options["sparse_updates"])
        if key not in self._plans:
            if len(self._plans) >= 16:  # options assigned again and again: keep a few
                self._plans.clear()
            self._plans[key] = _plan.plan(
                self._trainable_variables if var_list is None else var_list, hyper,
                options["fused"], options["sparse_updates"], storage or self._storage,
                self._overwrite_variable_with_gradient)
        return self._plans[key]

    def update_plan(self):
        """Which method updates each variable, and why: {variable path: `Route`}.

        A `Route` (`keras_adam._plan.Route`) has `method`, `reason`, `sparse`,
        `portable_when` and `state`; `print(optimizer.update_plan())` shows
        one line per variable. Raises ValueError before `build`, or where an
        assigned `fused=True` cannot hold for a variable.
        """
        self._require_built("update_plan()")
        _, routes = self._plan_now()
        return _plan.Plan(zip((v.path for v in self._trainable_variables), routes))

    def slots(self, variable):
        """The (m, v, v_max) slots of a model variable; v_max is None without amsgrad.

        With 8-bit moments, quantized slots hold codes (`state_variables`
        adds their scales; `moments` decodes them).
        """
        self._require_built("slots()")
        return self._storage.slots(self._get_variable_index(variable))

    def state_variables(self, variable):
        """{role: Keras variable} for every optimizer variable holding a model
        variable's state: "m", "v", "v_max" and, with 8-bit moments, their
        scales "m_scale", "v_scale", "v_max_scale"."""
        self._require_built("state_variables()")
        return self._storage.state_variables(self._get_variable_index(variable))

    def moments(self, variable):
        """The values of m, v (and v_max) of a model variable, in the update's compute
        dtype, whatever the storage: 8-bit codes decoded as the next step reads them
        (`keras_adam._state.Blockwise8bit`). None where there is no such slot."""
        self._require_built("moments()")
        hyper = self._options.hyper()
        bound = _rule.moment_bound(hyper.beta_1, hyper.beta_2, self.iterations)
        return self._storage.read(self._get_variable_index(variable), bound=bound)

    def _require_built(self, what):
        if self._storage is None:
            raise ValueError(
                f"{type(self).__name__}.{what} needs a built optimizer: call "
                "`optimizer.build(model.trainable_variables)` first (or train one step)."
            )

    @property
    def skipped_steps(self):
        """With `skip_nonfinite=True`, the (saved) count of steps skipped for NaN or
        Inf gradients; None without it, or before `build`."""
        return self._skipped_steps

    def apply(self, grads, trainable_variables=None):
        """As `keras.optimizers.Optimizer.apply`; with `skip_nonfinite`, only for finite grads."""
        # NumPy arrays become tensors: Keras's global-norm clipping and the
        # torch kernel need them. Repeated rows of sparse gradients are summed
        # before Keras clips, so clipping sees the dense gradient's numbers.
        grads = [ops.convert_to_tensor(g) if isinstance(g, np.ndarray) else g for g in grads]
        grads = _sparse.deduplicate_all(grads)
        if not self._options["skip_nonfinite"]:
            return self._apply_now(grads, trainable_variables)
        variables = self._trainable_variables if trainable_variables is None \
            else trainable_variables
        if not self.built:
            # Before the cond: no variable may be created inside a branch.
            with keras.name_scope(self.name, caller=self):
                self.build(variables)
        _nonfinite.apply_if_finite(grads, variables, self._apply_now,
                                   lambda: self._skipped_steps.assign_add(1))

    def _apply_now(self, grads, trainable_variables=None):
        self._per_step.open()  # Keras's `apply`, with per-step values cached
        try:
            return super().apply(grads, trainable_variables)
        finally:
            self._per_step.close()

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        """As `keras.optimizers.Optimizer.stateless_apply` (JAX's trainer); with
        `skip_nonfinite`, a step with NaN or Inf gradients returns every value
        unchanged but `skipped_steps`."""
        if not self._options["skip_nonfinite"]:
            return super().stateless_apply(optimizer_variables, grads, trainable_variables)
        self._require_built("stateless_apply()")
        return _nonfinite.stateless_apply_if_finite(
            grads, (self._trainable_variables, trainable_variables),
            (self.variables, optimizer_variables),
            lambda: self._apply_now(grads), lambda: self._skipped_steps.assign_add(1))

    def _apply_weight_decay(self, variables):
        # A private seam of keras' BaseOptimizer, touched here only. Keras
        # calls it just before `_backend_update_step` with the same
        # variables; the decay runs there instead, where the gradients say
        # which variables a lazy sparse update takes (those decay their
        # touched rows only). tests/test_sparse.py fails if untouched rows
        # ever change, tests/test_keras_seams.py if the decay moves.
        pass

    def _use_weight_decay(self, variable):
        # A private seam of keras' BaseOptimizer: Keras asks it before
        # decaying a whole variable. Exclusions loaded from a config count too.
        if self.weight_decay is None:
            return False
        if self._decay_exclusions is not None and self._decay_exclusions.var_indices:
            if self._decay_exclusions.excludes(self._get_variable_index(variable)):
                return False
        # Keras's TF optimizer hands update_step the tf.Variable inside a Keras
        # variable, whose name differs: ask with the Keras variable.
        try:
            variable = self._trainable_variables[self._get_variable_index(variable)]
        except (KeyError, AttributeError):
            pass
        return super()._use_weight_decay(variable)

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """As `keras.optimizers.Optimizer.exclude_from_weight_decay`, and kept in
        `get_config()` (`keras_adam._decay`), so a reloaded optimizer decays the
        same variables. Call it before the optimizer is built."""
        super().exclude_from_weight_decay(var_list=var_list, var_names=var_names)
        self._decay_exclusions = _decay.Exclusions(var_names or [])

    def save_own_variables(self, store):
        """Every optimizer variable by position, as Keras stores them, plus their roles."""
        _saving.save(store, self.variables, self._roles())

    def load_own_variables(self, store):
        """Loads the state saved by `save_own_variables` (or by an earlier version, or
        by `keras.optimizers.Adam`); refuses, naming the slots, state that does not
        match instead of skipping it (see `keras_adam._saving`)."""
        loaded = _saving.read(store, self.name)
        if not self.built:
            self._loaded_before_build = loaded  # checked and applied by `build`
            return
        _saving.assign(loaded, self.variables, self._roles(), self.name,
                       self._options["moment_dtype"])

    def _roles(self):
        """Each of `self.variables`'s role in saved files (`keras_adam._saving`)."""
        return _saving.roles(self.variables, _named_variables(self))

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        # A private seam of keras' BaseOptimizer, touched here only. First
        # Keras's own decoupled weight decay (see `_apply_weight_decay`), for
        # every variable but those a lazy sparse update takes. Then, on torch,
        # one multi-tensor kernel updates every variable planned for it at
        # once, which a per-variable update_step cannot do. Elsewhere Keras's
        # own method (tf.distribute-aware on TensorFlow) runs unchanged.
        # tests/test_backend_torch.py checks the kernel runs.
        fast, hyper, indices, methods = self._methods_now(grads, trainable_variables)
        # Variables written with stochastic or compensated rounding decay in
        # float32 within their step, as lazy ones do on their rows.
        if self.weight_decay is not None:
            decayed = [v for v, method in zip(trainable_variables, methods)
                       if method != _plan.LAZY and self._storage.rounding(v) == "nearest"
                       and self._use_weight_decay(v)]
            if decayed:  # torch's foreach decay refuses an empty list
                super()._apply_weight_decay(decayed)
        if fast is not None and not fast.per_variable:
            mine, rest = [], []
            for g, v, i, method in zip(grads, trainable_variables, indices, methods):
                if method == fast.name:
                    mine.append((g, v, self._storage.slots(i)))
                else:
                    rest.append((g, v))
            rest += [(g, v) for g, v, _ in
                     fast.apply(mine, hyper, self._step(learning_rate))]
            if not rest:
                return
            grads, trainable_variables = map(list, zip(*rest))
        super()._backend_update_step(grads, trainable_variables, learning_rate)

    def _methods_now(self, grads, variables):
        """(fast path, Hyper, each variable's index and update method this step)."""
        fast, routes = self._plan_now()
        hyper = self._options.hyper()
        indices = [self._get_variable_index(v) for v in variables]
        methods = _plan.methods_now([routes[i] for i in indices],
                                    [_sparse.is_sparse(g) for g in grads], fast, hyper)
        return fast, hyper, indices, methods

    def _step(self, learning_rate):
        """This step's `Step` (t, lr and its scalars), once per apply and graph."""
        return self._per_step.get(
            ("step", backends.trace_key()), lambda: Step(self.iterations, learning_rate))

    def update_step(self, gradient, variable, learning_rate):
        """Applies one Adam step to `variable` by the method its plan names (`update_plan`)."""
        fast, hyper, (index,), (method,) = self._methods_now([gradient], [variable])
        step = self._step(learning_rate)
        dtype = self._storage.compute_dtype(variable)
        bound = step.moment_bound(hyper) if self._storage.needs_bound else None
        noise = None
        if self._storage.rounding(variable) != "nearest":
            noise = (self._rounding_seed, step.t)
        decay = self.weight_decay if self._use_weight_decay(variable) else None
        if method == _plan.LAZY:
            return _sparse.lazy_update(gradient, variable, (self._storage, index, bound),
                                       hyper, step.scalars(hyper, dtype), decay,
                                       self.assign_sub, noise)
        gradient = _sparse.densify(gradient)
        if fast is not None and method == fast.name and fast.per_variable:
            return fast.apply([(gradient, variable, self._storage.slots(index))], hyper, step)
        # The portable path: the rule of the class docstring in `keras.ops`, on
        # any backend; every fast path is tested equal to it.
        m, v, v_max = self._storage.read(index, bound=bound)
        scalars = step.scalars(hyper, dtype)
        m, v, v_max, delta = _rule.rule(ops.cast(gradient, dtype), m, v, v_max, scalars,
                                        hyper)
        self._storage.write(index, m, v, v_max, noise=noise)
        if noise is None:
            return self.assign_sub(variable, ops.cast(delta, variable.dtype))
        # A 16-bit variable: the new value in float32 (decoupled decay first, as
        # Keras applies it), then written by its rounding.
        theta = self._storage.read_variable(index, variable)
        if decay is not None:
            delta += theta * ops.cast(decay, dtype) * scalars.lr
        self._storage.write_variable(index, variable, theta - delta, noise)

    def get_config(self):
        config = super().get_config()
        config.update(self._options.config())
        exclusions = None
        if self._decay_exclusions is not None:
            # Keras keeps the variables excluded by `var_list` by `_var_key`.
            keys = getattr(self, "_exclude_from_weight_decay", set())
            positions = None
            if self.built:
                positions = [i for i, v in enumerate(self._trainable_variables)
                             if self._var_key(v) in keys]
            exclusions = self._decay_exclusions.config(positions, pending=bool(keys))
        config["exclude_from_weight_decay"] = exclusions
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """Rebuilds the optimizer from `get_config()` output, after checking it: an
        unknown field, a wrong type or value raises the constructor's error naming
        it. The caller's dict is not modified."""
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
