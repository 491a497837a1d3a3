"""Solvers on EDM2-shaped networks (issue 26): distance to converged samples, and generate() wall-clock.

    python -m bench.solvers --json bench/results/solvers/edm2.json
    python -m bench.solvers --timing dpmpp_2m:16 euler:24 --json ...   # generate() at matched N vs Heun-63
    python -m bench.solvers --schedules --json bench/results/solvers/edm2.json   # schedules at 8 and 10 evals
    python -m bench.solvers --timing dpmpp_3m:10:tuned.json ...   # a schedule file (or karras/logsnr) per config

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

from ag_kernels.sampling._settings import SOLVERS

from .unet import make_pair

BUDGETS = (8, 12, 16, 24, 32)
SCHEDULE_BUDGETS = (8, 10)


def _steps(solver, budget):
    return (budget + 1) // 2 if solver == "heun" else budget


def _evals(solver, steps):
    return 2 * steps - 1 if solver == "heun" else steps


def _inputs(net, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, net.img_channels, net.img_resolution, net.img_resolution, generator=gen)
    labels = torch.nn.functional.one_hot(torch.randint(net.label_dim, (batch,), generator=gen),
                                         net.label_dim).float()
    return noise, labels


def distances(batch=8, guidance=2.0, seed=0, budgets=BUDGETS, solvers=SOLVERS, log=print):
    import ag_kernels

    torch.manual_seed(seed)
    net, gnet = make_pair("cpu-s", "cpu-xs", "cpu", autocast=False)
    noise, labels = _inputs(net, batch, seed)

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


def schedule_distances(batch=8, guidance=2.0, seed=0, budgets=SCHEDULE_BUDGETS, solvers=SOLVERS, max_trials=120,
                       log=print):
    """Distance to Heun-256 per solver and budget on the Karras, log-SNR-uniform and tuned schedules.

    The same networks and evaluation noise as :func:`distances`; the tuned schedules are fitted by
    :func:`ag_kernels.tune_schedule` on calibration noise of another seed (``seed + 1``), one per
    solver (not Heun or Euler) and budget, and their fitting time is recorded.
    """
    import ag_kernels

    torch.manual_seed(seed)
    net, gnet = make_pair("cpu-s", "cpu-xs", "cpu", autocast=False)
    noise, labels = _inputs(net, batch, seed)
    calibration, calibration_labels = _inputs(net, batch, seed + 1)

    def run(solver, **levels):
        with torch.no_grad():
            return ag_kernels.edm_sampler(net, noise, labels, gnet, guidance=guidance, solver=solver, **levels).double()

    converged = run("heun", num_steps=256)
    rms = converged.square().mean().sqrt().item()
    rows = []

    def add(solver, steps, schedule, x, **extra):
        row = {"solver": solver, "steps": steps, "evals": _evals(solver, steps), "schedule": schedule,
               "rel_distance": (x - converged).square().mean().sqrt().item() / rms, **extra}
        rows.append(row)
        if log:
            log(f"{solver:<9} {row['evals']:>4} {schedule:<7} {row['rel_distance']:.5f}", flush=True)

    add("heun", 32, "karras", run("heun", num_steps=32))
    for budget in budgets:
        for solver in solvers:
            steps = _steps(solver, budget)
            add(solver, steps, "karras", run(solver, num_steps=steps))
            add(solver, steps, "logsnr", run(solver, num_steps=steps, schedule="logsnr"))
            if solver in ("heun", "euler"):
                continue
            t0 = time.perf_counter()
            sigmas = ag_kernels.tune_schedule(net, calibration, calibration_labels, gnet, guidance=guidance,
                                              num_steps=steps, solver=solver, max_trials=max_trials)
            seconds = time.perf_counter() - t0
            add(solver, steps, "tuned", run(solver, sigmas=sigmas), sigmas=sigmas.tolist(), tune_seconds=seconds)
    heun63 = rows[0]["rel_distance"]
    best10 = min((r for r in rows if r["evals"] <= 10 and r is not rows[0]), key=lambda r: r["rel_distance"])
    goal = {"heun63": heun63, "best_within_10": best10, "met": best10["rel_distance"] <= heun63}
    return {"networks": "bench UNet cpu-s (main) / cpu-xs (guide), random weights, float32", "batch": batch,
            "guidance": guidance, "converged": "heun 256 steps", "calibration_seed": seed + 1,
            "max_trials": max_trials, "rows": rows, "goal_distance_at_10_le_heun63": goal}


def timing(configs, images=32, batch=16, guidance=2.0, repeats=3, log=print):
    """generate() seconds per image for each (solver, steps) in ``configs``, Heun-32 first; best of repeats."""
    import ag_kernels

    net, gnet = make_pair("cpu-s", "cpu-xs", "cpu", autocast=False)
    configs = [("heun", 32, "karras")] + [(c + ("karras",))[:3] for c in configs
                                          if (c + ("karras",))[:3] != ("heun", 32, "karras")]
    best = {c: float("inf") for c in configs}
    for _ in range(repeats):
        for solver, steps, schedule in configs:  # interleaved, so drifts of the machine hit every configuration alike
            levels = _levels(steps, schedule, solver)
            t0 = time.perf_counter()
            for _batch in ag_kernels.generate(net, gnet, seeds=range(images), batch_size=batch, progress=False,
                                              guidance=guidance, solver=solver, **levels):
                pass
            best[(solver, steps, schedule)] = min(best[(solver, steps, schedule)], (time.perf_counter() - t0) / images)
    base = best[("heun", 32, "karras")]
    rows = []
    for (solver, steps, schedule), s in best.items():
        rows.append({"solver": solver, "steps": steps, "evals": _evals(solver, steps), "schedule": schedule,
                     "seconds_per_image": s, "speedup_vs_heun63": base / s})
        if log:
            log(f"{solver:<9} N={steps:<3} evals={_evals(solver, steps):<3} {schedule:<8} {s * 1e3:8.2f} ms/image  "
                f"x{base / s:.2f}")
    return {"device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "images": images, "batch": batch, "repeats": repeats, "rows": rows}


def _levels(steps, schedule, solver):
    """generate()'s schedule arguments for a --timing configuration: karras, logsnr or a schedule file."""
    import ag_kernels

    if schedule == "karras":
        return {"num_steps": steps}
    if schedule == "logsnr":
        return {"num_steps": steps, "schedule": "logsnr"}
    return {"sigmas": ag_kernels.load_schedule(schedule, solver=solver, num_steps=steps)}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.solvers", description=__doc__.splitlines()[0])
    p.add_argument("--timing", nargs="*", default=None,
                   help="solver:steps[:schedule] configurations to time against Heun-63 (schedule: karras, logsnr "
                        "or a schedule JSON file)")
    p.add_argument("--schedules", action="store_true", help="distances on the Karras, log-SNR and tuned schedules")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args(argv)
    out = {}
    if args.schedules:
        out["schedules"] = schedule_distances()
    elif args.timing is None:
        out["distance"] = distances()
    else:
        configs = [(c.split(":")[0], int(c.split(":")[1])) + tuple(c.split(":")[2:3]) for c in args.timing]
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
