"""Images the nodes show on themselves (V3 ``ui`` outputs) besides the masks ComfyUI previews as they are."""

import numpy as np
import torch
from PIL import Image, ImageDraw

CURVE_SIZE = (384, 192)
MARGIN = 24
STEP_COLOUR = (170, 190, 230)
MEAN_COLOUR = (20, 60, 170)
# The loss per step swings with each step's random timesteps; its running mean over this share of the
# run is the trend.
MEAN_WINDOW = 0.05


def running_mean(values: list[float], window: int) -> np.ndarray:
    """The mean of each value and up to ``window - 1`` before it."""
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - window)
    return (sums[ends] - sums[starts]) / (ends - starts)


def loss_curve(history: list[float]) -> torch.Tensor:
    """The loss per step (light) and its running mean (dark) against the step, as a ComfyUI IMAGE (1, H, W, 3)."""
    width, height = CURVE_SIZE
    image = Image.new("RGB", CURVE_SIZE, "white")
    draw = ImageDraw.Draw(image)
    mean = running_mean(history, max(1, round(MEAN_WINDOW * len(history))))
    low, high = min(history), max(history)
    span = high - low or 1.0

    def point(step, loss):
        x = MARGIN + (width - 2 * MARGIN) * (step / max(1, len(history) - 1))
        y = height - MARGIN - (height - 2 * MARGIN) * ((loss - low) / span)
        return x, y

    draw.rectangle((MARGIN, MARGIN, width - MARGIN, height - MARGIN), outline=(200, 200, 200))
    for values, colour in ((history, STEP_COLOUR), (mean, MEAN_COLOUR)):
        points = [point(step, loss) for step, loss in enumerate(values)]
        draw.line(points if len(points) > 1 else points * 2, fill=colour, width=2)
    draw.text((MARGIN, 6), f"loss {mean[0]:.4g} -> {mean[-1]:.4g} (running mean), {len(history)} steps", fill="black")
    draw.text((MARGIN, height - MARGIN + 6), f"step 1 .. {len(history)};  loss {low:.4g} .. {high:.4g}",
              fill=(90, 90, 90))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255)[None]
