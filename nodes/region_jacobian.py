"""Region Jacobian nodes: find edit directions in the U-Net bottleneck confined to a mask, and apply one."""

import itertools
from dataclasses import dataclass

import comfy.ldm.modules.attention
import comfy.ldm.modules.diffusionmodules.openaimodel
import comfy.model_management
import comfy.patcher_extension
import comfy.sampler_helpers
import torch
from comfy_api.latest import io, ui

from ..ngdm_core.chunked_attention import blocked_attention, rows_per_block
from ..ngdm_core.edge_preserving import resize_to_latent
from ..ngdm_core.frozen_layers import referenced_weights
from ..ngdm_core.region_jacobian import CONFINEMENTS, GUARD_VECTORS, Linearisation, refound_direction, region_directions
from ..ngdm_core.schedule import noise_source
from .host import (CATEGORY, compute_dtype, host_weight_and_bias, items_per_call, model_conditioning,
                   ordered_widgets, parametrization, progress_reporter, require_conditioning, require_image_latent,
                   show_node_text, to_image_resolution, unet_layers)

BOTTLENECK = ("output", 0)
# The U-Net's modules that run after its bottleneck, by parameter name prefix.
AFTER_BOTTLENECK = ("output_blocks.", "out.")
# The products compute attention in blocks of query rows (ngdm_core.chunked_attention) of at most this
# many bytes of float32 scores per vector, instead of the whole score matrix (8 x 4096 x 4096 floats,
# 0.5 GiB, at a 64x64 latent) that autograd through the host's attention keeps. One block at 64x64 is
# 512 query rows of 8 heads.
SCORE_BLOCK_BYTES = 64 * 2**20
# Float32 copies of one score block that a product holds per vector: the scores and probabilities, and
# the tangent (JVP) or gradient (VJP) of the scores with the temporaries of the softmax's derivative.
SCORE_BLOCK_COPIES = 5
# The products take at most this share of the memory free once the VJP graph is built: free memory is
# read once, before a search that runs for minutes, and on a CPU it is the machine's, shared with others.
PRODUCT_SHARE_OF_FREE = 0.5
RegionDirectionsType = io.Custom("REGION_DIRECTIONS")
# ApplyRegionDirection's wrappers that re-find its direction during sampling.
REFIND_KEY = "ngdm_region_refind"


@dataclass
class BottleneckDirections:
    """REGION_DIRECTIONS: unit h-space vectors (k, C, h, w) with what they were found for.

    ``values`` are the ratios of the ``"ratio"`` confinement, else the inside singular values;
    ``leakage`` the linearised response outside the mask relative to inside. The rest is what
    re-finding a direction during sampling (ApplyRegionDirection's ``refind_iterations``) needs:
    the search's ``region`` (the mask at the latent's size, (1, 1, h, w)), ``positive``, relative
    ``ridge``, ``seed`` and vectors per U-Net pass (``max_batch``), and its iterated ``block``
    (None unless the confinement is ``"ratio"``).
    """
    vectors: torch.Tensor
    values: torch.Tensor
    leakage: torch.Tensor
    confinement: str
    sigma: float
    iterations: int
    converged: bool
    region: torch.Tensor
    positive: list
    ridge: float
    seed: int
    max_batch: int
    block: torch.Tensor | None

    def summary(self) -> str:
        """One line per direction, for the node's text: its value, its leakage, and how the search ended."""
        name = "ratio" if self.confinement == "ratio" else "singular value"
        lines = [f"{index}: {name} {value:.4g}, leakage {leak:.3f}" for index, (value, leak) in
                 enumerate(zip(self.values.tolist(), self.leakage.tolist()))]
        state = "converged" if self.converged else "NOT converged: raise iterations"
        return "\n".join([f"confinement {self.confinement}, sigma {self.sigma:.3g}: {self.iterations} iterations, "
                          f"{state}", *lines])


def require_unet(model):
    diffusion_model = model.model.diffusion_model
    if not isinstance(diffusion_model, comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel):
        raise ValueError(f"model: {type(diffusion_model).__name__} has no U-Net bottleneck. Region directions "
                         "need a U-Net model: SD1.x, SD2.x or SDXL.")
    return diffusion_model


