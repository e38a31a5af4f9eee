"""Edit quality with ground truth, on the pack's shapes model: success against preservation, per method.

    flock /tmp/cpu-heavy.lock env OMP_NUM_THREADS=1 python benchmarks/quality_benchmark.py
    # 100 sources of data seed 2: the committed run took 1896 s on one CPU thread

Each source is edited into another class (item N into the class 1 + N % 2 after its own; the
demo's ``--set 2 --index N --steps 20`` edits the same item with the same draws). The ground-truth
edit redraws only the object, so it differs from the source exactly on the union of the two
objects: preservation is PSNR and SSIM (11x11 Gaussian window) outside that union dilated by
2 px, the weight maps are scored by IoU against it, and ``psnr_full_vs_ground_truth`` compares
the whole edit with the ground-truth edit. Edit success is the shipped classifier's accuracy on
the target class. Every method runs Euler under the same CFG, with each item's own seeded noise.

``model_evaluations`` is per edited item, counted by wrapping the denoiser: one evaluation is
one U-Net forward pass for one item, so a guided step costs 2, and the weight map's and the
inversion's evaluations are included in the settings that use them. Writes its keys of
``quality.json`` (keeping the other benchmarks' keys), ``quality.md`` and a trade-off plot
(``benchmark`` extra: matplotlib).
"""

import argparse
import importlib.util
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ngdm_core.ngdm import diffedit_mask, ngdm_weights
from ngdm_core.shapes.catalog import BENCHMARK_SEED
from ngdm_core.shapes.data import make_batch, other_class
from ngdm_core.shapes.demo import DefaultsShown
from ngdm_core.shapes.edits import (PRESERVE_MARGIN, EditSettings, EvaluationCounter, ddim_reconstruction, dilated,
                                    edit_friendly, change_map, edit_success, ground_truth_edit, invert, iou, map_difference,
                                    masked_sampling, per_pixel_time, psnr, sdedit, ssim)
from ngdm_core.shapes.model import load_classifier, load_denoiser

SDEDIT_STRENGTHS = (0.3, 0.5, 0.7, 0.9)
SOFT_MAPS = ((5, 2.5), (10, 5), (20, 10), (20, 6))  # (a, b) of the paper's sigmoid
CHANGE_MAP_STEPS = (10, 20)  # the cheap edit's steps, over the whole schedule
# Two cheap edits of 5 steps from 0.7 of the schedule, their changes averaged (40 evaluations,
# as one 10-step edit): binary, and graded over `CHANGE_SOFTNESS` above the threshold.
AVERAGED_CHANGE = {"edits": 2, "steps": 5, "strength": 0.7}
CHANGE_SOFTNESS = 0.2
STARTS = (1.0, 0.7, 0.5)  # sigma_T as a fraction of the schedule: SDEdit's strength, KSampler's denoise
EDIT_FRIENDLY_SKIPS = (0.0, 0.2, 0.4, 0.6)
NGDM_EDIT_FRIENDLY_SKIP = 0.2
RULES = {"first_at_or_below": "", "last_at_or_above": ", paper's start rule"}
SUCCESS_LEVELS = (0.9, 0.95, 0.98, 1.0)
MAP_GOAL_IOU, MAP_GOAL_EVALUATIONS = 0.7, 40  # the goal for the best weight map

DEFAULT_SETTINGS = {"count": 100, "steps": 20, "cfg": 3.0}
COMMITTED_RESULTS = Path(__file__).parent / "results" / "quality"
OWN_KEYS = ("command", "count", "steps", "cfg", "seconds", "model_evaluation", "weight_maps",
            "reconstruction_relative_error", "edits", "goals")


