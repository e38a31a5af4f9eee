"""The baseline every ComfyUI user has: masked sampling, SetLatentNoiseMask + KSampler.

ComfyUI's inpainting wrapper (``KSamplerX0Inpaint``) blends at every model call, with the
mask ``m`` as given (soft or binary): the model sees ``x*m + noised_source*(1 - m)`` and its
prediction becomes ``D*m + source*(1 - m)``. A mask-0 pixel ends on the source, a mask-1 pixel
is sampled as plain sampling would, and a pixel in between is a blend at every step, not a
later start. NGDM and DifferentialDiffusion turn the map into start times instead; with a
binary map, both are this same masked sampling (up to DifferentialDiffusion's linear mapping,
which at weight 1 is the same start).
"""

import torch

from .ngdm import noised_source_reference, require_sampling_inputs
from .samplers import sample_euler
from .schedule import check_parametrization, noise_source, per_item


def masked_denoiser(model, reference, mask: torch.Tensor):
    """Wrap ``model(x, sigma, **kw) -> x0`` with ComfyUI's blend by ``mask``; ``reference`` as :func:`~ngdm_core.ngdm.per_pixel_time_denoiser`'s.

    Unlike NGDM's replacement, the blend never writes into the sampler's state: ComfyUI's
    wrapper computes a new input, and so does this one.
    """
    def denoise(x, sigma, **extra_args):
        state, prediction = reference(sigma)
        x = x * mask + state * (1.0 - mask)
        return model(x, sigma, **extra_args) * mask + prediction * (1.0 - mask)

    return denoise


def masked_start(source: torch.Tensor, noise: torch.Tensor, sigma, parametrization: str = "vp",
                 max_denoise: bool = False) -> torch.Tensor:
    """The sampler's first state: ComfyUI's ``noise_scaling``, whose VP form scales the noise by ``sqrt(1 + sigma^2)``
    instead of ``sigma`` when the run starts at the model's largest sigma (``max_denoise``)."""
    check_parametrization(parametrization)
    if max_denoise and parametrization == "vp":
        return source + noise * per_item(torch.sqrt(1.0 + torch.as_tensor(sigma) ** 2.0), source)
    return noise_source(source, noise, sigma, parametrization)


def sample_masked(denoiser, source: torch.Tensor, mask: torch.Tensor, sigmas: torch.Tensor, noise: torch.Tensor,
                  cond=None, sampler=sample_euler, parametrization: str = "vp", callback=None,
                  max_denoise: bool = False, **sampler_options) -> torch.Tensor:
    """Masked sampling of ``source`` over ``sigmas`` with any ``denoiser(x, sigma, cond) -> x0`` and ``sampler``.

    ``mask`` is shaped like ``source`` or with one channel, in [0, 1]; ``noise`` is the one
    noise the run starts from and the held pixels are noised with (ComfyUI's ``model.noise``).
    ``max_denoise`` is ComfyUI's rule for the start (see :func:`masked_start`): True when
    ``sigmas[0]`` is the model's largest sigma, as at KSampler's denoise 1.
    """
    require_sampling_inputs(source, "mask", mask, sigmas, noise)
    model = masked_denoiser(lambda x, sigma: denoiser(x, sigma, cond),
                            noised_source_reference(source, noise, parametrization), mask.to(source.dtype))
    x = masked_start(source, noise, sigmas[0], parametrization, max_denoise)
    return sampler(model, x, sigmas, callback=callback, **sampler_options)
