"""Edit-friendly DDPM inversion (Huberman-Spiegelglas et al.): noise maps that reconstruct the source exactly.

Each noisy level ``x_i`` of the source is drawn with its own independent noise. Then, from
high noise to low, the noise map ``z_i = (x_{i+1} - mu_i(x_i)) / s_i`` is what an ancestral
sampler step from ``x_i`` would have to add to land on ``x_{i+1}``. Replaying the same
sampler with these maps, under the source condition, walks the same trajectory back to the
source; under a new condition it edits while keeping the source's structure.

One step of the ancestral sampler is linear, ``x' = a*x + b*x0 + s*z``. The last step, down
to sigma 0, has no noise (``s = 0``): its map stores the step's residual itself (``s`` is
taken as 1 there), so reconstruction stays exact where the authors' code zeroes that map.
"""

from dataclasses import dataclass

import torch

from .ngdm import per_pixel_time_denoiser, start_sigmas
from .samplers import ancestral_step, report_step
from .schedule import check_parametrization, noise_source
from .validation import (require_finite_tensor, require_map_matches, require_sigma_schedule, require_unit_interval)


def ancestral_coefficients(sigma, sigma_next, eta: float, parametrization: str = "vp"):
    """``(a, b, s)`` of one ancestral step ``x' = a*x + b*x0 + s*z``; ``s`` is 1 on a noise-free final step.

    VP models use k-diffusion's ancestral Euler; flow models use ComfyUI's rectified-flow
    ancestral Euler (``sample_euler_ancestral_RF``), each with its ``eta``.
    """
    if parametrization == "flow":
        sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
        alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
        noise_scale = (sigma_next**2 - sigma_down**2 * alpha_next**2 / alpha_down**2) ** 0.5
        scale = alpha_next / alpha_down
    else:
        sigma_down, noise_scale = ancestral_step(sigma, sigma_next, eta)
        scale = 1.0
    ratio = sigma_down / sigma
    return scale * ratio, scale * (1 - ratio), noise_scale if noise_scale > 0 else torch.ones_like(noise_scale)


def ancestral_update(x, denoised, noise_map, coefficients):
    a, b, s = coefficients
    return a * x + b * denoised + s * noise_map


@dataclass
class Inversion:
    """An edit-friendly inversion: replay it with :func:`sample_edit_friendly`.

    ``sigmas`` runs from the first edit step to the end; ``trajectory[i]`` is the source's
    noisy version at ``sigmas[i]`` (the last one the source, to float rounding, when the
    schedule ends at 0); ``predictions[i]`` is the guided source prediction there; ``noise_maps[i]`` the map
    of step ``i``.
    """
    sigmas: torch.Tensor
    trajectory: torch.Tensor
    predictions: torch.Tensor
    noise_maps: torch.Tensor
    eta: float
    parametrization: str

    def step(self, sigma) -> int:
        """The index of ``sigma`` in the schedule."""
        sigma = float(torch.as_tensor(sigma).reshape(-1)[0])
        index = int((self.sigmas[:-1] - sigma).abs().argmin())
        if abs(float(self.sigmas[index]) - sigma) > 1e-5 * max(sigma, 1e-3):
            raise ValueError(f"sigma {sigma:.6g} is not a step of the inverted schedule")
        return index

    def reference(self, sigma):
        """A held pixel's place at ``sigma`` for NGDM: on the inverted trajectory, with its own prediction."""
        index = self.step(sigma)
        return self.trajectory[index], self.predictions[index]

    def to(self, device):
        return Inversion(self.sigmas.to(device), self.trajectory.to(device), self.predictions.to(device),
                         self.noise_maps.to(device), self.eta, self.parametrization)


def require_eta(eta: float) -> None:
    if not 0 < eta <= 1:
        raise ValueError(f"eta must be in (0, 1], got {eta}")


def first_edit_step(num_steps: int, skip: float) -> int:
    """The step the edit starts from: ``skip`` of the ``num_steps`` are skipped."""
    if not 0 <= skip < 1:
        raise ValueError(f"skip must be in [0, 1), got {skip}")
    first = round(skip * num_steps)
    if first >= num_steps:
        raise ValueError(f"skip {skip} leaves no step of the {num_steps}-step schedule")
    return first


def _require_decreasing(sigmas):
    require_sigma_schedule("sigmas", sigmas)
    if (sigmas[1:] >= sigmas[:-1]).any():
        raise ValueError("sigmas must be strictly decreasing (from high noise to low)")


