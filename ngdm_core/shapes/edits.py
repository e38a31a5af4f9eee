"""Every edit method of the pack, and its baselines, on the shapes model; and the metrics that judge them.

Used by the demo and the quality benchmark. Each edit takes a batch of sources, their class
and the target class (one per item), and returns the edited images; all sample with Euler
under classifier-free guidance, so methods differ only in the method. Every random draw is the
item's own, seeded by ``(settings.seed, the item's index in its data set, what it is for)``:
an item's edit is the same whatever batch it is edited in, so ``demo --set 2 --index N``
reproduces the benchmark's item N.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..change_map import change_weight_map
from ..denoisers import classifier_free_guidance
from ..edit_friendly import edit, edit_per_pixel_time, first_edit_step, invert_ddim, invert_edit_friendly
from ..masked import sample_masked
from ..ngdm import prompt_difference, sample_per_pixel_time
from ..samplers import sample_euler
from ..schedule import noise_source
from .data import make_batch
from .model import ShapesDenoiser

# What a draw is for: each has its own stream, so one method's draws never shift another's.
START_NOISE, MAP_NOISE, INVERSION_NOISE, CHANGE_MAP_NOISE = range(4)


@dataclass
class EditSettings:
    steps: int = 50
    cfg: float = 3.0
    seed: int = 0
    map_strength: float = 0.5  # the noise level the weight map is read at, as a fraction of the schedule
    num_maps: int = 10


class EvaluationCounter:
    """The denoiser, counting model evaluations: a call on a batch of ``B`` items counts ``B``.

    One evaluation is one U-Net forward pass for one item (a guided step is two: conditional and
    unconditional).
    """

    def __init__(self, denoiser: ShapesDenoiser):
        self.denoiser = denoiser
        self.evaluations = 0

    def __call__(self, x, sigma, cond=None):
        self.evaluations += x.shape[0]
        return self.denoiser(x, sigma, cond)

    def __getattr__(self, name):
        return getattr(self.denoiser, name)


def item_indices(source: torch.Tensor, indices=None) -> list[int]:
    """The items' indices in their data set: ``0 .. B - 1`` unless given."""
    return list(range(source.shape[0])) if indices is None else [int(index) for index in indices]


def item_seed(settings: EditSettings, index: int, purpose: int) -> int:
    """The seed of item ``index``'s draws for ``purpose``; a ComfyUI node given it as its seed draws the same noise."""
    return int(np.random.SeedSequence([settings.seed, index, purpose]).generate_state(1)[0])


def item_noise(source: torch.Tensor, settings: EditSettings, purpose: int, indices=None, leading=()) -> torch.Tensor:
    """Standard normal noise of shape ``(*leading, *source.shape)``, each item's drawn from its own generator."""
    draws = []
    for index in item_indices(source, indices):
        seed = item_seed(settings, index, purpose)
        draws.append(torch.randn((*leading, *source.shape[1:]), generator=torch.Generator().manual_seed(seed)))
    return torch.stack(draws, dim=len(leading)).to(source)


def guided(denoiser: ShapesDenoiser, settings: EditSettings):
    # At scale 1, D_u + 1 * (D_c - D_u) is D_c: one evaluation instead of two.
    return denoiser if settings.cfg == 1 else classifier_free_guidance(denoiser, None, settings.cfg)


def map_difference(denoiser, source, source_class, target_class, settings: EditSettings, indices=None,
                   conditional_only: bool = False) -> torch.Tensor:
    """``|D_target - D_source|`` averaged over the items' own map noises, under CFG or from the conditional branch alone.

    Min-max normalisation cancels CFG's scale on this difference, so the conditional-only
    difference gives the same map at half the model evaluations.
    """
    model = denoiser if conditional_only else guided(denoiser, settings)
    noise = item_noise(source, settings, MAP_NOISE, indices, leading=(settings.num_maps,))
    return prompt_difference(model, source, source_class, target_class, denoiser.sigma_at(settings.map_strength),
                             noise)


