"""The demo's work: edit one image with every method on the shapes model, write the grid and the metrics.

:mod:`.demo` is its command line, which checks the arguments before this module (and torch) loads.
"""

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..ngdm import diffedit_mask, ngdm_weights
from .catalog import CLASSES, HELD_OUT_SEED, IMAGE_SIZE
from .data import make_batch
from .edits import (PRESERVE_MARGIN, EditSettings, dilated, edit_friendly, ground_truth_edit, invert, iou,
                    map_difference, per_pixel_time, psnr, sdedit, ssim)
from .model import load_classifier, load_denoiser

SCALE = 6
LABEL_HEIGHT = 16
TITLE_HEIGHT = 16
# Settings the quality benchmark also runs, so `--set 2 --index N --steps 20` reproduces its item N.
SDEDIT_STRENGTH = 0.7
EDIT_FRIENDLY_SKIP = 0.2
# The classifier was trained on the data set only, and on other pictures it can be confidently
# wrong. For an image from elsewhere, a verdict counts only at this probability: 98% of its
# verdicts on 128 held-out data-set images reach it, against 18% on uniform-noise images
# (`pytest tests/test_shapes.py -s` prints both). Even so it is a hint, not a measurement.
CONFIDENT = 0.99


@dataclass
class DemoSource:
    """What to edit: a data-set item (``index`` of the set ``data_set``) or an image file's pixels."""
    index: int | None = None
    data_set: int | None = None
    image_path: str | None = None
    image: np.ndarray | None = None  # (H, W, 3) uint8, already resized to the model's size
    source_class: str | None = None  # for an image: the user's word for its class


def judged_success(probabilities: torch.Tensor, target_class: int, from_data_set: bool) -> bool | None:
    """Whether the edit shows the target class; None where the classifier is not confident on a foreign image."""
    verdict = int(probabilities.argmax())
    if not from_data_set and probabilities[verdict].item() < CONFIDENT:
        return None
    return verdict == target_class


def to_tile(image: torch.Tensor) -> np.ndarray:
    """A (C, H, W) image in [-1, 1] (or a one-channel map in [0, 1] shown as grey) as upscaled RGB bytes."""
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1) * 2 - 1
    array = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return array.repeat(SCALE, axis=0).repeat(SCALE, axis=1)


def write_grid(title: str, columns: dict[str, torch.Tensor], path: Path) -> None:
    from PIL import Image, ImageDraw

    tile = IMAGE_SIZE * SCALE
    top = TITLE_HEIGHT + LABEL_HEIGHT
    grid = Image.new("RGB", (tile * len(columns), tile + top), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((3, 2), title, fill="black")
    for column, (label, image) in enumerate(columns.items()):
        grid.paste(Image.fromarray(to_tile(image)), (column * tile, top))
        draw.text((column * tile + 3, TITLE_HEIGHT + 2), label, fill=(60, 60, 60))
    grid.save(path)


def edit_with_every_method(source_spec: DemoSource, target: str | None, settings: EditSettings, png: Path,
                           metrics_path: Path) -> dict:
    """Edits the source into ``target`` (default: the next class) with every method; writes the grid and JSON."""
    denoiser, classifier = load_denoiser(), load_classifier()
    from_data_set = source_spec.image is None
    if from_data_set:
        item = make_batch(source_spec.data_set, 1, start=source_spec.index)
        source, source_class = item.images, int(item.labels[0])
        indices = [source_spec.index]
        origin = (f"held-out {source_spec.index}" if source_spec.data_set == HELD_OUT_SEED
                  else f"set {source_spec.data_set}, item {source_spec.index}")
        inputs = {"index": source_spec.index, "set": source_spec.data_set}
    else:
        source = torch.from_numpy(source_spec.image.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        indices = None
        source_class = (CLASSES.index(source_spec.source_class) if source_spec.source_class
                        else int(classifier(source).argmax()))
        origin = Path(source_spec.image_path).name
        inputs = {"image": source_spec.image_path, "source_class": source_spec.source_class}
    if target:
        target_class = CLASSES.index(target)
    elif from_data_set:  # the quality benchmark's pairing of item N
        target_class = (source_class + 1 + source_spec.index % 2) % len(CLASSES)
    else:
        target_class = (source_class + 1) % len(CLASSES)
    union = ground_truth_edit(source_spec.data_set, 1, torch.tensor([target_class]), source_spec.index)[1] \
        if from_data_set else None
    target_label, source_label = torch.tensor([target_class]), torch.tensor([source_class])
    log = lambda line: print(line, file=sys.stderr, flush=True)
    title = f"{origin}: {CLASSES[source_class]} -> {CLASSES[target_class]}, {settings.steps} steps, CFG {settings.cfg:g}"
    log(f"editing {title}")

    timings = {}

    def timed(name, make):
        started = time.time()
        result = make()
        timings[name] = round(time.time() - started, 3)
        log(f"[{len(timings)}/7] {name}: {timings[name]:.1f} s")
        return result

    difference = timed("weight map", lambda: map_difference(denoiser, source, source_label, target_label, settings,
                                                            indices))
    soft, hard = ngdm_weights(difference), diffedit_mask(difference)
    inversion = timed("edit-friendly inversion", lambda: invert(denoiser, source, source_label, settings,
                                                                 EDIT_FRIENDLY_SKIP, indices))
    edits = {
        "NGDM": timed("NGDM", lambda: per_pixel_time(denoiser, source, target_label, soft, settings,
                                                     indices=indices)),
        "edit-friendly": timed("edit-friendly", lambda: edit_friendly(denoiser, inversion, target_label, settings)),
        "NGDM + edit-friendly": timed("NGDM + edit-friendly",
                                      lambda: edit_friendly(denoiser, inversion, target_label, settings, soft)),
        f"SDEdit {SDEDIT_STRENGTH}": timed("SDEdit", lambda: sdedit(denoiser, source, target_label, settings,
                                                                    SDEDIT_STRENGTH, indices)),
        "hard mask": timed("hard mask", lambda: per_pixel_time(denoiser, source, target_label, hard, settings,
                                                               "linear", indices=indices)),
    }
    metrics = {"inputs": {**inputs, "target": target, "steps": settings.steps, "cfg": settings.cfg,
                          "num_maps": settings.num_maps, "seed": settings.seed},
               "source_class": CLASSES[source_class], "target_class": CLASSES[target_class],
               "edit_success_rule": ("the classifier names the target class" if from_data_set else
                                     f"the classifier names the target class with probability >= {CONFIDENT}; "
                                     "null where it is less sure (the image is not from the data set)"),
               "seconds": timings, "methods": {}}
    if union is not None:
        keep = 1 - dilated(union, PRESERVE_MARGIN)
        metrics["weight_map_iou_union"] = {"soft": iou(soft, union).item(), "binary": iou(hard, union).item()}
    for name, image in edits.items():
        probabilities = classifier(image.clamp(-1, 1)).softmax(1)[0]
        entry = {"edit_success": judged_success(probabilities, target_class, from_data_set),
                 "target_probability": round(probabilities[target_class].item(), 4)}
        if union is not None:
            entry["psnr_outside_union"] = round(psnr(image, source, keep).item(), 2)
            entry["ssim_outside_union"] = round(ssim(image, source, keep).item(), 4)
        metrics["methods"][name] = entry
    write_grid(title, {"source": source[0], "weight map": soft[0], **{name: image[0] for name, image in edits.items()}},
               png)
    metrics_path.write_text(json.dumps(metrics, indent=2))
    log(f"wrote {png} and {metrics_path}")
    return metrics
