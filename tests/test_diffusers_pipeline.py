"""AutoguidedPipeline against diffusers' own pipelines (autoguidance off) and a float64 transcription (on).

Tiny random components built here (tests/_tiny_diffusers.py), float32, a few steps.  With
autoguidance off our latents (output_type="latent") must equal the pipeline's own within 2e-5 of
the output's largest magnitude: SD epsilon and v-prediction, SDXL, for Euler (Karras sigmas),
DPM-Solver++ 2M and Heun; SD3 with flow-matching Euler (first t = 1).  With autoguidance on,
alone and with CFG, they must equal a float64 transcription of
D = D1(c) + (w_cfg - 1)(D1(c) - D1(u)) + (w_ag - 1)(D1(c) - D0(c)) stepped by each solver.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import _tiny_diffusers as T

# Imported once, at collection: conftest restores the diffusers modules present before each test,
# so the pipelines' modules loaded here are not imported again for every test (seconds each).
T.preload()

import ag_kernels

TOL = 2e-5
STEPS = 5


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _pipe(family, scheduler, prediction="epsilon", **kw):
    if family == "sd":
        return T.sd_pipeline(scheduler, prediction_type=prediction, **kw)
    if family == "sdxl":
        return T.sdxl_pipeline(scheduler, **kw)
    return T.sd3_pipeline(**kw)


def _embeds(family, batch):
    return T.embeds(batch, pooled=family != "sd")


CASES = [
    ("sd", "EulerDiscreteScheduler", "epsilon", {"use_karras_sigmas": True}),
    ("sd", "DPMSolverMultistepScheduler", "epsilon", {}),
    ("sd", "HeunDiscreteScheduler", "epsilon", {}),
    ("sd", "EulerDiscreteScheduler", "v_prediction", {"use_karras_sigmas": True}),
    ("sd", "DPMSolverMultistepScheduler", "v_prediction", {"use_karras_sigmas": True}),
    ("sd", "HeunDiscreteScheduler", "v_prediction", {}),
    ("sdxl", "EulerDiscreteScheduler", "epsilon", {"use_karras_sigmas": True}),
    ("sdxl", "DPMSolverMultistepScheduler", "epsilon", {}),
    ("sdxl", "HeunDiscreteScheduler", "epsilon", {}),
    ("sd3", "FlowMatchEulerDiscreteScheduler", "flow", {}),
]


@pytest.mark.parametrize("family,scheduler,prediction,kw", CASES,
                         ids=[f"{c[0]}-{c[1].replace('Scheduler', '')}-{c[2]}" for c in CASES])
@pytest.mark.parametrize("cfg", [4.0, 1.0], ids=["cfg", "nocfg"])
def test_equals_diffusers_with_autoguidance_off(family, scheduler, prediction, kw, cfg):
    pipe = _pipe(family, scheduler, prediction, **kw)
    e, lat = _embeds(family, 2), T.latents(2)
    if cfg == 1.0:
        e = {k: v for k, v in e.items() if not k.startswith("negative")}
    ref = pipe(**e, latents=lat.clone(), num_inference_steps=STEPS, guidance_scale=cfg, output_type="latent").images
    if family == "sd3":
        assert pipe.scheduler.sigmas[0].item() == 1.0  # the schedule starts at t = 1 (EDM sigma infinite)
    guide = T.tiny_sd3_transformer(seed=5) if family == "sd3" else (
        T.tiny_sdxl_unet(seed=5) if family == "sdxl" else T.tiny_unet(seed=5))
    calls = _count_calls(guide)
    out = ag_kernels.AutoguidedPipeline.from_pipe(pipe, guide=guide)(
        **e, latents=lat.clone(), num_inference_steps=STEPS, guidance_scale=cfg, output_type="latent").images
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert _rel(out, ref) <= TOL, _rel(out, ref)
    assert calls == []  # autoguidance_scale = 1: the guide is never evaluated


def test_dpmpp_3m_equals_diffusers():
    # Third order, its lower-order start and (fewer than 15 steps) its lower-order second-to-last step.
    pipe = T.sd_pipeline("DPMSolverMultistepScheduler", solver_order=3)
    e, lat = T.embeds(1), T.latents(1)
    ref = pipe(**e, latents=lat.clone(), num_inference_steps=6, guidance_scale=3.0, output_type="latent").images
    out = ag_kernels.AutoguidedPipeline.from_pipe(pipe)(**e, latents=lat.clone(), num_inference_steps=6,
                                                        guidance_scale=3.0, output_type="latent").images
    assert _rel(out, ref) <= TOL


def test_decoded_images_equal_diffusers():
    pipe = T.sd_pipeline("EulerDiscreteScheduler")
    e, lat = T.embeds(1), T.latents(1)
    ref = pipe(**e, latents=lat.clone(), num_inference_steps=3, output_type="pt").images
    out = ag_kernels.AutoguidedPipeline.from_pipe(pipe)(**e, latents=lat.clone(), num_inference_steps=3,
                                                        output_type="pt").images
    assert out.shape == ref.shape == (1, 3, 8, 8)
    assert (out - ref).abs().max().item() <= 1e-5
    pil = ag_kernels.AutoguidedPipeline.from_pipe(pipe)(**e, latents=lat.clone(), num_inference_steps=2).images
    assert type(pil) is list and pil[0].size == (8, 8)


def _count_calls(model):
    calls = []
    model.register_forward_hook(lambda m, args, kwargs, out: calls.append(_batch_of(args, kwargs)), with_kwargs=True)
    return calls


def _batch_of(args, kwargs):
    x = args[0] if args else kwargs["hidden_states"]
    return x.shape[0]


def test_uncond_evaluated_only_with_cfg():
    pipe = T.sd_pipeline("EulerDiscreteScheduler")
    calls = _count_calls(pipe.unet)
    ag = ag_kernels.AutoguidedPipeline.from_pipe(pipe, guide=T.tiny_unet(seed=5))
    e = T.embeds(2)
    ag(prompt_embeds=e["prompt_embeds"], latents=T.latents(2), num_inference_steps=3, guidance_scale=1.0,
       autoguidance_scale=2.0, output_type="latent")
    assert calls == [2, 2, 2]  # one unbatched call per step: no unconditional branch
    calls.clear()
    ag(**e, latents=T.latents(2), num_inference_steps=3, guidance_scale=2.0, output_type="latent")
    assert calls == [4, 4, 4]


# --------------------------------------------------------------------------- float64 transcription


def _net64(family, model, prediction):
    """D(x, sigma, t, cond) in float64, the network evaluated in float32: the formulas of the issue."""
    def d(x, s, t, cond):
        if family == "sd3":
            v = model(hidden_states=x.float(), timestep=t.expand(x.shape[0]), return_dict=False, **cond)[0].double()
            return x - s * v
        out = model((x / math.sqrt(s * s + 1)).float(), t, return_dict=False, **cond)[0].double()
        if prediction == "epsilon":
            return x - s * out
        return x / (s * s + 1) - s / math.sqrt(s * s + 1) * out
    return d


def _reference64(pipe, family, guide, e, lat, steps, w_cfg, w_ag, solver):
    pipe.scheduler.set_timesteps(steps)
    sig = pipe.scheduler.sigmas.double().tolist()
    ts = list(pipe.scheduler.timesteps)
    if type(pipe.scheduler).__name__ == "HeunDiscreteScheduler":
        sig, ts = [sig[0]] + sig[1::2], [ts[0]] + ts[1::2]
    pred = "flow" if family == "sd3" else pipe.scheduler.config.prediction_type
    main = _net64(family, pipe.transformer if family == "sd3" else pipe.unet, pred)
    gnet = _net64(family, guide, pred)
    if family == "sd":
        c, u = ({"encoder_hidden_states": e["prompt_embeds"]}, {"encoder_hidden_states": e["negative_prompt_embeds"]})
    elif family == "sd3":
        c = {"encoder_hidden_states": e["prompt_embeds"], "pooled_projections": e["pooled_prompt_embeds"]}
        u = {"encoder_hidden_states": e["negative_prompt_embeds"],
             "pooled_projections": e["negative_pooled_prompt_embeds"]}
    else:
        ids = torch.tensor([[8.0, 8, 0, 0, 8, 8]]).repeat(lat.shape[0], 1)
        c = {"encoder_hidden_states": e["prompt_embeds"],
             "added_cond_kwargs": {"text_embeds": e["pooled_prompt_embeds"], "time_ids": ids}}
        u = {"encoder_hidden_states": e["negative_prompt_embeds"],
             "added_cond_kwargs": {"text_embeds": e["negative_pooled_prompt_embeds"], "time_ids": ids}}

    def D(x, s, t):
        dm = main(x, s, t, c)
        out = dm.clone()
        if w_cfg != 1:
            out += (w_cfg - 1) * (dm - main(x, s, t, u))
        if w_ag != 1:
            out += (w_ag - 1) * (dm - gnet(x, s, t, c))
        return out

    x = lat.double() * (1.0 if family == "sd3" else float(pipe.scheduler.init_noise_sigma))
    n = len(sig) - 1
    prev = None
    for i in range(n):
        s, sn = sig[i], sig[i + 1]
        d = D(x, s, ts[i])
        if solver == "dpmpp_2m" and family == "sd3":
            # Flow: x_t in lambda = log((1 - t) / t) (-inf at t = 1), data prediction, 2M midpoint:
            # x' = (t'/t) x + (1 - t')(1 - e^-h) D', D' = (1 + 1/(2r)) D - D_prev/(2r), r = h_prev / h.
            lam = [-math.inf if v == 1 else (math.inf if v == 0 else math.log((1 - v) / v)) for v in sig]
            h = lam[i + 1] - lam[i]
            dd = d
            if prev is not None and sn > 0:
                r = (lam[i] - lam[i - 1]) / h
                dd = (1 + 1 / (2 * r)) * d - prev / (2 * r)
            x = (sn / s) * x + (1 - sn) * (-math.expm1(-h)) * dd
            prev = d
        elif solver == "dpmpp_2m":
            # In the EDM variable, lambda = -log sigma: x' = (sn/s) x + (1 - sn/s) D', D' the 2M combination.
            if sn == 0:
                x = d
            else:
                h = math.log(s / sn)
                dd = d if prev is None else (1 + 1 / (2 * (math.log(sig[i - 1] / s) / h))) * d - prev / (
                    2 * (math.log(sig[i - 1] / s) / h))
                x = (sn / s) * x + (1 - sn / s) * dd
            prev = d
        else:
            x_e = x + (sn - s) * (x - d) / s
            if solver == "heun" and i < n - 1:
                x = x + (sn - s) * ((x - d) / s + (x_e - D(x_e, sn, ts[i + 1])) / sn) / 2
            else:
                x = x_e
    return x


AG_CASES = [
    ("sd", "EulerDiscreteScheduler", "epsilon", "euler"),
    ("sd", "HeunDiscreteScheduler", "v_prediction", "heun"),
    ("sd", "EulerDiscreteScheduler", "epsilon", "dpmpp_2m"),
    ("sdxl", "EulerDiscreteScheduler", "epsilon", "euler"),
    ("sd3", "FlowMatchEulerDiscreteScheduler", "flow", "euler"),
    ("sd3", "FlowMatchEulerDiscreteScheduler", "flow", "heun"),
    ("sd3", "FlowMatchEulerDiscreteScheduler", "flow", "dpmpp_2m"),
]


@pytest.mark.parametrize("family,scheduler,prediction,solver", AG_CASES, ids=[f"{c[0]}-{c[3]}" for c in AG_CASES])
@pytest.mark.parametrize("w_cfg,w_ag", [(1.0, 2.5), (3.0, 2.0)], ids=["ag", "ag+cfg"])
def test_autoguidance_equals_float64_transcription(family, scheduler, prediction, solver, w_cfg, w_ag):
    pipe = _pipe(family, scheduler, prediction)
    guide = T.tiny_sd3_transformer(seed=5) if family == "sd3" else (
        T.tiny_sdxl_unet(seed=5) if family == "sdxl" else T.tiny_unet(seed=5))
    e, lat = _embeds(family, 2), T.latents(2)
    kw = dict(e) if w_cfg != 1 else {k: v for k, v in e.items() if not k.startswith("negative")}
    out = ag_kernels.AutoguidedPipeline.from_pipe(pipe, guide=guide)(
        **kw, latents=lat.clone(), num_inference_steps=4, guidance_scale=w_cfg, autoguidance_scale=w_ag,
        solver=solver, output_type="latent").images
    with torch.no_grad():
        ref = _reference64(pipe, family, guide, e, lat, 4, w_cfg, w_ag, solver)
    assert _rel(out, ref) <= TOL, _rel(out, ref)
    # and autoguidance changed the result (the check can fail)
    plain = ag_kernels.AutoguidedPipeline.from_pipe(pipe)(**kw, latents=lat.clone(), num_inference_steps=4,
                                                          guidance_scale=w_cfg, solver=solver,
                                                          output_type="latent").images
    assert _rel(out, plain) > 1e-3


def test_per_image_weights_and_guidance_interval():
    pipe = T.sd_pipeline("EulerDiscreteScheduler")
    guide = T.tiny_unet(seed=5)
    e, lat = T.embeds(2), T.latents(2)
    ag = ag_kernels.AutoguidedPipeline.from_pipe(pipe, guide=guide)
    both = ag(**e, latents=lat.clone(), num_inference_steps=3, guidance_scale=2.0,
              autoguidance_scale=torch.tensor([1.5, 3.0]), output_type="latent").images
    for k, w in enumerate((1.5, 3.0)):
        one = ag(prompt_embeds=e["prompt_embeds"][k:k + 1], negative_prompt_embeds=e["negative_prompt_embeds"][k:k + 1],
                 latents=lat[k:k + 1].clone(), num_inference_steps=3, guidance_scale=2.0, autoguidance_scale=w,
                 output_type="latent").images
        assert _rel(both[k:k + 1], one) <= TOL
    # An interval that holds no step's noise level: no guidance at all, neither network evaluated.
    calls = _count_calls(guide)
    none = ag(**e, latents=lat.clone(), num_inference_steps=3, guidance_scale=2.0, autoguidance_scale=2.0,
              guidance_interval=(1000.0, 2000.0), output_type="latent").images
    plain = ag(prompt_embeds=e["prompt_embeds"], latents=lat.clone(), num_inference_steps=3, guidance_scale=1.0,
               output_type="latent").images
    assert calls == [] and torch.equal(none, plain)


# --------------------------------------------------------------------------- bad input


def _no_network_runs(pipe, guide=None):
    calls = []
    for net in (pipe.unet, pipe.vae) + ((guide,) if guide is not None else ()):
        net.register_forward_hook(lambda *a: calls.append(type(a[0]).__name__))
    return calls


def test_refused_pipeline_scheduler_and_guides():
    import diffusers

    for exc in (TypeError, ValueError):  # a wrong class is caught as either
        with pytest.raises(exc, match="pipe: DiffusionPipeline is not supported"):
            ag_kernels.AutoguidedPipeline.from_pipe(diffusers.DiffusionPipeline())
    pipe = T.sd_pipeline("EulerDiscreteScheduler")
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="pipe.scheduler: DDIMScheduler is not supported"):
        ag_kernels.AutoguidedPipeline.from_pipe(pipe)
    pipe = T.sd_pipeline("DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++")
    with pytest.raises(ValueError, match="algorithm_type='sde-dpmsolver\\+\\+' is not supported"):
        ag_kernels.AutoguidedPipeline.from_pipe(pipe)
    pipe = T.sd_pipeline("EulerDiscreteScheduler")
    with pytest.raises(ValueError, match="guide: its cross-attention width"):
        ag_kernels.AutoguidedPipeline.from_pipe(pipe, guide=T.tiny_unet(cross=8))
    with pytest.raises(ValueError, match="guide: its latent channels"):
        ag_kernels.AutoguidedPipeline.from_pipe(pipe, guide=T.tiny_unet(in_channels=8))
    with pytest.raises(TypeError, match="guide: a SD3Transformer2DModel cannot guide"):
        ag_kernels.AutoguidedPipeline.from_pipe(pipe, guide=T.tiny_sd3_transformer())
    with pytest.raises(ValueError, match="guide: its addition embedding"):
        ag_kernels.AutoguidedPipeline.from_pipe(T.sdxl_pipeline(), guide=T.tiny_unet())


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(autoguidance_scale=2.0), ValueError, "autoguidance_scale=2.0 needs a guide"),
    (dict(guidance_scale=float("nan")), ValueError, "guidance_scale must be finite"),
    (dict(guidance_scale=float("inf")), ValueError, "guidance_scale must be finite"),
    (dict(latents=T.latents(3)), ValueError, "latents: batch of 3"),
    (dict(solver="ddim"), ValueError, "solver must be one of"),
    (dict(backend="nonesuch"), ValueError, "nonesuch"),
    (dict(guidance_interval=(2.0, 1.0)), ValueError, "guidance_interval"),
    (dict(num_inference_steps=0), ValueError, "num_inference_steps"),
    (dict(guidance_rescale=0.7), ValueError, "guidance_rescale: not supported"),
    (dict(ip_adapter_image_embeds=[torch.zeros(1)]), ValueError, "ip_adapter_image_embeds: not supported"),
    (dict(no_such_argument=1), TypeError, "no_such_argument: not an argument"),
])
def test_bad_call_arguments_refused_before_any_network(kwargs, exc, match):
    pipe = T.sd_pipeline("EulerDiscreteScheduler")
    calls = _no_network_runs(pipe)
    call = dict(T.embeds(2), latents=T.latents(2), num_inference_steps=2, guidance_scale=2.0, output_type="latent")
    call.update(kwargs)
    with pytest.raises(exc, match=match):
        ag_kernels.AutoguidedPipeline.from_pipe(pipe)(**call)
    assert calls == []


def test_bad_autoguidance_weight_with_guide_refused_before_any_network():
    pipe = T.sd_pipeline("EulerDiscreteScheduler")
    guide = T.tiny_unet(seed=5)
    calls = _no_network_runs(pipe, guide)
    ag = ag_kernels.AutoguidedPipeline.from_pipe(pipe, guide=guide)
    e = T.embeds(2)
    for w, match in ((float("nan"), "autoguidance_scale must be finite"),
                     (torch.tensor([1.0, float("inf")]), "autoguidance_scale: must be finite"),
                     (torch.tensor([1.0, 2.0, 3.0]), "autoguidance_scale: a tensor of weights must have one per image")):
        with pytest.raises(ValueError, match=match):
            ag(**e, latents=T.latents(2), num_inference_steps=2, autoguidance_scale=w, output_type="latent")
    with pytest.raises(ValueError, match="negative_prompt: a list of 1 for 2"):
        ag(prompt=["a", "b"], negative_prompt=["c"], num_inference_steps=2, output_type="latent")
    assert calls == []


# --------------------------------------------------------------------------- imports


def test_import_and_edm_path_never_import_diffusers_and_without_it_one_clear_error():
    # One interpreter for both (its start-up is most of the time): the EDM path first, then diffusers made absent.
    code = ("import sys, torch, ag_kernels\n"
            "from ag_kernels import edm_sampler, TinyDenoiser\n"
            "net = TinyDenoiser(img_channels=2, img_resolution=4)\n"
            "edm_sampler(net, torch.randn(1, 2, 4, 4), num_steps=2)\n"
            "ag_kernels.AutoguidedPipeline\n"
            "assert 'diffusers' not in sys.modules, 'diffusers imported'\n"
            "sys.modules['diffusers'] = None\n"
            "try:\n    ag_kernels.AutoguidedPipeline.from_pipe(object())\n"
            "except ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert 'pip install -e ".[diffusers]"' in out


# --------------------------------------------------------------------------- text encoders, generators, dtypes, shards


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_text_prompts_and_generator_equal_diffusers(family):
    # The pipeline's own prompt encoding (tiny CLIP), its latents from a generator, two images per prompt.
    pipe = T.sd_pipeline(text_encoder=True) if family == "sd" else T.sdxl_pipeline(text_encoder=True)
    call = dict(prompt=["a cat", "a dog"], negative_prompt=["blurry", "dark"], num_images_per_prompt=2,
                num_inference_steps=3, guidance_scale=3.0, output_type="latent")
    ref = pipe(generator=torch.Generator().manual_seed(1), **call).images
    out = ag_kernels.AutoguidedPipeline.from_pipe(pipe)(generator=torch.Generator().manual_seed(1), **call).images
    assert out.shape == (4, 4, 8, 8) and _rel(out, ref) <= TOL


def test_guide_in_another_dtype():
    pipe = T.sd_pipeline("EulerDiscreteScheduler")
    e, lat = T.embeds(2), T.latents(2)
    call = dict(e, num_inference_steps=3, guidance_scale=2.0, autoguidance_scale=2.0, output_type="latent")
    f32 = ag_kernels.AutoguidedPipeline.from_pipe(pipe, guide=T.tiny_unet(seed=5))(latents=lat.clone(), **call).images
    bf16 = ag_kernels.AutoguidedPipeline.from_pipe(pipe, guide=T.tiny_unet(seed=5).to(torch.bfloat16))(
        latents=lat.clone(), **call).images
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    assert 0 < _rel(bf16, f32) < 2e-2  # the guide ran in bfloat16 (not equal), on the same inputs (close)


def test_generate_shards_seeds_over_ranks(monkeypatch):
    from ag_kernels.sampling import generation

    pipe = T.sd_pipeline("EulerDiscreteScheduler")
    ag = ag_kernels.AutoguidedPipeline.from_pipe(pipe)
    kw = dict(seeds=range(5), batch_size=1, progress=False, prompt_embeds=T.embeds(1)["prompt_embeds"],
              num_inference_steps=2, guidance_scale=1.0)
    single = {s: b.samples[k] for b in ag.generate(**kw) for k, s in enumerate(b.seeds)}
    union = {}
    for rank in (0, 1):
        monkeypatch.setattr(generation, "_distributed", lambda device=None, rank=rank: (rank, 2))
        mine = {s: b.samples[k] for b in ag.generate(**kw) for k, s in enumerate(b.seeds)}
        assert sorted(mine) == list(range(rank, 5, 2))
        union.update(mine)
    assert sorted(union) == list(range(5)) and all(torch.equal(union[s], single[s]) for s in single)


def test_guide_given_as_a_pipeline_uses_its_prediction_type():
    # An epsilon main pipeline guided by a v-prediction pipeline's UNet: each output converted by its own rule.
    pipe = T.sd_pipeline("EulerDiscreteScheduler")
    guide_pipe = T.sd_pipeline("EulerDiscreteScheduler", prediction_type="v_prediction", seed=5)
    e, lat = T.embeds(2), T.latents(2)
    kw = {k: v for k, v in e.items() if not k.startswith("negative")}
    out = ag_kernels.AutoguidedPipeline.from_pipe(pipe, guide=guide_pipe)(
        **kw, latents=lat.clone(), num_inference_steps=3, autoguidance_scale=2.0, guidance_scale=1.0,
        output_type="latent").images
    pipe.scheduler.set_timesteps(3)
    sig, ts = pipe.scheduler.sigmas.double().tolist(), list(pipe.scheduler.timesteps)
    main, guide = _net64("sd", pipe.unet, "epsilon"), _net64("sd", guide_pipe.unet, "v_prediction")
    c = {"encoder_hidden_states": e["prompt_embeds"]}
    x = lat.double() * float(pipe.scheduler.init_noise_sigma)
    with torch.no_grad():
        for i in range(3):
            dm = main(x, sig[i], ts[i], c)
            d = dm + (dm - guide(x, sig[i], ts[i], c))
            x = x + (sig[i + 1] - sig[i]) * (x - d) / sig[i]
    assert _rel(out, x) <= TOL


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_bfloat16_pipeline_with_float32_guide_and_embeddings(family):
    # The networks get their conditioning in their own dtype; the VAE its latents in its own.
    pipe = _pipe(family, "EulerDiscreteScheduler" if family != "sd3" else None)
    guide = T.tiny_sd3_transformer(seed=5) if family == "sd3" else (
        T.tiny_sdxl_unet(seed=5) if family == "sdxl" else T.tiny_unet(seed=5))
    e, lat = _embeds(family, 2), T.latents(2)
    call = dict(e, num_inference_steps=3, guidance_scale=3.0, autoguidance_scale=2.0, output_type="pt")
    f32 = ag_kernels.AutoguidedPipeline.from_pipe(pipe, guide=guide)(latents=lat.clone(), **call).images
    pipe.to(torch.bfloat16)
    bf16 = ag_kernels.AutoguidedPipeline.from_pipe(pipe, guide=guide)(latents=lat.to(torch.bfloat16), **call).images
    assert bf16.dtype == torch.bfloat16 and bf16.shape == f32.shape == (2, 3, 8, 8)
    assert _rel(bf16, f32) < 0.1
