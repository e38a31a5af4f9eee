"""Input checks that name the offending input, so a node can show the user what to fix."""

import math

import torch


def require_finite_tensor(name: str, value: torch.Tensor) -> None:
    if not torch.isfinite(value).all():
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
    require_finite_tensor(name, value)
    if value.numel() and (value.min() < 0 or value.max() > 1):
        raise ValueError(f"{name} must lie in [0, 1], got values in [{value.min().item():.4g}, {value.max().item():.4g}]")


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
