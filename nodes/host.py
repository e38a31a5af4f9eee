"""Adapters from ComfyUI's objects to the ``ngdm_core`` interfaces, shared by the pack's nodes."""

import math

import comfy.controlnet
import comfy.ldm.modules.diffusionmodules.openaimodel
import comfy.model_management
import comfy.model_sampling
import comfy.ops
import comfy.sample
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils
import torch
from server import PromptServer

from ..ngdm_core.frozen_layers import frozen_layers
from ..ngdm_core.ngdm import start_sigmas
from ..ngdm_core.validation import all_finite, require_finite_tensor, require_sigma_schedule

CATEGORY = "NGDM Editing"


def parametrization(model_sampling) -> str:
    """``"flow"`` for rectified-flow (CONST) models, ``"vp"`` for EPS, V-prediction, EDM and X0 models."""
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        return "flow"
    if isinstance(model_sampling, comfy.model_sampling.EPS):
        return "vp"
    raise ValueError(f"model: unsupported prediction type {type(model_sampling).__name__}; "
                     "supported are EPS, V-prediction, EDM, X0 and flow (CONST) models")


def host_start_sigmas(model_sampling, weights, sigmas, mapping, start_rule="first_at_or_below"):
    """Per-pixel start sigmas with the model's own sigma/timestep conversions (used by the linear mapping)."""
    return start_sigmas(weights, sigmas, mapping, parametrization(model_sampling),
                        to_timestep=model_sampling.timestep, to_sigma=model_sampling.sigma,
                        sigma_min=float(model_sampling.sigma_min), start_rule=start_rule)


def host_weight_and_bias(layer, x):
    """The weights a ComfyUI linear or conv layer computes with: its own cast path, with weight patches (LoRA),
    offloading and fp16/bf16/fp8 storage handled as its forward would."""
    return comfy.ops.cast_bias_weight(layer, x)


def unet_layers(diffusion_model, prefixes):
    """The linear and conv layers (:func:`~ngdm_core.frozen_layers.frozen_layers`) of the U-Net's top-level blocks
    whose parameter names start with one of ``prefixes`` (``"output_blocks."``, ``"out."``, ...)."""
    return frozen_layers(module for name, module in diffusion_model.named_children() if f"{name}." in prefixes)


def compute_dtype(model):
    """The dtype the U-Net computes in, as BaseModel.apply_model casts its inputs: fp16 or bf16 on most GPUs."""
    return model.model.manual_cast_dtype or model.model.get_dtype()


def edit_sigmas(model_sampling, steps, strength):
    """The "simple" schedule KSampler runs for ``steps`` steps at ``denoise`` = ``strength``, ending at 0."""
    if strength > 0.9999:
        return comfy.samplers.calculate_sigmas(model_sampling, "simple", steps).cpu()
    return comfy.samplers.calculate_sigmas(model_sampling, "simple", int(steps / strength))[-(steps + 1):].cpu()


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


def _require_latent(name, base_model, samples, frame_axis):
    shape = tuple(samples.shape)
    if samples.is_nested or samples.ndim not in ((4, 5) if frame_axis else (4,)):
        expected = "(batch, channels, height, width)"
        if frame_axis:
            expected += " or, from a video VAE such as Qwen-Image's, (batch, channels, 1, height, width)"
        raise ValueError(f"{name}: expected an image latent of shape {expected}, got {shape}")
    if samples.ndim == 5 and getattr(base_model.latent_format, "latent_dimensions", 2) == 2:
        raise ValueError(f"{name} is a 5-D latent {shape}, but this model takes (batch, channels, height, width) "
                         "latents: encode the image with this model's VAE")
    if samples.ndim == 5 and samples.shape[2] != 1:
        raise ValueError(f"{name} is a video latent of {samples.shape[2]} frames {shape}; these nodes edit single "
                         "images: pass a one-frame latent")
    if samples.shape[0] == 0:
        raise ValueError(f"{name}: the latent batch is empty")
    channels = base_model.latent_format.latent_channels
    if samples.shape[1] != channels:
        raise ValueError(f"{name} has {samples.shape[1]} channels but the model expects {channels}: "
                         "encode the image with this model's VAE")
    require_finite_tensor(name, samples)


def require_image_latent(name, model, samples):
    """A (batch, channels, height, width) latent for ``model``, as the U-Net-only nodes take."""
    _require_latent(name, model.model, samples, frame_axis=False)


