"""The CPU kernel's instruction-set variants (default, avx2, avx512; chosen when the library loads):
the chosen one is reported, the override works, and every variant this CPU runs gives bitwise the
same result as the baseline one, within the float64 oracle's tolerance.

The hooks used here are private: ag_kernels._C._cpu_isa(), _cpu_isas() and _set_cpu_isa(name)
(see csrc/cpu/cpu_isa.h), and the environment variable AG_KERNELS_CPU_ISA.
"""

import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch

from _util import OPS, TOL, X_DTYPES, call, make_cfg, make_inputs, make_params, make_uncond, oracle, poison, rel_err, require

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Odd sizes: scalar tails of every vector width; 70001 and 2 x 40001 elements are split over
# threads (when there are two), the latter inside a sample.
SHAPES = [(1,), (7,), (4099,), (70001,), (3, 4099), (2, 40001)]
D_PAIRS = [  # (d_main dtype, d_guide dtype)
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.float16, torch.bfloat16),
]


@pytest.fixture
def ext():
    """ag_kernels._C, with the variant selected on entry restored on exit."""
    require("ext", "cpu")
    import ag_kernels._C as ext

    before = ext._cpu_isa()
    yield ext
    ext._set_cpu_isa(before)


def _cpu_flags():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _run(script, **env_extra):
    env = dict(os.environ, **env_extra)
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=env,
                          timeout=300)


def test_isa_reported(ext):
    """The variant in use is one the CPU supports, and the best one unless overridden."""
    isas = ext._cpu_isas()
    assert isas[0] == "default" and set(isas) <= {"default", "avx2", "avx512"}, isas
    assert ext._cpu_isa() in isas
    flags = _cpu_flags()
    if platform.machine() in ("x86_64", "AMD64") and flags is not None:
        want = ["default"]
        if {"avx2", "fma", "f16c"} <= flags:
            want.append("avx2")
            if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
                want.append("avx512")
        assert list(isas) == want, (isas, want)
    elif platform.machine() not in ("x86_64", "AMD64"):
        assert list(isas) == ["default"]
    if not os.environ.get("AG_KERNELS_CPU_ISA"):
        assert ext._cpu_isa() == isas[-1]
    print(f"CPU ISA variant: {ext._cpu_isa()} (supported: {', '.join(isas)})")


def test_set_isa(ext):
    isas = ext._cpu_isas()
    for name in isas:
        ext._set_cpu_isa(name)
        assert ext._cpu_isa() == name
    assert ext._set_cpu_isa("default") == isas[-1]
    with pytest.raises(ValueError, match="unknown CPU ISA variant 'sse4'"):
        ext._set_cpu_isa("sse4")
    assert ext._cpu_isa() == "default"  # unchanged by the refused request
    for name in {"avx2", "avx512"} - set(isas):
        with pytest.raises(ValueError, match="not supported"):
            ext._set_cpu_isa(name)


def test_env_override(ext):
    """AG_KERNELS_CPU_ISA picks a variant when the library loads; a bad or unsupported request
    says so on stderr and runs the best supported variant (never an illegal instruction)."""
    isas = ext._cpu_isas()
    script = """
        import torch, ag_kernels, ag_kernels._C as ext
        x = torch.randn(5000)
        out = torch.empty(5000)
        torch.ops.ag_kernels.euler_step(out, x, x.half(), x.bfloat16(), None, None, None, 2.1, 1.25, 0.9)
        print(ext._cpu_isa())
        """
    for name in isas:
        proc = _run(script, AG_KERNELS_CPU_ISA=name)
        assert proc.returncode == 0 and proc.stdout.split() == [name], proc.stdout + proc.stderr
    for name in ["bogus"] + sorted({"avx2", "avx512"} - set(isas)):
        proc = _run(script, AG_KERNELS_CPU_ISA=name)
        assert proc.returncode == 0 and proc.stdout.split() == [isas[-1]], proc.stdout + proc.stderr
        assert f"AG_KERNELS_CPU_ISA={name}" in proc.stderr, proc.stderr


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("d_pair", D_PAIRS, ids=lambda p: "+".join(str(t)[6:] for t in p))
@pytest.mark.parametrize("x_dtype", X_DTYPES, ids=str)
def test_variants_bitwise_equal(ext, op, x_dtype, d_pair, gen):
    """Each variant against the baseline (bitwise) and the float64 oracle, with scalar, per-sample
    and mixed coefficients, with and without guidance, with and without CFG's third output."""
    isas = ext._cpu_isas()
    if len(isas) < 2:
        pytest.skip(f"only the {isas[0]!r} variant runs on this CPU")
    for shape in SHAPES:
        for mode in ("scalar", "per_sample", "mixed"):
            g, s, sn = make_params(mode, shape[0], "cpu", gen)
            x, x_euler, d_main, _ = make_inputs(shape, x_dtype, d_pair[0], "cpu", gen, s)
            _, _, _, d_guide = make_inputs(shape, x_dtype, d_pair[1], "cpu", gen, s)
            d_uncond, cfg = make_uncond(d_main, gen, d_pair[1]), make_cfg(mode, shape[0], "cpu", gen)
            for guide, uncond in ((d_guide, None), (None, None), (d_guide, d_uncond), (None, d_uncond)):
                c = cfg if uncond is not None else None
                ref, scale = oracle(op, x, x_euler, d_main, guide, g, s, sn, with_scale=True, d_uncond=uncond,
                                    cfg=1.0 if c is None else c)
                results = {}
                for name in isas:
                    ext._set_cpu_isa(name)
                    out = poison(torch.empty(shape, dtype=x_dtype))
                    results[name] = call(op, x, x_euler, d_main, guide, g, s, sn, backend="ext", out=out,
                                         d_uncond=uncond, cfg=c)
                where = f"{op} {shape} {mode} guided={guide is not None} cfg={uncond is not None}"
                # The oracle's own scale on tiny tensors, whose result can cancel (see _util.TOL).
                err = rel_err(results["default"], ref, scale if results["default"].numel() < 64 else None)
                assert err <= TOL[x_dtype], f"{where}: default variant rel err {err:.3g}"
                for name in isas[1:]:
                    same = torch.equal(results[name], results["default"])
                    assert same, (
                        f"{where}: variant {name} differs from the baseline, max abs diff "
                        f"{(results[name].double() - results['default'].double()).abs().max().item():.3g}"
                    )
