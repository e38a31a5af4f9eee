"""Edge-preserving noise nodes: a NOISE for img2img and an ancestral SAMPLER that draws it at every step."""

import functools
import inspect
import logging

import comfy.k_diffusion.sampling
import comfy.sample
import comfy.samplers
import torch
from comfy_api.latest import io

from ..ngdm_core.edge_preserving import TRANSITIONS, edge_map, edge_preserving_noise, resize_to_latent, transition
from ..ngdm_core.validation import require_sigma_schedule
from .host import CATEGORY, ordered_widgets, require_pixelwise_latent, require_sampling_run, show_node_text


def _options(lambda_min, lambda_max, t_phi, transition, strength):
    """The core's keyword options, checked now on a dummy map so bad knobs fail at the node, not in the sampler."""
    options = {"lambda_min": lambda_min, "lambda_max": lambda_max, "t_phi": t_phi, "kind": transition}
    edge_preserving_noise(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), 0.5, strength, **options)
    return options


def _require_image(image):
    if image is not None and (image.ndim != 4 or 0 in image.shape):
        raise ValueError(f"image: expected an IMAGE of shape (batch, height, width, channels), got {tuple(image.shape)}")


def _edge_inputs():
    return [
        io.Float.Input("lambda_min", default=1e-4, min=1e-6, max=10.0, step=1e-5, round=1e-6,
                       tooltip="Edge sensitivity at t = 0: smaller keeps edges sharper."),
        io.Float.Input("lambda_max", default=0.1, min=1e-6, max=10.0, step=1e-3, round=1e-6,
                       tooltip="Edge sensitivity at the transition point."),
        io.Float.Input("t_phi", default=0.5, min=0.01, max=1.0, step=0.01,
                       tooltip="Transition point in the model's own diffusion time (0 clean, 1 pure noise): from "
                               "there on the noise is isotropic. A run at denoise d starts near t = d, so keep t_phi "
                               "above that for edge-preserving noise at the start."),
        io.Combo.Input("transition", options=list(TRANSITIONS), default="linear",
                       tooltip="How the edge-preserving noise turns isotropic up to t_phi."),
        io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="1: full edge preservation; 0: plain isotropic noise."),
        io.Image.Input("image", optional=True,
                       tooltip="Where the edges come from, area-resized to the latent; without it, the latent."),
    ]


class EdgeWidgets:
    """The queue-time check of the edge widgets, for both nodes that have them."""

    @classmethod
    def validate_inputs(cls, lambda_min=None, lambda_max=None):
        return ordered_widgets(cls, "lambda_min", "lambda_max", lambda_min=lambda_min, lambda_max=lambda_max)


def diffusion_time(model_sampling, sigma) -> float:
    """A sigma's place in the model's diffusion time, 0 (clean) to 1 (the schedule's end)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(1)
    time = model_sampling.timestep(sigma) / model_sampling.timestep(model_sampling.sigma_max.reshape(1))
    return min(1.0, float(time))


def edges_for(latent, image):
    """``G`` shaped like the latent with one channel, from ``image`` (B, H, W, C) if given, else from the latent."""
    source = latent if image is None else resize_to_latent(image.movedim(-1, 1).to(latent), latent.shape[-2:])
    edges = edge_map(source)[:, :1]
    # An image's map gains the frame axis of a one-frame 5-D latent.
    return edges.reshape(edges.shape[0], 1, *latent.shape[2:])


class EdgePreservingNoiseSource:
    """A NOISE: RandomNoise's noise for the same seed, scaled down on the edges at the run's start sigma."""

    def __init__(self, model, seed, time, strength, options, image):
        self.model = model
        self.seed = seed
        self.time = time
        self.strength = strength
        self.options = options
        self.image = image

    def generate_noise(self, input_latent):
        samples = input_latent["samples"]
        require_pixelwise_latent("latent", self.model, samples)
        noise = comfy.sample.prepare_noise(samples, self.seed, input_latent.get("batch_index"))
        edges = edges_for(samples, self.image)
        return edge_preserving_noise(noise, edges, self.time, self.strength, **self.options)


def isotropic_warning(time, t_phi, kind, strength):
    """Why these settings give RandomNoise's noise exactly, or None when they shape it."""
    if strength == 0:
        return "strength is 0, so this is RandomNoise's noise exactly."
    if transition(time, t_phi, kind) >= 1:
        return (f"the run starts at diffusion time {time:.2f}, at or past t_phi = {t_phi:g}, where the noise is "
                f"isotropic: this is RandomNoise's noise exactly. Raise t_phi above {time:.2f} (up to 1), or "
                "start the run later (a lower denoise), to keep the edges.")
    return None


