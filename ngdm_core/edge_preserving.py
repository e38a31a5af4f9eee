"""Edge-preserving noise (Vandersanden et al.): less noise on the data's edges early in the forward process.

Discrete-time DDPM with time normalised to [0, 1]: entry ``i`` of a schedule of ``T`` values
(DDPM's ``alpha_bar_{i+1}``) sits at ``t = (i + 1) / T``, and the data at ``t = 0`` with
``alpha_bar = 1``. The forward marginal is ``x_t = sqrt(alpha_bar_t) x0 + g_t * eps`` with

    g_t = sqrt(1 - alpha_bar_t) / ((1 - tau(t)) sqrt(1 + G(x0) / lambda(t)) + tau(t)),

``G`` the normalised squared Sobel magnitude of ``x0``, and the network predicts ``g_t * eps``.
Functions that take ``**options`` pass them on to :func:`noise_scale`: ``lambda_min``,
``lambda_max``, ``t_phi``, ``kind`` and ``steepness``.
"""

import math

import torch
import torch.nn.functional as F

from .samplers import report_step
from .schedule import per_item
from .validation import (all_finite, require_finite_number, require_finite_tensor, require_map_matches,
                         require_positive, require_unit_interval)

TRANSITIONS = ("linear", "cosine", "sigmoid")


def edge_map(image: torch.Tensor) -> torch.Tensor:
    """``G``: squared Sobel magnitude summed over channels, divided by each item's maximum, on every channel.

    Input and output are (B, C, H, W), or (B, C, F, H, W) with the Sobel taken in each frame's
    (H, W) plane; borders are replicated, and a flat image gives zeros. The authors sum the
    channels' Sobel responses before squaring; the pack sums the squared magnitudes, so that
    channels whose gradients have opposite signs (common in latents) do not cancel.
    """
    planes = image.reshape(image.shape[0], -1, *image.shape[-2:])
    padded = F.pad(planes, (1, 1, 1, 1), mode="replicate")
    # Sobel as a central difference, then [1, 2, 1] across it: a flat image gives exact zeros,
    # where a convolution's sums leave rounding residue that the normalisation would blow up.
    # The sums run in place on fresh tensors, one pass each.
    along_width = padded[..., 2:] - padded[..., :-2]
    along_height = padded[..., 2:, :] - padded[..., :-2, :]
    gradient_x = torch.add(along_width[..., :-2, :], along_width[..., 2:, :]).add_(along_width[..., 1:-1, :], alpha=2)
    gradient_y = torch.add(along_height[..., :-2], along_height[..., 2:]).add_(along_height[..., 1:-1], alpha=2)
    squares = gradient_x.square_().addcmul_(gradient_y, gradient_y).reshape(image.shape)
    magnitude = squares.sum(dim=1, keepdim=True)
    peak = magnitude.flatten(1).amax(dim=1)
    # A NaN or inf anywhere in the image reaches every difference it enters, and so the peak: the
    # image itself needs scanning only then (a huge but finite image can overflow the squares too).
    if not all_finite(peak):
        require_finite_tensor("image", image)
    peak = per_item(torch.where(peak > 0, peak, 1.0), magnitude)
    return (magnitude / peak).expand_as(image)


def _stage_progress(t, t_phi: float):
    """``min(1, t / t_phi)``: how far ``t`` is through the edge-preserving stage; a number for a number ``t``."""
    require_finite_number("t_phi", t_phi)
    if not 0 < t_phi <= 1:
        raise ValueError(f"t_phi must lie in (0, 1], got {t_phi}")
    if isinstance(t, (int, float)):
        # A plain number (the nodes' case) stays one: a handful of tiny tensor ops would cost more
        # than the noise they shape.
        require_finite_number("t", t)
        if not 0 <= t <= 1:
            raise ValueError(f"t must lie in [0, 1], got {t}")
        return min(1.0, t / t_phi)
    t = torch.as_tensor(t)
    t = t if t.is_floating_point() else t.to(torch.get_default_dtype())
    require_unit_interval("t", t)
    return torch.clamp(t / t_phi, max=1.0)


def _lambda_at(progress, lambda_min: float, lambda_max: float):
    require_positive("lambda_min", lambda_min)
    require_positive("lambda_max", lambda_max)
    if lambda_min > lambda_max:
        raise ValueError(f"lambda_min ({lambda_min}) must not exceed lambda_max ({lambda_max})")
    # The authors' code extends the line past t_phi (lambda > lambda_max). There tau = 1, so lambda
    # no longer matters; holding it at lambda_max keeps it in the paper's interval.
    return lambda_min + (lambda_max - lambda_min) * progress


