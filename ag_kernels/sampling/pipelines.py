"""Autoguidance and CFG together for diffusers pipelines (SD, SDXL, SD3), on the fused step ops.

:meth:`AutoguidedPipeline.from_pipe` wraps a StableDiffusionPipeline, StableDiffusionXLPipeline or
StableDiffusion3Pipeline and a guide network (a smaller, earlier or otherwise worse model of the
same family).  The wrapper takes the pipeline's own call arguments plus ``autoguidance_scale``,
``guidance_interval``, ``solver`` and ``backend``, and samples with the guided denoiser

    D = D1(c) + (w_cfg - 1) (D1(c) - D1(u)) + (w_ag - 1) (D1(c) - D0(c))

where D1 is the main network, D0 the guide, c the prompt and u the negative prompt; w_cfg is the
pipeline's ``guidance_scale`` (CFG only when > 1, as in diffusers) and w_ag ``autoguidance_scale``
(1 = off: the guide is not evaluated).  Prompt encoding, the scheduler's noise levels and
timesteps, the initial latent scaling and the VAE decode are the pipeline's own; the loop over
the steps is ours: the networks through :class:`ag_kernels.models.diffusers_models.DiffusersDenoiser`,
then one fused op per step.  diffusers is imported only here, when a pipeline is wrapped.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from ..kernels import ops
from ..kernels._backends import resolve_backend
from ..models.diffusers_models import DiffusersDenoiser, UnsupportedModelError, check_guide_fits, require_diffusers
from ._plan import MULTISTEP, _dpmpp_coefficients, _Multistep
from ._settings import _real, check_interval
from .generation import GeneratedBatch, _batches, _check_options, _place

__all__ = ["AutoguidedPipeline", "PIPELINES", "SCHEDULERS", "PIPELINE_SOLVERS"]

# Pipeline class -> family; a subclass is accepted as its base.
PIPELINES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl", "StableDiffusion3Pipeline": "sd3"}
# Scheduler class -> (default solver, the space its samples live in): "edm" (x = x0 + sigma eps),
# "vp" (x / sqrt(sigma^2 + 1), DPM-Solver's), "flow" (x_t of flow matching).
SCHEDULERS = {"EulerDiscreteScheduler": ("euler", "edm"), "HeunDiscreteScheduler": ("heun", "edm"),
              "DPMSolverMultistepScheduler": (None, "vp"), "FlowMatchEulerDiscreteScheduler": ("euler", "flow")}
PIPELINE_SOLVERS = ("euler", "heun", "dpmpp_2m", "dpmpp_3m")

# Call arguments of the pipelines that this loop follows; any other one must keep its default.
_HANDLED = {
    "prompt", "prompt_2", "prompt_3", "negative_prompt", "negative_prompt_2", "negative_prompt_3", "prompt_embeds",
    "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds", "height", "width",
    "num_inference_steps", "guidance_scale", "num_images_per_prompt", "generator", "latents", "output_type",
    "return_dict", "cross_attention_kwargs", "joint_attention_kwargs", "clip_skip", "original_size",
    "crops_coords_top_left", "target_size", "negative_original_size", "negative_crops_coords_top_left",
    "negative_target_size", "max_sequence_length", "mu", "callback_on_step_end_tensor_inputs", "eta", "kwargs",
}


class AutoguidedPipeline:
    """A diffusers pipeline sampled with autoguidance (a guide network) and CFG, fused.

    Make one with :meth:`from_pipe`, not with the constructor; call it as you would call the
    pipeline itself (:meth:`__call__`), or make one PNG per seed with :meth:`generate`.  Each step
    evaluates D = D1(c) + (w_cfg - 1) (D1(c) - D1(u)) + (w_ag - 1) (D1(c) - D0(c)) and steps
    with one fused op; prompt encoding, the scheduler's noise levels and timesteps, the initial
    latent scaling and the VAE decode are the pipeline's own.

    Args:
        pipe: the wrapped pipeline, as :meth:`from_pipe` checked it.
        guide: the guide network D0 (a UNet2DConditionModel or SD3Transformer2DModel), or None.

    Raises:
        ValueError: from :meth:`from_pipe` and :meth:`__call__`, which check their arguments before
            any network runs; see there.
    """

    def __init__(self, pipe, guide=None, *, _family: str, _guide_prediction: Optional[str] = None):
        self.pipe = pipe
        self.guide = guide
        self.family = _family
        self._guide_prediction = _guide_prediction

    @classmethod
    def from_pipe(cls, pipe, guide=None) -> "AutoguidedPipeline":
        """Wrap a diffusers pipeline and, optionally, a guide network for autoguidance.

        Args:
            pipe: a StableDiffusionPipeline (epsilon or v-prediction), StableDiffusionXLPipeline or
                StableDiffusion3Pipeline (or a subclass), with a scheduler this loop can follow:
                EulerDiscreteScheduler, HeunDiscreteScheduler, DPMSolverMultistepScheduler
                (dpmsolver++, order 2 or 3) or FlowMatchEulerDiscreteScheduler.
            guide: the guide network D0: a model of the main network's class (UNet2DConditionModel
                or SD3Transformer2DModel) that takes the same latents and conditioning (latent
                channels, cross-attention width, SDXL's added embeddings), or a pipeline holding
                one (its scheduler's prediction type is then the guide's).  Its size, depth,
                dtype and device may differ.  None: CFG alone.

        Returns:
            The wrapper, an :class:`AutoguidedPipeline`.

        Raises:
            ImportError: diffusers or transformers is not installed (the message says what to
                install).
            ValueError: ``pipe`` is of another pipeline class, or ``guide`` is not a network of the
                main network's class (both an ``UnsupportedModelError``, which is also a
                TypeError); the guide's latent channels or conditioning widths differ from the
                main network's; ``pipe.scheduler`` is one this loop cannot follow (named in the
                message).
        """
        diffusers = require_diffusers()
        family = None
        for name, fam in PIPELINES.items():
            if isinstance(pipe, getattr(diffusers, name)):
                family = fam
        if family is None:
            raise UnsupportedModelError(f"pipe: {type(pipe).__name__} is not supported; supported pipelines: "
                            f"{', '.join(PIPELINES)}")
        main = _denoiser_of(pipe, family)
        guide_prediction = None
        if guide is not None:
            if hasattr(guide, "unet") or hasattr(guide, "transformer"):  # a pipeline: take its network
                sched = getattr(guide, "scheduler", None)
                guide_prediction = getattr(getattr(sched, "config", None), "prediction_type", None)
                guide = _denoiser_of(guide, family, name="guide")
            check_guide_fits(main, guide, "guide")
        _follow_scheduler(pipe.scheduler, family)  # refuse a scheduler we cannot follow now, not at the call
        return cls(pipe, guide, _family=family, _guide_prediction=guide_prediction)

    # ------------------------------------------------------------------ the call

    @torch.no_grad()
    def __call__(self, prompt=None, *, autoguidance_scale=1.0, guidance_interval=None, solver: Optional[str] = None,
                 backend: str = "auto", **kwargs):
        """Sample as the wrapped pipeline does, with autoguidance and CFG in one fused op per step.

        Args:
            prompt: the pipeline's ``prompt``: a str or a list of str (or None with
                ``prompt_embeds``).
            autoguidance_scale: w_ag, a real number or a tensor with one weight per image; 1 turns
                autoguidance off (the guide is not evaluated).  Other values need a guide.
            guidance_interval: ``(lo, hi)``: guide (CFG and autoguidance) only at noise levels
                sigma in (lo, hi], sigma in the EDM sense (flow models: t / (1 - t)); outside it
                neither the guide nor the unconditional branch is evaluated.  None: every step.
            solver: ``"euler"``, ``"heun"``, ``"dpmpp_2m"`` or ``"dpmpp_3m"``; None follows
                ``pipe.scheduler`` (EulerDiscrete: euler, HeunDiscrete: heun, DPMSolverMultistep
                order 2 / 3: dpmpp_2m / dpmpp_3m, FlowMatchEulerDiscrete: euler in t).
            backend: the fused ops' backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"ext"``.
            **kwargs: the pipeline's own call arguments, with the same meaning
                (``negative_prompt``, ``prompt_embeds``, ``negative_prompt_embeds``,
                ``guidance_scale`` (w_cfg; CFG only when > 1), ``num_inference_steps``,
                ``latents``, ``generator``, ``output_type``, ``height``, ``width``,
                ``num_images_per_prompt``, ``return_dict``, ...).  Ones this loop does not follow
                (callbacks, ``guidance_rescale``, ...) must keep their defaults.

        Returns:
            diffusers' own output type for the pipeline (``.images``), or a tuple with
            ``return_dict=False``.

        Raises:
            TypeError: an argument of the wrong type (``prompt``, ``prompt_embeds``,
                ``latents``, ``backend``), or a keyword the pipeline does not take.
            ValueError: an unknown ``solver`` or ``backend``; ``autoguidance_scale != 1`` without
                a guide; a non-finite weight, or a tensor of weights without one per image; a
                bad ``guidance_interval``; latents, negative prompts or generators whose count
                does not match the prompts; an argument this loop does not support left off its
                default; what the pipeline's own ``check_inputs`` refuses.  All before any
                network runs.
        """
        pipe, family = self.pipe, self.family
        args = _pipeline_arguments(pipe, dict(kwargs, prompt=prompt))
        default_solver, space, lower_order_final = _follow_scheduler(pipe.scheduler, family)
        solver = default_solver if solver is None else solver
        if solver not in PIPELINE_SOLVERS:
            raise ValueError(f"solver must be one of {PIPELINE_SOLVERS} or None (the scheduler's), got {solver!r}")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str, got {type(backend).__name__}")
        batch = _batch_size(args)
        images = batch * args["num_images_per_prompt"]
        w_cfg = _weight("guidance_scale", args["guidance_scale"], images)
        w_ag = _weight("autoguidance_scale", autoguidance_scale, images)
        do_cfg = isinstance(w_cfg, torch.Tensor) or w_cfg > 1  # diffusers' rule: CFG when guidance_scale > 1
        do_ag = isinstance(w_ag, torch.Tensor) or w_ag != 1
        if do_ag and self.guide is None:
            raise ValueError(f"autoguidance_scale={_show(autoguidance_scale)} needs a guide network: pass "
                             "AutoguidedPipeline.from_pipe(pipe, guide=...)")
        interval = check_interval(guidance_interval)
        _check_batch(args, batch, images)
        if family != "sd3" and getattr(_denoiser_of(pipe, family).config, "time_cond_proj_dim", None) is not None:
            raise ValueError("pipe: a UNet with time_cond_proj_dim (guidance-embedded, LCM-style) is not supported")
        args["height"] = args["height"] or _default_size(pipe, family)
        args["width"] = args["width"] or _default_size(pipe, family)
        _call_with(pipe.check_inputs, args, callback_steps=None)
        device = pipe._execution_device
        resolve_backend(backend, device)  # an unknown backend, or one that cannot run there: refused now

        cond = _encode(pipe, family, args, device, do_cfg, images)
        sig, ts, latents = self._schedule_and_latents(args, device, cond["dtype"], images, space)
        main = DiffusersDenoiser(_denoiser_of(pipe, family), "flow" if family == "sd3" else
                                 pipe.scheduler.config.prediction_type, extra=cond["extra"])
        guide = None
        if do_ag:
            guide = DiffusersDenoiser(self.guide, "flow" if family == "sd3" else
                                      (self._guide_prediction or pipe.scheduler.config.prediction_type),
                                      extra=cond["extra"])
        x = latents.to(torch.float32, copy=True)  # the run's own buffer, stepped in place
        if space == "vp":
            x = x * math.sqrt(sig[0] ** 2 + 1)  # DPM-Solver keeps x / sqrt(sigma^2 + 1); we step x itself
        run = _Run(main, guide, cond, w_cfg if do_cfg else None, w_ag if do_ag else None, interval, family == "sd3",
                   backend)
        x = run.sample(x, sig, ts, solver, lower_order_final, pipe)
        return _finish(pipe, family, x.to(latents.dtype), args, device, cond)

    def generate(self, seeds=range(16), batch_size: int = 4, outdir=None, *, subdirs: bool = True,
                 batch_split: str = "fixed", skip_existing: bool = False, device=None, progress: bool = True,
                 **call_kwargs) -> Iterator[GeneratedBatch]:
        """One image per seed, as :func:`ag_kernels.generate` makes them: a generator of :class:`GeneratedBatch`.

        Each seed's initial latents come from its own generator (``randn`` of the latent shape,
        seeded with seed % 2**32), so a seed gives the same image in any batch.

        Args:
            seeds: the seeds (an iterable of ints, or a str such as ``"0-63"``).
            batch_size: the largest batch.
            outdir: write one PNG per seed, ``NNNNNN.png``, into this folder (None: write nothing).
            subdirs: one subfolder per 1000 seeds.
            batch_split: how the seeds are cut into batches, as for :func:`ag_kernels.generate`.
            skip_existing: resume: skip the seeds whose PNGs are already in ``outdir``.
            device: where to sample (default: the pipeline's network's device); under torchrun the
                batches are dealt out over the processes.
            progress: show a progress bar.
            **call_kwargs: this pipeline's call arguments (``prompt``: one text for every seed,
                ``negative_prompt``, ``guidance_scale``, ``autoguidance_scale``,
                ``num_inference_steps``, ...); prompt embeddings with a batch of one are repeated
                per seed.

        Yields:
            A :class:`GeneratedBatch` per batch: ``samples`` the float images in [0, 1],
            ``images`` their uint8 values.

        Raises:
            TypeError: ``latents``, ``generator``, ``output_type``, ``return_dict`` or
                ``num_images_per_prompt`` given (generate sets them), a prompt that is not one
                str, or an option of the wrong type (``progress``, ``subdirs``, ``outdir``, ...).
            ValueError: bad seeds or batch size, an unknown ``batch_split``, ``skip_existing``
                without ``outdir``, as for :func:`ag_kernels.generate`; bad call arguments, as for
                :meth:`__call__`.
        """
        seeds, batch_size = _check_options(seeds, batch_size, progress, subdirs, skip_existing, outdir, batch_split,
                                           None, call_kwargs)
        for key in ("latents", "generator", "output_type", "return_dict", "num_images_per_prompt"):
            if key in call_kwargs:
                raise TypeError(f"{key}: set by generate (per-seed latents, images out); do not pass it")
        for key in ("prompt", "negative_prompt"):
            if call_kwargs.get(key) is not None and not isinstance(call_kwargs[key], str):
                raise TypeError(f"{key}: generate takes one text for every seed, got {type(call_kwargs[key]).__name__}")
        net = _denoiser_of(self.pipe, self.family)
        height = call_kwargs.get("height") or _default_size(self.pipe, self.family)
        width = call_kwargs.get("width") or _default_size(self.pipe, self.family)
        scale = self.pipe.vae_scale_factor
        shape = (net.config.in_channels, int(height) // scale, int(width) // scale)
        device, rank, world = _place(net, device)

        def sample(rng, noise, labels):
            n = noise.shape[0]
            kw = {k: ([v] * n if isinstance(v, str) and "prompt" in k else
                      v.repeat(n, *([1] * (v.dim() - 1))) if isinstance(v, torch.Tensor) and k.endswith("_embeds")
                      and v.shape[0] == 1 else v) for k, v in call_kwargs.items()}
            images = self(latents=noise, output_type="pt", **kw).images
            return images, (images * 255).round().clamp(0, 255).to(torch.uint8)

        yield from _batches(sample, seeds, batch_size, rank, world, batch_split, progress, outdir, subdirs,
                            skip_existing, device, shape, 0, None)

    def _schedule_and_latents(self, args, device, dtype, images, space):
        """(noise levels, timesteps, initial latents) as the pipeline makes them."""
        pipe, sched = self.pipe, self.pipe.scheduler
        n = args["num_inference_steps"]
        kw = {}
        if self.family == "sd3":
            # SD3's order: latents first (they give the sequence length for the dynamic shift), then the schedule.
            latents = _call_with(pipe.prepare_latents, args, batch_size=images,
                                 num_channels_latents=pipe.transformer.config.in_channels, dtype=dtype, device=device)
            mu = args.get("mu")
            if sched.config.get("use_dynamic_shifting", None) and mu is None:
                from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

                h, w = latents.shape[-2:]
                p = pipe.transformer.config.patch_size
                mu = calculate_shift((h // p) * (w // p), sched.config.get("base_image_seq_len", 256),
                                     sched.config.get("max_image_seq_len", 4096),
                                     sched.config.get("base_shift", 0.5), sched.config.get("max_shift", 1.16))
            if mu is not None:
                kw["mu"] = mu
            sched.set_timesteps(n, device=device, **kw)
        else:
            sched.set_timesteps(n, device=device)
            latents = _call_with(pipe.prepare_latents, args, batch_size=images,
                                 num_channels_latents=pipe.unet.config.in_channels, dtype=dtype, device=device)
        sig, ts = _base_schedule(sched)
        return sig, ts, latents


# --------------------------------------------------------------------------- the loop


class _Run:
    """One sampling loop: the networks at each noise level, the guided step ops in between."""

    def __init__(self, main, guide, cond, w_cfg, w_ag, interval, flow: bool, backend: str):
        self.main, self.guide = main, guide
        # Each network gets its conditioning on its device and in its dtype (given embeddings may be float32).
        self.cond = {k: _moved(cond[k], main.device, main.dtype) for k in ("c", "both")}
        self.w_cfg, self.w_ag, self.interval, self.flow, self.backend = w_cfg, w_ag, interval, flow, backend
        self.guide_cond = None if guide is None else _moved(cond["c"], guide.device, guide.dtype)

    def _guided_here(self, sigma: float) -> bool:
        if self.interval is None:
            return True
        edm_sigma = (sigma / (1 - sigma) if sigma < 1 else math.inf) if self.flow else sigma
        lo, hi = self.interval
        return lo < edm_sigma <= hi

    def denoise(self, x, sigma: float, timestep):
        """(d_main, d_guide, w_ag, d_uncond, w_cfg) at (x, sigma): the three outputs, None where not evaluated."""
        guided = self._guided_here(sigma)
        w_cfg = self.w_cfg if guided else None
        w_ag = self.w_ag if guided else None
        main = self.main
        if w_cfg is not None:
            # One batched call [uncond, cond], as the pipelines make it; the input scaled and doubled in one pass.
            inp = main.model_input(x.expand(2, *x.shape), sigma).reshape(2 * x.shape[0], *x.shape[1:])
            out = main.raw(inp, timestep, self.cond["both"])
            d_uncond, d_main = main.denoised(x, out.view(2, *x.shape), sigma).unbind(0)
        else:
            out = main.raw(main.model_input(x, sigma), timestep, self.cond["c"])
            d_uncond, d_main = None, main.denoised(x, out, sigma)
        d_guide = None
        if w_ag is not None:
            d_guide = self.guide(x, sigma, timestep, self.guide_cond)
        return d_main, d_guide, w_ag, d_uncond, w_cfg

    def sample(self, x, sig: List[float], ts, solver: str, lower_order_final: bool, pipe):
        """The run from x (a buffer of its own: updated in place) over the noise levels sig."""
        n = len(sig) - 1
        # One PreparedSteps for the run: our outputs are float32 on x's device and shape by
        # construction, so each step goes straight to the backend's kernel.
        steps = ops.PreparedSteps(x, backend=self.backend)
        self.w_cfg, self.w_ag = (w.to(x.device) if isinstance(w, torch.Tensor) else w for w in (self.w_cfg, self.w_ag))
        history = x_e = None
        if solver in MULTISTEP:
            history = torch.empty((MULTISTEP[solver],) + tuple(x.shape), dtype=x.dtype, device=x.device)
        elif solver == "heun":
            x_e = torch.empty_like(x)
        with pipe.progress_bar(total=n) as bar:
            for i in range(n):
                s, s_next = sig[i], sig[i + 1]
                terms = _terms(*self.denoise(x, s, ts[i]))
                if solver in MULTISTEP:
                    step = _Multistep(*_multistep(solver, sig, i, lower_order_final, self.flow))
                    steps.multistep(x, *terms[:3], history, step, x, **terms[3])
                elif solver == "heun" and i < n - 1:
                    steps.euler(x, *terms[:3], s, s_next, x_e, **terms[3])
                    terms = _terms(*self.denoise(x_e, s_next, ts[i + 1]))
                    steps.heun(x, x_e, *terms[:3], s, s_next, x, **terms[3])
                else:
                    steps.euler(x, *terms[:3], s, s_next, x, **terms[3])
                bar.update()
        return x


def _terms(d_main, d_guide, w_ag, d_uncond, w_cfg):
    """(d_main, d_guide, w, {d_uncond, cfg_scale}) as the fused step ops take the three outputs.

    With one guidance term only, the one-guide form: CFG alone is D1(u) + w_cfg (D1(c) - D1(u)).
    """
    if d_guide is None and d_uncond is not None:
        return d_main, d_uncond, w_cfg, {}
    if d_uncond is None:
        return d_main, d_guide, 1.0 if d_guide is None else w_ag, {}
    return d_main, d_guide, w_ag, {"d_uncond": d_uncond, "cfg_scale": w_cfg}


def _multistep(solver: str, sig: List[float], i: int, lower_order_final: bool, flow: bool):
    """(a, b, read, write) of DPM-Solver++ step i as DPMSolverMultistepScheduler takes it: midpoint
    second order, lower orders while the history fills, first order onto sigma = 0, and with fewer
    than 15 steps (lower_order_final) at most second order on the step before the last.

    Flow models step x_t in their own time t: with sigma = t / (1 - t) (infinite at t = 1, where
    the update is first order by itself) x_t' = (t'/t) x_t + (1 - t') sum_k b_k D_k.
    """
    n = len(sig) - 1
    s = [(v / (1 - v) if v < 1 else math.inf) for v in sig] if flow else sig
    top = MULTISTEP[solver] + 1
    order = min(i + 1, top)
    if lower_order_final and n < 15 and i == n - 2:
        order = min(order, 2)
    if s[i + 1] == 0 or order == 1:
        a, b = _dpmpp_coefficients("dpmpp_2m", s[i:i + 2], 0)
    else:
        a, b = _dpmpp_coefficients("dpmpp_2m" if order == 2 else "dpmpp_3m", s, i)
    if flow:
        a = sig[i + 1] / sig[i]
        b = tuple(v * (1 - sig[i + 1]) for v in b)
    slots = MULTISTEP[solver]
    read = tuple((i - k) % slots for k in range(1, len(b)))
    return a, b, read, i % slots


# --------------------------------------------------------------------------- pipeline parts


def _denoiser_of(pipe, family, name="pipe"):
    net = getattr(pipe, "transformer" if family == "sd3" else "unet", None)
    if net is None:
        raise ValueError(f"{name}: has no {'transformer' if family == 'sd3' else 'unet'}")
    return net


def _follow_scheduler(sched, family) -> Tuple[str, str, bool]:
    """(default solver, sample space, lower_order_final) of a scheduler we can follow; ValueError naming it otherwise."""
    name = type(sched).__name__
    if name not in SCHEDULERS:
        raise ValueError(f"pipe.scheduler: {name} is not supported; supported schedulers: {', '.join(SCHEDULERS)}")
    solver, space = SCHEDULERS[name]
    cfg = sched.config
    if (space == "flow") != (family == "sd3"):
        raise ValueError(f"pipe.scheduler: {name} does not fit this pipeline's model "
                         f"({'flow matching' if family == 'sd3' else 'a DDPM-style schedule'})")

    def refuse(key, value):
        raise ValueError(f"pipe.scheduler: {name} with {key}={value!r} is not supported")

    if space != "flow" and cfg.get("prediction_type") not in ("epsilon", "v_prediction", "sample"):
        refuse("prediction_type", cfg.get("prediction_type"))
    if cfg.get("clip_sample") or cfg.get("thresholding"):
        refuse("clip_sample" if cfg.get("clip_sample") else "thresholding", True)
    if name == "DPMSolverMultistepScheduler":
        for key, ok in (("algorithm_type", "dpmsolver++"), ("solver_type", "midpoint"), ("final_sigmas_type", "zero"),
                        ("use_flow_sigmas", False), ("variance_type", None)):
            if cfg.get(key, ok) != ok:
                refuse(key, cfg.get(key))
        order = cfg.get("solver_order", 2)
        solver = {1: "euler", 2: "dpmpp_2m", 3: "dpmpp_3m"}.get(order) or refuse("solver_order", order)
    if name == "FlowMatchEulerDiscreteScheduler":
        for key in ("stochastic_sampling", "invert_sigmas"):
            if cfg.get(key):
                refuse(key, True)
    return solver, space, bool(cfg.get("lower_order_final", True))


def _base_schedule(sched) -> Tuple[List[float], List[torch.Tensor]]:
    """(sigma_0 > ... > sigma_N, the timestep of each sigma_i, i < N) from a scheduler's set_timesteps.

    Heun's scheduler lists every inner noise level twice (the end of one step, the start of the
    next); the base schedule takes each once.  For flow matching the "sigma" is t.
    """
    sig = sched.sigmas.to(torch.float32).cpu()
    ts = sched.timesteps
    if type(sched).__name__ == "HeunDiscreteScheduler":
        sig = torch.cat([sig[:1], sig[1::2]])
        ts = torch.cat([ts[:1], ts[1::2]])
    return sig.tolist(), list(ts)


def _encode(pipe, family, args, device, do_cfg, images) -> Dict[str, Any]:
    """The conditioning of the networks: "c" (the prompt), "both" ([negative, prompt] batched, under
    CFG), "extra" (keyword arguments of every call) and "dtype" (of the prompt embeddings)."""
    attn = args.get("joint_attention_kwargs" if family == "sd3" else "cross_attention_kwargs")
    lora_scale = attn.get("scale", None) if attn is not None else None
    enc = _call_with(pipe.encode_prompt, args, device=device, do_classifier_free_guidance=do_cfg,
                     lora_scale=lora_scale)
    extra = {"joint_attention_kwargs": attn} if family == "sd3" else {"cross_attention_kwargs": attn}
    if family == "sd":
        pe, npe = enc
        c, u = {"encoder_hidden_states": pe}, {"encoder_hidden_states": npe}
    elif family == "sd3":
        pe, npe, ppe, nppe = enc
        c = {"encoder_hidden_states": pe, "pooled_projections": ppe}
        u = {"encoder_hidden_states": npe, "pooled_projections": nppe}
    else:
        pe, npe, ppe, nppe = enc
        proj = int(ppe.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
        h, w = args["height"], args["width"]
        ids = pipe._get_add_time_ids(args["original_size"] or (h, w), args["crops_coords_top_left"],
                                     args["target_size"] or (h, w), dtype=pe.dtype, text_encoder_projection_dim=proj)
        neg_ids = ids
        if args["negative_original_size"] is not None and args["negative_target_size"] is not None:
            neg_ids = pipe._get_add_time_ids(args["negative_original_size"], args["negative_crops_coords_top_left"],
                                             args["negative_target_size"], dtype=pe.dtype,
                                             text_encoder_projection_dim=proj)
        c = {"encoder_hidden_states": pe.to(device),
             "added_cond_kwargs": {"text_embeds": ppe.to(device), "time_ids": ids.to(device).repeat(images, 1)}}
        u = None
        if do_cfg:
            # As the pipeline batches them (time ids: [negative, prompt] repeated per image).
            both_ids = torch.cat([neg_ids, ids], dim=0).to(device).repeat(images, 1)
            return {"c": c, "extra": extra, "dtype": pe.dtype, "both": {
                "encoder_hidden_states": torch.cat([npe, pe], dim=0).to(device),
                "added_cond_kwargs": {"text_embeds": torch.cat([nppe, ppe], dim=0).to(device), "time_ids": both_ids}}}
    both = None
    if do_cfg:
        both = {k: torch.cat([u[k], c[k]], dim=0) for k in c}
    return {"c": c, "both": both, "extra": extra, "dtype": pe.dtype}


def _finish(pipe, family, latents, args, device, cond):
    """The pipeline's own ending: VAE decode, postprocessing, its output type."""
    output_type, generator = args["output_type"], args["generator"]
    if family == "sd":
        from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

        nsfw = None
        if output_type != "latent":
            image = pipe.vae.decode((latents / pipe.vae.config.scaling_factor).to(pipe.vae.dtype), return_dict=False,
                                    generator=generator)[0]
            image, nsfw = pipe.run_safety_checker(image, device, cond["dtype"])
        else:
            image = latents
        denorm = [True] * image.shape[0] if nsfw is None else [not v for v in nsfw]
        image = pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=denorm)
        pipe.maybe_free_model_hooks()
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=nsfw) if args["return_dict"] \
            else (image, nsfw)
    if family == "sdxl":
        from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput

        image = latents
        if output_type != "latent":
            vae = pipe.vae
            upcast = vae.dtype == torch.float16 and vae.config.force_upcast
            if upcast:
                pipe.upcast_vae()
                latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
            mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
            if mean is not None and std is not None:
                mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
                std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
                latents = latents * std / vae.config.scaling_factor + mean
            else:
                latents = latents / vae.config.scaling_factor
            image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
            if upcast:
                vae.to(dtype=torch.float16)
            if pipe.watermark is not None:
                image = pipe.watermark.apply_watermark(image)
            image = pipe.image_processor.postprocess(image, output_type=output_type)
        pipe.maybe_free_model_hooks()
        return StableDiffusionXLPipelineOutput(images=image) if args["return_dict"] else (image,)
    from diffusers.pipelines.stable_diffusion_3 import StableDiffusion3PipelineOutput

    image = latents
    if output_type != "latent":
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        image = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
        image = pipe.image_processor.postprocess(image, output_type=output_type)
    pipe.maybe_free_model_hooks()
    return StableDiffusion3PipelineOutput(images=image) if args["return_dict"] else (image,)


