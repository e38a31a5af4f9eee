"""Input checks that name the offending input, so a node can show the user what to fix."""

import math

import torch


def all_finite(value: torch.Tensor) -> bool:
    # A NaN or inf makes the sum NaN or inf, so one reduction clears the usual case; only a sum that
    # overflowed needs isfinite, which costs several passes over the tensor. The sum is checked as a
    # Python number: torch's isfinite on one value costs as much as several small ops.
    return math.isfinite(value.sum().item()) or bool(torch.isfinite(value).all())


def require_finite_tensor(name: str, value: torch.Tensor) -> None:
    if not all_finite(value):
        raise ValueError(f"{name} contains NaN or inf values")


def require_finite_number(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")


def require_positive(name: str, value: float) -> None:
    require_finite_number(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def require_non_negative(name: str, value: float) -> None:
    require_finite_number(name, value)
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {value}")


def require_at_least(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")


def require_unit_interval(name: str, value: torch.Tensor) -> None:
    if not value.numel():
        return
    # One pass: the extremes are NaN if any value is, and an inf is one of them.
    low, high = (extreme.item() for extreme in torch.aminmax(value))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{name} contains NaN or inf values")
    if low < 0 or high > 1:
        raise ValueError(f"{name} must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]")


def require_map_matches(name: str, weight_map: torch.Tensor, latent: torch.Tensor) -> None:
    """A per-pixel map must have the latent's batch (or 1), one or all channels, and its size."""
    if weight_map.ndim != latent.ndim:
        raise ValueError(f"{name} has shape {tuple(weight_map.shape)}, expected {latent.ndim} dimensions like the latent {tuple(latent.shape)}")
    if weight_map.shape[-2:] != latent.shape[-2:]:
        raise ValueError(f"{name} is {tuple(weight_map.shape[-2:])} pixels but the latent is {tuple(latent.shape[-2:])}")
    if weight_map.shape[0] not in (1, latent.shape[0]):
        raise ValueError(f"{name} has batch {weight_map.shape[0]} but the latent has batch {latent.shape[0]}")
    if weight_map.shape[1] not in (1, latent.shape[1]):
        raise ValueError(f"{name} has {weight_map.shape[1]} channels, expected 1 or the latent's {latent.shape[1]}")


def require_sigma_schedule(name: str, sigmas: torch.Tensor) -> None:
    """A schedule of at least one step: 1-D, finite, non-negative and non-increasing."""
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"{name} must hold at least two sigmas (one step), got shape {tuple(sigmas.shape)}")
    require_finite_tensor(name, sigmas)
    if (sigmas < 0).any():
        raise ValueError(f"{name} must be non-negative")
    if (sigmas[1:] > sigmas[:-1]).any():
        raise ValueError(f"{name} must be non-increasing (from high noise to low)")
