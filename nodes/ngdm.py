"""NGDM nodes: the weight map, the per-pixel start-time SAMPLER, and the same as a MODEL patch."""

import functools

import comfy.patcher_extension
import comfy.samplers
import torch
from comfy_api.latest import io, ui

from ..ngdm_core.change_map import change_weight_map
from ..ngdm_core.ngdm import (MAPPINGS, START_RULES, WEIGHT_MAP_MODES, noised_source_reference, per_pixel_time_denoiser,
                              started, weight_map)
from ..ngdm_core.validation import require_unit_interval
from .host import (CATEGORY, as_sampled, edit_sigmas, guided_denoiser, host_start_sigmas, parametrization,
                   progress_reporter, require_conditioning, require_pixelwise_latent, require_sampling_run,
                   items_per_call, to_image_resolution)

MASK_FUNCTION_KEY = "ngdm_per_pixel_time_mask"
# The map from the change a cheap edit makes; a mode of the node only, since it needs a schedule.
CHANGE_MODE = "change"
# Model options through which a patch changes how cond and uncond combine: with any of them the
# guided difference is no longer cfg times the conditional one.
CFG_CHANGING_OPTIONS = ("sampler_cfg_function", "sampler_post_cfg_function", "sampler_pre_cfg_function",
                        "sampler_calc_cond_batch_function", "disable_cfg1_optimization")
MAPPING_TOOLTIP = ("ngdm (default): each pixel starts at sigma_k = sqrt((1 + sigma_T^2)^lambda - 1), the paper's power law; "
                   "weight-0 pixels never start, on every scheduler. linear: DifferentialDiffusion's threshold on the "
                   "normalised timestep; it starts partial weights later, keeping more around a soft map's edit, but on "
                   "schedulers whose last step is at timestep 0 (normal, karras) it re-denoises weight-0 pixels there. "
                   "On the shapes benchmark: linear kept 4 to 17 dB more outside the edit with 'simple' and on soft maps, "
                   "ngdm 20 to 21 dB more with 'normal' on the default change map, at the same success.")
START_RULE_TOOLTIP = ("Where a pixel whose start time falls between two steps begins. first_at_or_below: at the first "
                      "step with sigma <= its start, so no pixel gets more noise than its weight asks (as "
                      "DifferentialDiffusion). last_at_or_above: one step earlier, at the smallest step sigma >= its "
                      "start, as the paper's Algorithm 1 is written. They agree where a start is a step.")


