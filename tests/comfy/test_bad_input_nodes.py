"""Malformed input reaches every node as a ValueError that names the input, before any model call.

Conditioning (non-finite anywhere, or made for another model), the runs that the SAMPLER
nodes are handed, and DifferentialDiffusion chained with the per-pixel start times.
"""

import pytest
import torch

NAN = float("nan")
INF = float("inf")


def node(node_id, **inputs):
    import nodes
    return nodes.NODE_CLASS_MAPPINGS[node_id].execute(**inputs).result


def sampler(name):
    import comfy.samplers
    return comfy.samplers.sampler_object(name)


def quarter_mask():
    mask = torch.zeros(1, 64, 64)
    mask[:, :32, :32] = 1.0
    return mask


def run_node(host, node_id, model, conditioning, input_name):
    """``node_id`` with ``conditioning`` as its ``input_name`` and good values everywhere else."""
    import comfy.samplers
    good = host.tiny_conditioning("good")
    latent = {"samples": torch.randn(1, 4, 8, 8)}
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 4).cpu()
    inputs = {
        "NGDMWeightMap": dict(latent=latent, source_conditioning=good, target_conditioning=good, negative=good, seed=0,
                              num_maps=2, encode_strength=0.5, cfg=2.0, smoothing=1.0, a=10.0, b=5.0, mode="ngdm"),
        "EditFriendlyInvert": dict(latent=latent, positive=good, negative=good, sigmas=sigmas, source_cfg=2.0, eta=1.0,
                                   skip=0.0, seed=0),
        "RegionJacobianDirection": dict(latent=latent, positive=good, mask=quarter_mask(), probe_percent=0.5, k=1, r=1,
                                        iterations=2, seed=0, add_noise=True),
        "RectifierTrain": dict(latent=latent, positive=good, steps=1, learning_rate=1e-3, seed=0,
                               filename_prefix="test/never", batch_size=1),
    }[node_id]
    if input_name == "target":  # RectifierTrain's edit mode, with everything else it needs connected
        inputs = {**inputs, "mode": "edit", "clip": host.tiny_clip(), "clip_vision": host.tiny_clip_vision(),
                  "vae": host.tiny_vae()}
    return node(node_id, model=model, **{**inputs, input_name: conditioning})


CONDITIONING_INPUTS = [("NGDMWeightMap", "source_conditioning"), ("NGDMWeightMap", "target_conditioning"),
                       ("NGDMWeightMap", "negative"), ("EditFriendlyInvert", "positive"),
                       ("EditFriendlyInvert", "negative"), ("RegionJacobianDirection", "positive"),
                       ("RectifierTrain", "positive"), ("RectifierTrain", "target")]


def spoiled(host, part, value):
    """A prompt with ``value`` (NaN or inf) in one ``part``: the embedding, the pooled output, or a ControlNet hint."""
    import nodes
    embedding, options = host.tiny_conditioning("spoiled")[0]
    if part == "embedding":
        embedding = embedding.clone()
        embedding[0, 3, 5] = value
        return [[embedding, options]]
    if part == "pooled_output":
        pooled = torch.zeros(1, 768)
        pooled[0, 1] = value
        return [[embedding, {**options, "pooled_output": pooled}]]
    hint = torch.rand(1, 64, 64, 3)
    hint[0, 10, 10, 0] = value
    positive, _ = nodes.ControlNetApplyAdvanced().apply_controlnet([[embedding, options]], host.tiny_conditioning("n"),
                                                                   host.tiny_controlnet(), hint, 1.0, 0.0, 1.0)
    return positive


@pytest.mark.parametrize("node_id,input_name", CONDITIONING_INPUTS)
@pytest.mark.parametrize("part,where", [("embedding", "the prompt embedding"), ("pooled_output", "its pooled_output"),
                                        ("control", "the hint of its control")])
def test_non_finite_conditioning_is_refused_naming_the_input(host, node_id, input_name, part, where):
    model, calls = host.count_model_calls(host.tiny_model("eps"))
    for value in (NAN, INF):
        with pytest.raises(ValueError, match=f"^{input_name} contains NaN or inf values, in {where}"):
            run_node(host, node_id, model, spoiled(host, part, value), input_name)
    assert calls == []


@pytest.mark.parametrize("node_id,input_name", CONDITIONING_INPUTS)
def test_conditioning_for_another_model_is_refused_naming_the_input(host, node_id, input_name):
    """SDXL-width (2048) prompt embeddings on the SD1.5-shaped U-Net, whose cross-attention takes 768."""
    model, calls = host.count_model_calls(host.tiny_model("eps"))
    sdxl = [[torch.randn(1, 77, 2048), {"pooled_output": torch.randn(1, 1280)}]]
    with pytest.raises(ValueError, match=f"^{input_name}: the prompt embedding is 2048 wide, but this model's "
                                         "cross-attention takes 768"):
        run_node(host, node_id, model, sdxl, input_name)
    assert calls == []


