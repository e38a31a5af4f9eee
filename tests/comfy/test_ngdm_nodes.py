import pytest
import torch


def node(host, node_id, **inputs):
    import nodes
    return nodes.NODE_CLASS_MAPPINGS[node_id].execute(**inputs).result


def sampler(name):
    import comfy.samplers
    return comfy.samplers.sampler_object(name)


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "heun", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_sde"])
def test_per_pixel_time_sampler_keeps_one_noise_for_every_sampler(host, kind, name):
    model = host.tiny_model(kind)
    (wrapped,) = node(host, "PerPixelTimeSampler", sampler=sampler(name), mapping="ngdm")
    drift, end_error = host.held_noise_drift(model, wrapped)
    assert drift <= 1e-4
    assert end_error <= 1e-5


@pytest.mark.parametrize("name,keeps_noise", [("euler", True), ("dpmpp_2m", True), ("heun", True),
                                              ("euler_ancestral", False), ("dpmpp_2m_sde", False)])
def test_model_patch_keeps_one_noise_only_for_deterministic_samplers(host, name, keeps_noise):
    (patched,) = node(host, "PerPixelTimeModel", model=host.tiny_model("eps"), mapping="ngdm")
    drift, end_error = host.held_noise_drift(patched, sampler(name))
    assert (drift <= 1e-4) == keeps_noise
    assert end_error <= 1e-5


def test_sampler_and_model_patch_agree_for_a_deterministic_sampler(host):
    weights = torch.rand(1, 1, host.LATENT_SIZE, host.LATENT_SIZE, generator=torch.Generator().manual_seed(0))
    model = host.tiny_model("eps")
    (wrapped,) = node(host, "PerPixelTimeSampler", sampler=sampler("euler"), mapping="ngdm")
    (patched,) = node(host, "PerPixelTimeModel", model=model, mapping="ngdm")
    *_, from_sampler = host.sample_with_weights(model, wrapped, weights)
    *_, from_patch = host.sample_with_weights(patched, sampler("euler"), weights)
    # They differ only by ComfyUI's max-denoise start, sqrt(1 + sigma_max^2) instead of sigma_max.
    assert (from_sampler - from_patch).abs().max().item() < 0.05 * from_sampler.abs().max().item()


def test_the_model_patch_survives_a_later_nodes_clone(host):
    # A node after PerPixelTimeModel (a LoRA loader, an evaluation counter) clones the model, and
    # ComfyUI 0.8's clone deep-copies model_options: the patch must still know its own function.
    weights = torch.rand(1, 1, host.LATENT_SIZE, host.LATENT_SIZE, generator=torch.Generator().manual_seed(0))
    (patched,) = node(host, "PerPixelTimeModel", model=host.tiny_model("eps"), mapping="ngdm")
    *_, direct = host.sample_with_weights(patched, sampler("euler"), weights)
    *_, cloned = host.sample_with_weights(patched.clone(), sampler("euler"), weights)
    assert torch.equal(direct, cloned)


def test_linear_mapping_matches_differential_diffusion(host):
    weights = torch.rand(1, 1, host.LATENT_SIZE, host.LATENT_SIZE, generator=torch.Generator().manual_seed(1))
    model = host.tiny_model("eps")
    (differential,) = node(host, "DifferentialDiffusion", model=model, strength=1.0)
    (patched,) = node(host, "PerPixelTimeModel", model=model, mapping="linear")
    *_, reference = host.sample_with_weights(differential, sampler("euler"), weights, steps=20)
    *_, ours = host.sample_with_weights(patched, sampler("euler"), weights, steps=20)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_the_papers_start_rule_reaches_both_nodes_and_changes_the_edit(host):
    weights = torch.rand(1, 1, host.LATENT_SIZE, host.LATENT_SIZE, generator=torch.Generator().manual_seed(2))
    model = host.tiny_model("eps")
    results = {}
    for rule in ("first_at_or_below", "last_at_or_above"):
        (wrapped,) = node(host, "PerPixelTimeSampler", sampler=sampler("euler"), mapping="ngdm", start_rule=rule)
        (patched,) = node(host, "PerPixelTimeModel", model=model, mapping="ngdm", start_rule=rule)
        *_, from_sampler = host.sample_with_weights(model, wrapped, weights)
        *_, from_patch = host.sample_with_weights(patched, sampler("euler"), weights)
        results[rule] = from_sampler, from_patch
    for made_by in range(2):
        assert not torch.allclose(results["first_at_or_below"][made_by], results["last_at_or_above"][made_by])
    # Without the widget (an API prompt from before it), the default rule.
    (default,) = node(host, "PerPixelTimeSampler", sampler=sampler("euler"), mapping="ngdm")
    assert torch.equal(host.sample_with_weights(model, default, weights)[-1], results["first_at_or_below"][0])