def require_pixelwise_latent(name, model, samples):
    """An image latent for ``model``: 4-D, or 5-D with one frame as VAEs with ``latent_dim`` 3 encode images.

    For the nodes whose maths is per pixel, which keep the latent's shape on output.
    """
    _require_latent(name, model.model, samples, frame_axis=True)


def as_sampled(model, samples):
    """``samples`` shaped as ComfyUI's samplers give them to the model: with a frame axis for 3-D latent formats.

    A 4-D latent reaching a Qwen-Image-style model (e.g. from EmptySD3LatentImage) gets it the
    same way SamplerCustomAdvanced and KSampler give it one.
    """
    return comfy.sample.fix_empty_latent_channels(model, samples)


def require_sampling_run(model, sigmas):
    """At a SAMPLER function's start: the run's sigmas, latent and noise, checked as the nodes check theirs.

    ``model`` is the sampler's model, which carries the run's latent and noise. ComfyUI returns
    the latent unchanged for an empty schedule without calling the sampler, so the shortest
    schedule seen here has one sigma.
    """
    require_sigma_schedule("sigmas", sigmas)
    _require_latent("latent", model.inner_model.inner_model, model.latent_image, frame_axis=True)
    require_finite_tensor("noise", model.noise)


def _non_finite_part(value, where, seen):
    """Where in ``value``, part of a conditioning entry, a NaN or inf sits (as a description), or None."""
    if torch.is_tensor(value):
        return None if value.is_nested or all_finite(value) else where
    if isinstance(value, float):
        return None if math.isfinite(value) else where
    if id(value) in seen:
        return None
    seen.add(id(value))
    if isinstance(value, dict):
        parts = [(item, f"{where}[{key!r}]") for key, item in value.items()]
    elif isinstance(value, (list, tuple)):
        parts = [(item, f"{where}[{index}]") for index, item in enumerate(value)]
    elif isinstance(value, comfy.controlnet.ControlBase):
        parts = [(value.cond_hint_original, f"the hint of {where}"), (value.strength, f"the strength of {where}"),
                 (value.extra_concat_orig, f"the extra inputs of {where}"),
                 (value.previous_controlnet, f"the ControlNet chained before {where}")]
    else:
        return None
    return next((found for item, name in parts if (found := _non_finite_part(item, name, seen))), None)


def cross_attention_width(model):
    """The prompt-embedding width ``model`` takes, where ComfyUI 0.8 keeps it; None for other models.

    U-Nets (SD1.x 768, SD2.x 1024, SDXL 2048) keep it as ``context_dim`` in their config. Flux,
    Flux 2, Chroma and Qwen-Image feed the embedding to a linear ``txt_in``, SD3's MMDiT to a
    linear ``context_embedder``. Models that transform it first are not guessed at.
    """
    diffusion_model = model.model.diffusion_model
    if isinstance(diffusion_model, comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel):
        return model.model.model_config.unet_config.get("context_dim")
    for attribute in ("txt_in", "context_embedder"):
        layer = getattr(diffusion_model, attribute, None)
        if isinstance(layer, torch.nn.Linear):
            return layer.in_features
    return None


def require_conditioning(name, model, conditioning):
    """A CONDITIONING for ``model``: finite everywhere, with prompt embeddings as wide as the model takes.

    Every tensor and number of every entry is checked: the prompt embedding, its options
    (pooled output, masks, reference latents, ...) and the hints of any ControlNets on it.
    """
    if not isinstance(conditioning, (list, tuple)) or not all(
            isinstance(entry, (list, tuple)) and len(entry) == 2 and torch.is_tensor(entry[0])
            and isinstance(entry[1], dict) for entry in conditioning):
        raise ValueError(f"{name}: expected a CONDITIONING (a list of [embedding, options] pairs), "
                         f"got {type(conditioning).__name__}")
    if not conditioning:
        raise ValueError(f"{name} is an empty CONDITIONING: connect a text encoder's output")
    width = cross_attention_width(model)
    for index, (embedding, options) in enumerate(conditioning):
        entry = f" (entry {index})" if len(conditioning) > 1 else ""
        seen = set()
        found = _non_finite_part(embedding, "the prompt embedding", seen) or next(
            (found for key, value in options.items() if (found := _non_finite_part(value, f"its {key}", seen))), None)
        if found:
            raise ValueError(f"{name} contains NaN or inf values{entry}, in {found}")
        if width is not None and embedding.shape[-1] != width:
            raise ValueError(f"{name}{entry}: the prompt embedding is {embedding.shape[-1]} wide, but this model's "
                             f"cross-attention takes {width}: encode the prompt with this model's own text encoder")
        _require_reference_latents(f"{name}{entry}", model, options.get("reference_latents"))


