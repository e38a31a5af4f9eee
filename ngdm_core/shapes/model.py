"""The pack's own small models for the shapes data set: a class-conditional U-Net and a classifier.

The U-Net predicts eps on DDPM's 1000-step linear-beta schedule, conditioned on a class index,
with one extra index (``NULL_CLASS``) for the unconditional branch of classifier-free guidance.
:class:`ShapesDenoiser` adapts it to the ``D(x, sigma, cond) -> x0`` interface every method in
``ngdm_core`` uses, with k-diffusion's VP sigmas. Trained weights ship in ``ngdm_core/weights``.
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..rectifier import ddpm_alpha_bar, timestep_embedding
from ..schedule import per_item
from .data import CLASSES

WEIGHTS_DIR = Path(__file__).parent.parent / "weights"
UNET_FILE = WEIGHTS_DIR / "shapes_unet.safetensors"
CLASSIFIER_FILE = WEIGHTS_DIR / "shapes_classifier.safetensors"
NULL_CLASS = len(CLASSES)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, embedding_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.embedding = nn.Linear(embedding_dim, out_channels)
        self.norm2 = nn.GroupNorm(8, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.embedding(embedding)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class ShapesUNet(nn.Module):
    """Three resolutions (32, 16, 8 for a 32x32 image), one residual block each way, skip connections."""

    def __init__(self, channels: tuple[int, int] = (32, 64), num_classes: int = len(CLASSES), time_dim: int = 64):
        super().__init__()
        width, deep = channels
        embedding_dim = 4 * width
        self.config = {"channels": list(channels), "num_classes": num_classes, "time_dim": time_dim}
        self.time_dim = time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, embedding_dim), nn.SiLU(), nn.Linear(embedding_dim, embedding_dim))
        self.class_embedding = nn.Embedding(num_classes + 1, embedding_dim)
        self.input = nn.Conv2d(3, width, 3, padding=1)
        self.down = nn.ModuleList([ResBlock(width, width, embedding_dim), ResBlock(width, deep, embedding_dim),
                                   ResBlock(deep, deep, embedding_dim)])
        self.downsample = nn.ModuleList([nn.Conv2d(width, width, 3, stride=2, padding=1),
                                         nn.Conv2d(deep, deep, 3, stride=2, padding=1)])
        self.middle = ResBlock(deep, deep, embedding_dim)
        self.up = nn.ModuleList([ResBlock(2 * deep, deep, embedding_dim), ResBlock(2 * deep, deep, embedding_dim),
                                 ResBlock(deep + width, width, embedding_dim)])
        self.output = nn.Sequential(nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, 3, 3, padding=1))

    def encode(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> tuple:
        """The first half of :meth:`forward`: ``(h, skips, embedding)``, ``h`` the middle block's output (bottleneck)."""
        embedding = self.time_mlp(timestep_embedding(t, self.time_dim).to(x)) + self.class_embedding(labels)
        h = self.input(x)
        skips = []
        for level, block in enumerate(self.down):
            if level > 0:
                h = self.downsample[level - 1](h)
            h = block(h, embedding)
            skips.append(h)
        return self.middle(h, embedding), skips, embedding

    def decode(self, h: torch.Tensor, skips: list, embedding: torch.Tensor) -> torch.Tensor:
        """The second half of :meth:`forward`: eps from the bottleneck ``h`` and the encoder's ``skips``."""
        skips = list(skips)
        for level, block in enumerate(self.up):
            if level > 0:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
            h = block(torch.cat([h, skips.pop()], dim=1), embedding)
        return self.output(h)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, bottleneck=None) -> torch.Tensor:
        """eps; ``bottleneck(h, t)``, if given, replaces the middle block's output ``h`` before the decoder reads it."""
        h, skips, embedding = self.encode(x, t, labels)
        if bottleneck is not None:
            h = bottleneck(h, t)
        return self.decode(h, skips, embedding)


class ShapesClassifier(nn.Module):
    """A small CNN that names the shape in an image, to judge whether an edit reached its target class."""

    def __init__(self, width: int = 32, num_classes: int = len(CLASSES)):
        super().__init__()
        self.config = {"width": width, "num_classes": num_classes}
        self.layers = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.SiLU(),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


