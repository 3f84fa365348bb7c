"""Which path updates each variable, decided once at `build`, with the reason.

A path is "portable" (the `keras.ops` rule, `keras_adam._rule.rule`) or a
backend's fast path ("tensorflow-fused", "torch-multi-tensor"; see
`keras_adam.backends`). What is known at construction (the backend, the
options) and at `build` (each variable's dtype, how its moments are stored)
is decided here once and kept in a `Route` per variable. `path_now` checks,
per step, only what can change per step: a row-sparse gradient, and whether
the fast path must step aside in the current compile context (XLA, or
torch.compile).
"""

import dataclasses

from keras_adam import backends

PORTABLE = "portable"
LAZY = "lazy-rows"
OVERWRITTEN = "overwritten"

SPARSE_NONE = "none"


@dataclasses.dataclass(frozen=True)
class Route:
    """How one variable is updated.

    Attributes:
        path: "portable", "tensorflow-fused", "torch-multi-tensor", or
            "overwritten" (Keras assigns the gradient itself; no Adam step).
        reason: why this path, in words.
        sparse: what a row-sparse gradient (tf.IndexedSlices) gets: "lazy"
            (only its rows, by the portable rule), "exact" (densified, then
            `path`), or "none" (this backend makes no sparse gradients).
        steps_aside: when a fast path defers to the portable rule at run time
            (empty if never).
        state: with `shard_state=True`, where the slots live across devices
            (`keras_adam._sharding`); empty otherwise.
    """

    path: str
    reason: str
    sparse: str = SPARSE_NONE
    steps_aside: str = ""
    state: str = ""


class Plan(dict):
    """{variable path: Route} for every variable the optimizer was built with.

    `print(plan)` shows one line per variable.
    """

    def __str__(self):
        width = max((len(name) for name in self), default=0)
        lines = []
        for name, route in self.items():
            line = f"{name:<{width}}  {route.path}: {route.reason}"
            if route.sparse != SPARSE_NONE:
                line += f"; sparse gradients: {route.sparse}"
            if route.steps_aside:
                line += f"; portable {route.steps_aside}"
            if route.state:
                line += f"; {route.state}"
            lines.append(line)
        return "\n".join(lines)


def make_routes(variables, hyper, fast, fast_reason, moments, sparse_updates, overwritten):
    """One `Route` per variable.

    Args:
        variables: the model variables, in the optimizer's order.
        hyper: the rule's `keras_adam._rule.Hyper`.
        fast: the backend's fast path for these options, or None.
        fast_reason: why there is none, when `fast` is None.
        moments: the optimizer's `keras_adam._state.Moments`.
        sparse_updates: "exact" or "lazy", or None where the backend makes
            no row-sparse gradients.
        overwritten: predicate for variables Keras overwrites with their gradient.
    """
    sparse = SPARSE_NONE if sparse_updates is None else sparse_updates
    routes = []
    for variable in variables:
        if overwritten(variable):
            routes.append(Route(OVERWRITTEN, "overwrite_with_gradient: Keras assigns "
                                "the gradient to the variable; there is no Adam step"))
            continue
        reason = fast_reason if fast is None else backends.variable_reason(variable, moments)
        state = moments.placement.describe(variable)
        if reason is None:
            routes.append(Route(fast.name, fast.exact_because, sparse, fast.steps_aside(hyper),
                                state))
        else:
            routes.append(Route(PORTABLE, reason, sparse, state=state))
    return routes


def path_now(route, gradient_is_sparse, fast, hyper):
    """The path this step takes: `route.path`, unless something known only now says otherwise.

    A row-sparse gradient in lazy mode takes the lazy row update; a fast path
    steps aside where its `step_aside_reason` says so (the compile context).
    """
    return paths_now([route], [gradient_is_sparse], fast, hyper)[0]


def paths_now(routes, gradients_sparse, fast, hyper):
    """`path_now` for many variables at once, asking about the compile context once."""
    aside = None
    paths = []
    for route, sparse in zip(routes, gradients_sparse):
        if sparse and route.sparse == "lazy":
            paths.append(LAZY)
            continue
        if fast is not None and route.path == fast.name:
            if aside is None:
                aside = fast.step_aside_reason(hyper) is not None
            if aside:
                paths.append(PORTABLE)
                continue
        paths.append(route.path)
    return paths
