import pytest
import torch

from ngdm_core import GaussianDenoiser, sample_per_pixel_time, weight_map
from ngdm_core.validation import require_finite_tensor, require_unit_interval

SHAPE = (2, 4, 8, 8)


def inputs():
    generator = torch.Generator().manual_seed(0)
    source = torch.randn(SHAPE, generator=generator)
    noise = torch.randn(SHAPE, generator=generator)
    weights = torch.rand(SHAPE[0], 1, *SHAPE[2:], generator=generator)
    denoiser = GaussianDenoiser({"a": torch.zeros(4, 8, 8), "b": torch.ones(4, 8, 8)})
    return denoiser, source, weights, torch.tensor([5.0, 1.0, 0.0]), noise


@pytest.mark.parametrize("weights,message", [
    (torch.zeros(2, 1, 8, 4), "weights is"),
    (torch.zeros(3, 1, 8, 8), "weights has batch 3"),
    (torch.zeros(2, 3, 8, 8), "weights has 3 channels"),
    (torch.zeros(2, 8, 8), "weights has shape"),
    (torch.full((2, 1, 8, 8), float("nan")), "weights contains NaN"),
    (torch.full((2, 1, 8, 8), float("inf")), "weights contains NaN or inf"),
    (torch.full((2, 1, 8, 8), 1.5), r"weights must lie in \[0, 1\]"),
])
def test_bad_weight_maps_are_refused(weights, message):
    denoiser, source, _, sigmas, noise = inputs()
    with pytest.raises(ValueError, match=message):
        sample_per_pixel_time(denoiser, source, weights, sigmas, noise, cond="b")


@pytest.mark.parametrize("sigmas,message", [
    (torch.tensor([]), "sigmas must hold at least two"),
    (torch.tensor([3.0]), "sigmas must hold at least two"),
    (torch.tensor([1.0, 2.0, 0.0]), "sigmas must be non-increasing"),
    (torch.tensor([1.0, float("nan")]), "sigmas contains NaN"),
])
def test_bad_schedules_are_refused(sigmas, message):
    denoiser, source, weights, _, noise = inputs()
    with pytest.raises(ValueError, match=message):
        sample_per_pixel_time(denoiser, source, weights, sigmas, noise, cond="b")


def test_nan_source_and_mismatched_noise_are_refused():
    denoiser, source, weights, sigmas, noise = inputs()
    with pytest.raises(ValueError, match="source contains NaN"):
        sample_per_pixel_time(denoiser, source * float("nan"), weights, sigmas, noise, cond="b")
    with pytest.raises(ValueError, match="noise has shape"):
        sample_per_pixel_time(denoiser, source, weights, sigmas, noise[:1], cond="b")


@pytest.mark.parametrize("options,message", [
    ({"a": 0.0}, "a must be positive"),
    ({"a": -2.0}, "a must be positive"),
    ({"b": float("nan")}, "b must be a finite number"),
    ({"b": float("inf")}, "b must be a finite number"),
    ({"num_maps": 0}, "number of maps must be at least 1"),
    ({"sigma": 0.0}, "sigma must be positive"),
    ({"smoothing": -1.0}, "smoothing must be non-negative"),
    ({"mode": "hard"}, "mode must be one of"),
])
def test_bad_weight_map_knobs_are_refused_before_any_model_call(options, message):
    denoiser, source, *_ = inputs()
    with pytest.raises(ValueError, match=message):
        weight_map(denoiser, source, "a", "b", **{"sigma": 1.0, **options})
    assert denoiser.calls == 0


def test_inputs_are_not_mutated():
    denoiser, source, weights, sigmas, noise = inputs()
    originals = [t.clone() for t in (source, weights, sigmas, noise)]
    sample_per_pixel_time(denoiser, source, weights, sigmas, noise, cond="b")
    weight_map(denoiser, source, "a", "b", sigma=1.0, num_maps=3)
    for before, after in zip(originals, (source, weights, sigmas, noise)):
        assert torch.equal(before, after)


def test_finite_checks_see_every_nan_and_inf_and_no_overflow():
    values = torch.full((4096,), 6e4, dtype=torch.float16)  # finite, but the sum overflows
    require_finite_tensor("values", values)
    for bad in (float("nan"), float("inf"), -float("inf")):
        spoiled = values.clone()
        spoiled[1234] = bad
        with pytest.raises(ValueError, match="values contains NaN or inf"):
            require_finite_tensor("values", spoiled)
        unit = torch.rand(64)
        unit[7] = bad
        with pytest.raises(ValueError, match="unit contains NaN or inf"):
            require_unit_interval("unit", unit)
    with pytest.raises(ValueError, match=r"unit must lie in \[0, 1\], got values in \[-0.5, 0.5\]"):
        require_unit_interval("unit", torch.tensor([0.5, -0.5]))
