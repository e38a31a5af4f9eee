"""Rectifier nodes: train a hypernetwork that modulates a frozen U-Net toward the source (or toward an edit), load it,
apply it."""

import copy
import logging
import os
import time

import comfy.ldm.modules.diffusionmodules.openaimodel
import comfy.model_management
import comfy.model_sampling
import comfy.patcher_extension
import folder_paths
import torch
from comfy_api.latest import io, ui
from torch import nn

from ..ngdm_core.frozen_layers import frozen_forward
from ..ngdm_core.rectifier import (Rectifier, conv_targets, read_rectifier, rectified, require_finite_rectifier,
                                   require_fits, save_rectifier, train_edit_rectifier, train_rectifier)
from ..ngdm_core.schedule import per_item
from .host import (CATEGORY, compute_dtype, host_weight_and_bias, model_conditioning, progress_reporter,
                   require_conditioning, require_image_latent, show_node_text, unet_layers)
from .previews import loss_curve
from .rectifier_embeddings import LatentImageEmbedding, image_embedding_width, require_one_space, text_embedding
from .region_jacobian import require_bottleneck_size

FOLDER = "rectifiers"
# Names relative to ComfyUI's BaseModel, whose U-Net is its ``diffusion_model``: the same module
# tree holds them during training (the adapter below) and sampling (the patched model).
TARGET_BLOCKS = ("diffusion_model.middle_block", "diffusion_model.output_blocks")
# The U-Net's modules from the first rectified block on, by parameter name prefix: the gradient runs through these.
GRADIENT_PATH = ("middle_block.", "output_blocks.", "out.")
WRAPPER_KEY = "ngdm_rectifier"
LOSS_REPORTS = 20
RectifierType = io.Custom("RECTIFIER")


def register_rectifier_folder():
    """``models/rectifiers`` for ``.safetensors`` files, kept alongside any path extra_model_paths.yaml gave."""
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))
    paths, extensions = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(extensions) | {".safetensors"})


register_rectifier_folder()


PREDICTIONS = (comfy.model_sampling.EPS, comfy.model_sampling.V_PREDICTION)
NO_RECTIFIERS = "(no rectifiers yet: train one with Train Rectifier)"
MODES = ("reconstruct", "edit")


def require_discrete_unet(model):
    """The rectifier's maths is DDPM's: a U-Net with integer timesteps into a discrete schedule, predicting noise or v."""
    model_sampling = model.get_model_object("model_sampling")
    sampling = type(model_sampling)
    diffusion_model = model.model.diffusion_model
    supported = (isinstance(diffusion_model, comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel)
                 and isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscrete)
                 and sampling.timestep is comfy.model_sampling.ModelSamplingDiscrete.timestep
                 and sampling.calculate_input is comfy.model_sampling.EPS.calculate_input
                 and any(sampling.calculate_denoised is kind.calculate_denoised for kind in PREDICTIONS))
    if not supported:
        kind = " + ".join(base.__name__ for base in sampling.__bases__)
        raise ValueError(f"model: the rectifier supports U-Net models that predict noise (EPS) or v on a discrete "
                         f"schedule: SD1.x, SD2.x (base and 768-v) and SDXL. This model is "
                         f"{type(diffusion_model).__name__} with {kind} sampling (flow, EDM and X0 models are not "
                         "supported).")
    channels = model.model.latent_format.latent_channels
    if diffusion_model.in_channels != channels:
        raise ValueError(f"model: its U-Net takes {diffusion_model.in_channels} input channels for a "
                         f"{channels}-channel latent (an inpainting model); the rectifier needs a plain one")
    return model_sampling


def denoised_estimate(model_sampling, x_t, output, sigma):
    """The U-Net's x0 estimate at the VP state ``x_t`` (``calculate_input``'s output), by ComfyUI's own conversion
    of whatever it predicts, noise or v: ``P_t`` for both."""
    return model_sampling.calculate_denoised(sigma, output, x_t * per_item((1 + sigma**2).sqrt(), x_t))


def noise_from_output(model_sampling):
    """``to_eps(x_t, output, t)``: the U-Net's output at integer timesteps ``t`` as noise, whatever it predicts."""
    def to_eps(x_t, output, t):
        sigma = model_sampling.sigma(t.float()).to(x_t)
        x_sigma = x_t * per_item((1 + sigma**2).sqrt(), x_t)
        return (x_sigma - denoised_estimate(model_sampling, x_t, output, sigma)) / per_item(sigma, x_t)

    return to_eps