def model_inputs(model, x, sigma, positive):
    """The U-Net's arguments for ``x`` at ``sigma`` under ``positive``, as BaseModel.apply_model builds them.

    Floating inputs are cast to the U-Net's compute dtype, as apply_model does; the timestep stays float32.
    """
    extra = model_conditioning(model, x, positive)
    model_sampling = model.get_model_object("model_sampling")
    sigma_batch = torch.full((x.shape[0],), sigma, device=x.device)
    inputs = model_sampling.calculate_input(sigma_batch, x)
    if "c_concat" in extra:
        inputs = torch.cat([inputs, extra.pop("c_concat").to(inputs)], dim=1)
    dtype = compute_dtype(model)
    extra = {name: value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value
             for name, value in extra.items()}
    return inputs.to(dtype), model_sampling.timestep(sigma_batch).float(), extra


def positive_control(positive):
    """The ControlNet chain on ``positive``'s first conditioning, or None."""
    return comfy.sampler_helpers.convert_cond(positive)[0].get("control")


def controlnet_residuals(model, x, sigma, positive, conds):
    """The residuals of the ControlNets on ``positive`` at ``x`` and ``sigma``, as the sampler computes them; or None.

    They do not depend on the bottleneck, so they are computed once and fed to every U-Net call.
    """
    control = positive_control(positive)
    if control is None:
        return None
    model_sampling = model.get_model_object("model_sampling")
    control.pre_run(model.model, lambda percent: model_sampling.percent_to_sigma(percent))
    try:
        comfy.model_management.load_models_gpu([model, *control.get_models()])
        sigma_batch = torch.full((x.shape[0],), sigma, device=x.device)
        residuals = control.get_control(x, sigma_batch, dict(conds), 1, {"sigmas": sigma_batch})
    finally:
        control.cleanup()
    if residuals is None:  # outside the ControlNet's own start and end percent
        return None
    dtype = compute_dtype(model)
    with torch.inference_mode(False):
        return {name: [None if value is None else value.to(dtype).clone() for value in values]
                for name, values in residuals.items()}


def require_bottleneck_size(diffusion_model, samples):
    """Refuse a latent too small for every downsampling to keep at least 2x2 pixels (GroupNorm needs more than one)."""
    downsamples = len(diffusion_model.channel_mult) - 1
    least = 2 ** (downsamples + 1)
    if min(samples.shape[-2:]) < least:
        raise ValueError(f"latent: {samples.shape[-2]}x{samples.shape[-1]} latent pixels is too small for this U-Net, "
                         f"which halves it {downsamples} times; it needs at least {least}x{least}")


def jacobian_weights(diffusion_model):
    """The U-Net's weights and buffers by name for the Jacobian's calls, detached.

    Those after the bottleneck must be ones autograd can save for backward, except the linear and
    conv layers' (they keep a reference, :mod:`ngdm_core.frozen_layers`): each other one that is an
    inference tensor (the norm layers') is cloned. The others are the model's own tensors.
    """
    referenced = {id(tensor) for layer in unet_layers(diffusion_model, AFTER_BOTTLENECK)
                  for tensor in layer.parameters()}

    def after_bottleneck(tensor):
        return tensor.detach().clone() if tensor.is_inference() and id(tensor) not in referenced else tensor.detach()

    return {name: after_bottleneck(tensor) if name.startswith(AFTER_BOTTLENECK) else tensor.detach()
            for name, tensor in itertools.chain(diffusion_model.named_parameters(), diffusion_model.named_buffers())}


def blocked_attention_override(host_attention, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                               skip_output_reshape=False, **kwargs):
    """An ``optimized_attention_override``: the U-Net's attention in blocks of query rows, for the Jacobian's products.

    The host's attention is written for inference: autograd through it keeps every score matrix
    whole. Blocked attention is exact in both derivatives and holds one block of scores
    (:data:`SCORE_BLOCK_BYTES`) at a time. Masked attention (which SD and SDXL U-Nets do not use) is
    left to the host.
    """
    if mask is not None:
        return host_attention(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                              skip_output_reshape=skip_output_reshape, **kwargs)
    if skip_reshape:  # (batch, heads, tokens, head width)
        batch, width = q.shape[0], q.shape[-1]
        q, k, v = (tensor.reshape(batch * heads, -1, width) for tensor in (q, k, v))
    else:  # (batch, tokens, heads x head width)
        batch, width = q.shape[0], q.shape[-1] // heads
        q, k, v = (tensor.reshape(batch, -1, heads, width).transpose(1, 2).reshape(batch * heads, -1, width)
                   for tensor in (q, k, v))
    out = blocked_attention(q, k, v, rows_per_block(batch * heads, k.shape[-2], SCORE_BLOCK_BYTES))
    out = out.reshape(batch, heads, -1, width)
    return out if skip_output_reshape else out.transpose(1, 2).reshape(batch, -1, heads * width)


