"""The whole-variable step of `keras_adam._whole` as one C loop (`rows.c`): its
layouts, its scalars, and compiling it. Framework-free; torch calls the
loop through ctypes (`torch_rows`), JAX through XLA's foreign-function
interface (`jax_rows`).

A layout is one value per macro of `MACROS`, fixed when compiling: whether
the moments are 8-bit codes, the dtypes of theta, the gradient and each
moment (`F32`, `BF16`; 0 for v_max without amsgrad; 1 for an 8-bit slot),
and `Step`'s options. The loop is compiled at first use, once per layout
and machine (some tenths of a second; kept in the cache directory,
`libraries`), with the C compiler `CC`, else `gcc`, for this CPU, with
OpenMP and without fused multiply-adds: each operation rounds as the
step's operations run one by one do.
"""

import atexit
import dataclasses
import os
import shutil
import subprocess
import tempfile
import threading

from keras_adam.backends import libraries

_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(_HERE, "rows.c")
# The dtypes' macro values (rows.c).
F32, BF16 = 1, 2

MACROS = ("EIGHT_BIT", "THETA", "GRADIENT", "M", "V", "V_MAX", "ROUNDS", "RATE", "NESTEROV",
          "EPSILON_ZERO", "BOUND")

# The longest 8-bit block the loop takes (its block's values live on the stack).
LONGEST_BLOCK = 4096


@dataclasses.dataclass(frozen=True)
class Step:
    """What the loop does besides its tensors' dtypes: the step function's
    `rounds` (theta written with stochastic rounding) and decoupled decay
    `rate` (a Python float, or None), and the rule's Nesterov and epsilon = 0
    options."""

    rounds: bool
    rate: object
    nesterov: bool
    epsilon_zero: bool

    def options(self, bound):
        """The layout's last five values (`MACROS`), with the moment bound K
        given (8-bit) or not."""
        return (self.rounds, self.rate is not None, self.nesterov, self.epsilon_zero,
                bound is not None)


# The dtypes the loop reads and writes (as Keras names them), by macro value.
_CODES = {"float32": F32, "bfloat16": BF16}
_EIGHT_BIT_CODES = ("int8", "uint8", "uint8")  # m's, v's and v_max's codes


