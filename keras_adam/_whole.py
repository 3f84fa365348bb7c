"""One whole variable's dense step as one compiled function, where its moments are
stored in another format than the update's arithmetic (8-bit codes, 16-bit moments).

The portable path reads the stored moments (a decode pass over the whole
variable), runs the rule's ops and writes the moments back (an encode pass).
Run op by op, as TensorFlow without XLA and torch eager run them, each op is
a pass over memory: some 70 for 8-bit codes. Here the same functions are
composed into one function of tensors,

    values             = the tensors of `Storage.held(i)` (codes and scales,
                         or the 16-bit moments)
    m, v, v_max        = decode(values, K)               (`Storage.decode`)
    m, v, v_max, step  = rule(g, m, v, v_max, scalars)   (`keras_adam._rule.rule`)
    theta', values'    = theta - step, encode(m, v, v_max)   (`Storage.encode`,
                         16-bit moments rounded stochastically)

and given to the backend's compiler (`keras_adam.backends.compile_whole`):
one XLA cluster on TensorFlow, with or without XLA around it; torch.compile
on torch; on JAX the function as it is, since jax.jit compiles the whole
training step. On a CPU the same step runs as one C loop where it covers
the variable (`backends.rows`): torch's eager calls, JAX's and
TensorFlow's XLA programs (a custom call), and TensorFlow without XLA
around the step (an op that updates the variables: `Whole._run` then
assigns nothing). The caller
assigns theta' and values'; on torch, outside
Keras's scopes and an outer torch.compile (`backends.whole_in_place`), the
compiled function writes them into theta and values. For a variable of its
own call these are the variables' own memory: no new tensors of their
size, and no pass to copy them (joined small variables, and a variable
whose tensor is not contiguous, are still copied back).

The arithmetic is the portable path's, op for op. A compiler may still fuse
a multiplication and an addition into one rounding, so results agree with
the op-by-op portable path to float32 rounding; the codes agree except
where a value lies within that rounding of a code boundary.

One function is compiled per `Storage.layout_key` and `Hyper`: the
variables of a model share a few, and on torch and TensorFlow so do the
optimizers of a process (the function is made from a `Storage.stand_in`,
which holds no variable). Where the backend compiles one function for tensors of every
length (torch.compile with dynamic shapes), the tensors are given in the
storage's `given_shapes`, and one function serves every shape of a
format: flat for element-wise layouts (16-bit moments and weights), one
block per row for 8-bit codes (where no row ends in a shorter block;
those keep their shapes, one function each). Element-wise
layouts whose elements draw random numbers (stochastic rounding) are given
in rows of up to 16 elements, with their streams' keys per row
(`_rounding.Keys`).

There, within `Whole.together()` (the optimizer's step), the small
variables of one function and step wait and then run as one call on their
tensors joined along rows: a step of many small variables is one call per
layout and row length, not one per variable. Each element keeps its own
variable's random stream and its position in it, and each 8-bit block its
row, so the results are those of one call per variable, bit for bit.
"""

import contextlib
import dataclasses
import math
import threading

import keras
import numpy as np
from keras import ops

from keras_adam import _rounding
from keras_adam import _rule
from keras_adam import backends


def applies(storage, variable):
    """Why `variable`'s dense steps take this path (a phrase for the plan), or None.

    It does where the moments are stored in another format than the
    variable's dtype and the variable is written to nearest, and where the
    variable is written with stochastic rounding (a compensated write takes
    the portable path's `Storage.subtract`, which keeps the compensation).
    """
    rounding = storage.rounding(variable)
    if rounding == "stochastic" or (
            storage.in_place_reason(variable) is not None and rounding == "nearest"):
        return backends.whole_compiler()
    return None


# `_rule.Scalars`' fields in their order, as the compiled functions take them.
_SCALAR_NAMES = tuple(f.name for f in dataclasses.fields(_rule.Scalars))


