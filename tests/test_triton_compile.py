"""Every Triton kernel compiles for the GPU (sm_90 and sm_80) on this CPU machine, under every launch.

The CPU suite runs the kernels in Triton's interpreter, which wraps every scalar as a tensor and so
cannot see faults that only compilation shows (an int argument equal to 1 is specialized into a
compile-time constant: ``read1.to(tl.int64)`` failed that way).  Here each row of
``triton_kernels.compile_table()`` (built by the launchers' own argument builders) is specialized by
Triton's launcher code and compiled to PTX and a cubin for sm_90 and sm_80, in a subprocess
(tests/_triton_offline.py; compiled kernels are cached in Triton's cache directory, so a rerun of
unchanged kernels is quick).  A case that does not compile fails the test, named.

The PTX of each kernel's contiguous, 16-byte-aligned launch is read as the offline proxy for running
at the bandwidth limit: every global load and store must be 128 bits wide and nothing may live in
local memory (ptxas -v: no stack frame, no spill).  Needs Triton with its NVIDIA backend (ptxas
included); without it the test skips, except under CI (CI=true), where it fails.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "_triton_offline.py")
ARCHS = (90, 80)


def _unavailable():
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(90).path
        get_ptxas(80).path
    except Exception as exc:  # the reason is shown in the skip
        return f"Triton's NVIDIA backend is not usable here: {type(exc).__name__}: {exc}"
    return None


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    reason = _unavailable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: CI must compile the Triton kernels for the GPU")
        pytest.skip(reason)
    result = tmp_path_factory.mktemp("triton_offline") / "result.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
               TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, WORKER, str(result), "--archs", ",".join(map(str, ARCHS))],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"the offline compile driver failed:\n{(proc.stdout + proc.stderr)[-6000:]}"
    with open(result) as f:
        return json.load(f)


def test_every_launch_compiles_for_sm90_and_sm80(compiled):
    failures = compiled["failures"]
    assert not failures, (f"{len(failures)} of {len(compiled['cases'])} launches do not compile offline:\n"
                          + "\n".join(failures[:40]))
    # Every row was compiled for both targets, and there is something to compile.
    assert compiled["rows"] >= 100
    assert {(c["case"], c["arch"]) for c in compiled["cases"]} == {
        (c["case"], a) for c in compiled["cases"] for a in ARCHS}


def _kinds(compiled, kernel, arg):
    return {c["args"][arg] for c in compiled["cases"] if c["kernel"] == kernel and arg in c["args"]}


@pytest.mark.parametrize("kernel, ints, pointers", [
    ("_guided_step_kernel", {"n_elements": {"1", "D16", "i32", "i64"}, "row_numel": {"1", "D16", "i32"},
                             "blocks_per_row": {"1", "D16", "i32"}, "g_stride": {"1", "D16", "i32"}},
     ("out_ptr", "x_ptr", "dm_ptr", "dg_ptr")),
    ("_multistep_kernel", {"n_elements": {"1", "D16", "i32", "i64"}, "read1": {"1", "D16", "i32"},
                           "read2": {"1", "D16", "i32"}, "write": {"1", "D16", "i32"},
                           "g_stride": {"1", "D16", "i32"}},
     ("out_ptr", "hist_ptr", "x_ptr", "dm_ptr", "dg_ptr")),
])
def test_table_covers_the_specializations(compiled, kernel, ints, pointers):
    """The table reaches each way Triton specializes an int (1, divisible by 16, other, 64-bit) and a
    pointer (16-byte aligned or not): a row that stopped reaching one fails here."""
    for arg, kinds in ints.items():
        missing = kinds - _kinds(compiled, kernel, arg)
        assert not missing, f"{kernel}: no launch specializes {arg} as {sorted(missing)}"
    for arg in pointers:
        assert _kinds(compiled, kernel, arg) == {"D16", "ptr"}, f"{kernel}: {arg} not both aligned and unaligned"


def test_contiguous_launches_move_memory_in_128_bit_accesses(compiled):
    checked = [c for c in compiled["cases"] if c["vectorized"]]
    # Each op's contiguous launch, for every x and network-output dtype.
    ops = {c["case"].split("/")[0] for c in checked}
    assert ops >= {"guided_denoise", "euler_step", "heun_step", "guided_score", "multistep_step"}
    assert len(checked) >= len(ops) * 16
    assert not compiled["vector_failures"], "\n".join(compiled["vector_failures"][:40])
    # The check can fire: the same launch with unaligned pointers compiles to narrower accesses.
    controls = [c for c in compiled["cases"] if c["arch"] == 90 and "/n=16k" in c["case"]
                and c["case"].endswith("/unaligned=all")]
    assert {c["case"].split("/")[0] for c in controls} == ops
    for c in controls:
        assert c["ptx"]["narrow"], f"{c['case']}: unaligned pointers still gave only 128-bit accesses"
