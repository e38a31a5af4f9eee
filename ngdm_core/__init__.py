"""Pure-PyTorch maths of the pack's editing methods; never imports ComfyUI."""

from .denoisers import GaussianDenoiser, classifier_free_guidance
from .ngdm import (per_pixel_time_denoiser, power_law_start_sigmas, sample_per_pixel_time, start_sigmas, started,
                   weight_map)
from .samplers import SAMPLERS, sample_dpmpp_2m, sample_euler, sample_euler_ancestral
from .schedule import noise_source

__all__ = [
    "GaussianDenoiser", "classifier_free_guidance", "per_pixel_time_denoiser", "power_law_start_sigmas",
    "sample_per_pixel_time", "start_sigmas", "started", "weight_map", "SAMPLERS", "sample_dpmpp_2m",
    "sample_euler", "sample_euler_ancestral", "noise_source",
]