def bottleneck_function(model, x, sigma, positive):
    """``(f, h)``: the U-Net's output as a function of its bottleneck, and the bottleneck at ``x``.

    Only the blocks after the bottleneck (the output blocks and the final layer) see ``h``, so
    only their layers enter the Jacobian's reverse-mode products: the linear and conv layers keep a
    reference to their weights, and the few other tensors loaded under ComfyUI's inference mode
    (the norm layers') are cloned (:func:`jacobian_weights`). Everything before the bottleneck
    (time embedding, input blocks, middle block) depends only on ``x`` and runs on the model's own
    weights with no gradient recorded. Inputs are in the U-Net's compute dtype, and the ControlNets on
    ``positive`` add their residuals. Attention runs blocked (:func:`blocked_attention_override`).
    """
    diffusion_model = require_unet(model)
    inputs, timestep, extra = model_inputs(model, x, sigma, positive)
    control = controlnet_residuals(model, x, sigma, positive, extra)
    context = extra.pop("c_crossattn", None)
    with torch.inference_mode(False):
        weights = jacobian_weights(diffusion_model)
        layers = unet_layers(diffusion_model, AFTER_BOTTLENECK)
        arguments = [tensor.clone() for tensor in (inputs, timestep)]
        keywords = {name: value.clone() if torch.is_tensor(value) else value for name, value in extra.items()}
        context = None if context is None else context.clone()

    def run(patch):
        options = {"patches": {"output_block_patch": [patch]},
                   "optimized_attention_override": blocked_attention_override}
        # The U-Net pops each residual as it adds it: every call gets its own lists.
        residuals = None if control is None else {name: list(values) for name, values in control.items()}
        with referenced_weights(layers, host_weight_and_bias):
            return torch.func.functional_call(diffusion_model, weights, tuple(arguments),
                                              {"context": context, "control": residuals,
                                               "transformer_options": options, **keywords})

    captured = {}

    def capture(h, hsp, transformer_options):
        if transformer_options.get("block") == BOTTLENECK:
            captured["h"] = h.detach()
        return h, hsp

    with torch.inference_mode(False), torch.no_grad():
        run(capture)

    def f(h):
        return run(lambda current, hsp, transformer_options:
                   (h if transformer_options.get("block") == BOTTLENECK else current, hsp))

    return f, captured["h"]


