"""Edit quality with ground truth, on the pack's shapes model: success against preservation, per method.

    python benchmarks/quality_benchmark.py            # 200 held-out sources, about 20 minutes on 2 CPU cores

Each held-out source is edited into another class. Edit success is the shipped classifier's
accuracy on the target class; preservation is PSNR and SSIM outside the ground-truth mask
dilated by 2 pixels. Also the weight maps' IoU with the ground-truth mask, and the
reconstruction error of DDIM against edit-friendly inversion. Writes a markdown table, a
JSON of the numbers and a trade-off plot (``benchmark`` extra: matplotlib).
"""

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

from ngdm_core.ngdm import diffedit_mask, map_noise, ngdm_weights, prompt_difference
from ngdm_core.shapes.data import CLASSES, make_batch
from ngdm_core.shapes.demo import DefaultsShown
from ngdm_core.shapes.edits import (EditSettings, ddim_reconstruction, dilated, edit_friendly, edit_success, guided,
                                    invert, iou, per_pixel_time, psnr, sdedit, ssim)
from ngdm_core.shapes.model import load_classifier, load_denoiser

BENCHMARK_SEED = 2  # neither the training set (0) nor the held-out set the tests use (1)
PRESERVE_MARGIN = 2
SDEDIT_STRENGTHS = (0.3, 0.5, 0.7, 0.9)
HARD_MASK_STRENGTHS = (0.5, 0.7, 0.9, 1.0)
NGDM_GRID = ((5, 1.5), (5, 2.5), (10, 3), (10, 5), (20, 6), (20, 10))
LINEAR_GRID = ((5, 2.5), (10, 5), (20, 10))
EDIT_FRIENDLY_SKIPS = (0.0, 0.2, 0.4, 0.6)
NGDM_EDIT_FRIENDLY_SKIP = 0.2
NGDM_EDIT_FRIENDLY_GRID = ((5, 2.5), (10, 5), (20, 10))


DEFAULT_SETTINGS = {"count": 200, "steps": 20, "cfg": 3.0}
COMMITTED_RESULTS = Path(__file__).parent / "results" / "quality"