class Whole:
    """The compiled functions of one optimizer, made on first use per layout and `Hyper`."""

    def __init__(self):
        self._functions = {}
        self._keys = None  # [t, seed, graph, every stream's key, their table] of the last step
        self._fields = None  # (scalars, their fields as a tuple) of the last step
        self._waiting = None  # calls waiting within `together`
        self._in_place = None  # `backends.whole_in_place()` within `together`
        self._layouts = {}  # `_layout`'s
        self._batches = {}  # `_row_keys`' constants per set of variables
        self._bounds = {}  # a Python float bound K as a tensor
        self._joins = {}  # `_joined`'s buffers and their views, per set of variables
        self._joins_used = set()  # the sets of this step's `together`
        # The batches that this step's and the last step's `together` ran by a
        # function's `many`: (function key, the variables' indices, given shapes).
        self._ran, self._ran_last = [], []
        self._stepping = False  # within a step's `together`

    def apply(self, storage, index, variable, gradient, rule, state, assign):
        """theta <- theta - step and the moments' new values, for model variable `index`.

        Within `together()`, a small variable may wait and be updated with others
        on leaving it.

        Args:
            storage: the optimizer's `keras_adam._state.Storage`.
            index: the model variable's position; `variable` the variable.
            gradient: its dense gradient.
            rule: the rule's `Hyper` and this step's `Scalars`.
            state: this step's moment bound K, or None (`Storage.read`), how
                16-bit moments are written (`Storage.moment_noise`), and the
                decoupled decay rate applied here, or None (a variable
                written with stochastic rounding decays with its write).
            assign: the optimizer's `assign` (tf.distribute-aware).
        """
        (hyper, scalars), (bound, noise, rate) = rule, state
        layout, rounds, given, size, held, rows = self._layout(
            storage, index, variable, backends.whole_any_length(), noise is not None)
        flat = given is not None
        in_place = backends.whole_in_place() if self._in_place is None else self._in_place
        if in_place:  # outside Keras's scopes: the tensors the function writes into
            (theta,), *values = backends.own_tensors([(variable,), *held])
            values = tuple(values)
            # Written where it lives, on its gradient's device; a variable off
            # that device is converted (to Keras's default device, as in a
            # scope) and its results assigned.
            in_place = theta.device == gradient.device
        if not in_place:  # `variable`: a Keras or (on TensorFlow) tf.Variable
            theta = ops.convert_to_tensor(variable)
            values = tuple(tuple(h.value for h in slot) for slot in held)
        key = (layout, hyper, bound is None, noise is None, rounds, rate, in_place)
        if key not in self._functions:
            # The scalars are in the compute dtype (`variable` may be a tf.Variable).
            dtype = keras.backend.standardize_dtype(scalars.lr.dtype)
            def make():
                return _step_function(storage.stand_in(index), 0, hyper, dtype, rounds,
                                      rate, flat)

            # What a C loop of the step needs besides its tensors (`compile_whole`):
            # the step's options, and the shapes the storage gives the variable in.
            loop = ((rounds, rate, hyper.nesterov, hyper.epsilon == 0),
                    storage.given_shapes(index))
            self._functions[key] = (
                _shared(key + (dtype,), make, flat, in_place, rows, loop)
                if backends.whole_shared() else
                backends.compile_whole(make(), any_length=flat, in_place=in_place, rows=rows,
                                       loop=loop))
        call = _Call(key, gradient, theta, values, given, size, (variable, held, assign),
                     (scalars, bound, noise), (storage, index))
        if self._waiting is not None and flat and size < TOGETHER_BELOW:
            return self._waiting.append(call)
        self._run([call])

    @contextlib.contextmanager
    def together(self):
        """Within it, `apply` on a small variable given in its `given_shapes` waits;
        on leaving, those of one function and step run as one call, on their
        tensors concatenated along rows (element-wise, or one 8-bit block per
        row), each row's random numbers drawn from its own variable's
        streams at its elements' positions in that variable (`_row_keys`):
        the results are those of one call each.

        Many small variables otherwise pay a compiled call each: on torch
        eager some tenths of a millisecond (Dynamo's guards, flattening the
        arguments), more than their arithmetic.
        """
        if not backends.whole_any_length():
            # Nothing waits here, and under tf.distribute the replicas' threads
            # enter this step at once: leave the object alone.
            yield
            return
        # Asked once for the step's variables, not once each (some microseconds).
        outer = self._waiting, self._in_place
        begins = outer[0] is None  # a step begins: `_many` records its batches
        if begins:
            self._ran_last, self._ran, self._stepping = self._ran, [], True
        self._waiting, self._in_place = [], backends.whole_in_place()
        try:
            try:
                yield
                waiting = self._waiting
            finally:
                self._waiting, self._in_place = outer
            batches = {}
            for call in waiting:
                batches.setdefault(call.batch_key, []).append(call)
            self._joins_used = set()
            for batch in batches.values():
                self._run(batch)
        finally:
            if begins:
                self._stepping = False
        # Buffers are kept for the sets of variables of the last step only: a
        # set that did not recur (other gradients, another model) is freed.
        self._joins = {k: v for k, v in self._joins.items() if k in self._joins_used}

    def _run(self, batch):
        """One call of the function of `batch`'s variables (of one function and
        step) on their tensors in the given shapes, joined along rows where
        there are more than one, and the results assigned to each variable."""
        first = batch[0]
        parts = [(c.gradient, c.theta) + tuple(x for slot in c.values for x in slot)
                 for c in batch]
        # The shapes each tensor is given in: the variables' own where there are none.
        given = [x.shape for x in parts[0]] if first.given is None else (
            (first.given[0],) * 2 + tuple(s for slot in first.given[1] for s in slot))
        (scalars, bound, noise), (storage, index) = first.step, first.source
        fields, bound = self._scalar_fields(scalars), self._bound(bound)
        function = self._functions[first.key]
        if first.in_place and hasattr(function, "many") and self._many(
                first.key, parts, first.given, (fields, bound, noise), storage,
                tuple(c.source[1] for c in batch)):
            return None
        if noise is not None:  # the streams' keys, computed here
            noise = (self._row_keys(storage, batch, noise, first.given[0][1])
                     if first.given is not None else (self._stream_keys(storage, index, noise),))
        if len(batch) == 1 and hasattr(function, "update"):
            # A function that may update the variables themselves (TensorFlow's
            # C loop on a CPU, `backends.tf_rows`): nothing to assign.
            variable, held, _ = first.targets
            if function.update(first.gradient, variable, held, fields, (bound, noise)):
                return None
        cut = None  # the joined tensors' views, one per call and kind, where kept
        if len(batch) == 1:  # tensors of their own over the variables' memory
            tensors = [backends.reshape(x, s) for x, s in zip(parts[0], given)]
        elif first.in_place:  # kept buffers, each the variables' tensors one after another
            tensors, cut = self._joined(batch, parts, given)
        else:  # new tensors (the results assigned may be views of them)
            tensors = [backends.join(p, s) for p, s in zip(zip(*parts), given)]
        gradient, theta, rest = tensors[0], tensors[1], iter(tensors[2:])
        values = tuple(tuple(next(rest) for _ in slot) for slot in first.values)
        results = function(gradient, theta, values, fields, (bound, noise))
        if not first.in_place:  # else theta and values now hold the results
            theta, values = results
        # Per tensor kind (theta, then each held one), each call's tensor, and
        # the results cut to match (views).
        kinds = [[p[i] for p in parts] for i in range(1, len(parts[0]))]
        if cut is not None:
            # Outside Keras's scopes (`whole_in_place`): the tensors taken in
            # `apply` are the variables' own, written in one call per kind
            # (one dtype each, which a GPU's foreach copy needs to fuse).
            for like, views in zip(kinds, cut[1:]):
                backends.copy_into(like, views)
            return None
        new = [theta] + [x for slot in values for x in slot]
        pieces = [x for joined, like in zip(new, kinds) for x in backends.split_like(joined, like)]
        targets = [(c.targets[0],) + tuple(h for slot in c.targets[1] for h in slot)
                   for c in batch]
        variables = [t[i] for i in range(len(targets[0])) for t in targets]
        backends.assign_all(first.targets[2], list(zip(variables, pieces)))

    def _many(self, key, parts, given, step, storage, indices, before=None, kept=None):
        """Whether the function of `key` ran as its `many`: a function that takes
        variables where they lie (torch's C loop on a CPU) writes their own
        tensors, nothing joined or copied. It is given the streams' seed and
        step, their count and each variable's position, not each row's keys
        (gathered at every step). `before` runs once it has checked the
        tensors, before it writes. `kept` is what `many` keeps for the batch
        between steps (`again` passes the last step's)."""
        fields, bound, noise = step
        streams = None if noise is None else (
            *noise, storage.stream_count(), self._positions(storage, indices))
        kept = {} if kept is None else kept
        if not self._functions[key].many(parts, given, fields, (bound, streams), before, kept):
            return False
        if self._stepping:  # a step's (`together`), for `again` at the next
            self._ran.append((key, indices, given, kept))
        return True

    def again(self, storage, calls, facts, decay_rate, group):
        """Runs, of this step's `calls` ((index, variable, gradient) of the variables
        whose method is the whole step), those that the last step ran by a
        function's `many` (`_many`: torch's C loop on a CPU), in the same
        batches, without each variable's way through `apply`; returns the
        set of the indices it did not run, for `apply`.

        A batch runs again where all its variables are in `calls` and in one
        group (`group(index)`: the same options whatever is assigned since),
        and its first variable's function key and given shapes are the last
        step's: its variables share their step's values, which
        `facts(index)` gives as `apply` takes them (`rule`, `state`; or the
        rule's scalars and t as numbers, which the C loop takes), with
        the decoupled decay before the step ((rate, lr), or None:
        `decay_rate(index)` gives each variable's, which `many` applies once
        it has checked the tensors). A batch of `together` is one function
        and step's values; its variables of two groups of equal values
        would part once an assignment changes one group's, so such a batch
        takes `apply`. Element-wise batches of one function and group run as
        one call (`with_loop`'s `many` takes each variable as one row), but
        those that such a call refused, which run as before; each batch's
        `kept` (what `many` keeps: its table of addresses) passes to the
        next step.

        Within `together()`, in place only. A model of many small variables
        otherwise pays their routing at every step: about 16 microseconds a
        variable on torch (docs/precision.md), near their arithmetic's time.
        """
        left = {c[0] for c in calls}
        if self._waiting is None or not self._in_place or not self._ran_last:
            return left
        found = {c[0]: c for c in calls}
        ready = {}  # the batches to run: [indices, given, kept, facts, rows, the last step's]
        for entry in self._ran_last:
            key, indices, given, kept = entry
            if not left.issuperset(indices):
                continue
            first = group(indices[0])
            if any(group(i) is not first for i in indices):
                continue
            rule, (bound, noise, rate), before = facts(indices[0])
            rows = noise is not None
            layout, rounds, given_now, _, _, _ = self._layout(
                storage, indices[0], found[indices[0]][1], True, rows)
            if (layout, rule[0], bound is None, noise is None, rounds, rate, True) != key or \
                    given_now != given:
                continue
            # Element-wise batches (every tensor in theta's shape) of one function
            # and group, given in rows of other lengths, run as one call: the C
            # loop takes each variable as one row (`rows.c`), and a call costs
            # some tens of microseconds besides its arithmetic. Not those that
            # a joined call refused (`alone`).
            elementwise = not kept.get("alone") and all(
                s == given[0] for slot in given[1] for s in slot)
            joined = (key, id(first)) if elementwise else id(kept)
            if joined in ready:
                ready[joined][0] += indices
                ready[joined][2] = {}  # the joined batch's own, kept from now on
                ready[joined][5].append(entry)
            else:
                ready[joined] = [indices, given, kept, (key, rule, bound, noise, before), rows,
                                 [entry]]
        for indices, given, kept, facts_, rows, entries in ready.values():
            if self._again(storage, found, indices, given, kept, facts_, rows, decay_rate):
                left.difference_update(indices)
            elif len(entries) > 1:
                # A joined call refused (a gradient the loop does not take): its
                # batches run as the last step ran them, now and from now on.
                for _, indices_, given_, kept_ in entries:
                    kept_["alone"] = True
                    if self._again(storage, found, indices_, given_, kept_, facts_, rows,
                                   decay_rate):
                        left.difference_update(indices_)
        return left

    def _again(self, storage, found, indices, given, kept, facts, rows, decay_rate):
        """Whether `again`'s batch of `indices` ran as one call of its function's
        `many` (`facts`: its function key, rule, bound, noise and decay before
        the step, of its first variable)."""
        key, rule, bound, noise, before = facts
        if kept.get("held", (None,))[0] is not storage:  # each variable's, fixed with it
            kept["held"] = (storage, [
                tuple(h for slot in self._layout(storage, i, found[i][1], True, rows)[4]
                      for h in slot) for i in indices])
        owned = backends.own_tensors([(found[i][1],) + held
                                      for i, held in zip(indices, kept["held"][1])])
        parts = [(found[i][2],) + tensors for i, tensors in zip(indices, owned)]
        decays = {}  # rate -> variables, at the batch's lr
        if before is not None:
            for i in indices:
                rate = decay_rate(i)
                if rate:
                    decays.setdefault(rate, []).append(found[i][1])

        def decay():
            for rate_, variables in decays.items():
                backends.decay(variables, rate_, before[1])

        # The scalars as `facts` gives them: numbers where the backend forms them
        # so (a C loop takes them as they are), else a `_rule.Scalars`.
        scalars = rule[1]
        if isinstance(scalars, _rule.Scalars):
            scalars, bound = self._scalar_fields(scalars), self._bound(bound)
        step = (scalars, bound, noise)
        return self._many(key, parts, given, step, storage, indices,
                          decay if decays else None, kept)

    def _bound(self, bound):
        """The moment bound K as the functions take it: a Python float as a tensor
        (the same float32), where the backend compiles one function for every
        length: K_n changes with the step count (`_rule.moment_bound`), and
        the compiled function takes Python floats as constants of its graph
        (`backends.torch.compiled`), so that a new K would be a new
        compilation."""
        if isinstance(bound, float) and backends.whole_any_length():
            if bound not in self._bounds:
                self._bounds[bound] = ops.convert_to_tensor(bound, "float32")
            return self._bounds[bound]
        return bound

    def _joined(self, batch, parts, given):
        """`batch`'s tensors of each kind (gradients, theta, each held one: `parts`,
        per call) copied one after another into one buffer, in the `given`
        shapes, and the buffers' views, per kind and call.

        The buffers and views are kept per set of variables, for the sets of
        the last step (`together`), and written in one copy per kind: a step
        of many small variables allocates no joined tensor (a new one of
        some megabytes can cost a page fault per 4 KB, several times the
        copy) and cuts none into views. They hold one more copy of the
        variables' gradients, weights and moments between steps. Only where
        the function writes in place: assigned elsewhere, results that are
        views of a kept buffer would change at the next step.
        """
        kinds = list(zip(*parts))
        # Each gradient's dtype (a batch's may differ, and a buffer has one).
        key = (tuple(c.source[1] for c in batch), tuple(g.dtype for g in kinds[0]),
               tuple((k[0].dtype, k[0].device) for k in kinds))
        self._joins_used.add(key)
        if key not in self._joins:
            buffers = [backends.join(k, s) for k, s in zip(kinds, given)]
            self._joins[key] = (buffers, [backends.split_like(b, k)
                                          for b, k in zip(buffers, kinds)])
        else:
            for views, kind in zip(self._joins[key][1], kinds):
                backends.copy_into(views, kind)
        return self._joins[key]

    def _layout(self, storage, index, variable, any_length, rows):
        """(the layout's key: `Storage.layout_key` and the variable's dtype; whether
        the variable is written with stochastic rounding; the shapes its
        tensors are given in, or None; its size; `Storage.held`; whether they
        are given in rows), fixed once the storage is made: worked out once
        per variable, not at every step.

        Where the backend compiles one function for every length (`any_length`),
        the tensors are given in the layout's `given_shapes` (flat, or one
        8-bit block per row): one compilation per format and dtype, not per
        shape (a model's first step waits for each). Element-wise, where
        elements draw random numbers (`rows`), in rows (`_row_length`).
        """
        key = (storage, index, any_length, rows)  # a storage compares by identity
        if key not in self._layouts:
            size = math.prod(variable.shape)
            given = storage.given_shapes(index) if any_length else None
            rows = given is not None and rows and len(given[0]) == 1
            if rows:
                shape = (-1, _row_length(size))
                given = (shape, tuple(tuple(shape for _ in slot) for slot in given[1]))
            dtype, rounding, _, _ = storage.step_dtypes(index)
            self._layouts[key] = (
                (storage.layout_key(index, shapes=given is None), dtype),
                rounding == "stochastic", given, size, storage.held(index), rows)
        return self._layouts[key]

    def _scalar_fields(self, scalars):
        # The step's scalars as the tuple the compiled function takes, built
        # once per step, not once per variable. Plain tensors: on torch the
        # learning rate arrives as its variable's Parameter, and a function
        # that optimizers share would compile again for the next optimizer's
        # schedule (a plain tensor).
        if self._fields is None or self._fields[0] is not scalars:
            self._fields = (scalars, backends.plain(
                getattr(scalars, name) for name in _SCALAR_NAMES))
        return self._fields[1]

    def _all_keys(self, storage, noise, table=False):
        """Every stream's key at this step (`_rounding.stream_key`, four per variable:
        the variable, m, v, v_max), computed once per step and graph, for all
        variables: per variable they would be some thirty eager ops each. With
        `table`, the same keys in rows of four, one row per variable. The
        cache holds the step's `t`, so that its identity marks the step."""
        seed, t = noise
        trace = backends.trace_key()
        cached = self._keys
        if cached is None or cached[0] is not t or cached[1] is not seed or cached[2] != trace:
            streams = ops.arange(storage.stream_count(), dtype="int32")
            cached = self._keys = [t, seed, trace, _rounding.stream_key(seed, t, streams), None]
        if table and cached[4] is None:  # made where asked for, once per step
            cached[4] = ops.reshape(cached[3], (-1, 4))
        return cached[4] if table else cached[3]

    def _stream_keys(self, storage, index, noise):
        """The keys of model variable `index`'s four streams (`_rounding.Keys`):
        an argument of the compiled function, which serves every variable of
        a layout (the keys depend on the position)."""
        position = storage.position(index)
        # A copy, not a view: torch.compile would guard on a view's offset.
        return ops.copy(self._all_keys(storage, noise)[4 * position:4 * position + 4])

    def _positions(self, storage, indices):
        """The positions of the variables of `indices` (`Storage.position`: their
        rows among the streams' keys), an int64 array kept per set of variables."""
        key = (storage, indices)  # a storage compares by identity
        if key not in self._batches:
            if len(self._batches) >= 4096:
                self._batches.clear()
            self._batches[key] = np.array([storage.position(i) for i in indices], np.int64)
        return self._batches[key]

    def _row_keys(self, storage, batch, noise, length):
        """The keys of `batch`'s variables, their tensors given in rows of `length`
        and joined (`_rounding.Keys`'s row form): each row's four stream keys,
        and its first element's position in its own variable.

        Given per row, not per variable: finding each row's variable inside the
        compiled function from the variables' first elements (a search, then
        lookups with bounds checks) is done again for every vector of a row's
        elements (Inductor, torch 2.13): 8.2 ms against 6.8 for the kernel of a
        2000 x 2000 variable with bfloat16 moments. Each row's variable and
        first element are constants of the set of variables (8 bytes a row),
        and its keys are gathered at each step (16 bytes a row, freed after
        the step): 24 / `length` bytes per element, 0.1 in rows of 256
        (`_row_length`).
        """
        indices = tuple(c.source[1] for c in batch)
        # A storage compares by identity: its variables' positions and sizes are fixed.
        key = (storage, indices, length)
        if key not in self._batches:  # constants of a set of variables
            if len(self._batches) >= 4096:  # a step has at most one per variable
                self._batches.clear()
            rows = [c.size // length for c in batch]
            positions = np.repeat(self._positions(storage, indices), rows)
            firsts = np.concatenate([np.arange(n) * length for n in rows])
            self._batches[key] = tuple(
                ops.convert_to_tensor(x.astype("int32")) for x in (positions, firsts))
        positions, firsts = self._batches[key]
        keys = self._all_keys(storage, noise, table=True)
        return backends.take_rows(keys, positions), firsts


# The compiled functions of every optimizer, by key, where the backend allows
# (`backends.whole_shared`): a function depends on its key alone
# (`Storage.stand_in`), so an optimizer made later (the next model of a
# notebook, a hyperparameter search's next trial) reuses the compilations of
# those before it instead of waiting for its own. Bounded: the oldest go.
_SHARED = {}
_SHARED_MOST = 256
_SHARED_LOCK = threading.Lock()


def _shared(key, make, any_length, in_place, rows=False, loop=None):
    """The compiled step of `key` (`backends.compile_whole` of `make()`), made once
    per process and backend.

    The first variable of a layout stands for all: its decode and encode
    depend on nothing that `Storage.layout_key` does not hold (its position,
    for the random streams, is an argument).
    """
    key = (keras.backend.backend(),) + key
    with _SHARED_LOCK:  # tf.distribute's replicas take it from their threads at once
        if key not in _SHARED:
            if len(_SHARED) >= _SHARED_MOST:
                del _SHARED[next(iter(_SHARED))]
            _SHARED[key] = backends.compile_whole(make(), any_length=any_length,
                                                  in_place=in_place, rows=rows, loop=loop)
        return _SHARED[key]


# Variables of fewer elements run together (`Whole.together`); a larger one has
# its own call, whose overhead is small beside its arithmetic, and concatenating
# would copy it.
TOGETHER_BELOW = 1 << 16


def _row_length(size):
    """The rows in which an element-wise layout whose elements draw random numbers
    is given: 16 elements (256 for a variable of at least `TOGETHER_BELOW`,
    which has its own call: fewer rows, fewer keys to gather), or the largest
    power of two under that dividing `size`, so that a compiled function takes
    its random streams' keys per row, not per element (`_rounding.Keys`),
    with vectorised loops along it. Two rows at least where the size allows:
    a variable of 16 is 2 rows of 8. An odd size (or 2) is rows of 1, which
    the function compiled for rows serves too (`compile_whole`'s `rows`); an
    odd size of at least `TOGETHER_BELOW` takes its largest divisor under 256
    instead, since each row's keys cost 24 / length bytes per element
    (`Whole._row_keys`): 24 in rows of 1, for a prime size.
    """
    lengths = (256, 128, 64, 32, 16, 8, 4, 2) if size >= TOGETHER_BELOW else (16, 8, 4, 2)
    length = next((n for n in lengths if size % n == 0 and size // n >= 2), 1)
    if length == 1 and size >= TOGETHER_BELOW:
        length = next((n for n in range(255, 2, -2) if size % n == 0 and size // n >= 2), 1)
    return length


@dataclasses.dataclass
class _Call:
    """One variable's `Whole.apply`: the compiled function's key and arguments (the
    tensors as they are, and the shapes they are given in, or None), the
    variable's size, and where its results go (variable, `Storage.held`,
    assign)."""

    key: tuple
    gradient: object
    theta: object
    values: tuple
    given: tuple  # (theta's shape, the held tensors' per slot), or None: their own
    size: int
    targets: tuple
    step: tuple  # (the rule's scalars, moment bound, noise)
    source: tuple  # (storage, the model variable's index)

    @property
    def in_place(self):
        # Whether the function writes its results into its inputs (`Whole.apply`'s key).
        return self.key[-1]

    @property
    def batch_key(self):
        # Calls that may run as one: one function, one step's values and seed
        # (alive while the calls wait, so their ids are not reused), given in
        # rows of one length.
        scalars, bound, noise = self.step
        return (self.key, id(scalars), id(bound), None if noise is None else tuple(map(id, noise)),
                self.given)


def _step_function(storage, index, hyper, dtype, rounds, rate, given):
    """The step of variables like model variable `index`: the rule in `dtype`, the
    variable written with stochastic rounding if `rounds` (after its decoupled
    decay at `rate`, if any, from the theta of the step, as `Storage.subtract`
    does), else theta - step in its own dtype; its tensors in the storage's
    `given_shapes` if `given`."""
    def step(gradient, theta, values, fields, state):
        (bound, keys), scalars = state, _rule.Scalars(*fields)
        noise = None if keys is None else _rounding.Keys(*keys)
        m, v, v_max = storage.decode(index, values, bound, given)
        m, v, v_max, delta = _rule.rule(ops.cast(gradient, dtype), m, v, v_max, scalars, hyper)
        moments = storage.encode(index, m, v, v_max, noise, given)
        if not rounds:
            return theta - ops.cast(delta, theta.dtype), moments
        theta = ops.cast(theta, dtype)
        if rate is not None:
            delta = delta + theta * ops.cast(rate, dtype) * scalars.lr
        return storage.round_weight(index, theta - delta, noise), moments

    return step