def jacobian_memory(diffusion_model, f, h):
    """``(per_vector, graph)``: bytes one vector of a Jacobian product of ``f`` at ``h`` takes, and its VJP graph's.

    The graph is what autograd saves of ``f``'s forward pass for the reverse-mode products (the
    activations that depend on ``h``), built once and kept through the whole search. A vector's
    tangents (JVP) or gradients (VJP) of those activations take at most as much again, and its
    attention :data:`SCORE_BLOCK_COPIES` blocks of scores of the largest attention. Both are found
    in one forward pass that records the attention sizes and drops each saved tensor as it comes,
    so the graph is counted without being held.
    """
    blocks, saved = [0], {}

    def record(module, args, kwargs):
        x = args[0]
        context = args[1] if len(args) > 1 else kwargs.get("context")
        keys = (x if context is None else context).shape[-2]
        rows = min(x.shape[-2], rows_per_block(module.heads, keys, SCORE_BLOCK_BYTES))
        blocks.append(module.heads * rows * keys * torch.finfo(torch.float32).bits // 8)

    def count(tensor):
        if tensor.requires_grad:  # an activation of h; weights and inputs are held anyway
            storage = tensor.untyped_storage()
            saved[storage.data_ptr()] = storage.nbytes()

    layers = [module for module in diffusion_model.modules()
              if isinstance(module, comfy.ldm.modules.attention.CrossAttention)]
    hooks = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
    try:
        with torch.inference_mode(False), torch.enable_grad(), \
                torch.autograd.graph.saved_tensors_hooks(count, lambda _: None):
            f(h.clone().requires_grad_())
    finally:
        for hook in hooks:
            hook.remove()
    graph = sum(saved.values())
    return SCORE_BLOCK_COPIES * max(blocks) + graph, graph


def latent_mask(mask, latent):
    """The MASK (B, H, W) area-averaged to the latent's size, as (1, 1, h, w)."""
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise ValueError(f"mask: expected (height, width) or (batch, height, width), got {tuple(mask.shape)}")
    return resize_to_latent(mask[:1, None].to(latent), latent.shape[-2:], "mask")


class RegionJacobianDirection(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RegionJacobianDirection",
            display_name="NGDM Edit: Region Jacobian Directions",
            category=CATEGORY,
            description="Finds unsupervised edit directions in the U-Net bottleneck (h-space) that change the masked "
                        "region and little else: by default those with the largest ratio of inside to outside "
                        "change; or the paper's, the strongest inside directions with the outside's strongest "
                        "projected out. Apply one with ApplyRegionDirection. U-Net models only (SD1.x, SD2.x, SDXL).",
            inputs=[
                io.Model.Input("model", tooltip="A U-Net model (SD1.x, SD2.x, SDXL); the directions live in its "
                                                "bottleneck."),
                io.Latent.Input("latent", tooltip="The source latent; or, with add_noise off, a noisy latent at the "
                                                  "probe time (e.g. an inversion's)."),
                io.Conditioning.Input("positive", tooltip="The prompt the U-Net runs under while the Jacobian is "
                                                          "taken, e.g. one describing the source."),
                io.Mask.Input("mask", tooltip="The region to edit; the rest should stay."),
                io.Float.Input("probe_percent", default=0.5, min=0.0, max=0.99, step=0.01,
                               tooltip="Where in the schedule the Jacobian is taken (0 is the start, at full noise)."),
                io.Int.Input("k", default=3, min=1, max=16,
                             tooltip="Number of directions k to find, strongest first."),
                io.Int.Input("r", default=1, min=0, max=16,
                             tooltip="With confinement rank1: rank r of the outside's strongest directions projected "
                                     "out (the authors use 1; 0 keeps the plain masked directions). Unused otherwise."),
                io.Int.Input("iterations", default=200, min=1, max=500,
                             tooltip="Iteration cap of each search; the node's text says whether it converged."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seeds the noise added to the latent (add_noise) and the iteration's start."),
                io.Boolean.Input("add_noise", default=True, tooltip="Noise the latent to the probe time first."),
                io.Combo.Input("confinement", options=list(CONFINEMENTS), default="ratio", optional=True,
                               tooltip="ratio: the directions with the largest ratio of change inside to change "
                                       "outside (confined by construction). rank1: the paper's, the strongest inside "
                                       "directions less the top-r outside ones. none: the strongest inside "
                                       "directions, unconfined. Optional, so workflows saved before it run as "
                                       "ratio."),
                io.Float.Input("ridge", default=2.0, min=1e-4, max=100.0, step=0.01, optional=True,
                               tooltip="With confinement ratio: the floor under a direction's outside change, in "
                                       "units of the outside's mean change per direction. Lower confines harder but "
                                       "finds weaker directions and needs more iterations. Default 2: on the shapes "
                                       "benchmark it leaks as little as 1 at 0.91x the shift and searches 2.4x faster."),
            ],
            outputs=[
                RegionDirectionsType.Output(display_name="directions",
                                            tooltip="The k directions, strongest first, for NGDM Edit: Apply Region "
                                                    "Direction."),
                io.Mask.Output(display_name="preview", tooltip="Where each direction changes the output, one per direction."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, latent, positive, mask, probe_percent, k, r, iterations, seed, add_noise,
                confinement="ratio", ridge=2.0) -> io.NodeOutput:
        diffusion_model = require_unet(model)
        samples = latent["samples"][:1]
        require_image_latent("latent", model, samples)
        require_bottleneck_size(diffusion_model, samples)
        require_conditioning("positive", model, positive)
        comfy.model_management.load_models_gpu([model])
        device = model.load_device
        model_sampling = model.get_model_object("model_sampling")
        sigma = float(model_sampling.percent_to_sigma(probe_percent))
        x = model.model.process_latent_in(samples.to(torch.float32)).to(device)
        if add_noise:
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x)
            x = noise_source(x, noise, sigma, parametrization(model_sampling))
        region = latent_mask(mask, x)
        f, h = bottleneck_function(model, x, sigma, positive)
        # The largest block of products: the ratio search's VJP of its k + guard vectors, inside and outside.
        per_vector, graph = jacobian_memory(diffusion_model, f, h)
        max_batch = items_per_call(model, x.shape, 2 * (k + GUARD_VECTORS),
                                   least_per_item=per_vector / PRODUCT_SHARE_OF_FREE, held=graph)
        # No more vectors than keep the products within the working memory ComfyUI plans for a sampling
        # step on this latent: the search then needs little more memory than sampling it does.
        step = model.model.memory_required([2 * x.shape[0], *x.shape[1:]])
        max_batch = max(1, min(max_batch, int(step // per_vector)))
        # The core reports the total over all its searches with every update.
        found = region_directions(f, h, region, k=k, confinement=confinement, r=r, ridge=ridge, max_iter=iterations,
                                  seed=seed, progress=progress_reporter(iterations), max_batch=max_batch)
        block = found.search.block.float().cpu() if confinement == "ratio" else None
        directions = BottleneckDirections(found.vectors.float().cpu(), found.values.float().cpu(),
                                          found.leakage.float().cpu(), confinement, sigma, found.iterations,
                                          found.converged, region.float().cpu(), positive, ridge, seed, max_batch,
                                          block)
        show_node_text(getattr(cls.hidden, "unique_id", None), directions.summary())
        preview = to_image_resolution(cls.preview(f, h, found.vectors), model).cpu()
        return io.NodeOutput(directions, preview, ui=ui.PreviewMask(preview, cls=cls))

    @staticmethod
    def preview(f, h, vectors):
        """Per direction, how much a small step along it changes the output, normalised to a maximum of 1."""
        with torch.inference_mode(False), torch.no_grad():
            base = f(h)
            step = 0.01 * h.norm()
            changes = torch.stack([(f(h + step * v.to(h)) - base).abs().sum(dim=1)[0] for v in vectors])
        return (changes / changes.flatten(1).amax(dim=1).clamp(min=1e-12)[:, None, None]).float()


class ApplyRegionDirection(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ApplyRegionDirection",
            display_name="NGDM Edit: Apply Region Direction",
            category=CATEGORY,
            description="Shifts the U-Net bottleneck by strength times one found direction, on every model call "
                        "(cond and uncond) between start_percent and end_percent; with refind_iterations, the "
                        "direction is re-found at each step's latent.",
            inputs=[
                io.Model.Input("model", tooltip="The U-Net model the directions were found with; a patched copy is "
                                                "returned."),
                RegionDirectionsType.Input("directions", tooltip="From NGDM Edit: Region Jacobian Directions."),
                io.Int.Input("index", default=0, min=0, max=15, tooltip="Which direction (0 is the strongest)."),
                io.Float.Input("strength", default=10.0, min=-10000.0, max=10000.0, step=0.1,
                               tooltip="Signed step along the unit direction, in h-space units."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where in the schedule the shift starts: 0 is the first step, at full noise."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Where in the schedule the shift ends: 1 is the last step. Not below "
                                       "start_percent."),
                io.Int.Input("refind_iterations", default=0, min=0, max=20, optional=True,
                             tooltip="0 applies the found direction at every step. Above 0, every step after the "
                                     "first in the shift's range re-finds it at that step's latent: this many "
                                     "iterations of the ratio search (same mask, ridge and index), warm-started "
                                     "from the previous step's, its sign kept. On the shapes benchmark 3 "
                                     "iterations leak 0.155 against 0.182 (less on 18 of 20 sources) at 1.37x "
                                     "against 1.68x the unconfined shift, for about 0.88x the finding search's "
                                     "Jacobian products extra per 10-step edit. Needs confinement ratio and a "
                                     "latent batch of 1. Optional, so saved workflows run as 0."),
            ],
            outputs=[io.Model.Output(tooltip="The model with its bottleneck shifted, for any sampler.")],
        )

    @classmethod
    def validate_inputs(cls, start_percent=None, end_percent=None):
        # The other way round, the shift would never apply.
        return ordered_widgets(cls, "start_percent", "end_percent", start_percent=start_percent,
                               end_percent=end_percent)

    @classmethod
    def execute(cls, model, directions, index, strength, start_percent, end_percent,
                refind_iterations=0) -> io.NodeOutput:
        require_unet(model)
        if index >= len(directions.vectors):
            raise ValueError(f"index {index}: only {len(directions.vectors)} directions were found")
        if refind_iterations and directions.confinement != "ratio":
            raise ValueError(f"refind_iterations: re-finding runs the ratio search, but these directions were found "
                             f"with confinement {directions.confinement}; use ratio, or refind_iterations 0")
        if refind_iterations and positive_control(directions.positive) is not None:
            # Re-finding would run the ControlNet's pre_run and cleanup in the middle of the sampler's own use of it.
            raise ValueError("refind_iterations: re-finding during sampling does not support a ControlNet on the "
                             "positive the directions were found with; set refind_iterations to 0")
        if start_percent > end_percent:
            raise ValueError(f"start_percent ({start_percent}) must not exceed end_percent ({end_percent})")
        model_sampling = model.get_model_object("model_sampling")
        sigma_high = float(model_sampling.percent_to_sigma(start_percent))
        sigma_low = float(model_sampling.percent_to_sigma(end_percent))
        current = {"direction": directions.vectors[index]}

        def shift(h, hsp, transformer_options):
            if transformer_options.get("block") != BOTTLENECK:
                return h, hsp
            require_bottleneck_shape(directions, h)
            sigma = float(transformer_options["sigmas"].max())
            if sigma_low <= sigma <= sigma_high:
                h = h + strength * current["direction"].to(h)
            return h, hsp

        patched = model.clone()
        patched.set_model_output_block_patch(shift)
        if refind_iterations:
            restart, refind = refinding_wrappers(current, patched, directions, index, refind_iterations, sigma_low,
                                                 sigma_high)
            patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, REFIND_KEY, restart)
            patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, REFIND_KEY, refind)
        return io.NodeOutput(patched)


def require_bottleneck_shape(directions, h):
    if h.shape[1:] != directions.vectors.shape[1:]:
        raise ValueError(f"directions: found for a bottleneck of shape {tuple(directions.vectors.shape[1:])}, but "
                         f"this model and latent give {tuple(h.shape[1:])}")


def refinding_wrappers(current, model, directions, index, iterations, sigma_low, sigma_high):
    """``(restart, refind)``: OUTER_SAMPLE and APPLY_MODEL wrappers that keep ``current["direction"]`` re-found.

    ``restart`` begins each sampling run from the found direction and its search's block. ``refind``
    leaves the first model call in ``[sigma_low, sigma_high]`` the found direction and re-finds it at
    the first call of each later sigma, at that call's latent
    (:func:`ngdm_core.region_jacobian.refound_direction`): the calls of one step (cond and uncond,
    batched or not) share its direction. Closures, not an object's methods: ComfyUI deep-copies a
    clone's model options, and every copy must share this one state. ``model`` re-finds until a
    sampling run names its own.
    """
    def start(sampling_model):
        current.update(direction=directions.vectors[index], block=directions.block, sigma=None, model=sampling_model)

    def restart(executor, *args, **kwargs):
        # The guider that samples: its model patcher may be a later clone of this node's (a LoRA's, say).
        start(executor.class_obj.model_patcher)
        return executor(*args, **kwargs)

    def refind(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        sigma = float(t.max())
        if sigma_low <= sigma <= sigma_high and sigma != current["sigma"]:
            conditionings = len(transformer_options.get("cond_or_uncond", [None]))
            if x.shape[0] != conditionings:
                raise ValueError(f"refind_iterations: re-finding follows one image, but the latent holds "
                                 f"{x.shape[0] // conditionings}; sample a batch of 1, or set refind_iterations to 0")
            if current["sigma"] is not None:
                refind_at(x, sigma)
            current["sigma"] = sigma
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def refind_at(x, sigma):
        comfy.model_management.throw_exception_if_processing_interrupted()
        f, h = bottleneck_function(current["model"], x[:1], sigma, directions.positive)
        require_bottleneck_shape(directions, h)
        direction, found = refound_direction(
            Linearisation(f, h, directions.max_batch), directions.region.to(h.device), current["direction"],
            current["block"].to(h.device), index, directions.ridge, iterations, directions.seed,
            progress=lambda done, total: comfy.model_management.throw_exception_if_processing_interrupted())
        current.update(direction=direction, block=found.block)

    start(model)
    return restart, refind


NODES = [RegionJacobianDirection, ApplyRegionDirection]
