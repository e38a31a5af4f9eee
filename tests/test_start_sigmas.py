import math

import pytest
import torch

from ngdm_core.ngdm import linear_start_sigmas, power_law_start_sigmas, start_sigmas, started
from ngdm_core.schedule import flow_to_vp_sigma, linear_beta_sigma, linear_beta_start_time, vp_to_flow_sigma

WEIGHTS = torch.linspace(0, 1, 201, dtype=torch.float64)


def test_sigma_form_equals_the_papers_eq8_for_the_linear_beta_schedule():
    for t_max in (1.0, 0.7, 0.3):
        sigma_max = linear_beta_sigma(torch.tensor(t_max, dtype=torch.float64))
        from_eq8 = linear_beta_sigma(linear_beta_start_time(WEIGHTS, t_max))
        from_sigma_form = power_law_start_sigmas(WEIGHTS, sigma_max)
        assert torch.allclose(from_sigma_form, from_eq8, rtol=1e-6, atol=1e-9)


def test_weight_zero_starts_at_the_end_and_weight_one_at_the_first_sigma():
    for parametrization, sigma_max in (("vp", 14.6146), ("vp", 3.0), ("flow", 1.0), ("flow", 0.75)):
        start = power_law_start_sigmas(torch.tensor([0.0, 1.0]), sigma_max, parametrization)
        assert start[0].item() == 0.0
        assert start[1].item() == torch.tensor(sigma_max, dtype=torch.float32).item()


def test_start_is_monotone_in_the_weight():
    for parametrization, sigma_max in (("vp", 14.6146), ("flow", 1.0), ("flow", 0.6)):
        start = power_law_start_sigmas(WEIGHTS, sigma_max, parametrization)
        assert (start[1:] > start[:-1]).all(), parametrization


def test_flow_mapping_round_trips():
    s = torch.linspace(0, 0.999, 1000, dtype=torch.float64)
    assert torch.allclose(vp_to_flow_sigma(flow_to_vp_sigma(s)), s, rtol=0, atol=1e-12)
    sigma = torch.logspace(-3, 3, 100, dtype=torch.float64)
    assert torch.allclose(flow_to_vp_sigma(vp_to_flow_sigma(sigma)), sigma, rtol=1e-9)
    assert vp_to_flow_sigma(torch.tensor(float("inf"))).item() == 1.0


def test_flow_start_is_the_vp_start_at_the_same_snr():
    s_max = torch.tensor(0.8, dtype=torch.float64)
    flow_start = power_law_start_sigmas(WEIGHTS[:-1], s_max, "flow")
    vp_start = power_law_start_sigmas(WEIGHTS[:-1], flow_to_vp_sigma(s_max), "vp")
    assert torch.allclose(flow_start, vp_to_flow_sigma(vp_start), atol=1e-12)


def test_linear_mapping_interpolates_between_the_ends_of_the_run():
    sigmas = torch.tensor([10.0, 5.0, 1.0, 0.5, 0.0])
    identity = {"to_timestep": lambda s: s, "to_sigma": lambda t: t}
    start = linear_start_sigmas(torch.tensor([0.0, 0.25, 1.0]), sigmas, **identity, sigma_min=0.5)
    assert torch.allclose(start, torch.tensor([0.5, 0.5 + 0.25 * 9.5, 10.0]))
    assert torch.equal(start_sigmas(torch.tensor([0.3]), sigmas, "linear", **identity),
                       linear_start_sigmas(torch.tensor([0.3]), sigmas, **identity))


def test_a_weight_zero_pixel_never_starts_even_at_sigma_zero():
    from ngdm_core import started
    start = power_law_start_sigmas(torch.tensor([0.0, 0.3, 1.0]), 14.6)
    assert started(torch.tensor(0.0), start).tolist() == [False, True, True]
    assert started(torch.tensor(14.6), start).tolist() == [False, False, True]


def test_the_linear_mapping_needs_the_models_conversions():
    sigmas = torch.tensor([10.0, 5.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="to_timestep and to_sigma"):
        start_sigmas(torch.tensor([0.5]), sigmas, "linear")
    with pytest.raises(ValueError, match="to_timestep and to_sigma"):
        linear_start_sigmas(torch.tensor([0.5]), sigmas, to_timestep=lambda s: s)


def test_with_the_shapes_models_conversions_the_linear_mapping_is_comfyuis_differential_diffusion():
    from ngdm_core.shapes.model import load_denoiser

    denoiser = load_denoiser()
    sigmas = denoiser.sigmas(20)
    weights = torch.linspace(0, 1, 201)
    start = start_sigmas(weights, sigmas, "linear", **denoiser.timestep_conversions())
    # ComfyUI's ModelSamplingDiscrete: timestep = nearest index in log sigma, sigma(t) = log-linear interpolation.
    log_sigmas = denoiser.schedule_sigmas.double().log()
    nearest = lambda sigma: (math.log(sigma) - log_sigmas).abs().argmin().item()
    t_from, t_to = nearest(sigmas[0]), nearest(max(float(sigmas[-1]), denoiser.sigma_min))
    t = t_to + weights.double() * (t_from - t_to)
    low, high = t.floor().long(), t.ceil().long()
    closed_form = torch.exp((1 - t.frac()) * log_sigmas[low] + t.frac() * log_sigmas[high])
    assert (t_from, t_to) == (999, 0)
    assert torch.allclose(start.double(), closed_form, rtol=1e-6, atol=0)
    # And step by step, the pixels denoised are DifferentialDiffusion's: weight >= its threshold.
    for sigma in sigmas[:-1]:
        threshold = (nearest(sigma) - t_to) / (t_from - t_to)
        assert torch.equal(started(sigma, start), weights >= threshold), float(sigma)


def test_the_papers_start_rule_starts_a_pixel_one_step_earlier_unless_its_start_is_a_step():
    sigmas = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    weights = torch.linspace(0, 1, 101)
    below = start_sigmas(weights, sigmas)
    above = start_sigmas(weights, sigmas, start_rule="last_at_or_above")
    grid = sigmas[:-1]
    # Algorithm 1 as written: the smallest step sigma at or above sigma_k; weight 0 never starts.
    expected = torch.stack([grid[grid >= s].min() if s > 0 else s for s in below])
    assert torch.equal(above, expected)
    first_step = lambda start: torch.stack([(grid <= s).nonzero().min() if (grid <= s).any() else torch.tensor(len(grid))
                                            for s in start])
    on_grid = (below[:, None] == grid).any(1) | (below == 0)
    assert torch.equal(first_step(above)[~on_grid], first_step(below)[~on_grid] - 1)
    assert torch.equal(above[on_grid], below[on_grid])
    with pytest.raises(ValueError, match="start_rule"):
        start_sigmas(weights, sigmas, start_rule="paper")
