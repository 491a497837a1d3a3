"""The CUDA sources compile with nvcc against torch's headers, with no GPU needed, and spill nothing.

On a machine without a CUDA build of torch, setup.py builds only the CPU extension; this test
is what makes a CUDA compile error fail CI there.  It runs `nvcc -c` on every csrc/**/*.cu with
the flags torch.utils.cpp_extension uses for a CUDA extension, for one architecture (sm_90, the
Hopper GPUs we benchmark on), one process per translation unit in parallel (one per op: see
csrc/cuda/steps_cuda.cuh), with ``-Xptxas -v``: a kernel that spills registers to local memory
fails the test, except the ones listed in KNOWN_SPILLS (which must still spill: the list only
shrinks).  Without nvcc it skips, except under CI (CI=true), where it fails.
"""

import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sysconfig
import time

import pytest
import torch
import torch.utils.cpp_extension as cpp_extension

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(REPO, "csrc", "**", "*.cu"), recursive=True))

#: Kernels that spill today, as (translation unit, guided_step_kernel's template arguments, mangled:
#: ILi<OP>ELb<guided>E then the types of x, d_main, d_guide; f float, d double, N3c104HalfE / N3c108BFloat16E
#: and their back-references).  4 to 8 bytes each, once per sample row: the float64 division in
#: row_constants (step_math.h, shared with the CPU, so its rounding cannot change) has a slow path that is
#: a subroutine call, and ptxas keeps one 64-bit address on the stack across it.  The hot per-element loop
#: has no spill.  Mixed float32/float64 operands and float64 x with 16-bit outputs only.
KNOWN_SPILLS = {
    ("euler_cuda.cu", "ILi1ELb1EfddE"),
    ("heun_cuda.cu", "ILi2ELb1EfdfE"),
    ("heun_cuda.cu", "ILi2ELb1EffdE"),
    ("multistep_cuda.cu", "ILi4ELb1EdN3c108BFloat16ES3_E"),
    ("multistep_cuda.cu", "ILi4ELb1EdN3c108BFloat16ENS2_4HalfEE"),
    ("multistep_cuda.cu", "ILi4ELb1EdN3c104HalfENS2_8BFloat16EE"),
    ("score_cuda.cu", "ILi3ELb1EfdfE"),
    ("score_cuda.cu", "ILi3ELb1EffdE"),
    ("score_cuda.cu", "ILi3ELb1EddfE"),
    ("score_cuda.cu", "ILi3ELb1EdfdE"),
    ("score_cuda.cu", "ILi3ELb1EdN3c104HalfES3_E"),
    ("score_cuda.cu", "ILi3ELb0EdN3c104HalfES3_E"),
}


def _nvcc():
    home = os.environ.get("CUDA_HOME") or cpp_extension.CUDA_HOME
    candidate = os.path.join(home, "bin", "nvcc") if home else None
    if candidate and os.path.exists(candidate):
        return candidate
    return shutil.which("nvcc")


def _cxx_standard():
    # torch 2.10 and later ship headers that need C++20; earlier releases built with C++17.
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    return "c++20" if (major, minor) >= (2, 10) else "c++17"


def _compile(nvcc, source, out):
    include = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    command = [
        nvcc, "-c", source, "-o", out,
        f"-std={_cxx_standard()}", "-O3", "-Xcompiler", "-fPIC",
        "-gencode", "arch=compute_90,code=sm_90", "-Xptxas", "-v",
        "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        # A CPU build of torch lacks the CMake-generated c10/cuda/impl/cuda_cmake_macros.h.
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
        *cpp_extension.COMMON_NVCC_FLAGS, *include,
    ]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    return proc, time.perf_counter() - start


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{source: (CompletedProcess, seconds, object path)}: every translation unit, compiled in parallel."""
    nvcc = _nvcc()
    if nvcc is None:
        message = "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: CI must compile the CUDA sources")
        pytest.skip(message)
    tmp = tmp_path_factory.mktemp("nvcc")
    outs = {s: str(tmp / (os.path.basename(s) + ".o")) for s in SOURCES}
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        futures = {s: pool.submit(_compile, nvcc, s, outs[s]) for s in SOURCES}
        return {s: (*f.result(), outs[s]) for s, f in futures.items()}


def _spills(ptxas_output):
    """{(kernel template arguments or function name): (stack frame, spill stores, spill loads)} from ptxas -v."""
    found = {}
    for name, frame, stores, loads in re.findall(
            r"Function properties for (\S+)\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
            ptxas_output):
        m = re.search(r"guided_step_kernel(I.*E)EvNS_8StepArgsEbb$", name)
        found[m.group(1) if m else name] = (int(frame), int(stores), int(loads))
    return found


@pytest.mark.skipif(not SOURCES, reason="no CUDA sources in csrc/")
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: os.path.relpath(p, REPO))
def test_nvcc_compiles(source, compiled):
    proc, seconds, out = compiled[source]
    errors = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines()
                       if "pragma" not in line and not line.startswith("ptxas info") and "bytes stack frame" not in line)
    assert proc.returncode == 0, f"nvcc failed on {source} after {seconds:.0f} s:\n{errors[-8000:]}"
    assert os.path.getsize(out) > 0


@pytest.mark.skipif(not SOURCES, reason="no CUDA sources in csrc/")
def test_no_kernel_spills_registers(compiled):
    new, gone, kernels = [], set(KNOWN_SPILLS), 0
    for source, (proc, _, _) in compiled.items():
        assert proc.returncode == 0, f"nvcc failed on {source}"
        unit = os.path.basename(source)
        found = _spills(proc.stdout + proc.stderr)
        kernels += sum(k.startswith("ILi") for k in found)
        for kernel, (frame, stores, loads) in found.items():
            if stores or loads:
                if (unit, kernel) in KNOWN_SPILLS:
                    gone.discard((unit, kernel))
                else:
                    new.append(f"{unit} {kernel}: {frame} bytes stack frame, {stores} spill stores, {loads} spill loads")
    assert kernels >= 5 * 40, f"ptxas -v reported on {kernels} kernels only: is -Xptxas -v still passed?"
    assert not new, "kernels that spill registers (fix them):\n" + "\n".join(new)
    assert not gone, f"these no longer spill: remove them from KNOWN_SPILLS: {sorted(gone)}"
