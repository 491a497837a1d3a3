"""The kernel ops as torch custom ops: opcheck, and torch.compile(fullgraph=True) over the API."""

import pytest
import torch

import ag_kernels
from _util import (
    DEVICES, KERNEL_BACKENDS, TOL, make_cfg, make_inputs, make_params, make_uncond, oracle, rel_err, require,
)


def _namespace(backend):
    if backend == "triton":
        import ag_kernels.kernels.triton_kernels  # noqa: F401  (registers the ops)

        return torch.ops.ag_kernels_triton
    return torch.ops.ag_kernels


def _samples(device, gen):
    """(op name, args) for each kernel op, with and without guidance, scalar and per-sample, and with
    CFG's third output (d_uncond, c_vec, c) appended."""
    shape = (3, 2, 37)
    samples = []
    for mode in ("scalar", "per_sample"):
        g, s, sn = make_params(mode, shape[0], device, gen)
        vec = lambda v: v if isinstance(v, torch.Tensor) else None  # noqa: E731
        num = lambda v: 1.0 if isinstance(v, torch.Tensor) else v  # noqa: E731
        x, x_euler, d_main, d_guide = make_inputs(shape, torch.float32, torch.bfloat16, device, gen, s)
        for guide in (d_guide, None):
            out = torch.empty(shape, device=device)
            samples += [
                ("guided_denoise", (out, d_main, guide, vec(g), num(g))),
                ("euler_step", (out, x, d_main, guide, vec(g), vec(s), vec(sn), num(g), num(s), num(sn))),
                ("heun_step", (out, x, x_euler, d_main, guide, vec(g), vec(s), vec(sn), num(g), num(s), num(sn))),
                ("guided_score", (out, x, d_main, guide, vec(g), vec(s), num(g), num(s))),
            ]
        cfg = make_cfg(mode, shape[0], device, gen)
        three = (make_uncond(d_main, gen), vec(cfg), num(cfg))
        samples += [(name, args + three) for name, args in samples[-4:]]
    return samples


def test_kernel_schemas_agree():
    """The Triton ops take the extension's arguments (names, types, defaults): the API calls both alike."""
    from ag_kernels.kernels._backends import EXT_OPS, _load_ext

    if _load_ext() is None:
        pytest.skip("the extension is not built")
    require("triton", "cpu")
    for name in EXT_OPS:
        ext = getattr(_namespace("ext"), name).default._schema
        tri = getattr(_namespace("triton"), name).default._schema
        describe = lambda schema: [(a.name, str(a.type), a.default_value) for a in schema.arguments]  # noqa: E731
        assert describe(ext) == describe(tri), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend, device, gen):
    require(backend, device)
    ns = _namespace(backend)
    for name, args in _samples(device, gen):
        torch.library.opcheck(getattr(ns, name).default, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compiled_loop(backend, device, gen):
    """A Heun sampling loop over the public ops traces without graph breaks and matches eager."""
    require(backend, device)
    shape = (2, 3, 8, 8)
    sigmas = [2.0, 1.2, 0.7, 0.3]
    x0, _, d_main, d_guide = make_inputs(shape, torch.float32, torch.bfloat16, device, gen, sigmas[0])
    w = (1.5 + torch.rand(shape[0], generator=gen)).to(device)
    d_uncond, cfg = make_uncond(d_main, gen), make_cfg("per_sample", shape[0], device, gen)

    def loop(x):
        for t_cur, t_next in zip(sigmas[:-1], sigmas[1:]):
            x_euler = ag_kernels.euler_step(x, d_main, d_guide, w, t_cur, t_next, backend=backend)
            x = ag_kernels.heun_step(x, x_euler, d_main, d_guide, w, t_cur, t_next, backend=backend, out=x_euler)
        x = ag_kernels.euler_step(x, d_main, d_guide, w, sigmas[-1], sigmas[-1] / 2, backend=backend,
                                  d_uncond=d_uncond, cfg_scale=cfg)
        return ag_kernels.guided_score(x, d_main, d_guide, w, sigmas[-1], backend=backend)

    compile_backend = "inductor" if device == "cuda" else "aot_eager"
    torch._dynamo.reset()
    compiled = torch.compile(loop, fullgraph=True, backend=compile_backend)
    eager = loop(x0.clone())
    assert rel_err(compiled(x0.clone()), eager) <= TOL[torch.float32]
    loop_reference = x0.clone()
    for t_cur, t_next in zip(sigmas[:-1], sigmas[1:]):
        x_euler = oracle("euler_step", loop_reference, None, d_main, d_guide, w, t_cur, t_next)
        loop_reference = oracle("heun_step", loop_reference, x_euler, d_main, d_guide, w, t_cur, t_next)
    loop_reference = oracle("euler_step", loop_reference, None, d_main, d_guide, w, sigmas[-1], sigmas[-1] / 2,
                            d_uncond=d_uncond, cfg=cfg)
    expected = oracle("guided_score", loop_reference, None, d_main, d_guide, w, sigmas[-1], None)
    assert rel_err(eager, expected) <= 10 * TOL[torch.float32]  # 7 chained ops in float32
