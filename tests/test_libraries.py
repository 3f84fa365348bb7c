"""Compiled libraries kept between processes (`keras_adam.backends.libraries`):
compiled once per key, taken from the cache directory afterwards, never
loaded for what it was not compiled for, one compiler at a time, and the
stale ones removed. The oracle is what `make` was asked to do (counted in
the tests' own functions) and the files on disk."""

import multiprocessing
import os
import pathlib
import shutil
import time

import pytest

from keras_adam.backends import libraries, rows

pytestmark = pytest.mark.backend_independent

DAY = 86400


@pytest.fixture
def cache(tmp_path, monkeypatch):
    where = tmp_path / "cache"
    monkeypatch.setenv("KERAS_ADAM_CACHE_DIR", str(where))
    return where


def _maker(calls, succeed=True):
    def make(path):
        calls.append(path)
        if succeed:
            with open(path, "wb") as f:
                f.write(b"library %d" % len(calls))
        return succeed
    return make


def _no_fallback():
    raise AssertionError("the cache directory was usable: no fallback expected")


def test_a_library_is_compiled_once_per_identity(cache):
    calls = []
    first = libraries.compiled("loop", ("source", 1), _maker(calls), _no_fallback)
    again = libraries.compiled("loop", ("source", 1), _maker(calls), _no_fallback)
    assert first == again and len(calls) == 1
    assert os.path.dirname(first) == str(cache)
    assert os.path.basename(first).startswith("keras_adam_loop_")
    # Anything else in the identity is another library, compiled apart.
    other = libraries.compiled("loop", ("source", 2), _maker(calls), _no_fallback)
    assert other != first and len(calls) == 2
    with open(first, "rb") as a, open(other, "rb") as b:
        assert a.read() == b"library 1" and b.read() == b"library 2"
    # The directory is the user's own, readable by them alone.
    assert (os.stat(cache).st_mode & 0o777) == 0o700


def test_the_key_tells_every_part_apart():
    # Parts that would join into the same bytes are told apart by their
    # lengths and kinds.
    keys = {libraries.key(*parts) for parts in [
        (b"ab", b"c"), (b"a", b"bc"), ("ab", "c"), ((b"ab",), b"c"), (b"abc",), (1,), ("1",),
        (None,), ((),)]}
    assert len(keys) == 9
    assert libraries.key(b"x", ("y", 2)) == libraries.key(b"x", ("y", 2))


def test_a_failed_compile_leaves_nothing_and_is_tried_again(cache, tmp_path):
    # A compiler that fails in the cache directory is tried once in the
    # process's own (a quota the cache's file system does not show); failing
    # there too, it gives None, and the next call tries again.
    own = tmp_path / "own"
    own.mkdir()
    calls = []
    assert libraries.compiled("loop", "x", _maker(calls, succeed=False), lambda: str(own)) is None
    assert len(calls) == 2 and os.path.dirname(calls[1]) == str(own)
    assert not [f for f in os.listdir(cache) if f.endswith((".so", ".partial"))]
    assert libraries.compiled("loop", "x", _maker(calls), _no_fallback) is not None
    assert len(calls) == 3


def test_without_a_directory_of_the_users_own_each_process_compiles(tmp_path, monkeypatch):
    # A directory others may write to could hold anyone's library: it is not
    # used, and the library is compiled into the process's own directory.
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    monkeypatch.setenv("KERAS_ADAM_CACHE_DIR", str(shared))
    assert libraries.directory() is None
    own = tmp_path / "own"
    own.mkdir()
    calls = []
    for _ in range(2):
        path = libraries.compiled("loop", "x", _maker(calls), lambda: str(own))
        # (keyed there too: a process that builds a name twice loads each)
        assert os.path.dirname(path) == str(own)
        assert os.path.basename(path).startswith("loop_") and path.endswith(".so")
    assert len(calls) == 2 and os.listdir(shared) == []


def test_an_identity_that_cannot_be_told_is_not_cached(cache, tmp_path):
    calls = []
    path = libraries.compiled("loop", None, _maker(calls), lambda: str(tmp_path))
    assert path == str(tmp_path / "loop.so") and not cache.exists()


def _age(path, days):
    then = time.time() - days * DAY
    os.utime(path, (then, then))