@pytest.mark.parametrize("family", ["flux", "qwen_image"])
def test_dit_prompt_widths_are_checked_too(host, family):
    model = host.tiny_dit(family)
    latent = {"samples": host.tiny_latent(model)}
    with pytest.raises(ValueError, match="^negative: the prompt embedding is 48 wide, but this model's "
                                         "cross-attention takes 32"):
        node("EditFriendlyInvert", model=model, latent=latent, positive=host.dit_conditioning("p"),
             negative=host.dit_conditioning("n", width=48), sigmas=torch.tensor([1.0, 0.5, 0.0]), source_cfg=2.0,
             eta=1.0, skip=0.0, seed=0)


def test_malformed_conditioning_is_refused(host):
    with pytest.raises(ValueError, match=r"^positive: expected a CONDITIONING \(a list of \[embedding, options\] pairs"):
        run_node(host, "EditFriendlyInvert", host.tiny_model("eps"), torch.zeros(1, 77, 768), "positive")


@pytest.mark.parametrize("node_id,input_name", CONDITIONING_INPUTS)
def test_an_empty_conditioning_is_refused_naming_the_input(host, node_id, input_name):
    model, calls = host.count_model_calls(host.tiny_model("eps"))
    with pytest.raises(ValueError, match=f"^{input_name} is an empty CONDITIONING"):
        run_node(host, node_id, model, [], input_name)
    assert calls == []


def test_a_5d_latent_for_a_4d_model_is_refused_naming_the_latent(host):
    model, calls = host.count_model_calls(host.tiny_model("eps"))
    good = host.tiny_conditioning("good")
    with pytest.raises(ValueError, match=r"^latent is a 5-D latent \(1, 4, 1, 8, 8\), but this model takes"):
        node("NGDMWeightMap", model=model, latent={"samples": torch.randn(1, 4, 1, 8, 8)}, source_conditioning=good,
             target_conditioning=good, negative=good, seed=0, num_maps=2, encode_strength=0.5, cfg=2.0, smoothing=1.0,
             a=10.0, b=5.0, mode="ngdm")
    assert calls == []


@pytest.mark.parametrize("size", [1, 3])
def test_rectifier_training_refuses_a_latent_too_small_for_the_u_net(host, size):
    """The tiny U-Net halves its input once, so it needs 4x4 latent pixels for a 2x2 bottleneck."""
    model, calls = host.count_model_calls(host.tiny_model("eps"))
    with pytest.raises(ValueError, match=f"^latent: {size}x{size} latent pixels is too small for this U-Net"):
        node("RectifierTrain", model=model, latent={"samples": torch.randn(1, 4, size, size)},
             positive=host.tiny_conditioning("good"), steps=1, learning_rate=1e-3, seed=0,
             filename_prefix="test/never", batch_size=1)
    assert calls == []


def per_pixel_sampler():
    return node("PerPixelTimeSampler", sampler=sampler("euler"), mapping="ngdm")[0]


def edge_preserving_sampler():
    return node("EdgePreservingSampler", sampler=sampler("euler_ancestral"), lambda_min=1e-4, lambda_max=0.1,
                t_phi=1.0, transition="linear", strength=1.0)[0]


def bad_run(host, wrapped, sigmas=None, latent=None, noise=None):
    """Sample through ``wrapped`` with one part of the run spoiled; the model must never be called."""
    import comfy.sample
    import comfy.samplers
    model, calls = host.count_model_calls(host.tiny_model("eps"))
    good_sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 4).cpu()
    latent = torch.randn(1, 4, 8, 8) if latent is None else latent
    noise = torch.randn(latent.shape) if noise is None else noise
    weights = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    try:
        comfy.sample.sample_custom(model, noise, 2.0, wrapped, good_sigmas if sigmas is None else sigmas,
                                   host.tiny_conditioning("p"), host.tiny_conditioning("n"), latent, noise_mask=weights,
                                   disable_pbar=True, seed=0)
    finally:
        assert calls == []


@pytest.mark.parametrize("make_sampler", [per_pixel_sampler, edge_preserving_sampler])
@pytest.mark.parametrize("spoil,message", [
    (dict(sigmas=torch.tensor([14.6, NAN, 0.0])), "sigmas contains NaN or inf"),
    (dict(sigmas=torch.tensor([1.0, 2.0, 0.0])), "sigmas must be non-increasing"),
    (dict(sigmas=torch.tensor([14.6])), "sigmas must hold at least two sigmas"),
    (dict(latent=torch.full((1, 4, 8, 8), NAN)), "latent contains NaN or inf"),
    (dict(latent=torch.randn(1, 16, 8, 8)), "latent has 16 channels but the model expects 4"),
    (dict(latent=torch.randn(1, 4, 8, 8), noise=torch.full((1, 4, 8, 8), INF)), "noise contains NaN or inf"),
])
def test_sampler_nodes_check_the_run_they_are_given(host, make_sampler, spoil, message):
    with pytest.raises(ValueError, match=message):
        bad_run(host, make_sampler(), **spoil)


