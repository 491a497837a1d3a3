"""Mutation check of the test suite: hand-written bugs of the kind users would hit, each of which the
default suite (``python -m pytest tests``, no options, no environment variables) must catch.

    python tools/mutate.py                  # every mutant; exit 1 if any survives
    python tools/mutate.py --list           # the mutants
    python tools/mutate.py churn-not-divided label-before-noise   # some of them

The repository is copied to a scratch folder once (the working tree's files are never edited);
each mutant replaces one exact piece of source text there (it must occur exactly once, or the
script stops: the mutant no longer fits the code), runs the default tests most likely to notice
(the ``tests`` listed with it, stopping at the first failure, in a fresh process with the copy
first on PYTHONPATH and without AG_TEST_SEED or AG_EDM2_PATH), reports the first failing test as
the one that killed it, and puts the original text back.  With ``--baseline`` the same tests
first run on the unmutated copy, which must pass.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Mutant:
    name: str
    what: str
    file: str          # relative to the repository root
    old: str           # exact text, occurring once
    new: str
    tests: Tuple[str, ...]  # pytest arguments: files or node ids, and -k expressions


S = "tests/test_sampler.py"
G = "tests/test_generate.py"

MUTANTS: List[Mutant] = [
    # ---- the list
    Mutant("main-guide-swapped", "the main and the guiding network swap roles (D_0 + w (D_1 - D_0) with D_0, D_1 exchanged)",
           "ag_kernels/sampling/engine.py",
           'd_main = _evaluate("net", self._net_fn, x, t, labels)\n            return d_main, _evaluate("gnet", self._gnet_fn, x, t, guide_labels)',
           'd_main = _evaluate("gnet", self._gnet_fn, x, t, guide_labels)\n            return d_main, _evaluate("net", self._net_fn, x, t, labels)',
           (S, "-k", "matches_standin")),
    Mutant("churn-not-divided", "gamma = min(S_churn, sqrt2 - 1) instead of min(S_churn / N, sqrt2 - 1)",
           "ag_kernels/sampling/_plan.py", "gamma = min(S_churn / n, math.sqrt(2) - 1)",
           "gamma = min(S_churn, math.sqrt(2) - 1)", (S, "-k", "light")),
    Mutant("s-noise-squared", "churn noise scaled by S_noise**2 instead of S_noise",
           "ag_kernels/sampling/_plan.py", "churn = (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise",
           "churn = (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise ** 2", (S, "-k", "light")),
    Mutant("schedule-off-by-one", "Karras schedule i / N instead of i / (N - 1): t_{N-1} misses sigma_min",
           "ag_kernels/sampling/_plan.py", "step_indices / (num_steps - 1)", "step_indices / num_steps",
           (S, "-k", "matches_standin")),
    Mutant("heun-on-last-step", "Heun's correction also on the last step (t_next = 0)",
           "ag_kernels/sampling/_plan.py", 'heun = solver == "heun" and i < n - 1', 'heun = solver == "heun" and i < n',
           (S, "-k", "matches_standin")),
    Mutant("seed-mod-dropped", "generators seeded with the whole seed instead of seed % 2**32",
           "ag_kernels/sampling/generation.py", "SeedNoise([s % 2 ** 32 for s in batch_seeds], device)",
           "SeedNoise(list(batch_seeds), device)", (G,)),
    Mutant("label-before-noise", "each seed's class drawn before its noise",
           "ag_kernels/sampling/generation.py",
           "    noise = rng.randn(noise_shape)\n    labels = None\n    if label_dim > 0:\n        classes = rng.randint(label_dim)",
           "    labels = None\n    if label_dim > 0:\n        classes = rng.randint(label_dim)\n    noise = rng.randn(noise_shape)\n    if label_dim > 0:",
           (G,)),
    Mutant("png-number-off-by-one", "NNNNNN.png named after seed + 1",
           "ag_kernels/sampling/generation.py", 'return os.path.join(outdir, f"{seed:06d}.png")',
           'return os.path.join(outdir, f"{seed + 1:06d}.png")', (G,)),
    Mutant("interval-bounds-swapped", "guidance interval [lo, hi) instead of (lo, hi]",
           "ag_kernels/sampling/_settings.py", "self.interval[0] < sigma <= self.interval[1]",
           "self.interval[0] <= sigma < self.interval[1]", (S, "-k", "interval")),
    Mutant("per-sample-weight-wrong-dim", "a per-sample tensor [B] broadcast over dim 1 (channels) instead of dim 0",
           "ag_kernels/kernels/reference.py", "shape = (value.shape[0],) + (1,) * max(like.dim() - 1, 0) if like.dim() else ()",
           "shape = ((1, value.shape[0]) + (1,) * max(like.dim() - 2, 0) if like.dim() > 1 else (value.shape[0],)) if like.dim() else ()",
           (S, "-k", "per_sample")),
    # ---- our own
    Mutant("oracle-churn-not-divided", "the reference transcription (the suite's oracle) forgets / num_steps",
           "ag_kernels/kernels/reference.py", "gamma = min(S_churn / num_steps, math.sqrt(2) - 1)",
           "gamma = min(S_churn, math.sqrt(2) - 1)", (S, "-k", "light")),
    Mutant("subdir-by-thousands-count", "--subdirs folder seed // 1000 instead of seed - seed % 1000",
           "ag_kernels/sampling/generation.py", 'f"{seed - seed % 1000:06d}", f"{seed:06d}.png"',
           'f"{seed // 1000:06d}", f"{seed:06d}.png"', (G,)),
    Mutant("churn-bound-strict", "churn for S_min <= t < S_max instead of <= S_max",
           "ag_kernels/sampling/_plan.py", "s_min <= t_host[i] <= s_max", "s_min <= t_host[i] < s_max",
           (S, "-k", "churn_bounds")),
    Mutant("sigma-max-ignored", "the engine plans with sigma_max = 80 whatever was asked",
           "ag_kernels/sampling/engine.py", "sigma_min=self.sigma_min, sigma_max=self.sigma_max, rho=self.rho,",
           "sigma_min=self.sigma_min, sigma_max=80.0, rho=self.rho,", (S, "-k", "light")),
    Mutant("batch-split-fixed", "consecutive batches of --batch instead of EDM2's even split",
           "ag_kernels/sampling/generation.py", "    if how == \"fixed\":\n        return",
           "    if True:\n        return", ("tests/test_edm2.py", "-k", "split")),
    Mutant("class-draw-skipped", "under a fixed class, no class is drawn (the churn noise that follows shifts)",
           "ag_kernels/sampling/generation.py", "        classes = rng.randint(label_dim)  # drawn even",
           "        classes = torch.zeros(len(batch_seeds), dtype=torch.long) if class_idx is not None else rng.randint(label_dim)  # drawn even",
           ("tests/test_verify_generate.py", "-k", "passes_on_standin or rows_and_outputs")),
    Mutant("triton-blend-sign", "the Triton kernel's upper lerp branch adds (1 - w)(D_1 - D_0) instead of subtracting it",
           "ag_kernels/kernels/triton_kernels.py", "hi = D_1 - diff * (1.0 - w).to(dtype)",
           "hi = D_1 + diff * (1.0 - w).to(dtype)", ("tests/test_ops.py", "-k", "triton")),
    Mutant("heun-average-weight", "the torch backend's Heun step weights the Euler slope 0.6 instead of 0.5",
           "ag_kernels/kernels/reference.py", "return x_hat + 0.5 * (x_euler - x_hat) + 0.5 * (t_next - t_cur) * d_prime",
           "return x_hat + 0.6 * (x_euler - x_hat) + 0.5 * (t_next - t_cur) * d_prime", ("tests/test_ops.py", "-k", "torch")),
    Mutant("guidance-one-still-guides", "w = 1 does not skip the guide: it is evaluated anyway",
           "ag_kernels/sampling/_settings.py", "        return None if w == 1.0 else w", "        return w",
           (S, "-k", "guidance_one")),
]

_IGNORE = shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", "*.egg-info", "build", "results", ".benchmarks")


def _env(copy: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("AG_TEST_SEED", "AG_EDM2_PATH", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = os.pathsep.join([str(copy)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                        if p and Path(p).resolve() != REPO])
    return env


def _pytest(copy: Path, tests, timeout: float):
    """(passed, first failing test or a reason, seconds)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rf", *tests]
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timeout after {timeout:g} s", time.time() - start
    out = proc.stdout + proc.stderr
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
    if proc.returncode == 0:
        return True, "", time.time() - start
    if proc.returncode == 5:
        return True, "no tests ran", time.time() - start  # nothing selected: not a kill
    return False, failed[0] if failed else f"pytest exit {proc.returncode}: {out.strip().splitlines()[-1:]}", \
        time.time() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="mutants to run (default: all)")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--baseline", action="store_true", help="first check that each mutant's tests pass unmutated")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run (default 900)")
    args = p.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:<28} {m.file:<40} {m.what}")
        return 0
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        p.error(f"unknown mutants: {', '.join(sorted(unknown))}")
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    with tempfile.TemporaryDirectory(prefix="ag_mutate_") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(REPO, copy, ignore=_IGNORE, symlinks=True)
        results = []
        for m in chosen:
            path = copy / m.file
            original = path.read_text()
            count = original.count(m.old)
            if count != 1:
                print(f"{m.name}: the text to mutate occurs {count} times in {m.file}; update the mutant")
                return 2
            if args.baseline:
                ok, why, _ = _pytest(copy, m.tests, args.timeout)
                if not ok or why:
                    print(f"{m.name}: its tests do not pass unmutated ({why or 'failed'})")
                    return 2
            path.write_text(original.replace(m.old, m.new))
            try:
                survived, killer, seconds = _pytest(copy, m.tests, args.timeout)
            finally:
                path.write_text(original)
            results.append((m, survived, killer))
            print(f"{m.name:<28} {'SURVIVED' if survived else 'killed  '} {killer or ''} ({seconds:.0f} s)",
                  flush=True)
    killed = sum(not s for _, s, _ in results)
    print(f"\n{killed} of {len(results)} mutants killed")
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
