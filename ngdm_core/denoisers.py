"""Denoisers for the ``D(x, sigma, cond) -> x0`` interface: an exact analytic one, and CFG.

The analytic denoiser is the optimal (posterior-mean) denoiser for Gaussian data, so tests
and benchmarks have exact answers to compare against without any model weights.
"""

import torch

from .schedule import check_parametrization, per_item


class GaussianDenoiser:
    """``E[x0 | x]`` for data ``x0 ~ N(means[cond], std^2 I)``, each pixel independent.

    ``means`` maps a condition to a tensor broadcastable to the latent (C, H, W). ``calls``
    and ``batch_sizes`` record every evaluation, so tests can count model calls.
    """

    def __init__(self, means: dict, std: float = 1.0, parametrization: str = "vp"):
        check_parametrization(parametrization)
        self.means = means
        self.std = std
        self.parametrization = parametrization
        self.batch_sizes = []

    @property
    def calls(self) -> int:
        return len(self.batch_sizes)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        self.batch_sizes.append(x.shape[0])
        mean = self.means[cond].to(x)
        sigma = per_item(sigma, x)
        variance = self.std**2
        if self.parametrization == "flow":
            signal = 1 - sigma
            gain = signal * variance / (signal**2 * variance + sigma**2)
            return mean + gain * (x - signal * mean)
        return mean + variance / (variance + sigma**2) * (x - mean)


def classifier_free_guidance(denoiser, negative_cond, scale: float):
    """``D_neg + scale * (D_cond - D_neg)`` as a new ``D(x, sigma, cond)``."""
    def guided(x, sigma, cond):
        unconditional = denoiser(x, sigma, negative_cond)
        return unconditional + scale * (denoiser(x, sigma, cond) - unconditional)

    return guided
