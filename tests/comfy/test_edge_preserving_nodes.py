import pytest
import torch

KNOBS = dict(lambda_min=1e-4, lambda_max=0.1, t_phi=0.5, transition="linear")


def node(node_id, **inputs):
    import nodes
    return nodes.NODE_CLASS_MAPPINGS[node_id].execute(**inputs).result


def schedule(model, steps=10, denoise=0.4):
    import comfy.samplers
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", int(steps / denoise))
    return sigmas[-(steps + 1):].cpu()


def step_image(size=64):
    image = torch.zeros(1, size, size, 3)
    image[:, :, size // 2:] = 1.0
    return image


def test_noise_matches_random_noise_in_shape_dtype_and_seed(host):
    import nodes
    model = host.tiny_model("eps")
    latent = {"samples": torch.randn(2, 4, 8, 8)}
    (reference,) = nodes.NODE_CLASS_MAPPINGS["RandomNoise"].execute(noise_seed=7).result
    random_noise = reference.generate_noise(latent)
    (noise,) = node("EdgePreservingNoise", model=model, sigmas=schedule(model), seed=7, strength=1.0,
                    image=step_image(), **KNOBS)
    edge_noise = noise.generate_noise(latent)
    assert edge_noise.shape == random_noise.shape and edge_noise.dtype == random_noise.dtype
    assert noise.seed == 7 and torch.equal(edge_noise, noise.generate_noise(latent))
    # Flat columns keep RandomNoise's values exactly; the step edge in the middle gets less.
    assert torch.equal(edge_noise[..., :2], random_noise[..., :2])
    assert (edge_noise[..., 3:5].abs() < random_noise[..., 3:5].abs()).all()
    (isotropic,) = node("EdgePreservingNoise", model=model, sigmas=schedule(model), seed=7, strength=0.0,
                        image=step_image(), **KNOBS)
    assert torch.equal(isotropic.generate_noise(latent), random_noise)
    (wide,) = node("EdgePreservingNoise", model=model, sigmas=schedule(model), seed=7, strength=1.0,
                   image=step_image(), **{**KNOBS, "lambda_min": 1e4, "lambda_max": 1e4})
    assert torch.allclose(wide.generate_noise(latent), random_noise, rtol=1e-3, atol=0)


def test_noise_edges_come_from_the_latent_without_an_image(host):
    model = host.tiny_model("eps")
    samples = torch.zeros(1, 4, 8, 8)
    samples[..., 4:] = 1.0
    (noise,) = node("EdgePreservingNoise", model=model, sigmas=schedule(model), seed=0, strength=1.0, **KNOBS)
    ratio = (noise.generate_noise({"samples": samples}) / torch.randn(1, 4, 8, 8, generator=torch.manual_seed(0))).abs()
    assert ratio[..., 3:5].max() < 0.9 and torch.allclose(ratio[..., :2], torch.ones(1, 4, 8, 2))


def test_bad_noise_settings_are_refused_with_the_inputs_name(host):
    model = host.tiny_model("eps")
    common = dict(model=model, sigmas=schedule(model), seed=0, strength=1.0)
    with pytest.raises(ValueError, match="lambda_min"):
        node("EdgePreservingNoise", **common, **{**KNOBS, "lambda_min": 0.5, "lambda_max": 0.1})
    with pytest.raises(ValueError, match="t_phi must lie in"):
        node("EdgePreservingNoise", **common, **{**KNOBS, "t_phi": 1.5})
    (noise,) = node("EdgePreservingNoise", **common, image=torch.zeros(1, 64, 32, 3), **KNOBS)
    with pytest.raises(ValueError, match="image is 64x32 pixels"):
        noise.generate_noise({"samples": torch.zeros(1, 4, 8, 8)})


def test_the_ancestral_sampler_draws_edge_preserving_noise(host):
    import comfy.samplers
    model = host.tiny_model("eps")
    base = comfy.samplers.sampler_object("euler_ancestral")
    latent = torch.zeros(1, 4, 8, 8)
    latent[..., 4:] = 2.0

    def run(sampler):
        return host.sample_with_weights(model, sampler, None, steps=6)[-1]

    (unchanged,) = node("EdgePreservingSampler", sampler=base, strength=0.0, **KNOBS)
    assert torch.equal(run(unchanged), run(base))
    (shaped,) = node("EdgePreservingSampler", sampler=base, strength=1.0, **KNOBS)
    assert not torch.equal(run(shaped), run(base))
    with pytest.raises(ValueError, match="sampler: EdgePreservingSampler needs an ancestral or SDE sampler"):
        node("EdgePreservingSampler", sampler=comfy.samplers.sampler_object("euler"), strength=1.0, **KNOBS)


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_the_stroke_workflow_runs(host, kind):
    host.TINY_MODEL_KIND["kind"] = kind
    captured = host.run_prompt(host.load_workflow("edge_preserving_stroke_img2img", 8))
    assert torch.isfinite(captured["output"]["samples"]).all()


def decoded_for(prompt, captured, filename_prefix):
    """The latent that the workflow decoded for the SaveImage with ``filename_prefix``."""
    save = next(value for value in prompt.values()
                if value["class_type"] == "SaveImage" and value["inputs"]["filename_prefix"] == filename_prefix)
    return captured["decoded"][save["inputs"]["images"][0]]["samples"]


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_the_stroke_workflows_edge_preserving_branch_differs_from_random_noise(host, kind):
    host.TINY_MODEL_KIND["kind"] = kind
    prompt = host.load_workflow("edge_preserving_stroke_img2img", 8)
    captured = host.run_prompt(prompt)
    edge, plain = (decoded_for(prompt, captured, name) for name in ("edge_preserving_noise", "random_noise"))
    # With t_phi 0.5 the run (denoise 0.7, starting at t = 0.71) drew RandomNoise's noise, bit for bit.
    assert (edge - plain).abs().mean().item() > 1e-2 * plain.abs().mean().item()


@pytest.mark.parametrize("t_phi,strength,warned", [(0.5, 1.0, "at or past t_phi = 0.5"), (1.0, 0.0, "strength is 0"),
                                                    (1.0, 1.0, None)])
def test_the_noise_says_so_when_it_is_random_noise(host, monkeypatch, t_phi, strength, warned):
    import server
    recorder = host.NodeTextRecorder()
    monkeypatch.setattr(server.PromptServer, "instance", recorder)
    host.TINY_MODEL_KIND["kind"] = "eps"
    prompt = host.load_workflow("edge_preserving_stroke_img2img", 8)
    noise_node = next(key for key, value in prompt.items() if value["class_type"] == "EdgePreservingNoise")
    prompt[noise_node]["inputs"].update(t_phi=t_phi, strength=strength)
    captured = host.run_prompt(prompt)
    texts = [text for node_id, text in recorder.texts if node_id == noise_node]
    if warned is None:
        assert texts == []
        return
    assert len(texts) == 1 and warned in texts[0] and "RandomNoise's noise exactly" in texts[0]
    edge, plain = (decoded_for(prompt, captured, name) for name in ("edge_preserving_noise", "random_noise"))
    assert torch.equal(edge, plain)
