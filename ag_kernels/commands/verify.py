"""``python -m ag_kernels verify --edm2 PATH``: check ``edm_sampler`` against the EDM2 reference.

The reference is the ``edm_sampler`` function of ``generate_images.py`` in the user's own clone
of NVlabs/edm2 (not shipped here, for licence reasons).  Both samplers run on the same small
networks, noise, labels and churn noise, for each available backend and a grid of guidance
weights, churn settings and step counts; a table shows the largest relative difference of each
case, and the command fails if any exceeds the tolerance (1e-5 by default).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

from ..kernels._backends import available_backends, resolve_backend
from ..models.nets import TinyDenoiser
from ..sampling.sampler import edm_sampler
from ._checkout import ReferenceSamplerError, load_reference_module

__all__ = ["ReferenceSamplerError", "load_reference_sampler", "load_reference_module", "verify", "format_table", "add_arguments", "run", "main"]

# Churn is applied only for t in [S_MIN, S_MAX] (EDM, Algorithm 2), so a churned run also has
# steps at both ends of the schedule without churn.
S_MIN, S_MAX = 0.05, 50.0
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0
LABEL_DIM = 10


#: One line for ``--help``.
DESCRIPTION = ("check ag_kernels.edm_sampler against the edm_sampler of your NVlabs/edm2 checkout, "
               "for every available backend and a grid of settings")


# --------------------------------------------------------------------------- loading the reference


def load_reference_sampler(edm2_path) -> Callable:
    """``edm_sampler`` from ``generate_images.py`` in an EDM2 checkout at ``edm2_path``.

    See :func:`load_reference_module` for how the file is imported.

    Raises:
        ReferenceSamplerError: as :func:`load_reference_module`, or there is no ``edm_sampler``.
    """
    module = load_reference_module(edm2_path)
    sampler = getattr(module, "edm_sampler", None)
    if not callable(sampler):
        raise ReferenceSamplerError(f"--edm2: {str(module.__file__)!r} has no function edm_sampler; "
                                    "is this an NVlabs/edm2 checkout?")
    return sampler


# --------------------------------------------------------------------------- the comparison


def _seeded_randn_like(seed: int, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """A randn_like drawing from its own generator: two samplers given fresh ones draw the same churn noise.

    The draws are float32, cast to x's dtype, so a float64 run gets the same churn noise as a float32 one.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    return lambda x: torch.randn(x.shape, dtype=torch.float32, device=x.device, generator=gen).to(x.dtype)


@contextlib.contextmanager
def _full_float32():
    """Disable TF32 convolutions and matmuls (CUDA) while comparing.

    With TF32, a network rounds its inputs to 10 mantissa bits, so a last-bit difference between
    the two samplers' x can move a network output by ~1e-3 relative: no bug, but far above 1e-5.
    """
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def make_problem(device="cpu", batch: int = 4, resolution: int = 8, seed: int = 0):
    """(net, gnet, noise, labels): a main and a smaller, differently seeded guide TinyDenoiser, class-conditional.

    The networks return float32.  bfloat16/float16 outputs would not do for a 1e-5 check: a
    last-bit difference in x between two correct samplers can round D to the neighbouring 16-bit
    value (0.4% apart in bf16), and such flips accumulate along the trajectory.
    """
    device = torch.device(device)
    net = TinyDenoiser(img_channels=3, img_resolution=resolution, label_dim=LABEL_DIM, channels=32, seed=seed + 1)
    gnet = TinyDenoiser(img_channels=3, img_resolution=resolution, label_dim=LABEL_DIM, channels=16, seed=seed + 2)
    net, gnet = net.to(device).eval(), gnet.to(device).eval()
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 3, resolution, resolution, generator=gen).to(device)
    labels = torch.nn.functional.one_hot(torch.arange(batch) % LABEL_DIM, LABEL_DIM).float().to(device)
    return net, gnet, noise, labels


