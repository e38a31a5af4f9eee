import pytest
import torch

from ngdm_core import GaussianDenoiser, SAMPLERS, noise_source, sample_per_pixel_time
from ngdm_core.schedule import linear_beta_sigma, linear_beta_start_time

SHAPE = (2, 4, 8, 8)
VP_SIGMAS = torch.tensor([14.6146, 7.0, 3.5, 1.8, 0.9, 0.45, 0.2, 0.08, 0.0])
FLOW_SIGMAS = torch.linspace(1.0, 0.0, 9)
CASES = [("vp", "euler"), ("vp", "euler_ancestral"), ("vp", "dpmpp_2m"), ("flow", "euler"), ("flow", "dpmpp_2m")]


def setup(parametrization, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    source = torch.randn(SHAPE, generator=generator).to(dtype)
    noise = torch.randn(SHAPE, generator=generator).to(dtype)
    # The target mean is far from the source, so any pixel the model touches moves visibly.
    denoiser = GaussianDenoiser({"target": torch.full(SHAPE[1:], 2.0)}, std=0.5, parametrization=parametrization)
    sigmas = (VP_SIGMAS if parametrization == "vp" else FLOW_SIGMAS).to(dtype)
    return source, noise, denoiser, sigmas


def run(parametrization, sampler_name, weights, source, noise, denoiser, sigmas, callback=None):
    options = {"generator": torch.Generator().manual_seed(7)} if sampler_name == "euler_ancestral" else {}
    return sample_per_pixel_time(denoiser, source, weights, sigmas, noise, cond="target", sampler=SAMPLERS[sampler_name],
                                 parametrization=parametrization, callback=callback, **options)


@pytest.mark.parametrize("parametrization,sampler_name", CASES)
def test_zero_weights_return_the_source_exactly(parametrization, sampler_name):
    source, noise, denoiser, sigmas = setup(parametrization)
    out = run(parametrization, sampler_name, torch.zeros(SHAPE[0], 1, *SHAPE[2:]), source, noise, denoiser, sigmas)
    assert (out - source).abs().max().item() <= 1e-6


@pytest.mark.parametrize("parametrization,sampler_name", CASES)
def test_unit_weights_equal_plain_sampling_with_the_same_noise(parametrization, sampler_name):
    source, noise, denoiser, sigmas = setup(parametrization)
    out = run(parametrization, sampler_name, torch.ones(SHAPE[0], 1, *SHAPE[2:]), source, noise, denoiser, sigmas)
    options = {"generator": torch.Generator().manual_seed(7)} if sampler_name == "euler_ancestral" else {}
    plain = SAMPLERS[sampler_name](lambda x, s: denoiser(x, s, "target"),
                                   noise_source(source, noise, sigmas[0], parametrization), sigmas, **options)
    assert torch.equal(out, plain)
    assert (out - source).abs().mean() > 0.5


@pytest.mark.parametrize("parametrization,sampler_name", CASES)
def test_mixed_weights_keep_every_zero_pixel_and_edit_the_rest(parametrization, sampler_name):
    source, noise, denoiser, sigmas = setup(parametrization)
    weights = torch.rand(SHAPE[0], 1, *SHAPE[2:], generator=torch.Generator().manual_seed(3))
    weights[:, :, :4] = 0.0
    out = run(parametrization, sampler_name, weights, source, noise, denoiser, sigmas)
    kept = (weights == 0).expand(SHAPE)
    assert (out - source)[kept].abs().max().item() <= 1e-6
    edited = (weights > 0.5).expand(SHAPE)
    assert (out - source)[edited].abs().mean() > 0.5


@pytest.mark.parametrize("sampler_name", ["euler", "euler_ancestral", "dpmpp_2m"])
def test_each_pixel_first_denoised_step_is_the_one_eq8_predicts(sampler_name):
    # On the paper's continuous schedule, pixel k starts at the first step with t_i <= T_k (Eq. 8).
    times = torch.linspace(1.0, 0.0, 21, dtype=torch.float64)
    sigmas = linear_beta_sigma(times)
    source, noise, denoiser, _ = setup("vp", torch.float64)
    weights = torch.rand(SHAPE[0], 1, *SHAPE[2:], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    weights[0, 0, 0, :2] = torch.tensor([0.0, 1.0])
    start_times = linear_beta_start_time(weights)
    expected = (times[:-1].reshape(-1, 1, 1, 1, 1) > start_times).sum(dim=0)
    first_step = torch.full(weights.shape, len(times) - 1)
    start_states = torch.zeros_like(source)

    def record(step):
        moved = ((step["denoised"] - source).abs() > 0).any(dim=1, keepdim=True) & (first_step == len(times) - 1)
        first_step[moved] = step["i"]
        start_states[moved.expand(SHAPE)] = step["x"][moved.expand(SHAPE)]

    run("vp", sampler_name, weights, source, noise, denoiser, sigmas, callback=record)
    assert torch.equal(first_step, expected)
    assert expected.min() == 0 and expected.max() == len(times) - 1
    # Each pixel starts from the noised source along the one fixed noise, also for ancestral samplers.
    began = (expected < len(times) - 1).expand(SHAPE)
    start_sigma = sigmas[expected.clamp(max=len(times) - 2)]
    assert torch.allclose(start_states[began], (source + start_sigma * noise)[began], atol=1e-9)
