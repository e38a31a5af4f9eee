import torch

from ngdm_core import GaussianDenoiser, classifier_free_guidance, weight_map
from ngdm_core.change_map import change_weight_map, fill_holes
from ngdm_core.ngdm import gaussian_blur

SIZE = 32
REGION = (slice(9, 21), slice(6, 22))


def region_mask():
    mask = torch.zeros(1, 1, SIZE, SIZE, dtype=torch.bool)
    mask[(0, 0, *REGION)] = True
    return mask


def prompts_differing_in_region():
    base = torch.randn(4, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    target = base.clone()
    target[(slice(None), *REGION)] += 1.5
    return GaussianDenoiser({"source": base, "target": target, "negative": torch.zeros(4, SIZE, SIZE)}, std=0.8)


def iou(a, b):
    return ((a & b).sum() / (a | b).sum()).item()


def source_latent():
    return torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(2))


def test_binarised_ngdm_map_finds_the_region_where_the_prompts_differ():
    denoiser = prompts_differing_in_region()
    guided = classifier_free_guidance(denoiser, "negative", 7.5)
    weights = weight_map(guided, source_latent(), "source", "target", sigma=1.0, num_maps=10, smoothing=1.0)
    assert weights.shape == (1, 1, SIZE, SIZE)
    assert 0 < weights.min() and weights.max() < 1
    assert iou(weights > 0.5, region_mask()) >= 0.9
    assert weights[region_mask()].mean() > 0.9 > 0.1 > weights[~region_mask()].mean()


def test_diffedit_mode_is_binary_and_finds_the_region():
    weights = weight_map(prompts_differing_in_region(), source_latent(), "source", "target", sigma=1.0, mode="diffedit")
    assert set(weights.unique().tolist()) == {0.0, 1.0}
    assert iou(weights > 0.5, region_mask()) >= 0.9


def test_all_seeds_go_through_one_batched_call_per_prompt():
    denoiser = prompts_differing_in_region()
    source = torch.cat([source_latent(), source_latent()])
    batched = weight_map(denoiser, source, "source", "target", sigma=1.0, num_maps=10)
    assert denoiser.batch_sizes == [20, 20]
    chunked_denoiser = prompts_differing_in_region()
    chunked = weight_map(chunked_denoiser, source, "source", "target", sigma=1.0, num_maps=10, max_batch=4)
    assert chunked_denoiser.batch_sizes == [8, 8, 8, 8, 4, 4]
    assert torch.allclose(batched, chunked, atol=1e-6)


def test_progress_reports_every_model_call():
    reports = []
    weight_map(prompts_differing_in_region(), source_latent(), "source", "target", sigma=1.0, num_maps=5, max_batch=2,
               progress=lambda done, total: reports.append((done, total)))
    assert reports == [(i, 6) for i in range(1, 7)]


def test_identical_prompts_give_the_floor_everywhere():
    weights = weight_map(prompts_differing_in_region(), source_latent(), "source", "source", sigma=1.0, b=5.0)
    assert torch.allclose(weights, torch.full_like(weights, torch.sigmoid(torch.tensor(-5.0)).item()))


def test_same_seed_same_map_and_larger_a_gives_more_noise():
    denoiser = prompts_differing_in_region()
    # A nonlinear denoiser makes the map depend on the noise, so the seed matters.
    def curved(x, sigma, cond):
        return torch.tanh(denoiser(x, sigma, cond) * 0.7)

    source = source_latent()
    first = weight_map(curved, source, "source", "target", sigma=2.0, seed=3)
    assert torch.equal(first, weight_map(curved, source, "source", "target", sigma=2.0, seed=3))
    assert not torch.equal(first, weight_map(curved, source, "source", "target", sigma=2.0, seed=4))
    assert (weight_map(curved, source, "source", "target", sigma=2.0, seed=3, a=14.0) >= first).all()


def test_the_blur_treats_every_plane_alike_in_4d_and_5d():
    image = torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(0))
    blurred = gaussian_blur(image, 1.5)
    for channel in range(3):
        assert torch.allclose(blurred[:, channel:channel + 1], gaussian_blur(image[:, channel:channel + 1], 1.5))
    assert torch.allclose(gaussian_blur(torch.full((1, 2, 5, 5), 0.7), 1.5), torch.full((1, 2, 5, 5), 0.7))
    assert torch.equal(gaussian_blur(image.unsqueeze(2), 1.5), blurred.unsqueeze(2))