def _max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|out - ref| / max|ref| in float64; inf when out is not finite or has the wrong shape."""
    if not isinstance(out, torch.Tensor) or out.shape != ref.shape:
        return math.inf
    out, ref = out.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    if not torch.isfinite(out).all():
        return math.inf
    scale = ref.abs().max().item()
    return (out - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def verify(
    reference_sampler: Callable,
    *,
    backends: Optional[Sequence[str]] = None,
    device="cpu",
    guidances: Iterable[float] = (1.0, 2.1),
    churns: Iterable[float] = (0.0, 30.0),
    steps: Iterable[int] = (4, 8, 32),
    batch: int = 4,
    resolution: int = 8,
    seed: int = 0,
    tol: float = 1e-5,
) -> List[Dict]:
    """Compare :func:`ag_kernels.edm_sampler` with ``reference_sampler`` on a grid of settings.

    Both get the same networks (see :func:`make_problem`), noise and labels; with churn
    (S_churn > 0, applied for S_MIN <= t <= S_MAX) each gets a fresh generator with the same
    seed as ``randn_like``, so both draw the same churn noise.  The reference runs once per
    setting and every backend is compared with it.

    The reference also runs with ``dtype=torch.float64`` (same networks, noise and churn noise)
    to measure its own float32 rounding error, reported as ``ref_err``: with very few steps
    (4), float32 sampling from sigma_max = 80 subtracts terms of size ~|noise| * sigma that
    are far larger than the result, and two correct float32 implementations can then differ
    by about the reference's own error, which can approach or exceed 1e-5.  ``ok`` does not
    use it; it tells a float32 rounding difference from a real discrepancy.

    Returns:
        One dict per (backend, guidance, S_churn, num_steps) with keys backend, guidance,
        S_churn, num_steps, max_rel_err (max|ours - ref| / max|ref|), ref_err (max|ref -
        ref_float64| / max|ref_float64|) and ok (max_rel_err <= tol); when our sampler raised,
        max_rel_err is inf and the row also has "error".

    Raises:
        ValueError: a bad argument (an unknown or unavailable backend, num_steps < 2, ...).
        ReferenceSamplerError: the reference sampler raised.
    """
    device = torch.device(device)
    if backends is None:
        backends = available_backends(device)
    backends = list(backends)
    if not backends:
        raise ValueError("backends: no backend to verify")
    for b in backends:
        resolve_backend(b, device)  # a ValueError naming the backend when it cannot run here
    steps, guidances, churns = list(steps), [float(w) for w in guidances], [float(c) for c in churns]
    for n in steps:
        # The reference's schedule divides by num_steps - 1.
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"steps: every step count must be an int >= 2 (the reference divides by "
                             f"num_steps - 1), got {n!r}")
    if not all(math.isfinite(w) for w in guidances) or not guidances:
        raise ValueError(f"guidances must be finite numbers, got {guidances}")
    if not all(math.isfinite(c) and c >= 0 for c in churns) or not churns:
        raise ValueError(f"churns (S_churn values) must be finite and >= 0, got {churns}")
    for name, value, low in (("batch", batch, 1), ("resolution", resolution, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")

    net, gnet, noise, labels = make_problem(device, batch, resolution, seed)
    churn_seed = seed + 12345
    settings = list(itertools.product(guidances, churns, steps))
    rows: List[Dict] = []
    with _full_float32(), torch.no_grad():
        refs, ref_errs = {}, {}
        for w, churn, n in settings:
            out = {}
            for dtype in (torch.float32, torch.float64):
                kwargs = dict(_sampler_kwargs(n, w, churn), dtype=dtype)
                try:
                    out[dtype] = reference_sampler(net, noise, labels, gnet,
                                                   randn_like=_seeded_randn_like(churn_seed, device), **kwargs)
                except Exception as exc:
                    raise ReferenceSamplerError(
                        f"the reference edm_sampler raised {type(exc).__name__}: {exc} "
                        f"(guidance={w}, S_churn={churn}, num_steps={n}, dtype={dtype})") from exc
                if not isinstance(out[dtype], torch.Tensor) or out[dtype].shape != noise.shape:
                    raise ReferenceSamplerError(
                        f"the reference edm_sampler returned {type(out[dtype]).__name__} "
                        f"{tuple(getattr(out[dtype], 'shape', ()))}, not a tensor of the noise's shape")
            refs[w, churn, n] = out[torch.float32]
            ref_errs[w, churn, n] = _max_rel_err(out[torch.float32], out[torch.float64])
        for b in backends:
            for w, churn, n in settings:
                row = dict(backend=b, guidance=w, S_churn=churn, num_steps=n, ref_err=ref_errs[w, churn, n])
                try:
                    ours = edm_sampler(net, noise, labels, gnet, randn_like=_seeded_randn_like(churn_seed, device),
                                       backend=b, **_sampler_kwargs(n, w, churn))
                    row["max_rel_err"] = _max_rel_err(ours, refs[w, churn, n])
                except Exception as exc:  # a failure of ours is a failed row, reported, not a crash
                    row["max_rel_err"], row["error"] = math.inf, f"{type(exc).__name__}: {exc}"
                row["ok"] = row["max_rel_err"] <= tol
                rows.append(row)
    return rows


def _sampler_kwargs(num_steps: int, guidance: float, churn: float) -> Dict:
    # Every argument explicit, so a reference whose defaults differ still runs the same setting.
    return dict(num_steps=num_steps, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO, guidance=guidance,
                S_churn=churn, S_min=S_MIN if churn > 0 else 0.0, S_max=S_MAX if churn > 0 else float("inf"),
                S_noise=1.0, dtype=torch.float32)


def format_table(rows: Sequence[Dict]) -> str:
    """The rows of :func:`verify` as a fixed-width text table."""
    header = (f"{'backend':<8} {'guidance':>8} {'S_churn':>8} {'steps':>5} {'max rel err':>12} "
              f"{'ref fp32 err':>12}  result")
    lines = [header, "-" * len(header)]
    for r in rows:
        result = "ok" if r["ok"] else "FAIL"
        if "error" in r:
            result += f" ({r['error']})"
        lines.append(f"{r['backend']:<8} {r['guidance']:>8g} {r['S_churn']:>8g} {r['num_steps']:>5d} "
                     f"{r['max_rel_err']:>12.2e} {r.get('ref_err', math.nan):>12.2e}  {result}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def _int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 4,8,32; got {text!r}") from None
    if not values or any(v < 2 for v in values):
        raise argparse.ArgumentTypeError(f"step counts must be >= 2 (the reference divides by num_steps - 1); "
                                         f"got {text!r}")
    return values


def _float_list(text: str) -> List[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 1,2.1; got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers; got {text!r}")
    return values


def _churn_list(text: str) -> List[float]:
    values = _float_list(text)
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"S_churn values must be >= 0; got {text!r}")
    return values


def _str_list(text: str) -> List[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected comma-separated backend names, e.g. torch,ext")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``verify`` command's options (shared by :func:`main` and ``python -m ag_kernels verify``)."""
    p.add_argument("--edm2", required=True, metavar="PATH",
                   help="root of your clone of NVlabs/edm2 (the folder holding generate_images.py)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", type=_str_list, default=None, metavar="LIST",
                   help="comma-separated backends to check (default: all available on the device)")
    p.add_argument("--tol", type=float, default=1e-5, help="largest max|ours - ref| / max|ref| accepted (default 1e-5)")
    p.add_argument("--steps", type=_int_list, default=[4, 8, 32], metavar="LIST", help="step counts (default 4,8,32)")
    p.add_argument("--guidance", type=_float_list, default=[1.0, 2.1], metavar="LIST",
                   help="guidance weights (default 1,2.1)")
    p.add_argument("--churn", type=_churn_list, default=[0.0, 30.0], metavar="LIST",
                   help=f"S_churn values (default 0,30; churn applies for {S_MIN} <= t <= {S_MAX})")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--resolution", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--generate", action="store_true",
                   help="instead: compare `python -m ag_kernels generate` with the checkout's generate_images(), "
                        "file by file (see verify --edm2 PATH --generate -h)")


