"""Tiny random diffusers components and pipelines, built offline (no hub), for tests, benchmarks and docs.

``tiny_unet``, ``tiny_sdxl_unet``, ``tiny_sd3_transformer``, ``tiny_vae``, ``tiny_text_encoder``:
networks of a few thousand weights with fixed seeds; ``sd_pipeline``, ``sdxl_pipeline``,
``sd3_pipeline``: the pipelines around them, with a scheduler by name (``scheduler_by_name``);
``sd_embeds`` and friends: prompt embeddings for pipelines without text encoders.
:func:`docs_setup` is the docs page's setup hook: it makes ``from_pretrained`` return tiny components.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

LATENT = 4
CROSS = 16       # cross-attention width (SD, SDXL)
POOLED = 16      # pooled text embedding width (SDXL, SD3)
TIME_EMBED = 4   # SDXL's addition_time_embed_dim
SEQ = 5          # prompt embedding length (given embeddings)
TOKENS = 16      # the tiny tokenizer's and text encoders' sequence length


def preload():
    """Import the diffusers and transformers modules these builders and the pipelines use."""
    import diffusers
    from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput  # noqa: F401
    from diffusers.pipelines.stable_diffusion_3 import StableDiffusion3PipelineOutput  # noqa: F401
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift  # noqa: F401
    from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput  # noqa: F401
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: F401

    for name in ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "DiffusionPipeline",
                 "UNet2DConditionModel", "SD3Transformer2DModel", "AutoencoderKL", "EulerDiscreteScheduler",
                 "HeunDiscreteScheduler", "DPMSolverMultistepScheduler", "FlowMatchEulerDiscreteScheduler",
                 "DDIMScheduler"):
        getattr(diffusers, name)


def _seeded(seed, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def tiny_unet(seed=0, *, cross=CROSS, in_channels=LATENT, sample_size=8):
    from diffusers import UNet2DConditionModel

    return _seeded(seed, lambda: UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross, norm_num_groups=4,
        attention_head_dim=4))


def tiny_sdxl_unet(seed=0, *, cross=CROSS, sample_size=8):
    from diffusers import UNet2DConditionModel

    return _seeded(seed, lambda: UNet2DConditionModel(
        sample_size=sample_size, in_channels=LATENT, out_channels=LATENT, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross, norm_num_groups=4,
        attention_head_dim=4, addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=6 * TIME_EMBED + POOLED, transformer_layers_per_block=1))


def tiny_sd3_transformer(seed=0, *, joint=CROSS, sample_size=8):
    from diffusers import SD3Transformer2DModel

    return _seeded(seed, lambda: SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=LATENT, out_channels=LATENT, num_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=joint, caption_projection_dim=16,
        pooled_projection_dim=POOLED, pos_embed_max_size=16))


def tiny_vae(seed=0, *, shift_factor=None):
    from diffusers import AutoencoderKL

    kw = {} if shift_factor is None else {"shift_factor": shift_factor}
    return _seeded(seed, lambda: AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1, latent_channels=LATENT,
        norm_num_groups=4, sample_size=8, **kw))


def tiny_tokenizer(folder=None):
    """A CLIP tokenizer whose vocabulary is the lowercase letters (one token per character), written to ``folder``."""
    from transformers import CLIPTokenizer

    folder = folder or tempfile.mkdtemp(prefix="tiny_tok_")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=TOKENS,
                         unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_text_encoder(seed=0, *, width=CROSS):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=54, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=TOKENS, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)
    return _seeded(seed, lambda: CLIPTextModel(config))


def scheduler_by_name(name, *, prediction_type="epsilon", **overrides):
    """The SD-style scheduler (scaled_linear betas, leading spacing, as SD's own config) named ``name``."""
    import diffusers

    if name == "FlowMatchEulerDiscreteScheduler":
        return diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, **overrides)
    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  steps_offset=1, timestep_spacing="leading", prediction_type=prediction_type)
    config.update(overrides)
    return getattr(diffusers, name).from_config(config)


