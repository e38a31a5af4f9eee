"""NGDM, the inversion and edge-preserving noise on today's families: tiny Flux, Flux 2 and Qwen-Image models.

Qwen-Image samples one-frame 5-D latents (B, 16, 1, h, w) from Wan 2.1's VAE; Flux samples
16-channel 4-D latents; Flux 2's VAE downscales 16x where the others do 8x.
"""

import pytest
import torch

STEPS = 6
FAMILIES = ["flux", "qwen_image"]


def weight_map(host, model, samples, mode="diffedit", text=None):
    text = text or host.dit_conditioning
    return host.node("NGDMWeightMap", model=model, latent={"samples": samples}, source_conditioning=text("source"),
                     target_conditioning=text("target"), negative=text("negative"), seed=0, num_maps=2,
                     encode_strength=0.5, cfg=2.0, smoothing=1.0, a=10.0, b=5.0, mode=mode)


def sample(host, model, sampler, latent, sigmas, noise=None, cfg=2.0, positive="target"):
    """SamplerCustomAdvanced as the node runs it: the latent dict, its noise_mask, and ComfyUI's own shape fix."""
    import comfy.sample
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = torch.randn(samples.shape, generator=torch.Generator().manual_seed(1)) if noise is None else noise
    return comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, host.dit_conditioning(positive),
                                      host.dit_conditioning("negative"), samples,
                                      noise_mask=latent.get("noise_mask"), disable_pbar=True, seed=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_weight_map_has_the_latents_shape(host, family):
    model = host.tiny_dit(family)
    samples = host.tiny_latent(model, batch=2)
    mask, latent = weight_map(host, model, samples, mode="ngdm")
    # One channel in the latent's own shape, so ComfyUI resizes it per image, not across the batch.
    assert latent["noise_mask"].shape == (2, 1, *samples.shape[2:])
    assert mask.shape == (2, 8 * host.LATENT_SIZE, 8 * host.LATENT_SIZE)
    assert torch.equal(latent["samples"], samples)
    assert 0 < latent["noise_mask"].min() and latent["noise_mask"].max() < 1


@pytest.mark.parametrize("family", FAMILIES)
def test_ngdm_keeps_the_source_exactly_where_lambda_is_zero(host, family):
    import comfy.samplers
    model = host.tiny_dit(family)
    samples = host.tiny_latent(model)
    weights = host.half_lambda(samples)
    (sampler,) = host.node("PerPixelTimeSampler", sampler=comfy.samplers.sampler_object("euler"), mapping="ngdm")
    output = sample(host, model, sampler, {"samples": samples, "noise_mask": weights}, host.schedule(model))
    assert output.shape == samples.shape
    kept = (weights == 0).expand_as(samples)
    assert (output - samples)[kept].abs().max().item() <= 1e-5
    assert (output - samples)[~kept].abs().mean().item() > 1e-2


def test_a_4d_latent_on_qwen_image_keeps_its_shape(host):
    """EmptySD3LatentImage and other 4-D latents: ComfyUI gives them a frame axis to sample; the nodes do too."""
    model = host.tiny_dit("qwen_image")
    samples = host.tiny_latent(model)[:, :, 0]
    _, latent = weight_map(host, model, samples, mode="ngdm")
    assert latent["samples"].shape == samples.shape and latent["noise_mask"].shape == (1, 1, 1, 8, 8)
    replay, inverted, sigmas = invert(host, model, samples)
    assert inverted["samples"].shape == samples.shape
    reconstruction = sample(host, model, replay, inverted, sigmas, noise=torch.zeros(1, 16, 1, 8, 8),
                            positive="source")
    assert (reconstruction - samples.unsqueeze(2)).abs().max().item() <= 1e-4


