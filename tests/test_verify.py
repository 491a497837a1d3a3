"""The ``verify`` command: loading an EDM2 checkout's sampler and comparing ours with it.

The "checkout" is tests/edm_standin (a generate_images.py with our transcription of the published
algorithm).  Broken checkouts and a wrong sampler are written into tmp_path.

Step counts here start at 6: with 4 steps, float32 sampling from sigma_max = 80 is itself only
accurate to ~1e-5 (see test_sampler._tolerance), too close to the tolerance for a fixed-seed test
whose rounding can differ between CPUs.
"""

from __future__ import annotations

import inspect
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ag_kernels
from ag_kernels.kernels import reference
from ag_kernels.commands.verify import (
    ReferenceSamplerError,
    format_table,
    load_reference_sampler,
    main,
    verify,
)

STANDIN = Path(__file__).parent / "edm_standin"


def _checkout(tmp_path, source: str, name="generate_images.py") -> Path:
    root = tmp_path / "edm2"
    root.mkdir()
    (root / name).write_text(textwrap.dedent(source))
    return root


def _standalone_source() -> str:
    """A generate_images.py whose edm_sampler is the reference transcription's own text (to mutate)."""
    body = inspect.getsource(reference.torch_edm_sampler).replace("def torch_edm_sampler(", "def edm_sampler(", 1)
    return "import math\n\nimport torch\n\n\n" + body


def _wrong_checkout(tmp_path) -> Path:
    """A checkout whose edm_sampler skips Heun's correction (an Euler sampler): a real algorithmic difference."""
    source = _standalone_source()
    wrong = source.replace("if step < num_steps - 1:", "if False:")
    assert wrong != source
    return _checkout(tmp_path, wrong)


def test_load_reference_sampler_and_restore_sys_path():
    before, other = list(sys.path), sys.modules.get("generate_images")
    sampler = load_reference_sampler(STANDIN)
    assert sys.path == before
    assert callable(sampler) and sampler.__name__ == "edm_sampler"
    # Imported under a private name: any other generate_images module is neither used nor replaced.
    assert sampler.__module__.startswith("_ag_kernels_reference_")
    assert sys.modules.get("generate_images") is other
    # A path to the file itself works too, and gives a separate module.
    again = load_reference_sampler(str(STANDIN / "generate_images.py"))
    assert again is not sampler and again.__module__ != sampler.__module__


def test_verify_on_standin_all_rows_pass():
    rows = verify(load_reference_sampler(STANDIN), steps=(6, 8))
    backends = ag_kernels.available_backends("cpu")
    assert len(rows) == len(backends) * 2 * 2 * 2
    assert {r["backend"] for r in rows} == set(backends)
    assert {(r["guidance"], r["S_churn"], r["num_steps"]) for r in rows} == {
        (w, c, n) for w in (1.0, 2.1) for c in (0.0, 30.0) for n in (6, 8)}
    for r in rows:
        assert r["ok"] and r["max_rel_err"] <= 1e-5 and "error" not in r, r
        assert 0 <= r["ref_err"] < 1e-3
    table = format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "FAIL" not in table


def test_main_passes_on_standin(capsys):
    assert main(["--edm2", str(STANDIN), "--steps", "6", "--backends", "torch,ext"]) == 0
    out = capsys.readouterr().out
    assert "max rel err" in out and out.count(" ok") == 2 * 2 * 2
    assert out.strip().splitlines()[-1].startswith("OK: all 8 cases")


