"""AutoguidedPipeline against diffusers' own loop, with CFG: the time per step each adds on top of the network calls.

Run it on its own (it is not part of ``python -m bench``'s standard set, whose report has no
table for it), then summarize:

    python -m pytest bench/diffusers_pipeline.py --benchmark-only --benchmark-json=OUT.json
    python bench/diffusers_pipeline.py OUT.json        # per-step times and the ratio, as a table

Same pipeline, scheduler, prompt embeddings, latents and steps on both sides, guidance_scale 5
(CFG: the batched [uncond, cond] call), autoguidance off, output_type="latent".  The UNet is a
tiny UNet2DConditionModel whose forward is replaced by a cheap stand-in (one multiply of its
input), so what is timed is the loop's own work: the scheduler / solver arithmetic, the CFG blend,
the Python around them, and the stand-in's one op (the same on both sides).  Each (scheduler,
latent size) runs at LO and HI steps; the time per step is the slope (t_HI - t_LO) / (HI - LO) of
the fastest rounds (the least disturbed by other work on the machine),
which leaves out what a call does once (prompt encoding, set_timesteps, ...).  The cases are
``diffusers`` (StableDiffusionPipeline.__call__) and ``ag_kernels`` (AutoguidedPipeline.from_pipe(pipe)(...)).
Before the timing each configuration checks that both give the same latents (2e-5 of the largest magnitude).

Environment: AG_BENCH_DIFFUSERS_STEPS ("LO,HI", default 10,40), AG_BENCH_DIFFUSERS_SIZES
("BxH,..." latent batch x side, default 1x8,1x64,2x64,1x128: tiny, SD at 512 px, two images,
SDXL at 1024 px).
"""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import _tiny_diffusers as T  # noqa: E402

import ag_kernels  # noqa: E402

STEPS = tuple(int(v) for v in os.environ.get("AG_BENCH_DIFFUSERS_STEPS", "10,40").split(","))
SIZES = [tuple(int(v) for v in s.split("x")) for s in os.environ.get("AG_BENCH_DIFFUSERS_SIZES",
                                                                       "1x8,1x64,2x64,1x128").split(",")]
SCHEDULERS = [("EulerDiscreteScheduler", {"use_karras_sigmas": True}), ("DPMSolverMultistepScheduler", {}),
              ("HeunDiscreteScheduler", {})]
CFG = 5.0


def _standin(sample, timestep, *args, **kwargs):
    return (sample * 0.05,)


def _pipe(name, kw):
    pipe = T.sd_pipeline(name, **kw)
    pipe.unet.forward = types.MethodType(lambda self, *a, **k: _standin(*a, **k), pipe.unet)
    return pipe


@pytest.mark.parametrize("case", ["diffusers", "ag_kernels"])
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("batch,side", SIZES, ids=[f"{b}x4x{s}x{s}" for b, s in SIZES])
@pytest.mark.parametrize("scheduler,kw", SCHEDULERS, ids=[s for s, _ in SCHEDULERS])
def test_loop_overhead(benchmark, scheduler, kw, batch, side, steps, case):
    torch.set_grad_enabled(False)
    pipe = _pipe(scheduler, kw)
    e, lat = T.embeds(batch), T.latents(batch, size=side)
    call = dict(e, num_inference_steps=steps, guidance_scale=CFG, output_type="latent")
    ours = ag_kernels.AutoguidedPipeline.from_pipe(pipe)
    ref = pipe(latents=lat.clone(), **call).images
    out = ours(latents=lat.clone(), **call).images
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err <= 2e-5, err
    fn = (lambda: pipe(latents=lat, **call)) if case == "diffusers" else (lambda: ours(latents=lat, **call))
    benchmark.group = f"diffusers-loop {scheduler} {batch}x4x{side}x{side} steps={steps}"
    benchmark.extra_info.update(case=case, steps=steps, batch=batch, side=side, scheduler=scheduler,
                                max_rel_diff=err)
    fn()
    benchmark(fn)


def summarize(path):
    """Markdown table of the per-step times (slope of the fastest rounds between the two step counts), ours / diffusers."""
    import json

    rows = {}
    for b in json.load(open(path))["benchmarks"]:
        e = b["extra_info"]
        # The fastest round: on a shared machine the others carry other jobs' interference, which
        # the slope between two step counts would amplify.
        rows[e["scheduler"], e["batch"], e["side"], e["case"], e["steps"]] = b["stats"]["min"]
    lo, hi = STEPS
    lines = ["| scheduler | latents | diffusers us/step | ag_kernels us/step | ratio (ours / diffusers) |",
             "|---|---|---|---|---|"]
    for sched, batch, side in sorted({k[:3] for k in rows}):
        per = {c: (rows[sched, batch, side, c, hi] - rows[sched, batch, side, c, lo]) / (hi - lo) * 1e6
               for c in ("diffusers", "ag_kernels")}
        lines.append(f"| {sched} | {batch}x4x{side}x{side} | {per['diffusers']:.0f} | {per['ag_kernels']:.0f} | "
                     f"{per['ag_kernels'] / per['diffusers']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(sys.argv[1]))