@torch.no_grad()
def invert_edit_friendly(denoiser, source: torch.Tensor, sigmas: torch.Tensor, cond=None, eta: float = 1.0,
                         skip: float = 0.0, parametrization: str = "vp", generator: torch.Generator | None = None,
                         progress=None, noise: torch.Tensor | None = None) -> Inversion:
    """Record the noise maps of ``source`` for ``denoiser(x, sigma, cond) -> x0`` (guided as the edit will be).

    One model evaluation per step of the edit. ``skip`` drops that fraction of the first
    steps; the edit starts at ``trajectory[0]`` with ``sigmas``' remaining steps. The levels'
    independent noises are drawn from ``generator``, or given as ``noise``, shape
    ``(steps + 1, *source.shape)`` for the steps left after ``skip`` (to draw each item's own).
    """
    require_finite_tensor("source", source)
    _require_decreasing(sigmas)
    require_eta(eta)
    check_parametrization(parametrization)
    sigmas = sigmas[first_edit_step(len(sigmas) - 1, skip):]
    steps = len(sigmas) - 1
    if noise is None:
        noise = torch.randn((steps + 1, *source.shape), generator=generator, dtype=torch.float32).to(source)
    elif noise.shape != (steps + 1, *source.shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}; the {steps} steps left need "
                         f"{(steps + 1, *source.shape)}")
    trajectory = torch.stack([noise_source(source, noise[i], sigmas[i], parametrization) for i in range(steps + 1)])
    predictions = torch.empty_like(trajectory[:-1])
    noise_maps = torch.empty_like(trajectory[:-1])
    sigma_batch = source.new_ones(source.shape[0])
    for i in range(steps):
        predictions[i] = denoiser(trajectory[i], sigmas[i] * sigma_batch, cond)
        coefficients = ancestral_coefficients(sigmas[i], sigmas[i + 1], eta, parametrization)
        a, b, s = coefficients
        noise_maps[i] = (trajectory[i + 1] - a * trajectory[i] - b * predictions[i]) / s
        # The next level becomes what the replay will compute from this map, rounding included
        # (it moves by about one float step), so replaying under the source condition retraces
        # the inversion bit for bit instead of accumulating rounding through the model.
        trajectory[i + 1] = ancestral_update(trajectory[i], predictions[i], noise_maps[i], coefficients)
        if progress is not None:
            progress(i + 1, steps)
    return Inversion(sigmas, trajectory, predictions, noise_maps, eta, parametrization)


@torch.no_grad()
def sample_edit_friendly(model, x, sigmas, extra_args=None, callback=None, inversion: Inversion = None):
    """Replay ``inversion``'s noise maps with its ancestral sampler, k-diffusion style, from ``x``."""
    extra_args = extra_args or {}
    if len(sigmas) != len(inversion.sigmas) or not torch.allclose(sigmas.to(inversion.sigmas), inversion.sigmas):
        raise ValueError("sigmas differ from the inverted schedule: use the sigmas the inversion returned")
    if x.shape != inversion.trajectory.shape[1:]:
        raise ValueError(f"the latent has shape {tuple(x.shape)} but the inversion was made for "
                         f"{tuple(inversion.trajectory.shape[1:])}")
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        report_step(callback, x, i, sigmas[i], denoised)
        coefficients = ancestral_coefficients(sigmas[i], sigmas[i + 1], inversion.eta, inversion.parametrization)
        x = ancestral_update(x, denoised, inversion.noise_maps[i], coefficients)
    return x


def edit(denoiser, inversion: Inversion, cond=None, callback=None) -> torch.Tensor:
    """Replay ``inversion`` under ``cond``: the source itself for the inversion's own condition."""
    return sample_edit_friendly(lambda x, sigma: denoiser(x, sigma, cond), inversion.trajectory[0].clone(),
                                inversion.sigmas, callback=callback, inversion=inversion)


def edit_per_pixel_time(denoiser, inversion: Inversion, weights: torch.Tensor, cond=None, mapping: str = "ngdm",
                        callback=None, conversions: dict | None = None,
                        start_rule: str = "first_at_or_below") -> torch.Tensor:
    """NGDM on top of the inversion: a pixel that has not started follows the inverted source trajectory.

    Held pixels take the trajectory's state and the inversion's own prediction, so the replay
    reproduces the trajectory there and a weight-0 pixel ends on the source. ``conversions``
    and ``start_rule`` are :func:`ngdm_core.ngdm.sample_per_pixel_time`'s.
    """
    require_map_matches("weights", weights, inversion.trajectory[0])
    require_unit_interval("weights", weights)
    start = start_sigmas(weights.to(inversion.trajectory.dtype), inversion.sigmas, mapping, inversion.parametrization,
                         **(conversions or {}), start_rule=start_rule)
    model = per_pixel_time_denoiser(lambda x, sigma: denoiser(x, sigma, cond), inversion.reference,
                                    inversion.sigmas, start)
    return sample_edit_friendly(model, inversion.trajectory[0].clone(), inversion.sigmas, callback=callback,
                                inversion=inversion)


@torch.no_grad()
def invert_ddim(denoiser, source: torch.Tensor, sigmas: torch.Tensor, cond=None,
                parametrization: str = "vp") -> torch.Tensor:
    """Deterministic (DDIM) inversion, the baseline: the noise predicted at each level carries the source up.

    The standard inversion: the model is evaluated at the level the state is at,
    ``x_{i+1} = x0_hat(x_i) + sigma_{i+1} eps_hat(x_i)`` (in DDPM form
    ``sqrt(abar_{i+1}) x0_hat + sqrt(1 - abar_{i+1}) eps_hat``), not at the level being stepped to
    as diffusers' ``DDIMInverseScheduler`` does. The noise is undefined at sigma 0, so a schedule
    ending at 0 takes the source as the state at its lowest sampled level, as DDPM's ``x_0`` is
    the state at timestep 0. One model evaluation per step above that level; replaying with
    Euler does not return the source exactly.
    """
    _require_decreasing(sigmas)
    levels = sigmas.flip(0)
    if levels[0] == 0:
        x, levels = source, levels[1:]
    else:
        x = noise_source(source, torch.zeros_like(source), levels[0], parametrization)
    sigma_batch = source.new_ones(source.shape[0])
    for sigma, sigma_up in zip(levels[:-1], levels[1:]):
        denoised = denoiser(x, sigma * sigma_batch, cond)
        if parametrization == "flow":
            noise = (x - (1 - sigma) * denoised) / sigma
        else:
            noise = (x - denoised) / sigma
        x = noise_source(denoised, noise, sigma_up, parametrization)
    return x
