"""`keras_adam.Adam` and `keras_adam.AdamW`: Adam as a Keras 3 optimizer.

`Adam.update_step` below is the specification of the update. Any faster path
added elsewhere in the package must be shown equal to it.
"""

from keras import ops
from keras.optimizers import Optimizer

from keras_adam import _rule
from keras_adam._per_step import PerStepCache
from keras_adam import _validation as check
from keras_adam import backends
from keras_adam import serialization


SPARSE_UPDATES = ("exact", "lazy")
MOMENT_DTYPES = ("float32", "bfloat16", "float16")


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
        moment_dtype: `None`, `"float32"`, `"bfloat16"` or `"float16"`. The
            dtype in which m, v (and v_max) are stored. `None` keeps each in
            its variable's dtype, as `keras.optimizers.Adam` does. Otherwise
            the update is computed in float32 (float64 for float64
            variables) and the moments are cast to this dtype when stored:
            `"float32"` for bfloat16/float16 variables (accuracy),
            `"bfloat16"` for float32 variables (half the optimizer's memory).
            Defaults to `None`.
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
        weight_decay, clipnorm, clipvalue, global_clipnorm, use_ema,
        ema_momentum, ema_overwrite_frequency, loss_scale_factor,
        gradient_accumulation_steps, name: as for
            `keras.optimizers.Optimizer`. `name` defaults to `"adam"`.

    Raises:
        ValueError: if learning_rate is negative or NaN, beta_1 or beta_2 is
            outside [0, 1), epsilon or weight_decay is negative,
            epsilon_placement, sparse_updates or moment_dtype is unknown, or
            fused=True where no fused kernel computes the rule (at `build`
            for what depends on the variables).
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
        weight_decay=None,
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        loss_scale_factor=None,
        gradient_accumulation_steps=None,
        name="adam",
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
        self.beta_1 = check.unit_interval("beta_1", beta_1)
        self.beta_2 = check.unit_interval("beta_2", beta_2)
        self.epsilon = check.non_negative("epsilon", epsilon)
        self.amsgrad = check.boolean("amsgrad", amsgrad)
        self.nesterov = check.boolean("nesterov", nesterov)
        self.bias_correction = check.boolean("bias_correction", bias_correction)
        self.epsilon_placement = check.choice(
            "epsilon_placement", epsilon_placement, _rule.EPSILON_PLACEMENTS
        )
        self.sparse_updates = check.choice(
            "sparse_updates", sparse_updates, SPARSE_UPDATES
        )
        self.moment_dtype = (
            None if moment_dtype is None
            else check.choice("moment_dtype", moment_dtype, MOMENT_DTYPES)
        )
        self.fused = check.optional_boolean("fused", fused)
        self._per_step = PerStepCache()
        # None selects the portable path (and raises if fused=True cannot hold).
        self._fused_path = backends.fused_path(self)

    def build(self, var_list):
        """Creates the slots m and v (and v_max with amsgrad) for `var_list`.

        The order (after the base class's own variables, m and v interleaved
        per model variable, then all v_max) is that of `keras.optimizers.Adam`
        in Keras 3.15. `.keras` files store optimizer variables by position,
        so this order is part of the file format.
        """
        if self.built:
            return
        if self.fused:
            for variable in var_list:
                reason = backends.unsupported_dtype_reason(variable, self.moment_dtype)
                if reason is not None:
                    raise ValueError(f"`fused=True` is not possible: {reason}.")
        super().build(var_list)
        self._m, self._v = self._add_moments(var_list, ["m", "v"])
        self._v_max = self._add_moments(var_list, ["v_max"])[0] if self.amsgrad else None

    def _add_moments(self, var_list, names):
        """One slot per variable and name (interleaved by variable, as Keras does)."""
        if self.moment_dtype is None:
            return self.add_optimizer_variables(var_list, names)
        slots = tuple([] for _ in names)
        for variable in var_list:
            for i, name in enumerate(names):
                if self._overwrite_variable_with_gradient(variable):
                    slots[i].append(None)
                    continue
                slots[i].append(self.add_variable(
                    shape=variable.shape,
                    dtype=self.moment_dtype,
                    name=f"{variable.path.replace('/', '_')}_{name}",
                    layout=getattr(variable, "_layout", None),
                ))
        return slots

    def compute_dtype(self, variable_dtype):
        """The dtype of the update's arithmetic for a variable of `variable_dtype`."""
        if self.moment_dtype is None:
            return variable_dtype
        return _rule.wide_dtype(variable_dtype)

    def slots(self, variable):
        """The (m, v, v_max) slots of a model variable; v_max is None without amsgrad."""
        i = self._get_variable_index(variable)
        return self._m[i], self._v[i], (self._v_max[i] if self.amsgrad else None)

    def apply(self, grads, trainable_variables=None):
        """As `keras.optimizers.Optimizer.apply`; step-only scalars are shared meanwhile."""
        self._per_step.open()
        try:
            grads = backends.canonical_gradients(grads)
            if self.sparse_updates == "lazy":
                variables = (
                    self._trainable_variables
                    if trainable_variables is None
                    else trainable_variables
                )
                lazy = {
                    self._var_key(v)
                    for g, v in zip(grads, variables)
                    if backends.is_sparse(g)
                }
                self._per_step.put("lazily_updated", lazy)
            return super().apply(grads, trainable_variables)
        finally:
            self._per_step.close()

    def decays(self, variable):
        """Whether decoupled weight decay applies to `variable` at all."""
        return self.weight_decay is not None and super()._use_weight_decay(variable)

    def _use_weight_decay(self, variable):
        # A private seam of keras' BaseOptimizer, touched here only: it asks this
        # before decaying a whole variable. A variable updated lazily this step
        # is decayed inside the lazy update, on its touched rows only.
        # tests/test_sparse.py fails if untouched rows ever change.
        if self._var_key(variable) in self._per_step.get("lazily_updated", set):
            return False
        return super()._use_weight_decay(variable)

    def step_scalars(self, name, dtype, compute):
        """`compute()` once per step, dtype and graph (see `keras_adam._per_step`)."""
        key = (name, dtype, backends.trace_key())
        return self._per_step.get(key, compute)

    def bias_factors(self, dtype):
        """(c1, c2, c1_next) of the current step t = iterations + 1, in `dtype`."""
        return self.step_scalars("bias_factors", dtype, lambda: _rule.bias_factors(
            self.iterations + 1, self.beta_1, self.beta_2, self.bias_correction, dtype
        ))

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        # A private seam of keras' BaseOptimizer, touched here only: on torch,
        # one multi-tensor kernel updates every eligible variable at once,
        # which a per-variable update_step cannot do. Elsewhere nothing is
        # taken and Keras's own method (tf.distribute-aware on TensorFlow)
        # runs unchanged. tests/test_backend_torch.py checks the kernel runs.
        rest = backends.multi_tensor_update(self, grads, trainable_variables, learning_rate)
        if rest:
            super()._backend_update_step(*map(list, zip(*rest)), learning_rate)

    def coefficients(self, dtype):
        """(beta_1, 1 - beta_1, beta_2, 1 - beta_2, epsilon) in `dtype`, once per step."""
        return self.step_scalars("coefficients", dtype, lambda: _rule.coefficients(
            self.beta_1, self.beta_2, self.epsilon, dtype
        ))

    def update_step(self, gradient, variable, learning_rate):
        """Applies one Adam step to `variable`, by a fused kernel where one is exact."""
        if self.sparse_updates == "lazy" and backends.is_sparse(gradient):
            backends.lazy_update(self, gradient, variable, learning_rate)
            return
        gradient = _dense(gradient)
        path = self._fused_path
        if path is not None and path.applies(self, gradient, variable):
            path.update(self, gradient, variable, learning_rate)
        else:
            self.portable_update_step(gradient, variable, learning_rate)

    def portable_update_step(self, gradient, variable, learning_rate):
        """One Adam step in `keras.ops`: the specification of the rule.

        Implements the equations of the class docstring, in their order, on
        any Keras backend; the last line is lr * m_hat / D with its scalar
        factors gathered (the identity is in `_rule.step_size`), since XLA
        compiles the arithmetic as written. Every fast path, and this method,
        is tested against the float64 `keras_adam.reference`.
        """
        dtype = self.compute_dtype(variable.dtype)  # the variable's, unless moment_dtype
        lr = ops.cast(learning_rate, dtype)
        g = ops.cast(gradient, dtype)
        m, v, v_max = self.slots(variable)
        beta_1, one_minus_beta_1, beta_2, one_minus_beta_2, epsilon = self.coefficients(dtype)

        m_t = beta_1 * ops.cast(m, dtype) + one_minus_beta_1 * g
        v_t = beta_2 * ops.cast(v, dtype) + one_minus_beta_2 * ops.square(g)
        self.assign(m, ops.cast(m_t, m.dtype))
        self.assign(v, ops.cast(v_t, v.dtype))
        if self.amsgrad:
            v_t = ops.maximum(ops.cast(v_max, dtype), v_t)
            self.assign(v_max, ops.cast(v_t, v_max.dtype))

        c1, c2, c1_next = self.bias_factors(dtype)
        # theta <- theta - lr * m_hat / D, with the scalars 1/c1, sqrt(c2) and
        # the epsilon placement folded into alpha and epsilon' (_rule.step_size).
        alpha, epsilon = _rule.step_size(lr, c1, c2, epsilon, self.epsilon_placement)
        numerator = _rule.first_moment_numerator(
            m_t, g, beta_1, one_minus_beta_1, c1, c1_next, self.nesterov
        )
        step = _rule.guarded_step(alpha * numerator, ops.sqrt(v_t), epsilon, self.epsilon)
        self.assign_sub(variable, ops.cast(step, variable.dtype))

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

    Exactly `keras_adam.Adam` with `weight_decay=0.004` and `name="adamw"` by
    default, as `keras.optimizers.AdamW`. Before each Adam step,

        theta <- theta - lr * weight_decay * theta

    Args:
        learning_rate: as for `Adam`. Defaults to `0.001`.
        weight_decay: Float >= 0. Defaults to `0.004`.
        name: Defaults to `"adamw"`.
        **kwargs: every other argument of `keras_adam.Adam`.
    """

    def __init__(self, learning_rate=0.001, weight_decay=0.004, name="adamw", **kwargs):
        if weight_decay is None:
            raise ValueError(
                "`weight_decay` must be a float >= 0 for AdamW; use keras_adam.Adam "
                "for no weight decay. Received: weight_decay=None"
            )
        super().__init__(
            learning_rate=learning_rate, weight_decay=weight_decay, name=name, **kwargs
        )


def _dense(gradient):
    """A dense tensor for `gradient`, which may be sparse (tf.IndexedSlices).

    Duplicate indices are summed *before* g^2 is taken, so the update equals
    that of the dense gradient. (keras.optimizers.Adam squares each duplicate
    slice and then sums, which differs from its own dense update.)
    `ops.convert_to_tensor` leaves IndexedSlices as they are, hence the scatter.
    """
    if backends.is_sparse(gradient):
        indices = ops.expand_dims(gradient.indices, -1)
        return ops.scatter(indices, gradient.values, gradient.dense_shape)
    return gradient


@serialization.register
class LazyAdam(Adam):
    """Adam with lazy sparse updates by default: for huge embedding tables.

    Exactly `keras_adam.Adam` with `sparse_updates="lazy"` and
    `name="lazyadam"` by default. For a `tf.IndexedSlices` gradient, only the
    rows present are updated (theta, m, v, v_max; global t), and all other rows
    stay bit for bit. Dense gradients get the standard Adam update. A
    replacement for `tfa.optimizers.LazyAdam`, which does not work with Keras 3.

    Args:
        learning_rate: as for `Adam`. Defaults to `0.001`.
        sparse_updates: Defaults to `"lazy"`.
        name: Defaults to `"lazyadam"`.
        **kwargs: every other argument of `keras_adam.Adam`.
    """

    def __init__(self, learning_rate=0.001, sparse_updates="lazy", name="lazyadam", **kwargs):
        super().__init__(
            learning_rate=learning_rate, sparse_updates=sparse_updates, name=name, **kwargs
        )