# --------------------------------------------------------------------------- checks


def _pipeline_arguments(pipe, given: Dict[str, Any]) -> Dict[str, Any]:
    """The pipeline's call arguments with its defaults filled in; unknown or unsupported ones refused by name."""
    params = _parameters(type(pipe).__call__)
    args = {k: p.default for k, p in params.items()
            if k != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    for key, value in given.items():
        if key not in args:
            raise TypeError(f"{key}: not an argument of {type(pipe).__name__} (nor of AutoguidedPipeline)")
        if key not in _HANDLED and not _is_default(value, args[key]):
            raise ValueError(f"{key}: not supported by AutoguidedPipeline (leave it at its default)")
        args[key] = value
    if args.get("guidance_rescale", 0.0) not in (0, 0.0):
        raise ValueError("guidance_rescale: not supported by AutoguidedPipeline (leave it at 0)")
    for key in ("num_inference_steps", "num_images_per_prompt"):
        v = args[key]
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {v!r}")
    if args["output_type"] not in ("latent", "pil", "np", "pt"):
        raise ValueError(f"output_type must be 'latent', 'pil', 'np' or 'pt', got {args['output_type']!r}")
    return args


def _is_default(value, default) -> bool:
    if value is default:
        return True
    try:
        return bool(value == default)
    except Exception:  # tensors, arrays: not a default
        return False


def _batch_size(args) -> int:
    prompt, embeds = args["prompt"], args["prompt_embeds"]
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            raise ValueError("prompt: an empty list")
        return len(prompt)
    if prompt is not None:
        raise TypeError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
    if embeds is None:
        raise ValueError("pass prompt or prompt_embeds")
    if not isinstance(embeds, torch.Tensor):
        raise TypeError(f"prompt_embeds must be a tensor, got {type(embeds).__name__}")
    return embeds.shape[0]


def _check_batch(args, batch: int, images: int) -> None:
    """The lengths that must agree with the prompt's, checked before any network runs."""
    neg = args.get("negative_prompt")
    if isinstance(neg, (list, tuple)) and len(neg) != batch:
        raise ValueError(f"negative_prompt: a list of {len(neg)} for {batch} prompt(s)")
    latents = args["latents"]
    if latents is not None:
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"latents must be a tensor, got {type(latents).__name__}")
        if latents.dim() < 1 or latents.shape[0] != images:
            raise ValueError(f"latents: batch of {latents.shape[0] if latents.dim() else 0}, but the prompt gives "
                             f"{batch} x num_images_per_prompt {args['num_images_per_prompt']} = {images} images")
        if not torch.isfinite(latents).all():
            raise ValueError("latents: holds non-finite values")
    gen = args["generator"]
    if isinstance(gen, (list, tuple)) and len(gen) != images:
        raise ValueError(f"generator: a list of {len(gen)} generators for {images} images")