def test_edge_preserving_noise_names_its_inputs(host):
    model = host.tiny_model("eps")
    knobs = dict(lambda_min=1e-4, lambda_max=0.1, t_phi=1.0, transition="linear", strength=1.0)
    with pytest.raises(ValueError, match="sigmas contains NaN"):
        node("EdgePreservingNoise", model=model, sigmas=torch.tensor([NAN, 0.0]), seed=0, **knobs)
    with pytest.raises(ValueError, match="sigmas must hold at least two"):
        node("EdgePreservingNoise", model=model, sigmas=torch.tensor([]), seed=0, **knobs)
    for node_id, inputs in (("EdgePreservingNoise", dict(model=model, sigmas=torch.tensor([1.0, 0.0]), seed=0)),
                            ("EdgePreservingSampler", dict(sampler=sampler("euler_ancestral")))):
        with pytest.raises(ValueError, match=r"^image: expected an IMAGE of shape \(batch, height, width, channels\)"):
            node(node_id, image=torch.rand(64, 64, 3), **inputs, **knobs)
    (noise,) = node("EdgePreservingNoise", model=model, sigmas=torch.tensor([1.0, 0.0]), seed=0, **knobs)
    with pytest.raises(ValueError, match="^latent contains NaN"):
        noise.generate_noise({"samples": torch.full((1, 4, 8, 8), NAN)})
    with pytest.raises(ValueError, match="^latent has 16 channels"):
        noise.generate_noise({"samples": torch.randn(1, 16, 8, 8)})


def test_the_inversion_refuses_a_schedule_without_a_step(host):
    with pytest.raises(ValueError, match="sigmas must hold at least two sigmas"):
        node("EditFriendlyInvert", model=host.tiny_model("eps"), latent={"samples": torch.randn(1, 4, 8, 8)},
             positive=host.tiny_conditioning("p"), negative=host.tiny_conditioning("n"), sigmas=torch.tensor([]),
             source_cfg=2.0, eta=1.0, skip=0.0, seed=0)


def with_differential_diffusion(host, name, before):
    """The workflow ``name`` with DifferentialDiffusion on the sampled model, before or after PerPixelTimeModel."""
    prompt = host.load_workflow(name, 4)
    patched = next(key for key, value in prompt.items() if value["class_type"] in ("PerPixelTimeModel", "CFGGuider"))
    link = prompt[patched]["inputs"]["model"]
    prompt["dd"] = {"class_type": "DifferentialDiffusion", "inputs": {"model": link, "strength": 1.0}}
    if before:
        prompt[patched]["inputs"]["model"] = ["dd", 0]
    else:
        for value in prompt.values():
            if value["class_type"] == "KSampler":
                value["inputs"]["model"] = ["dd", 0]
        prompt["dd"]["inputs"]["model"] = [patched, 0]
    return prompt


@pytest.mark.parametrize("before,message", [
    (True, "model: DifferentialDiffusion already gives it a denoise_mask_function.*remove DifferentialDiffusion"),
    (False, "model: DifferentialDiffusion replaced PerPixelTimeModel's denoise_mask_function after it.*"
            "remove DifferentialDiffusion"),
])
def test_differential_diffusion_and_the_model_patch_do_not_chain_silently(host, before, message):
    host.TINY_MODEL_KIND["kind"] = "eps"
    with pytest.raises(RuntimeError, match=message):
        host.run_prompt(with_differential_diffusion(host, "ngdm_ksampler_edit", before))


def test_the_sampler_refuses_a_model_whose_mask_function_it_would_skip(host):
    host.TINY_MODEL_KIND["kind"] = "eps"
    with pytest.raises(RuntimeError, match="model: DifferentialDiffusion gives it a denoise_mask_function, which "
                                           "PerPixelTimeSampler would skip.*Remove DifferentialDiffusion"):
        host.run_prompt(with_differential_diffusion(host, "ngdm_text_edit", True))
    model = host.tiny_model("eps")
    (patched,) = node("PerPixelTimeModel", model=model, mapping="ngdm")
    with pytest.raises(ValueError, match="model: PerPixelTimeModel gives it a denoise_mask_function"):
        host.sample_with_weights(patched, per_pixel_sampler(), torch.rand(1, 1, 8, 8))