def change_map(denoiser, source, source_class, target_class, settings: EditSettings, steps: int, edits: int = 1,
               strength: float = 1.0, softness: float = 0.0, indices=None) -> torch.Tensor:
    """:func:`ngdm_core.change_map.change_weight_map` with each item's own draws, from ``edits`` edits of ``steps`` steps.

    The cheap edits start at ``strength`` of the schedule, over the steps KSampler runs at that
    denoise (``steps / strength`` steps of the whole schedule, the last ``steps`` of them).
    """
    noise = item_noise(source, settings, CHANGE_MAP_NOISE, indices, leading=(edits, steps + 1))
    noise = noise.transpose(0, 1).reshape(steps + 1, edits * source.shape[0], *source.shape[1:])
    sigmas = denoiser.sigmas(steps if strength >= 1 else int(steps / strength))[-(steps + 1):]
    return change_weight_map(guided(denoiser, settings), source, source_class, target_class, sigmas, noise=noise,
                             edits=edits, softness=softness)


def sdedit(denoiser, source, target_class, settings: EditSettings, strength: float, indices=None) -> torch.Tensor:
    """Noise the whole image to ``strength`` of the schedule and denoise under the target."""
    sigmas = truncated_sigmas(denoiser, settings, strength)
    x = noise_source(source, item_noise(source, settings, START_NOISE, indices), sigmas[0])
    model = guided(denoiser, settings)
    return sample_euler(lambda x, sigma: model(x, sigma, target_class), x, sigmas)


def truncated_sigmas(denoiser, settings: EditSettings, strength: float) -> torch.Tensor:
    """The last ``strength`` of the schedule's steps (at least one), as SDEdit's strength and NGDM's start use it."""
    sigmas = denoiser.sigmas(settings.steps)
    return sigmas[min(round((1 - strength) * settings.steps), settings.steps - 1):]


def per_pixel_time(denoiser, source, target_class, weights_map, settings: EditSettings, mapping="ngdm",
                   start: float = 1.0, start_rule: str = "first_at_or_below", indices=None):
    """Algorithm 1 from ``start`` of the schedule: NGDM's power law, or DifferentialDiffusion's ``"linear"`` mapping.

    The linear mapping is linear in the model's timestep, with ComfyUI's conversions, as
    DifferentialDiffusion's node is; with a binary map it is hard blending.
    """
    return sample_per_pixel_time(guided(denoiser, settings), source, weights_map,
                                 truncated_sigmas(denoiser, settings, start),
                                 item_noise(source, settings, START_NOISE, indices), target_class, mapping=mapping,
                                 conversions=denoiser.timestep_conversions(), start_rule=start_rule)


def masked_sampling(denoiser, source, target_class, mask, settings: EditSettings, start: float = 1.0, indices=None):
    """ComfyUI's SetLatentNoiseMask + KSampler from ``start`` of the schedule (KSampler's denoise), the same noise as NGDM's."""
    return sample_masked(guided(denoiser, settings), source, mask, truncated_sigmas(denoiser, settings, start),
                         item_noise(source, settings, START_NOISE, indices), target_class, max_denoise=start >= 1)


def invert(denoiser, source, source_class, settings: EditSettings, skip: float, indices=None):
    steps_left = settings.steps - first_edit_step(settings.steps, skip)
    noise = item_noise(source, settings, INVERSION_NOISE, indices, leading=(steps_left + 1,))
    return invert_edit_friendly(guided(denoiser, settings), source, denoiser.sigmas(settings.steps), source_class,
                                skip=skip, noise=noise)


def edit_friendly(denoiser, inversion, target_class, settings: EditSettings, weights_map=None,
                  start_rule: str = "first_at_or_below") -> torch.Tensor:
    """Replay the inversion under the target; with ``weights_map``, NGDM over the inversion."""
    if weights_map is None:
        return edit(guided(denoiser, settings), inversion, target_class)
    return edit_per_pixel_time(guided(denoiser, settings), inversion, weights_map, target_class,
                               start_rule=start_rule)


