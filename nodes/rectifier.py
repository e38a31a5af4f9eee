"""Rectifier nodes: train a hypernetwork that modulates a frozen U-Net toward the source, load it, apply it."""

import copy
import logging
import os

import comfy.ldm.modules.diffusionmodules.openaimodel
import comfy.model_management
import comfy.model_sampling
import comfy.patcher_extension
import folder_paths
import torch
from comfy_api.latest import io, ui
from torch import nn

from ..ngdm_core.rectifier import (Rectifier, conv_targets, predicted_x0_at, read_rectifier, rectified, require_fits,
                                   save_rectifier, train_rectifier)
from .host import (CATEGORY, model_conditioning, progress_reporter, require_conditioning, require_image_latent,
                   show_node_text)
from .previews import loss_curve

FOLDER = "rectifiers"
# Names relative to ComfyUI's BaseModel, whose U-Net is its ``diffusion_model``: the same module
# tree holds them during training (the adapter below) and sampling (the patched model).
TARGET_BLOCKS = ("diffusion_model.middle_block", "diffusion_model.output_blocks")
WRAPPER_KEY = "ngdm_rectifier"
LOSS_REPORTS = 20
RectifierType = io.Custom("RECTIFIER")


def register_rectifier_folder():
    """``models/rectifiers`` for ``.safetensors`` files, kept alongside any path extra_model_paths.yaml gave."""
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))
    paths, extensions = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(extensions) | {".safetensors"})


register_rectifier_folder()


def require_eps_unet(model):
    """The rectifier's maths is DDPM's: a U-Net predicting noise, with integer timesteps into a discrete schedule."""
    model_sampling = model.get_model_object("model_sampling")
    sampling = type(model_sampling)
    diffusion_model = model.model.diffusion_model
    supported = (isinstance(diffusion_model, comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel)
                 and isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscrete)
                 and sampling.timestep is comfy.model_sampling.ModelSamplingDiscrete.timestep
                 and sampling.calculate_input is comfy.model_sampling.EPS.calculate_input
                 and sampling.calculate_denoised is comfy.model_sampling.EPS.calculate_denoised)
    if not supported:
        kind = " + ".join(base.__name__ for base in sampling.__bases__)
        raise ValueError(f"model: the rectifier supports U-Net models that predict noise (EPS) on a discrete "
                         f"schedule: SD1.x, SD2.x base and SDXL. This model is {type(diffusion_model).__name__} "
                         f"with {kind} sampling (V-prediction, flow, EDM and X0 models are not supported).")
    channels = model.model.latent_format.latent_channels
    if diffusion_model.in_channels != channels:
        raise ValueError(f"model: its U-Net takes {diffusion_model.in_channels} input channels for a "
                         f"{channels}-channel latent (an inpainting model); the rectifier needs a plain one")
    return model_sampling


def compute_dtype(base_model):
    return base_model.manual_cast_dtype or base_model.get_dtype()


class EpsUNet(nn.Module):
    """A ComfyUI U-Net as the core's ``model(x_t, t) -> eps``.

    ``x_t`` is the VP-noised latent in the model's processed space (``process_latent_in``), which
    is what ComfyUI's EPS ``calculate_input`` hands the U-Net (``x_sigma / sqrt(1 + sigma^2)``), and
    ``t`` the integer timestep that ``model_sampling.timestep`` gives for ``sigmas[t]``. One prompt's
    conditioning (batch 1) is broadcast to every call.
    """

    def __init__(self, diffusion_model, conditioning, dtype):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.conditioning = conditioning
        self.compute_dtype = dtype

    def forward(self, x_t, t):
        batch = x_t.shape[0]
        extra = {name: value.expand(batch, *value.shape[1:]) for name, value in self.conditioning.items()}
        context = extra.pop("c_crossattn", None)
        eps = self.diffusion_model(x_t.to(self.compute_dtype), t.float(), context=context, **extra)
        return eps.float()


def trainable_unet(model, x0, positive):
    """An :class:`EpsUNet` on a copy of the U-Net's weights, with its schedule's ``alpha_bar``.

    ComfyUI creates weights under inference mode, and those cannot be saved for backward, which
    the modulated convs' gradients need. The copy doubles the U-Net's memory while training runs.
    """
    base_model = model.model
    dtype = compute_dtype(base_model)
    conditioning = model_conditioning(model, x0[:1], positive)
    with torch.inference_mode(False):
        diffusion_model = copy.deepcopy(base_model.diffusion_model)
        conditioning = {name: value.clone().to(dtype) for name, value in conditioning.items() if torch.is_tensor(value)}
    sigmas = model.get_model_object("model_sampling").sigmas.to(x0.device, torch.float32)
    return EpsUNet(diffusion_model, conditioning, dtype), 1 / (1 + sigmas**2)


