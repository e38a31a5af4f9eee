"""A procedural data set with ground truth: one shape on a textured background, and its exact mask.

Each item is drawn from its own generator, seeded by ``(seed, index)``, so an item is the same
whichever batch it is rendered in, and nothing is stored on disk. The object is painted as one
flat colour over the pixels whose centres fall inside the shape, so the mask is exactly the set
of pixels the object covers. Images are ``(3, H, W)`` in [-1, 1], the range the model is trained in.
"""

from dataclasses import dataclass

import numpy as np
import torch

# The world's constants, re-exported: the data set is where its users look for them.
from .catalog import CLASSES, HELD_OUT_SEED, IMAGE_SIZE, TRAINING_SEED, class_index  # noqa: F401


@dataclass
class ShapeBatch:
    images: torch.Tensor       # (N, 3, H, W) in [-1, 1]
    masks: torch.Tensor        # (N, 1, H, W), 1 where the object is drawn
    labels: torch.Tensor       # (N,) class index into CLASSES
    backgrounds: torch.Tensor  # (N, 3, H, W): the image without its object
    colours: torch.Tensor      # (N, 3): the object's flat colour


def _background(rng: np.random.Generator, grid_y: np.ndarray, grid_x: np.ndarray) -> np.ndarray:
    """Two muted colours mixed by stripes, a checkerboard, a gradient or smooth waves, plus grain."""
    size = grid_x.shape[0]
    pattern = rng.integers(4)
    angle = rng.uniform(0, np.pi)
    along = (np.cos(angle) * grid_x + np.sin(angle) * grid_y) / size
    if pattern == 0:
        mix = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 6) * along + rng.uniform(0, 2 * np.pi))
    elif pattern == 1:
        cell = rng.integers(3, 9)
        mix = ((grid_x // cell + grid_y // cell) % 2).astype(np.float64)
    elif pattern == 2:
        mix = along - along.min()
        mix = mix / mix.max()
    else:
        mix = np.zeros_like(along)
        for _ in range(3):
            fy, fx = rng.uniform(0.5, 2.5, 2)
            mix += np.sin(2 * np.pi * (fy * grid_y + fx * grid_x) / size + rng.uniform(0, 2 * np.pi))
        mix = (mix - mix.min()) / (mix.max() - mix.min())
    first, second = rng.uniform(-0.7, 0.5, (2, 3))
    image = first[:, None, None] + (second - first)[:, None, None] * mix[None]
    return image + rng.normal(0, 0.03, image.shape)


def _shape_mask(shape: int, centre_y: float, centre_x: float, radius: float, grid_y, grid_x) -> np.ndarray:
    # Pixel centres, so the mask is exactly the set of pixels painted.
    dy, dx = grid_y + 0.5 - centre_y, grid_x + 0.5 - centre_x
    if shape == 0:
        return dy**2 + dx**2 <= radius**2
    if shape == 1:
        half = radius * 0.85
        return (np.abs(dy) <= half) & (np.abs(dx) <= half)
    # An upright isosceles triangle about as tall and wide as the other shapes.
    top, bottom, half_base = -0.95 * radius, 0.85 * radius, 0.95 * radius
    half_width = (dy - top) / (bottom - top) * half_base
    return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= half_width)


def _object_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A saturated colour far from the background's mean, so the object is always visible."""
    mean = background.reshape(3, -1).mean(axis=1)
    while True:
        colour = rng.uniform(-1, 1, 3)
        colour[rng.integers(3)] = rng.choice([-1.0, 1.0])
        if np.abs(colour - mean).max() > 0.6:
            return colour


def render(seed: int, index: int, shape: int | None = None, size: int = IMAGE_SIZE):
    """Item ``index`` of the set ``seed``: ``(image, mask, label, background, colour)`` as arrays.

    ``shape`` overrides the drawn class and keeps everything else (background, colour, place,
    size): the ground-truth edit of the item into another class.
    """
    rng = np.random.default_rng([seed, index])
    grid_y, grid_x = np.mgrid[0:size, 0:size].astype(np.float64)
    background = _background(rng, grid_y, grid_x)
    label = int(rng.integers(len(CLASSES)))
    radius = rng.uniform(0.19, 0.31) * size
    centre_y, centre_x = rng.uniform(radius + 1, size - radius - 1, 2)
    colour = _object_colour(rng, background)
    label = label if shape is None else shape
    mask = _shape_mask(label, centre_y, centre_x, radius, grid_y, grid_x)
    image = np.where(mask[None], colour[:, None, None], background)
    return np.clip(image, -1, 1), mask, label, np.clip(background, -1, 1), colour


def make_batch(seed: int, count: int, start: int = 0, shapes=None, size: int = IMAGE_SIZE) -> ShapeBatch:
    """Items ``start .. start + count`` of the set ``seed``; ``shapes`` (one class per item) overrides their classes."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    items = [render(seed, start + i, None if shapes is None else int(shapes[i]), size) for i in range(count)]
    images, masks, labels, backgrounds, colours = zip(*items)
    as_tensor = lambda arrays: torch.from_numpy(np.stack(arrays)).float()
    return ShapeBatch(as_tensor(images), as_tensor(masks)[:, None], torch.tensor(labels), as_tensor(backgrounds),
                      as_tensor(colours))
