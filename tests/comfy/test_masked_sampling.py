"""The pack's masked-sampling baseline (``ngdm_core.masked``) against ComfyUI's own SetLatentNoiseMask + KSampler.

The quality benchmark scores masked sampling as ComfyUI users run it; this is where the core's
version is shown to be that, on the real host's nodes and samplers.
"""

import pytest
import torch

# Both runs make the same model calls on the same inputs in the same order. What may round
# differently: the guided denoiser's round trip through process_latent_out/in (one rounding of
# each prediction) and Euler's last step, which k-diffusion writes as x + d * (0 - sigma) and the
# pack's sampler as the prediction itself. A few float32 ulps of latents of size ~5 (SD1.5's
# scale factor divides them by 0.18215) is ~1e-6; 1e-5 leaves room for that through six steps.
TOLERANCE = 1e-5


def ksampler_with_noise_mask(host, model, samples, mask, steps, cfg, seed, denoise):
    import nodes
    (latent,) = nodes.NODE_CLASS_MAPPINGS["SetLatentNoiseMask"]().set_mask({"samples": samples}, mask[:, 0])
    (out,) = nodes.NODE_CLASS_MAPPINGS["KSampler"]().sample(model, seed, steps, cfg, "euler", "simple",
                                                            host.tiny_conditioning("target"),
                                                            host.tiny_conditioning("negative"), latent, denoise)
    return out["samples"]


def core_masked_sampling(host, model, samples, mask, steps, cfg, seed, denoise, max_denoise):
    import comfy.sample
    masked, pack_host = host.pack_module("ngdm_core.masked"), host.pack_module("nodes.host")
    model_sampling = model.get_model_object("model_sampling")
    denoiser = pack_host.guided_denoiser(model, host.tiny_conditioning("negative"), cfg, seed)
    out = masked.sample_masked(denoiser, model.model.process_latent_in(samples), mask,
                               pack_host.edit_sigmas(model_sampling, steps, denoise),
                               comfy.sample.prepare_noise(samples, seed), host.tiny_conditioning("target"),
                               parametrization=pack_host.parametrization(model_sampling), max_denoise=max_denoise)
    return model.model.process_latent_out(out)


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("denoise", [1.0, 0.6])
@pytest.mark.parametrize("binary", [False, True])
def test_core_masked_sampling_is_set_latent_noise_mask_and_ksampler(host, kind, denoise, binary):
    generator = torch.Generator().manual_seed(7)
    samples = torch.randn(1, 4, host.LATENT_SIZE, host.LATENT_SIZE, generator=generator)
    mask = torch.rand(1, 1, host.LATENT_SIZE, host.LATENT_SIZE, generator=generator)
    mask = (mask > 0.5).float() if binary else mask
    model = host.tiny_model(kind)
    settings = dict(steps=6, cfg=2.0, seed=3, denoise=denoise)
    reference = ksampler_with_noise_mask(host, model, samples, mask, **settings)
    ours = core_masked_sampling(host, model, samples, mask, **settings, max_denoise=denoise == 1.0)
    assert (ours - reference).abs().max().item() <= TOLERANCE
    # A mask-0 pixel ends on the source, in both.
    kept = (mask == 0).expand_as(samples)
    assert torch.allclose(reference[kept], samples[kept], atol=TOLERANCE)
    # The tolerance sees ComfyUI's start rule: at denoise 1 a VP model's start noise is scaled by
    # sqrt(1 + sigma^2), not sigma, and leaving that out moves the edit well past it.
    if kind == "eps" and denoise == 1.0:
        plain_start = core_masked_sampling(host, model, samples, mask, **settings, max_denoise=False)
        assert (plain_start - reference).abs().max().item() > 10 * TOLERANCE