def _weight(name: str, value, images: int):
    """A guidance weight: a finite real number (float), or a finite tensor of one weight per image."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.item()
        else:
            if value.dim() != 1 or value.shape[0] != images:
                raise ValueError(f"{name}: a tensor of weights must have one per image ({images}), "
                                 f"got shape {tuple(value.shape)}")
            if not torch.isfinite(value).all():
                raise ValueError(f"{name}: must be finite, got {value.tolist()}")
            return value.to(torch.float32)
    return _real(name, value)


def _show(value):
    return value.tolist() if isinstance(value, torch.Tensor) else value


def _default_size(pipe, family) -> int:
    if family == "sd3":
        return pipe.default_sample_size * pipe.vae_scale_factor
    size = pipe.unet.config.sample_size
    return (size if isinstance(size, int) else size[0]) * pipe.vae_scale_factor


@functools.lru_cache(maxsize=None)
def _parameters(fn):
    """The parameters of a function (inspect.signature takes about 0.1 ms: once per function)."""
    return inspect.signature(fn).parameters


def _call_with(fn, args: Dict[str, Any], **fixed):
    """``fn`` called with those of its parameters that ``fixed`` or ``args`` name."""
    params = _parameters(getattr(fn, "__func__", fn))
    kw = {k: (fixed[k] if k in fixed else args[k]) for k in params if k in fixed or k in args}
    return fn(**kw)


def _moved(cond, device, dtype):
    """The conditioning for a network on another device or dtype."""
    if isinstance(cond, dict):
        return {k: _moved(v, device, dtype) for k, v in cond.items()}
    if isinstance(cond, torch.Tensor):
        return cond.to(device, dtype) if cond.is_floating_point() else cond.to(device)
    return cond
