"""Compiled libraries kept between processes: the cache directory, each
library's key, one compiler at a time, and stale libraries removed.

keras_adam compiles C and C++ at first use: rows.c's loop per layout (some
tenths of a second; about two seconds with JAX's FFI handler, whose
headers are large), TensorFlow's op (about 9 s against TensorFlow's
headers) and TensorFlow's XLA custom call (about a minute against XLA's).
Each is compiled once per machine into the cache directory and loaded from
there by later processes, under a name that holds a hash of everything the
binary depends on (`key`): the sources and headers read, the compiler (its
path, size and time), its flags and macros, the framework's version, and,
for a loop compiled for this CPU (`-march=native`), the CPU's model and
feature flags. Anything else gives another name, so a library is never
loaded for what it was not compiled for; nothing is ever overwritten.

A library loaded is marked used (its modification time), and each time a
library is compiled into the directory, those unused for `STALE_DAYS`
days are removed (a machine that moved on to another framework version,
or an edited source, leaves its old ones behind).
"""

import contextlib
import functools
import hashlib
import logging
import os
import tempfile
import time

_log = logging.getLogger("keras_adam")

# A library not loaded for this long is removed when another is compiled.
STALE_DAYS = 30
# What this module writes, the only files `prune` removes: names that begin
# with PREFIX and end with one of these (libraries, their locks, partial files).
PREFIX = "keras_adam_"
_SUFFIXES = (".so", ".so.lock", ".partial")


def directory():
    """The directory of compiled libraries kept between processes:
    $KERAS_ADAM_CACHE_DIR, else keras_adam under $XDG_CACHE_HOME or ~/.cache,
    made readable by its owner only. None where it cannot be made, or where
    it is not this user's own or others may write to it (a library loaded
    from there runs in this process)."""
    where = os.environ.get("KERAS_ADAM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "keras_adam")
    try:
        os.makedirs(where, mode=0o700, exist_ok=True)
        status = os.stat(where)
    except OSError:
        return None
    if status.st_uid != os.getuid() or status.st_mode & 0o022:
        return None
    return where


def key(*parts):
    """20 hex digits of a hash of `parts`: strings, bytes, numbers, None, and
    tuples or lists of them (a file's contents are given as bytes)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(_encoded(part))
    return digest.hexdigest()[:20]


def _encoded(part):
    if isinstance(part, bytes):
        return b"b%d:" % len(part) + part
    if isinstance(part, (tuple, list)):
        return b"(" + b"".join(_encoded(x) for x in part) + b")"
    text = repr(part).encode()
    return b"r%d:" % len(text) + text


def contents(*paths):
    """The bytes of the files at `paths`, one after another, each with its
    length (`key` then tells which file changed nothing from which did)."""
    found = []
    for path in paths:
        with open(path, "rb") as f:
            found.append(f.read())
    return tuple(found)


@functools.lru_cache(maxsize=None)
def headers(include):
    """The contents of every file under the directory `include`, with their
    relative paths (read once per process)."""
    found = []
    for root, folders, files in os.walk(include):
        folders.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found.append((os.path.relpath(path, include), f.read()))
    return tuple(found)


def compiler(path):
    """What identifies the compiler at `path`: its real path, size and
    modification time (an upgrade in place changes the last two)."""
    real = os.path.realpath(path)
    status = os.stat(real)
    return real, status.st_size, status.st_mtime_ns


@functools.lru_cache(maxsize=None)
def cpu():
    """This CPU's model and feature flags (Linux's /proc/cpuinfo), which
    `-march=native` compiles for, or None where they cannot be read."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                name, _, value = line.partition(":")
                name = name.strip()
                if name in ("vendor_id", "model name", "flags", "Features", "CPU part"):
                    fields.setdefault(name, value.strip())
                elif not line.strip() and fields:
                    break  # (the first processor's; a machine's cores are alike)
    except OSError:
        return None
    return tuple(sorted(fields.items())) or None


def compiled(name, identity, make, fallback):
    """The path of the library `name` compiled by `make(path)` (which writes it
    at `path` and says whether it did), or None where it could not be.

    In the cache directory (`directory`) it is
    `keras_adam_<name>_<key(identity)>.so`,
    compiled by one process while the others wait (an advisory lock), and
    taken from there where it exists. Without a cache directory, or with
    `identity` None (what the binary depends on cannot be told), it is
    compiled into `fallback()`, a directory of this process's (or None).
    """
    where = None if identity is None else directory()
    if where is None:
        where = fallback()
        if where is None:
            return None
        library = os.path.join(where, name + ".so")
        return library if make(library) else None
    library = os.path.join(where, f"{PREFIX}{name}_{key(identity)}.so")
    made = False
    with _exclusive(library + ".lock"):
        if os.path.exists(library):
            _used(library)
            return library
        # Written under a name of its own, then renamed: a process that
        # does not wait never loads half a file.
        try:
            handle, partial = tempfile.mkstemp(suffix=".partial", prefix=PREFIX, dir=where)
        except OSError:
            return None
        os.close(handle)
        try:
            if make(partial):
                os.replace(partial, library)
                made = True
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    if not made:
        return None
    prune(where)
    return library


def _used(library):
    """Marks `library` as used now (its modification time), which `prune` reads."""
    with contextlib.suppress(OSError):
        os.utime(library)


def prune(where, days=STALE_DAYS, now=None):
    """Removes from `where` the libraries (with their locks) and partial files
    of this module's (`PREFIX`) not used for `days` days; returns their names.
    Nothing else in the directory is touched: it may be one the user named."""
    now = time.time() if now is None else now
    removed = []
    try:
        names = os.listdir(where)
    except OSError:
        return removed
    for entry in names:
        if not (entry.startswith(PREFIX) and entry.endswith(_SUFFIXES)):
            continue
        path = os.path.join(where, entry)
        try:
            if now - os.stat(path).st_mtime > days * 86400:
                os.remove(path)
                removed.append(entry)
        except OSError:
            continue  # (removed by another process meanwhile)
    if removed:
        _log.info("keras_adam: removed %d compiled files unused for %d days from %s",
                  len(removed), days, where)
    return removed


@contextlib.contextmanager
def _exclusive(path):
    """Held by one process at a time (an advisory lock on the file `path`; where
    the system has none, or the file cannot be opened, nothing is held)."""
    try:
        import fcntl
        lock = open(path, "a")
    except (ImportError, OSError):
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # (its time: a lock file lives as long as its library)
        _used(path)
        yield