def layout(step, given, theta, gradient, held, bound, keyed):
    """(the loop's layout, `MACROS`' values; its 8-bit block length, 0
    element-wise) for one variable's step, or None where the loop does not
    cover it.

    Each tensor is given as (its dtype's Keras name, its number of elements):
    `theta`, `gradient`, and `held` (`Storage.held`: m's, v's and v_max's
    tensors, 8-bit codes with their scales). `given` is the storage's
    `given_shapes` of the variable (8-bit: one block per row, None where a
    row ends in a shorter block); `bound` the moment bound K or None;
    `keyed` whether the step has its streams' keys.
    """
    if len(held) != 3 or not held[0] or not held[1]:
        return None
    size = theta[1]
    slots = [slot for slot in held if slot]
    eight_bit = len(held[0]) == 2
    length = 0
    if eight_bit:
        if given is None or given[0][1] > LONGEST_BLOCK:
            return None
        length = given[0][1]
        if size % length or any(
                len(slot) != 2 or slot[0] != (code, size) or slot[1] != ("float32", size // length)
                for slot, code in zip(slots, _EIGHT_BIT_CODES)):
            return None
    elif bound is not None or not keyed or any(
            len(slot) != 1 or slot[0][0] not in _CODES or slot[0][1] != size for slot in slots):
        return None
    if (theta[0] == "bfloat16") != step.rounds or (step.rounds and not keyed) or \
            theta[0] not in _CODES or gradient[0] not in _CODES or gradient[1] != size:
        return None
    return ((eight_bit, _CODES[theta[0]], _CODES[gradient[0]])
            + tuple((1 if eight_bit else _CODES[slot[0][0]]) if slot else 0 for slot in held)
            + step.options(bound)), length


def scalars(fields, rate, bound):
    """The loop's scalars, in rows.c's order, from the step's `_rule.Scalars`
    fields, the decay rate (a Python float or None) and the moment bound K
    (or None): each a Python float or a framework's scalar, 0.0 where absent."""
    lr, beta_1, one_minus_beta_1, beta_2, one_minus_beta_2, _, _, nesterov, alpha, \
        epsilon = fields
    values = [beta_1, one_minus_beta_1, beta_2, one_minus_beta_2, nesterov, alpha, epsilon,
              rate, lr, bound]
    return [0.0 if x is None else x for x in values]


_LOCK = threading.Lock()
_DIRECTORY = []


def directory():
    """This process's directory of compiled loops (removed at exit), or None."""
    with _LOCK:
        if not _DIRECTORY:
            try:
                _DIRECTORY.append(tempfile.mkdtemp(prefix="keras_adam_rows_"))
            except OSError:  # no temporary directory to write to
                return None
            atexit.register(shutil.rmtree, _DIRECTORY[0], True)
    return _DIRECTORY[0]


def _vendor():
    """The CPU's vendor as Linux names it (`vendor_id`: "GenuineIntel",
    "AuthenticAMD"), or None where /proc/cpuinfo does not say (read once
    per process, with the rest of what identifies the CPU: `libraries.cpu`)."""
    return dict(libraries.cpu() or ()).get("vendor_id")


def prefetch_macros(vendor=None):
    """The macros of rows.c's prefetching for this CPU (or `vendor`'s): none
    (its requests AHEAD bytes past each row) but on AMD's CPUs, where those
    requests cost time and the CPU's own prefetchers keep up: AHEAD 0."""
    return ["-DAHEAD=0"] if (vendor or _vendor()) == "AuthenticAMD" else []


def run(command, timeout=120):
    """Whether the compiler's `command` ran and succeeded (within `timeout` seconds)."""
    try:
        return subprocess.run(command, capture_output=True, timeout=timeout).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def cxx():
    """The C++ compiler: `CXX`, else `g++`, else `c++` (its path), or None."""
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def build(layout, kind, wrapper=None, macros=None):
    """rows.c compiled for `layout` as a shared library named after `kind` and the
    layout; its path, or None where it cannot be compiled (no compiler, a
    failing one, no directory to write to).

    Compiled once per machine into the cache directory, and taken from there
    by later processes (`libraries.compiled`, keyed by the sources, the
    compilers, the flags and macros, and this CPU, which `-march=native`
    compiles for); where there is none, once per process into this
    process's directory.

    With `wrapper` (a C++ source and the directories of its headers), the loop
    is compiled to an object and linked with it by the C++ compiler `CXX`,
    else `g++`. `macros` (a list of "-DNAME=value") replaces this CPU's
    prefetching macros (`prefetch_macros`); the tests set rows.c's tuning
    macros so.
    """
    compiler = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    linker = cxx()
    if compiler is None or (wrapper is not None and linker is None):
        return None
    name = f"{kind}_" + "_".join(str(int(x)) for x in layout)
    if macros is not None:  # (in the name too: a library loaded is not loaded again)
        name += "".join("_" + "".join(c for c in m if c.isalnum()) for m in macros)
    macros = [f"-D{macro}={int(value)}" for macro, value in zip(MACROS, layout)] + (
        prefetch_macros() if macros is None else list(macros))
    # -ffp-contract=off: no multiply-add fused into one rounding (the portable
    # path's bits); -fno-math-errno lets sqrtf be one vector instruction.
    flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fPIC"]
    native = ["-march=native"]
    if not layout[0] or layout[1] == BF16:
        # GCC tunes AVX-512 CPUs for 256-bit vectors; the loop as 512-bit ones
        # ran in 0.84 times the time (bfloat16 moments) and 0.55 (bfloat16
        # weights too) on a 2-core AVX-512 Xeon; 8-bit codes with float32
        # weights, in 1.05 times: left as tuned. Vectors' width changes no bit
        # (each element's arithmetic is its own; a maximum is exact).
        native.append("-mprefer-vector-width=512")
    # Each set of options that a compiler may refuse (another architecture's,
    # an older compiler) is dropped in turn.
    targets = (native, ["-march=native"], []) if len(native) > 1 else (native, [])
    linked = ["-O2", "-std=c++17", "-fopenmp", "-fPIC", "-shared", "-w"]  # (with `wrapper`)

    def make(library):
        for target in targets:
            if wrapper is None:
                done = run([compiler, *flags, *target, *macros, "-shared", SOURCE, "-o", library])
            else:
                source, includes = wrapper
                where = directory()
                if where is None:
                    return False
                loop = os.path.join(where, name + ".o")
                done = run([compiler, *flags, *target, *macros, "-c", SOURCE, "-o", loop]) and run(
                    [linker, *linked, *macros, *(f"-I{d}" for d in includes), source, loop, "-o",
                     library])
            if done:
                return True
        return False

    try:
        sources = libraries.contents(SOURCE)
        if wrapper is not None:
            sources += libraries.contents(wrapper[0]) + tuple(
                libraries.headers(d) for d in wrapper[1])
        identity = (sources, libraries.compiler(compiler), flags, targets, macros,
                    None if wrapper is None else (libraries.compiler(linker), linked, wrapper[1]),
                    libraries.cpu())
    except OSError:  # (a source or header unreadable: nothing to key the library by)
        identity = None
    if identity is not None and identity[-1] is None:
        identity = None  # (a CPU that cannot be told: -march=native's binary is its own)
    return libraries.compiled(name, identity, make, directory)
