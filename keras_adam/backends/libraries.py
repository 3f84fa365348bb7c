"""Compiled libraries kept between processes: the cache directory, each
library's key, one process compiling a library while others wait for it,
and stale libraries removed.

keras_adam compiles C and C++ at first use: rows.c's loop per layout (some
tenths of a second; about two seconds with JAX's FFI handler, whose
headers are large), TensorFlow's op (about 9 s against TensorFlow's
headers) and TensorFlow's XLA custom call (about a minute against XLA's).
Each is compiled once per machine into the cache directory and loaded from
there by later processes, under a name that holds a hash of what the
binary is made from (`key`): the sources and headers read, the compiler
(its file, and the version and target it reports), its flags and macros,
the variables that steer GCC's search paths (`ENVIRONMENT`),
TensorFlow's version (JAX's handler: its FFI headers' contents), and, for
a loop compiled for this CPU
(`-march=native`), the CPU's model and feature flags. Any of those
changed gives another name; nothing is ever overwritten.

A library loaded is marked used (its modification time), and each time a
library is compiled into the directory, those unused for `STALE_DAYS`
days are removed (a machine that moved on to another framework version,
or an edited source, leaves its old ones behind); one that fails to load
is removed at once (`forget`) and compiled again (`loaded`).
"""

import contextlib
import errno
import functools
import hashlib
import logging
import os
import shutil
import stat
import struct
import subprocess
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
    $KERAS_ADAM_CACHE_DIR, else keras_adam under $XDG_CACHE_HOME or ~/.cache
    (created readable by its owner only), as its real path. None where it
    cannot be made or written, on a file system that runs no programs
    (mounted noexec), or where another user could put a library there (a
    library loaded from there runs in this process): it must be this
    user's own and writable by them alone, and each directory above it this
    user's or root's, writable by its group only where that is this user's
    own group (as a umask of 002 makes ~/.cache), and by others only where
    it has the sticky bit (as /tmp: no one may then rename what is not
    theirs); on Linux, a POSIX ACL on it may give write access to no other
    user or group (`_acl_writers`)."""
    where = os.environ.get("KERAS_ADAM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "keras_adam")
    try:
        os.makedirs(where, mode=0o700, exist_ok=True)
        where = os.path.realpath(where)
        status = os.stat(where)
        if status.st_uid != os.getuid() or status.st_mode & 0o022 or \
                not os.access(where, os.W_OK | os.X_OK) or \
                os.statvfs(where).f_flag & getattr(os, "ST_NOEXEC", 0):
            return None
        above = os.path.dirname(where)
        while True:
            status = os.stat(above)
            shared = status.st_mode & 0o002 or (
                status.st_mode & 0o020 and status.st_gid != os.getgid())
            sticky = status.st_mode & stat.S_ISVTX
            if status.st_uid not in (0, os.getuid()) or (shared and not sticky) or (
                    status.st_mode & 0o020 and not sticky and _acl_writers(above)):
                return None
            if os.path.dirname(above) == above:
                return where
            above = os.path.dirname(above)
    except OSError:
        return None


# POSIX ACL entries' tags (Linux's system.posix_acl_access): a named user, a
# named group, and the mask that bounds them and the owning group.
_ACL_USER, _ACL_GROUP, _ACL_MASK = 0x02, 0x08, 0x10
# What getxattr says where a file has no ACL, or its file system keeps none.
_NO_ACL = {errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP}


def _acl_writers(path):
    """Whether the POSIX access ACL of `path` lets a user other than this one,
    or a group other than this user's own, write there: a named entry with
    write permission under the mask. Linux keeps the ACL in the extended
    attribute system.posix_acl_access (4 bytes of version, then 8 per
    entry: tag, permissions, id); where there is none, or the system has
    no such attributes, the mode bits tell all. One that cannot be read or
    parsed is taken as letting others write."""
    try:
        acl = os.getxattr(path, "system.posix_acl_access")
    except AttributeError:  # (not Linux: its ACLs are not read)
        return False
    except OSError as error:  # none there, or a file system without them
        return error.errno not in _NO_ACL
    if len(acl) < 4 or (len(acl) - 4) % 8 or struct.unpack_from("<I", acl)[0] != 2:
        return True
    entries = [struct.unpack_from("<HHI", acl, offset) for offset in range(4, len(acl), 8)]
    mask = next((permissions for tag, permissions, _ in entries if tag == _ACL_MASK), 0o7)
    return any(permissions & mask & 0o2 and (
        (tag == _ACL_USER and who != os.getuid()) or (tag == _ACL_GROUP and who != os.getgid()))
        for tag, permissions, who in entries)


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
    """The bytes of the files at `paths`, a tuple of one per file (`key` hashes
    each with its length, so the files' bounds count too)."""
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
    modification time, and the version and target it reports (a wrapper
    such as ccache stays the same file when the compiler behind it is
    upgraded)."""
    real = os.path.realpath(path)
    status = os.stat(real)
    return (real, status.st_size, status.st_mtime_ns) + _reported(path, status.st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _reported(path, _time):
    """What the compiler at `path` says it is: its exit status and output for
    `-dumpfullversion -dumpmachine` (GCC's, Clang's), else for `--version`
    (asked once per process and compiler file)."""
    said = ()
    for question in (["-dumpfullversion", "-dumpmachine"], ["--version"]):
        try:
            done = subprocess.run([path, *question], capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as error:
            return said + (type(error).__name__,)
        said += (done.returncode, done.stdout.decode(errors="replace"))
        if done.returncode == 0 and done.stdout.strip():
            break
    return said


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


# The environment variables that change what GCC compiles or links: part of
# every library's key.
ENVIRONMENT = ("CPATH", "C_INCLUDE_PATH", "CPLUS_INCLUDE_PATH", "LIBRARY_PATH",
               "GCC_EXEC_PREFIX", "COMPILER_PATH")


def compiled(name, identity, make, fallback):
    """The path of the library `name` compiled by `make(path)` (which writes it
    at `path` and says whether it did), or None where it could not be.

    In the cache directory (`directory`) it is
    `keras_adam_<name>_<key>.so`, the key of `identity` and `ENVIRONMENT`'s
    values, compiled by one process while the others that want it wait (an
    advisory lock), and taken from there where it exists. Without a cache
    directory, with `identity` None (what the binary depends on cannot be
    told), or where compiling into the directory fails (a full disk or
    quota, a read-only file system, a failing compiler), it is compiled
    into `fallback()`, a directory of this process's (or None), under the
    same key where there is one; one compiled into the cache directory
    that the directory then cannot keep (its fsync or rename failing) is
    moved into `fallback()` instead.
    """
    if identity is not None:
        identity = (identity, [os.environ.get(v) for v in ENVIRONMENT])
        where = directory()
        if where is not None:
            with contextlib.suppress(OSError):
                library = _cached(where, name, identity, make, fallback)
                if library is not None:
                    return library
    where = fallback()
    if where is None:
        return None
    library = os.path.join(where, name + ("" if identity is None else f"_{key(identity)}") + ".so")
    return library if make(library) and _written(library) else None


def _cached(where, name, identity, make, fallback):
    library = os.path.join(where, f"{PREFIX}{name}_{key(identity)}.so")
    with _exclusive(library + ".lock"):
        if _written(library):
            _used(library)
            return _given(library, found=True)
        # Written under a name of its own, then renamed: a process that
        # does not wait never loads half a file.
        handle, partial = tempfile.mkstemp(suffix=".partial", prefix=PREFIX, dir=where)
        os.close(handle)
        try:
            if not (make(partial) and _written(partial)):
                return None
            try:
                with open(partial, "rb") as written:
                    os.fsync(written.fileno())  # (on disk before its name: a crash leaves no stub)
                os.replace(partial, library)
                partial = None
            except OSError:
                # Compiled, but the directory keeps no more (a full disk at
                # fsync, a rename refused): moved to this process's own
                # directory (removed at its exit), not compiled a second
                # time (up to a minute).
                moved, partial = _moved(partial, fallback, f"{name}_{key(identity)}.so"), None
                return moved
        finally:
            if partial is not None:  # (a name no longer ours once renamed or moved)
                with contextlib.suppress(OSError):
                    os.remove(partial)
    prune(where)
    return _given(library, found=False)


def _moved(partial, fallback, name):
    """`partial`, a library compiled, moved to `name` in `fallback()` (a rename,
    or a copy from another file system); OSError where it cannot be."""
    where = fallback()
    if where is None:
        raise OSError("no directory of this process's own")
    library = os.path.join(where, name)
    shutil.move(partial, library)
    if not _written(library):
        raise OSError(f"{library} is empty")
    return library


# Each cached library this process was given: its file (device, inode, size
# and time: an inode freed may be reused), which `forget` removes only where
# the path still names it.
_GIVEN = {}


def _given(library, found):
    # (`found`: taken from the cache as it was, not compiled by this process)
    _GIVEN[library] = (_file(os.stat(library)), found)
    return library


def _file(status):
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


def _written(path):
    """Whether `path` is a file with something in it."""
    try:
        return os.path.getsize(path) > 0
    except OSError:
        return False


def forget(library):
    """Removes `library`, given by `compiled` from the cache directory, where it
    is still the file given (one that failed to load: the next process that
    wants it compiles it again; one compiled again meanwhile is left).
    Returns whether `library` was found in the cache, not compiled by this
    process: compiling it again may then give one that loads."""
    given = _GIVEN.pop(library, None)
    if given is None:
        return False
    with contextlib.suppress(OSError), _exclusive(library + ".lock"):
        if _file(os.stat(library)) == given[0]:
            os.remove(library)
    return given[1]


def loaded(build, load, errors, again=(OSError,)):
    """`load(build())`: the library `build` gives (a path, or None) loaded by
    `load`, or None where that raises one of `errors`. Where it raises one
    of `again` (nothing loaded: the file could not be opened as a library)
    and the library was found in the cache directory (damaged there, or
    cut short), it is forgotten, compiled afresh and loaded once more: a
    process does not run without its compiled code for the rest of its
    life. (A library opened, whose symbols were then missing, stays loaded
    under its path, which would give it again.)"""
    for attempt in range(2):
        library = build()
        if library is None:
            return None
        try:
            return load(library)
        except errors as error:
            if not forget(library) or attempt or not isinstance(error, again):
                return None
    return None


def _used(path):
    """Marks `path` as used now (its modification time), which `prune` reads."""
    with contextlib.suppress(OSError):
        os.utime(path)


def prune(where, days=STALE_DAYS, now=None):
    """Removes from `where` the libraries, locks and partial files of this
    module's (`PREFIX`) not used for `days` days; returns their names.
    Nothing else in the directory is touched: it may be one the user named.

    A library is removed under its lock, and only where no other process
    holds it (one that is loading it has just marked it used); a lock only
    where its library is gone."""
    now = time.time() if now is None else now
    removed = []
    try:
        names = os.listdir(where)
    except OSError:
        return removed

    def stale(path):
        return now - os.stat(path).st_mtime > days * 86400

    for entry in names:
        if not (entry.startswith(PREFIX) and entry.endswith(_SUFFIXES)):
            continue
        path = os.path.join(where, entry)
        try:
            if not stale(path):
                continue
            if entry.endswith(".so"):
                with _exclusive(path + ".lock", wait=False) as held:
                    if held and stale(path):
                        os.remove(path)
                        removed.append(entry)
            elif entry.endswith(".so.lock"):
                if not os.path.exists(path[:-len(".lock")]):
                    os.remove(path)
                    removed.append(entry)
            else:
                os.remove(path)
                removed.append(entry)
        except OSError:
            continue  # (removed by another process meanwhile)
    if removed:
        _log.info("keras_adam: removed %d compiled files unused for %d days from %s",
                  len(removed), days, where)
    return removed


@contextlib.contextmanager
def _exclusive(path, wait=True):
    """An advisory lock on the file `path`, held by one process at a time;
    yields whether the caller may go on. Without `wait`, False at once where
    another process holds it, or where it cannot be held. With `wait`, where
    the system has no such locks, or the file cannot be opened or locked,
    the caller goes on without (at worst two processes compile the same
    library, and the second's rename replaces the first's with the same
    bytes)."""
    try:
        import fcntl
        lock = open(path, "a")
    except (ImportError, OSError):
        yield wait
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError:  # (held elsewhere, without `wait`; no locks on this file system)
            yield wait
            return
        _used(path)  # (a lock file lives as long as its library)
        yield True
