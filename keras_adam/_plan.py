"""Which path updates each variable, decided once at `build`, with the reason.

An update method is "portable" (the `keras.ops` rule, `keras_adam._rule.rule`)
or a backend's fast path ("tensorflow-fused", "torch-multi-tensor"; see
`keras_adam.backends`). What is known from the options (the backend's fast
path) and at `build` (each variable's dtype, how its moments are stored) is
decided here once per set of options and kept in a `Route` per variable
(`plan`). `methods_now` checks, per step, only what can change per step: a
row-sparse gradient, and whether the fast path must give way to the
portable rule in the current compile context (XLA, or torch.compile).
"""

import dataclasses

from keras_adam import _whole
from keras_adam import backends

PORTABLE = "portable"
# The portable rule on a whole variable as one compiled function (`keras_adam._whole`):
# a method of a step, never a route's (the route's is "portable", with `compiled`).
WHOLE = "whole"
LAZY = "lazy"
OVERWRITTEN = "overwritten"

SPARSE_NONE = "none"


@dataclasses.dataclass(frozen=True)
class Route:
    """How one variable is updated.

    Attributes:
        method: "portable", "tensorflow-fused", "torch-multi-tensor", or
            "overwritten" (Keras assigns the gradient itself; no Adam step).
        reason: why this method, in words.
        sparse: what a row-sparse gradient (tf.IndexedSlices) gets: "lazy"
            (only its rows, by the portable rule), "exact" (densified, then
            `method`), or "none" (this backend makes no sparse gradients).
        portable_when: when the portable rule runs in place of a fast path
            (a compile context; empty if never).
        state: with `shard_state=True`, where the slots live across devices
            (`keras_adam._sharding`); empty otherwise.
        rounding: how the new value is written: "nearest", or for 16-bit
            float variables "stochastic" or "compensated" (`keras_adam._rounding`).
        group: the pattern of the variable's group (`keras_adam._groups`), or
            "" for none.
        compiled: for a portable route whose moments are stored in another
            format (8-bit codes, 16-bit moments): how its dense steps are
            compiled as one function (`keras_adam._whole`); "" otherwise.
    """

    method: str
    reason: str
    sparse: str = SPARSE_NONE
    portable_when: str = ""
    state: str = ""
    rounding: str = "nearest"
    group: str = ""
    compiled: str = ""


class Plan(dict):
    """{variable path: Route} for every variable the optimizer was built with.

    `print(plan)` shows one line per variable.
    """

    def __str__(self):
        width = max((len(name) for name in self), default=0)
        lines = []
        for name, route in self.items():
            line = f"{name:<{width}}  {route.method}: {route.reason}"
            if route.sparse != SPARSE_NONE:
                line += f"; sparse gradients: {route.sparse}"
            if route.portable_when:
                line += f"; portable {route.portable_when}"
            if route.state:
                line += f"; {route.state}"
            if route.rounding != "nearest":
                line += f"; written with {route.rounding} rounding"
            if route.group:
                line += f"; group {route.group!r}"
            if route.compiled:
                line += f"; {route.compiled}"
            lines.append(line)
        return "\n".join(lines)


def plan(variables, hyper, fused, sparse_updates, storage, overwritten, groups=None):
    """(fast path or None, one `Route` per variable) for these options.

    Args:
        variables: the model variables, in the optimizer's order (empty
            before `build`: only the fast path is decided).
        hyper: the rule's `keras_adam._rule.Hyper`.
        fused: the `fused` option (None, True or False).
        sparse_updates: "exact" or "lazy".
        storage: the optimizer's `keras_adam._state.Storage` (how each
            variable's moments are stored decides whether a kernel may
            update them in place).
        overwritten: predicate for variables Keras overwrites with their gradient.
        groups: each variable's `keras_adam._groups.Group`, or None.

    Raises:
        ValueError: if `fused` is True and the options or a variable rule the
            fused kernel out.
    """
    fast, fast_reason = backends.fast_path(hyper, fused)
    sparse = sparse_updates if backends.makes_sparse_gradients() else SPARSE_NONE
    routes = []
    for i, variable in enumerate(variables):
        group = "" if groups is None else groups[i].pattern
        if overwritten(variable):
            routes.append(Route(OVERWRITTEN, "overwrite_with_gradient: Keras assigns "
                                "the gradient to the variable; there is no Adam step",
                                group=group))
            continue
        reason = fast_reason if fast is None else backends.variable_reason(variable, storage)
        state = storage.placement.describe(variable)
        if reason is None:
            routes.append(Route(fast.name, fast.exact_because, sparse,
                                fast.portable_when(hyper), state, group=group))
            continue
        if fused:
            raise ValueError(
                f"`fused=True` is not possible: variable {variable.path!r}: {reason}."
            )
        routes.append(Route(PORTABLE, reason, sparse, state=state,
                            rounding=storage.rounding(variable), group=group,
                            compiled=_whole.applies(storage, variable) or ""))
    return fast, tuple(routes)


def methods_now(routes, gradients_sparse, fast, hyper):
    """The method each variable's update takes this step: its `route.method`, unless
    something known only now says otherwise.

    A row-sparse gradient in lazy mode takes the lazy row update; a fast path
    gives way to the portable rule where its `portable_now` says so (the
    compile context, asked once for all variables); a portable route with
    `compiled` takes the whole-variable function ("whole").
    """
    portable_now = None
    methods = []
    for route, sparse in zip(routes, gradients_sparse):
        if sparse and route.sparse == LAZY:
            methods.append(LAZY)
            continue
        if fast is not None and route.method == fast.name:
            if portable_now is None:
                portable_now = fast.portable_now(hyper) is not None
            if portable_now:
                methods.append(PORTABLE)
                continue
        methods.append(WHOLE if route.compiled else route.method)
    return methods


class Plans:
    """`plan`'s result for each set of options the optimizer has had, made once each.

    Options may be assigned after `build` (`optimizer.beta_1 = 0.95`), and
    every step asks for the plan: it is decided once per set of options and
    kept (a few at most, for options assigned again and again).
    """

    def __init__(self):
        self._plans = {}

    def get(self, options, variables, storage, overwritten, groups=None):
        """(fast path or None, routes) for `options` (`keras_adam._options.Options`);
        the other arguments are `plan`'s, used only the first time."""
        hyper = options.hyper()
        key = (hyper, options["fused"], options["sparse_updates"])
        if key not in self._plans:
            if len(self._plans) >= 16:
                self._plans.clear()
            self._plans[key] = plan(variables, hyper, options["fused"],
                                    options["sparse_updates"], storage, overwritten, groups)
        return self._plans[key]
