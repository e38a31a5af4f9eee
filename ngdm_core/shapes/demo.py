"""Edit one image with every method on the pack's own shapes model: ``python -m ngdm_core.shapes.demo`` (or ``python -m ngdm_core.demo``).

Writes a labelled PNG grid (source, weight map, NGDM, edit-friendly, NGDM over the inversion,
SDEdit, hard-mask blending) and a JSON of the metrics for that image. No download, no ComfyUI.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..validation import require_at_least, require_finite_number
from .data import CLASSES, HELD_OUT_SEED, IMAGE_SIZE, class_index, make_batch
from .edits import (EditSettings, dilated, edit_friendly, edit_success, invert, iou, per_pixel_time, psnr,
                           sdedit, ssim, weights)
from .model import load_classifier, load_denoiser

SCALE = 6
LABEL_HEIGHT = 16
PRESERVE_MARGIN = 2  # pixels of dilation around the ground-truth mask before measuring preservation
SDEDIT_STRENGTH = 0.7
EDIT_FRIENDLY_SKIP = 0.3


def load_image(path: str) -> torch.Tensor:
    """An image file as a (1, 3, 32, 32) tensor in [-1, 1], area-resized."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def to_tile(image: torch.Tensor) -> np.ndarray:
    """A (C, H, W) image in [-1, 1] (or a one-channel map in [0, 1] shown as grey) as upscaled RGB bytes."""
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1) * 2 - 1
    array = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return array.repeat(SCALE, axis=0).repeat(SCALE, axis=1)


def write_grid(columns: dict[str, torch.Tensor], path: Path) -> None:
    from PIL import Image, ImageDraw

    tile = IMAGE_SIZE * SCALE
    grid = Image.new("RGB", (tile * len(columns), tile + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(grid)
    for column, (label, image) in enumerate(columns.items()):
        grid.paste(Image.fromarray(to_tile(image)), (column * tile, LABEL_HEIGHT))
        draw.text((column * tile + 3, 2), label, fill="black")
    grid.save(path)


def run(args) -> dict:
    require_at_least("--steps", args.steps, 1)
    require_finite_number("--cfg", args.cfg)
    settings = EditSettings(steps=args.steps, cfg=args.cfg, seed=args.seed, num_maps=args.num_maps)
    denoiser, classifier = load_denoiser(), load_classifier()
    if args.image:
        source, mask = load_image(args.image), None
        source_class = class_index(args.source_class) if args.source_class else int(classifier(source).argmax())
    else:
        item = make_batch(args.set, 1, start=args.index)
        source, mask, source_class = item.images, item.masks, int(item.labels[0])
    target_class = class_index(args.target) if args.target else (source_class + 1) % len(CLASSES)
    target = torch.tensor([target_class])
    source_label = torch.tensor([source_class])
    log = lambda line: print(line, file=sys.stderr, flush=True)
    log(f"editing a {CLASSES[source_class]} into a {CLASSES[target_class]}, {settings.steps} steps")

    timings = {}

    def timed(name, make):
        started = time.time()
        result = make()
        timings[name] = round(time.time() - started, 3)
        log(f"[{len(timings)}/7] {name}: {timings[name]:.1f} s")
        return result

    soft = timed("weight map", lambda: weights(denoiser, source, source_label, target, settings))
    hard = (soft > 0.5).to(soft.dtype)
    inversion = timed("edit-friendly inversion", lambda: invert(denoiser, source, source_label, settings,
                                                                 EDIT_FRIENDLY_SKIP))
    edits = {
        "NGDM": timed("NGDM", lambda: per_pixel_time(denoiser, source, target, soft, settings)),
        "edit-friendly": timed("edit-friendly", lambda: edit_friendly(denoiser, inversion, target, settings)),
        "NGDM + edit-friendly": timed("NGDM + edit-friendly",
                                      lambda: edit_friendly(denoiser, inversion, target, settings, soft)),
        f"SDEdit {SDEDIT_STRENGTH}": timed("SDEdit", lambda: sdedit(denoiser, source, target, settings,
                                                                    SDEDIT_STRENGTH)),
        "hard mask": timed("hard mask", lambda: per_pixel_time(denoiser, source, target, hard, settings, "linear")),
    }
    metrics = {"source_class": CLASSES[source_class], "target_class": CLASSES[target_class],
               "steps": settings.steps, "cfg": settings.cfg, "seed": settings.seed, "seconds": timings, "methods": {}}
    if mask is not None:
        keep = 1 - dilated(mask, PRESERVE_MARGIN)
        metrics["weight_map_iou"] = {"soft": iou(soft, mask).item(), "binary": iou(hard, mask).item()}
    for name, image in edits.items():
        probabilities = classifier(image.clamp(-1, 1)).softmax(1)[0]
        entry = {"edit_success": bool(edit_success(classifier, image, target)[0]),
                 "target_probability": round(probabilities[target_class].item(), 4)}
        if mask is not None:
            entry["psnr_outside_mask"] = round(psnr(image, source, keep).item(), 2)
            entry["ssim_outside_mask"] = round(ssim(image, source, keep).item(), 4)
        metrics["methods"][name] = entry
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_grid({"source": source[0], "weight map": soft[0], **{name: image[0] for name, image in edits.items()}},
               out.with_suffix(".png"))
    out.with_suffix(".json").write_text(json.dumps(metrics, indent=2))
    log(f"wrote {out.with_suffix('.png')} and {out.with_suffix('.json')}")
    return metrics


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=int, default=0, help="which held-out source to edit")
    parser.add_argument("--set", type=int, default=HELD_OUT_SEED, help="the data set seed the source comes from")
    parser.add_argument("--image", help="edit this image file instead (resized to 32x32)")
    parser.add_argument("--source-class", choices=CLASSES, help="the class of --image (default: the classifier's)")
    parser.add_argument("--target", choices=CLASSES, help="the class to edit into (default: the next one)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--num-maps", type=int, default=10, help="noise seeds averaged into the weight map")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="ngdm_demo", help="output path without extension (.png and .json)")
    with torch.no_grad():
        return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