class EpsUNet(nn.Module):
    """A ComfyUI U-Net as the core's ``model(x_t, t) -> eps``.

    ``x_t`` is the VP-noised latent in the model's processed space (``process_latent_in``), which
    is what ComfyUI's ``calculate_input`` hands the U-Net (``x_sigma / sqrt(1 + sigma^2)``), and
    ``t`` the integer timestep that ``model_sampling.timestep`` gives for ``sigmas[t]``. ``to_eps``
    turns the U-Net's output (noise or v) into noise. One prompt's conditioning (batch 1) is
    broadcast to every call.
    """

    def __init__(self, diffusion_model, conditioning, dtype, to_eps):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.conditioning = conditioning
        self.compute_dtype = dtype
        self.to_eps = to_eps

    def forward(self, x_t, t):
        batch = x_t.shape[0]
        extra = {name: value.expand(batch, *value.shape[1:]) for name, value in self.conditioning.items()}
        context = extra.pop("c_crossattn", None)
        output = self.diffusion_model(x_t.to(self.compute_dtype), t.float(), context=context, **extra)
        return self.to_eps(x_t, output.float(), t)


def trainable_unet(model, x0, conditioning):
    """An :class:`EpsUNet` under ``conditioning`` on a copy of the U-Net, with its schedule's ``alpha_bar``.

    ComfyUI creates weights under inference mode, and those cannot be saved for backward. The
    gradient runs only through the rectified blocks and what follows them (``GRADIENT_PATH``). There
    the rectified convs and every other linear and conv layer keep a reference to their weights
    instead of saving them (:mod:`ngdm_core.frozen_layers`), so the copy holds new tensors only for
    the path's norm layers; every weight is the model's own (views, frozen).
    """
    base_model = model.model
    dtype = compute_dtype(model)
    model_sampling = model.get_model_object("model_sampling")
    conditioning = model_conditioning(model, x0[:1], conditioning)
    source = base_model.diffusion_model
    referenced = {id(tensor) for layer in unet_layers(source, GRADIENT_PATH) for tensor in layer.parameters()}
    with torch.inference_mode(False):
        shared = {id(tensor): nn.Parameter(tensor.detach(), requires_grad=False)
                  for name, tensor in source.named_parameters()
                  if not name.startswith(GRADIENT_PATH) or id(tensor) in referenced}
        diffusion_model = copy.deepcopy(source, shared)
        conditioning = {name: value.clone().to(dtype) for name, value in conditioning.items() if torch.is_tensor(value)}
    # The copy is private, so its layers' forward is replaced for good; the rectified convs are left
    # to rectified(), which shadows theirs while it runs.
    targets = {id(diffusion_model.get_submodule(name.removeprefix("diffusion_model.")))
               for name in conv_targets(base_model, TARGET_BLOCKS)}
    for layer in unet_layers(diffusion_model, GRADIENT_PATH):
        if id(layer) not in targets:
            layer.forward = frozen_forward(layer, host_weight_and_bias)
    sigmas = model_sampling.sigmas.to(x0.device, torch.float32)
    return EpsUNet(diffusion_model, conditioning, dtype, noise_from_output(model_sampling)), 1 / (1 + sigmas**2)