def test_stale_libraries_are_removed_and_nothing_else(cache):
    cache.mkdir(mode=0o700)
    names = {"keras_adam_old_0123.so": 40, "keras_adam_old_0123.so.lock": 40,
             "keras_adam_abandoned.partial": 40, "keras_adam_recent_4567.so": 10,
             "users_own.so": 40, "keras_adam_notes.txt": 40}
    for name, days in names.items():
        (cache / name).write_bytes(b"")
        _age(cache / name, days)
    calls = []
    libraries.compiled("new", "x", _maker(calls), _no_fallback)  # (compiling prunes)
    left = set(os.listdir(cache))
    assert not left & {"keras_adam_old_0123.so", "keras_adam_abandoned.partial"}
    assert {"keras_adam_recent_4567.so", "users_own.so", "keras_adam_notes.txt"} <= left
    # A lock goes once its library is gone and it is stale itself (taking it
    # to remove the library marked it used).
    later = set(libraries.prune(str(cache), now=time.time() + 31 * DAY))
    assert "keras_adam_old_0123.so.lock" in later
    assert {"users_own.so", "keras_adam_notes.txt"} <= set(os.listdir(cache))


def test_a_library_loaded_is_kept(cache):
    calls = []
    path = libraries.compiled("used", "x", _maker(calls), _no_fallback)
    _age(path, 40)
    assert libraries.compiled("used", "x", _maker(calls), _no_fallback) == path
    assert len(calls) == 1
    assert time.time() - os.stat(path).st_mtime < DAY  # marked used
    assert libraries.prune(str(cache)) == []


def _compile_slowly(where, out, barrier):
    os.environ["KERAS_ADAM_CACHE_DIR"] = where

    def make(path):
        with open(out, "a") as f:
            f.write("compiled\n")
        time.sleep(1.0)
        with open(path, "wb") as f:
            f.write(b"library")
        return True

    barrier.wait(60)  # (both ask at once, however long each took to start)
    path = libraries.compiled("raced", "x", make, _no_fallback)
    with open(out, "a") as f:
        f.write(f"got {path}\n")


def test_processes_that_ask_at_once_compile_once(cache, tmp_path):
    # Two processes (pytest's workers, a job's ranks) ask for the same
    # library together: one compiles while the other waits, then loads it.
    out = tmp_path / "made.txt"
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    workers = [context.Process(target=_compile_slowly, args=(str(cache), str(out), barrier))
               for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        assert w.exitcode == 0
    lines = out.read_text().splitlines()
    assert lines.count("compiled") == 1, lines
    got = {line for line in lines if line.startswith("got ")}
    assert len(got) == 1 and "None" not in got.pop(), lines


def test_a_directory_that_fails_while_writing_falls_back(cache, tmp_path, monkeypatch):
    # A cache directory that cannot take a file (read-only, full) or has no
    # locks: the library is compiled into the process's own directory, or,
    # without locks, into the cache all the same.
    import fcntl
    import tempfile

    own = tmp_path / "own"
    own.mkdir()
    calls = []

    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    with monkeypatch.context() as patch:
        patch.setattr(tempfile, "mkstemp", refuse)
        path = libraries.compiled("loop", "x", _maker(calls), lambda: str(own))
    assert os.path.dirname(path) == str(own) and len(calls) == 1

    def no_locks(*args):
        raise OSError(37, "No locks available")

    with monkeypatch.context() as patch:
        patch.setattr(fcntl, "flock", no_locks)
        path = libraries.compiled("loop", "y", _maker(calls), _no_fallback)
    assert os.path.dirname(path) == str(cache) and len(calls) == 2


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_library_the_cache_cannot_keep_is_moved_not_compiled_again(
        cache, tmp_path, monkeypatch, failing):
    # Compiled into the cache directory, which then fails to keep it (a full
    # disk at fsync, a rename refused): the compiled file moves to the
    # process's own directory, compiled once; nothing is left in the cache.
    own = tmp_path / "own"
    own.mkdir()
    calls = []

    def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, refuse)
    path = libraries.compiled("loop", "x", _maker(calls), lambda: str(own))
    assert len(calls) == 1 and os.path.dirname(calls[0]) == str(cache)
    assert os.path.dirname(path) == str(own)
    with open(path, "rb") as f:
        assert f.read() == b"library 1"
    assert not [n for n in os.listdir(cache) if n.endswith((".so", ".partial"))]
    # Without a directory of the process's own: none, compiled once, nothing left.
    assert libraries.compiled("other", "x", _maker(calls), lambda: None) is None
    assert len(calls) == 2
    assert not [n for n in os.listdir(cache) if n.endswith((".so", ".partial"))]


