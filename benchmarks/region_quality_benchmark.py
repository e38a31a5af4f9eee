"""Region Jacobian directions on the shipped shapes model: leakage of actual edits per confinement, equal change inside.

    flock /tmp/cpu-heavy.lock python benchmarks/region_quality_benchmark.py   # 20 sources: 725 s on 1 thread

Each of the quality benchmark's held-out sources (data seed 2) is edited along the top direction
of its ground-truth object mask: an SDEdit under its own class from half the schedule (10 of 20
Euler steps, cfg 3), the bottleneck shifted at every step, cond and uncond. The unconfined top
direction (``none``) is applied at shift ``--shift``; the paper's rank-1 projection (``rank1``)
and the pack's ratio directions (``ratio``, found at the edit's first state as the node does, and
for the whole edit from 3 of its states: ``confined_trajectory``) at the shift that gives the
same change inside the mask (two proportional corrections of the shift). Leakage is
``|change outside the mask dilated by 2 px| / |change inside|`` in the final image. Writes only
the key ``region_directions`` of ``benchmarks/results/quality.json`` (with the default settings)
and keeps every other key.
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from ngdm_core.shapes.data import make_batch
from ngdm_core.shapes.edits import PRESERVE_MARGIN, EditSettings, sdedit
from ngdm_core.shapes.model import UNET_FILE, load_denoiser
from ngdm_core.shapes.region import edit_leakage, find_directions, shifted_denoiser
from quality_benchmark import BENCHMARK_SEED

RESULTS = Path(__file__).parent / "results" / "quality.json"
# name -> (confinement, probe_steps): the node's probe at the edit's first state, or the wing's
# trajectory probe (ngdm_core.shapes.region.trajectory_function) at 3 of the edit's 10 steps.
METHODS = {"unconfined": ("none", None), "rank1": ("rank1", None), "confined": ("ratio", None),
           "confined_trajectory": ("ratio", (0, 3, 6))}
DEFAULTS = {"count": 20, "shift": 10.0, "steps": 20, "cfg": 3.0, "edit_strength": 0.5}


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=DEFAULTS["count"], help="held-out sources (data set seed 2)")
    parser.add_argument("--shift", type=float, default=DEFAULTS["shift"],
                        help="shift of the unconfined direction, in h units (|h| is about 50)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not update quality.json")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error(f"--count must be at least 1, got {args.count}")
    return args


def measured_edit(denoiser, source, label, direction, plain, mask, settings, strength, shift,
                  sigma_range=(0.0, math.inf), weight=None):
    """``(leakage, change inside)`` of the edit along ``direction`` at ``shift``, applied at sigmas in ``sigma_range``.

    The whole range is :func:`ngdm_core.shapes.region.region_edit`; a narrower one is the
    window a user sets with ApplyRegionDirection's start and end percents. ``weight(t)``
    (:func:`ngdm_core.shapes.region.strength_schedule`) scales the shift per step.
    """
    edited = sdedit(shifted_denoiser(denoiser, direction, shift, *sigma_range, weight=weight), source,
                    torch.as_tensor(label).reshape(-1), settings, strength)
    return tuple(value.item() for value in edit_leakage(edited, plain, mask))


def matched_shift(measure, target, shift):
    """``(leakage, change inside, shift)`` of ``measure(shift) -> (leakage, change inside)`` at the change ``target``.

    Two corrections of the shift, each by ``target / change inside``, from ``shift``.
    """
    for correction in range(3):
        leakage, inside = measure(shift)
        if correction < 2:
            shift = shift * target / inside
    return leakage, inside, shift


def matched_edit(denoiser, source, label, direction, plain, mask, settings, strength, target, shift,
                 sigma_range=(0.0, math.inf), weight=None):
    """``(leakage, change inside, shift)`` of the edit along ``direction`` whose change inside the mask is ``target``
    (:func:`matched_shift`)."""
    return matched_shift(lambda shift: measured_edit(denoiser, source, label, direction, plain, mask, settings,
                                                     strength, shift, sigma_range, weight), target, shift)


def benchmark_edit():
    """``(denoiser, settings, strength)``: the shipped model on one thread and the benchmark's edit."""
    torch.set_num_threads(1)
    return load_denoiser(), EditSettings(steps=DEFAULTS["steps"], cfg=DEFAULTS["cfg"]), DEFAULTS["edit_strength"]