def invert(host, model, samples, steps=STEPS, skip=0.3):
    return host.node("EditFriendlyInvert", model=model, latent={"samples": samples}, positive=host.dit_conditioning("source"),
                     negative=host.dit_conditioning("negative"), sigmas=host.schedule(model, steps), source_cfg=2.0, eta=1.0,
                     skip=skip, seed=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_inversion_reconstructs_the_source_and_keeps_its_shape(host, family):
    model = host.tiny_dit(family)
    samples = host.tiny_latent(model)
    replay, latent, sigmas = invert(host, model, samples)
    assert latent["samples"].shape == samples.shape
    zeros = torch.zeros(samples.shape)
    reconstruction = sample(host, model, replay, latent, sigmas, noise=zeros, positive="source")
    assert (reconstruction - samples).abs().max().item() <= 1e-4
    edit = sample(host, model, replay, latent, sigmas, noise=zeros, positive="target")
    # The tiny Qwen-Image model's text stream moves it least: 2.4e-3 on average.
    assert (edit - samples).abs().mean().item() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_ngdm_over_the_inversion_keeps_the_source_exactly_where_lambda_is_zero(host, family):
    model = host.tiny_dit(family)
    samples = host.tiny_latent(model)
    replay, latent, sigmas = invert(host, model, samples)
    (sampler,) = host.node("PerPixelTimeSampler", sampler=replay, mapping="ngdm")
    weights = host.half_lambda(samples)
    output = sample(host, model, sampler, {**latent, "noise_mask": weights}, sigmas, noise=torch.zeros(samples.shape))
    kept = (weights == 0).expand_as(samples)
    assert (output - samples)[kept].abs().max().item() <= 1e-4
    assert (output - samples)[~kept].abs().mean().item() > 1e-3


def comfyui_vae(family):
    """The VAE ComfyUI's loader builds for ``family``'s VAE checkpoint, on the meta device (no weights).

    ``comfy.sd.VAE`` recognises a checkpoint by its keys and their shapes; these are the ones it
    reads for SD1.x's VAE, Flux's (16 channels), Flux 2's (32 channels and a batch-norm on the
    patchified latent) and Wan 2.1's, which Qwen-Image uses.
    """
    import comfy.sd

    def meta(*shape):
        return torch.empty(*shape, device="meta")

    four_levels = {"encoder.down.2.downsample.conv.weight": meta(512, 512, 3, 3)}
    keys = {
        "sd15": {"decoder.conv_in.weight": meta(512, 4, 3, 3), **four_levels},
        "flux": {"decoder.conv_in.weight": meta(512, 16, 3, 3), **four_levels},
        "flux2": {"decoder.conv_in.weight": meta(512, 32, 3, 3), "bn.running_mean": meta(128), **four_levels},
        "qwen_image": {"decoder.middle.0.residual.0.gamma": meta(384, 1, 1, 1), "decoder.head.0.gamma": meta(96, 1, 1, 1),
                       "decoder.head.2.weight": meta(3, 96, 3, 3, 3), "encoder.conv1.weight": meta(96, 3, 3, 3, 3)},
    }[family]
    with torch.device("meta"):
        return comfy.sd.VAE(sd=keys)


@pytest.mark.parametrize("family", ["sd15", "flux", "qwen_image", "flux2"])
def test_masks_come_at_the_resolution_of_the_vae_comfyui_builds(host, family):
    if family == "sd15":
        model, text = host.tiny_model("eps"), host.tiny_conditioning
    else:
        model, text = host.tiny_dit(family), host.dit_conditioning
    vae = comfyui_vae(family)
    # The family's own VAE: it encodes the latent channels the model samples.
    assert vae.latent_channels == model.model.latent_format.latent_channels
    factor = vae.spacial_compression_encode()
    mask, latent = weight_map(host, model, host.tiny_latent(model), mode="ngdm", text=text)
    assert mask.shape == (1, factor * host.LATENT_SIZE, factor * host.LATENT_SIZE)
    # Each latent pixel is a block of the VAE's factor, so setting the MASK on the latent gives Lambda back.
    assert torch.equal(mask[:, ::factor, ::factor], latent["noise_mask"].reshape(mask[:, ::factor, ::factor].shape))


def test_edge_preserving_noise_keeps_a_5d_latents_shape_and_random_noise_where_flat(host):
    import nodes
    model = host.tiny_dit("qwen_image")
    samples = torch.zeros(1, 16, 1, 8, 8)
    samples[..., 4:] = 1.0
    latent = {"samples": samples}
    (random_noise,) = nodes.NODE_CLASS_MAPPINGS["RandomNoise"].execute(noise_seed=3).result
    reference = random_noise.generate_noise(latent)
    knobs = dict(lambda_min=1e-4, lambda_max=0.1, t_phi=1.0, transition="linear", strength=1.0)
    image = torch.zeros(1, 64, 64, 3)
    image[:, :, 32:] = 1.0
    for source in (None, image):
        (noise,) = host.node("EdgePreservingNoise", model=model, sigmas=host.schedule(model)[2:], seed=3, image=source, **knobs)
        shaped = noise.generate_noise(latent)
        assert shaped.shape == samples.shape
        assert torch.equal(shaped[..., :2], reference[..., :2])
        assert (shaped[..., 3:5].abs() < reference[..., 3:5].abs()).all()


def test_the_edge_preserving_sampler_runs_on_a_5d_latent(host):
    import comfy.samplers
    model = host.tiny_dit("qwen_image")
    samples = host.tiny_latent(model)
    base = comfy.samplers.sampler_object("euler_ancestral")
    knobs = dict(lambda_min=1e-4, lambda_max=0.1, t_phi=1.0, transition="linear")
    (unchanged,) = host.node("EdgePreservingSampler", sampler=base, strength=0.0, **knobs)
    (shaped,) = host.node("EdgePreservingSampler", sampler=base, strength=1.0, **knobs)
    sigmas = host.schedule(model)
    plain = sample(host, model, unchanged, {"samples": samples}, sigmas)
    edged = sample(host, model, shaped, {"samples": samples}, sigmas)
    assert edged.shape == samples.shape and torch.isfinite(edged).all()
    assert torch.equal(plain, sample(host, model, base, {"samples": samples}, sigmas))
    assert not torch.equal(edged, plain)


@pytest.mark.parametrize("node_id", ["NGDMWeightMap", "EditFriendlyInvert", "EdgePreservingNoise"])
def test_video_latents_are_refused(host, node_id):
    model = host.tiny_dit("qwen_image")
    video = torch.randn(1, 16, 3, 8, 8)
    with pytest.raises(ValueError, match=r"latent is a video latent of 3 frames"):
        if node_id == "NGDMWeightMap":
            weight_map(host, model, video)
        elif node_id == "EditFriendlyInvert":
            invert(host, model, video)
        else:
            (noise,) = host.node("EdgePreservingNoise", model=model, sigmas=host.schedule(model), seed=0, lambda_min=1e-4,
                                 lambda_max=0.1, t_phi=1.0, transition="linear", strength=1.0)
            noise.generate_noise({"samples": video})


def test_u_net_only_nodes_refuse_5d_latents_clearly(host):
    model = host.tiny_model("eps")
    latent = {"samples": torch.randn(1, 4, 1, 8, 8)}
    mask = torch.zeros(1, 64, 64)
    mask[:, :32, :32] = 1.0
    expected = r"latent: expected an image latent of shape \(batch, channels, height, width\), got \(1, 4, 1, 8, 8\)"
    with pytest.raises(ValueError, match=expected):
        host.node("RegionJacobianDirection", model=model, latent=latent, positive=host.tiny_conditioning("p"), mask=mask,
                  probe_percent=0.5, k=1, r=1, iterations=2, seed=0, add_noise=True)
    with pytest.raises(ValueError, match=expected):
        host.node("RectifierTrain", model=model, latent=latent, positive=host.tiny_conditioning(""), steps=1,
             learning_rate=1e-3, seed=0, filename_prefix="test/never", batch_size=1)
    with pytest.raises(ValueError, match=expected):
        host.node("RectifierApply", model=model, rectifier=untrained_rectifier(host, model), latent=latent)


def untrained_rectifier(host, model):
    core = host.pack_module("ngdm_core.rectifier")
    return core.Rectifier.for_model(model.model, core.conv_targets(
        model.model, host.pack_module("nodes.rectifier").TARGET_BLOCKS), 4)


@pytest.mark.parametrize("family", ["flux", "flux2", "qwen_image"])
def test_u_net_only_nodes_refuse_dit_models_naming_the_model(host, family):
    """Region directions need a U-Net bottleneck, the rectifier DDPM's maths on a U-Net: both refuse every DiT."""
    model = host.tiny_dit(family)
    latent = {"samples": host.tiny_latent(model)}
    unet = host.tiny_model("eps")
    directions, _ = host.node("RegionJacobianDirection", model=unet, latent={"samples": torch.randn(1, 4, 8, 8)},
                         positive=host.tiny_conditioning("p"), mask=torch.ones(1, 64, 64).tril(), probe_percent=0.5,
                         k=1, r=1, iterations=2, seed=0, add_noise=True)
    no_bottleneck = r"^model: \w+ has no U-Net bottleneck"
    with pytest.raises(ValueError, match=no_bottleneck):
        host.node("RegionJacobianDirection", model=model, latent=latent, positive=host.dit_conditioning("p"),
             mask=torch.ones(1, 64, 64).tril(), probe_percent=0.5, k=1, r=1, iterations=2, seed=0, add_noise=True)
    with pytest.raises(ValueError, match=no_bottleneck):
        host.node("ApplyRegionDirection", model=model, directions=directions, index=0, strength=1.0, start_percent=0.0,
             end_percent=1.0)
    not_ddpm = r"^model: the rectifier supports U-Net models that predict noise \(EPS\) or v"
    with pytest.raises(ValueError, match=not_ddpm):
        host.node("RectifierTrain", model=model, latent=latent, positive=host.dit_conditioning(""), steps=1,
             learning_rate=1e-3, seed=0, filename_prefix="test/never", batch_size=1)
    with pytest.raises(ValueError, match=not_ddpm):
        host.node("RectifierApply", model=model, rectifier=untrained_rectifier(host, unet), latent=latent)
