"""Runs the chosen cases on one backend and formats the report.

Both optimizers run in the same process on the same variables' shapes, with
gradients precomputed, so only the update is timed, the way each backend's
trainer runs it (`harnesses`). The table gives, per case, variant and XLA
mode, the median and min-max over repeats, the speed-up of keras_adam over
the built-in (ratio of medians), and the effective memory traffic against the
bandwidth measured in the same run (`cases.derive`).
"""

import os
import statistics
import sys

from keras_adam.benchmark import cases as case_table
from keras_adam.benchmark import fit
from keras_adam.benchmark import harnesses
from keras_adam.benchmark import moments
from keras_adam.benchmark import monitor
from keras_adam.benchmark import sharding
from keras_adam.benchmark import timing
from keras_adam.benchmark import warmup


def progress(message):
    print(message, file=sys.stderr, flush=True)


def run(args):
    """The report (a dict, JSON-ready) for parsed command-line `args`."""
    import keras

    import keras_adam

    if keras.backend.backend() != args.backend:
        raise RuntimeError(
            f"Keras runs on {keras.backend.backend()!r}, not {args.backend!r}: "
            "run through main(), which restarts with KERAS_BACKEND set"
        )

    options = {} if args.intra_op_threads is None else {"intra_op_threads": args.intra_op_threads}
    harness = harnesses.HARNESSES[args.backend](**options)
    progress(f"backend {args.backend}; measuring memory bandwidth ...")
    bandwidth = harness.bandwidth(args.repeats, args.min_seconds)
    progress(f"  {bandwidth:.1f} GB/s")
    wanted = {"both": (False, True), "off": (False,), "on": (True,)}[args.xla]
    results, monitor_result, sharding_result, fit_rows = [], None, None, None
    moment_rows = memory_rows = warmup_rows = None
    for name in args.cases:
        if name == case_table.WARMUP:
            warmup_rows = warmup.run(args.backend, progress)
            continue
        if name == case_table.MEMORY:
            progress("    memory: training bytes per parameter ...")
            memory_rows = moments.memory_rows(keras, keras_adam)
            continue
        if name == case_table.MOMENTS:
            modes = [x for x in harness.xla_modes if x in wanted]
            moment_rows = []
            for case_name in args.moments_on:
                moment_rows += moments.moment_formats(
                    keras, keras_adam, harness, modes, args.repeats, args.min_seconds, progress,
                    case=case_table.CASES[case_name])
            continue
        if name == case_table.FIT:
            fit_rows = fit.fit_steps(keras, keras_adam, args.repeats, names=args.fit_models,
                                     sparse=harness.sparse, progress=progress)
            continue
        if name == case_table.MONITOR:
            progress("   monitor: AdamMonitor on the mlp model's epochs ...")
            monitor_result = monitor.monitor_overhead(keras, keras_adam, args.repeats)
            continue
        if name == case_table.SHARDING:
            if args.backend != "jax":
                progress(f"{name:>10}: skipped (shard_state applies on jax only)")
                continue
            progress(f"{name:>10}: shard_state on {args.devices} devices, in a subprocess ...")
            sharding_result = sharding.run_in_subprocess(
                args.devices, args.repeats, args.min_seconds)
            continue
        case = case_table.CASES[name]
        if case.sparse_rows and not harness.sparse:
            progress(f"{name:>10}: skipped ({args.backend} has no sparse gradients)")
            continue
        grads = harness.gradients(case)
        for xla in case.xla_modes(harness.xla_modes, wanted):
            progress(f"{name:>10} xla={'on' if xla else 'off'} ...")
            results += _time_case(keras, keras_adam, harness, case, grads, xla, args, bandwidth)
    return {
        "backend": args.backend, "bandwidth_gb_per_s": bandwidth, "repeats": args.repeats,
        "cpus": os.cpu_count(), "intra_op_threads": getattr(harness, "intra_op_threads", None),
        # XLA's own flags change its programs (docs/speed.md: region analysis);
        # torch compiles without XLA.
        "xla_flags": None if args.backend == "torch" else os.environ.get("XLA_FLAGS") or None,
        "c_loop": getattr(args, "c_loop", "on"),
        "keras": keras.__version__,
        "framework": _framework_version(args.backend),
        "keras_adam": keras_adam.__version__, "results": results, "monitor": monitor_result,
        "sharding": sharding_result, "fit": fit_rows, "moments": moment_rows,
        "memory": memory_rows, "warmup": warmup_rows,
    }