def _tau_at(progress, t_phi: float, kind: str, steepness: float):
    # One tau serves both passes. The authors' code trains with a cosine tau over the whole of
    # [0, 1] but samples with a linear tau that jumps to 1 at t_phi, a mismatch the pack avoids.
    if kind not in TRANSITIONS:
        raise ValueError(f"kind must be one of {TRANSITIONS}, got {kind!r}")
    if kind == "linear":
        # The clamped progress itself, exactly 0 at t = 0 and exactly 1 from t_phi on.
        return progress
    progress = torch.as_tensor(progress)
    if kind == "cosine":
        shape = (1 - torch.cos(math.pi * progress)) / 2
    else:
        require_positive("steepness", steepness)
        half_rise = steepness * t_phi / 2
        start = (1 - math.tanh(half_rise / 2)) / 2  # sigmoid(-half_rise), without overflow
        shape = (torch.sigmoid(half_rise * (2 * progress - 1)) - start) / (1 - 2 * start)
    # Exactly 0 and 1 at the ends, where float cos/sigmoid could land an ulp off: from t_phi on
    # the process is then exactly isotropic.
    inside = (progress > 0) & (progress < 1)
    return torch.where(inside, shape, (progress >= 1).to(shape.dtype))


def edge_lambda(t, lambda_min: float = 1e-4, lambda_max: float = 1e-1, t_phi: float = 0.5) -> torch.Tensor:
    """Edge sensitivity ``lambda(t)``: linear from ``lambda_min`` at 0 to ``lambda_max`` at ``t_phi``, then constant."""
    return torch.as_tensor(_lambda_at(_stage_progress(t, t_phi), lambda_min, lambda_max))


def transition(t, t_phi: float = 0.5, kind: str = "linear", steepness: float = 15.0) -> torch.Tensor:
    """``tau(t)``: 0 at t = 0, rising monotonically to exactly 1 at ``t_phi`` and staying there.

    ``"linear"`` is ``p = min(1, t / t_phi)``; ``"cosine"`` is ``(1 - cos(pi p)) / 2``;
    ``"sigmoid"`` is the logistic ``sigmoid(steepness * (t - t_phi / 2))`` (``steepness`` per
    unit of t, like the authors' k), rescaled linearly to run from 0 at t = 0 to 1 at ``t_phi``.
    """
    return torch.as_tensor(_tau_at(_stage_progress(t, t_phi), t_phi, kind, steepness))


def relative_noise_scale(t, edges: torch.Tensor, lambda_min: float = 1e-4, lambda_max: float = 1e-1,
                         t_phi: float = 0.5, kind: str = "linear", steepness: float = 15.0) -> torch.Tensor:
    """``g_t / sqrt(1 - alpha_bar_t) = 1 / ((1 - tau) sqrt(1 + G / lambda) + tau)``: 1 where flat, below 1 on edges."""
    require_unit_interval("edges", edges)
    # At least float32: in half precision G / lambda (up to 1 / lambda_min) can overflow.
    work = edges.to(torch.promote_types(edges.dtype, torch.float32))
    progress = _stage_progress(t, t_phi)
    tau, lam = (value if isinstance(value, float) else per_item(value, work)
                for value in (_tau_at(progress, t_phi, kind, steepness), _lambda_at(progress, lambda_min, lambda_max)))
    ratio = work / lam
    # The denominator written as 1 + (1 - tau)(sqrt(1 + G / lambda) - 1), which is exactly 1 where
    # G = 0 or tau = 1: there the process is exactly isotropic DDPM. In place on the fresh ratio.
    return ratio.add_(1).sqrt_().sub_(1).mul_(1 - tau).add_(1).reciprocal_().to(edges.dtype)


def noise_scale(alpha_bar, t, edges: torch.Tensor, lambda_min: float = 1e-4, lambda_max: float = 1e-1,
                t_phi: float = 0.5, kind: str = "linear", steepness: float = 15.0) -> torch.Tensor:
    """``g_t``, the per-pixel noise scale at ``alpha_bar`` and time ``t`` (each a scalar or one per item)."""
    require_unit_interval("alpha_bar", torch.as_tensor(alpha_bar))
    relative = relative_noise_scale(t, edges, lambda_min, lambda_max, t_phi, kind, steepness)
    return torch.sqrt(1 - per_item(alpha_bar, edges)) * relative