class EdgePreservingNoise(EdgeWidgets, io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EdgePreservingNoise",
            display_name="NGDM Edit: Edge-Preserving Noise",
            category=CATEGORY,
            description="Noise for img2img (SamplerCustomAdvanced) that is weaker on the source's edges, so the "
                        "result keeps its structure: the paper's stroke-to-image use. Same noise as RandomNoise "
                        "for the same seed where the image is flat.",
            inputs=[
                io.Model.Input("model", tooltip="Maps the start sigma to diffusion time."),
                io.Sigmas.Input("sigmas", tooltip="The run's schedule; the noise is shaped for its first sigma."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The same seed as RandomNoise gives the same noise where the image is flat."),
                *_edge_inputs(),
            ],
            outputs=[io.Noise.Output(tooltip="For SamplerCustomAdvanced's noise input.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, sigmas, seed, lambda_min, lambda_max, t_phi, transition, strength,
                image=None) -> io.NodeOutput:
        require_sigma_schedule("sigmas", sigmas)
        _require_image(image)
        options = _options(lambda_min, lambda_max, t_phi, transition, strength)
        time = diffusion_time(model.get_model_object("model_sampling"), sigmas[0])
        warning = isotropic_warning(time, t_phi, transition, strength)
        if warning:
            logging.warning("EdgePreservingNoise: %s", warning)
            show_node_text(getattr(cls.hidden, "unique_id", None), warning)
        return io.NodeOutput(EdgePreservingNoiseSource(model, seed, time, strength, options, image))


def sample_edge_preserving(model, x, sigmas, extra_args=None, callback=None, disable=None, base_sampler=None,
                           strength=1.0, options=None, image=None):
    """A SAMPLER function: ``base_sampler`` with edge-preserving noise for every ancestral or SDE step."""
    extra_args = extra_args or {}
    require_sampling_run(model, sigmas)
    model_sampling = model.inner_model.inner_model.model_sampling
    edges = edges_for(model.latent_image, image)
    draw = comfy.k_diffusion.sampling.default_noise_sampler(x, seed=extra_args.get("seed"))

    def noise_sampler(sigma, sigma_next):
        # The fresh noise lands at sigma_next, so its shape follows that level's time.
        time = diffusion_time(model_sampling, sigma_next)
        return edge_preserving_noise(draw(sigma, sigma_next), edges, time, strength, **options)

    return base_sampler.sampler_function(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                                         **{**base_sampler.extra_options, "noise_sampler": noise_sampler})


class EdgePreservingSampler(EdgeWidgets, io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EdgePreservingSampler",
            display_name="NGDM Edit: Edge-Preserving Ancestral Sampler",
            category=CATEGORY,
            description="Wraps an ancestral or SDE sampler so the fresh noise of every step is edge-preserving, "
                        "with lambda(t) and tau(t) at that step: the hybrid process carries through the run and "
                        "turns isotropic after t_phi.",
            inputs=[
                io.Sampler.Input("sampler", tooltip="An ancestral or SDE sampler, e.g. euler_ancestral."),
                *_edge_inputs(),
            ],
            outputs=[io.Sampler.Output(tooltip="For SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, sampler, lambda_min, lambda_max, t_phi, transition, strength, image=None) -> io.NodeOutput:
        function = getattr(sampler, "sampler_function", None)
        if function is None or "noise_sampler" not in inspect.signature(function).parameters:
            raise ValueError("sampler: EdgePreservingSampler needs an ancestral or SDE sampler that draws fresh "
                             "noise (e.g. euler_ancestral, dpmpp_2m_sde); this one takes no noise")
        _require_image(image)
        options = _options(lambda_min, lambda_max, t_phi, transition, strength)
        function = functools.partial(sample_edge_preserving, base_sampler=sampler, strength=strength, options=options,
                                     image=image)
        return io.NodeOutput(comfy.samplers.KSAMPLER(function, inpaint_options=sampler.inpaint_options))


NODES = [EdgePreservingNoise, EdgePreservingSampler]
