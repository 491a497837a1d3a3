"""Opt-in: ag_kernels against a real NVlabs/edm2 checkout, the one named by $AG_EDM2_PATH.

Everything else in the suite compares with ``tests/edm_standin``, our own transcription; these
tests tie it, and us, to the published code.  Each runs in a subprocess (``_edm2_real_worker.py``
or our command line), so the checkout's modules never enter this process.  They skip, saying
why, without AG_EDM2_PATH; how to run them is in docs/verification.md (Against the real NVlabs/edm2):

    git clone https://github.com/NVlabs/edm2 /path/to/edm2
    pip install click diffusers                 # the checkout's imports; diffusers for the latent test
    AG_EDM2_PATH=/path/to/edm2 python -m pytest tests/test_edm2_real.py

* the sampler: ``edm_sampler`` on every backend and the stand-in's, on networks built from the
  checkout's ``Precond`` (through ``build_snapshots``, pickled by its real ``persistence``), for churn
  below and at the cap, S_noise != 1, a non-default schedule and float64;
* ``verify --edm2 PATH``: the command users run, on the checkout;
* ``generate`` against the checkout's ``generate_images()`` (``verify --generate``): PNG files,
  names and batches;
* a latent snapshot whose ``StabilityVAEEncoder`` names a tiny random diffusers ``AutoencoderKL``
  saved in a temporary folder (nothing is downloaded), decoded by both.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TOL = {"f32": 1e-5, "f64": 1e-10}

CHECKOUT = os.environ.get("AG_EDM2_PATH")
pytestmark = pytest.mark.skipif(
    not CHECKOUT, reason="opt-in: set AG_EDM2_PATH to an NVlabs/edm2 checkout "
                         "(git clone https://github.com/NVlabs/edm2) to compare with the real reference")


def _needs(*modules):
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"the real checkout's code needs {', '.join(missing)} here: pip install {' '.join(missing)}")


@pytest.fixture(scope="module")
def checkout():
    from ag_kernels.models.edm2 import EDM2Error, find_checkout

    try:
        return find_checkout(CHECKOUT)
    except EDM2Error as exc:  # a set but wrong path is the user's mistake: fail, do not skip
        pytest.fail(f"AG_EDM2_PATH: {exc}")


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _worker(command, workdir):
    proc = subprocess.run([sys.executable, str(HERE / "_edm2_real_worker.py"), command, str(workdir)],
                          capture_output=True, text=True, env=_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(result, indent=1))  # the figures, shown with -s or on failure
    return result


def test_sampler_against_the_real_edm_sampler(checkout, tmp_path):
    _needs("click")
    result = _worker("sampler", tmp_path)
    assert result["persistent_pickle"], "the snapshots were not pickled through the checkout's persistence"
    for name, row in result["cases"].items():
        tol = TOL["f64" if name.endswith("f64") else "f32"]
        backends = {k: v for k, v in row.items() if k not in ("standin", "vs_unguided_unchurned")}
        assert "torch" in backends, row
        for backend, err in backends.items():
            assert err <= tol, f"{name}: {backend} differs from the real edm_sampler by {err:.2e} > {tol:g}"
        # The stand-in (tests/edm_standin, the suite's oracle) against the real code.
        assert row["standin"] <= tol, f"{name}: the stand-in differs from the real edm_sampler by {row['standin']:.2e}"
        if "churn" in name:
            assert row["vs_unguided_unchurned"] > 1e4 * tol, row  # guidance and churn matter at this tolerance


def test_verify_command_on_the_real_checkout(checkout):
    _needs("click")
    proc = subprocess.run([sys.executable, "-m", "ag_kernels", "verify", "--edm2", str(checkout), "--device", "cpu",
                           "--steps", "7,32", "--backends", "torch,ext"],
                          capture_output=True, text=True, env=_env(), timeout=900)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("OK: all ")


def test_generate_against_the_real_generate_images(checkout, tmp_path):
    _needs("click")
    keep = tmp_path / "keep"
    proc = subprocess.run([sys.executable, "-m", "ag_kernels", "verify", "--edm2", str(checkout), "--generate",
                           "--steps", "6", "--device", "cpu", "--seeds", "0-5,997-1003", "--batch", "5",
                           "--keep", str(keep)],
                          capture_output=True, text=True, env=_env(), timeout=900)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if "reference, 1 process" in line]
    assert [r.split()[0] for r in rows] == ["unguided", "guided", "churned", "class-fixed"]
    assert all("13/13/13" in r and r.rstrip().endswith("ok") for r in rows), rows
    # The snapshots went through the checkout's real persistence (class source embedded), not plain pickling.
    raw = (keep / "snapshots" / "net.pkl").read_bytes()
    assert b"_reconstruct_persistent_obj" in raw and b"class Precond" in raw


def test_latent_snapshot_through_a_real_diffusers_vae(checkout, tmp_path):
    _needs("click", "diffusers")
    result = _worker("latent", tmp_path)
    assert result["error"] is None, result["error"]
    assert result["encoder_class"] == "training.encoders.StabilityVAEEncoder"
    assert result["image_size"] == [16, 16, 3]  # decoded pixels, not 4-channel 8x8 latents
    assert result["distinct_images"] == result["ref_files"] == 8
    assert result["same_names"] and result["our_files"] == 8
    assert result["equal_pct"] >= 99.9 and result["max_diff"] <= 1, result
