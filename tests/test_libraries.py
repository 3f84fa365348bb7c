"""Compiled libraries kept between processes (`keras_adam.backends.libraries`):
compiled once per key, taken from the cache directory afterwards, never
loaded for what it was not compiled for, one compiler at a time, and the
stale ones removed. The oracle is what `make` was asked to do (counted in
the tests' own functions) and the files on disk."""

import multiprocessing
import os
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


def test_a_failed_compile_leaves_nothing_and_is_tried_again(cache):
    calls = []
    assert libraries.compiled("loop", "x", _maker(calls, succeed=False), _no_fallback) is None
    assert not [f for f in os.listdir(cache) if f.endswith((".so", ".partial"))]
    assert libraries.compiled("loop", "x", _maker(calls), _no_fallback) is not None
    assert len(calls) == 2


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
        assert path == str(own / "loop.so")
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
    assert not left & {"keras_adam_old_0123.so", "keras_adam_old_0123.so.lock",
                       "keras_adam_abandoned.partial"}
    assert {"keras_adam_recent_4567.so", "users_own.so", "keras_adam_notes.txt"} <= left


def test_a_library_loaded_is_kept(cache):
    calls = []
    path = libraries.compiled("used", "x", _maker(calls), _no_fallback)
    _age(path, 40)
    assert libraries.compiled("used", "x", _maker(calls), _no_fallback) == path
    assert len(calls) == 1
    assert time.time() - os.stat(path).st_mtime < DAY  # marked used
    assert libraries.prune(str(cache)) == []


def _compile_slowly(where, out):
    os.environ["KERAS_ADAM_CACHE_DIR"] = where

    def make(path):
        with open(out, "a") as f:
            f.write("compiled\n")
        time.sleep(0.5)
        with open(path, "wb") as f:
            f.write(b"library")
        return True

    libraries.compiled("raced", "x", make, _no_fallback)


def test_processes_that_ask_at_once_compile_once(cache, tmp_path):
    # Two processes (pytest's workers, a job's ranks) ask for the same
    # library together: one compiles while the other waits, then loads it.
    out = tmp_path / "made.txt"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_compile_slowly, args=(str(cache), str(out)))
               for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    assert out.read_text() == "compiled\n"


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
