import pytest
import torch

SIZE = 16  # latent pixels; the tiny U-Net's bottleneck is then 8x8


def node(node_id, **inputs):
    import nodes
    return nodes.NODE_CLASS_MAPPINGS[node_id].execute(**inputs).result


def quarter_mask(size):
    mask = torch.zeros(1, 8 * size, 8 * size)
    mask[:, :4 * size, :4 * size] = 1.0
    return mask


def find(host, model, mask, **overrides):
    inputs = dict(model=model, latent={"samples": torch.randn(1, 4, SIZE, SIZE, generator=torch.manual_seed(0))},
                  positive=host.tiny_conditioning("p"), mask=mask, probe_percent=0.5, k=3, r=1, iterations=10,
                  seed=0, add_noise=True)
    return node("RegionJacobianDirection", **{**inputs, **overrides})


def leakage(change, size):
    """Mean change outside the quarter mask over the mean change inside it (per latent pixel, channels averaged)."""
    change = change.abs().mean(dim=1)[0]
    inside = torch.zeros(size, size, dtype=torch.bool)
    inside[:size // 2, :size // 2] = True
    return (change[~inside].mean() / change[inside].mean()).item()


def test_the_ratio_directions_leak_less_than_unconfined_ones_at_the_probe_and_after_sampling(host):
    import comfy.sample
    import comfy.samplers
    euler = comfy.samplers.sampler_object("euler")
    at_probe, sampled = {}, {}
    with torch.inference_mode():
        # Weights made under inference mode, as a checkpoint loader leaves them.
        model = host.tiny_model("eps")
        # The probe state, given to the node as already noisy, so that one Euler step from its sigma to 0 returns
        # the model's prediction there, through ComfyUI's own sampling path and ApplyRegionDirection's patch.
        sigma = float(model.get_model_object("model_sampling").percent_to_sigma(0.5))
        generator = torch.Generator().manual_seed(0)
        clean = model.model.process_latent_in(torch.randn(1, 4, SIZE, SIZE, generator=generator))
        state = model.model.process_latent_out(clean + sigma * torch.randn(clean.shape, generator=generator))

        def predict(patched):
            return comfy.sample.sample_custom(patched, torch.zeros_like(state), 1.0, euler, torch.tensor([sigma, 0.0]),
                                              host.tiny_conditioning("p"), host.tiny_conditioning("n"), state,
                                              disable_pbar=True, seed=0)

        plain_prediction = predict(model)
        plain_sample = host.sample_with_weights(model, euler, None, steps=10, size=SIZE)[-1]
        for confinement in ("ratio", "none"):
            directions, preview = find(host, model, quarter_mask(SIZE), latent={"samples": state}, add_noise=False,
                                       confinement=confinement)
            assert directions.vectors.shape == (3, 64, SIZE // 2, SIZE // 2)
            assert torch.allclose(directions.vectors.flatten(1).norm(dim=1), torch.ones(3), atol=1e-5)
            assert not directions.vectors.requires_grad and directions.vectors.grad_fn is None
            assert all(parameter.grad is None for parameter in model.model.parameters())
            assert preview.shape == (3, 8 * SIZE, 8 * SIZE) and preview.max() == 1.0
            (patched,) = node("ApplyRegionDirection", model=model, directions=directions, index=0, strength=30.0,
                              start_percent=0.0, end_percent=1.0)
            at_probe[confinement] = leakage(predict(patched) - plain_prediction, SIZE)
            sampled[confinement] = leakage(host.sample_with_weights(patched, euler, None, steps=10, size=SIZE)[-1]
                                           - plain_sample, SIZE)
    print(f"change outside / inside the mask, ratio against none: one model call at the probe "
          f"{at_probe['ratio']:.3f} against {at_probe['none']:.3f}; a 10-step run from pure noise "
          f"{sampled['ratio']:.3f} against {sampled['none']:.3f}")
    # The confinement ranks directions by their leakage in one model call at the probe state: there losing it (the
    # unconfined direction) must show clearly. Through a whole run, each later call of this random-weight U-Net
    # spreads the change over the image, so there both leak more and the gap narrows; the edit still lands
    # mostly inside the mask.
    assert at_probe["ratio"] <= 0.7 * at_probe["none"]
    assert sampled["ratio"] < min(1.0, sampled["none"])


def bottleneck_recorder(model, records):
    """A clone of ``model`` that appends ``(sigma, h)`` at the bottleneck, after the output block patches before it."""
    def record(h, hsp, transformer_options):
        if transformer_options.get("block") == ("output", 0):
            records.append((float(transformer_options["sigmas"].max()), h.detach().clone()))
        return h, hsp

    recorded = model.clone()
    recorded.set_model_output_block_patch(record)
    return recorded


@pytest.fixture(scope="module")
def found_for_refinding(host):
    """A tiny model made under inference mode, as a checkpoint loader leaves it, and its ratio directions."""
    with torch.inference_mode():
        model = host.tiny_model("eps")
        return model, find(host, model, quarter_mask(SIZE), iterations=3)[0]


def test_refind_iterations_0_applies_the_found_direction_bit_for_bit_and_above_0_re_finds_it_each_step(
        host, found_for_refinding):
    import comfy.samplers
    euler = comfy.samplers.sampler_object("euler")
    strength = 30.0
    model, directions = found_for_refinding
    found = directions.vectors[0]
    with torch.inference_mode():
        # Today's behaviour written out: the found direction added to the bottleneck on every call.
        by_hand = model.clone()
        by_hand.set_model_output_block_patch(
            lambda h, hsp, options: (h + strength * found.to(h) if options.get("block") == ("output", 0) else h, hsp))
        expected = host.sample_with_weights(by_hand, euler, None, steps=3, size=SIZE)[-1]
        for widgets in ({}, {"refind_iterations": 0}):
            (fixed,) = node("ApplyRegionDirection", model=model, directions=directions, index=0, strength=strength,
                            start_percent=0.0, end_percent=1.0, **widgets)
            assert torch.equal(host.sample_with_weights(fixed, euler, None, steps=3, size=SIZE)[-1], expected)
        before, after = [], []
        (refinding,) = node("ApplyRegionDirection", model=bottleneck_recorder(model, before), directions=directions,
                            index=0, strength=strength, start_percent=0.0, end_percent=1.0, refind_iterations=2)
        output = host.sample_with_weights(bottleneck_recorder(refinding, after), euler, None, steps=3, size=SIZE)[-1]
    assert torch.isfinite(output).all()
    # One batched call (cond and uncond) per Euler step; the shift it applied, per row, as a direction.
    assert [sigma for sigma, _ in before] == [sigma for sigma, _ in after] and len(after) == 3
    applied = [(shifted - plain) / strength for (_, plain), (_, shifted) in zip(before, after)]
    # (plain + strength * d) - plain rounds once at the sum's magnitude: half an ulp of the largest value, over the
    # strength; twice that bounds the difference's own (exact or one more half-ulp) rounding.
    tolerance = max(2 * torch.finfo(torch.float32).eps * shifted.abs().max().item() / strength
                    for _, shifted in after)
    for step in applied:
        torch.testing.assert_close(step[0], step[1], rtol=0, atol=2 * tolerance)  # cond and uncond share it
    torch.testing.assert_close(applied[0][0], found, rtol=0, atol=tolerance)  # the first step keeps the found one
    second, third = applied[1][0].flatten(), applied[2][0].flatten()
    # Unit length up to each entry's rounding, summed in quadrature over the entries.
    assert abs(third.norm().item() - 1) <= tolerance * third.numel() ** 0.5
    cosine = (third @ found.flatten()).item()
    print(f"refind_iterations 2: step 2's direction against the found one, cosine {cosine:.4f}")
    assert (third - found.flatten()).abs().max() > 100 * tolerance  # re-found: not the found direction
    assert (third @ second).item() > 0  # signed to agree with the previous step's


def test_refind_iterations_honour_cancel_and_refuse_what_they_cannot_follow(host, found_for_refinding):
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    euler = comfy.samplers.sampler_object("euler")
    model, directions = found_for_refinding
    (refinding,) = node("ApplyRegionDirection", model=model, directions=directions, index=0, strength=1.0,
                        start_percent=0.0, end_percent=1.0, refind_iterations=2)
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            host.sample_with_weights(refinding, euler, None, steps=3, size=SIZE)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    latent = torch.randn(2, 4, SIZE, SIZE, generator=torch.manual_seed(1))
    with pytest.raises(ValueError, match="refind_iterations: re-finding follows one image, but the latent holds 2"):
        comfy.sample.sample_custom(refinding, torch.randn_like(latent), 2.0, euler,
                                   torch.tensor([sigma for sigma in (14.6, 3.0, 0.0)]), host.tiny_conditioning("p"),
                                   host.tiny_conditioning("n"), latent, disable_pbar=True, seed=0)
    unconfined, _ = find(host, model, quarter_mask(SIZE), iterations=1, confinement="none")
    with pytest.raises(ValueError, match="refind_iterations: re-finding runs the ratio search, but these directions "
                                         "were found with confinement none"):
        node("ApplyRegionDirection", model=model, directions=unconfined, index=0, strength=1.0, start_percent=0.0,
             end_percent=1.0, refind_iterations=2)


def test_the_example_workflow_runs_under_the_executor(host):
    host.TINY_MODEL_KIND["kind"] = "eps"
    prompt = host.load_workflow("region_direction_edit", 6)
    host.node_of(prompt, "RegionJacobianDirection")["inputs"]["iterations"] = 5
    # The graph builds its region relative to the image, so it runs as shipped on the tiny 64-pixel image.
    captured = host.run_prompt(prompt)
    assert torch.isfinite(captured["output"]["samples"]).all()


def run_subgraph(prompt, node_id, given):
    """Output 0 of ``node_id`` in an API prompt, running its inputs' nodes; ``given`` holds outputs by node id."""
    import nodes
    if node_id in given:
        return given[node_id]
    spec = prompt[node_id]
    inputs = {name: run_subgraph(prompt, value[0], given)[value[1]] if isinstance(value, list) else value
              for name, value in spec["inputs"].items()}
    cls = nodes.NODE_CLASS_MAPPINGS[spec["class_type"]]
    if hasattr(cls, "GET_SCHEMA"):  # a V3 node, run as the executor does: a clone holding its hidden inputs
        outputs = cls.PREPARE_CLASS_CLONE(None).execute(**inputs).result
    else:
        outputs = getattr(cls(), cls.FUNCTION)(**inputs)
    given[node_id] = outputs
    return outputs


@pytest.mark.parametrize("height, width", [(64, 64), (40, 72), (512, 512)])
def test_the_example_workflows_region_is_the_middle_half_of_any_image(host, height, width):
    """The mask the template builds, at any image size: a square placed in pixels failed on images of 128 or less."""
    prompt = host.load_workflow("region_direction_edit", 1)
    mask_source = host.node_of(prompt, "RegionJacobianDirection")["inputs"]["mask"]
    image_node = next(key for key, node in prompt.items() if node["class_type"] == "TinyImage")
    mask = run_subgraph(prompt, mask_source[0], {image_node: (torch.rand(1, height, width, 3),)})[mask_source[1]]
    assert mask.shape == (1, height, width) and set(mask.unique().tolist()) == {0.0, 1.0}
    rows, columns = mask[0].nonzero().unbind(1)
    # Nearest-neighbour scaling puts each edge of the middle half within a pixel of a quarter of the size.
    for indices, size in ((rows, height), (columns, width)):
        assert abs(indices.min().item() - size / 4) <= 1 and abs(indices.max().item() + 1 - 3 * size / 4) <= 1
    assert mask.sum().item() == (rows.max() - rows.min() + 1).item() * (columns.max() - columns.min() + 1).item()


def tiny_flux():
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    config = {"image_model": "flux", "guidance_embed": False, "in_channels": 16, "out_channels": 16,
              "vec_in_dim": 32, "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1,
              "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True,
              "txt_ids_dims": [], "dtype": torch.float32}
    base = comfy.supported_models.Flux(config).get_model({})
    return comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def test_a_dit_model_gets_a_clear_error(host):
    flux = tiny_flux()
    with pytest.raises(ValueError, match="model: Flux has no U-Net bottleneck.*SD1.x, SD2.x or SDXL"):
        find(host, flux, quarter_mask(SIZE))
    directions, _ = find(host, host.tiny_model("eps"), quarter_mask(SIZE), iterations=2)
    with pytest.raises(ValueError, match="model: Flux has no U-Net bottleneck"):
        node("ApplyRegionDirection", model=flux, directions=directions, index=0, strength=1.0, start_percent=0.0,
             end_percent=1.0)


def test_bad_input_is_refused_with_the_inputs_name(host):
    model = host.tiny_model("eps")
    with pytest.raises(ValueError, match="mask is empty"):
        find(host, model, torch.zeros(1, 8 * SIZE, 8 * SIZE))
    with pytest.raises(ValueError, match="mask covers the whole image"):
        find(host, model, torch.ones(1, 8 * SIZE, 8 * SIZE))
    with pytest.raises(ValueError, match="k must be at least 1"):
        find(host, model, quarter_mask(SIZE), k=0)
    with pytest.raises(ValueError, match="mask is 128x64 pixels"):
        find(host, model, torch.ones(1, 8 * SIZE, 4 * SIZE))
    directions, _ = find(host, model, quarter_mask(SIZE), iterations=2)
    with pytest.raises(ValueError, match="index 3: only 3 directions"):
        node("ApplyRegionDirection", model=model, directions=directions, index=3, strength=1.0, start_percent=0.0,
             end_percent=1.0)
    import comfy.samplers
    (patched,) = node("ApplyRegionDirection", model=model, directions=directions, index=0, strength=1.0,
                      start_percent=0.0, end_percent=1.0)
    with pytest.raises(ValueError, match="directions: found for a bottleneck of shape"):
        host.sample_with_weights(patched, comfy.samplers.sampler_object("euler"), None, steps=2, size=8)


@pytest.mark.parametrize("confinement, total", [("ratio", 3), ("rank1", 6)])
def test_the_search_reports_progress_to_its_last_iteration_and_honours_cancel(host, confinement, total):
    model = host.tiny_model("eps")
    assert host.progress_updates_and_cancel(lambda: find(host, model, quarter_mask(SIZE), iterations=3, k=2,
                                                         confinement=confinement)) == total


def tiny_model_in(host, dtype):
    """The tiny U-Net of ``host.tiny_model("eps")`` (same weights) stored and run in ``dtype``."""
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    config = comfy.supported_models.SD15({**host.TINY_UNET_CONFIG, "dtype": dtype})
    base = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS)
    host.init_weights(base.diffusion_model, 0)
    base.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def abs_cosines(a, b):
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return (a * b).sum(1).abs() / (a.norm(dim=1) * b.norm(dim=1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_unets_find_the_fp32_directions(host, dtype):
    # The same 4 iterations from the same start: rounding is all that differs (measured |cos| 1.0000 for fp16 and
    # 0.9992 for bf16 after 200 iterations).
    reference, _ = find(host, tiny_model_in(host, torch.float32), quarter_mask(SIZE), k=1, iterations=4)
    directions, preview = find(host, tiny_model_in(host, dtype), quarter_mask(SIZE), k=1, iterations=4)
    assert torch.isfinite(directions.vectors).all() and torch.isfinite(preview).all()
    assert directions.vectors.dtype == torch.float32
    cosine = abs_cosines(directions.vectors, reference.vectors)[0].item()
    print(f"{dtype}: |cos| with fp32 {cosine:.4f}, {directions.iterations} iterations, converged {directions.converged}")
    assert cosine >= 0.99


def test_a_controlnet_on_positive_reaches_the_bottleneck_function(host):
    import nodes
    model = host.tiny_model("eps")
    hint = torch.rand(1, 8 * SIZE, 8 * SIZE, 3, generator=torch.Generator().manual_seed(2))
    controlled, _ = nodes.ControlNetApplyAdvanced().apply_controlnet(
        host.tiny_conditioning("p"), host.tiny_conditioning("n"), host.tiny_controlnet(), hint, 1.0, 0.0, 1.0)
    plain, _ = find(host, model, quarter_mask(SIZE), k=1, iterations=5)
    with_control, _ = find(host, model, quarter_mask(SIZE), k=1, iterations=5, positive=controlled)
    print(f"|cos| with and without the ControlNet: {abs_cosines(plain.vectors, with_control.vectors)[0].item():.4f}")
    assert abs_cosines(plain.vectors, with_control.vectors)[0].item() < 0.99
    # Outside the ControlNet's percent range it adds nothing, and the directions are the plain ones.
    inactive, _ = nodes.ControlNetApplyAdvanced().apply_controlnet(
        host.tiny_conditioning("p"), host.tiny_conditioning("n"), host.tiny_controlnet(), hint, 1.0, 0.9, 1.0)
    assert torch.equal(find(host, model, quarter_mask(SIZE), k=1, iterations=5, positive=inactive)[0].vectors,
                       plain.vectors)
    # Re-finding during sampling would pre_run and clean up the ControlNet the sampler is using: refused.
    with pytest.raises(ValueError, match="refind_iterations: re-finding during sampling does not support a ControlNet"):
        node("ApplyRegionDirection", model=model, directions=with_control, index=0, strength=1.0, start_percent=0.0,
             end_percent=1.0, refind_iterations=2)
    node("ApplyRegionDirection", model=model, directions=with_control, index=0, strength=1.0, start_percent=0.0,
         end_percent=1.0, refind_iterations=0)


@pytest.mark.parametrize("confinement", ["ratio", "rank1", "none"])
def test_each_confinement_reports_its_values_iterations_and_convergence(host, confinement):
    directions, _ = find(host, host.tiny_model("eps"), quarter_mask(SIZE), k=2, iterations=10,
                         confinement=confinement, ridge=1.0)
    assert directions.confinement == confinement and directions.iterations >= 1
    text = directions.summary()
    print(text)
    name = "ratio" if confinement == "ratio" else "singular value"
    state = "converged" if directions.converged else "NOT converged"
    assert f"{directions.iterations} iterations, {state}" in text and text.count(f": {name} ") == 2
    if confinement == "ratio":
        none, _ = find(host, host.tiny_model("eps"), quarter_mask(SIZE), k=2, iterations=10, confinement="none")
        assert directions.leakage[0] < none.leakage[0]


def test_a_latent_too_small_for_the_unet_is_refused_naming_the_latent(host):
    model = host.tiny_model("eps")
    mask = torch.zeros(1, 8, 8)
    mask[:, :4, :4] = 1.0
    with pytest.raises(ValueError, match="latent: 1x1 latent pixels is too small for this U-Net"):
        find(host, model, mask, latent={"samples": torch.randn(1, 4, 1, 1)})


def test_products_in_chunks_find_the_same_directions_and_copy_only_the_blocks_after_the_bottleneck(host, monkeypatch):
    """With one vector per pass (as when memory is short) the directions are the unchunked ones.

    Each product is the same float32 sum in another batch, so it differs by rounding only, about
    1e-7 relative; 5 iterations amplify that by at most the inverse relative gap of the top
    ratios per iteration (well under 100 on this model), far below the 1e-3 allowed. Only the
    output blocks' norm weights are copied for autograd: their linear and conv layers keep a reference, and the
    encoder's weights are the model's own storage.
    """
    region = host.pack_module("nodes.region_jacobian")
    with torch.inference_mode():
        model = host.tiny_model("eps")
        whole, _ = find(host, model, quarter_mask(SIZE), iterations=5)
        sizes = []
        sizing = region.items_per_call
        monkeypatch.setattr(region, "items_per_call", lambda *a, **k: sizes.append(sizing(*a, **k)) or 1)
        chunked, _ = find(host, model, quarter_mask(SIZE), iterations=5)
        originals = dict(model.model.diffusion_model.named_parameters())
        used = region.jacobian_weights(model.model.diffusion_model)
    assert sizes[0] > 1  # the tiny model fits every vector at once on this machine, so the override chunks
    torch.testing.assert_close(chunked.vectors, whole.vectors, rtol=0, atol=1e-3)
    copied = {name for name, tensor in originals.items() if used[name].data_ptr() != tensor.data_ptr()}
    diffusion_model = model.model.diffusion_model
    assert copied == {name for name in originals if name.startswith(region.AFTER_BOTTLENECK) and not isinstance(
        diffusion_model.get_submodule(name.rpartition(".")[0]), (torch.nn.Linear, torch.nn.Conv2d))} and copied


def test_the_products_with_blocked_attention_equal_autograd_through_the_hosts_attention(host, monkeypatch):
    """The JVP and VJP the search uses, with attention in blocks of 16 rows, against ComfyUI's own attention.

    Both are exact float32 derivatives of the same function: they differ only in the order of the
    attention's sums and in the softmax's formula, a few ulps (6e-8 relative) per attention, carried
    through the tiny U-Net's output blocks (about 40 layers, each amplifying a relative error by at
    most its gain, O(1) after GroupNorm). That bounds the products' relative difference by about
    40 x 10 x 6e-8 = 2.4e-5, under the 1e-4 allowed; a wrong derivative (a dropped term) is off by O(1).
    """
    region = host.pack_module("nodes.region_jacobian")
    core = host.pack_module("ngdm_core.region_jacobian")
    monkeypatch.setattr(region, "rows_per_block", lambda *_: 16)  # 256 tokens: 16 blocks per self-attention
    generator = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        model = host.tiny_model("eps")
        x = model.model.process_latent_in(torch.randn(1, 4, SIZE, SIZE, generator=generator))
        f, h = region.bottleneck_function(model, x, 3.0, host.tiny_conditioning("p"))
        vectors = torch.randn(2, *h.shape[1:], generator=generator)
        covectors = torch.randn(2, 1, 4, SIZE, SIZE, generator=generator)
        products = []
        for attention in ("blocked", "host"):
            if attention == "host":  # read by each call of f, so f itself now runs ComfyUI's attention
                monkeypatch.setattr(region, "blocked_attention_override", lambda own, *args, **kwargs: own(*args,
                                                                                                            **kwargs))
            linearisation = core.Linearisation(f, h)
            products.append((linearisation.eps, linearisation.jvp(vectors), linearisation.vjp(covectors)))
    for blocked, exact in zip(*products):
        assert ((blocked - exact).norm() / exact.norm()).item() < 1e-4