def scaled_noise(x0: torch.Tensor, alpha_bar, t, noise: torch.Tensor, **options) -> torch.Tensor:
    """``g_t * noise`` with ``G`` taken from ``x0``: the forward noise, and the network's training target."""
    require_finite_tensor("noise", noise)
    if noise.shape != x0.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)} but x0 has {tuple(x0.shape)}")
    return noise_scale(alpha_bar, t, edge_map(x0), **options) * noise


def forward_sample(x0: torch.Tensor, alpha_bar, t, noise: torch.Tensor, **options) -> torch.Tensor:
    """``x_t = sqrt(alpha_bar_t) x0 + g_t * noise`` for a standard normal ``noise``."""
    return per_item(alpha_bar, x0).sqrt() * x0 + scaled_noise(x0, alpha_bar, t, noise, **options)


def posterior(x_t: torch.Tensor, x0_hat: torch.Tensor, alpha_bar_t, alpha_bar_s, t, s, **options):
    """Mean and variance of ``x_s`` given ``x_t`` and ``x0_hat`` for ``s < t``, with ``G`` taken from ``x0_hat``.

    ``alpha_bar_s = 1`` (``s = 0``, the data) gives mean ``x0_hat`` and variance 0.
    """
    require_finite_tensor("x_t", x_t)
    require_finite_tensor("x0_hat", x0_hat)
    alpha_bar_t, alpha_bar_s = per_item(alpha_bar_t, x_t), per_item(alpha_bar_s, x_t)
    if (alpha_bar_t >= alpha_bar_s).any():
        raise ValueError("alpha_bar_t must be below alpha_bar_s: the step must go from more noise to less")
    edges = edge_map(x0_hat)
    var_t = noise_scale(alpha_bar_t, t, edges, **options).square()
    var_s = noise_scale(alpha_bar_s, s, edges, **options).square()
    alpha_ts_sq = alpha_bar_t / alpha_bar_s
    var_ts = var_t - alpha_ts_sq * var_s
    # Var = (1/var_s + a^2/var_ts)^-1 and its mean, multiplied out with var_ts + a^2 var_s = var_t.
    # Nothing divides by var_s, so s = 0 (var_s = 0) gives mean exactly x0_hat and variance 0.
    mean = (alpha_ts_sq.sqrt() * var_s / var_t) * x_t + (alpha_bar_s.sqrt() * var_ts / var_t) * x0_hat
    return mean, var_s * var_ts / var_t


def schedule_time(t_index, num_steps: int) -> torch.Tensor:
    """Normalised time ``(i + 1) / T`` of schedule entry ``i``; entry -1 is the data at t = 0."""
    return (torch.as_tensor(t_index) + 1) / num_steps


def _require_alpha_bar_schedule(alpha_bars: torch.Tensor) -> None:
    if alpha_bars.ndim != 1 or alpha_bars.numel() == 0:
        raise ValueError(f"alpha_bar_schedule must be 1-D with one value per step, got shape {tuple(alpha_bars.shape)}")
    require_finite_tensor("alpha_bar_schedule", alpha_bars)
    if (alpha_bars <= 0).any() or (alpha_bars >= 1).any() or (alpha_bars[1:] >= alpha_bars[:-1]).any():
        raise ValueError("alpha_bar_schedule must decrease strictly inside (0, 1), from the first step to the last")


def training_loss(model, x0: torch.Tensor, alpha_bar_schedule: torch.Tensor, t_index, noise: torch.Tensor,
                  **options) -> torch.Tensor:
    """Batch mean of ``||model(x_t, t_index) - g_t * noise||^2``: the network predicts the scaled noise.

    ``t_index`` is one schedule index per item (or one for all); ``model`` gets it as a (B,) tensor.
    """
    _require_alpha_bar_schedule(alpha_bar_schedule)
    t_index = torch.as_tensor(t_index, device=alpha_bar_schedule.device).expand(x0.shape[0])
    alpha_bar = alpha_bar_schedule[t_index]
    target = scaled_noise(x0, alpha_bar, schedule_time(t_index, len(alpha_bar_schedule)), noise, **options)
    x_t = per_item(alpha_bar, x0).sqrt() * x0 + target
    return (model(x_t, t_index) - target).square().flatten(1).sum(dim=1).mean()


