"""Adapters from ComfyUI's objects to the ``ngdm_core`` interfaces, shared by the pack's nodes."""

import comfy.model_management
import comfy.model_sampling
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils
import torch

from ..ngdm_core.ngdm import start_sigmas
from ..ngdm_core.validation import require_finite_tensor

CATEGORY = "NGDM Editing"


def parametrization(model_sampling) -> str:
    """``"flow"`` for rectified-flow (CONST) models, ``"vp"`` for EPS, V-prediction, EDM and X0 models."""
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        return "flow"
    if isinstance(model_sampling, comfy.model_sampling.EPS):
        return "vp"
    raise ValueError(f"model: unsupported prediction type {type(model_sampling).__name__}; "
                     "supported are EPS, V-prediction, EDM, X0 and flow (CONST) models")


def host_start_sigmas(model_sampling, weights, sigmas, mapping):
    """Per-pixel start sigmas with the model's own sigma/timestep conversions (used by the linear mapping)."""
    return start_sigmas(weights, sigmas, mapping, parametrization(model_sampling),
                        to_timestep=model_sampling.timestep, to_sigma=model_sampling.sigma,
                        sigma_min=float(model_sampling.sigma_min))


def ordered_widgets(node, lower, upper, **values):
    """A ``validate_inputs`` result: True, or what is wrong, where widget ``lower`` must not exceed ``upper``.

    ComfyUI skips its own min/max check for every input a node's ``validate_inputs`` names, so
    the range of each of ``values`` is checked here from the node's schema. A value of None came
    through a link and is unknown at queue time; the node checks it when it runs.
    """
    # define_schema, not GET_SCHEMA: validation runs on a locked clone of the class, which
    # GET_SCHEMA would try to write to.
    widgets = {spec.id: spec for spec in node.define_schema().inputs}
    for name, value in values.items():
        if value is None:
            continue
        if widgets[name].min is not None and value < widgets[name].min:
            return f"{name} must be at least {widgets[name].min}, got {value}"
        if widgets[name].max is not None and value > widgets[name].max:
            return f"{name} must be at most {widgets[name].max}, got {value}"
    low, high = values[lower], values[upper]
    if low is not None and high is not None and low > high:
        return f"{lower} ({low}) must not exceed {upper} ({high})"
    return True


def require_image_latent(name, model, samples):
    if samples.is_nested or samples.ndim != 4:
        raise ValueError(f"{name}: expected an image latent of shape (batch, channels, height, width), got {tuple(samples.shape)}")
    if samples.shape[0] == 0:
        raise ValueError(f"{name}: the latent batch is empty")
    channels = model.model.latent_format.latent_channels
    if samples.shape[1] != channels:
        raise ValueError(f"{name} has {samples.shape[1]} channels but the model expects {channels}: "
                         "encode the image with this model's VAE")
    require_finite_tensor(name, samples)


def model_conditioning(model, x, positive):
    """The diffusion model's keyword inputs for ``positive`` at latent ``x``, as BaseModel.apply_model gets them."""
    conds = comfy.samplers.encode_model_conds(model.model.extra_conds, comfy.sampler_helpers.convert_cond(positive)[:1],
                                              x, x.device, "positive")
    return {name: cond.process_cond(batch_size=x.shape[0], device=x.device).cond
            for name, cond in conds[0]["model_conds"].items()}


def to_image_resolution(maps, model):
    """Per-latent-pixel maps (..., h, w) at image resolution, each latent pixel a block of the VAE's factor.

    Nearest upsampling: ComfyUI's bilinear resize of a noise mask back to latent size samples
    inside each block, so such a MASK gives the same values if it is set on a latent again.
    """
    ratio = getattr(model.model.latent_format, "spacial_downscale_ratio", 8)
    return maps.repeat_interleave(ratio, dim=-2).repeat_interleave(ratio, dim=-1)


def guided_denoiser(model, negative, cfg, seed):
    """``D(x, sigma, positive) -> x0``: the model's CFG'd prediction through ComfyUI's own guider.

    Going through ``CFGGuider`` keeps everything a sampler would apply: model loading and memory
    management, ControlNet and area conditioning, and CFG patches. ``x`` and the result are in
    the model's processed latent space.
    """
    def denoise(x, sigma, positive):
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)

        def evaluate(model_k, noised, sigmas, extra_args=None, callback=None, disable=None):
            return model_k(x.to(noised.device), sigma.to(noised.device), **extra_args)

        # Zero noise and a zero latent: the guider neither shifts nor noises anything, and the
        # one-step sampler above evaluates the model on x itself.
        zeros = torch.zeros(x.shape, dtype=torch.float32)
        schedule = torch.tensor([float(sigma[0]), 0.0])
        denoised = guider.sample(zeros, zeros, comfy.samplers.KSAMPLER(evaluate), schedule, disable_pbar=True, seed=seed)
        return model.model.process_latent_in(denoised).to(x)

    return denoise


def progress_reporter(total):
    """A ``progress(done, total)`` callback that drives ComfyUI's progress bar and honours cancel."""
    bar = comfy.utils.ProgressBar(total)

    def progress(done, new_total):
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, new_total)

    return progress


def seeds_per_call(model, shape, num_maps):
    """How many noised copies of the latent fit one model call; all of them unless memory is short."""
    free = comfy.model_management.get_free_memory(model.load_device)
    # The guider evaluates cond and uncond together.
    per_seed = model.model.memory_required([2 * shape[0], *shape[1:]])
    return max(1, min(num_maps, int(free // max(per_seed, 1))))
