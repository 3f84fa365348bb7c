"""`AdamMonitor`: Adam's per-layer state as numbers in `logs` (History, CSVLogger, TensorBoard).

From the optimizer's slots after step t (t = iterations), for each parameter:

    m_hat = m / c1,  v_hat = v / c2          (c1 = c2 = 1 without bias correction)
    step  = |m_hat| / D                      the effective step |delta theta| / lr,
                                             D as for the chosen epsilon placement
    snr   = |m_hat| / sqrt(v_hat)            the signal-to-noise view of section 2.1
    bound = (1 - beta_1) / sqrt(1 - beta_2)  if 1 - beta_1 > sqrt(1 - beta_2), else 1
                                             (the step-size bound of section 2.1)

and reports, per layer, the median and maximum step, the median snr, the
fraction of parameters whose step is within 1% of the bound, and `stalled`:
the fraction of parameters whose stored value did not change in the last
step. In float32 that is the parameters with no gradient and no momentum;
in bfloat16 with nearest rounding it is also every update below half a unit
in the last place, lost in the write (`Adam(weight_rounding=...)`). With AMSGrad,
v_max stands for v. With Nesterov, the statistics use m / c1 (the gradient of
the last step, which the look-ahead adds, is not kept).
"""

import math

import keras
import numpy as np

from keras_adam import _rule
from keras_adam.optimizer import Adam