def _require_reference_latents(name, model, references):
    """Reference latents (ReferenceLatent, TextEncodeQwenImageEdit) in the layout of the latents ``model`` reads.

    Only models that read them (Kontext, Qwen-Image-Edit, Flux 2, ...) are held to their layout:
    ComfyUI's ``extra_conds_shapes`` names ``ref_latents`` for those; others ignore them.
    """
    if references is None:
        return
    if not isinstance(references, (list, tuple)) or not all(torch.is_tensor(latent) for latent in references):
        raise ValueError(f"{name}: its reference_latents must be a list of latent tensors (from ReferenceLatent), "
                         f"got {type(references).__name__}")
    if "ref_latents" not in model.model.extra_conds_shapes(reference_latents=list(references)):
        return
    channels = model.model.latent_format.latent_channels
    for index, latent in enumerate(references):
        if latent.ndim not in (4, 5) or latent.shape[1] != channels:
            raise ValueError(f"{name}: its reference latent {index} has shape {tuple(latent.shape)}, but this model "
                             f"reads {channels}-channel image latents: encode the reference image with this model's "
                             "own VAE")


def model_conditioning(model, x, positive):
    """The diffusion model's keyword inputs for ``positive`` at latent ``x``, as BaseModel.apply_model gets them."""
    conds = comfy.samplers.encode_model_conds(model.model.extra_conds, comfy.sampler_helpers.convert_cond(positive)[:1],
                                              x, x.device, "positive")
    return {name: cond.process_cond(batch_size=x.shape[0], device=x.device).cond
            for name, cond in conds[0]["model_conds"].items()}


# The spatial factor of the VAE each of ComfyUI 0.8's image and video latent formats comes from
# (``downscale_ratio`` in comfy/sd.py). A MODEL carries no VAE, but its latent format names the family.
VAE_DOWNSCALE = {"SD15": 8, "SDXL": 8, "SDXL_Playground_2_5": 8, "SD_X4": 4, "SC_B": 4, "SD3": 8, "Flux": 8,
                 "Flux2": 16, "Mochi": 8, "LTXV": 32, "HunyuanVideo": 8, "Cosmos1CV8x8x8": 8, "Wan21": 8, "Wan22": 16,
                 "HunyuanImage21": 32, "HunyuanImage21Refiner": 16, "HunyuanVideo15": 16, "ChromaRadiance": 1}
# Formats not listed (a pack's own, say) are taken as the SD family's.
DEFAULT_VAE_DOWNSCALE = 8


def vae_downscale(model) -> int:
    """How many image pixels one latent pixel spans for ``model``'s latent format, along each side."""
    for latent_format in type(model.model.latent_format).__mro__:
        if latent_format.__name__ in VAE_DOWNSCALE:
            return VAE_DOWNSCALE[latent_format.__name__]
    return DEFAULT_VAE_DOWNSCALE


def to_image_resolution(maps, model):
    """Per-latent-pixel maps (..., h, w) at image resolution, each latent pixel a block of the VAE's factor.

    Nearest upsampling: ComfyUI's bilinear resize of a noise mask back to latent size samples
    inside each block, so such a MASK gives the same values if it is set on a latent again.
    """
    ratio = vae_downscale(model)
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


def show_node_text(node_id, text):
    """Show ``text`` on the node in the frontend; headless hosts (scripts, tests) have no server for it."""
    server = getattr(PromptServer, "instance", None)
    if server is not None and node_id is not None:
        server.send_progress_text(text, node_id)


def progress_reporter(total):
    """A ``progress(done, total)`` callback that drives ComfyUI's progress bar and honours cancel."""
    bar = comfy.utils.ProgressBar(total)

    def progress(done, new_total):
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, new_total)

    return progress


def items_per_call(model, shape, count, least_per_item=0, held=0):
    """How many of ``count`` items fit one call of ``model`` on latents of ``shape``: all unless memory is short.

    Each item is taken to cost two passes' activations at ``shape`` (a seed's cond and uncond,
    which the guider evaluates together), as ComfyUI estimates them for sampling, or
    ``least_per_item`` bytes where the caller knows it costs more. ``held`` bytes, which the
    caller allocates after this reads the free memory and keeps through the calls, are set aside.
    """
    free = comfy.model_management.get_free_memory(model.load_device) - held
    per_item = max(model.model.memory_required([2 * shape[0], *shape[1:]]), least_per_item, 1)
    return max(1, min(count, int(free // per_item)))