def test_a_compiler_that_fails_in_the_cache_tries_the_process_directory(cache, tmp_path):
    # A full disk or quota where the cache is: the compiler fails there and
    # succeeds in the process's own directory.
    own = tmp_path / "own"
    own.mkdir()
    calls = []

    def make(path):
        calls.append(path)
        if os.path.dirname(path) == str(cache):
            return False
        with open(path, "wb") as f:
            f.write(b"library")
        return True

    path = libraries.compiled("loop", "x", make, lambda: str(own))
    assert os.path.dirname(path) == str(own) and len(calls) == 2


def test_a_noexec_file_system_is_not_used(cache, monkeypatch):
    # Its libraries would compile and never load.
    real = os.statvfs

    def noexec(path):
        found = real(path)
        return os.statvfs_result(found[:8] + (found.f_flag | os.ST_NOEXEC,) + found[9:])

    assert libraries.directory() == str(cache)
    monkeypatch.setattr(os, "statvfs", noexec)
    assert libraries.directory() is None


def test_a_library_that_fails_to_load_is_forgotten(cache, tmp_path):
    calls = []
    path = libraries.compiled("broken", "x", _maker(calls), _no_fallback)
    elsewhere = tmp_path / "keras_adam_elsewhere.so"
    elsewhere.write_bytes(b"x")
    libraries.forget(str(elsewhere))  # (not the cache's: left alone)
    assert elsewhere.exists()
    libraries.forget(path)
    assert not os.path.exists(path)
    assert libraries.compiled("broken", "x", _maker(calls), _no_fallback) == path
    assert len(calls) == 2
    # Compiled again by another process meanwhile: that file is left.
    os.remove(path)
    with open(path, "wb") as f:
        f.write(b"another process's")
    libraries.forget(path)
    assert os.path.exists(path)


def test_a_library_that_fails_to_load_is_compiled_again_once(cache, tmp_path):
    # `loaded`: a library from the cache that fails to load (damaged there) is
    # forgotten, compiled afresh and loaded; one that fails again, or one of
    # the process's own directory (compiling again would change nothing), is
    # given up. Oracle: the calls of `make` and of the loader.
    calls, loads = [], []

    def load(path):
        with open(path, "rb") as f:
            content = f.read()
        loads.append(content)
        if content == b"library 1":  # (the first one compiled: damaged)
            raise OSError("invalid ELF header")
        return content

    build = lambda: libraries.compiled("loop", "x", _maker(calls), _no_fallback)  # noqa: E731
    build()
    assert libraries.loaded(build, load, (OSError,)) == b"library 2"
    assert len(calls) == 2 and loads == [b"library 1", b"library 2"]

    def refuse(path):
        loads.append(path)
        raise OSError("invalid ELF header")

    loads.clear()
    assert libraries.loaded(build, refuse, (OSError,)) is None
    assert len(loads) == 2 and len(calls) == 3  # (once more, not forever)
    own = tmp_path / "own"
    own.mkdir()
    loads.clear()
    assert libraries.loaded(lambda: libraries.compiled("loop", None, _maker(calls),
                                                        lambda: str(own)),
                            refuse, (OSError,)) is None
    assert len(loads) == 1 and len(calls) == 4
    assert libraries.loaded(lambda: None, refuse, (OSError,)) is None
    # Compiled by this very call and failing: not compiled a second time (the
    # same sources give the same file), but removed for the next process.
    loads.clear()
    fresh = lambda: libraries.compiled("fresh", "x", _maker(calls), _no_fallback)  # noqa: E731
    assert libraries.loaded(fresh, refuse, (OSError,)) is None
    assert len(loads) == 1 and len(calls) == 5
    assert not [n for n in os.listdir(cache)
                if n.startswith("keras_adam_fresh") and n.endswith(".so")]
    # Found in the cache, opened, but a symbol missing (an error not in
    # `again`): the file stays loaded under its path, so it is not retried.
    fresh()

    def lacks(path):
        loads.append(path)
        raise AttributeError("keras_adam_step")

    loads.clear()
    assert libraries.loaded(fresh, lacks, (OSError, AttributeError)) is None
    assert len(loads) == 1 and len(calls) == 6


