"""A weight map from the change itself: where a cheap edit actually changed the source.

Not in the NGDM paper, nor in DiffEdit: both read Lambda off the difference between the two
prompts' predictions at one noise level, which on the pack's shapes model lies only partly on
the region the edit has to change. Here a short edit-friendly edit under the target is made
first, and Lambda is where it moved the source: the per-pixel change, smoothed, normalised,
thresholded (or graded by the size of the change), with its holes filled. A replaced object changes mostly along its outline (its
inside may keep its colour), and the filling restores the inside of that outline, so the map
covers the union of the old and the new object rather than only where they differ.
"""

import torch
import torch.nn.functional as F

from .edit_friendly import edit, invert_edit_friendly
from .ngdm import gaussian_blur, normalize_per_item
from .validation import require_at_least, require_finite_number, require_finite_tensor, require_non_negative

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
                   threshold: float = 0.2, softness: float = 0.0) -> torch.Tensor:
    """Lambda (B, 1, ...) from the mean absolute change over channels of ``edited`` against ``source``.

    ``edited`` holds one or more edits of each item, stacked along the batch
    (``(E * B, ...)``, edit-major, as ``source.repeat``): their changes are averaged, which keeps
    what every edit changes and halves what one edit's noise alone moved. With ``softness`` 0
    the map is binary: 1 where the normalised change exceeds ``threshold``. With ``softness`` > 0
    it is graded by the size of the change, ``clamp((A - threshold) / softness, 0, 1)``, so a
    pixel the edit barely moved starts late under NGDM and one it moved most starts first.
    Either way, the regions the changed pixels enclose are set to 1.
    """
    require_non_negative("smoothing", smoothing)
    require_non_negative("softness", softness)
    require_finite_number("threshold", threshold)
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    if edited.shape[0] % source.shape[0] or edited.shape[1:] != source.shape[1:]:
        raise ValueError(f"edited has shape {tuple(edited.shape)}: it must hold whole edits of the source, "
                         f"shape (E * {source.shape[0]}, {', '.join(map(str, source.shape[1:]))})")
    edits = edited.shape[0] // source.shape[0]
    differences = (edited - source.repeat(edits, *([1] * (source.ndim - 1)))).abs().mean(dim=1, keepdim=True)
    change = gaussian_blur(differences.reshape(edits, -1, *differences.shape[1:]).mean(dim=0), smoothing)
    # An edit that retraces the source still differs from it by float rounding, which the
    # normalisation would blow up into a map: a change this far below the source's scale is none.
    floor = NO_CHANGE * source.flatten(1).abs().amax(dim=1).reshape(-1, *([1] * (source.ndim - 1)))
    normalized = torch.where(change > floor, normalize_per_item(change), torch.zeros_like(change))
    changed = (normalized > threshold).to(source.dtype)
    enclosed = fill_holes(changed)
    if softness == 0:
        return enclosed
    graded = ((normalized - threshold) / softness).clamp(0, 1)
    return torch.maximum(graded, enclosed - changed)


@torch.no_grad()
def change_weight_map(denoiser, source: torch.Tensor, source_cond, target_cond, sigmas: torch.Tensor,
                      smoothing: float = 1.0, threshold: float = 0.2, parametrization: str = "vp",
                      generator: torch.Generator | None = None, progress=None,
                      noise: torch.Tensor | None = None, edits: int = 1, softness: float = 0.0) -> torch.Tensor:
    """Lambda in [0, 1], shaped like ``source`` with one channel, from ``edits`` edit-friendly edits over ``sigmas``.

    ``denoiser(x, sigma, cond) -> x0`` is guided as the edit will be; ``sigmas`` is the cheap
    edit's schedule (a few steps, from the level the edit starts at). Each edit costs one model
    evaluation per step to invert and one per step to replay, ``2 * edits * (len(sigmas) - 1)``
    in all (twice that under classifier-free guidance); the edits run as one batch, each with its
    own inversion noises. ``threshold`` and ``softness`` are :func:`change_weights`'. The
    noises come from ``generator``, or are given as ``noise``, shape
    ``(len(sigmas), edits * B, ...)`` (:func:`~ngdm_core.edit_friendly.invert_edit_friendly`'s
    for the repeated batch), for example each item's own, so that an item's map does not depend
    on its batch.
    """
    require_finite_tensor("source", source)
    require_at_least("edits", edits, 1)
    steps = len(sigmas) - 1

    def inversion_progress(done, _):
        if progress is not None:
            progress(done, 2 * steps)

    def replay_progress(info):
        if progress is not None:
            progress(steps + info["i"] + 1, 2 * steps)

    repeated = source.repeat(edits, *([1] * (source.ndim - 1)))
    inversion = invert_edit_friendly(denoiser, repeated, sigmas, source_cond, parametrization=parametrization,
                                     generator=generator, progress=inversion_progress, noise=noise)
    edited = edit(denoiser, inversion, target_cond, callback=replay_progress)
    return change_weights(source, edited, smoothing, threshold, softness)