def ddim_reconstruction(denoiser, source, source_class, settings: EditSettings) -> torch.Tensor:
    """DDIM inversion under the source class, then the deterministic Euler replay back down."""
    sigmas = denoiser.sigmas(settings.steps)
    model = guided(denoiser, settings)
    noisy = invert_ddim(model, source, sigmas, source_class)
    return sample_euler(lambda x, sigma: model(x, sigma, source_class), noisy, sigmas)


def ground_truth_edit(data_set: int, count: int, target_class: torch.Tensor, start: int = 0):
    """The items rendered as their target class, and the union of the source's and the target's object masks.

    Only the object is redrawn (background, colour, place and size stay), so the ground-truth
    edit differs from the source exactly on that union: it is the reference region.
    """
    sources = make_batch(data_set, count, start=start)
    edited = make_batch(data_set, count, start=start, shapes=target_class)
    return edited.images, torch.maximum(sources.masks, edited.masks)


# --- metrics ---------------------------------------------------------------------------------------

PRESERVE_MARGIN = 2  # pixels the ground-truth union (or region mask) is dilated by before the outside is measured


def dilated(masks: torch.Tensor, pixels: int) -> torch.Tensor:
    return F.max_pool2d(masks, 2 * pixels + 1, stride=1, padding=pixels) if pixels > 0 else masks


def psnr(images: torch.Tensor, references: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """PSNR per item over ``region`` (1 = counted), for images in [-1, 1] (peak-to-peak 2)."""
    squared = ((images.clamp(-1, 1) - references) ** 2 * region).sum((1, 2, 3))
    mse = squared / (region.sum((1, 2, 3)) * images.shape[1]).clamp(min=1)
    return 10 * torch.log10(4 / mse.clamp(min=1e-10))


def ssim(images: torch.Tensor, references: torch.Tensor, region: torch.Tensor, window_sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM per item over ``region`` (Wang et al. 2004): the standard 11x11 Gaussian window of sigma 1.5.

    Images in [-1, 1] are compared on [0, 1] (data range 1), with population statistics, as
    scikit-image's ``structural_similarity(gaussian_weights=True, use_sample_covariance=False)``.
    Borders are reflected; scikit-image crops them instead, so the two agree away from the border.
    """
    radius = 5
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-offsets**2 / (2 * window_sigma**2))
    kernel = (kernel / kernel.sum()).reshape(1, 1, 1, -1)
    channels = images.shape[1]

    def local_mean(x):
        x = F.pad(x, (radius,) * 4, mode="reflect")
        x = F.conv2d(x, kernel.expand(channels, 1, 1, -1), groups=channels)
        return F.conv2d(x, kernel.transpose(-1, -2).expand(channels, 1, -1, 1), groups=channels)

    x, y = (images.clamp(-1, 1) + 1) / 2, (references + 1) / 2
    mean_x, mean_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mean_x**2
    var_y = local_mean(y * y) - mean_y**2
    covariance = local_mean(x * y) - mean_x * mean_y
    c1, c2 = 0.01**2, 0.03**2
    score = ((2 * mean_x * mean_y + c1) * (2 * covariance + c2)) / ((mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2))
    return (score.mean(1, keepdim=True) * region).sum((1, 2, 3)) / region.sum((1, 2, 3)).clamp(min=1)


def iou(predicted: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Intersection over union per item; a soft ``predicted`` map gives the soft (fuzzy) IoU."""
    intersection = torch.minimum(predicted, masks).sum((1, 2, 3))
    union = torch.maximum(predicted, masks).sum((1, 2, 3))
    return intersection / union.clamp(min=1e-8)


def edit_success(classifier, images: torch.Tensor, target_class: torch.Tensor) -> torch.Tensor:
    """1 where the classifier names the target class, per item."""
    with torch.no_grad():
        return (classifier(images.clamp(-1, 1)).argmax(1) == target_class).float()