def duration(seconds):
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def loss_reporter(total, node_id, clock=time.perf_counter):
    """``progress(done, total, loss)`` for training: the progress bar, cancel, and as the node's text the loss and,
    from the first step on, how long the run has left."""
    progress = progress_reporter(total)
    every = max(1, total // LOSS_REPORTS)
    started = clock()

    def report(done, new_total, loss):
        progress(done, new_total)
        if done == 1 or done % every == 0 or done == new_total:
            elapsed = clock() - started
            if done == new_total:
                timing = f"took {duration(elapsed)}"
            else:
                timing = f"about {duration(elapsed / done * (new_total - done))} left at {elapsed / done:.2f} s a step"
            text = f"step {done}/{new_total}: loss {loss:.4f}, {timing}"
            logging.info("RectifierTrain %s", text)
            show_node_text(node_id, text)

    return report


def edit_inputs(model, positive, target, clip, clip_vision, vae):
    """The edit's text direction ``E_T(target) - E_T(positive)``, after checking every input it needs."""
    missing = [name for name, value in (("target", target), ("clip", clip), ("clip_vision", clip_vision),
                                        ("vae", vae)) if value is None]
    if missing:
        raise ValueError(f"mode edit needs {', '.join(missing)} connected: the target prompt's conditioning, the "
                         "checkpoint's CLIP, a CLIP vision model and the VAE")
    require_conditioning("target", model, target)
    channels = model.model.latent_format.latent_channels
    if vae.latent_channels != channels:
        raise ValueError(f"vae makes {vae.latent_channels}-channel latents but the model's have {channels}: use the "
                         "model's own VAE")
    direction = text_embedding(clip, target, "target") - text_embedding(clip, positive, "positive")
    require_one_space(image_embedding_width(clip_vision), direction.shape[0])
    return direction


def starting_rectifier(unet, channels, seed, initial_rectifier, model):
    """A fresh rectifier from ``seed``, or a trainable copy of ``initial_rectifier``."""
    if initial_rectifier is not None:
        require_fits(initial_rectifier, model.model)
        require_finite_rectifier(initial_rectifier, "initial_rectifier")
    with torch.inference_mode(False), torch.random.fork_rng(devices=[]):
        if initial_rectifier is not None:
            # A loaded rectifier was made under inference mode; its copy made outside it can learn.
            return copy.deepcopy(initial_rectifier)
        torch.manual_seed(seed)
        return Rectifier.for_model(unet, conv_targets(unet, TARGET_BLOCKS), channels)


class RectifierTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RectifierTrain",
            display_name="NGDM Edit: Train Rectifier",
            category=CATEGORY,
            description="Trains a rectifier for this model on a batch of source latents: a small hypernetwork that "
                        "modulates the convs of the U-Net's middle and output blocks. Mode reconstruct fits the "
                        "model's noise predictions so they reconstruct the sources faithfully; mode edit trains an "
                        "edit toward the target prompt the paper's way (a CLIP directional loss plus L1 to the "
                        "source, each step from the source's own noised state). The base model stays frozen. Saves "
                        "to models/rectifiers and shows the loss curve. U-Nets predicting noise or v (SD1.x, SD2.x, "
                        "SDXL).",
            inputs=[
                io.Model.Input("model", tooltip="A U-Net model predicting noise or v (SD1.x, SD2.x, SDXL); it stays "
                                                "frozen."),
                io.Latent.Input("latent", tooltip="The source images, VAE-encoded, as one batch (e.g. via "
                                                  "RepeatLatentBatch or LatentBatch)."),
                io.Conditioning.Input("positive", tooltip="The prompt the model runs under while training: one "
                                                          "describing the sources, or an empty prompt."),
                io.Int.Input("steps", default=500, min=1, max=100000, tooltip="AdamW steps."),
                io.Float.Input("learning_rate", default=1e-3, min=1e-6, max=1.0, step=1e-4, round=1e-6,
                               tooltip="AdamW's learning rate for the rectifier's weights."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seeds the rectifier's initial weights, and the training's timesteps, noise "
                                     "and batches."),
                io.String.Input("filename_prefix", default="rectifier",
                                tooltip="Saved as models/rectifiers/<prefix>_00001_.safetensors (a subfolder may be "
                                        "part of the prefix)."),
                io.Int.Input("batch_size", default=4, min=1, max=256,
                             tooltip="Sources per step, drawn with replacement from the latent batch."),
                io.Combo.Input("mode", options=list(MODES), default="reconstruct", optional=True,
                               tooltip="reconstruct: fit the sources (the noise-fitting loss) under positive. edit: "
                                       "the model runs under target, and the rectifier learns to move its clean-image "
                                       "estimate along the CLIP text change from positive to target while keeping "
                                       "it near the source. Edit mode needs target, clip, clip_vision and vae."),
                io.Conditioning.Input("target", optional=True,
                                      tooltip="Edit mode: the target prompt, encoded with clip. positive is then the "
                                              "prompt describing the sources."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Edit mode: a CLIP holding the text encoder that encoded positive and "
                                      "target; its text projection takes their pooled outputs into CLIP's joint "
                                      "image/text space. SD1.x checkpoints lack that projection: for them, load CLIP "
                                      "ViT-L/14's full text encoder with Load CLIP."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Edit mode: the CLIP vision model of the same CLIP (ViT-L/14 for SD1.x, "
                                            "ViT-H for SD2.x, ViT-bigG for SDXL); its image embeds judge the edit."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Edit mode: the model's VAE. Every step decodes the estimate to an image, with "
                                     "gradients, for the CLIP vision model: the most expensive part of a step."),
                io.Float.Input("direction_weight", default=1.0, min=0.0, max=100.0, step=0.1, optional=True,
                               tooltip="Edit mode: the weight of the directional CLIP loss (the paper uses 1; larger "
                                       "changes more)."),
                io.Float.Input("l1_weight", default=1.0, min=0.0, max=100.0, step=0.1, optional=True,
                               tooltip="Edit mode: the weight of the L1 distance to the source (the paper uses 1; "
                                       "larger keeps more of the source)."),
                RectifierType.Input("initial_rectifier", optional=True,
                                    tooltip="Continue from this rectifier instead of a fresh one; the paper trains "
                                            "an edit on top of a reconstruction-trained rectifier."),
            ],
            outputs=[RectifierType.Output(display_name="rectifier",
                                          tooltip="The trained rectifier, also saved to models/rectifiers; for "
                                                  "NGDM Edit: Apply Rectifier."),
                     io.Image.Output(display_name="loss_curve",
                                     tooltip="The training loss per step with its running mean, as shown on the node.")],
            # The inputs after batch_size are optional, so prompts and workflows saved before them still run.
            hidden=[io.Hidden.unique_id],
            # An output node runs when queued even if nothing consumes the rectifier, and its file is saved once.
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, latent, positive, steps, learning_rate, seed, filename_prefix, batch_size,
                mode="reconstruct", target=None, clip=None, clip_vision=None, vae=None, direction_weight=1.0,
                l1_weight=1.0, initial_rectifier=None) -> io.NodeOutput:
        require_discrete_unet(model)
        samples = latent["samples"]
        require_image_latent("latent", model, samples)
        require_bottleneck_size(model.model.diffusion_model, samples)
        require_conditioning("positive", model, positive)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        edit = mode == "edit"
        direction = edit_inputs(model, positive, target, clip, clip_vision, vae) if edit else None
        comfy.model_management.load_models_gpu([model])
        x0 = model.model.process_latent_in(samples.to(torch.float32)).to(model.load_device)
        unet, alpha_bar = trainable_unet(model, x0, target if edit else positive)
        rectifier = starting_rectifier(unet, x0.shape[1], seed, initial_rectifier, model).to(x0.device)
        progress = loss_reporter(steps, getattr(cls.hidden, "unique_id", None))
        if edit:
            history = train_edit_rectifier(unet, rectifier, x0, LatentImageEmbedding(model, vae, clip_vision, x0.device),
                                           direction.to(x0.device), steps, lr=learning_rate, alpha_bar=alpha_bar,
                                           batch_size=batch_size, direction_weight=direction_weight,
                                           l1_weight=l1_weight, seed=seed, progress=progress,
                                           weight_and_bias=host_weight_and_bias)
        else:
            history = train_rectifier(unet, rectifier, x0, steps, lr=learning_rate, alpha_bar=alpha_bar,
                                      batch_size=batch_size, seed=seed, progress=progress,
                                      weight_and_bias=host_weight_and_bias)
        rectifier = rectifier.cpu().eval()
        folder, filename, counter, _, _ = folder_paths.get_save_image_path(filename_prefix,
                                                                           folder_paths.get_folder_paths(FOLDER)[0])
        path = os.path.join(folder, f"{filename}_{counter:05}_.safetensors")
        save_rectifier(rectifier, path)
        rectifier.origin = path
        logging.info("RectifierTrain (%s): loss %.4f -> %.4f over %d steps, saved %s", mode, history[0], history[-1],
                     len(history), path)
        curve = loss_curve(history)
        return io.NodeOutput(rectifier, curve, ui=ui.PreviewImage(curve, cls=cls))


class RectifierLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RectifierLoader",
            display_name="NGDM Edit: Load Rectifier",
            category=CATEGORY,
            description="Loads a rectifier saved by Train Rectifier from models/rectifiers.",
            inputs=[io.Combo.Input("rectifier_name", options=folder_paths.get_filename_list(FOLDER) or [NO_RECTIFIERS],
                                   tooltip="A file in models/rectifiers, saved by NGDM Edit: Train Rectifier.")],
            outputs=[RectifierType.Output(display_name="rectifier",
                                          tooltip="For NGDM Edit: Apply Rectifier, with the model it was trained "
                                                  "for.")],
        )

    @classmethod
    def execute(cls, rectifier_name) -> io.NodeOutput:
        if rectifier_name == NO_RECTIFIERS:
            raise ValueError("rectifier_name: models/rectifiers holds no rectifier yet; train one with Train "
                             "Rectifier first")
        return io.NodeOutput(read_rectifier(folder_paths.get_full_path_or_raise(FOLDER, rectifier_name)))


