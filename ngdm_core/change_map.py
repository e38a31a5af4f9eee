"""A weight map from the change itself: where a cheap edit actually changed the source.

Not in the NGDM paper, nor in DiffEdit: both read Lambda off the difference between the two
prompts' predictions at one noise level, which on the pack's shapes model lies only partly on
the region the edit has to change. Here a short edit-friendly edit under the target is made
first, and Lambda is where it moved the source: the per-pixel change, smoothed, normalised,
thresholded, with its holes filled. A replaced object changes mostly along its outline (its
inside may keep its colour), and the filling restores the inside of that outline, so the map
covers the union of the old and the new object rather than only where they differ.
"""

import torch
import torch.nn.functional as F

from .edit_friendly import edit, invert_edit_friendly
from .ngdm import gaussian_blur, normalize_per_item
from .validation import require_finite_number, require_finite_tensor, require_non_negative

NO_CHANGE = 1e-4  # of the source's largest magnitude


def fill_holes(mask: torch.Tensor) -> torch.Tensor:
    """Binary ``mask`` (..., H, W) with every region of zeros that does not touch the border set to one.

    A flood fill from the border through the zeros, one 3x3 (8-connected) step at a time.
    """
    height, width = mask.shape[-2:]
    planes = mask.reshape(-1, 1, height, width).to(torch.float32)
    free = 1 - planes
    border = torch.ones_like(planes)
    border[..., 1:-1, 1:-1] = 0
    outside = border * free
    for _ in range(height * width):
        grown = F.max_pool2d(outside, 3, stride=1, padding=1) * free
        if torch.equal(grown, outside):
            break
        outside = grown
    return (1 - outside).reshape(mask.shape).to(mask.dtype)


def change_weights(source: torch.Tensor, edited: torch.Tensor, smoothing: float = 1.0,
                   threshold: float = 0.2) -> torch.Tensor:
    """Binary Lambda (B, 1, ...) from the mean absolute change over channels of ``edited`` against ``source``."""
    require_non_negative("smoothing", smoothing)
    require_finite_number("threshold", threshold)
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    change = gaussian_blur((edited - source).abs().mean(dim=1, keepdim=True), smoothing)
    # An edit that retraces the source still differs from it by float rounding, which the
    # normalisation would blow up into a map: a change this far below the source's scale is none.
    floor = NO_CHANGE * source.flatten(1).abs().amax(dim=1).reshape(-1, *([1] * (source.ndim - 1)))
    changed = (normalize_per_item(change) > threshold) & (change > floor)
    return fill_holes(changed.to(source.dtype))


@torch.no_grad()
def change_weight_map(denoiser, source: torch.Tensor, source_cond, target_cond, sigmas: torch.Tensor,
                      smoothing: float = 1.0, threshold: float = 0.2, parametrization: str = "vp",
                      generator: torch.Generator | None = None, progress=None,
                      noise: torch.Tensor | None = None) -> torch.Tensor:
    """Lambda in {0, 1}, shaped like ``source`` with one channel, from an edit-friendly edit over ``sigmas``.

    ``denoiser(x, sigma, cond) -> x0`` is guided as the edit will be; ``sigmas`` is the cheap
    edit's schedule (a few steps, from the level the edit starts at). It costs one model
    evaluation per step to invert and one per step to replay, ``2 * (len(sigmas) - 1)`` in all
    (twice that under classifier-free guidance). ``threshold`` is the fraction of each item's
    largest (smoothed) change a pixel must reach. The inversion's noises come from
    ``generator``, or are given as ``noise`` (:func:`~ngdm_core.edit_friendly.invert_edit_friendly`'s),
    for example each item's own, so that an item's map does not depend on its batch.
    """
    require_finite_tensor("source", source)
    steps = len(sigmas) - 1

    def inversion_progress(done, _):
        if progress is not None:
            progress(done, 2 * steps)

    def replay_progress(info):
        if progress is not None:
            progress(steps + info["i"] + 1, 2 * steps)

    inversion = invert_edit_friendly(denoiser, source, sigmas, source_cond, parametrization=parametrization,
                                     generator=generator, progress=inversion_progress, noise=noise)
    edited = edit(denoiser, inversion, target_cond, callback=replay_progress)
    return change_weights(source, edited, smoothing, threshold)
