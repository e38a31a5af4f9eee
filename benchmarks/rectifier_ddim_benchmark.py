"""The rectifier in its paper's own reconstruction setting: DDIM inversion then DDIM sampling, with and without it.

    python benchmarks/rectifier_ddim_benchmark.py --threads 1

The paper's Table 1 reconstructs held-out images through deterministic DDIM inversion and
sampling (50 steps, 20 for LSUN) with an unconditional model, with and without a rectifier
trained by noise fitting, and reports L1, L2 and SSIM. Here, on the shipped shapes model's
unconditional branch: rectifiers trained as the quality benchmark trains its reconstruction
rectifier (its ``RECONSTRUCTION``, on held-out items 0-31 of data seed 1), for its 300 steps and
for 1000 (``--train-steps``), then ``--count``
sources of data seed 2 (none of them a training image) inverted with DDIM and replayed with
Euler (deterministic DDIM in sigma space) at 10, 20 and 50 steps
(:func:`ngdm_core.shapes.edits.ddim_reconstruction` at CFG 1, the unconditional branch). The rectified
runs condition every call, inversion and sampling, on the source, as RectifierApply does.
L1 and L2 are the mean absolute and squared error on [0, 1] images (the paper's range); SSIM
is the repo's (:func:`ngdm_core.shapes.edits.ssim`) over the whole image. Prints a table.
"""

import argparse
import sys
import time

import torch

from ngdm_core.rectifier import train_rectifier
from ngdm_core.shapes.catalog import BENCHMARK_SEED
from ngdm_core.shapes.data import HELD_OUT_SEED, make_batch
from ngdm_core.shapes.edits import EditSettings, ddim_reconstruction, ssim
from ngdm_core.shapes.model import NULL_CLASS, UNET_FILE, ShapesDenoiser, ShapesUNet, load_model
from ngdm_core.shapes.rectifier import RectifiedShapesDenoiser, new_rectifier
from rectifier_quality_benchmark import RECONSTRUCTION, TRAINING_SOURCES

STEP_COUNTS = (10, 20, 50)


def reconstruction_errors(denoiser, source: torch.Tensor, steps: int) -> dict[str, float]:
    """L1, L2 (on [0, 1]) and SSIM of the unconditional DDIM inversion + sampling of ``source`` over ``steps`` levels."""
    images = ddim_reconstruction(denoiser, source, None, EditSettings(steps=steps, cfg=1.0))
    difference = (images.clamp(-1, 1) - source) / 2
    return {"l1": difference.abs().mean().item(), "l2": (difference**2).mean().item(),
            "ssim": ssim(images, source, torch.ones_like(source[:, :1])).mean().item()}


def train_reconstruction_rectifier(unet: ShapesUNet, **budget):
    batch = make_batch(HELD_OUT_SEED, TRAINING_SOURCES)
    rectifier = new_rectifier(unet, seed=1)
    train_rectifier(unet, rectifier, batch.images, conditions=torch.full((len(batch.images),), NULL_CLASS), **budget)
    return rectifier


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=32, help="benchmark sources (data seed 2)")
    parser.add_argument("--train-steps", type=int, nargs="+", default=[RECONSTRUCTION["steps"], 1000],
                        help="one rectifier per training budget, each trained from the same start")
    parser.add_argument("--lr", type=float, default=RECONSTRUCTION["lr"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    log = lambda line: print(f"{time.time() - started:6.0f} s  {line}", file=sys.stderr, flush=True)
    unet = load_model(ShapesUNet, UNET_FILE)
    rectifiers, training_seconds = {}, {}
    for steps in args.train_steps:
        name = f"noise fitting, {steps} steps"
        began = time.time()
        rectifiers[name] = train_reconstruction_rectifier(unet, **{**RECONSTRUCTION, "steps": steps, "lr": args.lr})
        training_seconds[name] = round(time.time() - began)
        log(f"{name}: {training_seconds[name]} s, {rectifiers[name].training_runs[-1]}")
    torch.set_grad_enabled(False)
    source = make_batch(BENCHMARK_SEED, args.count).images
    denoisers = {"none": ShapesDenoiser(unet),
                 **{name: RectifiedShapesDenoiser(unet, rectifier, source) for name, rectifier in rectifiers.items()}}
    rows = []
    for steps in STEP_COUNTS:
        for name, denoiser in denoisers.items():
            rows.append({"steps": steps, "rectifier": name, **reconstruction_errors(denoiser, source, steps)})
            log(str(rows[-1]))
    print(markdown(rows, args.count, {**RECONSTRUCTION, "lr": args.lr}, training_seconds, time.time() - started))


def markdown(rows, count, budget, training_seconds, seconds) -> str:
    lines = [f"{count} sources (data seed {BENCHMARK_SEED}), unconditional DDIM inversion + sampling; rectifier trained "
             f"on {TRAINING_SOURCES} held-out images of seed {HELD_OUT_SEED}: {budget} but the steps named; training "
             f"seconds {training_seconds}; "
             f"{seconds:.0f} s in all.", "",
             "| steps | rectifier | L1 | L2 | SSIM | L2 / no rectifier |", "|---:|---|---:|---:|---:|---:|"]
    plain = {row["steps"]: row["l2"] for row in rows if row["rectifier"] == "none"}
    lines += [f"| {row['steps']} | {row['rectifier']} | {row['l1']:.4f} | {row['l2']:.5f} | {row['ssim']:.4f} | "
              f"{row['l2'] / plain[row['steps']]:.3f} |" for row in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