class AdamMonitor(keras.callbacks.Callback):
    """Adds statistics of Adam's m and v, per layer, to the training logs.

    Keys are `"<prefix>/<layer path>/step_median"`, `.../step_max`,
    `.../snr_median`, `.../at_bound` and `.../stalled` (see the module docstring for the
    definitions), so they appear in `History`, `CSVLogger` and `TensorBoard`.
    Inside a `keras.optimizers.MultiOptimizer`, each keras_adam sub-optimizer
    reports its own layers under `"<prefix>/<sub-optimizer name>/<layer path>/..."`.

    Args:
        every_n_batches: Int or None. Also add the statistics to the batch logs
            every this many batches. Epoch logs always get them. Defaults to
            `None`.
        prefix: String prefix of the log keys. Defaults to `"adam"`.

    Raises:
        TypeError: at the start of training, if the model's optimizer (inside
            a `LossScaleOptimizer`, if wrapped) is not a keras_adam optimizer,
            nor a `MultiOptimizer` with at least one.

    Example:

    >>> monitor = keras_adam.callbacks.AdamMonitor()
    >>> history = model.fit(x, y, epochs=3, callbacks=[monitor])  # doctest: +SKIP
    >>> history.history["adam/dense/step_median"]  # doctest: +SKIP
    """

    def __init__(self, every_n_batches=None, prefix="adam"):
        super().__init__()
        if every_n_batches is not None and (
            not isinstance(every_n_batches, int) or every_n_batches < 1
        ):
            raise ValueError(
                "`every_n_batches` must be an int >= 1 or None. "
                f"Received: every_n_batches={every_n_batches!r}"
            )
        self.every_n_batches = every_n_batches
        self.prefix = prefix
        self._before = None  # the weights before a step whose logs get `stalled`
        self._stalled = {}

    def _logged(self, batch):
        steps = (self.params or {}).get("steps")
        return (steps is not None and batch + 1 == steps) or (
            self.every_n_batches is not None and (batch + 1) % self.every_n_batches == 0)

    def on_train_batch_begin(self, batch, logs=None):
        # A copy of the weights only before the steps whose logs report them.
        self._before = None
        if self._logged(batch):
            self._before = [keras.ops.convert_to_numpy(v) for v in self.model.trainable_variables]

    def on_train_begin(self, logs=None):
        self.adams()  # fail now, with a clear message, rather than at epoch end

    def on_train_batch_end(self, batch, logs=None):
        if self._before is not None:
            unchanged = {}
            for variable, old in zip(self.model.trainable_variables, self._before):
                same = keras.ops.convert_to_numpy(variable) == old
                unchanged.setdefault(self._layer_of(variable), []).append(same.ravel())
            self._stalled = {layer: float(np.mean(np.concatenate(parts)))
                             for layer, parts in unchanged.items()}
            self._before = None
        if self.every_n_batches and (batch + 1) % self.every_n_batches == 0 and logs is not None:
            logs.update(self.statistics())

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update(self.statistics())

    def adams(self):
        """[(key infix, keras_adam optimizer)] of the model's optimizer.

        A `LossScaleOptimizer` is unwrapped. A `keras.optimizers.MultiOptimizer`
        gives each keras_adam sub-optimizer under its name (keys
        `<prefix>/<sub-optimizer name>/<layer>/...`); sub-optimizers of other
        kinds are left out.
        """
        optimizer = getattr(self.model, "optimizer", None)
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        if isinstance(inner, Adam):
            return [("", inner)]
        subs = getattr(inner, "optimizers", None) if isinstance(
            inner, keras.optimizers.MultiOptimizer) else None
        found = [(f"{sub.name}/", sub) for sub in subs or [] if isinstance(sub, Adam)]
        if not found:
            raise TypeError(
                "AdamMonitor reads the slots of a keras_adam optimizer (Adam, "
                "AdamW, LazyAdam), also inside a LossScaleOptimizer or a "
                "MultiOptimizer, but this model's optimizer is "
                f"{type(inner).__module__}.{type(inner).__name__}"
                + (" with no keras_adam sub-optimizer" if subs is not None else "")
                + ". Compile the model with optimizer=keras_adam.Adam(...)."
            )
        return found

    def _layer_of(self, variable):
        """The variable's layer path, without the model's own name ("hidden", not
        "sequential_3/hidden"), so keys stay the same from one model to the next."""
        path = variable.path.rsplit("/", 1)[0] if "/" in variable.path else variable.path
        own = f"{self.model.name}/"
        return path[len(own):] if path.startswith(own) else path

    def statistics(self):
        """{key: float} for every layer with trainable variables; {} before step 1."""
        logs = {}
        for infix, adam in self.adams():
            logs.update(self._statistics(adam, f"{self.prefix}/{infix}"))
        return logs

    def _statistics(self, adam, prefix):
        t = int(keras.ops.convert_to_numpy(adam.iterations))
        if not adam.built or t == 0:
            return {}
        b1, b2 = adam.beta_1, adam.beta_2
        c1, c2 = _rule.bias_factors_float(t, b1, b2, adam.bias_correction)
        # |m_hat| / D = alpha * |m| / (sqrt(v) + epsilon') with lr = 1, for
        # either placement (the fold of `_rule.fold_step_size`).
        alpha, epsilon = _rule.fold_step_size(
            1.0, c1, c2, adam.epsilon, adam.epsilon_placement, sqrt=math.sqrt
        )
        bound = (1 - b1) / np.sqrt(1 - b2) if (1 - b1) > np.sqrt(1 - b2) else 1.0

        per_layer = {}
        for variable in adam._trainable_variables:
            # Values, not slots: 8-bit codes are decoded.
            m, v, v_max = adam.moments(variable)
            if m is None:  # variables Keras overwrites directly have no slots
                continue
            m = np.abs(keras.ops.convert_to_numpy(m).astype("float64")).ravel()
            v = keras.ops.convert_to_numpy(v_max if adam.amsgrad else v).astype("float64").ravel()
            layer = self._layer_of(variable)
            per_layer.setdefault(layer, []).append((m, v))

        logs = {}
        for layer, parts in per_layer.items():
            m = np.concatenate([p[0] for p in parts])  # |m|
            v = np.concatenate([p[1] for p in parts])
            denom = np.sqrt(v) + epsilon
            with np.errstate(divide="ignore", invalid="ignore"):
                step = np.where(denom > 0, alpha * m / denom, 0.0)
                snr = np.where(v > 0, (m / c1) / np.sqrt(v / c2), 0.0)
            key = f"{prefix}{layer}"
            logs[f"{key}/step_median"] = float(np.median(step))
            logs[f"{key}/step_max"] = float(np.max(step))
            logs[f"{key}/snr_median"] = float(np.median(snr))
            logs[f"{key}/at_bound"] = float(np.mean(step >= 0.99 * bound))
            if layer in self._stalled:
                logs[f"{key}/stalled"] = self._stalled[layer]
        return logs
