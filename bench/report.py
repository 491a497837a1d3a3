"""Turn a pytest-benchmark JSON from bench/ into results.json, a markdown table and a PNG plot.

    python bench/report.py RAW.json --out-dir DIR

Step ops: median time, GB/s (bytes that must move: each input read once, the output written
once), the share of the copy bandwidth measured in the same run, and the speed-up over the eager
formula and over ``torch.compile`` of it.  Host overhead: per op, size and D dtype, the medians of
the public op with ``out=``, the raw custom op, the eager formula into buffers and torch.compile
of it; the public op's budget ``1.5 * raw + 3 us`` and whether it is met.  Sampler: images (or
point batches) per second, the speed-up over the eager reference loop, and the measured agreement
of the two outputs.  Engine (bench/test_engine.py): the whole guided sampler per batch, the
edm2-style eager loop against GuidedSampler's eager, graph, graph+overlap and graph+overlap+compile
modes: speed-ups, first-call (capture/compile) times, agreement, and the cases that did not run
here and why.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import OrderedDict
from pathlib import Path


def _fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def _opt(value, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def _opt_time(seconds) -> str:
    return "-" if seconds is None else _fmt_time(seconds)


#: The public op's time budget from the raw op's: ``BUDGET_FACTOR * raw + BUDGET_US``.
BUDGET_FACTOR, BUDGET_US = 1.5, 3.0
#: Sizes up to this many elements are held to the budget (larger ones are bandwidth-bound).
BUDGET_MAX_N = 2**16
#: From this size on, the fast backend should be at least as fast as torch.compile of the formula.
COMPILE_MIN_N = 2**16


def _host_rows(group: str, rows: list) -> list:
    """One row per fast backend of a host-overhead group: the four medians, the budget and the ratios."""
    e0 = rows[0]["extra_info"]
    medians = {(r["extra_info"]["case"], r["extra_info"].get("backend")): r["stats"]["median"] for r in rows}
    compile_time = next((r["extra_info"].get("compile_s") for r in rows if r["extra_info"]["case"] == "compile"), None)
    eager_noalloc, compiled = medians.get(("eager_noalloc", None)), medians.get(("compile", None))
    out = []
    for (case, backend), public in medians.items():
        if case != "public":
            continue
        raw_s = medians.get(("raw", backend))
        budget = BUDGET_FACTOR * raw_s + BUDGET_US * 1e-6 if raw_s is not None else None
        out.append({
            "group": group, "device": e0["device"], "op": e0["op"], "n": e0["n"], "d_dtype": e0["d_dtype"],
            "backend": backend, "public_s": public, "raw_s": raw_s, "eager_noalloc_s": eager_noalloc,
            "compile_median_s": compiled, "compile_s": compile_time,
            "overhead_s": public - raw_s if raw_s is not None else None,
            "budget_s": budget, "budget_met": public <= budget if budget is not None else None,
            "budget_applies": e0["n"] <= BUDGET_MAX_N,
            "speedup_vs_eager_noalloc": eager_noalloc / public if eager_noalloc else None,
            "speedup_vs_compile": compiled / public if compiled else None,
            "raw_speedup_vs_compile": compiled / raw_s if compiled and raw_s else None,
        })
    return out


#: Step-op rows below this many elements are latency-bound on a GPU (bench/_common.py's LATENCY_BOUND_N).
LATENCY_BOUND_N = 2**22
#: Issue 14's goals for the whole guided sampler on an H100: speed-up over the edm2-style eager loop per batch.
ENGINE_TARGETS = {1: 3.0, 8: 2.0, 64: 1.2}
#: Issue 14's goals for the step ops from this size on: share of the copy bandwidth, and ext vs Triton.
STEP_GOAL_MIN_N, COPY_GOAL, EXT_VS_TRITON = 2**24, 0.9, 1.05
_ENGINE_ID = re.compile(r"test_engine\[(?P<device>[^-\]]+)-b(?P<batch>\d+)-(?P<case>\w+)\]")


def _engine_rows(group: str, rows: list) -> list:
    medians = {r["extra_info"]["case"]: r["stats"]["median"] for r in rows}
    out = []
    for r in rows:
        e, median = r["extra_info"], r["stats"]["median"]
        out.append({
            "group": group, "device": e["device"], "nets": e.get("nets"), "net_dtype": e.get("net_dtype"),
            "latent": e.get("latent"), "batch": e["batch"], "case": e["case"], "steps": e["steps"],
            "guidance": e["guidance"], "median_s": median, "images_per_s": e["batch"] / median,
            "speedup_vs_edm2_eager": medians["edm2_eager"] / median if "edm2_eager" in medians else None,
            "speedup_vs_eager": medians["eager"] / median if "eager" in medians else None,
            "first_call_s": e.get("first_call_s"), "mode": e.get("mode"), "fallback_reason": e.get("fallback_reason"),
            "vs": e.get("vs"), "max_rel_diff": e.get("max_rel_diff"), "max_rel_diff_fp32": e.get("max_rel_diff_fp32"),
        })
    return out


def _engine_skipped(skipped: list) -> list:
    out = []
    for s in skipped:
        m = _ENGINE_ID.search(s["test"])
        if m:
            out.append({"device": m["device"], "batch": int(m["batch"]), "case": m["case"], "reason": s["reason"]})
    return out


def summarize(raw: dict, **meta) -> dict:
    """The rows of results.json from pytest-benchmark's JSON (``raw``) and run metadata."""
    info = raw.get("machine_info", {}).get("ag_kernels", {})
    groups = OrderedDict()
    for b in raw["benchmarks"]:
        groups.setdefault(b["group"], []).append(b)
    step_rows, sampler_rows, host_rows, engine_rows = [], [], [], []
    for group, rows in groups.items():
        if group.startswith("host "):
            host_rows += _host_rows(group, rows)
            continue
        if group.startswith("engine "):
            engine_rows += _engine_rows(group, rows)
            continue
        medians = {r["extra_info"]["case"]: _median(r) for r in rows}
        if group.startswith("sampler"):
            for r in rows:
                e, median = r["extra_info"], r["stats"]["median"]
                sampler_rows.append({
                    "group": group, "device": e["device"], "pair": e["pair"], "nets": e.get("nets"), "batch": e["batch"], "case": e["case"],
                    "steps": e["steps"], "guidance": e["guidance"], "median_s": median,
                    "images_per_s": e["batch"] / median,
                    "speedup_vs_eager": medians["eager"] / median if "eager" in medians else None,
                    "max_rel_diff_vs_eager": e.get("max_rel_diff_vs_eager"),
                    "max_rel_diff_vs_eager_fp32": e.get("max_rel_diff_vs_eager_fp32"),
                })
            continue
        copy_gbs = None
        if "copy" in medians:
            copy = next(r for r in rows if r["extra_info"]["case"] == "copy")
            copy_gbs = copy["extra_info"]["bytes"] / medians["copy"] / 1e9
        for r in rows:
            e, median = r["extra_info"], _median(r)
            gbs = e["bytes"] / median / 1e9
            row = {
                "group": group, "device": e["device"], "op": e["op"], "n": e["n"], "d_dtype": e["d_dtype"], "case": e["case"],
                "median_s": median, "gb_per_s": gbs,
                "copy_fraction": gbs / copy_gbs if copy_gbs and e["case"] != "copy" else None,
                "speedup_vs_eager": medians["eager"] / median if "eager" in medians and e["case"] != "copy" else None,
                "speedup_vs_compile": medians["compile"] / median if "compile" in medians and e["case"] != "copy" else None,
                "compile_s": e.get("compile_s"),
            }
            if e.get("timing") == "cuda-events":  # GPU rows: how they were timed, and which are latency-bound
                row.update(timing="cuda-events", latency_bound=e.get("latency_bound"),
                           launches_per_round=e.get("launches_per_round"), buffer_sets=e.get("buffer_sets"),
                           rotating_bytes=e.get("rotating_bytes"))
            step_rows.append(row)
    host_rows.sort(key=lambda r: (r["device"], r["op"], r["backend"], r["d_dtype"] != "float32", r["d_dtype"], r["n"]))
    order = {c: i for i, c in enumerate(("edm2_eager", "eager", "graph", "graph_overlap", "graph_overlap_compile"))}
    engine_rows.sort(key=lambda r: (r["device"], r["batch"], order.get(r["case"], len(order)), r["case"]))
    return {**info, **meta, "step_ops": step_rows, "host_overhead": host_rows, "sampler": sampler_rows,
            "engine": engine_rows, "engine_skipped": _engine_skipped(raw.get("skipped", []))}