def sd_pipeline(scheduler="EulerDiscreteScheduler", *, prediction_type="epsilon", text_encoder=False, seed=0,
                **scheduler_kw):
    from diffusers import StableDiffusionPipeline

    tokenizer = encoder = None
    if text_encoder:
        tokenizer, encoder = tiny_tokenizer(), tiny_text_encoder(seed + 3)
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(seed + 1), text_encoder=encoder, tokenizer=tokenizer, unet=tiny_unet(seed),
        scheduler=scheduler_by_name(scheduler, prediction_type=prediction_type, **scheduler_kw),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_pipeline(scheduler="EulerDiscreteScheduler", *, text_encoder=False, seed=0, **scheduler_kw):
    from diffusers import StableDiffusionXLPipeline

    tok = enc = tok2 = enc2 = None
    if text_encoder:
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        tok, tok2 = tiny_tokenizer(), tiny_tokenizer()
        enc = tiny_text_encoder(seed + 3, width=CROSS // 2)
        config = CLIPTextConfig(vocab_size=54, hidden_size=CROSS // 2, intermediate_size=CROSS, num_hidden_layers=1,
                                num_attention_heads=2, max_position_embeddings=TOKENS, projection_dim=POOLED,
                                bos_token_id=0, eos_token_id=1, pad_token_id=1)
        enc2 = _seeded(seed + 4, lambda: CLIPTextModelWithProjection(config))
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(seed + 1), text_encoder=enc, text_encoder_2=enc2, tokenizer=tok, tokenizer_2=tok2,
        unet=tiny_sdxl_unet(seed), scheduler=scheduler_by_name(scheduler, **scheduler_kw), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_pipeline(seed=0, **scheduler_kw):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(seed), scheduler=scheduler_by_name("FlowMatchEulerDiscreteScheduler",
                                                                             **scheduler_kw),
        vae=tiny_vae(seed + 1, shift_factor=0.1), text_encoder=None, tokenizer=None, text_encoder_2=None,
        tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeds(batch=1, *, seed=10, pooled=False, width=CROSS):
    """Prompt embeddings [batch, SEQ, width] (and pooled [batch, POOLED]) for the prompt and the negative prompt."""
    g = torch.Generator().manual_seed(seed)
    out = {"prompt_embeds": torch.randn(batch, SEQ, width, generator=g),
           "negative_prompt_embeds": torch.randn(batch, SEQ, width, generator=g)}
    if pooled:
        out["pooled_prompt_embeds"] = torch.randn(batch, POOLED, generator=g)
        out["negative_pooled_prompt_embeds"] = torch.randn(batch, POOLED, generator=g)
    return out


def latents(batch=1, size=8, seed=20):
    return torch.randn(batch, LATENT, size, size, generator=torch.Generator().manual_seed(seed))


def docs_setup(monkeypatch):
    """Setup hook of docs/diffusers.md: ``from_pretrained`` of the SD/SDXL pipelines and of
    UNet2DConditionModel returns tiny random components (with tiny tokenizers and text encoders),
    so the page's code runs offline in seconds."""
    import diffusers

    def sd(cls, *args, **kwargs):
        return sd_pipeline(text_encoder=True)

    def sdxl(cls, *args, **kwargs):
        return sdxl_pipeline(text_encoder=True)

    def unet(cls, *args, subfolder=None, **kwargs):
        # A guide for either pipeline: SDXL-shaped when the repository's name says xl.
        name = str(args[0] if args else kwargs.get("pretrained_model_name_or_path", ""))
        return tiny_sdxl_unet(seed=7) if "xl" in name.lower() else tiny_unet(seed=7)

    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_pretrained", classmethod(sd))
    monkeypatch.setattr(diffusers.StableDiffusionXLPipeline, "from_pretrained", classmethod(sdxl))
    monkeypatch.setattr(diffusers.UNet2DConditionModel, "from_pretrained", classmethod(unet))
