import torch

from ngdm_core.ngdm import linear_start_sigmas, power_law_start_sigmas, start_sigmas
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
    start = linear_start_sigmas(torch.tensor([0.0, 0.25, 1.0]), sigmas, sigma_min=0.5)
    assert torch.allclose(start, torch.tensor([0.5, 0.5 + 0.25 * 9.5, 10.0]))
    assert torch.equal(start_sigmas(torch.tensor([0.3]), sigmas, "linear"), linear_start_sigmas(torch.tensor([0.3]), sigmas))


def test_a_weight_zero_pixel_never_starts_even_at_sigma_zero():
    from ngdm_core import started
    start = power_law_start_sigmas(torch.tensor([0.0, 0.3, 1.0]), 14.6)
    assert started(torch.tensor(0.0), start).tolist() == [False, True, True]
    assert started(torch.tensor(14.6), start).tolist() == [False, False, True]
