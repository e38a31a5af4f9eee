"""Every edit method of the pack, and its baselines, on the shapes model; and the metrics that judge them.

Used by the demo and the quality benchmark. Each edit takes a batch of sources, their class
and the target class (one per item), and returns the edited images; all sample with Euler
under classifier-free guidance, from a seeded noise, so methods differ only in the method.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..denoisers import classifier_free_guidance
from ..edit_friendly import edit, edit_per_pixel_time, invert_ddim, invert_edit_friendly
from ..ngdm import sample_per_pixel_time, weight_map
from ..samplers import sample_euler
from ..schedule import noise_source
from .model import ShapesDenoiser


@dataclass
class EditSettings:
    steps: int = 50
    cfg: float = 3.0
    seed: int = 0
    map_strength: float = 0.5  # the noise level the weight map is read at, as a fraction of the schedule
    num_maps: int = 10


def guided(denoiser: ShapesDenoiser, settings: EditSettings):
    return classifier_free_guidance(denoiser, None, settings.cfg)


def _noise(source: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.randn(source.shape, generator=torch.Generator().manual_seed(seed))


def weights(denoiser: ShapesDenoiser, source, source_class, target_class, settings: EditSettings, mode="ngdm",
            a: float = 10.0, b: float = 5.0) -> torch.Tensor:
    return weight_map(guided(denoiser, settings), source, source_class, target_class,
                      denoiser.sigma_at(settings.map_strength), settings.num_maps, settings.seed, mode, a=a, b=b)


def sdedit(denoiser, source, target_class, settings: EditSettings, strength: float) -> torch.Tensor:
    """Noise the whole image to ``strength`` of the schedule and denoise under the target."""
    sigmas = denoiser.sigmas(settings.steps)
    sigmas = sigmas[min(round((1 - strength) * settings.steps), settings.steps - 1):]
    x = noise_source(source, _noise(source, settings.seed), sigmas[0])
    model = guided(denoiser, settings)
    return sample_euler(lambda x, sigma: model(x, sigma, target_class), x, sigmas)


def per_pixel_time(denoiser, source, target_class, weights_map, settings: EditSettings, mapping="ngdm"):
    """Algorithm 1: NGDM's power law, or DifferentialDiffusion's ``"linear"`` mapping (a binary map: hard blending)."""
    return sample_per_pixel_time(guided(denoiser, settings), source, weights_map, denoiser.sigmas(settings.steps),
                                 _noise(source, settings.seed), target_class, mapping=mapping)


def invert(denoiser, source, source_class, settings: EditSettings, skip: float):
    generator = torch.Generator().manual_seed(settings.seed)
    return invert_edit_friendly(guided(denoiser, settings), source, denoiser.sigmas(settings.steps), source_class,
                                skip=skip, generator=generator)


def edit_friendly(denoiser, inversion, target_class, settings: EditSettings, weights_map=None) -> torch.Tensor:
    """Replay the inversion under the target; with ``weights_map``, NGDM over the inversion."""
    if weights_map is None:
        return edit(guided(denoiser, settings), inversion, target_class)
    return edit_per_pixel_time(guided(denoiser, settings), inversion, weights_map, target_class)


def ddim_reconstruction(denoiser, source, source_class, settings: EditSettings) -> torch.Tensor:
    """DDIM inversion under the source class, then the deterministic Euler replay back down."""
    sigmas = denoiser.sigmas(settings.steps)
    model = guided(denoiser, settings)
    noisy = invert_ddim(model, source, sigmas, source_class)
    return sample_euler(lambda x, sigma: model(x, sigma, source_class), noisy, sigmas)


# --- metrics ---------------------------------------------------------------------------------------


def dilated(masks: torch.Tensor, pixels: int) -> torch.Tensor:
    return F.max_pool2d(masks, 2 * pixels + 1, stride=1, padding=pixels) if pixels > 0 else masks


def psnr(images: torch.Tensor, references: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """PSNR per item over ``region`` (1 = counted), for images in [-1, 1] (peak-to-peak 2)."""
    squared = ((images.clamp(-1, 1) - references) ** 2 * region).sum((1, 2, 3))
    mse = squared / (region.sum((1, 2, 3)) * images.shape[1]).clamp(min=1)
    return 10 * torch.log10(4 / mse.clamp(min=1e-10))


def ssim(images: torch.Tensor, references: torch.Tensor, region: torch.Tensor, window_sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM per item over ``region``, from Gaussian-window local statistics (Wang et al. 2004)."""
    radius = 3
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
