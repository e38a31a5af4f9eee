"""Noise-level maths shared by every method: sigma forms, flow mapping, noising a source.

Sigmas follow k-diffusion / ComfyUI. A VP model sees ``x = x0 + sigma * eps`` with
``alpha_bar = 1 / (1 + sigma^2)``; a flow (rectified-flow, ComfyUI's CONST) model sees
``x = (1 - s) * x0 + s * eps`` with ``s`` in [0, 1].
"""

import math

import torch

PARAMETRIZATIONS = ("vp", "flow")


def check_parametrization(parametrization: str) -> None:
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"parametrization must be one of {PARAMETRIZATIONS}, got {parametrization!r}")


def flow_to_vp_sigma(s: torch.Tensor) -> torch.Tensor:
    """The VP sigma with the same signal-to-noise ratio as flow time ``s``: ``s / (1 - s)``."""
    return s / (1 - s)


def vp_to_flow_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`flow_to_vp_sigma`; written as ``1 / (1 + 1/sigma)`` so that inf maps to 1."""
    return torch.where(sigma > 0, 1 / (1 + 1 / sigma), torch.zeros_like(sigma))


def per_item(values, like: torch.Tensor) -> torch.Tensor:
    """A scalar or one value per batch item, in ``like``'s dtype and device, shaped to broadcast against it."""
    values = torch.as_tensor(values, dtype=like.dtype, device=like.device)
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def noise_source(source: torch.Tensor, noise: torch.Tensor, sigma, parametrization: str = "vp") -> torch.Tensor:
    """The source at noise level ``sigma`` along the fixed noise ``noise``.

    ``sigma`` may be a scalar or one value per batch item. This is ComfyUI's
    ``model_sampling.noise_scaling`` without its max-denoise rescaling.
    """
    check_parametrization(parametrization)
    sigma = per_item(sigma, source)
    if parametrization == "flow":
        return (1 - sigma) * source + sigma * noise
    return source + sigma * noise


# The paper's continuous linear-beta VP schedule (Song et al.), kept to check Eq. 8 against.
PAPER_BETA_MIN = 0.1
PAPER_BETA_MAX = 20.0


def linear_beta_alpha_bar(t: torch.Tensor, beta_min: float = PAPER_BETA_MIN, beta_max: float = PAPER_BETA_MAX) -> torch.Tensor:
    """``alpha_bar(t) = exp(-integral_0^t beta)`` for ``beta(s) = beta_min + s (beta_max - beta_min)``."""
    return torch.exp(-(beta_min * t + 0.5 * (beta_max - beta_min) * t**2))


def linear_beta_sigma(t: torch.Tensor, beta_min: float = PAPER_BETA_MIN, beta_max: float = PAPER_BETA_MAX) -> torch.Tensor:
    """The VP sigma of the continuous linear-beta schedule at time ``t``."""
    return torch.sqrt(1 / linear_beta_alpha_bar(t, beta_min, beta_max) - 1)


def linear_beta_start_time(weights: torch.Tensor, t_max: float = 1.0, beta_min: float = PAPER_BETA_MIN,
                           beta_max: float = PAPER_BETA_MAX) -> torch.Tensor:
    """The paper's Eq. 8: the time ``T_k`` at which a pixel with weight ``lambda_k`` starts."""
    delta = beta_max - beta_min
    root = torch.sqrt(beta_min**2 + 2 * delta * beta_min * weights * t_max + delta**2 * weights * t_max**2)
    return (root - beta_min) / delta


# A flow schedule that starts at s = 1 has zero SNR there, and the power law alpha_bar^lambda
# would then start every pixel with lambda > 0 at pure noise. The NGDM power law is anchored
# instead at the paper's own terminal SNR, alpha_bar(T) = exp(-(beta_min + beta_max) / 2).
FLOW_MAX_VP_SIGMA = math.sqrt(math.exp((PAPER_BETA_MIN + PAPER_BETA_MAX) / 2) - 1)
