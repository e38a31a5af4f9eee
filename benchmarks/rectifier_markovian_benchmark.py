"""The paper's edit training against its Markovian baseline (DiffusionCLIP's), at equal steps, on the shapes model.

    python benchmarks/rectifier_markovian_benchmark.py --threads 1

Both edit-trained rectifiers grow from the same reconstruction-trained one with the same loss,
budget and seed (the quality benchmark's ``EDIT``: 300 steps, batch 8, lr 2e-3, both weights 1)
on the same 32 held-out images of data seed 1. They differ only in where each training step
starts: the source's own trajectory at a random timestep (the paper's Algorithm 1), or the
previous edited step of a walk down 20 DDIM levels from the source's unconditional DDIM
inversion (the Markovian baseline). Each also with the paper's learning-rate schedule for
editing (1e-3, multiplied by 0.9 every 10 steps) in place of the constant 2e-3. Then the rectifier quality benchmark's edits of data seed
2's first ``--count`` sources into another class, scored the same way (success, PSNR and SSIM
outside the union of both objects), and the held-out loss terms. Prints a table.
"""

import argparse
import sys
import time

import torch

from ngdm_core.shapes.catalog import BENCHMARK_SEED
from ngdm_core.shapes.data import make_batch, other_class
from ngdm_core.shapes.edits import EditSettings
from ngdm_core.shapes.model import UNET_FILE, ShapesUNet, load_classifier, load_model
from rectifier_quality_benchmark import EDIT, edits, held_out_losses, markdown, train

# The paper's schedule: lr 1e-3, multiplied by 0.9 every 10 steps (the quality benchmark's EDIT keeps 2e-3).
PAPER_SCHEDULE = {"lr": 1e-3, "lr_decay": 0.9, "lr_decay_every": 10}
EDIT_VARIANTS = (("edit", {}), ("edit, Markovian", {"trajectory": "previous edit", "trajectory_steps": 20}),
                 ("edit, paper's lr schedule", PAPER_SCHEDULE),
                 ("edit, Markovian, paper's lr schedule", {"trajectory": "previous edit", **PAPER_SCHEDULE}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=60)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    log = lambda line: print(f"{time.time() - started:6.0f} s  {line}", file=sys.stderr, flush=True)
    unet, classifier = load_model(ShapesUNet, UNET_FILE), load_classifier()
    rectifiers, training_seconds = train(unet, classifier, log, EDIT_VARIANTS)
    torch.set_grad_enabled(False)
    batch = make_batch(BENCHMARK_SEED, args.count)
    edit_rectifiers = {name: rectifiers[name] for name, _ in EDIT_VARIANTS}
    held_out = {name: held_out_losses(unet, rectifier, classifier, batch.images, batch.labels,
                                      other_class(batch.labels)) for name, rectifier in edit_rectifiers.items()}
    rows = edits(unet, edit_rectifiers, classifier, args.count, EditSettings(steps=args.steps, cfg=args.cfg), log)
    print(markdown({"count": args.count, "steps": args.steps, "cfg": args.cfg, "held_out": held_out, "edits": rows}))
    log(f"training {training_seconds} s; edit budget {EDIT}; {time.time() - started:.0f} s in all")


if __name__ == "__main__":
    main()