def loss_reporter(total, node_id):
    """``progress(done, total, loss)`` for training: the progress bar, cancel, and the loss as the node's text."""
    progress = progress_reporter(total)
    every = max(1, total // LOSS_REPORTS)

    def report(done, new_total, loss):
        progress(done, new_total)
        if done % every == 0 or done == new_total:
            text = f"step {done}/{new_total}: loss {loss:.4f}"
            logging.info("RectifierTrain %s", text)
            show_node_text(node_id, text)

    return report


class RectifierTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RectifierTrain",
            display_name="NGDM Edit: Train Rectifier",
            category=CATEGORY,
            description="Trains a rectifier for this model on a batch of source latents: a small hypernetwork that "
                        "modulates the convs of the U-Net's middle and output blocks so its noise predictions "
                        "reconstruct the sources faithfully. The base model stays frozen. Saves to "
                        "models/rectifiers. EPS U-Net models only (SD1.x, SD2.x base, SDXL).",
            inputs=[
                io.Model.Input("model", tooltip="An EPS U-Net model (SD1.x, SD2.x base, SDXL); it stays frozen."),
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
            ],
            outputs=[RectifierType.Output(display_name="rectifier",
                                          tooltip="The trained rectifier, also saved to models/rectifiers; for "
                                                  "NGDM Edit: Apply Rectifier.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, latent, positive, steps, learning_rate, seed, filename_prefix,
                batch_size) -> io.NodeOutput:
        require_eps_unet(model)
        samples = latent["samples"]
        require_image_latent("latent", model, samples)
        require_conditioning("positive", model, positive)
        comfy.model_management.load_models_gpu([model])
        x0 = model.model.process_latent_in(samples.to(torch.float32)).to(model.load_device)
        unet, alpha_bar = trainable_unet(model, x0, positive)
        targets = conv_targets(unet, TARGET_BLOCKS)
        with torch.inference_mode(False), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            rectifier = Rectifier.for_model(unet, targets, x0.shape[1]).to(x0.device)
        history = train_rectifier(unet, rectifier, x0, steps, lr=learning_rate, alpha_bar=alpha_bar,
                                  batch_size=batch_size, seed=seed,
                                  progress=loss_reporter(steps, getattr(cls.hidden, "unique_id", None)))
        rectifier = rectifier.cpu().eval()
        folder, filename, counter, _, _ = folder_paths.get_save_image_path(filename_prefix,
                                                                           folder_paths.get_folder_paths(FOLDER)[0])
        path = os.path.join(folder, f"{filename}_{counter:05}_.safetensors")
        save_rectifier(rectifier, path)
        logging.info("RectifierTrain: loss %.4f -> %.4f over %d steps, saved %s", history[0], history[-1], steps, path)
        return io.NodeOutput(rectifier, ui=ui.PreviewImage(loss_curve(history), cls=cls))


class RectifierLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RectifierLoader",
            display_name="NGDM Edit: Load Rectifier",
            category=CATEGORY,
            description="Loads a rectifier saved by Train Rectifier from models/rectifiers.",
            inputs=[io.Combo.Input("rectifier_name", options=folder_paths.get_filename_list(FOLDER),
                                   tooltip="A file in models/rectifiers, saved by NGDM Edit: Train Rectifier.")],
            outputs=[RectifierType.Output(display_name="rectifier",
                                          tooltip="For NGDM Edit: Apply Rectifier, with the model it was trained "
                                                  "for.")],
        )

    @classmethod
    def execute(cls, rectifier_name) -> io.NodeOutput:
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


def rectifier_wrapper(base_model, rectifier, source):
    """A DIFFUSION_MODEL wrapper: a plain U-Net pass for ``P_t``, then the pass with the rectifier's offsets."""
    copies = {}

    def on_device(device):
        if device not in copies:
            copies[device] = copy.deepcopy(rectifier).to(device=device, dtype=torch.float32)
        return copies[device]

    def rectify(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        # ControlNet residuals are popped from their lists as the U-Net uses them; each pass needs them all.
        plain_control = None if control is None else {name: list(values) for name, values in control.items()}
        eps = executor(x, timesteps, context, y, plain_control, transformer_options, **kwargs)
        sigma = base_model.model_sampling.sigma(timesteps)
        estimate = predicted_x0_at(x.float(), eps.float(), 1 / (1 + sigma.float()**2))
        sources = batched_source(source, x, transformer_options).to(x.device, torch.float32)
        factors = on_device(x.device)(sources, estimate, timesteps.float())
        with rectified(base_model, factors):
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
        require_eps_unet(model)
        samples = latent["samples"]
        require_image_latent("latent", model, samples)
        require_fits(rectifier, model.model)
        source = model.model.process_latent_in(samples.to(torch.float32))
        patched = model.clone()
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY,
                                     rectifier_wrapper(model.model, rectifier, source))
        return io.NodeOutput(patched)


NODES = [RectifierTrain, RectifierLoader, RectifierApply]
