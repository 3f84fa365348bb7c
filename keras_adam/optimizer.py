"""`keras_adam.Adam`, `AdamW` and `LazyAdam`: Adam as a Keras 3 optimizer.

The rule is `keras_adam._rule.rule`; `Adam._portable_step` applies it with
`keras.ops` on any backend, and is the specification that every fast path is
tested against. This module holds the optimizer's hooks into Keras; each
concern has its own module:

    _rule.py        the update rule and its per-step scalars
    _state.py       how m, v, v_max are stored, read and written
    _plan.py        which path updates each variable, decided at build
    _sparse.py      row-sparse gradients (exact and lazy modes)
    backends/       the fast paths (TensorFlow fused kernels, torch multi-tensor)
"""

import warnings

import keras
import numpy as np
from keras import ops
from keras.optimizers import Optimizer

from keras_adam import _nonfinite
from keras_adam import _plan
from keras_adam import _quantize
from keras_adam import _rule
from keras_adam import _saving
from keras_adam import _sharding
from keras_adam import _sparse
from keras_adam import _state
from keras_adam import _validation as check
from keras_adam import backends
from keras_adam import serialization
from keras_adam._per_step import PerStepCache
from keras_adam._per_step import Step


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

    `learning_rate` is lr (alpha in the paper), `beta_1` and `beta_2` are the
    decay rates beta_1, beta_2, and `epsilon` is the paper's epsilon-hat or
    epsilon according to `epsilon_placement`. The slots m, v (and v_max) are
    created by `build`, one of each per model variable, named
    `<variable path>_m`, `<variable path>_v` and `<variable path>_v_max`.

    Note (where epsilon goes):
        "hat" (the default) divides by (sqrt(v) + epsilon) / sqrt(c2): the
        epsilon-hat of section 2 of the paper. It matches
        `keras.optimizers.Adam` and TensorFlow's `ResourceApplyAdam` kernels.
        "paper" divides by sqrt(v / c2) + epsilon: Algorithm 1 of the paper,
        and what `torch.optim.Adam` and `optax.adam` compute. The two agree
        when epsilon = 0. Porting a PyTorch recipe? Use "paper" and
        epsilon=1e-8.

    With `nesterov=True` the first-moment estimate looks one step ahead,
    as in Dozat's NAdam without its momentum schedule (the variant optax's
    `adam(nesterov=True)` computes). Decoupled weight decay
    (theta <- theta - lr * weight_decay * theta, applied before the step),
    gradient clipping, EMA of the weights, loss scaling and gradient
    accumulation are inherited from `keras.optimizers.Optimizer` and behave
    exactly as they do for `keras.optimizers.Adam`.

    Args:
        learning_rate: A float >= 0, a
            `keras.optimizers.schedules.LearningRateSchedule`, or a callable
            taking no arguments that returns the value to use. The step size
            lr. Defaults to `0.001`.
        beta_1: Float in [0, 1). Decay rate of the first-moment estimate m.
            Defaults to `0.9`.
        beta_2: Float in [0, 1). Decay rate of the second-moment estimate v.
            Defaults to `0.999`.
        epsilon: Float >= 0. The small constant added to the denominator;
            where it is added is set by `epsilon_placement`. Defaults to
            `1e-7` (Keras's default; the paper and PyTorch use `1e-8`).
        amsgrad: Bool. Use the running maximum of v in place of v (Reddi et
            al., 2018). Adds one slot, v_max, per variable. Defaults to `False`.
        nesterov: Bool. Use the Nesterov look-ahead estimate of m_hat (Dozat,
            2016). Defaults to `False`.
        bias_correction: Bool. Divide by c1 = 1 - beta_1^t and
            c2 = 1 - beta_2^t (section 3 of the paper). Without it, early
            steps are smaller by about c1 / sqrt(c2). Defaults to `True`.
        epsilon_placement: `"hat"` or `"paper"`; see the note above. Defaults
            to `"hat"`.
        sparse_updates: `"exact"` or `"lazy"`: what a row-sparse gradient
            (`tf.IndexedSlices`, e.g. from `keras.layers.Embedding` on
            TensorFlow) does. In both, repeated indices are summed first, so
            clipping sees the dense gradient's numbers. `"exact"`: the update
            of the dense equivalent; every row's moments decay and every row
            with non-zero m moves. `"lazy"`: only the rows present change
            (their theta, m, v, v_max, with the global t for bias correction,
            and weight decay on those rows only); all other rows stay bit for
            bit. Dense gradients, and every gradient on JAX and torch (which
            have no IndexedSlices), always get the standard update. Defaults
            to `"exact"`.
        moment_dtype: `None`, `"float32"`, `"bfloat16"`, `"float16"` or
            `"8bit"`. How m, v (and v_max) are stored. `None` keeps each in
            its variable's dtype, as `keras.optimizers.Adam` does. Otherwise
            the update is computed in float32 (float64 for float64
            variables) and the moments are converted when stored:
            `"float32"` for bfloat16/float16 variables (accuracy),
            `"bfloat16"` for float32 variables (half the optimizer's memory),
            `"8bit"` for a quarter of it: blockwise 8-bit codes with one
            float32 scale per block (Dettmers et al., 2022), about 2 bytes
            of state per parameter (see `keras_adam._state.Blockwise8bit`
            for the scheme). Defaults to `None`.
        fused: `None`, `True` or `False`. Whether to update each variable with
            TensorFlow's fused kernel (`ResourceApplyAdam`), one pass over
            memory instead of about ten. `None` uses it wherever it computes
            this rule exactly (TensorFlow backend, float32/float64 variables,
            dense gradients, no Nesterov unless bias_correction=False, and not
            amsgrad inside XLA, which has no AMSGrad kernel) and the portable
            `keras.ops` path elsewhere. `True` requires it: ValueError at
            construction or build where it cannot apply (under XLA, amsgrad
            still falls back, since XLA fuses the portable ops itself).
            `False` always uses the portable path. Defaults to `None`.
            `update_plan()` tells which path each variable takes, and why.
        skip_nonfinite: Bool. If True, a step whose gradients (any of them)
            hold NaN or Inf changes nothing (no variable, m, v, v_max, nor
            the step t) but the counter `skipped_steps`, so the next finite
            step is exactly the one that would have come. Inside a
            `LossScaleOptimizer`, that wrapper skips such steps first (and
            lowers its scale); this counter then stays 0. Defaults to `False`.
        shard_state: Bool. On JAX under a `keras.distribution` (DataParallel,
            or ModelParallel on its data axis), store m, v and v_max split
            across the N data-parallel devices (ZeRO stage 1): each device
            keeps 1/N of the state, the numbers are unchanged. Variables with
            fewer than 4096 elements, or no dimension divisible by N, keep
            their variable's layout; `update_plan()` says where each
            variable's state lives. With no distribution (one device) it
            changes nothing; on TensorFlow and torch it changes nothing and
            warns at `build`, since their replicas mirror all state.
            Defaults to `False`.
        moment_block_size: Int >= 1. With `moment_dtype="8bit"`: the
            elements per block, each block with its own scale. Blocks run
            along a variable's rows (never across two), so lazy sparse updates
            leave other rows' codes untouched. Defaults to `256`.
        min_8bit_size: Int >= 0. With `moment_dtype="8bit"`: variables with
            fewer elements keep float32 moments (biases, norms: little
            memory, and where precision matters most). Defaults to `4096`.
        weight_decay, clipnorm, clipvalue, global_clipnorm, use_ema,
        ema_momentum, ema_overwrite_frequency, loss_scale_factor,
        gradient_accumulation_steps, name: as for
            `keras.optimizers.Optimizer`. `name=None` (the default) names
            the optimizer as Keras does, uniquely: `"adam"`, `"adam_1"`, ...
        exclude_from_weight_decay: `None` or a dict with lists `"var_names"`
            (name patterns, as for `exclude_from_weight_decay()`) and
            `"var_indices"` (positions among the variables the optimizer is
            built with). `get_config()` records the exclusions set by
            `exclude_from_weight_decay()` here, so they survive saving.
            Defaults to `None`.

    Raises:
        ValueError: if learning_rate is negative or NaN, beta_1 or beta_2 is
            outside [0, 1), epsilon or weight_decay is negative,
            epsilon_placement, sparse_updates or moment_dtype is unknown,
            fused=True where no fused kernel computes the rule (at `build`
            for what depends on the variables) or with moment_dtype="8bit",
            or moment_block_size / min_8bit_size is not an int in range or is
            set without moment_dtype="8bit".
        TypeError: if learning_rate is not a number, schedule or callable, or
            amsgrad, nesterov, bias_correction or fused is not a bool.

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
    """

    # Each option is validated on every assignment, as in the constructor,
    # and the update plan follows it (`_option_changed`).
    beta_1 = check.Option(check.unit_interval)
    beta_2 = check.Option(check.unit_interval)
    epsilon = check.Option(check.non_negative)
    amsgrad = check.Option(check.boolean)
    nesterov = check.Option(check.boolean)
    bias_correction = check.Option(check.boolean)
    epsilon_placement = check.Option(check.one_of(_rule.EPSILON_PLACEMENTS))
    sparse_updates = check.Option(check.one_of(_sparse.SPARSE_UPDATES))
    moment_dtype = check.Option(check.one_of(_state.MOMENT_DTYPES, optional=True))
    fused = check.Option(check.optional_boolean)
    skip_nonfinite = check.Option(check.boolean)
    shard_state = check.Option(check.boolean)
    moment_block_size = check.Option(check.integer(minimum=1))
    min_8bit_size = check.Option(check.integer(minimum=0))

    def __init__(
        self,
        learning_rate=0.001,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-7,
        amsgrad=False,
        nesterov=False,
        bias_correction=True,
        epsilon_placement="hat",
        sparse_updates="exact",
        moment_dtype=None,
        fused=None,
        skip_nonfinite=False,
        shard_state=False,
        moment_block_size=_quantize.BLOCK_SIZE,
        min_8bit_size=_state.MIN_8BIT_SIZE,
        weight_decay=None,
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        loss_scale_factor=None,
        gradient_accumulation_steps=None,
        name=None,
        exclude_from_weight_decay=None,
        **kwargs,
    ):
        super().__init__(
            learning_rate=check.learning_rate(learning_rate),
            weight_decay=check.non_negative("weight_decay", weight_decay, optional=True),
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            name=name,
            **kwargs,
        )
        self._moments = None
        self._routes = None
        self._options_ready = False
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.amsgrad = amsgrad
        self.nesterov = nesterov
        self.bias_correction = bias_correction
        self.epsilon_placement = epsilon_placement
        self.sparse_updates = sparse_updates
        self.moment_dtype = moment_dtype
        self.fused = fused
        self.skip_nonfinite = skip_nonfinite
        self.shard_state = shard_state
        self.moment_block_size = moment_block_size
        self.min_8bit_size = min_8bit_size
        self._check_8bit_options()
        self._skipped_steps = None
        self._sparse = _sparse.SparseUpdates(self.sparse_updates)
        self._per_step = PerStepCache()
        self._decay_exclusions = None
        if exclude_from_weight_decay is not None:
            exclusions = check.decay_exclusions(exclude_from_weight_decay)
            self.exclude_from_weight_decay(var_names=exclusions["var_names"] or None)
            self._decay_exclusions = exclusions
        # Decided once: the backend's fast path for these options, or why none
        # applies (raises here if fused=True cannot hold). See `update_plan`.
        self._fast, self._fast_reason = backends.fast_path(self._hyper(), self.fused)
        self._options_ready = True

    def _option_changed(self, name):
        """Re-decides what follows from the options after one of them is assigned.

        Raises:
            ValueError: for `amsgrad`, `moment_dtype`, `skip_nonfinite` or
                `shard_state` once built (their variables exist), or where
                `fused=True` can no longer hold. The assignment is then undone
                (`_validation.Option`).
        """
        if not self.__dict__.get("_options_ready"):
            return
        if self._moments is not None and name in (
                "amsgrad", "moment_dtype", "skip_nonfinite", "shard_state",
                "moment_block_size", "min_8bit_size"):
            raise ValueError(
                f"`{name}` cannot change once the optimizer is built: its variables "
                "(m, v, v_max, skipped_steps) already exist in their layout and dtype. "
                "Create a new optimizer instead."
            )
        self._check_8bit_options()
        fast, reason = backends.fast_path(self._hyper(), self.fused)
        routes = None
        if self._moments is not None:
            routes = self._make_routes(self._trainable_variables, fast, reason, self._moments)
        self._fast, self._fast_reason = fast, reason
        if routes is not None:
            self._routes = routes
        self._sparse.mode = self.sparse_updates

    def _check_8bit_options(self):
        """Refuses combinations with `moment_dtype="8bit"` that cannot mean what they say."""
        eight_bit = self.moment_dtype == _state.EIGHT_BIT
        if eight_bit and self.fused:
            raise ValueError(
                "`fused=True` and `moment_dtype='8bit'` cannot be combined: the fused "
                "kernels update float m and v in place, and 8-bit moments are stored as "
                "codes with a scale per block. Use fused=None (variables that keep "
                "float32 moments still take the kernel) or another moment_dtype."
            )
        if not eight_bit and (self.moment_block_size != _quantize.BLOCK_SIZE
                              or self.min_8bit_size != _state.MIN_8BIT_SIZE):
            raise ValueError(
                "`moment_block_size` and `min_8bit_size` apply only with "
                f"moment_dtype='8bit'. Received: moment_dtype={self.moment_dtype!r}, "
                f"moment_block_size={self.moment_block_size}, "
                f"min_8bit_size={self.min_8bit_size}"
            )

    def _hyper(self):
        """The rule's hyperparameters as a frozen record (what the update paths receive)."""
        return _rule.Hyper(
            beta_1=self.beta_1,
            beta_2=self.beta_2,
            epsilon=self.epsilon,
            amsgrad=self.amsgrad,
            nesterov=self.nesterov,
            bias_correction=self.bias_correction,
            epsilon_placement=self.epsilon_placement,
        )

    def build(self, var_list):
        """Creates the slots m and v (and v_max with amsgrad) and plans each variable's path.

        The slots' order is part of the `.keras` file format (see
        `keras_adam._state`). The plan (`update_plan()`) is decided here,
        before anything is created, so that `fused=True` can refuse a
        variable without leaving a half-built optimizer.
        """
        if self.built:
            return
        no_sharding = _sharding.backend_reason()
        if self.shard_state and no_sharding is not None:
            warnings.warn(f"`shard_state=True` has no effect here: {no_sharding}.", stacklevel=2)
        moments = _state.for_options(
            self, self.amsgrad, self.moment_dtype, self.shard_state,
            block_size=self.moment_block_size, min_8bit_size=self.min_8bit_size)
        routes = self._make_routes(var_list, self._fast, self._fast_reason, moments)
        super().build(var_list)
        moments.create(var_list)
        self._moments, self._routes = moments, routes
        if self.skip_nonfinite:
            # After the slots: the layout of optimizers without it is unchanged.
            # Assigned only in the cross-replica context under tf.distribute
            # (as LossScaleOptimizer's counters): no aggregation.
            self._skipped_steps = self.add_variable(
                shape=(), dtype="int", name="skipped_steps", aggregation="none",
            )
        _saving.restore_pending(self)

    def _make_routes(self, var_list, fast, fast_reason, moments):
        """The plan's routes; raises if fused=True and a variable gets none."""
        sparse_mode = self.sparse_updates if backends.makes_sparse_gradients() else None
        routes = _plan.make_routes(
            var_list, self._hyper(), fast, fast_reason, moments, sparse_mode,
            self._overwrite_variable_with_gradient,
        )
        if self.fused:
            for variable, route in zip(var_list, routes):
                if route.path == _plan.PORTABLE:
                    raise ValueError(
                        f"`fused=True` is not possible: variable {variable.path!r}: "
                        f"{route.reason}."
                    )
        return tuple(routes)

    def update_plan(self):
        """Which path updates each variable, and why.

        Returns:
            A dict {variable path: `Route`}, in the order the optimizer was
            built with. A `Route` has `path` ("tensorflow-fused",
            "torch-multi-tensor", "portable" or "overwritten"), `reason`,
            `sparse` (what a row-sparse gradient gets: "exact", "lazy", or
            "none" where the backend makes none) and `steps_aside` (when a
            fast path defers to the portable rule at run time).
            `print(optimizer.update_plan())` shows one line per variable.

        Raises:
            ValueError: if the optimizer is not built yet.
        """
        self._require_built("update_plan()")
        return _plan.Plan(
            (variable.path, route)
            for variable, route in zip(self._trainable_variables, self._routes)
        )

    def slots(self, variable):
        """The (m, v, v_max) slots of a model variable; v_max is None without amsgrad.

        Raises:
            ValueError: if the optimizer is not built yet.
        """
        self._require_built("slots()")
        return self._moments.slots(variable)

    def moments(self, variable):
        """The values of m, v (and v_max) of a model variable, in the update's compute dtype.

        Whatever the storage: 8-bit codes are decoded (as the next step reads
        them, guard included; see `keras_adam._state.Blockwise8bit`), bfloat16
        moments widened. v_max is None without amsgrad; all three are None for
        a variable Keras overwrites with its gradient.

        Raises:
            ValueError: if the optimizer is not built yet.
        """
        self._require_built("moments()")
        return self._moments.read(variable)

    def _require_built(self, what):
        if self._moments is None:
            raise ValueError(
                f"{type(self).__name__}.{what} needs a built optimizer: call "
                "`optimizer.build(model.trainable_variables)` first (or train one step)."
            )

    def apply(self, grads, trainable_variables=None):
        """As `keras.optimizers.Optimizer.apply`; with `skip_nonfinite`, only for finite grads."""
        if trainable_variables is None:
            variables = getattr(self, "_trainable_variables", [])
        else:
            variables = trainable_variables
        self._per_step.open()
        try:
            # NumPy arrays become tensors: Keras's global-norm clipping and the
            # torch kernel need them.
            grads = [ops.convert_to_tensor(g) if isinstance(g, np.ndarray) else g for g in grads]
            grads = self._sparse.begin(grads, variables, self._var_key)
            if not self.skip_nonfinite or self.__dict__.get("_in_stateless_apply"):
                return super().apply(grads, trainable_variables)
            if not self.built:
                # Before the cond: no variable may be created inside a branch.
                with keras.name_scope(self.name, caller=self):
                    self.build(variables)
            _nonfinite.apply_if_finite(
                grads, variables,
                lambda g, v: super(Adam, self).apply(g, v),
                lambda: self._skipped_steps.assign_add(1),
            )
        finally:
            self._sparse.end()
            self._per_step.close()

    @property
    def skipped_steps(self):
        """With `skip_nonfinite=True`: how many steps were skipped for NaN or Inf gradients.

        A saved variable (it is in `.keras` files and checkpoints). None
        without `skip_nonfinite`, or before `build`.
        """
        return self._skipped_steps

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        """As `keras.optimizers.Optimizer.stateless_apply` (JAX's trainer); with
        `skip_nonfinite`, a step with NaN or Inf gradients returns every value
        unchanged but `skipped_steps`."""
        if not self.skip_nonfinite:
            return super().stateless_apply(optimizer_variables, grads, trainable_variables)

        def finite_step():
            self._in_stateless_apply = True
            try:
                return super(Adam, self).stateless_apply(
                    optimizer_variables, grads, trainable_variables)
            finally:
                self._in_stateless_apply = False

        def skip():
            mapping = list(zip(self.variables, optimizer_variables))
            with keras.StatelessScope(state_mapping=mapping) as scope:
                self._skipped_steps.assign_add(1)
            return (list(trainable_variables),
                    [scope.get_current_value(v) for v in self.variables])

        return ops.cond(_nonfinite.all_finite(grads), finite_step, skip)

    def _use_weight_decay(self, variable):
        # A private seam of keras' BaseOptimizer, touched here only: it asks this
        # before decaying a whole variable. A variable updated lazily this step
        # is decayed inside the lazy update, on its touched rows only.
        # tests/test_sparse.py fails if untouched rows ever change.
        if self._sparse.updates_lazily(self._var_key(variable)):
            return False
        return self._decays(variable)

    def _decays(self, variable):
        """Whether decoupled weight decay applies to `variable` at all."""
        if self.weight_decay is None:
            return False
        if self._decay_exclusions and self._decay_exclusions["var_indices"]:
            if self._get_variable_index(variable) in self._decay_exclusions["var_indices"]:
                return False
        return super()._use_weight_decay(self._keras_variable(variable))

    def _keras_variable(self, variable):
        """The Keras variable for `variable` (Keras's TF optimizer hands update_step the
        tf.Variable inside it, whose name differs)."""
        try:
            return self._trainable_variables[self._get_variable_index(variable)]
        except (KeyError, AttributeError):
            return variable

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """As `keras.optimizers.Optimizer.exclude_from_weight_decay`, and saved.

        The exclusions become part of `get_config()` (`var_names` as given,
        `var_list` as positions among the variables the optimizer is built
        with, which a reloaded model has in the same order), so a reloaded
        optimizer decays exactly the same variables. Call it before the
        optimizer is built.
        """
        super().exclude_from_weight_decay(var_list=var_list, var_names=var_names)
        self._decay_exclusions = {"var_names": list(var_names or []), "var_indices": []}

    def _saved_decay_exclusions(self):
        """The exclusions as `get_config` records them (see `exclude_from_weight_decay`)."""
        if self._decay_exclusions is None:
            return None
        # Keras keeps the excluded variables by `_var_key`.
        excluded_keys = getattr(self, "_exclude_from_weight_decay", set())
        indices = set(self._decay_exclusions["var_indices"])
        if excluded_keys and not self.built:
            warnings.warn(
                "Variables excluded from weight decay by `var_list` are saved by their "
                "position once the optimizer is built; this optimizer is not built yet, "
                "so its config does not hold them.", stacklevel=3)
        elif excluded_keys:
            indices |= {i for i, v in enumerate(self._trainable_variables)
                        if self._var_key(v) in excluded_keys}
        return {"var_names": list(self._decay_exclusions["var_names"]),
                "var_indices": sorted(indices)}

    def _decay_rate(self, variable):
        """weight_decay if decoupled weight decay applies to `variable` at all, else None."""
        return self.weight_decay if self._decays(variable) else None

    def save_own_variables(self, store):
        """Every optimizer variable by position, as Keras stores them, plus their names."""
        _saving.save(self, store)

    def load_own_variables(self, store):
        """Loads the state saved by `save_own_variables` (or by an earlier version, or
        by `keras.optimizers.Adam`); refuses, naming the slots, state that does not
        match instead of skipping it (see `keras_adam._saving`)."""
        _saving.load(self, store)

    def _step(self, learning_rate):
        """This step's `Step` (t, lr and its scalars), once per apply and graph."""
        return self._per_step.get(
            ("step", backends.trace_key()), lambda: Step(self.iterations, learning_rate)
        )

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        # A private seam of keras' BaseOptimizer, touched here only: on torch,
        # one multi-tensor kernel updates every variable planned for it at
        # once, which a per-variable update_step cannot do. Elsewhere nothing
        # is taken and Keras's own method (tf.distribute-aware on TensorFlow)
        # runs unchanged. tests/test_backend_torch.py checks the kernel runs.
        fast = self._fast
        if fast is not None and not fast.per_variable:
            hyper = self._hyper()
            routes = [self._route(v) for v in trainable_variables]
            sparse = [_sparse.is_sparse(g) for g in grads]
            mine, rest = [], []
            for pair, path in zip(zip(grads, trainable_variables),
                                  _plan.paths_now(routes, sparse, fast, hyper)):
                (mine if path == fast.name else rest).append(pair)
            rest += fast.apply(mine, hyper, self._step(learning_rate), self._moments)
            if not rest:
                return
            grads, trainable_variables = map(list, zip(*rest))
        super()._backend_update_step(grads, trainable_variables, learning_rate)

    def _route(self, variable):
        return self._routes[self._get_variable_index(variable)]

    def update_step(self, gradient, variable, learning_rate):
        """Applies one Adam step to `variable` by the path its plan names (`update_plan`)."""
        hyper = self._hyper()
        step = self._step(learning_rate)
        path = _plan.path_now(self._route(variable), _sparse.is_sparse(gradient), self._fast, hyper)
        if path == _plan.LAZY:
            dtype = self._moments.compute_dtype(variable)
            self._sparse.lazy_update(
                gradient, variable, self._moments, hyper, step.scalars(hyper, dtype),
                self._decay_rate(variable), self.assign_sub,
            )
            return
        gradient = _sparse.densify(gradient)
        if self._fast is not None and path == self._fast.name and self._fast.per_variable:
            self._fast.apply([(gradient, variable)], hyper, step, self._moments)
        else:
            self._portable_step(gradient, variable, hyper, step)

    def _portable_step(self, gradient, variable, hyper, step):
        """One Adam step in `keras.ops`: the rule of the class docstring, on any backend.

        Reads the moments in the compute dtype (the variable's, or float32 with
        a `moment_dtype`), applies `keras_adam._rule.rule`, writes them back
        and subtracts the step. Every fast path, and this method, is tested
        against the float64 `keras_adam.reference`.
        """
        dtype = self._moments.compute_dtype(variable)
        g = ops.cast(gradient, dtype)
        m, v, v_max = self._moments.read(variable)
        m, v, v_max, delta = _rule.rule(g, m, v, v_max, step.scalars(hyper, dtype), hyper)
        self._moments.write(variable, m, v, v_max)
        self.assign_sub(variable, ops.cast(delta, variable.dtype))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "amsgrad": self.amsgrad,
                "nesterov": self.nesterov,
                "bias_correction": self.bias_correction,
                "epsilon_placement": self.epsilon_placement,
                "sparse_updates": self.sparse_updates,
                "moment_dtype": self.moment_dtype,
                "fused": self.fused,
                "skip_nonfinite": self.skip_nonfinite,
                "shard_state": self.shard_state,
                "moment_block_size": self.moment_block_size,
                "min_8bit_size": self.min_8bit_size,
                "exclude_from_weight_decay": self._saved_decay_exclusions(),
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """Rebuilds the optimizer from `get_config()` output, after checking it.

        Unknown fields raise ValueError; a wrong type or out-of-range value
        raises the constructor's error naming the field. The caller's dict is
        not modified.
        """
        serialization.check_config(cls, config)
        return super().from_config(dict(config), custom_objects=custom_objects)


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
