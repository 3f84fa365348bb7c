"""The benchmark module: its harness, its derived columns, and a run on the active backend.

No timing is asserted (the machine is noisy). The harness is checked with a
fake clock, whose readings are known exactly; the derived columns against
numbers worked out by hand, from samples planted in place of the timing
harness's; the run for the rows and parameter counts it must report.
"""

import json
import os

import keras
import pytest
from helpers import run_python

from keras_adam import benchmark
from keras_adam.benchmark import cases
from keras_adam.benchmark import sharding
from keras_adam.benchmark import timing

BACKEND = keras.backend.backend()
TINY = ["--repeats", "1", "--min-seconds", "0.001"]


@pytest.mark.backend_independent
@pytest.mark.parametrize(
    "argv,message",
    [
        (["--cases", "large,huge"], "unknown case"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--intra-op-threads", "0", "--backend", "tensorflow"], "--intra-op-threads must be >= 1"),
        (["--intra-op-threads", "1", "--backend", "jax"], "tensorflow only"),
        (["--devices", "1"], "--devices must be >= 2"),
        (["--moments-on", "large,huge"], "--moments-on takes cases of"),
        (["--fit-models", "mlp,resnet"], "--fit-models takes models of"),
    ],
)
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


class FakeClock:
    """A clock that only moves when a timed function says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.mark.backend_independent
def test_interleaved_timing_with_a_known_clock():
    clock, order = FakeClock(), []

    def costs(name, seconds):
        def fn():
            order.append(name)
            clock.now += seconds
        return fn

    # 2^-9 s and 2^-8 s a call (exact in binary, so every clock difference is
    # exact); a 2^-6 s sample then holds 8 and 4 calls: 1.953125 and 3.90625 ms.
    fns = {"a": costs("a", 2.0**-9), "b": costs("b", 2.0**-8)}
    samples = timing.time_interleaved(fns, repeats=4, min_seconds=2.0**-6, clock=clock)
    assert samples == {"a": [1.953125] * 4, "b": [3.90625] * 4}
    # After the calibration calls (3 each), each repeat makes 8 + 4 calls, and
    # the order alternates: a first, then b first.
    timed = order[6:]
    assert len(timed) == 4 * 12
    assert [timed[12 * r] for r in range(4)] == ["a", "b", "a", "b"]
    assert timed[:12] == ["a"] * 8 + ["b"] * 4


@pytest.mark.backend_independent
def test_derived_columns_from_hand_worked_numbers():
    # 1e6 float32 parameters move 28 MB a step. In 2 ms that is 14 GB/s, half
    # of a 28 GB/s machine, whose roofline is 28 MB / 28 GB/s = 1 ms. The
    # built-in taking 6 ms is a 3x speed-up.
    row = cases.derive(ours_ms=2.0, builtin_ms=6.0, touched=1_000_000, bandwidth_gb_per_s=28.0)
    assert row == pytest.approx({"speedup": 3.0, "keras_adam_gb_per_s": 14.0,
                                 "fraction_of_bandwidth": 0.5, "roofline_ms": 1.0}, rel=1e-12)


@pytest.mark.backend_independent
def test_lazy_variants_count_only_the_gradients_rows():
    embedding = cases.CASES["embedding"]
    assert embedding.touched({}) == 1_000_000 * 64
    assert embedding.touched({"sparse_updates": "lazy"}) == 1000 * 64
    assert embedding.xla_modes((False, True), (False, True)) == [False]


@pytest.mark.slow
def test_mlp_case_report(capsys):
    benchmark.main(["--cases", "mlp", "--backend", BACKEND, "--json", *TINY])
    report = json.loads(capsys.readouterr().out)
    assert report["backend"] == BACKEND
    assert report["bandwidth_gb_per_s"] > 0
    # Dense 784-512-512-10: kernels and biases.
    params = 784 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10
    xla_modes = {"tensorflow": {False, True}, "jax": {True}, "torch": {False}}[BACKEND]
    assert {r["xla"] for r in report["results"]} == xla_modes
    assert len(report["results"]) == len(xla_modes)
    for r in report["results"]:
        assert (r["case"], r["variant"], r["parameters"], r["variables"]) == (
            "mlp", "keras_adam", params, 6)
        assert r["keras_adam_ms"]["median"] > 0 and r["builtin_ms"]["median"] > 0
        # torch also times torch.optim.Adam(fused=True) on the same shapes.
        assert ("reference_ms" in r) == ("vs_reference" in r) == (BACKEND == "torch")
    table = benchmark.format_table(report)
    assert table.count("| mlp | keras_adam |") == len(report["results"])
    assert ("keras_adam / reference" in table) == (BACKEND == "torch")


def test_c_loop_off_reaches_the_backend_and_the_report(monkeypatch, capsys):
    # `--c-loop off` turns off the switch the active backend's C loop reads
    # (the memory formats' steps then take the compiled step function), and
    # the report's header says so; the default leaves it on and says nothing.
    from keras_adam.backends import jax_rows, tf_rows, torch_rows  # noqa: F401

    module = {"tensorflow": tf_rows, "jax": jax_rows, "torch": torch_rows}[BACKEND]
    monkeypatch.setattr(module, "enabled", True)
    benchmark.main(["--cases", "mlp", "--backend", BACKEND, "--json", *TINY])
    report = json.loads(capsys.readouterr().out)
    assert module.enabled and report["c_loop"] == "on"
    assert "C loop" not in benchmark.format_table(report)
    benchmark.main(["--cases", "mlp", "--backend", BACKEND, "--c-loop", "off", "--json", *TINY])
    report = json.loads(capsys.readouterr().out)
    assert not module.enabled and report["c_loop"] == "off"
    assert "; C loop off" in benchmark.format_table(report).splitlines()[0]


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow backend only")
def test_intra_op_threads_and_xla_flags_reach_the_report():
    # A fresh process: the setting is only possible before TF's runtime starts.
    # The report's value is read back from tf.config, not echoed from argv.
    # XLA_FLAGS change XLA's programs (docs/speed.md): the header names them,
    # as the process's environment gave them.
    flag = "--xla_cpu_copy_insertion_use_region_analysis=true"
    out = run_python("-m", "keras_adam.benchmark", "--cases", "mlp", "--xla", "off",
                     "--intra-op-threads", "1", "--json", *TINY, backend="tensorflow",
                     env={"XLA_FLAGS": flag}, timeout=300).stdout
    report = json.loads(out)
    assert report["intra_op_threads"] == 1
    assert report["xla_flags"] == flag
    table = benchmark.format_table(report)
    assert "intra-op threads 1" in table and f"XLA_FLAGS={flag}" in table


@pytest.mark.backend_independent
def test_collectives_are_counted_from_the_optimized_hlo(tmp_path):
    # Two dumped modules: the train step's optimized HLO is the one counted.
    (tmp_path / "module_1.jit_train_step.cpu_after_optimizations.txt").write_text(
        "  %a = f32[8]{0} all-reduce(f32[8]{0} %x), replica_groups={}\n"
        "  %b = f32[64]{0} all-gather(f32[8]{0} %y), dimensions={0}\n"
        "  %c = (f32[8]{0}, f32[64]{0}) all-gather-start(f32[8]{0} %z)\n"
        "  %d = f32[64]{0} all-gather-done(%c)\n")
    (tmp_path / "module_1.jit_train_step.cpu_before_optimizations.txt").write_text(
        "  %a = f32[8]{0} all-reduce(f32[8]{0} %x)\n" * 5)
    counts = sharding.count_collectives(str(tmp_path))
    assert counts == {"all-reduce": 1, "all-gather": 2, "reduce-scatter": 0, "all-to-all": 0,
                      "collective-permute": 0}


@pytest.mark.subprocess  # the case runs in processes with --devices virtual devices
@pytest.mark.slow
@pytest.mark.skipif(BACKEND != "jax", reason="shard_state applies on the jax backend")
def test_sharding_case_report(capsys):
    benchmark.main(["--cases", "sharding", "--backend", "jax", "--devices", "4", "--json", *TINY])
    report = json.loads(capsys.readouterr().out)
    result = report["sharding"]
    assert result["devices"] == 4 and report["results"] == []
    width = 1024  # the case's MLP: three Dense(width) and a Dense(1)
    assert result["parameters"] == 3 * (width * width + width) + width + 1
    whole, sharded = result["whole"], result["sharded"]
    # m and v, float32: 8 bytes per parameter in all, either way.
    assert whole["state_bytes"] == sharded["state_bytes"] == 8 * result["parameters"]
    assert whole["state_bytes_per_device"] == whole["state_bytes"]
    # The three kernels' m and v are split 4 ways; the rest (biases, the last
    # kernel: fewer than 4096 elements each) stay whole.
    kernels = 3 * width * width * 8
    assert sharded["state_bytes_per_device"] == kernels // 4 + (whole["state_bytes"] - kernels)
    # Both all-reduce the gradients; only the sharded step gathers the update.
    assert whole["collectives"]["all-gather"] == 0 < sharded["collectives"]["all-gather"]
    assert whole["collectives"]["all-reduce"] >= 1
    table = benchmark.format_table(report)
    assert "| whole |" in table and "| sharded |" in table
    assert "| case | variant |" not in table  # no step case ran: no empty step table


def _planted(per_call_ms, calls=1):
    """A stand-in for `timing.time_interleaved` that returns known samples.

    Each function still runs once, so every variant's model or step really
    runs; the samples are `per_call_ms[name]` times `calls` (the calls a
    sample times), the way the harness reports a sample.
    """
    def time_interleaved(fns, repeats, min_seconds, clock=None):
        for fn in fns.values():
            fn()
        return {name: [ms * calls for ms in per_call_ms[name]] for name in fns}

    return time_interleaved


# ms per fit step, three epochs each, chosen so that the median, the mean,
# the min and the max all differ: a column computed from anything but the
# medians, or from another variant's samples, gives another number.
FIT_STEP_MS = {
    "keras_adam": [3.0, 2.0, 30.0],
    "keras_adam exact": [3.0, 2.0, 30.0],
    "keras_adam lazy": [2.5, 25.0, 2.0],
    "keras_adam, 8bit moments": [6.0, 4.0, 60.0],
    "keras_adam lazy, 8bit moments": [5.0, 4.0, 50.0],
    "keras_adam, bfloat16 moments": [3.6, 3.3, 1.0],
    "keras_adam lazy, bfloat16 moments": [2.75, 2.0, 30.0],
    "keras_adam, pure bfloat16": [4.5, 1.0, 5.0],
    "keras_adam lazy, pure bfloat16": [3.75, 3.0, 9.0],
    "keras_adam, weight decay": [4.0, 0.5, 4.5],
    "keras_adam, weight decay, 3 groups": [5.0, 9.0, 1.0],
    "builtin": [6.0, 6.5, 4.0],
    "no update": [1.5, 1.0, 2.0],
    "no update, bfloat16": [1.8, 0.9, 2.5],
}
# Worked by hand from the medians: (speed-up = built-in 6 / ours, ours over
# its base: keras_adam's float32 step (3; lazy 2.5 where gradients are sparse)
# for a memory format, weight decay's (4) for its groups, or None,
# share = (ours - no update of the model's policy: 1.5, bfloat16 1.8) / ours).
FIT_BY_HAND = {
    "keras_adam": (2.0, None, 0.5), "keras_adam exact": (2.0, None, 0.5),
    "keras_adam lazy": (2.4, None, 0.4),
    "keras_adam, 8bit moments": (1.0, 2.0, 0.75),
    "keras_adam lazy, 8bit moments": (1.2, 2.0, 0.7),
    "keras_adam, bfloat16 moments": (6 / 3.3, 1.1, 1 - 1.5 / 3.3),
    "keras_adam lazy, bfloat16 moments": (6 / 2.75, 1.1, 1 - 1.5 / 2.75),
    "keras_adam, pure bfloat16": (6 / 4.5, 1.5, 0.6),
    "keras_adam lazy, pure bfloat16": (1.6, 1.5, 0.52),
    "keras_adam, weight decay": (1.5, None, 1 - 1.5 / 4),
    "keras_adam, weight decay, 3 groups": (1.2, 1.25, 0.7),
}


@pytest.mark.slow  # fits two models with every optimizer variant
def test_fit_case_rows_and_columns(monkeypatch):
    import keras_adam
    from keras_adam.benchmark import fit

    # Samples are epochs of fit.STEPS steps.
    monkeypatch.setattr(timing, "time_interleaved", _planted(FIT_STEP_MS, calls=fit.STEPS))
    rows = fit.fit_steps(keras, keras_adam, repeats=3, names=("mlp", "recommender"),
                         sparse=BACKEND == "tensorflow", progress=lambda message: None,
                         group_models=("mlp",))
    # TensorFlow gives the recommender IndexedSlices gradients: exact and lazy
    # rows, and the memory formats lazy; the mlp is not timed with them, but
    # with the groups.
    sparse = BACKEND == "tensorflow"
    formats = [f"keras_adam{' lazy' if sparse else ''}, {f}"
               for f in ("8bit moments", "bfloat16 moments", "pure bfloat16")]
    groups = ["keras_adam, weight decay", "keras_adam, weight decay, 3 groups"]
    expected = [("mlp", v) for v in ["keras_adam", *groups]] + [("recommender", v) for v in (
        ["keras_adam exact", "keras_adam lazy"] if sparse else ["keras_adam"]) + formats]
    assert [(r["model"], r["variant"]) for r in rows] == expected
    for r in rows:
        speedup, vs_base, share = FIT_BY_HAND[r["variant"]]
        assert r["speedup"] == pytest.approx(speedup, rel=1e-12)
        assert r["vs_base"] == (None if vs_base is None else pytest.approx(vs_base, rel=1e-12))
        assert r["keras_adam_share"] == pytest.approx(share, rel=1e-12)
        assert r["builtin_share"] == pytest.approx(0.75, rel=1e-12)
        assert r["builtin_ms"] == {"median": 6.0, "min": 4.0, "max": 6.5}
        bare = "no update, bfloat16" if "pure" in r["variant"] else "no update"
        assert r["no_update_ms"] == {"median": sorted(FIT_STEP_MS[bare])[1],
                                     "min": min(FIT_STEP_MS[bare]),
                                     "max": max(FIT_STEP_MS[bare])}
        ours = FIT_STEP_MS[r["variant"]]
        assert r["keras_adam_ms"] == {"median": sorted(ours)[1], "min": min(ours),
                                      "max": max(ours)}
    table = fit.format_rows(rows)
    assert table.count("| recommender |") == len(expected) - 3
    mlp_row = "| mlp | keras_adam | 3.00 (2.00-30.00) | 6.00 (4.00-6.50) | 2.00x | - | 50% | 75% |"
    assert mlp_row in table
    assert f"| {formats[0]} | 5.00 (4.00-50.00) |" in table if sparse else \
        f"| {formats[0]} | 6.00 (4.00-60.00) |" in table


# ms per step of each moment format, three repeats each (as FIT_STEP_MS).
MOMENT_STEP_MS = {"float32": [4.0, 2.0, 40.0], "bfloat16": [5.0, 6.0, 1.0],
                  "8bit": [8.0, 10.0, 3.0], "pure bfloat16": [6.0, 7.0, 2.0]}


def test_moments_case_bytes_and_ratios(monkeypatch):
    import keras_adam
    from keras_adam.benchmark import cases, harnesses, moments

    monkeypatch.setattr(timing, "time_interleaved", _planted(MOMENT_STEP_MS))
    harness = harnesses.HARNESSES[BACKEND]()
    case = cases.StepCase("small", ((64, 1024), (300,)))
    rows = moments.moment_formats(keras, keras_adam, harness, harness.xla_modes, 3, 0.0,
                                  lambda message: None, case=case)
    assert [(r["format"], r["xla"]) for r in rows] == [
        (f, x) for x in harness.xla_modes
        for f in ("float32", "bfloat16", "8bit", "pure bfloat16")]
    # The closed forms: 2 moments of 4 or 2 bytes; in 8 bits the 65,536-element
    # kernel has 1 byte per code plus 4 per block of 256, the 300-element bias
    # (below min_8bit_size) keeps float32 m and v. Pure bfloat16: bfloat16 m
    # and v, and the int32 seed of the weights' stochastic rounding.
    quantized = 2 * (64 * 1024 * (1 + 4 / 256)) + 2 * 4 * 300
    expected = {"float32": 8.0, "bfloat16": 4.0, "8bit": quantized / case.parameters,
                "pure bfloat16": 4.0 + 4 / case.parameters}
    # The medians are 4, 5, 8 and 6 ms: each format's step over float32's.
    vs_float32 = {"float32": 1.0, "bfloat16": 1.25, "8bit": 2.0, "pure bfloat16": 1.5}
    for r in rows:
        assert r["bytes_per_parameter"] == pytest.approx(expected[r["format"]])
        assert r["vs_float32"] == pytest.approx(vs_float32[r["format"]], rel=1e-12)
        samples = MOMENT_STEP_MS[r["format"]]
        assert r["step_ms"] == {"median": sorted(samples)[1], "min": min(samples),
                                "max": max(samples)}
    table = moments.format_rows(rows)
    assert table.count("| 8bit |") == len(harness.xla_modes)
    assert table.count("| 8.00 (3.00-10.00) | 2.00 |") == len(harness.xla_modes)


def test_json_path_is_written_beside_the_table(tmp_path, capsys):
    path = tmp_path / "report.json"
    benchmark.main(["--cases", "mlp", "--backend", BACKEND, "--json", str(path), *TINY])
    captured = capsys.readouterr()
    report = json.loads(path.read_text())
    assert [r["case"] for r in report["results"]] == ["mlp"] * len(report["results"])
    # The table printed is the one the written report formats to.
    assert captured.out.strip() == benchmark.format_table(report).strip()
    # Progress went to stderr as the run went.
    assert "mlp xla=" in captured.err and f"results written to {path}" in captured.err


@pytest.mark.slow
def test_groups_case_times_the_same_model_with_and_without_groups(capsys):
    benchmark.main(["--cases", "groups", "--backend", BACKEND, "--json", *TINY])
    report = json.loads(capsys.readouterr().out)
    for xla in {r["xla"] for r in report["results"]}:
        rows = [r for r in report["results"] if r["xla"] == xla]
        assert sorted(r["variant"] for r in rows) == ["3-groups", "no-groups"]
        assert all(r["keras_adam_ms"]["median"] > 0 for r in rows)


@pytest.mark.backend_independent
def test_warmup_case_rows_come_from_its_processes(monkeypatch):
    """Each variant runs a process with empty caches (cold; its second model
    gives second and later), then one given the caches the first left
    (warm). Planted children's seconds, all distinct, must land in their
    columns; only `--cases warmup` runs it."""
    from keras_adam.benchmark import warmup

    caches = {}

    def child(backend, variant, cache, second):
        caches.setdefault(variant, []).append(cache)
        base = 10.0 * warmup.VARIANTS.index(variant)
        if second:
            return {"first": base + 1, "second": base + 2, "later": base + 3}
        return {"first": base + 4}

    monkeypatch.setattr(warmup, "_child", child)
    rows = warmup.run(BACKEND, progress=lambda message: None)
    assert [r["variant"] for r in rows] == list(warmup.VARIANTS)
    for i, r in enumerate(rows):
        assert (r["cold_s"], r["second_s"], r["later_s"], r["warm_s"]) == tuple(
            10.0 * i + k for k in (1, 2, 3, 4))
    # The warm process is given the cold one's cache, and each variant a new one.
    assert all(a == b for a, b in caches.values())
    assert len({a for a, _ in caches.values()}) == len(warmup.VARIANTS)
    table = warmup.format_rows(rows)
    assert "| pure bfloat16 | 31.0 | 34.0 | 32.0 | 33.0 |" in table
    assert "warmup" not in benchmark.parse_args([]).cases
    assert benchmark.parse_args(["--cases", "warmup"]).cases == ["warmup"]


def test_warmup_children_get_empty_compile_caches(monkeypatch, tmp_path):
    """A cold child starts with every compile cache empty: Inductor's and
    keras_adam's own (its compiled C loops and ops), both under the
    variant's new directory."""
    import subprocess

    from keras_adam.benchmark import warmup

    seen = []

    def fake_run(argv, env, **kwargs):
        seen.append(env)
        return subprocess.CompletedProcess(argv, 0, stdout='{"first": 1.0}\n', stderr="")

    monkeypatch.setattr(warmup.subprocess, "run", fake_run)
    warmup._child(BACKEND, "float32", str(tmp_path), second=False)
    env = seen[0]
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path)
    assert os.path.dirname(env["KERAS_ADAM_CACHE_DIR"]) == str(tmp_path)


def test_warmup_child_times_a_second_model(monkeypatch, tmp_path):
    """The child's epochs on the active backend: a first model's first epoch,
    and a second model's first and second (no timing is asserted; float32,
    the variant that compiles least: what is checked is the plumbing)."""
    from keras_adam.benchmark import warmup

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    result = warmup.epochs("float32", second=True)
    assert set(result) == {"first", "second", "later"}
    assert all(seconds > 0 for seconds in result.values())