def _median(r) -> float:
    """A benchmark's per-call time: the CUDA-event median where the GPU timing recorded one, else pytest-benchmark's."""
    return r["extra_info"].get("event_median_s", r["stats"]["median"])


def _count(rows, test) -> str:
    return f"{sum(1 for r in rows if test(r))} of {len(rows)}"


def _host_markdown(rows: list) -> list:
    lines = [
        "## Host overhead",
        "",
        "Per call, all cases side by side in one run. `public`: `ag_kernels.<op>(..., out=out, backend=B)`; "
        "`raw`: B's registered custom op called directly (`torch.ops.ag_kernels.<op>`; `ag_kernels_triton` for "
        "Triton); `eager_noalloc`: the eager formula into preallocated buffers; `compile`: `torch.compile` of the "
        f"formula. `overhead` = public - raw; `budget` = {BUDGET_FACTOR} x raw + {BUDGET_US:g} us, held for sizes up to "
        f"2^{int(math.log2(BUDGET_MAX_N))} (`met?`; larger sizes in parentheses); `x eager_noalloc` and "
        "`x compile` are public's speed-ups (>= 1: public is faster).",
        "",
        "| op | elements | D dtype | backend | public | raw | overhead | eager_noalloc | compile | budget | met? "
        "| x eager_noalloc | x compile |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in rows:
        met = _opt(r["budget_met"], "{}").replace("True", "yes").replace("False", "**no**")
        if not r["budget_applies"]:
            met = f"({met.strip('*')})"
        cells = [r["op"], f"2^{int(math.log2(r['n']))}", r["d_dtype"], r["backend"], _fmt_time(r["public_s"]),
                 *map(_opt_time, (r["raw_s"], r["overhead_s"], r["eager_noalloc_s"], r["compile_median_s"], r["budget_s"])),
                 met,
                 _opt(r["speedup_vs_eager_noalloc"], "{:.2f}"), _opt(r["speedup_vs_compile"], "{:.2f}")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for backend in sorted({r["backend"] for r in rows}):
        mine = [r for r in rows if r["backend"] == backend]
        small = [r for r in mine if r["budget_applies"] and r["budget_met"] is not None]
        vs_eager = [r for r in mine if r["speedup_vs_eager_noalloc"] is not None]
        large = [r for r in mine if r["n"] >= COMPILE_MIN_N and r["speedup_vs_compile"] is not None]
        met = _count(small, lambda r: r["budget_met"])
        not_slower = _count(vs_eager, lambda r: r["speedup_vs_eager_noalloc"] >= 1)
        vs_compile = _count(large, lambda r: r["speedup_vs_compile"] >= 1)
        lines.append(
            f"- `{backend}`: within budget at {met} configurations up to 2^{int(math.log2(BUDGET_MAX_N))}; "
            f"not slower than eager_noalloc at {not_slower}; "
            f"not slower than compile at {vs_compile} from 2^{int(math.log2(COMPILE_MIN_N))} on."
        )
    lines.append("")
    return lines


def markdown(summary: dict) -> str:
    lines = [
        f"# ag_kernels benchmarks: {summary.get('device')}",
        "",
        f"torch {summary.get('torch')}, triton {summary.get('triton')}, ext CPU kernels {summary.get('cpu_isa') or '-'}, "
        f"{summary.get('date')}; "
        f"profile {summary.get('profile')}; command `{summary.get('command')}`",
        "",
        "Medians of pytest-benchmark rounds; every case of a group ran side by side in one run on the same tensors.",
        "",
    ]
    if summary.get("minutes") is not None:
        lines[-2] += f" The whole run took {summary['minutes']} min."
    if summary.get("incomplete"):
        lines += [f"**Incomplete: {summary['incomplete']}.** Rows of cases that failed before their timing are "
                  "missing; see the run's log.", ""]
    if summary["step_ops"]:
        lines += [
            "## Step ops",
            "",
            "GB/s counts the bytes that must move (each input read once, the output written once). "
            "`eager` is the formula as an eager sampler writes it (cast, lerp, subtract, divide, multiply, add); "
            "`compile` is `torch.compile` of that formula (compile time in its own column); `eager_noalloc` the "
            "same ops into preallocated buffers; `<backend>` writes into `out=`, `<backend>_alloc` returns a new tensor.",
            "",
            "| op | elements | D dtype | case | median | GB/s | of copy | x eager | x compile | compile time |",
            "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        if any(r.get("timing") == "cuda-events" for r in summary["step_ops"]):
            lines[-2:-2] = [
                "On the GPU each median is per launch, from CUDA events around blocks of launches that cycle "
                "through buffer sets of at least four times the L2 (no synchronize per launch), and `copy` is "
                f"timed the same way; rows below 2^{int(math.log2(LATENCY_BOUND_N))} elements are marked "
                "*latency-bound*: a launch takes a few microseconds there, whatever the bandwidth.",
                "",
            ]
        for r in summary["step_ops"]:
            elements = f"2^{int(math.log2(r['n']))} ({r['n']})" + (" *latency-bound*" if r.get("latency_bound") else "")
            cells = [r["op"], elements, r["d_dtype"], r["case"], _fmt_time(r["median_s"]),
                     f"{r['gb_per_s']:.1f}", _opt(r["copy_fraction"], "{:.0%}"), _opt(r["speedup_vs_eager"], "{:.2f}"),
                     _opt(r["speedup_vs_compile"], "{:.2f}"), _opt(r["compile_s"], "{:.1f} s")]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines += _step_goals(summary["step_ops"])
    if summary.get("host_overhead"):
        lines += _host_markdown(summary["host_overhead"])
    if summary["sampler"]:
        lines += [
            "## Whole sampler",
            "",
            "`eager`: `ag_kernels.kernels.reference.torch_edm_sampler` (the published algorithm op by op); "
            "`ag_kernels`: `ag_kernels.edm_sampler`. Same networks, noise and labels; Heun, guidance 2.1. "
            "`max rel diff` is max |a - b| / max |b| of the two outputs in this run; for the bf16 UNet pair, "
            "`fp32 check` is the same with autocast off (asserted <= 1e-5; bf16 roundings flip between samplers, "
            "so the bf16 figure is only reported).",
            "",
            "| nets | batch | steps | case | median | samples/s | x eager | max rel diff | fp32 check |",
            "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in summary["sampler"]:
            cells = [r["nets"], str(r["batch"]), str(r["steps"]), r["case"], _fmt_time(r["median_s"]),
                     f"{r['images_per_s']:.1f}", _opt(r["speedup_vs_eager"], "{:.2f}"),
                     _opt(r["max_rel_diff_vs_eager"], "{:.1e}"), _opt(r["max_rel_diff_vs_eager_fp32"], "{:.1e}")]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if summary.get("engine") or summary.get("engine_skipped"):
        lines += _engine_markdown(summary.get("engine", []), summary.get("engine_skipped", []))
    return "\n".join(lines)


def _step_goals(rows: list) -> list:
    """Issue 14's step-op goals, counted over the configurations from STEP_GOAL_MIN_N elements on."""
    large = [r for r in rows if r["n"] >= STEP_GOAL_MIN_N]
    lines = []
    for backend in ("ext", "triton"):
        mine = [r for r in large if r["case"] == backend]
        if not mine:
            continue
        copy = [r for r in mine if r["copy_fraction"] is not None]
        comp = [r for r in mine if r["speedup_vs_compile"] is not None]
        lines.append(f"- `{backend}` from 2^{int(math.log2(STEP_GOAL_MIN_N))} elements: at >= {COPY_GOAL:.0%} of the copy "
                     f"bandwidth in {_count(copy, lambda r: r['copy_fraction'] >= COPY_GOAL)} configurations; "
                     f"at least as fast as compile in {_count(comp, lambda r: r['speedup_vs_compile'] >= 1)}.")
    medians = {(r["op"], r["n"], r["d_dtype"], r["case"]): r["median_s"] for r in large}
    pairs = [(v, medians[k[:3] + ("triton",)]) for k, v in medians.items() if k[3] == "ext" and k[:3] + ("triton",) in medians]
    if pairs:
        lines.append(f"- `ext` within {EXT_VS_TRITON - 1:.0%} of `triton` or faster in "
                     f"{sum(1 for e, t in pairs if e <= EXT_VS_TRITON * t)} of {len(pairs)} configurations from "
                     f"2^{int(math.log2(STEP_GOAL_MIN_N))} elements.")
    return lines + [""] if lines else []


def _engine_markdown(rows: list, skipped: list) -> list:
    lines = [
        "## Engine: whole guided sampler",
        "",
        "`edm2_eager`: `ag_kernels.kernels.reference.torch_edm_sampler`, the EDM2 reference loop op by op (the baseline). "
        "`eager`: `GuidedSampler(cuda_graph=False, overlap=False)`; `graph`: `cuda_graph=True`; `graph_overlap`: "
        "graphs with the guide on a second stream; `graph_overlap_compile`: also `compile=True`. Same networks, noise "
        "and labels; Heun, guidance 2.0. `first call`: the first call of the case, timed on its own and not in the "
        "median (capture for graphs, compile and capture for compile, lazy initialization for eager). "
        "`max rel diff` (max |a - b| / max |b|) is against the case in `vs`, with the 16-bit networks (only "
        "reported: a last-bit difference can flip a 16-bit rounding inside a network); `fp32 check` the same with "
        "float32 networks, asserted <= 1e-5 (`-`: not checked at this batch or case).",
        "",
        "| nets | batch | case | median | samples/s | x edm2_eager | x eager | first call | mode | vs | max rel diff | fp32 check |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: |",
    ]
    for r in rows:
        mode = r["mode"] or "-"
        if r["case"].startswith("graph") and r["mode"] != "graph":
            mode = f"**{mode}: {r['fallback_reason']}**"
        cells = [r["nets"] or "-", str(r["batch"]), r["case"], _fmt_time(r["median_s"]), f"{r['images_per_s']:.2f}",
                 _opt(r["speedup_vs_edm2_eager"], "{:.2f}"), _opt(r["speedup_vs_eager"], "{:.2f}"),
                 _opt_time(r["first_call_s"]), mode, r["vs"] or "-",
                 _opt(r["max_rel_diff"], "{:.1e}"), _opt(r["max_rel_diff_fp32"], "{:.1e}")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    by_batch = OrderedDict()
    for r in rows:
        if r["case"] != "edm2_eager" and r["speedup_vs_edm2_eager"] is not None:
            by_batch.setdefault((r["device"], r["batch"]), []).append(r)
    for (device, batch), mine in by_batch.items():
        best = max(mine, key=lambda r: r["speedup_vs_edm2_eager"])
        target = ENGINE_TARGETS.get(batch)
        goal = ""
        if target is not None and device == "cuda":  # the goals are for a GPU; a CPU run is not compared
            verdict = "met" if best["speedup_vs_edm2_eager"] >= target else "**not met**"
            goal = f"; issue 14's goal on an H100 is >= {target:g}x: {verdict}"
        lines.append(f"- batch {batch}: fastest `{best['case']}`, {best['speedup_vs_edm2_eager']:.2f}x the edm2-style eager loop{goal}.")
    if by_batch:
        lines.append("")
    if skipped:
        reasons = OrderedDict()
        for s in skipped:
            reasons.setdefault(s["reason"], []).append(s)
        lines.append("Not run here:")
        for reason, items in reasons.items():
            cases = OrderedDict((s["case"], None) for s in items)
            batches = sorted({s["batch"] for s in items})
            lines.append(f"- {', '.join(f'`{c}`' for c in cases)} (batch {', '.join(map(str, batches))}): {reason}")
        lines.append("")
    return lines


def plot(summary: dict, path) -> Path:
    """GB/s against size for each op and D dtype, host-overhead times, and the sampler speed-ups, in one PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = OrderedDict()
    for r in summary["step_ops"]:
        panels.setdefault((r["op"], r["d_dtype"]), []).append(r)
    host_panels = OrderedDict()
    for r in summary.get("host_overhead", []):
        if r["d_dtype"] == "float32":
            host_panels.setdefault((r["op"], r["backend"]), []).append(r)
    engine = [r for r in summary.get("engine", []) if r["case"] != "edm2_eager" and r["speedup_vs_edm2_eager"] is not None]
    ncols = len(panels) + len(host_panels) + (1 if summary["sampler"] else 0) + (1 if engine else 0)
    fig, axes = plt.subplots(1, max(ncols, 1), figsize=(4.2 * max(ncols, 1), 3.8), squeeze=False)
    axes = list(axes[0])
    for ax, ((op, dtype), rows) in zip(axes, panels.items()):
        cases = OrderedDict()
        for r in rows:
            cases.setdefault(r["case"], []).append((r["n"], r["gb_per_s"]))
        for case, pts in cases.items():
            pts.sort()
            style = "--" if case in ("copy",) else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3, label=case)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("elements")
        ax.set_ylabel("GB/s (bytes that must move)")
        ax.set_title(f"{op}, D {dtype}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax, ((op, backend), rows) in zip(axes[len(panels):], host_panels.items()):
        rows = sorted(rows, key=lambda r: r["n"])
        for key, label, style in (("public_s", "public", "-"), ("raw_s", "raw", "-"), ("eager_noalloc_s", "eager_noalloc", "-"),
                                  ("compile_median_s", "compile", "-"), ("budget_s", "budget", "--")):
            pts = [(r["n"], r[key] * 1e6) for r in rows if r[key] is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("elements")
        ax.set_ylabel("us per call")
        ax.set_title(f"host overhead: {op} ({backend}), D float32", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if summary["sampler"]:
        ax = axes[len(panels) + len(host_panels)]
        rows = [r for r in summary["sampler"] if r["case"] != "eager" and r["speedup_vs_eager"] is not None]
        labels = [f"{r['pair']} b{r['batch']}" for r in rows]
        ax.bar(range(len(rows)), [r["speedup_vs_eager"] for r in rows], color="tab:green")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("edm_sampler speed-up vs eager loop")
        ax.set_title("whole sampler", fontsize=10)
    if engine:
        ax = axes[ncols - 1]
        ax.bar(range(len(engine)), [r["speedup_vs_edm2_eager"] for r in engine], color="tab:blue")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(engine)))
        ax.set_xticklabels([f"b{r['batch']} {r['case']}" for r in engine], rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("speed-up vs edm2-style eager loop")
        ax.set_title("engine: whole guided sampler", fontsize=10)
    fig.suptitle(f"{summary.get('device')} - torch {summary.get('torch')} - {summary.get('date')}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(raw: dict, out_dir, **meta) -> dict:
    """results.json, results.md and results.png in ``out_dir``; returns the summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(raw, **meta)
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "results.md").write_text(markdown(summary))
    plot(summary, out_dir / "results.png")
    return summary


def read_rows(path) -> dict:
    """A pytest-benchmark-shaped dict from the rows that bench/conftest.py appends, one JSON line per
    finished benchmark ($AG_BENCH_ROWS), for a run that was killed before pytest-benchmark wrote its JSON."""
    raw = {"benchmarks": [], "skipped": [], "machine_info": {}}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # the last line of a killed run may be cut short
            continue
        if "benchmark" in record:
            raw["benchmarks"].append(record["benchmark"])
        elif "skipped" in record:
            raw["skipped"].append(record["skipped"])
        elif "machine_info" in record:
            raw["machine_info"] = record["machine_info"]
    return raw


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="?", help="output of pytest --benchmark-json")
    parser.add_argument("--rows", help="instead: the rows file of a run that was stopped ($AG_BENCH_ROWS)")
    parser.add_argument("--incomplete", help="say in the results why the run is incomplete")
    parser.add_argument("--out-dir", required=True, help="where to write results.json, results.md, results.png")
    args = parser.parse_args(argv)
    if (args.json is None) == (args.rows is None):
        parser.error("give either a pytest-benchmark JSON or --rows ROWS.jsonl")
    raw = read_rows(args.rows) if args.rows else json.loads(Path(args.json).read_text())
    info = raw.get("machine_info", {}).get("ag_kernels", {})
    extra = {"incomplete": args.incomplete} if args.incomplete else {}
    write(raw, args.out_dir, device=info.get("device"), profile=info.get("profile") if args.rows else None,
          command=None, **extra)
    print((Path(args.out_dir) / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