def _time_case(keras, keras_adam, harness, case, grads, xla, args, bandwidth):
    """One row per variant: keras_adam's variants and the built-in, timed interleaved."""
    steps = {name: harness.step(keras, keras_adam.Adam(**kwargs), case.shapes, grads, xla)
             for name, kwargs in case.variants.items()}
    steps["builtin"] = harness.step(keras, keras.optimizers.Adam(), case.shapes, grads, xla)
    reference = getattr(harness, "reference_step", None)
    if reference is not None and not case.sparse_rows:
        steps["reference"] = reference(case.shapes, grads)
    timings = timing.time_interleaved(steps, args.repeats, args.min_seconds)
    builtin = statistics.median(timings["builtin"])
    rows = []
    for name, kwargs in case.variants.items():
        ours = statistics.median(timings[name])
        row = {
            "case": case.name, "variant": name, "xla": xla, "parameters": case.parameters,
            "variables": len(case.shapes),
            "keras_adam_ms": timing.summary(timings[name]),
            "builtin_ms": timing.summary(timings["builtin"]),
            **case_table.derive(ours, builtin, case.touched(kwargs), bandwidth),
        }
        if "reference" in timings:
            row["reference_ms"] = timing.summary(timings["reference"])
            row["vs_reference"] = ours / statistics.median(timings["reference"])
        rows.append(row)
    return rows


def _framework_version(backend):
    module = __import__(backend)
    return f"{backend} {module.__version__}"


def format_table(report):
    """The report as a Markdown table (what the README quotes)."""
    header = [
        f"backend {report['backend']}, {report['cpus']} CPUs, keras {report['keras']}, "
        f"{report['framework']}; measured bandwidth "
        f"{report['bandwidth_gb_per_s']:.1f} GB/s; {report['repeats']} repeats"
        + (f"; intra-op threads {report['intra_op_threads']}"
           if report.get("intra_op_threads") else "")
        + (f"; XLA_FLAGS={report['xla_flags']}" if report.get("xla_flags") else "")
        + ("; C loop off" if report.get("c_loop") == "off" else ""),
        "",
        "| case | variant | XLA | params | keras_adam ms (min-max) | built-in ms (min-max) "
        "| speed-up | keras_adam GB/s | % of bandwidth | roofline ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    # Only the non-step cases (monitor, sharding) ran: no step table.
    lines = header if report["results"] else header[:1]
    with_reference = [r for r in report["results"] if "reference_ms" in r]
    if with_reference:
        lines[2] += " reference ms (min-max) | keras_adam / reference |"
        lines[3] += "---|---|"
    for r in report["results"]:
        ours, builtin = r["keras_adam_ms"], r["builtin_ms"]
        lines.append(
            f"| {r['case']} | {r['variant']} | {'on' if r['xla'] else 'off'} | {r['parameters']:,} "
            f"| {ours['median']:.2f} ({ours['min']:.2f}-{ours['max']:.2f}) "
            f"| {builtin['median']:.2f} ({builtin['min']:.2f}-{builtin['max']:.2f}) "
            f"| {r['speedup']:.2f}x | {r['keras_adam_gb_per_s']:.1f} "
            f"| {100 * r['fraction_of_bandwidth']:.0f}% | {r['roofline_ms']:.2f} |"
        )
        if "reference_ms" in r:
            ref = r["reference_ms"]
            lines[-1] += (f" {ref['median']:.2f} ({ref['min']:.2f}-{ref['max']:.2f}) "
                          f"| {r['vs_reference']:.2f} |")
    result = report.get("monitor")
    if result:
        w, wo = result["epoch_ms_with"], result["epoch_ms_without"]
        lines += ["", f"AdamMonitor on the mlp model (32 steps an epoch): epoch "
                  f"{wo['median']:.0f} ms ({wo['min']:.0f}-{wo['max']:.0f}) without, "
                  f"{w['median']:.0f} ms ({w['min']:.0f}-{w['max']:.0f}) with: "
                  f"overhead {100 * result['overhead']:+.1f}%"]
    if report.get("fit"):
        lines += ["", fit.format_rows(report["fit"])]
    if report.get("moments"):
        lines += ["", moments.format_rows(report["moments"])]
    if report.get("memory"):
        lines += ["", moments.format_memory_rows(report["memory"])]
    result = report.get("sharding")
    if result:
        lines += ["", _sharding_table(result)]
    if report.get("warmup"):
        lines += ["", warmup.format_rows(report["warmup"])]
    return "\n".join(lines)


def _sharding_table(result):
    whole = result["whole"]
    lines = [
        f"shard_state on {result['devices']} {result['device_kind']} devices "
        f"(DataParallel; {result['parameters']:,}-parameter MLP, batch {result['batch']}, "
        "train_on_batch steps):",
        "",
        "| state | MB per device | MB in all | step ms (min-max) | vs whole "
        "| collectives in the train step |",
        "|---|---|---|---|---|---|",
    ]
    for variant in ("whole", "sharded"):
        r = result[variant]
        ms = r["step_ms"]
        collectives = ", ".join(f"{op} {n}" for op, n in r["collectives"].items() if n)
        lines.append(
            f"| {variant} | {r['state_bytes_per_device'] / 1e6:.1f} | {r['state_bytes'] / 1e6:.1f} "
            f"| {ms['median']:.1f} ({ms['min']:.1f}-{ms['max']:.1f}) "
            f"| {ms['median'] / whole['step_ms']['median']:.2f} | {collectives or 'none'} |")
    return "\n".join(lines)
