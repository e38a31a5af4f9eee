"""Region directions on the shipped shapes model: leakage and shift at equal change inside, per ratio ridge and shift.

    /tmp/cpu-run python benchmarks/region_confinement_benchmark.py --count 20 --ridges 1 2 3 5 10

The same edits as ``region_quality_benchmark.py`` (its held-out sources, SDEdit under the
source's own class from half the schedule, 10 of 20 Euler steps, CFG 3, the bottleneck shifted
at every step): the unconfined top direction at shift ``--shift`` sets each source's change
inside the mask, and the node's ratio directions (found at the edit's first state, as the node
finds them) are applied at the shift that matches it, once per ``--ridges`` value. Each ratio
direction is also applied at ``--fractions`` of its matched shift, unmatched: if its leakage
fell to the linearised leakage at a small shift, the gap would come from the shift's size; if
it stays, from the edit's later states. With ``--windows``, each ratio direction is also applied
only over a window of the edit's steps (the window a user sets with ApplyRegionDirection's start
and end percents), at the shift that matches the same change inside; with ``--later-probe``, a
ratio direction is also searched at the state of the window's middle step (the plain edit's)
and applied over that window. With ``--probes``, a ratio direction is also searched for the whole
edit's result from the plain edit's states at those steps (the trajectory probe; one step alone is
that state's direction). With ``--schedules``, each of these directions is also applied with its
shift scaled per step by ``(u / u_0) ** power`` of the step's sigma or timestep ``u``, normalised so
that the steps' shifts weighted by their fall in sigma sum to the constant shift's (then matched
like the others; the peak shift is the first step's). With ``--reproject``, the first-state
direction is re-found at every later step from the edit's own state, warm-started from the
previous step's search, with at most that many LOBPCG iterations per step (200, the node's
``max_iter``, converges: the oracle of any per-step search), constant and with each schedule.
Prints a JSON summary; writes nothing. ``--merge`` prints the summary of the outputs of runs split
with ``--offset`` (each saved from stdout) as one run's.

    /tmp/cpu-run python benchmarks/region_confinement_benchmark.py --ridges 2 --fractions \
        --windows 0:1 0:0.5 0.5:1 0:0.25 --later-probe
    /tmp/cpu-run python benchmarks/region_confinement_benchmark.py --ridges 2 --fractions \
        --schedules sigma:0.5 sigma:1 sigma:2 timestep:1 --probes 9 0,3,6 --reproject 1 3
    python benchmarks/region_confinement_benchmark.py --merge first_10.json last_10.json
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

from ngdm_core.shapes.data import make_batch
from ngdm_core.shapes.edits import sdedit, truncated_sigmas
from ngdm_core.shapes.region import (SCHEDULE_LEVELS, edit_leakage, find_directions, reprojected_edit,
                                     strength_schedule)
from quality_benchmark import BENCHMARK_SEED
from region_quality_benchmark import DEFAULTS, benchmark_edit, matched_edit, matched_shift, measured_edit

GOAL_LEAKAGE = 0.15  # issue #23's goal for the mean leakage over the 20 sources


def step_window(text):
    """``(start, end)`` from ``START:END``, fractions of the edit's steps with ``0 <= START < END <= 1``."""
    try:
        start, end = (float(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a window is START:END, fractions of the edit's steps, got {text!r}")
    if not 0 <= start < end <= 1:
        raise argparse.ArgumentTypeError(f"a window needs 0 <= START < END <= 1, got {text!r}")
    return start, end


def schedule_spec(text):
    """``(level, power)`` from ``LEVEL:POWER``: the shift scaled per step by ``(u / u_0) ** POWER`` of its level ``u``."""
    level, _, power = text.partition(":")
    try:
        power = float(power)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a schedule is LEVEL:POWER, LEVEL one of {SCHEDULE_LEVELS}, got {text!r}")
    if level not in SCHEDULE_LEVELS or not math.isfinite(power):
        raise argparse.ArgumentTypeError(f"a schedule is LEVEL:POWER, LEVEL one of {SCHEDULE_LEVELS}, got {text!r}")
    return level, power


def probe_spec(text):
    """Step indices from ``I,J,...``: the plain edit's states a direction is searched at."""
    try:
        steps = tuple(sorted({int(part) for part in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a probe is comma-separated step indices, got {text!r}")
    if steps[0] < 0:
        raise argparse.ArgumentTypeError(f"a probe's steps must not be negative, got {text!r}")
    return steps


def window_steps(window, steps):
    """``(first, last)``: the steps ``i`` of an edit of ``steps`` with ``start <= i / steps < end``."""
    inside = [step for step in range(steps) if window[0] <= step / steps < window[1]]
    if not inside:
        raise SystemExit(f"--windows: {window[0]:g}:{window[1]:g} holds none of the edit's {steps} steps")
    return inside[0], inside[-1]


def sigma_range(sigmas, first, last):
    """``(low, high)``: sigmas that hold the steps ``first`` to ``last`` of an edit over ``sigmas`` and no other.

    Bounds halfway between neighbouring steps' sigmas, so no step sits on a bound.
    """
    high = math.inf if first == 0 else float(sigmas[first - 1] + sigmas[first]) / 2
    return float(sigmas[last] + sigmas[last + 1]) / 2, high


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="print the summary of these outputs of one command split with --offset, and run nothing")
    parser.add_argument("--count", type=int, default=DEFAULTS["count"], help="held-out sources (data set seed 2)")
    parser.add_argument("--offset", type=int, default=0, help="index of the first source, to split a run")
    parser.add_argument("--shift", type=float, default=DEFAULTS["shift"],
                        help="shift of the unconfined direction, in h units (|h| is about 50)")
    parser.add_argument("--ridges", type=float, nargs="+", default=[1.0, 3.0],
                        help="ridges of the ratio search (relative to the outside's mean energy)")
    parser.add_argument("--fractions", type=float, nargs="*", default=[0.25],
                        help="fractions of the matched shift each ratio direction is also applied at")
    parser.add_argument("--windows", type=step_window, nargs="*", default=[],
                        help="START:END windows, fractions of the edit's steps, each ratio direction is also "
                             "applied over alone (0:1 is the whole edit)")
    parser.add_argument("--later-probe", action="store_true",
                        help="also search each ratio direction at the state of each window's middle step")
    parser.add_argument("--probes", type=probe_spec, nargs="*", default=[],
                        help="I,J,...: also search each ratio direction for the whole edit from its states at "
                             "those steps (9 alone: the final state; 0,3,6: the trajectory probe)")
    parser.add_argument("--schedules", type=schedule_spec, nargs="*", default=[],
                        help="LEVEL:POWER, LEVEL sigma or timestep: also apply each direction with its shift "
                             "scaled by (u / u_0)^POWER of the step's level (timestep:1 falls linearly to 0)")
    parser.add_argument("--reproject", type=int, nargs="*", default=[],
                        help="also re-find the first-state direction at every later step of the edit, with at "
                             "most this many LOBPCG iterations per step (200: converged)")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error(f"--count must be at least 1, got {args.count}")
    if args.offset < 0:
        parser.error(f"--offset must not be negative, got {args.offset}")
    if min(args.ridges) <= 0:
        parser.error(f"--ridges must be positive, got {args.ridges}")
    if args.fractions and min(args.fractions) <= 0:
        parser.error(f"--fractions must be positive, got {args.fractions}")
    if args.reproject and min(args.reproject) < 1:
        parser.error(f"--reproject must be at least 1 iteration per step, got {args.reproject}")
    return args


def summary(rows, unconfined_shifts):
    """Mean and median leakage, sources at most the goal, and the shift against the unconfined one's."""
    leakages = [row["leakage"] for row in rows]
    return {"leakage": round(statistics.fmean(leakages), 4), "median_leakage": round(statistics.median(leakages), 4),
            f"sources_at_most_{GOAL_LEAKAGE}": sum(value <= GOAL_LEAKAGE for value in leakages),
            "shift": round(statistics.fmean(row["shift"] for row in rows), 2),
            "shift_ratio": round(statistics.fmean(row["shift"] / base for row, base in zip(rows, unconfined_shifts)), 3),
            "linearised_leakage": round(statistics.fmean(row["linearised_leakage"] for row in rows), 4),
            "search_seconds": round(statistics.fmean(row["seconds"] for row in rows), 2),
            "iterations": round(statistics.fmean(row["iterations"] for row in rows), 1),
            "converged": sum(row["converged"] for row in rows),
            **({"peak_shift_ratio": round(statistics.fmean(
                row["peak_shift"] / base for row, base in zip(rows, unconfined_shifts)), 3)}
               if "peak_shift" in rows[0] else {}),
            **({key: round(statistics.fmean(row[key] for row in rows), 3)
                for key in ("search_vectors", "reprojection_vectors", "reprojection_seconds", "last_step_cosine")
                if key in rows[0]})}


def merged(outputs):
    """One output from ``outputs`` of one command over consecutive sources: means weighted by their sources' counts."""
    outputs = sorted(outputs, key=lambda output: output["sources"][0])
    settings = ("data_seed", "steps", "cfg", "edit_strength", "unconfined_shift", "windows")
    for output, following in zip(outputs, outputs[1:]):
        if output["sources"][1] != following["sources"][0]:
            raise SystemExit(f"--merge: sources {output['sources']} and {following['sources']} are not consecutive")
        if any(output[key] != following[key] for key in settings) or output["methods"].keys() != following["methods"].keys():
            raise SystemExit(f"--merge: the runs over sources {output['sources']} and {following['sources']} differ "
                             "in their settings or rows")
    counts = [output["sources"][1] - output["sources"][0] for output in outputs]
    methods = {}
    for name, first in outputs[0]["methods"].items():
        leakages = [value for output in outputs for value in output["per_source_leakage"][name]]
        totals = {key: sum(output["methods"][name][key] * count for output, count in zip(outputs, counts))
                  for key in first}
        methods[name] = {**{key: round(total / len(leakages), 4) for key, total in totals.items()},
                         "leakage": round(statistics.fmean(leakages), 4),
                         "median_leakage": round(statistics.median(leakages), 4),
                         f"sources_at_most_{GOAL_LEAKAGE}": sum(value <= GOAL_LEAKAGE for value in leakages),
                         "converged": sum(output["methods"][name]["converged"] for output in outputs)}
    return {**{key: outputs[0][key] for key in settings}, "sources": [outputs[0]["sources"][0], outputs[-1]["sources"][1]],
            "methods": methods,
            "per_source_leakage": {name: [value for output in outputs for value in output["per_source_leakage"][name]]
                                   for name in methods},
            "seconds": round(sum(output["seconds"] for output in outputs), 1)}


def main(argv=None):
    args = parse_arguments(argv)
    if args.merge:
        print(json.dumps(merged([json.loads(Path(path).read_text()) for path in args.merge]), indent=1))
        return
    log = lambda line: print(line, file=sys.stderr, flush=True)
    denoiser, settings, strength = benchmark_edit()
    batch = make_batch(BENCHMARK_SEED, args.offset + args.count)
    rows, started = {}, time.time()
    sigmas = truncated_sigmas(denoiser, settings, strength)
    windows = [window_steps(window, len(sigmas) - 1) for window in args.windows]
    if args.probes and max(max(probe) for probe in args.probes) >= len(sigmas) - 1:
        raise SystemExit(f"--probes: the edit has steps 0 to {len(sigmas) - 2}, got {args.probes}")
    # name -> (weight(t) or None for the constant shift, its largest weight over the edit's steps)
    schedules = {"": (None, 1.0)}
    for level, power in args.schedules:
        weight = strength_schedule(denoiser, sigmas, level, power)
        schedules[f"_scaled_by_{level}^{power:g}"] = (weight, float(weight(denoiser.timestep(sigmas[:-1])).max()))

    def found_for(source, label, mask, probe_steps=None, **search):
        begun = time.time()
        found = find_directions(denoiser, source, label, mask, settings, strength, probe_steps, k=1, **search)
        return found, {"linearised_leakage": found.leakage[0].item(), "seconds": time.time() - begun,
                       "iterations": found.iterations, "converged": found.converged,
                       "search_vectors": found.search.jvp_vectors + found.search.vjp_vectors}

    def reprojected(edit, found, plain, mask, target, iterations, ridge, weight):
        """The matched edit along ``found`` re-found at every step; its row's extra fields from the last edit."""
        last = {}

        def measure(shift):
            begun = time.time()
            last["edit"] = reprojected_edit(*edit, mask, found.search, shift, settings, strength, iterations, ridge,
                                            weight)
            last["seconds"] = time.time() - begun
            return tuple(value.item() for value in edit_leakage(last["edit"].image, plain, mask))

        leakage, _, shift = matched_shift(measure, target, args.shift)
        directions = last["edit"].directions.flatten(1)
        return {"leakage": leakage, "shift": shift, "reprojection_vectors": last["edit"].products,
                "reprojection_seconds": last["seconds"], "last_step_cosine": float(directions[-1] @ directions[0])}

    for index in range(args.offset, args.offset + args.count):
        source, label, mask = batch.images[index:index + 1], batch.labels[index:index + 1], batch.masks[index:index + 1]
        plain = sdedit(denoiser, source, label, settings, strength)
        edit = (denoiser, source, label)
        found, row = found_for(source, label, mask, confinement="none")
        leakage, target = measured_edit(*edit, found.vectors[0], plain, mask, settings, strength, args.shift)
        rows.setdefault("unconfined", []).append({**row, "leakage": leakage, "shift": args.shift})
        for ridge in args.ridges:
            found, row = found_for(source, label, mask, confinement="ratio", ridge=ridge)
            probed = {f"ratio_ridge_{ridge:g}": (found, row)}
            for probe in args.probes:
                probed[f"ratio_ridge_{ridge:g}_probed_at_steps_{'_'.join(map(str, probe))}"] = found_for(
                    source, label, mask, probe_steps=probe, confinement="ratio", ridge=ridge)
            for name, (direction, direction_row) in probed.items():
                for suffix, (weight, peak) in schedules.items():
                    leakage, _, scheduled_shift = matched_edit(*edit, direction.vectors[0], plain, mask, settings,
                                                               strength, target, args.shift, weight=weight)
                    rows.setdefault(name + suffix, []).append(
                        {**direction_row, "leakage": leakage, "shift": scheduled_shift,
                         "peak_shift": scheduled_shift * peak})
            for iterations in args.reproject:
                for suffix, (weight, peak) in schedules.items():
                    result = reprojected(edit, found, plain, mask, target, iterations, ridge, weight)
                    rows.setdefault(f"ratio_ridge_{ridge:g}_reprojected_{iterations}{suffix}", []).append(
                        {**row, **result, "peak_shift": result["shift"] * peak})
            shift = rows[f"ratio_ridge_{ridge:g}"][-1]["shift"]
            for fraction in args.fractions:
                leakage, _ = measured_edit(*edit, found.vectors[0], plain, mask, settings, strength, shift * fraction)
                rows.setdefault(f"ratio_ridge_{ridge:g}_at_{fraction:g}_of_the_shift", []).append(
                    {**row, "leakage": leakage, "shift": shift * fraction})
            for first, last in windows:
                window = sigma_range(sigmas, first, last)
                leakage, _, windowed_shift = matched_edit(*edit, found.vectors[0], plain, mask, settings, strength,
                                                          target, args.shift, window)
                rows.setdefault(f"ratio_ridge_{ridge:g}_over_steps_{first}_to_{last}", []).append(
                    {**row, "leakage": leakage, "shift": windowed_shift})
                if args.later_probe:
                    middle = (first + last) // 2
                    later, later_row = found_for(source, label, mask, probe_steps=(middle,), confinement="ratio",
                                                 ridge=ridge)
                    leakage, _, windowed_shift = matched_edit(*edit, later.vectors[0], plain, mask, settings,
                                                              strength, target, args.shift, window)
                    rows.setdefault(f"ratio_ridge_{ridge:g}_probed_at_step_{middle}_over_steps_{first}_to_{last}",
                                    []).append({**later_row, "leakage": leakage, "shift": windowed_shift})
        log(f"source {index}: " + ", ".join(f"{name} {values[-1]['leakage']:.3f} (shift {values[-1]['shift']:.1f})"
                                            for name, values in rows.items()) + f"; {time.time() - started:.0f} s")
    unconfined_shifts = [row["shift"] for row in rows["unconfined"]]
    print(json.dumps({"sources": [args.offset, args.offset + args.count], "data_seed": BENCHMARK_SEED,
                      "steps": settings.steps, "cfg": settings.cfg, "edit_strength": strength,
                      "unconfined_shift": args.shift,
                      "windows": {f"steps_{first}_to_{last}": {"sigma_range": sigma_range(sigmas, first, last)}
                                  for first, last in windows},
                      "methods": {name: summary(values, unconfined_shifts) for name, values in rows.items()},
                      "per_source_leakage": {name: [round(row["leakage"], 4) for row in values]
                                             for name, values in rows.items()},
                      "seconds": round(time.time() - started, 1)}, indent=1))


if __name__ == "__main__":
    main()
