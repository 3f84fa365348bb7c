"""The timing harness: milliseconds per call, interleaved so that noise hits all alike.

Each repeat times a batch of calls long enough to last about `min_seconds`;
the report gives the median and min-max over repeats. Nothing here knows
about optimizers: it times zero-argument functions.
"""

import statistics
import time


def calibrate(fn, min_seconds, clock=time.perf_counter):
    """Calls per timed sample so that a sample lasts about `min_seconds`.

    Two untimed calls first: the first traces or compiles, the second warms up.
    """
    fn()
    fn()
    start = clock()
    fn()
    return max(1, int(min_seconds / max(clock() - start, 1e-6)))


def sample(fn, calls, clock=time.perf_counter):
    """Milliseconds per call over `calls` back-to-back calls."""
    start = clock()
    for _ in range(calls):
        fn()
    return (clock() - start) / calls * 1e3


def time_repeats(fn, repeats, min_seconds, clock=time.perf_counter):
    """Milliseconds per call, one entry per repeat."""
    calls = calibrate(fn, min_seconds, clock)
    return [sample(fn, calls, clock) for _ in range(repeats)]


def time_interleaved(fns, repeats, min_seconds, clock=time.perf_counter):
    """Like `time_repeats` for several functions ({name: fn}), alternating them within each repeat.

    On a noisy machine, load that comes and goes then affects all of them alike
    rather than whichever happened to run during it; the order is reversed on
    every other repeat so neither always runs first.
    """
    calls = {name: calibrate(fn, min_seconds, clock) for name, fn in fns.items()}
    samples = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            samples[name].append(sample(fns[name], calls[name], clock))
    return samples


def summary(samples):
    """{median, min, max} of a list of samples."""
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}