def batched_source(source, x, transformer_options):
    """The source per row of the U-Net's batch: ComfyUI stacks one latent batch per cond (cond, uncond, ...)."""
    chunks = max(1, len(transformer_options.get("cond_or_uncond", ())))
    latent_batch = x.shape[0] // chunks
    if source.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"latent: the source is {tuple(source.shape[-2:])} latent pixels but the model is sampling "
                         f"{tuple(x.shape[-2:])}; encode the source at the size being sampled")
    if source.shape[0] == 1:
        return source.expand(x.shape[0], -1, -1, -1)
    if source.shape[0] != latent_batch:
        raise ValueError(f"latent: a batch of {source.shape[0]} sources, but the sampled batch is {latent_batch}; "
                         "give one source for all, or one per sampled latent")
    return source.repeat(chunks, 1, 1, 1)


def rectifier_wrapper(base_model, model_sampling, rectifier, source):
    """A DIFFUSION_MODEL wrapper: a plain U-Net pass for ``P_t``, then the pass with the rectifier's offsets.

    The modulated convs take their weights through ComfyUI's cast path, as the plain pass does.
    """
    copies = {}

    def on_device(device):
        if device not in copies:
            copies[device] = copy.deepcopy(rectifier).to(device=device, dtype=torch.float32)
        return copies[device]

    def rectify(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        # ControlNet residuals are popped from their lists as the U-Net uses them; each pass needs them all.
        plain_control = None if control is None else {name: list(values) for name, values in control.items()}
        output = executor(x, timesteps, context, y, plain_control, transformer_options, **kwargs)
        sigma = model_sampling.sigma(timesteps).float()
        estimate = denoised_estimate(model_sampling, x.float(), output.float(), sigma)
        sources = batched_source(source, x, transformer_options).to(x.device, torch.float32)
        factors = on_device(x.device)(sources, estimate, timesteps.float())
        with rectified(base_model, factors, host_weight_and_bias):
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)

    return rectify


class RectifierApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RectifierApply",
            display_name="NGDM Edit: Apply Rectifier",
            category=CATEGORY,
            description="Returns a copy of the model that, at every step, predicts the clean image with one plain "
                        "pass and then predicts again with the U-Net's convs modulated by the rectifier, looking at "
                        "the source. Use it to reconstruct or edit the source (SDEdit, edit-friendly inversion). "
                        "Each step costs about two model calls.",
            inputs=[
                io.Model.Input("model", tooltip="The model the rectifier was trained for; a patched copy is returned."),
                RectifierType.Input("rectifier", tooltip="Trained for this model's architecture."),
                io.Latent.Input("latent", tooltip="The source, VAE-encoded: one image for the whole batch, or one "
                                                  "per sampled latent."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the rectifier applied, for any sampler; each step costs "
                                             "about two model calls.")],
        )

    @classmethod
    def execute(cls, model, rectifier, latent) -> io.NodeOutput:
        model_sampling = require_discrete_unet(model)
        samples = latent["samples"]
        require_image_latent("latent", model, samples)
        require_fits(rectifier, model.model)
        require_finite_rectifier(rectifier)
        source = model.model.process_latent_in(samples.to(torch.float32))
        patched = model.clone()
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY,
                                     rectifier_wrapper(model.model, model_sampling, rectifier, source))
        return io.NodeOutput(patched)


NODES = [RectifierTrain, RectifierLoader, RectifierApply]