def main(argv=None):
    args = parse_arguments(argv)
    log = lambda line: print(line, file=sys.stderr, flush=True)
    denoiser, settings, strength = benchmark_edit()
    batch = make_batch(BENCHMARK_SEED, args.count)
    rows, started = {name: [] for name in METHODS}, time.time()
    for index in range(args.count):
        source, label, mask = batch.images[index:index + 1], batch.labels[index:index + 1], batch.masks[index:index + 1]
        plain = sdedit(denoiser, source, label, settings, strength)
        target = None
        for name, (confinement, probe_steps) in METHODS.items():
            found = find_directions(denoiser, source, label, mask, settings, strength, probe_steps, k=1,
                                    confinement=confinement)
            search = [found.search] + ([found.outside] if found.outside is not None else [])
            products = sum(part.jvp_vectors + part.vjp_vectors for part in search)
            if target is None:
                leakage, inside = measured_edit(denoiser, source, label, found.vectors[0], plain, mask, settings,
                                                strength, args.shift)
                target, shift = inside, args.shift
            else:
                leakage, inside, shift = matched_edit(denoiser, source, label, found.vectors[0], plain, mask, settings,
                                                      strength, target, args.shift)
            rows[name].append({"leakage": leakage, "change_inside": inside, "shift": shift,
                               "linearised_leakage": found.leakage[0].item(),
                               "iterations": found.iterations, "converged": found.converged,
                               "products": products})
        log(f"source {index}: " + ", ".join(f"{name} {rows[name][-1]['leakage']:.3f} (shift "
                                            f"{rows[name][-1]['shift']:.1f})" for name in METHODS)
            + f"; change inside {target:.3f}; {time.time() - started:.0f} s")

    mean = lambda name, key: sum(float(row[key]) for row in rows[name]) / len(rows[name])
    result = {
        "model": f"{UNET_FILE.name} as shipped today (before any retrain)",
        "count": args.count, "data_seed": BENCHMARK_SEED, "steps": settings.steps, "cfg": settings.cfg,
        "edit_strength": strength, "unconfined_shift": args.shift, "k": 1, "preserve_margin": PRESERVE_MARGIN,
        **{f"leakage_{name}": round(mean(name, "leakage"), 4) for name in METHODS},
        "change_inside": {name: round(mean(name, "change_inside"), 4) for name in METHODS},
        # |J_out v| / |J_in v| at the probe state: what the search optimises, before the edit's later steps.
        "linearised_leakage": {name: round(mean(name, "linearised_leakage"), 4) for name in METHODS},
        "shift": {name: round(mean(name, "shift"), 2) for name in METHODS},
        "iterations": {name: round(mean(name, "iterations"), 1) for name in METHODS},
        "converged": {name: round(mean(name, "converged"), 3) for name in METHODS},
        "jvp_and_vjp_vectors": {name: round(mean(name, "products"), 1) for name in METHODS},
        "median_leakage": {name: round(statistics.median(row["leakage"] for row in rows[name]), 4) for name in METHODS},
        "sources_with_leakage_at_most_0.15": {name: sum(row["leakage"] <= 0.15 for row in rows[name])
                                               for name in METHODS},
        "sources_where_confined_leaks_less_than_unconfined": sum(
            ratio["leakage"] < plain_row["leakage"] for ratio, plain_row in zip(rows["confined"], rows["unconfined"])),
        "seconds": round(time.time() - started, 1),
    }
    print(json.dumps(result, indent=2))
    default = args.count == DEFAULTS["count"] and args.shift == DEFAULTS["shift"]
    if args.no_write or not default:
        log("not written: only the default settings update benchmarks/results/quality.json")
        return
    results = json.loads(RESULTS.read_text())
    results["region_directions"] = result
    RESULTS.write_text(json.dumps(results, indent=2))
    log(f"wrote region_directions into {RESULTS}")


if __name__ == "__main__":
    main()
