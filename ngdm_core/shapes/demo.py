"""Edit one image with every method on the pack's own shapes model: ``python -m ngdm_core.demo`` (or ``python -m ngdm_core.shapes.demo``).

Writes a labelled PNG grid (source, weight map, NGDM, edit-friendly, NGDM over the inversion,
SDEdit, hard-mask blending) and a JSON of the inputs and of the metrics for that image. No
download, no ComfyUI. This module is the command line: it checks every argument before torch
loads, and only then imports the work (:mod:`.demo_edit`).
"""

import argparse
import math
import os
import tempfile
from pathlib import Path

from .catalog import CLASSES, HELD_OUT_SEED, IMAGE_SIZE

PROG = "python -m ngdm_core.demo"
DEFAULT_STEM = "ngdm_demo"
# The shapes model is small (626 k parameters, 32x32 images): a call holds too little work to split
# well across threads, and on a busy machine extra threads contend (the test suite saw ten-fold
# slowdowns from torch's default of one thread per core), so the demo runs on one.
TORCH_THREADS = 1


class DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default; an option whose default is None says in its help what happens without it."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """Every error is one line naming the option, with no usage block and no traceback."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    arguments = OneLineParser(prog=PROG, description=__doc__.splitlines()[0],
                              formatter_class=DefaultsShown)
    arguments.add_argument("--index", type=int, default=0, help="which source of the data set to edit (0 or more)")
    arguments.add_argument("--set", type=int, default=HELD_OUT_SEED,
                           help="the data set's seed (0 trains the model, 1 is held out, 2 is the benchmark's)")
    arguments.add_argument("--image", help=f"edit this image file (resized to {IMAGE_SIZE}x{IMAGE_SIZE}) instead of "
                                           "a data-set source; --index and --set are then unused (default: none)")
    arguments.add_argument("--source-class", choices=CLASSES,
                           help="the class --image shows (default: the classifier's verdict)")
    arguments.add_argument("--target", choices=CLASSES, help="the class to edit into (default: for a data-set item N, the quality "
                           "benchmark's pairing, the class 1 + N %% 2 after the source's; for --image, the next)")
    arguments.add_argument("--steps", type=int, default=50, help="sampling steps of every method")
    arguments.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale")
    arguments.add_argument("--num-maps", type=int, default=10, help="noise seeds averaged into the weight map")
    arguments.add_argument("--seed", type=int, default=0, help="seeds every noise (0 or more)")
    arguments.add_argument("--out", default=DEFAULT_STEM,
                           help=f"a file stem: writes OUT.png and OUT.json; or a folder (one that exists, or a path "
                                f"ending in /): writes {DEFAULT_STEM}.png and {DEFAULT_STEM}.json in it")
    return arguments


def output_paths(out: str) -> tuple[Path, Path]:
    """The grid's and the metrics' paths for ``--out``: a folder or a file stem."""
    stem = Path(out)
    if out.endswith(("/", os.sep)) or stem.is_dir():
        stem = stem / DEFAULT_STEM
    return stem.parent / f"{stem.name}.png", stem.parent / f"{stem.name}.json"


def require_writable(paths: tuple[Path, ...]) -> str | None:
    """Why ``paths`` cannot be written, or None. Writes a scratch file, since permissions alone mislead root."""
    folder = paths[0].parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for path in paths:
            if path.is_dir():
                return f"{path} is a folder"
        with tempfile.TemporaryFile(dir=folder):
            pass
    except (FileExistsError, NotADirectoryError):
        return f"{folder} is not a folder (a file is in the way)"
    except OSError as error:
        return f"cannot write into {folder}: {error.strerror or error}"
    return None


def read_image(path: str):
    """The file's pixels as (H, W, 3) uint8, area-resized to the model's size; raises OSError if unreadable."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)
            return np.asarray(image, dtype=np.uint8)
    except UnidentifiedImageError as error:
        raise OSError("not an image file PIL can read") from error


def checked_arguments(argv=None):
    """The parsed arguments, or an exit with one line naming the bad option; nothing heavy is loaded."""
    arguments = parser()
    args = arguments.parse_args(argv)
    for option, value, minimum in (("--steps", args.steps, 1), ("--num-maps", args.num_maps, 1),
                                   ("--index", args.index, 0), ("--set", args.set, 0), ("--seed", args.seed, 0)):
        if value < minimum:
            arguments.error(f"{option} must be at least {minimum}, got {value}")
    if not math.isfinite(args.cfg):
        arguments.error(f"--cfg must be a finite number, got {args.cfg}")
    if args.source_class and not args.image:
        arguments.error("--source-class describes --image; without --image the data set knows the class")
    args.pixels = None
    if args.image:
        try:
            args.pixels = read_image(args.image)
        except OSError as error:
            arguments.error(f"--image: cannot read {args.image}: {error.strerror or error}")
    args.paths = output_paths(args.out)
    problem = require_writable(args.paths)
    if problem:
        arguments.error(f"--out: {problem}")
    return args


def main(argv=None) -> dict:
    args = checked_arguments(argv)
    # Imported only now, so a bad argument is reported before torch loads.
    import torch

    from .demo_edit import DemoSource, edit_with_every_method
    from .edits import EditSettings

    torch.set_num_threads(TORCH_THREADS)
    source = DemoSource(index=args.index, data_set=args.set, image_path=args.image, image=args.pixels,
                        source_class=args.source_class)
    settings = EditSettings(steps=args.steps, cfg=args.cfg, seed=args.seed, num_maps=args.num_maps)
    with torch.no_grad():
        return edit_with_every_method(source, args.target, settings, *args.paths)


if __name__ == "__main__":
    main()
