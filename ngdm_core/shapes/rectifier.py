"""The rectifier on the shapes model: its targets, the embedding pair for edit training, a rectified denoiser.

The shapes world has no text, so the joint image/text embedding of the paper's directional loss
is built from the shipped classifier: ``E_I`` is its penultimate feature (the pooled conv
features before the last linear layer), and ``E_T`` of a class is the mean of that feature over
held-out images of the class. An edit's direction is then ``E_T(target) - E_T(source)``.
"""

from collections.abc import Callable

import torch
from torch import nn

from ..rectifier import Rectifier, conv_targets, rectified_eps_at
from .data import CLASSES, HELD_OUT_SEED, make_batch
from .model import ShapesClassifier, ShapesDenoiser, ShapesUNet

# The U-Net's middle and output blocks, the paper's targets.
TARGET_BLOCKS = ("middle", "up")
# The held-out images whose mean feature is each class's E_T, apart from those the tests edit.
CLASS_EMBEDDING_IMAGES = 96
CLASS_EMBEDDING_START = 1000


def new_rectifier(unet: ShapesUNet, seed: int = 0) -> Rectifier:
    """An untrained rectifier (the identity) for the U-Net's middle and output convs, sized for 32x32 images."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Rectifier.for_model(unet, conv_targets(unet, TARGET_BLOCKS), 3, width=16, feature_dim=32, time_dim=16)


def image_features(classifier: ShapesClassifier) -> Callable[[torch.Tensor], torch.Tensor]:
    """``E_I``: images in [-1, 1] to the classifier's penultimate feature, ``(B, D)``."""
    return nn.Sequential(*list(classifier.layers)[:-1])


@torch.no_grad()
def class_embeddings(classifier: ShapesClassifier, count: int = CLASS_EMBEDDING_IMAGES,
                     start: int = CLASS_EMBEDDING_START, seed: int = HELD_OUT_SEED) -> torch.Tensor:
    """``E_T`` of every class, ``(classes, D)``: the mean feature of the class's images among ``count`` held-out ones."""
    batch = make_batch(seed, count, start)
    features = image_features(classifier)(batch.images)
    missing = [name for index, name in enumerate(CLASSES) if not (batch.labels == index).any()]
    if missing:
        raise ValueError(f"count {count} held-out images hold no {missing[0]}; use more")
    return torch.stack([features[batch.labels == index].mean(0) for index in range(len(CLASSES))])


def edit_directions(embeddings: torch.Tensor, source_class: torch.Tensor, target_class: torch.Tensor) -> torch.Tensor:
    """``E_T(target) - E_T(source)`` per source, ``(N, D)``."""
    return embeddings[target_class] - embeddings[source_class]


class RectifiedShapesDenoiser(ShapesDenoiser):
    """:class:`ShapesDenoiser` with every U-Net call rectified toward ``sources``, as RectifierApply does in ComfyUI.

    Both branches of classifier-free guidance are rectified. ``sources`` has one image per item
    of the batches it will denoise (tiled when a batch repeats them, as the labels are).
    """

    def __init__(self, unet: ShapesUNet, rectifier: Rectifier, sources: torch.Tensor,
                 alpha_bar: torch.Tensor | None = None):
        super().__init__(unet, alpha_bar)
        self.rectifier = rectifier
        self.sources = sources

    def eps(self, x_t: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sources = self.sources.repeat(x_t.shape[0] // self.sources.shape[0], 1, 1, 1)
        return rectified_eps_at(self.unet, self.rectifier, x_t, self.timestep(sigma), sources, 1 / (1 + sigma**2),
                                labels)