def test_zero_floor_is_exactly_zero_where_the_prompts_agree_and_one_at_the_peak():
    denoiser = prompts_differing_in_region()
    paper = weight_map(denoiser, source_latent(), "source", "target", sigma=1.0, smoothing=0.0)
    floored = weight_map(denoiser, source_latent(), "source", "target", sigma=1.0, smoothing=0.0, zero_floor=True)
    least, most = paper == paper.min(), paper == paper.max()
    assert paper.min() > 0 and floored[least].eq(0).all() and torch.allclose(floored[most], torch.ones(1))
    # The same map, affinely rescaled: order kept, and the paper's floor removed.
    low, high = torch.sigmoid(torch.tensor(-5.0)), torch.sigmoid(torch.tensor(5.0))
    assert torch.allclose(floored, (paper - low) / (high - low), atol=1e-6)
    same = weight_map(denoiser, source_latent(), "source", "source", sigma=1.0, zero_floor=True)
    assert torch.equal(same, torch.zeros_like(same))


def test_the_conditional_only_map_equals_the_guided_one_for_half_the_calls():
    denoiser = prompts_differing_in_region()
    guided_calls = []

    def counted(x, sigma, cond):
        guided_calls.append(x.shape[0])
        return denoiser(x, sigma, cond)

    for mode in ("ngdm", "diffedit"):
        guided = weight_map(classifier_free_guidance(counted, "negative", 7.5), source_latent(), "source", "target",
                            sigma=1.0, mode=mode, zero_floor=True)
        conditional = weight_map(counted, source_latent(), "source", "target", sigma=1.0, mode=mode, zero_floor=True)
        assert torch.allclose(guided, conditional, atol=1e-5)
    assert guided_calls == [10] * 4 + [10] * 2 + [10] * 4 + [10] * 2


def test_fill_holes_fills_enclosed_zeros_and_leaves_the_ones_touching_the_border():
    ring = torch.zeros(1, 1, 9, 9)
    ring[..., 2:7, 2:7] = 1
    ring[..., 3:6, 3:6] = 0
    filled = fill_holes(ring)
    assert torch.equal(filled[..., 2:7, 2:7], torch.ones(1, 1, 5, 5))
    assert filled.sum() == 25
    open_ring = ring.clone()
    open_ring[..., 4, 2:4] = 0  # a gap to the outside: nothing enclosed is left
    assert torch.equal(fill_holes(open_ring), open_ring)
    assert torch.equal(fill_holes(ring.unsqueeze(2)), filled.unsqueeze(2))


def test_the_change_map_covers_the_union_of_the_old_and_new_object_on_the_shapes_model():
    from ngdm_core.shapes.data import HELD_OUT_SEED, make_batch, other_class
    from ngdm_core.shapes.edits import iou as soft_iou
    from ngdm_core.shapes.model import load_denoiser

    count, steps = 20, 20
    denoiser = load_denoiser()
    sources = make_batch(HELD_OUT_SEED, count)
    targets = other_class(sources.labels)
    union = torch.maximum(sources.masks, make_batch(HELD_OUT_SEED, count, shapes=targets.tolist()).masks)
    calls = []

    def counted(x, sigma, cond):
        calls.append(x.shape[0])
        return denoiser(x, sigma, cond)

    weights = change_weight_map(classifier_free_guidance(counted, None, 3.0), sources.images, sources.labels, targets,
                                denoiser.sigmas(steps), generator=torch.Generator().manual_seed(0))
    overlap = soft_iou(weights, union).mean().item()
    prompt_map = weight_map(classifier_free_guidance(denoiser, None, 3.0), sources.images, sources.labels, targets,
                            sigma=denoiser.sigma_at(0.5), zero_floor=True)
    prompt_overlap = soft_iou(prompt_map, union).mean().item()
    print(f"\nchange map IoU with the union on {count} held-out sources: {overlap:.3f} "
          f"({len(calls)} evaluations per item); prompt-difference map (zero floor): {prompt_overlap:.3f} "
          f"(40 evaluations)")
    assert set(weights.unique().tolist()) <= {0.0, 1.0}
    assert len(calls) == 4 * steps
    assert overlap >= 0.6
    assert overlap > prompt_overlap  # the reason change mode exists: it finds the edited region better
