"""Edit-friendly DDPM inversion node: records the noise maps and returns a SAMPLER that replays them."""

import functools

import comfy.samplers
import torch
from comfy_api.latest import io

from ..ngdm_core.edit_friendly import first_edit_step, invert_edit_friendly, require_eta, sample_edit_friendly
from ..ngdm_core.validation import require_sigma_schedule
from .host import (CATEGORY, as_sampled, parametrization, progress_reporter, require_conditioning,
                   require_pixelwise_latent, require_sampling_run)


def replay_edit_friendly(model, x, sigmas, extra_args=None, callback=None, disable=None, inversion=None):
    """A SAMPLER function: the inversion's ancestral sampler with its recorded noise maps."""
    extra_args = extra_args or {}
    require_sampling_run(model, sigmas)
    if extra_args.get("denoise_mask") is not None:
        raise ValueError("EditFriendlyInvert's sampler: the latent has a noise_mask. Wrap the sampler in "
                         "PerPixelTimeSampler to use it as Lambda, or sample a latent without a mask.")
    inversion = inversion.to(x.device)
    start = inversion.trajectory[0]
    if x.shape == start.shape and not torch.allclose(x, start, rtol=1e-3, atol=1e-3 * float(start.abs().max())):
        raise ValueError("EditFriendlyInvert's sampler must start from EditFriendlyInvert's latent with no noise "
                         "added: connect DisableNoise as the noise of SamplerCustomAdvanced.")
    # The host's copy of the start went through process_latent_out and back, which rounds; the
    # recorded one keeps the replay on the inverted trajectory bit for bit.
    x = start.clone() if x.shape == start.shape else x
    return sample_edit_friendly(model, x, sigmas, extra_args=extra_args, callback=callback, inversion=inversion)


class EditFriendlySampler(comfy.samplers.KSAMPLER):
    """The replay SAMPLER; it carries its inversion so PerPixelTimeSampler can hold pixels on the trajectory."""

    def __init__(self, inversion):
        super().__init__(functools.partial(replay_edit_friendly, inversion=inversion))
        self.inversion = inversion


def record_inversion(model, x, sigmas, extra_args=None, callback=None, disable=None, result=None, eta=1.0, skip=0.0,
                     seed=0, progress=None):
    """A SAMPLER function run through the source's guider: inverts ``model.latent_image`` and returns the edit's start."""
    model_sampling = model.inner_model.inner_model.model_sampling
    inversion = invert_edit_friendly(lambda noisy, sigma, cond: model(noisy, sigma, **extra_args), model.latent_image,
                                     sigmas, eta=eta, skip=skip, parametrization=parametrization(model_sampling),
                                     generator=torch.Generator().manual_seed(seed), progress=progress)
    result["inversion"] = inversion
    # The host scales a flow latent by (1 - sigma) when it starts sampling from it; undo that here.
    return model_sampling.inverse_noise_scaling(inversion.sigmas[0], inversion.trajectory[0])


class EditFriendlyInvert(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditFriendlyInvert",
            display_name="NGDM Edit: Edit-Friendly Inversion",
            category=CATEGORY,
            description="Edit-friendly DDPM inversion: records noise maps that reconstruct the source exactly and "
                        "carry its structure into an edit. Sample its outputs with SamplerCustomAdvanced, DisableNoise "
                        "and a CFGGuider on the target prompt (cfg around 15).",
            inputs=[
                io.Model.Input("model", tooltip="The model that inverts the source; sample the edit with the same one."),
                io.Latent.Input("latent", tooltip="The source image, VAE-encoded."),
                io.Conditioning.Input("positive", tooltip="A prompt describing the source image; for an "
                                      "instruction-edit model, the empty instruction with the same reference image."),
                io.Conditioning.Input("negative", tooltip="The negative prompt of the source prediction's CFG."),
                io.Sigmas.Input("sigmas", tooltip="The full schedule, e.g. BasicScheduler with 100 steps."),
                io.Float.Input("source_cfg", default=3.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="CFG of the source prediction the noise maps are extracted from."),
                io.Float.Input("eta", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="Noise of the ancestral sampler, in (0, 1]; 1 is DDPM."),
                io.Float.Input("skip", default=0.36, min=0.0, max=0.99, step=0.01,
                               tooltip="Fraction of the first steps skipped: larger keeps more of the source."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seeds the independent noisy copies of the source the noise maps are read from."),
            ],
            outputs=[
                io.Sampler.Output(display_name="sampler", tooltip="Replays the noise maps."),
                io.Latent.Output(display_name="latent", tooltip="The source at the first edit step."),
                io.Sigmas.Output(display_name="sigmas", tooltip="The schedule from the first edit step on."),
            ],
        )

    @classmethod
    def execute(cls, model, latent, positive, negative, sigmas, source_cfg, eta, skip, seed) -> io.NodeOutput:
        samples = latent["samples"]
        require_pixelwise_latent("latent", model, samples)
        require_conditioning("positive", model, positive)
        require_conditioning("negative", model, negative)
        require_sigma_schedule("sigmas", sigmas)
        require_eta(eta)
        steps = len(sigmas) - 1
        progress = progress_reporter(steps - first_edit_step(steps, skip))
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(source_cfg)
        result = {}
        inverter = comfy.samplers.KSAMPLER(functools.partial(record_inversion, result=result, eta=eta, skip=skip,
                                                             seed=seed, progress=progress))
        sampled = as_sampled(model, samples)
        start = guider.sample(torch.zeros_like(sampled), sampled, inverter, sigmas, disable_pbar=True, seed=seed)
        inversion = result["inversion"]
        return io.NodeOutput(EditFriendlySampler(inversion.to("cpu")),
                             {**latent, "samples": start.reshape(samples.shape)}, inversion.sigmas.cpu())


NODES = [EditFriendlyInvert]