def test_a_library_another_process_holds_is_not_pruned(cache):
    import fcntl

    calls = []
    path = libraries.compiled("held", "x", _maker(calls), _no_fallback)
    _age(path, 40)
    # Another open file description of the lock conflicts as another
    # process's would.
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert libraries.prune(str(cache)) == []
        assert os.path.exists(path)
    _age(path + ".lock", 40)
    _age(path, 40)
    # Free and stale: the library goes; its lock, stale, went with it or
    # goes at the next pruning, once the library is gone.
    removed = set(libraries.prune(str(cache))) | set(libraries.prune(str(cache), now=time.time()
                                                                     + 41 * DAY))
    assert os.path.basename(path) in removed and not os.path.exists(path)
    assert not os.path.exists(path + ".lock")


def test_a_directory_others_could_write_to_is_refused(tmp_path, monkeypatch):
    # Writable by others above it, without the sticky bit: someone else could
    # rename it and put their own in its place.
    parent = tmp_path / "open"
    parent.mkdir()
    os.chmod(parent, 0o777)
    monkeypatch.setenv("KERAS_ADAM_CACHE_DIR", str(parent / "cache"))
    assert libraries.directory() is None
    os.chmod(parent, 0o1777)  # (as /tmp)
    assert libraries.directory() == str(parent / "cache")
    # Writable by its group: this user's own group (a umask of 002), or not.
    os.chmod(parent, 0o775)
    os.chown(parent, -1, os.getgid())
    assert libraries.directory() == str(parent / "cache")
    gid = os.getgid()
    monkeypatch.setattr(os, "getgid", lambda: gid + 1)
    assert libraries.directory() is None
    # Another user's directory.
    uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: uid + 1)
    assert libraries.directory() is None


def _acl(*entries):
    """Linux's system.posix_acl_access of (tag, permissions, id) entries."""
    import struct

    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_a_directory_whose_acl_lets_others_write_above_it_is_refused(tmp_path, monkeypatch):
    # A directory above the cache writable by this user's own group passes on
    # its mode bits; a POSIX ACL there may still give another user or group
    # write access (its named entries, under the mask, which the mode's
    # group bits show). Oracle: the ACL's meaning, entry by entry.
    import errno

    parent = tmp_path / "shared"
    parent.mkdir()
    os.chmod(parent, 0o775)
    os.chown(parent, -1, os.getgid())
    monkeypatch.setenv("KERAS_ADAM_CACHE_DIR", str(parent / "cache"))
    acls = {}

    def getxattr(path, name, *args, **kwargs):
        path = os.path.realpath(path)
        if path in acls and name == "system.posix_acl_access":
            return acls[path]
        raise OSError(errno.ENODATA, "No data available")

    monkeypatch.setattr(os, "getxattr", getxattr, raising=False)
    parent = pathlib.Path(os.path.realpath(parent))
    assert libraries.directory() == str(parent / "cache")  # (no ACL: the mode tells)
    # As `getfattr -e hex -n system.posix_acl_access` prints the ACL of
    # `setfacl -m u:1001:rwx` on a directory of mode 775 (user::rwx, user:1001:rwx,
    # group::rwx, mask::rwx, other::r-x), written out by hand: another user writes.
    acls[str(parent)] = bytes.fromhex(
        "02000000" "01000700ffffffff" "02000700e9030000" "04000700ffffffff"
        "10000700ffffffff" "20000500ffffffff")
    assert os.getuid() != 1001 or libraries.directory() == str(parent / "cache")
    assert os.getuid() == 1001 or libraries.directory() is None
    none = 0xFFFFFFFF  # (the id of entries that name no one)
    owner, group, other = (0x01, 0o7, none), (0x04, 0o7, none), (0x20, 0o5, none)
    rules = [
        ([(0x02, 0o7, os.getuid() + 1), (0x10, 0o7, none)], None),  # another user writes
        ([(0x08, 0o7, os.getgid() + 1), (0x10, 0o7, none)], None),  # another group writes
        ([(0x02, 0o7, os.getuid() + 1), (0x10, 0o5, none)], str(parent / "cache")),  # masked
        ([(0x02, 0o5, os.getuid() + 1), (0x10, 0o7, none)], str(parent / "cache")),  # reads
        ([(0x02, 0o7, os.getuid()), (0x10, 0o7, none)], str(parent / "cache")),  # this user
    ]
    for named, want in rules:
        acls[str(parent)] = _acl(owner, *named[:1], group, *named[1:], other)
        assert libraries.directory() == want, named
    acls[str(parent)] = b"\x01\x00"  # (unparsable: taken as others writing)
    assert libraries.directory() is None
    acls.clear()

    def unreadable(path, name, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "getxattr", unreadable, raising=False)
    assert libraries.directory() is None
    monkeypatch.setattr(os, "getxattr", getxattr, raising=False)
    # A sticky directory (as /tmp): no one renames what is not theirs, ACL or not.
    acls[str(parent)] = _acl(owner, (0x02, 0o7, os.getuid() + 1), group, (0x10, 0o7, none), other)
    os.chmod(parent, 0o1775)
    assert libraries.directory() == str(parent / "cache")


