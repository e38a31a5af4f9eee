"""Region Jacobian directions on the shipped shapes model, in pure Python (ngdm_core.shapes.region)."""

import pytest
import torch

from ngdm_core.shapes import region
from ngdm_core.shapes.data import HELD_OUT_SEED, make_batch
from ngdm_core.shapes.edits import EditSettings, sdedit, truncated_sigmas
from ngdm_core.shapes.model import load_denoiser

SETTINGS = EditSettings(steps=10, cfg=3.0)
EDIT_STRENGTH = 0.5  # of the schedule: sigma 2.98, 5 of the 10 steps


@pytest.fixture(scope="module")
def denoiser():
    return load_denoiser()


@pytest.fixture(scope="module")
def source():
    batch = make_batch(HELD_OUT_SEED, 1)
    return batch.images, batch.labels, batch.masks


def test_the_split_forward_and_an_identity_hook_give_bit_identical_eps(denoiser):
    unet = denoiser.unet
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 32, 32, generator=generator)
    t, labels = torch.tensor([5.0, 400.5, 999.0]), torch.tensor([0, 2, 3])
    with torch.no_grad():
        eps = unet(x, t, labels)
        assert torch.equal(unet(x, t, labels, bottleneck=lambda h, _: h), eps)
        assert torch.equal(unet.decode(*unet.encode(x, t, labels)), eps)


def test_the_bottleneck_function_is_the_denoisers_eps(denoiser, source):
    images, labels, _ = source
    x, sigma = region.edit_start(denoiser, images, SETTINGS, EDIT_STRENGTH)
    f, h = region.bottleneck_function(denoiser, x, sigma, labels)
    assert h.shape == (1, 64, 8, 8)
    with torch.no_grad():
        expected = denoiser.eps(x / (1 + sigma**2).sqrt(), sigma.reshape(1), labels)
        assert torch.equal(f(h), expected)


def test_a_shift_applies_only_in_its_sigma_range_and_strength_zero_is_the_plain_edit(denoiser, source):
    images, labels, _ = source
    direction = torch.randn(64, 8, 8, generator=torch.Generator().manual_seed(1))
    plain = sdedit(denoiser, images, labels, SETTINGS, EDIT_STRENGTH)
    assert torch.equal(region.region_edit(denoiser, images, labels, direction, 0.0, SETTINGS, EDIT_STRENGTH), plain)
    x, sigma = torch.zeros(1, 3, 32, 32), torch.tensor([1.0])
    inactive = region.shifted_denoiser(denoiser, direction, 10.0, sigma_low=2.0, sigma_high=5.0)
    active = region.shifted_denoiser(denoiser, direction, 10.0, sigma_low=0.5, sigma_high=5.0)
    assert torch.equal(inactive(x, sigma, labels), denoiser(x, sigma, labels))
    assert not torch.equal(active(x, sigma, labels), denoiser(x, sigma, labels))
    with pytest.raises(ValueError, match="sigma_low"):
        region.shifted_denoiser(denoiser, direction, 1.0, sigma_low=3.0, sigma_high=2.0)


def test_the_ratio_direction_leaks_less_than_the_unconfined_one_in_an_actual_edit(denoiser, source):
    images, labels, masks = source
    plain = sdedit(denoiser, images, labels, SETTINGS, EDIT_STRENGTH)
    leakage = {}
    for confinement in ("ratio", "none"):
        found = region.find_directions(denoiser, images, labels, masks, SETTINGS, EDIT_STRENGTH, k=1,
                                       confinement=confinement)
        assert found.converged
        edited = region.region_edit(denoiser, images, labels, found.vectors[0], 10.0, SETTINGS, EDIT_STRENGTH)
        leakage[confinement], inside = (value.item() for value in region.edit_leakage(edited, plain, masks))
        assert inside > 0.1  # a visible edit: RMS change per inside pixel value, images in [-1, 1]
    print(f"\nleakage at shift 10: ratio {leakage['ratio']:.3f}, none {leakage['none']:.3f} "
          f"({leakage['none'] / leakage['ratio']:.2f}x)")
    assert leakage["ratio"] * 1.5 <= leakage["none"]