def test_main_fails_on_a_wrong_sampler(tmp_path, capsys):
    root = _wrong_checkout(tmp_path)
    assert main(["--edm2", str(root), "--steps", "6", "--backends", "torch", "--guidance", "2.1", "--churn", "0"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "MISMATCH" in out


def test_wrong_guidance_blend_is_caught(tmp_path):
    # Guidance applied the other way round (from D_1 toward D_0): identical at w = 1, wrong otherwise.
    source = _standalone_source()
    wrong = source.replace("d_guide.lerp(d_main, guidance)", "d_main.lerp(d_guide, guidance)")
    assert wrong != source
    # Unmutated, the same text passes: the failure below is the blend's.
    (tmp_path / "right").mkdir()
    assert all(r["ok"] for r in verify(load_reference_sampler(_checkout(tmp_path / "right", source)), backends=["torch"],
                                       steps=(6,), churns=(0.0,)))
    rows = verify(load_reference_sampler(_checkout(tmp_path, wrong)), backends=["torch"], steps=(6,), churns=(0.0,))
    assert [r["ok"] for r in rows] == [True, False]


def test_bad_edm2_paths_return_2(tmp_path, capsys):
    assert main(["--edm2", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err

    assert main(["--edm2", str(tmp_path)]) == 2  # a folder without generate_images.py
    assert "no generate_images.py" in capsys.readouterr().err


@pytest.mark.parametrize("source,message", [
    ("import click_not_installed_xyz\n", "module 'click_not_installed_xyz' is not installed"),
    ("raise RuntimeError('boom at import')\n", "RuntimeError: boom at import"),
    ("def other():\n    pass\n", "no function edm_sampler"),
])
def test_broken_checkouts_return_2(tmp_path, capsys, source, message):
    root = _checkout(tmp_path, source)
    with pytest.raises(ReferenceSamplerError, match=message):
        load_reference_sampler(root)
    assert main(["--edm2", str(root), "--steps", "6"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_package_of_the_checkout_is_named(tmp_path):
    # generate_images.py imports the checkout's own package; missing there, it is named as such.
    root = _checkout(tmp_path, "import dnnlib\n")
    (root / "dnnlib").mkdir()
    (root / "dnnlib" / "__init__.py").write_text("import click_not_installed_xyz\n")
    with pytest.raises(ReferenceSamplerError, match="click_not_installed_xyz.*pip install"):
        load_reference_sampler(root)
    sys.modules.pop("dnnlib", None)


def test_reference_that_raises_returns_2(tmp_path, capsys):
    root = _checkout(tmp_path, """
        def edm_sampler(net, noise, labels=None, gnet=None, **kwargs):
            raise ValueError("reference exploded")
    """)
    assert main(["--edm2", str(root), "--steps", "6", "--backends", "torch"]) == 2
    assert "reference exploded" in capsys.readouterr().err


def test_bad_options(capsys):
    assert main(["--edm2", str(STANDIN), "--backends", "nope"]) == 2
    assert "--backends" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # argparse: usage error
        main(["--edm2", str(STANDIN), "--steps", "1"])
    assert info.value.code == 2
    with pytest.raises(ValueError, match="steps"):
        verify(load_reference_sampler(STANDIN), steps=(1,))


def test_our_failure_is_a_failed_row(monkeypatch):
    import ag_kernels.commands.verify as verify_module

    def broken(*args, **kwargs):
        raise RuntimeError("ours exploded")

    monkeypatch.setattr(verify_module, "edm_sampler", broken)
    rows = verify(load_reference_sampler(STANDIN), backends=["torch"], steps=(6,), guidances=(1.0,), churns=(0.0,))
    assert len(rows) == 1 and not rows[0]["ok"] and "ours exploded" in rows[0]["error"]
    assert "FAIL (RuntimeError: ours exploded)" in format_table(rows)


def test_reference_outputs_are_float32_networks():
    # The verify networks must return float32: a bf16 output would round differently for the
    # two samplers' last-bit-different x and could exceed 1e-5 without any bug.
    from ag_kernels.commands.verify import make_problem

    net, gnet, noise, labels = make_problem()
    assert net(noise, torch.tensor(1.0), labels).dtype == torch.float32
    assert gnet(noise, torch.tensor(1.0), labels).dtype == torch.float32
