"""Values that depend only on the step, computed once per `apply` instead of per variable.

The bias factors c1, c2 and the folded step size are the same for every
variable of a dtype within one step. Computing them per variable added ~15
scalar ops per variable to the graph, which dominated a step of 200 small
variables. The cache lives only while `Adam.apply` runs, so a value can never
outlive the step it was computed for, and the optimizer keys it by the graph
being built, so a tensor is never reused across tf.cond branches or traces.
"""

from keras_adam import _rule
from keras_adam import backends


class Step:
    """One step's data for the update paths: t (a 1-based tensor), lr, and its scalars.

    This record, not the optimizer, is what the fast paths receive.

    Args:
        iterations: the optimizer's step counter (steps done before this one).
        lr: this step's learning rate.
    """

    def __init__(self, iterations, lr, parent=None):
        self.iterations = iterations
        self.lr = lr
        self._parent = parent
        self._memo = {}

    @property
    def parent(self):
        """The step this one scales (`scaled`: a group's learning rate), or None."""
        return self._parent

    @property
    def t(self):
        """t = iterations + 1 (Algorithm 1's 1-based step), as a tensor, made once.

        Made on first use: the torch kernel reads `iterations` as a number and
        needs no tensor.
        """
        if self._parent is not None:
            return self._parent.t
        return self.memo("t", self._count)

    def _count(self):
        # The backend's own where it makes the same tensor faster (torch, eager).
        fast = backends.step_count(self)
        return self.iterations + 1 if fast is None else fast

    def number(self):
        """t as a Python int, where the backend reads the counter as a number
        (torch, eager, on a CPU, below the counter's largest value, where
        Keras's `iterations + 1` wraps around); else None. A C loop takes t
        so (its random streams' keys), without a tensor made and read back."""
        return self.memo("t number", lambda: backends.step_number(self))

    def scaled(self, multiplier):
        """This step with lr * multiplier (a group's `learning_rate_multiplier`), made
        once per step; t is this step's."""
        if multiplier == 1.0:
            return self
        # The product of the tensor itself: through a Keras variable's operator it
        # is the same float32 product (lr and the Python float both float32), at
        # several times the dispatch cost on torch, paid per group and step.
        lr = getattr(self.lr, "value", self.lr)
        return self.memo(("scaled", multiplier),
                         lambda: Step(self.iterations, lr * multiplier, parent=self))

    def scalars(self, hyper, dtype):
        """The `_rule.Scalars` for `hyper` in `dtype`, computed once per step."""
        return self.memo(("scalars", hyper, dtype), lambda: self._scalars(hyper, dtype))

    def _scalars(self, hyper, dtype):
        # The backend's own where it has a faster way to the same bits (torch, eager).
        fast = backends.step_scalars(hyper, self, dtype)
        return _rule.step_scalars(hyper, self.t, self.lr, dtype) if fast is None else fast

    def scalar_numbers(self, hyper, dtype):
        """The fields of `scalars(hyper, dtype)` as numbers (NumPy float32, None
        for a field that is None), computed once per step, where the backend
        forms them so (torch, eager, on a CPU, in float32, where `number`
        gives t); else None. A C loop takes them so, without tensors made
        and read back."""
        return self.memo(("scalar numbers", hyper, dtype),
                         lambda: backends.step_numbers(hyper, self, dtype))

    def moment_bound(self, hyper):
        """K with m^2 <= K v after this step's predecessors (`_rule.moment_bound`), or None."""
        return self.memo(("bound", hyper.beta_1, hyper.beta_2), lambda: _rule.moment_bound(
            hyper.beta_1, hyper.beta_2, self.iterations))

    def memo(self, key, compute):
        """`compute()` once per step: for a fast path's own per-step constants."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]


class PerStepCache:
    """Values kept while an `apply` runs (nested applies share them), cleared after it."""

    def __init__(self):
        self._open = 0
        self._values = {}

    def __enter__(self):
        self._open += 1
        return self

    def __exit__(self, *exc_info):
        self._open -= 1
        if self._open == 0:
            self._values.clear()

    def get(self, key, compute):
        """`compute()`, cached under `key` while an `apply` is in progress."""
        if not self._open:
            return compute()
        if key not in self._values:
            self._values[key] = compute()
        return self._values[key]
