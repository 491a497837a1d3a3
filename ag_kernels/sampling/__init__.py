"""Sampling wing: the guided EDM sampler built on the kernels wing.

``engine`` (:class:`GuidedSampler`: the run, eager or from a CUDA graph) with its parts
``_settings`` (checked arguments, guidance weights), ``_plan`` (the schedule of a run) and
``_graphs`` (static buffers, capture, replay, the graph cache); ``sampler`` (the drop-in
``edm_sampler``); ``tuning`` (schedules fitted to a guided pair and a solver); ``seeds`` (per-seed
noise); ``generation`` (many seeds to images, torchrun); ``pipelines`` (:class:`AutoguidedPipeline`:
diffusers pipelines with a guide network; imports diffusers only when used).
It imports the kernels wing and nothing above it.
"""

from .engine import GuidedSampler, NonFiniteError
from .generation import GeneratedBatch, generate
from .pipelines import AutoguidedPipeline
from .sampler import SOLVERS, edm_sampler, karras_schedule
from .seeds import SeedNoise, parse_seeds
from .tuning import load_schedule, save_schedule, tune_schedule

__all__ = ["GuidedSampler", "NonFiniteError", "edm_sampler", "karras_schedule", "SOLVERS", "generate",
           "GeneratedBatch", "SeedNoise", "parse_seeds", "AutoguidedPipeline", "tune_schedule", "save_schedule",
           "load_schedule"]