def test_weight_map_batches_all_seeds_and_leaves_conditioning_untouched(host):
    import nodes
    model, batch_sizes = host.count_model_calls(host.tiny_model("eps"))
    source, negative = host.tiny_conditioning("source"), host.tiny_conditioning("negative")
    hint = torch.rand(1, 8 * host.LATENT_SIZE, 8 * host.LATENT_SIZE, 3)
    target, _ = nodes.ControlNetApplyAdvanced().apply_controlnet(host.tiny_conditioning("target"), negative,
                                                                   host.tiny_controlnet(), hint, 1.0, 0.0, 1.0)
    control = target[0][1]["control"]
    snapshot = [(c[0][0].clone(), dict(c[0][1])) for c in (source, target, negative)]
    latent = {"samples": torch.randn(2, 4, host.LATENT_SIZE, host.LATENT_SIZE)}
    samples_before = latent["samples"].clone()
    mask, out = node(host, "NGDMWeightMap", model=model, latent=latent, source_conditioning=source,
                     target_conditioning=target, negative=negative, seed=0, num_maps=10, encode_strength=0.5, cfg=7.5,
                     smoothing=1.0, a=10.0, b=5.0, mode="ngdm")
    # Under plain CFG only the two conditional predictions are evaluated, each call holding all
    # 10 seeds of both images.
    assert batch_sizes == [20, 20]
    assert mask.shape == (2, 8 * host.LATENT_SIZE, 8 * host.LATENT_SIZE)
    assert torch.equal(mask[:, ::8, ::8], out["noise_mask"][:, 0])
    assert "noise_mask" not in latent and torch.equal(latent["samples"], samples_before)
    for (tensor, options), cond in zip(snapshot, (source, target, negative)):
        assert torch.equal(cond[0][0], tensor) and cond[0][1] == options
    assert target[0][1]["control"] is control


def test_weight_map_splits_its_seeds_to_fit_the_free_memory_and_gives_the_same_map(host, monkeypatch):
    """Told that only 3.5 seeds' activations fit (a small card), the node runs 3 seeds per call, 4 calls a prompt.

    The chunks evaluate the same noised latents in smaller batches, so the map differs by float
    rounding only: about 1e-6 relative in the predictions, times at most a = 10 through the
    sigmoid of the normalised difference, well under 1e-4.
    """
    import comfy.model_management
    model, batch_sizes = host.count_model_calls(host.tiny_model("eps"))
    latent = {"samples": torch.randn(1, 4, host.LATENT_SIZE, host.LATENT_SIZE, generator=torch.manual_seed(0))}
    inputs = dict(model=model, latent=latent, source_conditioning=host.tiny_conditioning("source"),
                  target_conditioning=host.tiny_conditioning("target"), negative=host.tiny_conditioning("negative"),
                  seed=0, num_maps=10, encode_strength=0.5, cfg=7.5, smoothing=1.0, a=10.0, b=5.0, mode="ngdm")
    whole, _ = node(host, "NGDMWeightMap", **inputs)
    assert batch_sizes == [10, 10]
    budget = 3.5 * model.model.memory_required([2, 4, host.LATENT_SIZE, host.LATENT_SIZE])
    monkeypatch.setattr(comfy.model_management, "get_free_memory",
                        lambda device=None, torch_free_too=False: (budget, budget) if torch_free_too else budget)
    batch_sizes.clear()
    chunked, _ = node(host, "NGDMWeightMap", **inputs)
    assert batch_sizes == [3] * 6 + [1] * 2
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-4)


def test_the_map_from_the_conditional_predictions_alone_equals_the_guided_one_for_half_the_rows(host):
    def post_cfg_identity(args):
        return args["denoised"]

    plain, plain_rows = host.count_model_calls(host.tiny_model("eps"))
    patched = host.tiny_model("eps").clone()
    # Any CFG patch makes the node guide in full; an identity one keeps the map comparable.
    patched.set_model_sampler_post_cfg_function(post_cfg_identity)
    patched, patched_rows = host.count_model_calls(patched)
    inputs = dict(latent={"samples": torch.randn(2, 4, host.LATENT_SIZE, host.LATENT_SIZE)},
                  source_conditioning=host.tiny_conditioning("source"),
                  target_conditioning=host.tiny_conditioning("target"), negative=host.tiny_conditioning("negative"),
                  seed=0, num_maps=4, encode_strength=0.5, cfg=7.5, smoothing=1.0, a=10.0, b=5.0, mode="ngdm",
                  zero_floor=True)
    conditional, _ = node(host, "NGDMWeightMap", model=plain, **inputs)
    guided, _ = node(host, "NGDMWeightMap", model=patched, **inputs)
    assert torch.allclose(conditional, guided, atol=1e-5)
    assert sum(patched_rows) == 2 * sum(plain_rows) == 2 * 16


