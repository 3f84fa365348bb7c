"""Values that depend only on the step, computed once per `apply` instead of per variable.

The bias factors c1, c2 (and the fused path's folded step size) are the same
for every variable of a dtype within one step. Computing them per variable
added ~15 scalar ops per variable to the graph, which dominated a step of 200
small variables. The cache lives only while `Adam.apply` runs, so a value can
never outlive the step it was computed for, and it is keyed by the graph
being built, so a tensor is never reused across tf.cond branches or traces.
"""


class PerStepCache:
    def __init__(self):
        self._open = 0
        self._values = {}

    def open(self):
        self._open += 1

    def close(self):
        self._open -= 1
        if self._open == 0:
            self._values.clear()

    def put(self, key, value):
        """Stores `value` for the `apply` in progress (ignored outside one)."""
        if self._open:
            self._values[key] = value

    def get(self, key, compute):
        """`compute()`, cached under `key` while an `apply` is in progress."""
        if not self._open:
            return compute()
        if key not in self._values:
            self._values[key] = compute()
        return self._values[key]
