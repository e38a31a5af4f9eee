"""Masked sampling (ComfyUI's SetLatentNoiseMask + KSampler, the users' baseline) and the soft, averaged change map."""

import pytest
import torch

from ngdm_core import GaussianDenoiser, sample_masked, sample_per_pixel_time
from ngdm_core.change_map import change_weight_map, change_weights

SHAPE = (2, 4, 8, 8)
SIGMAS = torch.tensor([14.6146, 7.0, 3.5, 1.8, 0.9, 0.45, 0.2, 0.08, 0.0])


def setup():
    generator = torch.Generator().manual_seed(0)
    source, noise = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)
    denoiser = GaussianDenoiser({"target": torch.full(SHAPE[1:], 2.0)}, std=0.5)
    return source, noise, denoiser


def test_with_a_binary_mask_masked_sampling_is_ngdm():
    source, noise, denoiser = setup()
    mask = (torch.rand(SHAPE[0], 1, *SHAPE[2:], generator=torch.Generator().manual_seed(1)) > 0.5).float()
    masked = sample_masked(denoiser, source, mask, SIGMAS, noise, "target")
    ngdm = sample_per_pixel_time(denoiser, source, mask, SIGMAS, noise, "target")
    assert torch.equal(masked, ngdm)
    assert torch.equal(masked[(mask == 0).expand_as(source)], source[(mask == 0).expand_as(source)])


def test_a_soft_mask_blends_at_every_step_instead_of_starting_late():
    source, noise, denoiser = setup()
    mask = torch.full((SHAPE[0], 1, *SHAPE[2:]), 0.5)
    predictions = []

    def recorded(x, sigma, cond):
        predictions.append(denoiser(x, sigma, cond))
        return predictions[-1]

    masked = sample_masked(recorded, source, mask, SIGMAS, noise, "target")
    ngdm = sample_per_pixel_time(denoiser, source, mask, SIGMAS, noise, "target")
    # The last step lands on the blended prediction: half the model's, half the source.
    assert torch.allclose(masked, 0.5 * predictions[-1] + 0.5 * source, atol=1e-6)
    assert (masked - source).abs().mean() > 0.1
    assert (masked - ngdm).abs().max() > 0.1


def test_the_max_denoise_start_scales_the_noise_by_sqrt_one_plus_sigma_squared():
    source, noise, denoiser = setup()
    starts = []
    for max_denoise in (False, True):
        sample_masked(denoiser, source, torch.ones(SHAPE[0], 1, *SHAPE[2:]), SIGMAS, noise, "target",
                      callback=lambda info: starts.append(info["x"]) if info["i"] == 0 else None,
                      max_denoise=max_denoise)
    assert torch.allclose(starts[0], source + SIGMAS[0] * noise)
    assert torch.allclose(starts[1], source + (1 + SIGMAS[0] ** 2).sqrt() * noise)


def test_masked_sampling_refuses_a_mask_outside_the_unit_interval():
    source, noise, denoiser = setup()
    with pytest.raises(ValueError, match="mask"):
        sample_masked(denoiser, source, torch.full((SHAPE[0], 1, *SHAPE[2:]), 1.5), SIGMAS, noise, "target")


def ring_change():
    """A source and an edit that changes a ring (strongly on its left half, weakly on its right), enclosing an unchanged hole."""
    source = torch.zeros(1, 3, 16, 16)
    edited = source.clone()
    edited[..., 3:13, 3:13] = 1.0
    edited[..., 3:13, 8:13] = 0.5
    edited[..., 6:10, 6:10] = 0.0
    return source, edited


def test_a_soft_change_map_is_graded_by_the_size_of_the_change_and_fills_what_the_change_encloses():
    source, edited = ring_change()
    binary = change_weights(source, edited, smoothing=0.0, threshold=0.2)
    soft = change_weights(source, edited, smoothing=0.0, threshold=0.2, softness=0.5)
    assert set(binary.unique().tolist()) == {0.0, 1.0}
    # Normalised change 1 on the left, 0.5 on the right: (A - 0.2) / 0.5 clamps to 1, and gives 0.6.
    assert torch.allclose(soft[..., 3:13, 3:6], torch.ones(1, 1, 10, 3))
    assert torch.allclose(soft[..., 3:6, 10:13], torch.full((1, 1, 3, 3), 0.6))
    assert torch.equal(soft[..., 7:9, 7:9], torch.ones(1, 1, 2, 2))  # enclosed, unchanged: filled
    assert torch.equal((soft > 0).float(), binary)  # the same support as the binary map


def test_averaged_edits_keep_what_every_edit_changed_and_halve_what_one_alone_did():
    source, edited = ring_change()
    other = source.clone()
    other[..., 3:13, 3:13] = 1.0
    other[..., 6:10, 6:10] = 0.0
    other[..., 0:2, 0:2] = 1.0  # a change only this edit makes
    both = change_weights(source, torch.cat([edited, other]), smoothing=0.0, threshold=0.6)
    alone = change_weights(source, other, smoothing=0.0, threshold=0.6)
    assert alone[..., 0:2, 0:2].eq(1).all() and both[..., 0:2, 0:2].eq(0).all()
    assert both[..., 3:13, 3:6].eq(1).all()
    with pytest.raises(ValueError, match="edited has shape"):
        change_weights(source, torch.cat([edited, edited, edited])[:, :, :15], smoothing=0.0)


def test_several_edits_run_as_one_batch_and_cost_two_evaluations_per_step_each():
    source, _, denoiser = setup()
    rows = []

    def counted(x, sigma, cond):
        rows.append(x.shape[0])
        return denoiser(x, sigma, cond)

    weights = change_weight_map(counted, source, "target", "target", SIGMAS[-4:], edits=3, softness=0.2,
                                generator=torch.Generator().manual_seed(0))
    assert rows == [3 * SHAPE[0]] * 6
    assert weights.shape == (SHAPE[0], 1, *SHAPE[2:])
    # The same condition edits nothing, whatever the number of edits.
    assert torch.equal(weights, torch.zeros_like(weights))