def test_a_link_to_the_directory_gives_its_real_path(tmp_path, monkeypatch):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    monkeypatch.setenv("KERAS_ADAM_CACHE_DIR", str(tmp_path / "link"))
    assert libraries.directory() == str(real)


def test_the_environment_and_the_compiler_are_in_the_key(cache, tmp_path, monkeypatch):
    calls = []
    plain = libraries.compiled("loop", "x", _maker(calls), _no_fallback)
    monkeypatch.setenv("CPATH", str(tmp_path))
    assert libraries.compiled("loop", "x", _maker(calls), _no_fallback) != plain
    # A wrapper (as ccache) that stays the same file while the compiler it
    # runs reports another version.
    wrapper = tmp_path / "cc"
    for version in ("12.2.0", "13.1.0"):
        wrapper.write_text(f"#!/bin/sh\necho {version}\n")
        os.chmod(wrapper, 0o755)
        os.utime(wrapper, ns=(0, 0))
        libraries._reported.cache_clear()  # (a new process)
        calls.append(libraries.compiler(str(wrapper)))
    assert calls[-2][:3] == calls[-1][:3] and calls[-2] != calls[-1]
    # One that refuses GCC's question is asked for `--version`.
    for version in ("1.0", "2.0"):
        wrapper.write_text('#!/bin/sh\n[ "$1" = --version ] || exit 1\n'
                           f"echo {version}\n")
        os.utime(wrapper, ns=(0, 0))
        libraries._reported.cache_clear()
        calls.append(libraries.compiler(str(wrapper)))
    assert calls[-2] != calls[-1] and "2.0\n" in calls[-1]


def test_the_cpu_is_told_by_its_model_and_flags():
    found = libraries.cpu()
    if not os.path.exists("/proc/cpuinfo"):
        assert found is None
        return
    fields = dict(found)
    assert fields.get("flags") or fields.get("Features")


def test_the_loop_is_compiled_again_for_another_source_or_cpu(cache, tmp_path, monkeypatch):
    """rows.build keys the loop by its source, its macros and the CPU: each
    change is another library; the same call again is the same file. A CPU
    that cannot be told compiles into the process's own directory."""
    layout = (0, rows.F32, rows.F32, rows.BF16, rows.BF16, 0, 0, 0, 0, 0, 0)
    first = rows.build(layout, "test_key")
    assert first is not None and os.path.dirname(first) == str(cache)
    assert rows.build(layout, "test_key") == first
    assert rows.build(layout, "test_key", macros=["-DAHEAD=0"]) != first
    edited = tmp_path / "rows.c"
    shutil.copy(rows.SOURCE, edited)
    with open(edited, "a") as f:
        f.write("\n/* edited */\n")
    monkeypatch.setattr(rows, "SOURCE", str(edited))
    changed = rows.build(layout, "test_key")
    assert changed not in (None, first)
    monkeypatch.setattr(libraries, "cpu", lambda: None)
    elsewhere = rows.build(layout, "test_key")
    assert elsewhere is not None and os.path.dirname(elsewhere) == rows.directory()