def test_a_trajectory_probe_at_the_first_step_alone_is_the_first_states_function_scaled_by_its_sigma(denoiser, source):
    images, labels, masks = source
    sigma = truncated_sigmas(denoiser, SETTINGS, EDIT_STRENGTH)[0]
    at_start = region.find_directions(denoiser, images, labels, masks, SETTINGS, EDIT_STRENGTH, k=2,
                                      confinement="none")
    # One probe stands for every step: its weight is the whole fall in sigma, from sigma to 0.
    probed = region.find_directions(denoiser, images, labels, masks, SETTINGS, EDIT_STRENGTH, probe_steps=(0,), k=2,
                                    confinement="none")
    cosines = (at_start.vectors * probed.vectors).flatten(1).sum(dim=1).abs()
    assert (cosines >= 0.999).all()
    torch.testing.assert_close(probed.values, sigma * at_start.values, rtol=1e-3, atol=0)
    with pytest.raises(ValueError, match="probe_steps must be step indices from 0 to 4"):
        region.trajectory_function(denoiser, images, labels, SETTINGS, EDIT_STRENGTH, (0, 5))


@pytest.mark.parametrize("level, power", [("sigma", 0.0), ("sigma", 1.0), ("sigma", 2.0), ("sigma", -1.0),
                                          ("timestep", 1.0)])
def test_a_strength_schedule_gives_the_edit_the_constant_shifts_total_and_scales_by_its_level(denoiser, level, power):
    sigmas = truncated_sigmas(denoiser, SETTINGS, EDIT_STRENGTH)
    weights = region.strength_schedule(denoiser, sigmas, level, power)(denoiser.timestep(sigmas[:-1]))
    falls = sigmas[:-1] - sigmas[1:]
    # Float32 sums of 5 positive terms: a relative rounding of a few 1e-7.
    torch.testing.assert_close((weights * falls).sum(), falls.sum(), rtol=1e-5, atol=0)
    if power == 0:
        assert torch.equal(weights, torch.ones(5))
    if level == "sigma":
        # Against the steps' own sigmas: the round trip through the timestep is float32 log-linear
        # interpolation, about 1e-6 relative, raised to |power| <= 2.
        torch.testing.assert_close(weights / weights[0], (sigmas[:-1] / sigmas[0]) ** power, rtol=1e-4, atol=0)
    else:
        # The 10-step schedule's timesteps are 999 - 111 i exactly: its last 5 steps fall 4:3:2:1:0.
        torch.testing.assert_close(weights / weights[0], torch.tensor([1, 0.75, 0.5, 0.25, 0]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="level must be one of"):
        region.strength_schedule(denoiser, sigmas, "step", 1.0)


def test_a_weighted_shift_is_the_shift_scaled_by_its_weight(denoiser):
    direction = torch.randn(64, 8, 8, generator=torch.Generator().manual_seed(1))
    x, sigma, labels = torch.zeros(1, 3, 32, 32), torch.tensor([1.0]), torch.tensor([0])
    halved = region.shifted_denoiser(denoiser, direction, 10.0, weight=lambda t: torch.full_like(t, 0.5))
    assert torch.equal(halved(x, sigma, labels), region.shifted_denoiser(denoiser, direction, 5.0)(x, sigma, labels))


def test_reprojection_without_iterations_is_the_fixed_directions_edit_and_with_them_keeps_the_sign(denoiser, source):
    images, labels, masks = source
    first = region.find_directions(denoiser, images, labels, masks, SETTINGS, EDIT_STRENGTH, k=1, ridge=2.0)
    fixed = region.region_edit(denoiser, images, labels, first.vectors[0], 10.0, SETTINGS, EDIT_STRENGTH)
    edit = (denoiser, images, labels, masks, first.search, 10.0, SETTINGS, EDIT_STRENGTH)
    still = region.reprojected_edit(*edit, iterations=0, ridge=2.0)
    assert torch.equal(still.image, fixed) and still.products == 0
    turned = region.reprojected_edit(*edit, iterations=1, ridge=2.0)
    directions = turned.directions.flatten(1)
    assert torch.equal(turned.directions[0], first.vectors[0])
    torch.testing.assert_close(directions.norm(dim=1), torch.ones(5))
    cosines = (directions[1:] * directions[:-1]).sum(dim=1)
    assert (cosines >= 0).all() and (cosines < 1 - 1e-4).any() and not torch.equal(turned.image, fixed)
    # Each of the 4 later steps: JVPs of 6 random and 6 start rows, a VJP of 12 covectors, and the
    # 6 residuals' JVP unless the first check already met the tolerance.
    assert 4 * 24 <= turned.products <= 4 * 30
