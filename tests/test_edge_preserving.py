import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from ngdm_core.edge_preserving import (TRANSITIONS, edge_lambda, edge_map, edge_preserving_noise, forward_sample,
                                       noise_scale, posterior, relative_noise_scale, resize_to_latent, sample,
                                       schedule_time, training_loss, transition)

SHAPE = (2, 3, 8, 8)


def step_image(shape=SHAPE, dtype=torch.float64):
    """A sharp vertical step edge (0 left, 1 right) on every channel: G is 0 away from the step."""
    image = torch.zeros(shape, dtype=dtype)
    image[..., shape[-1] // 2:] = 1.0
    return image


def ddpm_alpha_bars(num_steps=50):
    betas = torch.linspace(1e-3, 0.2, num_steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def randn(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- edge map, lambda(t), tau(t) -------------------------------------------------------------

def test_edge_map_is_normalised_summed_squared_sobel_with_replicated_borders():
    image = randn(SHAPE)
    image[1] *= 5.0  # per-item normalisation: the brighter item must still peak at 1
    # scipy's sobel smooths along every other axis, so it is applied to one 2-D channel at a time
    expected = np.stack([sum(ndimage.sobel(channel, axis=axis, mode="nearest") ** 2
                             for channel in item.numpy() for axis in (0, 1)) for item in image])
    expected /= expected.max(axis=(1, 2), keepdims=True)
    edges = edge_map(image)
    assert edges.shape == SHAPE
    for c in range(SHAPE[1]):
        np.testing.assert_allclose(edges[:, c].numpy(), expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(edge_map(torch.full(SHAPE, 0.3)), torch.zeros(SHAPE))


@pytest.mark.parametrize("shape", [(1, 2, 5, 6), (1, 1, 1, 4), (1, 1, 1, 1)])
def test_edge_map_refuses_a_nan_or_inf_at_any_pixel(shape):
    for value in (float("nan"), float("inf"), -float("inf")):
        for index in range(math.prod(shape)):
            for base in (torch.zeros(shape), torch.full(shape, float("inf"))):
                image = base.clone().flatten()
                image[index] = value
                with pytest.raises(ValueError, match="image contains NaN or inf"):
                    edge_map(image.reshape(shape))
    # Huge but finite: the squares overflow, the image is still accepted.
    edge_map(torch.full(shape, 1e30).index_fill_(-1, torch.tensor([0]), -1e30))


def test_edge_map_of_a_one_frame_5d_latent_is_the_images():
    image = randn(SHAPE)
    assert torch.equal(edge_map(image.unsqueeze(2)), edge_map(image).unsqueeze(2))
    # Frames are Sobel'd apart, and normalised together.
    frames = torch.stack([image, 2 * image], dim=2)
    assert torch.allclose(edge_map(frames)[:, :, 0], edge_map(image) / 4)


def test_lambda_rises_linearly_to_t_phi_then_holds():
    t = torch.tensor([0.0, 0.15, 0.3, 0.6, 1.0], dtype=torch.float64)
    expected = torch.tensor([1e-4, 1e-4 + 0.5 * (0.1 - 1e-4), 0.1, 0.1, 0.1], dtype=torch.float64)
    torch.testing.assert_close(edge_lambda(t, t_phi=0.3), expected)


@pytest.mark.parametrize("kind", TRANSITIONS)
@pytest.mark.parametrize("t_phi", [0.25, 0.5, 1.0])
def test_transition_is_monotone_from_exactly_0_to_exactly_1_at_t_phi(kind, t_phi):
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    tau = transition(t, t_phi, kind)
    assert tau[0] == 0 and (tau[t >= t_phi] == 1).all()
    assert (tau.diff() >= 0).all() and (tau[(t > 0) & (t < t_phi)] < 1).all()
    # cosine and the rescaled logistic are symmetric about the middle of the stage
    torch.testing.assert_close(transition(t_phi / 2, t_phi, kind), torch.tensor(0.5))


def test_sigmoid_transition_is_the_rescaled_logistic():
    k, t_phi, t = 15.0, 0.5, 0.1
    logistic = lambda u: 1 / (1 + math.exp(-k * (u - t_phi / 2)))  # noqa: E731
    expected = (logistic(t) - logistic(0)) / (logistic(t_phi) - logistic(0))
    assert transition(torch.tensor(t, dtype=torch.float64), t_phi, "sigmoid", k).item() == pytest.approx(expected)


# --- reduction to isotropic DDPM ---------------------------------------------------------------

ISOTROPIC_CASES = {
    "after t_phi (tau = 1)": (lambda: randn(SHAPE, seed=3), 0.7),
    "flat image (G = 0)": (lambda: torch.full(SHAPE, 0.4, dtype=torch.float64), 0.2),
}


@pytest.mark.parametrize("case", ISOTROPIC_CASES)
@pytest.mark.parametrize("kind", TRANSITIONS)
def test_isotropic_limits_equal_ddpm(case, kind):
    make_x0, t = ISOTROPIC_CASES[case]
    x0, noise, x_t = make_x0(), randn(SHAPE, seed=1), randn(SHAPE, seed=2)
    alpha_bar_t, alpha_bar_s, s = 0.3, 0.45, t - 0.02
    ddpm_x_t = math.sqrt(alpha_bar_t) * x0 + math.sqrt(1 - alpha_bar_t) * noise
    assert torch.equal(forward_sample(x0, alpha_bar_t, t, noise, kind=kind), ddpm_x_t)

    # DDPM's posterior q(x_s | x_t, x0) (Ho et al., Eqs. 6-7) with alpha_t = alpha_bar_t / alpha_bar_s
    alpha = alpha_bar_t / alpha_bar_s
    ddpm_mean = (math.sqrt(alpha_bar_s) * (1 - alpha) * x0 + math.sqrt(alpha) * (1 - alpha_bar_s) * x_t) / (1 - alpha_bar_t)
    ddpm_variance = (1 - alpha_bar_s) / (1 - alpha_bar_t) * (1 - alpha)
    mean, variance = posterior(x_t, x0, alpha_bar_t, alpha_bar_s, t, s, kind=kind)
    torch.testing.assert_close(mean, ddpm_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(variance, torch.full_like(variance, ddpm_variance), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ISOTROPIC_CASES)
def test_isotropic_limits_give_the_ddpm_loss(case):
    make_x0, t = ISOTROPIC_CASES[case]
    x0, noise = make_x0(), randn(SHAPE, seed=1)
    alpha_bars = ddpm_alpha_bars()
    t_index = torch.tensor([int(t * 50), int(t * 50) + 5])
    model = lambda x, index: 0.5 * x + index.reshape(-1, 1, 1, 1)  # noqa: E731
    alpha_bar = alpha_bars[t_index].reshape(-1, 1, 1, 1)
    target = (1 - alpha_bar).sqrt() * noise
    ddpm_loss = (model(alpha_bar.sqrt() * x0 + target, t_index) - target).square().sum(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(training_loss(model, x0, alpha_bars, t_index, noise), ddpm_loss, rtol=1e-12, atol=0)


def test_loss_is_zero_for_the_exact_scaled_noise_and_positive_otherwise():
    x0, noise, alpha_bars, t_index = step_image(), randn(SHAPE, seed=1), ddpm_alpha_bars(), torch.tensor([3, 10])
    t = schedule_time(t_index, len(alpha_bars))
    target = noise_scale(alpha_bars[t_index], t, edge_map(x0)) * noise
    assert training_loss(lambda x, index: target, x0, alpha_bars, t_index, noise) == 0
    isotropic = (1 - alpha_bars[t_index]).sqrt().reshape(-1, 1, 1, 1) * noise
    assert training_loss(lambda x, index: isotropic, x0, alpha_bars, t_index, noise) > 0


# --- the edge-preserving scale and posterior ---------------------------------------------------

@pytest.mark.parametrize("kind", TRANSITIONS)
def test_noise_scale_is_at_most_isotropic_with_equality_where_flat(kind):
    edges = edge_map(step_image())
    flat = edges == 0
    assert flat.any() and (~flat).any()
    for t in (0.0, 0.1, 0.3, 0.49, 0.5, 0.9):
        isotropic = math.sqrt(1 - 0.4)
        scale = noise_scale(0.4, t, edges, kind=kind)
        assert (scale <= isotropic).all()
        assert (scale[flat] == isotropic).all()
        assert t >= 0.5 or (scale[~flat] < isotropic).all()


@pytest.mark.parametrize("kind", TRANSITIONS)
def test_posterior_is_the_gaussian_conditional_of_the_forward_process(kind):
    # With x_s ~ N(sqrt(ab_s) x0, var_s) and x_t | x_s ~ N(a x_s, var_ts), a^2 = ab_t / ab_s and
    # var_ts = var_t - a^2 var_s, the pair is jointly Gaussian per pixel: Var x_t = var_t and
    # Cov(x_s, x_t) = a var_s. Conditioning on x_t is then the textbook formula below.
    x0, x_t = step_image() + 0.1 * randn(SHAPE, seed=4), randn(SHAPE, seed=5)
    alpha_bar_t, alpha_bar_s, t, s = 0.5, 0.6, 0.3, 0.25
    edges = edge_map(x0)
    var_t = noise_scale(alpha_bar_t, t, edges, kind=kind) ** 2
    var_s = noise_scale(alpha_bar_s, s, edges, kind=kind) ** 2
    a = math.sqrt(alpha_bar_t / alpha_bar_s)
    var_ts = var_t - a**2 * var_s
    assert (var_ts > 0).all()  # a valid Markov transition
    expected_mean = math.sqrt(alpha_bar_s) * x0 + a * var_s / var_t * (x_t - math.sqrt(alpha_bar_t) * x0)
    expected_variance = var_s - (a * var_s) ** 2 / var_t
    mean, variance = posterior(x_t, x0, alpha_bar_t, alpha_bar_s, t, s, kind=kind)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(variance, expected_variance, rtol=1e-10, atol=1e-12)
    # and METHODS section 3's form of the same step
    methods_variance = 1 / (1 / var_s + a**2 / var_ts)
    methods_mean = methods_variance * (a / var_ts * x_t + math.sqrt(alpha_bar_s) / var_s * x0)
    torch.testing.assert_close(mean, methods_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(variance, methods_variance, rtol=1e-10, atol=1e-12)


def test_posterior_to_the_data_returns_the_prediction_without_noise():
    x_t, x0_hat = randn(SHAPE, seed=6), step_image()
    mean, variance = posterior(x_t, x0_hat, 0.97, 1.0, 0.02, 0.0)
    assert torch.equal(mean, x0_hat) and torch.equal(variance, torch.zeros_like(variance))


def test_forward_samples_have_variance_g_squared_and_less_noise_on_edges():
    n, shape = 20000, (1, 1, 8, 8)
    x0 = step_image(shape)
    alpha_bar, t = 0.5, 0.1
    samples = forward_sample(x0.expand(n, -1, -1, -1), alpha_bar, t, randn((n, *shape[1:]), seed=7))
    expected = noise_scale(alpha_bar, t, edge_map(x0))[0] ** 2
    # For n Gaussian draws the sample variance has relative standard error sqrt(2 / (n - 1)),
    # 0.01 here; 5 standard errors bound all 64 pixels with probability above 0.9999.
    tolerance = 5 * math.sqrt(2 / (n - 1))
    assert ((samples.var(dim=0) / expected - 1).abs() < tolerance).all()
    torch.testing.assert_close(samples.mean(dim=0), math.sqrt(alpha_bar) * x0[0], rtol=0, atol=5 * math.sqrt(0.5 / n))
    edge_variance, flat_variance = samples.var(dim=0)[0, :, 3:5], samples.var(dim=0)[0, :, :2]
    assert edge_variance.max() < 0.5 * flat_variance.min()


# --- sampling -----------------------------------------------------------------------------------

def test_sampler_recovers_a_delta_data_distribution():
    alpha_bars, target = ddpm_alpha_bars(), step_image((1, 3, 8, 8), dtype=torch.float32) + 0.2
    steps = []

    def exact_scaled_noise(x, t_index):
        return x - alpha_bars[t_index].sqrt().reshape(-1, 1, 1, 1).to(x.dtype) * target

    result = sample(exact_scaled_noise, (2, 3, 8, 8), alpha_bars, callback=steps.append,
                    generator=torch.Generator().manual_seed(0), kind="cosine")
    torch.testing.assert_close(result, target.expand(2, -1, -1, -1), rtol=0, atol=1e-4)
    assert [step["i"] for step in steps] == list(range(50))
    assert set(steps[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}
    assert steps[0]["sigma"] > steps[-1]["sigma"] > 0


def test_sampler_steps_ancestrally_with_the_posterior_at_schedule_times():
    # Two entries at t = 1 and t = 1/2 (with t_phi = 1, so both times matter): the first step
    # draws from the posterior, the second lands on x0_hat.
    alpha_bars, x_T, steps = torch.tensor([0.8, 0.3], dtype=torch.float64), step_image() + randn(SHAPE, seed=14), []
    model = lambda x, t_index: 0.3 * x  # noqa: E731
    result = sample(model, x_T, alpha_bars, callback=steps.append, generator=torch.Generator().manual_seed(2),
                    kind="sigmoid", t_phi=1.0)
    x0_hat = 0.7 * x_T / math.sqrt(0.3)
    mean, variance = posterior(x_T, x0_hat, 0.3, 0.8, 1.0, 0.5, kind="sigmoid", t_phi=1.0)
    x_1 = mean + variance.sqrt() * torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(steps[0]["denoised"], x0_hat)
    torch.testing.assert_close(steps[1]["x"], x_1)
    torch.testing.assert_close(result, 0.7 * x_1 / math.sqrt(0.8))


def test_sampler_is_deterministic_under_a_seeded_generator():
    alpha_bars, x_T = ddpm_alpha_bars(10), randn((1, 1, 4, 4), seed=8)
    model = lambda x, t_index: 0.3 * x  # noqa: E731
    runs = [sample(model, x_T, alpha_bars, generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    assert torch.equal(*runs)


# --- noise for models trained on isotropic noise --------------------------------------------------

def test_edge_preserving_noise_blends_toward_isotropic():
    noise, edges = randn(SHAPE, seed=9), edge_map(step_image())[:, :1]
    assert torch.equal(edge_preserving_noise(noise, edges, 0.1, strength=0.0), noise)
    full = edge_preserving_noise(noise, edges, 0.1)
    torch.testing.assert_close(full, noise * relative_noise_scale(0.1, edges))
    half = edge_preserving_noise(noise, edges, 0.1, strength=0.5)
    torch.testing.assert_close(half, (noise + full) / 2)
    assert (full.abs() <= noise.abs()).all() and (full.abs() < noise.abs()).any()
    huge = edge_preserving_noise(noise, edges, 0.1, lambda_min=1e6, lambda_max=1e6)
    torch.testing.assert_close(huge, noise, rtol=1e-3, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_edge_preserving_noise_keeps_shape_and_dtype_and_is_deterministic(dtype):
    noise, edges = randn(SHAPE, seed=10).to(dtype), edge_map(step_image())
    first, second = (edge_preserving_noise(noise, edges, torch.tensor([0.1, 0.3])) for _ in range(2))
    assert first.shape == noise.shape and first.dtype == dtype
    assert torch.equal(first, second)
    assert torch.isfinite(edge_preserving_noise(noise, edges, 0.0, lambda_min=1e-6)).all()  # G / lambda = 1e6


@pytest.mark.parametrize("shape", [(2, 3, 64, 96), (1, 1, 16, 24)])
def test_resize_by_whole_blocks_is_interpolates_area_mean_in_any_memory_layout(shape):
    image = randn(shape, seed=4)
    expected = torch.nn.functional.interpolate(image, size=(8, 12), mode="area")
    for layout in (image, image.movedim(1, -1).contiguous().movedim(-1, 1)):
        torch.testing.assert_close(resize_to_latent(layout, (8, 12)), expected, rtol=0, atol=1e-12)


def test_resize_to_latent_area_averages_and_allows_one_latent_pixel_of_slack():
    image = randn((1, 3, 64, 96), seed=11)
    resized = resize_to_latent(image, (8, 12))
    torch.testing.assert_close(resized, image.reshape(1, 3, 8, 8, 12, 8).mean(dim=(3, 5)))
    assert resize_to_latent(randn((1, 3, 68, 96)), (8, 12)).shape == (1, 3, 8, 12)
    with pytest.raises(ValueError, match="image is 80x96"):
        resize_to_latent(randn((1, 3, 80, 96)), (8, 12))


# --- bad input and purity ----------------------------------------------------------------------------

@pytest.mark.parametrize("call,message", [
    (lambda: edge_lambda(0.1, lambda_min=0.2, lambda_max=0.1), "lambda_min"),
    (lambda: edge_lambda(0.1, lambda_min=0.0), "lambda_min must be positive"),
    (lambda: transition(0.1, t_phi=0.0), "t_phi"),
    (lambda: transition(0.1, t_phi=1.5), "t_phi"),
    (lambda: transition(0.1, kind="exponential"), "kind must be one of"),
    (lambda: transition(1.2), "t must lie"),
    (lambda: resize_to_latent(torch.zeros(1, 3, 64, 64), (8, 12)), "image is 64x64"),
    (lambda: edge_preserving_noise(torch.zeros(SHAPE), torch.full((2, 1, 8, 8), float("nan")), 0.1), "edges contains NaN"),
    (lambda: edge_preserving_noise(torch.zeros(SHAPE), torch.zeros(2, 1, 8, 8), 0.1, strength=1.5), "strength"),
    (lambda: forward_sample(torch.full(SHAPE, float("inf")), 0.5, 0.1, torch.zeros(SHAPE)), "image contains NaN or inf"),
    (lambda: posterior(torch.zeros(SHAPE), torch.zeros(SHAPE), 0.6, 0.5, 0.3, 0.2), "alpha_bar_t must be below"),
    (lambda: sample(lambda x, t: x, (1, 1, 4, 4), torch.tensor([0.9, 0.95])), "alpha_bar_schedule must decrease"),
])
def test_bad_input_is_refused_naming_it(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_inputs_are_not_mutated():
    x0, noise, x_t, alpha_bars = step_image(), randn(SHAPE, seed=12), randn(SHAPE, seed=13), ddpm_alpha_bars(5)
    edges, t_index = edge_map(x0)[:, :1].clone(), torch.tensor([1, 3])
    inputs = (x0, noise, x_t, alpha_bars, edges, t_index)
    copies = [tensor.clone() for tensor in inputs]
    edge_map(x0)
    forward_sample(x0, 0.5, 0.2, noise)
    posterior(x_t, x0, 0.5, 0.6, 0.2, 0.1)
    training_loss(lambda x, index: x, x0, alpha_bars, t_index, noise)
    sample(lambda x, index: 0.5 * x, x_t, alpha_bars, generator=torch.Generator().manual_seed(0))
    edge_preserving_noise(noise, edges, 0.2, strength=0.5)
    resize_to_latent(x0, (4, 4))
    assert all(torch.equal(tensor, copy) for tensor, copy in zip(inputs, copies))