def parse_arguments(argv=None):
    """The settings, checked before any work: a bad one, or a missing matplotlib, stops the run at its start."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=DefaultsShown)
    parser.add_argument("--count", type=int, default=DEFAULT_SETTINGS["count"],
                        help="sources to edit (data set seed 2), each into another class")
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


@dataclass
class Costed:
    """A weight map or an inversion, with the model evaluations per item it took to make."""
    value: object
    evaluations: float


@dataclass
class Run:
    """The benchmark's state: the batch, its references, and the counted denoiser."""
    denoiser: EvaluationCounter
    settings: EditSettings
    source: torch.Tensor
    source_class: torch.Tensor
    target_class: torch.Tensor
    ground_truth: torch.Tensor
    union: torch.Tensor
    cache: dict = field(default_factory=dict)

    def costed(self, key, make) -> Costed:
        """``make()`` once per ``key``, with the evaluations it took; every later use is charged the same."""
        if key not in self.cache:
            before = self.denoiser.evaluations
            value = make()
            self.cache[key] = Costed(value, (self.denoiser.evaluations - before) / len(self.source))
        return self.cache[key]

    def difference(self, conditional_only=False) -> Costed:
        return self.costed(("difference", conditional_only), lambda: map_difference(
            self.denoiser, self.source, self.source_class, self.target_class, self.settings,
            conditional_only=conditional_only))

    def inversion(self, skip) -> Costed:
        return self.costed(("inversion", skip), lambda: invert(self.denoiser, self.source, self.source_class,
                                                                self.settings, skip))


def soft_map(a, b, conditional_only=False, zero_floor=False):
    def build(run: Run) -> Costed:
        difference = run.difference(conditional_only)
        return Costed(ngdm_weights(difference.value, a=a, b=b, zero_floor=zero_floor), difference.evaluations)
    return build


def changed_region(steps, edits=1, strength=1.0, softness=0.0):
    def build(run: Run) -> Costed:
        return run.costed(("change", steps, edits, strength, softness), lambda: change_map(
            run.denoiser, run.source, run.source_class, run.target_class, run.settings, steps, edits, strength,
            softness))
    return build


def binary_map(run: Run) -> Costed:
    difference = run.difference()
    return Costed(diffedit_mask(difference.value), difference.evaluations)


AVERAGED = "{edits} edits x {steps} steps from {strength}".format(**AVERAGED_CHANGE)
# Every weight map the benchmark scores, by name: the paper's soft map at several (a, b), with the
# zero floor, from the conditional predictions alone, and the maps from the change (binary, and
# graded by the size of the change).
MAP_MODES = {"DiffEdit binary": binary_map,
             **{f"soft a={a}, b={b}": soft_map(a, b) for a, b in SOFT_MAPS},
             "soft a=10, b=5, zero floor": soft_map(10, 5, zero_floor=True),
             "soft a=10, b=5, conditional only": soft_map(10, 5, conditional_only=True),
             **{f"change, {steps} steps": changed_region(steps) for steps in CHANGE_MAP_STEPS},
             f"change, {AVERAGED}": changed_region(**AVERAGED_CHANGE),
             f"soft change, {AVERAGED}": changed_region(**AVERAGED_CHANGE, softness=CHANGE_SOFTNESS)}
# The maps every per-pixel method edits with, at every start: the conditional-only map is the
# guided one (its IoU row shows it), and the 20-step change map costs 80 evaluations.
EDIT_MAPS = [name for name in MAP_MODES if name not in ("soft a=10, b=5, conditional only", "change, 20 steps")]
BINARY_MAPS = ("DiffEdit binary", "change, 10 steps", f"change, {AVERAGED}")
# How each per-pixel method turns a map into an edit: NGDM's power law, DifferentialDiffusion's
# linear threshold (ComfyUI's node; at denoise < 1 its threshold runs over the shortened schedule,
# as here), and ComfyUI's own masked sampling (SetLatentNoiseMask + KSampler).
PER_PIXEL_METHODS = {
    "NGDM": lambda run, mask, start, rule: per_pixel_time(run.denoiser, run.source, run.target_class, mask,
                                                          run.settings, start=start, start_rule=rule),
    "DifferentialDiffusion": lambda run, mask, start, rule: per_pixel_time(
        run.denoiser, run.source, run.target_class, mask, run.settings, "linear", start=start),
    "masked sampling": lambda run, mask, start, rule: masked_sampling(run.denoiser, run.source, run.target_class,
                                                                      mask, run.settings, start),
}
RULE_MAP = "soft a=10, b=5"  # where the two start rules are compared