class NGDMWeightMap(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NGDMWeightMap",
            display_name="NGDM Edit: Weight Map (soft mask)",
            category=CATEGORY,
            description="Finds where the source and target prompts disagree about the image (DiffEdit-style) "
                        "and turns it into the soft per-pixel weight map Lambda that NGDM samples with.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model that compares the two prompts' predictions; "
                                                "EPS, V-prediction and flow models all work."),
                io.Latent.Input("latent", tooltip="The source image, VAE-encoded."),
                io.Conditioning.Input("source_conditioning", tooltip="A prompt describing the source image. For an "
                                      "instruction-edit model (Qwen-Image-Edit, FLUX.1 Kontext): the empty "
                                      "instruction, with the same reference image."),
                io.Conditioning.Input("target_conditioning", tooltip="A prompt describing the edit you want; for an "
                                      "instruction-edit model, the instruction."),
                io.Conditioning.Input("negative", tooltip="The negative prompt both predictions are guided against."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seeds the num_maps noises the source is noised with."),
                io.Int.Input("num_maps", default=10, min=1, max=64,
                             tooltip="Noise seeds averaged into the map; all go through one batched model call per prompt."),
                io.Float.Input("encode_strength", default=0.7, min=0.01, max=1.0, step=0.01,
                               tooltip="How far along the schedule the source is noised before comparing the prompts "
                                       "(ngdm and diffedit modes; 0.5 is the paper's), or where the cheap edit starts "
                                       "(change mode)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale of both predictions, against negative. Under "
                                       "plain CFG it only scales the difference, which the map normalises away, so "
                                       "the node evaluates the two conditional predictions alone (half the model "
                                       "calls, the same map); a model with a CFG patch is guided in full. In change "
                                       "mode, the guidance of the cheap edit."),
                io.Float.Input("smoothing", default=1.0, min=0.0, max=16.0, step=0.1,
                               tooltip="Gaussian blur of the difference map (ngdm mode) or of the cheap edit's change (change "
                                       "mode), in latent pixels; diffedit mode does not use it."),
                io.Float.Input("a", default=10.0, min=0.01, max=100.0, step=0.1,
                               tooltip="Sigmoid gain a in Lambda = sigmoid(a*A - b), A the normalised difference map. "
                                       "Larger a edits more (ngdm mode only)."),
                io.Float.Input("b", default=5.0, min=-100.0, max=100.0, step=0.1,
                               tooltip="Sigmoid offset b in Lambda = sigmoid(a*A - b): larger b keeps more of the source "
                                       "(ngdm mode only)."),
                io.Combo.Input("mode", options=[*WEIGHT_MAP_MODES, CHANGE_MODE], default=CHANGE_MODE,
                               tooltip="ngdm: the soft map. diffedit: DiffEdit's binary mask, for comparison. change "
                                       "(not in the paper): a short edit-friendly edit under the target first, then "
                                       "Lambda = 1 where it changed the source (smoothed, thresholded, holes filled), "
                                       "0 elsewhere, or graded by the size of the change (change_softness); costs "
                                       "2 x change_steps guided model calls per edit (change_edits)."),
                io.Boolean.Input("zero_floor", default=False, optional=True,
                                 tooltip="ngdm mode: rescale the sigmoid so the least-changed pixels get exactly 0 "
                                         "and stay the source (a departure from the paper, whose Lambda never "
                                         "drops below sigmoid(-b), so it re-noises the background a little)."),
                io.Int.Input("change_steps", default=5, min=1, max=200, optional=True,
                             tooltip="change mode: steps of the cheap edit, from encode_strength down to 0."),
                io.Float.Input("change_threshold", default=0.2, min=0.0, max=0.99, step=0.01, optional=True,
                               tooltip="change mode: a pixel is in the map where the (smoothed) change reaches this "
                                       "fraction of the item's largest change."),
                io.Int.Input("change_edits", default=2, min=1, max=16, optional=True,
                             tooltip="change mode: cheap edits whose changes are averaged, each with its own noises, "
                                     "run as one batch (costs change_edits x 2 x change_steps guided model calls). "
                                     "Averaging keeps what every edit changes and drops what one edit's noise moved."),
                io.Float.Input("change_softness", default=0.2, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="change mode: 0 gives a binary map. Above 0, Lambda is graded by the size of the "
                                       "change, (change - change_threshold) / change_softness clamped to [0, 1], so "
                                       "NGDM starts the most-changed pixels first and the barely-changed ones late."),
            ],
            outputs=[
                io.Mask.Output(display_name="weight_map", tooltip="Lambda at image resolution, for previews and mask nodes."),
                io.Latent.Output(display_name="latent", tooltip="The source latent with Lambda as its noise_mask."),
            ],
        )

    @classmethod
    def execute(cls, model, latent, source_conditioning, target_conditioning, negative, seed, num_maps,
                encode_strength, cfg, smoothing, a, b, mode, zero_floor=False, change_steps=5,
                change_threshold=0.2, change_edits=2, change_softness=0.2) -> io.NodeOutput:
        samples = latent["samples"]
        require_pixelwise_latent("latent", model, samples)
        for name, conditioning in (("source_conditioning", source_conditioning),
                                   ("target_conditioning", target_conditioning), ("negative", negative)):
            require_conditioning(name, model, conditioning)
        model_sampling = model.get_model_object("model_sampling")
        kind = parametrization(model_sampling)
        sigma = float(model_sampling.percent_to_sigma(1.0 - encode_strength))
        sampled = as_sampled(model, samples)
        source = model.model.process_latent_in(sampled.to(torch.float32)).to(model.load_device)
        # Lambda keeps the sampled latent's shape, (B, 1, h, w) or (B, 1, 1, h, w): ComfyUI resizes a
        # 4-D noise_mask of a 5-D latent as one batch of frames.
        if mode == CHANGE_MODE:
            weights = change_weight_map(guided_denoiser(model, negative, cfg, seed), source, source_conditioning,
                                        target_conditioning, edit_sigmas(model_sampling, change_steps, encode_strength),
                                        smoothing, change_threshold, kind, torch.Generator().manual_seed(seed),
                                        progress_reporter(2 * change_steps), edits=change_edits,
                                        softness=change_softness).cpu()
        else:
            max_batch = items_per_call(model, sampled.shape, num_maps)
            map_cfg = 1.0 if cfg != 0 and not any(key in model.model_options for key in CFG_CHANGING_OPTIONS) else cfg
            weights = weight_map(guided_denoiser(model, negative, map_cfg, seed), source, source_conditioning,
                                 target_conditioning, sigma, num_maps=num_maps, seed=seed, mode=mode,
                                 smoothing=smoothing, a=a, b=b, parametrization=kind, max_batch=max_batch,
                                 progress=progress_reporter(2 * -(-num_maps // max_batch)), zero_floor=zero_floor).cpu()
        mask = to_image_resolution(weights.reshape(weights.shape[0], *weights.shape[-2:]), model)
        return io.NodeOutput(mask, {**latent, "noise_mask": weights}, ui=ui.PreviewMask(mask, cls=cls))


class _HeldPixelsModel:
    """The host's model as a base sampler sees it, with pixels held until their start sigma.

    Samplers read attributes such as ``inner_model`` off the model they are given, so every
    attribute is the host's; only the call goes through NGDM's replacement.
    """

    def __init__(self, host_model, denoise):
        self._host_model = host_model
        self._denoise = denoise

    def __getattr__(self, name):
        return getattr(self._host_model, name)

    def __call__(self, x, sigma, **extra_args):
        return self._denoise(x, sigma, **extra_args)


def _require_weights(weights, node):
    if weights is None:
        raise ValueError(f"{node}: the latent has no noise_mask (Lambda). Connect NGDMWeightMap's latent output, "
                         "or set a mask on the latent with SetLatentNoiseMask.")
    require_unit_interval(f"{node}: the latent's noise_mask", weights)


def sample_per_pixel_time(model, x, sigmas, extra_args=None, callback=None, disable=None, base_sampler=None,
                          mapping="ngdm", start_rule="first_at_or_below"):
    """A SAMPLER function: Algorithm 1 around ``base_sampler``, with Lambda from the latent's noise_mask."""
    extra_args = extra_args or {}
    require_sampling_run(model, sigmas)
    owner = mask_function_owner(extra_args.get("model_options", {}))
    if owner:
        raise ValueError(f"model: {owner} gives it a denoise_mask_function, which PerPixelTimeSampler would skip, "
                         f"since it sets each pixel's start itself. Remove {owner}{_linear_hint(owner)}.")
    weights = extra_args.get("denoise_mask")
    _require_weights(weights, "PerPixelTimeSampler")
    model_sampling = model.inner_model.inner_model.model_sampling
    start = host_start_sigmas(model_sampling, weights, sigmas, mapping, start_rule)
    # Over an edit-friendly inversion, held pixels follow the inverted trajectory instead.
    inversion = getattr(base_sampler, "inversion", None)
    if inversion is not None:
        reference = inversion.to(x.device).reference
    else:
        reference = noised_source_reference(model.latent_image, model.noise, parametrization(model_sampling))
    denoise = per_pixel_time_denoiser(model, reference, sigmas, start)
    # The replacement is done here, so the host's own soft-mask blending is switched off.
    return base_sampler.sampler_function(_HeldPixelsModel(model, denoise), x, sigmas,
                                         extra_args={**extra_args, "denoise_mask": None}, callback=callback,
                                         disable=disable, **base_sampler.extra_options)


# Samplers whose state cannot be reset: dpm_fast and dpm_adaptive choose their own steps and
# stop at sigma_min, and UniPC calls the model on a rescaled copy of its state.
UNSUPPORTED_SAMPLER_FUNCTIONS = {"dpm_fast_function": "dpm_fast", "dpm_adaptive_function": "dpm_adaptive",
                                 "sample_unipc": "uni_pc", "sample_unipc_bh2": "uni_pc_bh2"}


def _require_supported_sampler(sampler):
    if not isinstance(sampler, comfy.samplers.KSAMPLER):
        raise ValueError(f"sampler: PerPixelTimeSampler wraps k-diffusion samplers (KSamplerSelect and the "
                         f"Sampler* nodes), got {type(sampler).__name__}")
    name = UNSUPPORTED_SAMPLER_FUNCTIONS.get(getattr(sampler.sampler_function, "__name__", ""))
    if name:
        raise ValueError(f"sampler: {name} cannot keep pixels on the noised source (it picks its own steps or "
                         "rescales its state); use a step-by-step sampler such as euler, dpmpp_2m or euler_ancestral")


class PerPixelTimeSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PerPixelTimeSampler",
            display_name="NGDM Edit: Per-Pixel Time Sampler",
            category=CATEGORY,
            description="Wraps a sampler so each latent pixel starts denoising at its own time, from the latent's "
                        "noise_mask (Lambda). Pixels that have not started stay on the noised source with the one "
                        "fixed noise, for deterministic and ancestral samplers alike. Use with SamplerCustomAdvanced.",
            inputs=[
                io.Sampler.Input("sampler", tooltip="The base sampler, e.g. from KSamplerSelect."),
                io.Combo.Input("mapping", options=list(MAPPINGS), default="ngdm", tooltip=MAPPING_TOOLTIP),
                # Optional, so API prompts saved before the widget existed still run.
                io.Combo.Input("start_rule", options=list(START_RULES), default=START_RULES[0], optional=True,
                               tooltip=START_RULE_TOOLTIP),
            ],
            outputs=[io.Sampler.Output(tooltip="For SamplerCustomAdvanced, with a latent whose noise_mask is Lambda "
                                               "(NGDM Edit: Weight Map's latent output).")],
        )

    @classmethod
    def execute(cls, sampler, mapping, start_rule=START_RULES[0]) -> io.NodeOutput:
        _require_supported_sampler(sampler)
        function = functools.partial(sample_per_pixel_time, base_sampler=sampler, mapping=mapping,
                                     start_rule=start_rule)
        return io.NodeOutput(comfy.samplers.KSAMPLER(function, inpaint_options=sampler.inpaint_options))


def mask_function_owner(model_options):
    """The node that set ``model_options``' denoise_mask_function, as a user would name it; None if none is set."""
    function = model_options.get("denoise_mask_function")
    if function is None:
        return None
    if getattr(function, "func", None) is started_mask:
        return "PerPixelTimeModel"
    if getattr(function, "__qualname__", "").startswith("DifferentialDiffusion."):
        return "DifferentialDiffusion"
    return "another node"


def _linear_hint(owner):
    return " (the mapping 'linear' here is its rule)" if owner == "DifferentialDiffusion" else ""


def keep_mask_function(function):
    """An OUTER_SAMPLE wrapper that refuses to sample if a later patch replaced ``function``.

    ComfyUI keeps one denoise_mask_function per model, and DifferentialDiffusion (or any later
    patch) would overwrite PerPixelTimeModel's silently. Wrappers survive its clone, so this
    one sees the replacement when sampling starts. A clone by any later node (a LoRA loader,
    a counter) keeps the function, but ComfyUI 0.8's clone deep-copies ``model_options``, so
    the function is recognised by what it is, not by identity.
    """
    def check(executor, *args, **kwargs):
        model_options = executor.class_obj.model_options
        current = model_options.get("denoise_mask_function")
        if getattr(current, "func", None) is not function.func or current.keywords != function.keywords:
            owner = mask_function_owner(model_options) or "another node"
            raise ValueError(f"model: {owner} replaced PerPixelTimeModel's denoise_mask_function after it, and only "
                             f"one can turn the noise_mask into per-step masks: remove {owner}{_linear_hint(owner)} "
                             "or PerPixelTimeModel.")
        return executor(*args, **kwargs)

    return check


def started_mask(sigma, denoise_mask, extra_options, mapping="ngdm", start_rule="first_at_or_below"):
    """A ``denoise_mask_function``: this step's binary mask, 1 where a pixel has started."""
    _require_weights(denoise_mask, "PerPixelTimeModel")
    model_sampling = extra_options["model"].inner_model.model_sampling
    start = host_start_sigmas(model_sampling, denoise_mask, extra_options["sigmas"], mapping, start_rule)
    return started(sigma, start).to(denoise_mask.dtype)


class PerPixelTimeModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PerPixelTimeModel",
            display_name="NGDM Edit: Per-Pixel Time Model Patch",
            category=CATEGORY,
            description="The per-pixel start times as a model patch, like Differential Diffusion, for plain KSampler "
                        "graphs. With deterministic samplers, pixels that have not started stay exactly on the noised "
                        "source; ancestral/SDE samplers keep them a valid noisy source with fresh noise. "
                        "PerPixelTimeSampler keeps the one noise for every sampler.",
            inputs=[
                io.Model.Input("model", tooltip="The model to patch; a patched copy is returned."),
                io.Combo.Input("mapping", options=list(MAPPINGS), default="ngdm", tooltip=MAPPING_TOOLTIP),
                # Optional, so API prompts saved before the widget existed still run.
                io.Combo.Input("start_rule", options=list(START_RULES), default=START_RULES[0], optional=True,
                               tooltip=START_RULE_TOOLTIP),
            ],
            outputs=[io.Model.Output(tooltip="For KSampler or any sampler node, with a latent whose noise_mask is "
                                             "Lambda (NGDM Edit: Weight Map's latent output).")],
        )

    @classmethod
    def execute(cls, model, mapping, start_rule=START_RULES[0]) -> io.NodeOutput:
        owner = mask_function_owner(model.model_options)
        if owner:
            # The two rules would give each pixel two start times; there is no one composition of them.
            raise ValueError(f"model: {owner} already gives it a denoise_mask_function, and only one can turn the "
                             f"noise_mask into per-step masks: remove {owner}{_linear_hint(owner)} or this node.")
        model = model.clone()
        function = functools.partial(started_mask, mapping=mapping, start_rule=start_rule)
        model.set_model_denoise_mask_function(function)
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, MASK_FUNCTION_KEY,
                                   keep_mask_function(function))
        return io.NodeOutput(model)


NODES = [NGDMWeightMap, PerPixelTimeSampler, PerPixelTimeModel]