def parse_arguments(argv=None):
    """The settings, checked before any work: a bad one, or a missing matplotlib, stops the run at its start."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=DefaultsShown)
    parser.add_argument("--count", type=int, default=DEFAULT_SETTINGS["count"],
                        help="held-out sources to edit (data set seed 2), each into another class")
    parser.add_argument("--steps", type=int, default=DEFAULT_SETTINGS["steps"], help="Euler steps of every method")
    parser.add_argument("--cfg", type=float, default=DEFAULT_SETTINGS["cfg"],
                        help="classifier-free guidance scale of every method")
    parser.add_argument("--out", help="path of the results without extension (.md, .json and .png) (default: "
                                      "benchmarks/results/quality, the committed results, with the default settings; "
                                      "else quality_count<N>_steps<S>_cfg<C> in the current folder)")
    args = parser.parse_args(argv)
    for option, value in (("--count", args.count), ("--steps", args.steps)):
        if value < 1:
            parser.error(f"{option} must be at least 1, got {value}")
    default = all(getattr(args, name) == value for name, value in DEFAULT_SETTINGS.items())
    if args.out is None:
        args.out = str(COMMITTED_RESULTS) if default else f"quality_count{args.count}_steps{args.steps}_cfg{args.cfg:g}"
    elif not default and Path(args.out).resolve() == COMMITTED_RESULTS.resolve():
        parser.error("--out: the committed results come from the default settings; write this run elsewhere")
    if importlib.util.find_spec("matplotlib") is None:
        parser.error("matplotlib is not installed; it draws the trade-off plot: pip install -e '.[benchmark]'")
    return args


def main(argv=None):
    args = parse_arguments(argv)
    torch.set_grad_enabled(False)
    log = lambda line: print(line, file=sys.stderr, flush=True)

    denoiser, classifier = load_denoiser(), load_classifier()
    settings = EditSettings(steps=args.steps, cfg=args.cfg)
    batch = make_batch(BENCHMARK_SEED, args.count)
    source, mask, source_class = batch.images, batch.masks, batch.labels
    # Every ordered pair of classes, in turn.
    target_class = (source_class + 1 + torch.arange(args.count) % 2) % len(CLASSES)
    keep = 1 - dilated(mask, PRESERVE_MARGIN)
    rows, started = [], time.time()

    def record(method, knob, images):
        row = {"method": method, "knob": knob,
               "success": edit_success(classifier, images, target_class).mean().item(),
               "psnr": psnr(images, source, keep).mean().item(), "ssim": ssim(images, source, keep).mean().item()}
        rows.append(row)
        log(f"{time.time() - started:6.0f} s  {method:22s} {knob:14s} success {row['success']:.3f}  "
            f"PSNR {row['psnr']:.2f}  SSIM {row['ssim']:.4f}")

    difference = prompt_difference(guided(denoiser, settings), source, source_class, target_class,
                                   denoiser.sigma_at(settings.map_strength),
                                   map_noise(source, settings.num_maps, settings.seed))
    binary = diffedit_mask(difference)
    maps = {"iou_binary": iou(binary, mask).mean().item(),
            "iou_soft": {f"a={a}, b={b}": iou(ngdm_weights(difference, a=a, b=b), mask).mean().item()
                         for a, b in NGDM_GRID}}
    log(f"weight maps: {maps}")

    for strength in SDEDIT_STRENGTHS:
        record("SDEdit", f"strength {strength}", sdedit(denoiser, source, target_class, settings, strength))
    for strength in HARD_MASK_STRENGTHS:
        record("hard mask (DiffEdit)", f"strength {strength}",
               per_pixel_time(denoiser, source, target_class, strength * binary, settings, "linear"))
    for a, b in LINEAR_GRID:
        record("DifferentialDiffusion", f"a={a}, b={b}",
               per_pixel_time(denoiser, source, target_class, ngdm_weights(difference, a=a, b=b), settings, "linear"))
    for a, b in NGDM_GRID:
        record("NGDM", f"a={a}, b={b}",
               per_pixel_time(denoiser, source, target_class, ngdm_weights(difference, a=a, b=b), settings))
    inversions = {}
    for skip in EDIT_FRIENDLY_SKIPS:
        inversions[skip] = invert(denoiser, source, source_class, settings, skip)
        record("edit-friendly", f"skip {skip}", edit_friendly(denoiser, inversions[skip], target_class, settings))
    for a, b in NGDM_EDIT_FRIENDLY_GRID:
        record("NGDM + edit-friendly", f"a={a}, b={b}",
               edit_friendly(denoiser, inversions[NGDM_EDIT_FRIENDLY_SKIP], target_class, settings,
                             ngdm_weights(difference, a=a, b=b)))

    def relative_error(images):
        return ((images - source).norm() / source.norm()).item()

    reconstruction = {
        "edit-friendly": relative_error(edit_friendly(denoiser, inversions[0.0], source_class, settings)),
        "DDIM": relative_error(ddim_reconstruction(denoiser, source, source_class, settings)),
    }
    log(f"reconstruction: {reconstruction}")

    results = {"count": args.count, "steps": args.steps, "cfg": args.cfg, "seconds": round(time.time() - started),
               "weight_maps": maps, "reconstruction_relative_error": reconstruction, "edits": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(markdown(results))
    plot(rows, out.with_suffix(".png"))
    log(f"wrote {out}.md, .json and .png in {results['seconds']} s")


def markdown(results) -> str:
    lines = [f"{results['count']} held-out sources, {results['steps']} Euler steps, CFG {results['cfg']}; "
             f"preservation outside the ground-truth mask dilated by {PRESERVE_MARGIN} px.", "",
             "| method | setting | edit success | PSNR outside (dB) | SSIM outside |", "|---|---|---:|---:|---:|"]
    lines += [f"| {row['method']} | {row['knob']} | {row['success']:.3f} | {row['psnr']:.2f} | {row['ssim']:.4f} |"
              for row in results["edits"]]
    maps = results["weight_maps"]
    lines += ["", "| weight map | IoU with the ground-truth mask |", "|---|---:|",
              f"| DiffEdit binary | {maps['iou_binary']:.3f} |"]
    lines += [f"| NGDM soft, {knob} | {value:.3f} |" for knob, value in maps["iou_soft"].items()]
    errors = results["reconstruction_relative_error"]
    lines += ["", "| inversion (all steps, source class) | reconstruction error ‖x̂ − x‖ / ‖x‖ |", "|---|---:|"]
    lines += [f"| {name} | {value:.2e} |" for name, value in errors.items()]
    return "\n".join(lines) + "\n"


def plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    for method in dict.fromkeys(row["method"] for row in rows):
        points = sorted((row for row in rows if row["method"] == method), key=lambda row: row["psnr"])
        axes.plot([row["psnr"] for row in points], [row["success"] for row in points], "o-" if len(points) > 1 else "s",
                  label=method)
    axes.set_xlabel("preservation: PSNR outside the dilated mask (dB)")
    axes.set_ylabel("edit success: classifier accuracy on the target")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


if __name__ == "__main__":
    main()