def main(argv=None):
    args = parse_arguments(argv)
    torch.set_grad_enabled(False)
    log = lambda line: print(line, file=sys.stderr, flush=True)

    denoiser, classifier = EvaluationCounter(load_denoiser()), load_classifier()
    settings = EditSettings(steps=args.steps, cfg=args.cfg)
    batch = make_batch(BENCHMARK_SEED, args.count)
    target_class = other_class(batch.labels)  # item N: the class 1 + N % 2 after its own
    ground_truth, union = ground_truth_edit(BENCHMARK_SEED, args.count, target_class)
    run = Run(denoiser, settings, batch.images, batch.labels, target_class, ground_truth, union)
    keep = 1 - dilated(union, PRESERVE_MARGIN)
    everywhere = torch.ones_like(union)
    rows, started = [], time.time()

    def record(method, setting, edit, *costs):
        before = denoiser.evaluations
        images = edit()
        evaluations = (denoiser.evaluations - before) / args.count + sum(cost.evaluations for cost in costs)
        row = {"method": method, "setting": setting,
               "success": edit_success(classifier, images, target_class).mean().item(),
               "psnr_outside": psnr(images, run.source, keep).mean().item(),
               "ssim_outside": ssim(images, run.source, keep).mean().item(),
               "psnr_full_vs_ground_truth": psnr(images, ground_truth, everywhere).mean().item(),
               "model_evaluations": evaluations}
        rows.append(row)
        log(f"{time.time() - started:6.0f} s  {method:36s} {setting:40s} success {row['success']:.2f}  "
            f"PSNR out {row['psnr_outside']:.2f}  SSIM out {row['ssim_outside']:.3f}  "
            f"PSNR vs GT {row['psnr_full_vs_ground_truth']:.2f}  evals {evaluations:.0f}")

    maps = {name: build(run) for name, build in MAP_MODES.items()}
    weight_maps = {name: {"iou_union": iou(built.value, union).mean().item(), "model_evaluations": built.evaluations}
                   for name, built in maps.items()}
    log(f"weight maps: {weight_maps}")

    for strength in SDEDIT_STRENGTHS:
        record("SDEdit", f"strength {strength}", lambda: sdedit(denoiser, run.source, target_class, settings, strength))
    for name in EDIT_MAPS:
        for start in STARTS:
            for method, sample in PER_PIXEL_METHODS.items():
                rules = RULES if method == "NGDM" and name == RULE_MAP else {"first_at_or_below": ""}
                for rule, label in rules.items():
                    record(f"{method}{label}", f"{name}, start {start}",
                           lambda: sample(run, maps[name].value, start, rule), maps[name])
    for skip in EDIT_FRIENDLY_SKIPS:
        inversion = run.inversion(skip)
        record("edit-friendly", f"skip {skip}",
               lambda: edit_friendly(denoiser, inversion.value, target_class, settings), inversion)
    inversion = run.inversion(NGDM_EDIT_FRIENDLY_SKIP)
    for name in EDIT_MAPS:
        rules = RULES if name == RULE_MAP else {"first_at_or_below": ""}
        for rule, label in rules.items():
            record(f"NGDM + edit-friendly{label}", f"{name}, skip {NGDM_EDIT_FRIENDLY_SKIP}",
                   lambda: edit_friendly(denoiser, inversion.value, target_class, settings, maps[name].value, rule),
                   inversion, maps[name])

    def relative_error(images):
        return ((images - run.source).norm() / run.source.norm()).item()

    reconstruction = {
        "edit-friendly": relative_error(edit_friendly(denoiser, run.inversion(0.0).value, run.source_class, settings)),
        "DDIM": relative_error(ddim_reconstruction(denoiser, run.source, run.source_class, settings)),
    }
    log(f"reconstruction: {reconstruction}")

    results = {"command": "python benchmarks/quality_benchmark.py" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
               "count": args.count, "steps": args.steps, "cfg": args.cfg, "seconds": round(time.time() - started),
               "model_evaluation": "one U-Net forward pass for one item; a CFG step is 2; per edited item, the "
                                   "weight map's and the inversion's included",
               "weight_maps": weight_maps, "reconstruction_relative_error": reconstruction, "edits": rows,
               "goals": goals(rows)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path = out.with_suffix(".json")
    shared = json.loads(json_path.read_text()) if json_path.exists() else {}
    shared = {key: value for key, value in shared.items() if key not in OWN_KEYS}
    json_path.write_text(json.dumps({**shared, **results}, indent=2))
    out.with_suffix(".md").write_text(markdown(results))
    plot(rows, out.with_suffix(".png"))
    log(f"wrote {out}.md, .json and .png in {results['seconds']} s")


def dominates(first, second) -> bool:
    """``first`` is at least as good as ``second`` on success and preservation, and better on one."""
    better_or_equal = first["success"] >= second["success"] and first["psnr_outside"] >= second["psnr_outside"]
    return better_or_equal and (first["success"] > second["success"] or first["psnr_outside"] > second["psnr_outside"])


def map_of(row) -> str:
    """The weight map a per-pixel row edited with: its setting up to the start or skip."""
    return row["setting"].rsplit(", start", 1)[0].rsplit(", skip", 1)[0]


def plain_ngdm(row) -> bool:
    return row["method"].startswith("NGDM") and "edit-friendly" not in row["method"]


FAMILIES = {"NGDM + edit-friendly": lambda row: row["method"].startswith("NGDM + edit-friendly"),
            "NGDM": plain_ngdm,
            "NGDM, soft maps": lambda row: plain_ngdm(row) and map_of(row) not in BINARY_MAPS,
            "masked sampling": lambda row: row["method"] == "masked sampling",
            "DifferentialDiffusion": lambda row: row["method"] == "DifferentialDiffusion",
            "baselines": lambda row: not row["method"].startswith("NGDM")}
RIVALS = ("masked sampling", "DifferentialDiffusion")  # what ComfyUI users already have, on their best maps


def on_front(tops, family) -> bool:
    """``family``'s most preserving setting at a success level preserves at least as much as every rival's."""
    ours = tops[family]
    return ours is not None and all(tops[rival] is None or ours["psnr_outside"] >= tops[rival]["psnr_outside"]
                                    for rival in RIVALS)


def goals(rows) -> dict:
    """The issue's goals, measured: the most preserving setting of each family at each success level, and SDEdit's dominated points."""
    best = {}
    for level in SUCCESS_LEVELS:
        best[f"{level:g}"] = {}
        for family, member in FAMILIES.items():
            # Success is a float32 mean of k / count: 0.95 is 0.949999988, hence the tolerance.
            reaching = [row for row in rows if member(row) and row["success"] >= level - 1e-6]
            top = max(reaching, key=lambda row: row["psnr_outside"], default=None)
            best[f"{level:g}"][family] = None if top is None else {
                key: top[key] for key in ("method", "setting", "success", "psnr_outside", "model_evaluations")}
    plain = [row for row in rows if plain_ngdm(row)]
    dominated = [row["setting"] for row in rows if row["method"] == "SDEdit"
                 and any(dominates(ngdm, row) for ngdm in plain)]
    over_edit_friendly = all(tops["NGDM + edit-friendly"] is not None and (tops["baselines"] is None or
                             tops["NGDM + edit-friendly"]["psnr_outside"] >= tops["baselines"]["psnr_outside"])
                             for tops in best.values())
    return {"most_preserving_at_success": best,
            "ngdm_on_front_at_every_level": {level: on_front(tops, "NGDM") for level, tops in best.items()},
            "ngdm_soft_maps_on_front_at_every_level": {level: on_front(tops, "NGDM, soft maps")
                                                       for level, tops in best.items()},
            "ngdm_over_edit_friendly_beats_every_baseline_at_every_level": over_edit_friendly,
            "sdedit_settings_dominated_by_plain_ngdm": dominated,
            "plain_ngdm_dominates_sdedit_at_3_points": len(dominated) >= 3}


def markdown(results) -> str:
    lines = [f"{results['count']} sources (data seed {BENCHMARK_SEED}), {results['steps']} Euler steps, "
             f"CFG {results['cfg']}; `{results['command']}`, {results['seconds']} s. Preservation outside the "
             f"union of the source's and the target's objects dilated by {PRESERVE_MARGIN} px; PSNR vs GT: the "
             f"whole edit against the ground-truth edit. Evaluations: {results['model_evaluation']}.", "",
             "| method | setting | edit success | PSNR outside (dB) | SSIM outside | PSNR vs GT (dB) | evaluations |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {row['method']} | {row['setting']} | {row['success']:.2f} | {row['psnr_outside']:.2f} | "
              f"{row['ssim_outside']:.4f} | {row['psnr_full_vs_ground_truth']:.2f} | {row['model_evaluations']:.0f} |"
              for row in results["edits"]]
    lines += ["", "| weight map | IoU with the union | evaluations |", "|---|---:|---:|"]
    lines += [f"| {name} | {entry['iou_union']:.3f} | {entry['model_evaluations']:.0f} |"
              for name, entry in results["weight_maps"].items()]
    affordable = {name: entry for name, entry in results["weight_maps"].items()
                  if entry["model_evaluations"] <= MAP_GOAL_EVALUATIONS}
    top = max(affordable, key=lambda name: affordable[name]["iou_union"])
    lines += ["", f"Best map at most {MAP_GOAL_EVALUATIONS} evaluations: {top}, IoU {affordable[top]['iou_union']:.3f} "
                  f"(soft IoU for soft maps; goal at least {MAP_GOAL_IOU}: "
                  f"{'met' if affordable[top]['iou_union'] >= MAP_GOAL_IOU else 'not met'})."]
    errors = results["reconstruction_relative_error"]
    lines += ["", "| inversion (all steps, source class) | reconstruction error ‖x̂ − x‖ / ‖x‖ |", "|---|---:|"]
    lines += [f"| {name} | {value:.2e} |" for name, value in errors.items()]
    goal = results["goals"]
    lines += ["", "Most preserving setting of each family reaching a success level (PSNR outside, dB; "
                  "evaluations per edit):", "",
              "| success at least | " + " | ".join(FAMILIES) + " |", "|---:|" + "---|" * len(FAMILIES)]
    for level, tops in goal["most_preserving_at_success"].items():
        cells = ["none" if top is None else
                 f"{top['psnr_outside']:.2f} ({top['method']}, {top['setting']}; {top['model_evaluations']:.0f})"
                 for top in tops.values()]
        lines.append(f"| {level} | " + " | ".join(cells) + " |")
    lines += ["", headline(goal), "",
              f"NGDM over edit-friendly preserves at least as much as every baseline at every level: "
              f"{'met' if goal['ngdm_over_edit_friendly_beats_every_baseline_at_every_level'] else 'not met'}. "
              f"SDEdit settings dominated by a plain NGDM setting: "
              f"{', '.join(goal['sdedit_settings_dominated_by_plain_ngdm']) or 'none'} "
              f"(goal, at least 3: {'met' if goal['plain_ngdm_dominates_sdedit_at_3_points'] else 'not met'})."]
    return "\n".join(lines) + "\n"


def headline(goal) -> str:
    """Whether NGDM on its best map is on the Pareto front at every success level, against the users' baselines on theirs."""
    best = goal["most_preserving_at_success"]

    def cell(top):
        return "none" if top is None else (f"{top['psnr_outside']:.2f} dB ({top['method']}, {top['setting']}, "
                                           f"success {top['success']:.2f})")

    def levels(key, family):
        missed = [level for level, met in goal[key].items() if not met]
        if not missed:
            return "yes, at every level"
        return "no: " + "; ".join(
            f"at success {level}, {family} keeps {cell(best[level][family])}, "
            + " and ".join(f"{rival} {cell(best[level][rival])}" for rival in RIVALS) for level in missed)

    return ("**Headline.** Is plain NGDM, on its best map, on the Pareto front (the most preserving setting "
            "at each success level of at least 0.9) against masked sampling and DifferentialDiffusion on their "
            f"best maps? On any map: {levels('ngdm_on_front_at_every_level', 'NGDM')}. On the soft maps only, where "
            f"NGDM differs from masked sampling: {levels('ngdm_soft_maps_on_front_at_every_level', 'NGDM, soft maps')}. "
            "With a binary map NGDM starts every map-1 pixel at the run's start and never starts the others: that is "
            "masked sampling (the same edit from a start below 1, and within ComfyUI's max-denoise start scaling at 1).")


def plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5), dpi=120)
    label = lambda row: row["method"] + (" (change map)" if "change" in map_of(row) else "")
    # tab20, not the default ten-colour cycle, which repeats colours past ten methods.
    for name, colour in zip(dict.fromkeys(map(label, rows)), plt.get_cmap("tab20").colors):
        points = [row for row in rows if label(row) == name]
        axes.plot([row["psnr_outside"] for row in points], [row["success"] for row in points],
                  "s" if name.endswith("(change map)") else "o", color=colour, alpha=0.8, label=name)
    axes.set_xlabel("preservation: PSNR outside the dilated union of both objects (dB)")
    axes.set_ylabel("edit success: classifier accuracy on the target")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)


if __name__ == "__main__":
    main()
