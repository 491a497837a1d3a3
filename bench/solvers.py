"""Solvers on EDM2-shaped networks (issue 26): distance to converged samples, and generate() wall-clock.

    python -m bench.solvers --json bench/results/solvers/edm2.json
    python -m bench.solvers --timing dpmpp_2m:16 euler:24 --json ...   # generate() at matched N vs Heun-63

Networks: the bench UNet pair (bench/unet.py, random weights, EDM preconditioning) at the CPU
sizes ("cpu-s" main, "cpu-xs" guide, 4x16x16 latents, float32), autoguidance-style w = 2.
Distance: for each solver and budget of evaluations (Heun: the most steps within it), the RMS
distance of the samples to Heun at 256 steps from the same noise, relative to their RMS.
Timing: ``generate`` (the engine, eager on a CPU) per image, each configuration run in turn in
one process, best of ``--repeats``, with Heun at 32 steps (63 evaluations) as the baseline.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from .unet import make_pair

SOLVERS = ("heun", "euler", "dpmpp_2m", "dpmpp_3m")
BUDGETS = (8, 12, 16, 24, 32)


def _steps(solver, budget):
    return (budget + 1) // 2 if solver == "heun" else budget


def _evals(solver, steps):
    return 2 * steps - 1 if solver == "heun" else steps


def distances(batch=8, guidance=2.0, seed=0, budgets=BUDGETS, solvers=SOLVERS, log=print):
    import ag_kernels

    torch.manual_seed(seed)
    net, gnet = make_pair("cpu-s", "cpu-xs", "cpu", autocast=False)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, net.img_channels, net.img_resolution, net.img_resolution, generator=gen)
    labels = torch.nn.functional.one_hot(torch.randint(net.label_dim, (batch,), generator=gen),
                                         net.label_dim).float()

    def run(solver, steps):
        with torch.no_grad():
            return ag_kernels.edm_sampler(net, noise, labels, gnet, num_steps=steps, guidance=guidance,
                                          solver=solver).double()

    converged = run("heun", 256)
    rms = converged.square().mean().sqrt().item()
    rows = []
    for solver, steps in [("heun", 32)] + [(s, _steps(s, b)) for b in budgets for s in solvers]:
        x = run(solver, steps)
        row = {"solver": solver, "steps": steps, "evals": _evals(solver, steps),
               "rel_distance": (x - converged).square().mean().sqrt().item() / rms}
        rows.append(row)
        if log:
            log(f"{solver:<9} {row['evals']:>4} {row['rel_distance']:.5f}")
    return {"networks": "bench UNet cpu-s (main) / cpu-xs (guide), random weights, float32", "batch": batch,
            "guidance": guidance, "converged": "heun 256 steps", "rows": rows}


def timing(configs, images=32, batch=16, guidance=2.0, repeats=3, log=print):
    """generate() seconds per image for each (solver, steps) in ``configs``, Heun-32 first; best of repeats."""
    import ag_kernels

    net, gnet = make_pair("cpu-s", "cpu-xs", "cpu", autocast=False)
    configs = [("heun", 32)] + [c for c in configs if c != ("heun", 32)]
    best = {c: float("inf") for c in configs}
    for _ in range(repeats):
        for solver, steps in configs:  # interleaved, so drifts of the machine hit every configuration alike
            t0 = time.perf_counter()
            for _batch in ag_kernels.generate(net, gnet, seeds=range(images), batch_size=batch, progress=False,
                                              num_steps=steps, guidance=guidance, solver=solver):
                pass
            best[(solver, steps)] = min(best[(solver, steps)], (time.perf_counter() - t0) / images)
    base = best[("heun", 32)]
    rows = []
    for (solver, steps), s in best.items():
        rows.append({"solver": solver, "steps": steps, "evals": _evals(solver, steps), "seconds_per_image": s,
                     "speedup_vs_heun63": base / s})
        if log:
            log(f"{solver:<9} N={steps:<3} evals={_evals(solver, steps):<3} {s * 1e3:8.2f} ms/image  x{base / s:.2f}")
    return {"device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "images": images, "batch": batch, "repeats": repeats, "rows": rows}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.solvers", description=__doc__.splitlines()[0])
    p.add_argument("--timing", nargs="*", default=None, help="solver:steps configurations to time against Heun-63")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args(argv)
    out = {}
    if args.timing is None:
        out["distance"] = distances()
    else:
        configs = [(c.split(":")[0], int(c.split(":")[1])) for c in args.timing]
        out["timing"] = timing(configs, images=args.images, repeats=args.repeats)
    if args.json:
        path = Path(args.json)
        old = json.loads(path.read_text()) if path.is_file() else {}
        old.update(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(old, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