def run(args: argparse.Namespace) -> int:
    """Run the command for parsed ``args``: 0 all cases match, 1 a mismatch, 2 a setup error (on stderr)."""
    def fail(message: str) -> int:
        print(f"verify: error: {message}", file=sys.stderr)
        return 2

    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        return fail(f"--device: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        return fail("--device: CUDA is not available on this machine")
    if not (math.isfinite(args.tol) and args.tol >= 0):
        return fail(f"--tol must be a finite number >= 0, got {args.tol}")
    if args.batch < 1 or args.resolution < 1:
        return fail("--batch and --resolution must be >= 1")
    try:
        reference = load_reference_sampler(args.edm2)
    except ReferenceSamplerError as exc:
        return fail(str(exc))
    backends = args.backends if args.backends is not None else available_backends(device)
    for b in backends:
        try:
            resolve_backend(b, device)
        except (TypeError, ValueError) as exc:
            return fail(f"--backends: {exc}")

    print(f"ag_kernels verify: ag_kernels.edm_sampler vs edm_sampler of {Path(args.edm2).expanduser()}")
    print(f"device {device}, backends {', '.join(backends)}; batch {args.batch}, "
          f"3x{args.resolution}x{args.resolution}, "
          f"class-conditional TinyDenoiser main/guide nets (float32 outputs); churn for {S_MIN} <= t <= {S_MAX}")
    try:
        rows = verify(reference, backends=backends, device=device, guidances=args.guidance, churns=args.churn,
                      steps=args.steps, batch=args.batch, resolution=args.resolution, seed=args.seed, tol=args.tol)
    except (ReferenceSamplerError, ValueError) as exc:
        return fail(str(exc))
    print(format_table(rows))
    bad = [r for r in rows if not r["ok"]]
    worst = max(r["max_rel_err"] for r in rows)
    if bad:
        print(f"MISMATCH: {len(bad)} of {len(rows)} cases exceed tol={args.tol:g} (worst max rel err {worst:.2e})")
        if all(r["max_rel_err"] <= 3 * r.get("ref_err", 0.0) for r in bad):
            print("(every failing case is within 3x the reference's own float32 error, 'ref fp32 err': float32 "
                  "rounding at few steps rather than a different algorithm; compare with more steps)")
        return 1
    print(f"OK: all {len(rows)} cases match the reference within tol={args.tol:g} (worst max rel err {worst:.2e})")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m ag_kernels verify`` as a function: parse ``argv`` and :func:`run`.

    With ``--generate``, the end-to-end check of :mod:`ag_kernels.commands.verify_generate` instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--generate" in argv:
        from . import verify_generate

        return verify_generate.main(argv)
    parser = argparse.ArgumentParser(prog="python -m ag_kernels verify", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
