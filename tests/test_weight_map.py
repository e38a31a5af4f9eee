import torch

from ngdm_core import GaussianDenoiser, classifier_free_guidance, weight_map
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