@torch.no_grad()
def sample(model, shape_or_x_T, alpha_bar_schedule: torch.Tensor, callback=None, generator=None,
           **options) -> torch.Tensor:
    """Ancestral sampling with the edge-preserving posterior for ``model(x_t, t_index) -> g_t * eps``.

    Starts from ``x_T`` or from standard normal noise of the given shape and walks every
    schedule entry down to the data; ``callback`` gets ComfyUI's step dict, with the VP sigma.
    """
    _require_alpha_bar_schedule(alpha_bar_schedule)
    if isinstance(shape_or_x_T, torch.Tensor):
        x = shape_or_x_T
    else:
        x = torch.randn(tuple(shape_or_x_T), generator=generator, device=alpha_bar_schedule.device)
    num_steps = len(alpha_bar_schedule)
    for step, index in enumerate(reversed(range(num_steps))):
        alpha_bar_t = alpha_bar_schedule[index]
        alpha_bar_s = alpha_bar_schedule[index - 1] if index > 0 else torch.ones_like(alpha_bar_t)
        t_index = torch.full((x.shape[0],), index, dtype=torch.long, device=x.device)
        x0_hat = (x - model(x, t_index)) / per_item(alpha_bar_t, x).sqrt()
        report_step(callback, x, step, torch.sqrt(1 / alpha_bar_t - 1), x0_hat)
        mean, variance = posterior(x, x0_hat, alpha_bar_t, alpha_bar_s, schedule_time(index, num_steps),
                                   schedule_time(index - 1, num_steps), **options)
        x = mean
        if index > 0:
            x = x + variance.sqrt() * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return x


def edge_preserving_noise(noise: torch.Tensor, edges: torch.Tensor, t, strength: float = 1.0,
                          **options) -> torch.Tensor:
    """Standard normal ``noise`` scaled down on ``edges`` for models trained on isotropic noise.

    ``noise * (strength * r + 1 - strength)`` with ``r`` from :func:`relative_noise_scale`,
    which does not depend on alpha_bar: strength 0 returns ``noise``, 1 the full edge scaling.
    ``edges`` is a ``G`` map at the noise's size, with one channel or the noise's.
    """
    require_finite_tensor("noise", noise)
    require_map_matches("edges", edges, noise)
    require_finite_number("strength", strength)
    if not 0 <= strength <= 1:
        raise ValueError(f"strength must lie in [0, 1], got {strength}")
    ratio = relative_noise_scale(t, edges.to(noise.dtype), **options)
    if strength != 1:
        ratio.mul_(strength).add_(1 - strength)
    return noise * ratio


def _block_mean(image: torch.Tensor, block_height: int, block_width: int) -> torch.Tensor:
    """The mean of each ``block_height`` x ``block_width`` block of a (B, C, H, W) image: area averaging by whole blocks.

    An IMAGE moved channels-first is (B, H, W, C) in memory; summed in that order, block rows
    first, each sum reads whole contiguous rows, which is several times faster than
    interpolate's area mode, close to one pass over the image.
    """
    pixels = image.movedim(1, -1)
    batch, height, width, channels = pixels.shape
    rows = pixels.reshape(batch, height // block_height, block_height, width * channels).sum(dim=2)
    blocks = rows.reshape(batch, height // block_height, width // block_width, block_width, channels).sum(dim=3)
    return blocks.div_(block_height * block_width).movedim(-1, 1)


def resize_to_latent(image: torch.Tensor, latent_size: tuple[int, int], name: str = "image") -> torch.Tensor:
    """Area-average a (B, C, H, W) ``image`` to ``latent_size`` (height, width), whose aspect must match to a pixel.

    ``name`` is the input named in errors.
    """
    height, width = image.shape[-2:]
    latent_height, latent_width = latent_size
    if abs(height * latent_width / width - latent_height) > 1 or abs(width * latent_height / height - latent_width) > 1:
        raise ValueError(f"{name} is {height}x{width} pixels, which does not fit the aspect ratio of the "
                         f"{latent_height}x{latent_width} latent")
    if height % latent_height or width % latent_width:
        resized = F.interpolate(image, size=(latent_height, latent_width), mode="area")
    else:
        resized = _block_mean(image, height // latent_height, width // latent_width)
    # Checked after averaging, which keeps any NaN or inf, at a fraction of the cost on a large image.
    require_finite_tensor(name, resized)
    return resized