class ShapesDenoiser:
    """:class:`ShapesUNet` as ``D(x, sigma, cond) -> x0`` with k-diffusion VP sigmas.

    ``x = x0 + sigma * eps`` is the DDPM state ``x_t`` scaled by ``sqrt(1 + sigma^2)``; ``sigma``
    maps to a fractional timestep by interpolating the schedule in log sigma, as ComfyUI's
    discrete model sampling does. ``cond`` is a class index, or one per source item (tiled when
    the batch repeats the sources, as the weight map's seeds do), or ``None`` for the
    unconditional branch. Predictions are clipped to [-1, 1].
    """

    parametrization = "vp"

    def __init__(self, unet: ShapesUNet, alpha_bar: torch.Tensor | None = None):
        self.unet = unet
        alpha_bar = ddpm_alpha_bar() if alpha_bar is None else alpha_bar
        self.schedule_sigmas = ((1 - alpha_bar) / alpha_bar).sqrt()
        self.log_sigmas = self.schedule_sigmas.log()

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.clamp(min=float(self.schedule_sigmas[0])).log()
        upper = torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(log_sigmas) - 1)
        low, high = log_sigmas[upper - 1], log_sigmas[upper]
        fraction = ((log_sigma - low) / (high - low)).clamp(0, 1)
        return upper - 1 + fraction

    @property
    def sigma_min(self) -> float:
        """The schedule's smallest sigma, timestep 0 (ComfyUI's ``model_sampling.sigma_min``)."""
        return float(self.schedule_sigmas[0])

    def sigma_to_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """ComfyUI's ``ModelSamplingDiscrete.timestep``: the index of the nearest schedule level in log sigma.

        An integer, unlike :meth:`timestep` (the fractional one the U-Net is fed here); it is what
        DifferentialDiffusion's threshold is linear in.
        """
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        distances = sigma.log().to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return distances.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def timestep_to_sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """ComfyUI's ``ModelSamplingDiscrete.sigma``: log sigma interpolated linearly between integer timesteps."""
        timestep = torch.as_tensor(timestep)
        t = timestep.float().to(self.log_sigmas.device).clamp(0, len(self.log_sigmas) - 1)
        low, high, fraction = t.floor().long(), t.ceil().long(), t.frac()
        log_sigma = (1 - fraction) * self.log_sigmas[low] + fraction * self.log_sigmas[high]
        return log_sigma.exp().to(timestep.device)

    def percent_to_sigma(self, percent: float) -> float:
        """ComfyUI's ``ModelSamplingDiscrete.percent_to_sigma``: 0 is the top of the schedule, 1 its end."""
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return self.timestep_to_sigma(torch.tensor((1.0 - percent) * (len(self.log_sigmas) - 1))).item()

    def timestep_conversions(self) -> dict:
        """The ``to_timestep``, ``to_sigma`` and ``sigma_min`` the linear mapping of :func:`ngdm_core.ngdm.start_sigmas` needs."""
        return {"to_timestep": self.sigma_to_timestep, "to_sigma": self.timestep_to_sigma, "sigma_min": self.sigma_min}

    def sigma_at(self, strength: float) -> float:
        """The sigma ``strength`` of the way up the schedule (ComfyUI's ``percent_to_sigma(1 - strength)``)."""
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        return float(self.schedule_sigmas[round(strength * (len(self.schedule_sigmas) - 1))])

    def sigmas(self, steps: int) -> torch.Tensor:
        """``steps`` levels evenly spaced in timestep from the last to the first, then 0.

        Not ComfyUI's "simple" scheduler, whose last level is one step above the first timestep
        (t = 49 of 999 at 20 steps, sigma 0.19, where this ends at sigma_min 0.01): the core
        benchmarks' figures are on this schedule, and ``benchmarks/results/comfy_quality.md`` measures
        what ComfyUI's changes.
        """
        timesteps = torch.linspace(len(self.schedule_sigmas) - 1, 0, steps).round().long()
        return torch.cat([self.schedule_sigmas[timesteps], torch.zeros(1)])

    def eps(self, x_t: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The noise prediction at the DDPM state ``x_t`` of k-diffusion noise level ``sigma``."""
        return self.unet(x_t, self.timestep(sigma), labels)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        labels = torch.as_tensor(NULL_CLASS if cond is None else cond, device=x.device).reshape(-1)
        labels = labels.repeat(x.shape[0] // labels.numel())
        scaled = x / per_item((1 + sigma**2).sqrt(), x)
        eps = self.eps(scaled, sigma, labels.long())
        # Clipped to the data range, as DDPM's pixel-space samplers do: at sigma ~ 157 any error
        # in eps is magnified 157 times, and unclipped predictions drift to saturated colours.
        return (x - per_item(sigma, x) * eps).clamp(-1, 1)


def save_model(model: nn.Module, path, **metadata) -> None:
    tensors = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"config": json.dumps(model.config),
                                             **{key: json.dumps(value) for key, value in metadata.items()}})


def read_metadata(path) -> dict:
    with safe_open(str(path), framework="pt") as file:
        return {key: json.loads(value) for key, value in (file.metadata() or {}).items()}


def load_model(kind: type, path) -> nn.Module:
    """Rebuild a saved :class:`ShapesUNet` or :class:`ShapesClassifier` in eval mode."""
    if not Path(path).exists():
        raise FileNotFoundError(f"no weights at {path}; train them with `python -m ngdm_core.shapes.training`")
    model = kind(**read_metadata(path)["config"])
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)


def load_denoiser(path=UNET_FILE) -> ShapesDenoiser:
    return ShapesDenoiser(load_model(ShapesUNet, path))


def load_classifier(path=CLASSIFIER_FILE) -> ShapesClassifier:
    return load_model(ShapesClassifier, path)


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())

