"""Compiles every row of ag_kernels.kernels.triton_kernels.compile_table() for CUDA targets, with no GPU.

Run by tests/test_triton_compile.py in a subprocess, because the kernels must be real JIT functions
(the test session runs Triton in interpreter mode).  Each row is specialized by Triton's own launcher
code (the binder a launch calls: ints equal to 1 become constants, 16-divisible ints and 16-byte-aligned
pointers get divisibility hints), then compiled to PTX and a cubin with ``triton.compile`` for each
target.  Rows sharing a specialization are compiled once.  For the rows marked ``vectorized`` the PTX
is read: every global load and store must be 128 bits wide and nothing may live in local memory
(ptxas -v: no stack frame, no spills).

    python tests/_triton_offline.py RESULT.json [--archs 90,80] [--jobs N]

writes {"cases": [...], "failures": [...], "vector_failures": [...], "compiled": N, "seconds": S}.
"""

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: real JIT functions

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from ag_kernels.kernels import triton_kernels as tk  # noqa: E402

#: The fusion mode the GPU session runs with (TRITON_DEFAULT_FP_FUSION=1, Triton 3.9's default).
FP_FUSION = True

# A global access of 128 bits: 4 x 32-bit or 2 x 64-bit lanes (16-bit data travels packed in b32 lanes).
WIDE = re.compile(r"\.v4\.(b|f|u|s)32\b|\.v2\.(b|f|u|s)64\b|\.v8\.(b|f|u|s)16\b")
GLOBAL_ACCESS = re.compile(r"\b(ld|st)\.global\S*")

_TABLE = []
_SPECS = []


def _specialize(case, target):
    """(key, (signature, constexprs, attrs, options)) of ``case`` as Triton's launcher specializes it."""
    backend = make_backend(target)
    kernel = case.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(case.constexprs, num_warps=case.num_warps, enable_fp_fusion=FP_FUSION)
    bound, specialization, options = binder(*case.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    key = repr((kernel.fn.__name__, target.arch, sorted(signature.items()), sorted(constexprs.items()),
                sorted((k, repr(v)) for k, v in attrs.items()), case.num_warps))
    return key, (signature, constexprs, attrs, options)


def _summary(case, spec):
    """{argument: how Triton specialized it}: "1" (constant), "D16" (divisible by 16 / 16-byte aligned),
    "i64", "i32" or "ptr" (no hint), for every int and pointer argument."""
    signature, constexprs, attrs, _ = spec
    out = {}
    for i, (name, kind) in enumerate(signature.items()):
        if name.isupper():
            continue  # constexpr parameters (OP, ROWS, ...): their values are in the case name
        if kind == "constexpr":
            out[name] = str(constexprs[(i,)])
        elif kind.startswith("*") or kind[0] in "iu":
            hint = any(a[0] == "tt.divisibility" for a in attrs.get((i,), []))
            out[name] = "D16" if hint else ("ptr" if kind.startswith("*") else kind)
    return out


def _wide_accesses(ptx):
    """(number of global accesses, the ones not 128 bits wide)."""
    accesses = [m.group(0) for m in GLOBAL_ACCESS.finditer(ptx)]
    return len(accesses), sorted({a for a in accesses if not WIDE.search(a)})


def _local_memory(ptx):
    """What ptxas -v reports of the kernel's stack frame and spills (empty when it uses no local memory)."""
    found = []
    if re.search(r"\.local\b", ptx):
        found.append("PTX declares .local memory")
    ptxas = get_ptxas(int(re.search(r"^\.target\s+sm_(\d+)", ptx, re.M).group(1))).path  # the one Triton ran
    gpu = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)  # sm_90a: Triton targets Hopper's features
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        return [f"ptxas -v failed: {proc.stderr.strip()[-400:]}"]
    reports = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", proc.stderr)
    if not reports:
        return [f"ptxas -v reported no stack frame line: {proc.stderr.strip()[-400:]}"]
    found += [f"ptxas -v: {a} bytes stack frame, {b} bytes spill stores, {c} bytes spill loads"
              for a, b, c in reports if int(a) or int(b) or int(c)]
    return found


def _describe(exc):
    """The root of a compile error (Triton chains one error per inlined function) and where it surfaced."""
    chain = [exc]
    while chain[-1].__cause__ is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__)
    lines = [ln.strip() for ln in str(chain[-1]).splitlines() if ln.strip()]
    source = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    where = f" ({source[0]} {source[-2] if len(source) > 2 else ''})" if source else ""
    return f"{type(chain[-1]).__name__}: {lines[-1] if lines else ''}{where}"[:600]


def _compile(index):
    """Compiles unique specialization ``index``: (index, error or None, seconds, vector findings or None)."""
    key, case_index, target, spec, check = _SPECS[index]
    signature, constexprs, attrs, options = spec
    case = _TABLE[case_index]
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(case.kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    except Exception as exc:  # every compile error is reported with its case, none is swallowed
        return index, _describe(exc), time.perf_counter() - start, None
    findings = None
    if target.arch == 90:
        # Every sm_90 launch's accesses are recorded (the unaligned ones are the check's negative control);
        # ptxas -v runs on the checked ones.
        total, narrow = _wide_accesses(compiled.asm["ptx"])
        findings = {"global_accesses": total, "narrow": narrow,
                    "local": _local_memory(compiled.asm["ptx"]) if check else None}
    if not compiled.asm.get("cubin"):
        return index, "no cubin was produced", time.perf_counter() - start, findings
    return index, None, time.perf_counter() - start, findings


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("result")
    parser.add_argument("--archs", default="90,80")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    opts = parser.parse_args()
    start = time.perf_counter()
    _TABLE.extend(tk.compile_table())
    targets = [GPUTarget("cuda", int(a), 32) for a in opts.archs.split(",")]
    cases, seen = [], {}
    for i, case in enumerate(_TABLE):
        for target in targets:
            key, spec = _specialize(case, target)
            # The 128-bit check reads sm_90's PTX (the GPUs the project benchmarks on).
            check = case.vectorized and target.arch == 90
            if key not in seen:
                seen[key] = len(_SPECS)
                _SPECS.append((key, i, target, spec, check))
            elif check and not _SPECS[seen[key]][4]:
                k, ci, t, s, _ = _SPECS[seen[key]]
                _SPECS[seen[key]] = (k, ci, t, s, True)
            cases.append({"case": case.name, "kernel": case.kernel.fn.__name__, "arch": target.arch,
                          "spec": seen[key], "vectorized": check, "args": _summary(case, spec)})
    results = {}
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(max(1, opts.jobs)) as pool:
        for index, error, seconds, findings in pool.imap_unordered(_compile, range(len(_SPECS)), chunksize=4):
            results[index] = {"error": error, "seconds": seconds, "vector": findings}
    failures, vector_failures = [], []
    for c in cases:
        r = results[c["spec"]]
        c["error"] = r["error"]
        if r["error"]:
            failures.append(f"sm_{c['arch']} {c['case']}: {r['error']}")
        elif c["vectorized"]:
            v = r["vector"]
            if v is None or not v["global_accesses"] or v["narrow"] or v["local"]:
                vector_failures.append(f"sm_{c['arch']} {c['case']}: {v}")
        c["ptx"] = r["vector"]
    with open(opts.result, "w") as f:
        json.dump({"cases": cases, "failures": failures, "vector_failures": vector_failures,
                   "compiled": len(_SPECS), "rows": len(_TABLE), "seconds": time.perf_counter() - start,
                   "triton": triton.__version__, "torch": torch.__version__}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