def test_change_mode_maps_where_a_cheap_edit_changed_the_source(host):
    model, batch_sizes = host.count_model_calls(host.tiny_model("eps"))
    latent = {"samples": torch.randn(1, 4, host.LATENT_SIZE, host.LATENT_SIZE)}
    inputs = dict(model=model, latent=latent, source_conditioning=host.tiny_conditioning("source"),
                  negative=host.tiny_conditioning("negative"), seed=0, num_maps=1, encode_strength=0.6, cfg=5.0,
                  smoothing=1.0, a=10.0, b=5.0, mode="change", change_steps=3, change_threshold=0.2, change_edits=1,
                  change_softness=0.0)
    mask, out = node(host, "NGDMWeightMap", target_conditioning=host.tiny_conditioning("target"), **inputs)
    weights = out["noise_mask"]
    assert weights.shape == (1, 1, host.LATENT_SIZE, host.LATENT_SIZE)
    assert set(weights.unique().tolist()) == {0.0, 1.0}
    # Three steps inverted and three replayed, each guided: cond and uncond in one call.
    assert batch_sizes == [2] * 6
    # The same prompt edits nothing: the replay retraces the inversion and the map is empty.
    _, same = node(host, "NGDMWeightMap", target_conditioning=host.tiny_conditioning("source"), **inputs)
    assert torch.equal(same["noise_mask"], torch.zeros_like(weights))
    assert host.progress_updates_and_cancel(
        lambda: node(host, "NGDMWeightMap", target_conditioning=host.tiny_conditioning("target"),
                     **inputs)) == 6


def test_change_mode_averages_several_edits_in_one_batch_and_grades_the_map_by_the_change(host):
    model, batch_sizes = host.count_model_calls(host.tiny_model("eps"))
    inputs = dict(model=model, latent={"samples": torch.randn(1, 4, host.LATENT_SIZE, host.LATENT_SIZE)},
                  source_conditioning=host.tiny_conditioning("source"), target_conditioning=host.tiny_conditioning("target"),
                  negative=host.tiny_conditioning("negative"), seed=0, num_maps=1, encode_strength=0.6, cfg=5.0,
                  smoothing=1.0, a=10.0, b=5.0, mode="change", change_steps=3, change_threshold=0.2)
    _, binary = node(host, "NGDMWeightMap", **inputs, change_edits=1, change_softness=0.0)
    _, graded = node(host, "NGDMWeightMap", **inputs, change_edits=1, change_softness=0.3)
    # Graded by the change where it passes the threshold, on the binary map's support.
    values = graded["noise_mask"]
    assert ((values > 0) & (values < 1)).any()
    assert torch.equal((values > 0).to(values.dtype), binary["noise_mask"])
    batch_sizes.clear()
    # Without the two widgets (an API prompt that leaves them out), their defaults: two edits, graded.
    _, averaged = node(host, "NGDMWeightMap", **inputs)
    # Two edits in one batch: every call holds both, guided (cond and uncond).
    assert batch_sizes == [4] * 6
    averaged = averaged["noise_mask"]
    assert averaged.shape == binary["noise_mask"].shape and ((averaged > 0) & (averaged < 1)).any()
    assert not torch.equal(averaged, values)


def test_bad_input_is_refused_with_the_inputs_name(host):
    model = host.tiny_model("eps")
    conditioning = host.tiny_conditioning("x")
    common = dict(model=model, source_conditioning=conditioning, target_conditioning=conditioning,
                  negative=conditioning, seed=0, num_maps=2, encode_strength=0.5, cfg=7.5, smoothing=1.0, a=10.0,
                  b=5.0, mode="ngdm")
    with pytest.raises(ValueError, match="latent has 16 channels but the model expects 4"):
        node(host, "NGDMWeightMap", latent={"samples": torch.zeros(1, 16, 8, 8)}, **common)
    with pytest.raises(ValueError, match="latent contains NaN"):
        node(host, "NGDMWeightMap", latent={"samples": torch.full((1, 4, 8, 8), float("nan"))}, **common)
    (wrapped,) = node(host, "PerPixelTimeSampler", sampler=sampler("euler"), mapping="ngdm")
    with pytest.raises(ValueError, match="the latent has no noise_mask"):
        host.sample_with_weights(model, wrapped, None)
    with pytest.raises(ValueError, match="noise_mask contains NaN"):
        host.sample_with_weights(model, wrapped, torch.full((1, 1, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="sampler: PerPixelTimeSampler wraps k-diffusion samplers"):
        node(host, "PerPixelTimeSampler", sampler=object(), mapping="ngdm")
    for name in ("dpm_fast", "dpm_adaptive", "uni_pc", "uni_pc_bh2"):
        with pytest.raises(ValueError, match=f"sampler: {name} cannot keep pixels on the noised source"):
            node(host, "PerPixelTimeSampler", sampler=sampler(name), mapping="ngdm")


def test_weight_map_reports_progress_and_honours_cancel(host):
    conditioning = host.tiny_conditioning("x")
    inputs = dict(model=host.tiny_model("eps"), latent={"samples": torch.randn(1, 4, 8, 8)},
                  source_conditioning=conditioning, target_conditioning=host.tiny_conditioning("y"),
                  negative=conditioning, seed=0, num_maps=3, encode_strength=0.5, cfg=7.5, smoothing=1.0, a=10.0,
                  b=5.0, mode="ngdm")
    assert host.progress_updates_and_cancel(lambda: node(host, "NGDMWeightMap", **inputs)) == 2
