"""The quality benchmark as ComfyUI graphs: the core benchmark's sources and settings, through ComfyUI's executor.

    python benchmarks/quality_benchmark.py --count 20 --out benchmarks/results/quality_count20   # the core rows
    COMFYUI_PATH=<ComfyUI> python benchmarks/comfy_quality_benchmark.py --core benchmarks/results/quality_count20.json
    # the committed run: 20 sources, about 8 minutes on one CPU thread
    COMFYUI_PATH=<ComfyUI> python benchmarks/comfy_quality_benchmark.py --mapping-study --timing-edits 0 \
        --out benchmarks/results/comfy_quality_mapping   # NGDM's two mappings beside DifferentialDiffusion

Each source N of data seed 2 (the ``benchmark`` set of the Shapes Source node) is edited into the
class ``1 + N % 2`` after its own by one graph, run by ComfyUI's ``PromptExecutor``: the shipped
shapes model from the pack's loader node, the source from its source node, VAE Encode and Decode
with the pixel-space VAE, and three weight maps from NGDMWeightMap (DiffEdit's binary map, NGDM's
soft map a=10 b=5, the change of a 10-step edit). The baselines are ComfyUI's own nodes, unmodified:

- SDEdit: KSampler at denoise d;
- masked sampling: SetLatentNoiseMask with the map, then KSampler at denoise d;
- DifferentialDiffusion on the model, the map's latent, then KSampler at denoise d;

and NGDM is PerPixelTimeModel on the model, the map's latent, then KSampler at denoise d: every
method on every map at every d of the core benchmark's starts (1.0, 0.7, 0.5), Euler, "simple".
KSampler runs ``round(d * steps)`` steps at denoise d, the last ``d`` of the ``steps``-step schedule
the core samples (the same sigmas, the same budget). Every seed is the core benchmark's draw for
that item (``ngdm_core.shapes.edits.item_seed``): KSampler's noise, the maps' noises and the change
map's inversion noises are the same tensors, so core and ComfyUI edit each source from the same
draws and the comparison is paired.

Each source is also edited in ``ngdm_core`` computing as ComfyUI does (:class:`ComfyRules`: its "simple"
sigmas, its integer timestep, its map level), with the same draws; the largest difference from the
graph's edit says whether anything but those rules separates the two.

Metrics are the core benchmark's (its functions, imported). Model evaluations are counted by an
``APPLY_MODEL`` wrapper on each sampler's and each map's model: one U-Net forward pass for one item,
a CFG step 2, each edit charged its map's evaluations. ``--core`` puts the core benchmark's rows
(``quality_benchmark.py --count N`` on the same sources) beside ComfyUI's. Then the same NGDM edit is
timed both ways, interleaved on the same sources (``--timing-edits``): the graph through one
persistent executor (the loader cached, as in a running ComfyUI), against ``ngdm_core`` with the
model loaded once.

``--mapping-study`` runs other rows instead: PerPixelTimeModel with each ``mapping`` ("NGDM" the power
law, "NGDM linear" DifferentialDiffusion's rule), DifferentialDiffusion and masked sampling, on the soft
map and on the map NGDMWeightMap makes with its own defaults, from each start.
"""

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The core benchmark beside this file, and the real-host tests' headless ComfyUI (tiny_host, the capture node).
sys.path[:0] = [str(HERE), str(HERE.parent / "tests" / "comfy")]

import torch  # noqa: E402
from quality_benchmark import CHANGE_MAP_STEPS, STARTS  # noqa: E402

from ngdm_core.ngdm import diffedit_mask, ngdm_weights  # noqa: E402
from ngdm_core.shapes.catalog import BENCHMARK_SEED, CLASSES  # noqa: E402
from ngdm_core.shapes.data import make_batch, other_class  # noqa: E402
from ngdm_core.shapes.demo import DefaultsShown  # noqa: E402
from ngdm_core.shapes.edits import (CHANGE_MAP_NOISE, MAP_NOISE, PRESERVE_MARGIN, START_NOISE, EditSettings,  # noqa: E402
                                    change_map, dilated, edit_success, ground_truth_edit, item_seed, map_difference,
                                    masked_sampling, per_pixel_time, psnr, sdedit, ssim)
from ngdm_core.shapes.model import load_classifier, load_denoiser  # noqa: E402

DEFAULT_SETTINGS = {"count": 20, "steps": 20, "cfg": 3.0}
COMMITTED_RESULTS = HERE / "results" / "comfy_quality"
COUNTER = "BenchmarkEvaluationCounter"
SOFT = (10.0, 5.0)  # NGDM's default (a, b), one of the core benchmark's soft maps
SOFT_MAP = f"soft a={SOFT[0]:g}, b={SOFT[1]:g}"
CHANGE_STEPS = CHANGE_MAP_STEPS[0]
# NGDMWeightMap's inputs per map; the names are the core benchmark's, so rows pair by name.
MAPS = {
    "DiffEdit binary": {"mode": "diffedit", "purpose": MAP_NOISE},
    SOFT_MAP: {"mode": "ngdm", "a": SOFT[0], "b": SOFT[1], "purpose": MAP_NOISE},
    f"change, {CHANGE_STEPS} steps": {"mode": "change", "encode_strength": 1.0, "change_steps": CHANGE_STEPS,
                                      "change_edits": 1, "change_softness": 0.0, "purpose": CHANGE_MAP_NOISE},
}
# NGDMWeightMap's own defaults (mode change, 5 steps from 0.7, 2 edits, softness 0.2): the map a user gets, for
# --mapping-study. The map's CFG stays the benchmark's (the shapes model's), as on every map here.
DEFAULT_MAP = "node default: change, 5 steps from 0.7, 2 edits, softness 0.2"
STUDY_MAPS = {SOFT_MAP: MAPS[SOFT_MAP],
              DEFAULT_MAP: {"mode": "change", "encode_strength": 0.7, "change_steps": 5, "change_edits": 2,
                            "change_softness": 0.2, "purpose": CHANGE_MAP_NOISE}}
ALL_MAPS = {**MAPS, **STUDY_MAPS}
# PerPixelTimeModel's mapping per NGDM row.
NGDM_MAPPINGS = {"NGDM": "ngdm", "NGDM linear": "linear"}
TIMED_MAP, TIMED_START = SOFT_MAP, 0.7
# Model evaluations per item counted by the wrappers, by label.
EVALUATIONS = {}


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=DefaultsShown)
    parser.add_argument("--count", type=int, default=DEFAULT_SETTINGS["count"],
                        help="sources to edit (data set seed 2), each into another class")
    parser.add_argument("--steps", type=int, default=DEFAULT_SETTINGS["steps"],
                        help="Euler steps of the whole schedule (KSampler runs round(denoise * steps) of them)")
    parser.add_argument("--cfg", type=float, default=DEFAULT_SETTINGS["cfg"], help="classifier-free guidance scale")
    parser.add_argument("--core", help="the core benchmark's JSON on the same sources (quality_benchmark.py with the "
                                       "same --count, --steps and --cfg), shown beside ComfyUI's rows")
    parser.add_argument("--timing-edits", type=int, default=10,
                        help="sources the NGDM edit is timed on, both ways, interleaved (0: no timing)")
    parser.add_argument("--mapping-study", action="store_true",
                        help="instead of the benchmark's rows: NGDM with each mapping (ngdm, linear), DifferentialDiffusion "
                             "and masked sampling on the soft map and NGDMWeightMap's default map, at each start")
    parser.add_argument("--scheduler", default="simple",
                        help="KSampler's scheduler for the edits (the maps keep NGDMWeightMap's own schedule)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", help="path of the results without extension (.md and .json) (default: "
                                      "benchmarks/results/comfy_quality with the default settings, else "
                                      "comfy_quality_count<N>_steps<S>_cfg<C> in the current folder)")
    args = parser.parse_args(argv)
    for option, value in (("--count", args.count), ("--steps", args.steps), ("--threads", args.threads)):
        if value < 1:
            parser.error(f"{option} must be at least 1, got {value}")
    if args.timing_edits < 0:
        parser.error(f"--timing-edits must be at least 0, got {args.timing_edits}")
    if args.core is not None and not Path(args.core).is_file():
        parser.error(f"--core: no file {args.core}")
    if "COMFYUI_PATH" not in os.environ:
        parser.error("COMFYUI_PATH must name a ComfyUI checkout")
    default = all(getattr(args, name) == value for name, value in DEFAULT_SETTINGS.items()) and not args.mapping_study \
        and args.scheduler == "simple"
    if args.out is None:
        study = ("_mapping" if args.mapping_study else "") + ("" if args.scheduler == "simple" else f"_{args.scheduler}")
        args.out = str(COMMITTED_RESULTS) if default else \
            f"comfy_quality{study}_count{args.count}_steps{args.steps}_cfg{args.cfg:g}"
    elif not default and Path(args.out).resolve() == COMMITTED_RESULTS.resolve():
        parser.error("--out: the committed results come from the default settings; write this run elsewhere")
    return args


def register_counter():
    """A benchmark node: the model, cloned, with an ``APPLY_MODEL`` wrapper adding each call's batch to ``label``'s count."""
    import comfy.patcher_extension
    import nodes
    from comfy_api.latest import io

    class BenchmarkEvaluationCounter(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id=COUNTER, inputs=[io.Model.Input("model"), io.String.Input("label")],
                             outputs=[io.Model.Output()])

        @classmethod
        def execute(cls, model, label):
            def count(executor, x, *args, **kwargs):
                EVALUATIONS[label] = EVALUATIONS.get(label, 0) + x.shape[0]
                return executor(x, *args, **kwargs)

            counted = model.clone()
            counted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, COUNTER, count)
            return io.NodeOutput(counted)

    nodes.NODE_CLASS_MAPPINGS[COUNTER] = BenchmarkEvaluationCounter


class EditGraph:
    """One source's graph: the loader, the source, its encoding and the class prompts, then edits added to it."""

    def __init__(self, index, source_class, target_class, settings: EditSettings, scheduler="simple"):
        from comfy_execution.graph_utils import GraphBuilder
        self.graph, self.index, self.settings = GraphBuilder(prefix=""), index, settings
        self.scheduler = scheduler
        self.loader = self.graph.node("NGDMShapesModelLoader")
        self.image = self.graph.node("NGDMShapesSource", data_set="benchmark", index=index)
        self.latent = self.graph.node("VAEEncode", pixels=self.image.out(0), vae=self.loader.out(1))
        self.classes = {name: self.graph.node("NGDMShapesClass", class_name=name)
                        for name in (source_class, target_class, "unconditional")}
        self.source_class, self.target_class = source_class, target_class
        self.edits = {}  # capture node id -> key, (method, setting) for an edit

    def counted(self, model, label):
        return self.graph.node(COUNTER, model=model, label=label).out(0)

    def weight_map(self, name):
        """NGDMWeightMap as the core benchmark's map ``name``, seeded with the core's draw for this item."""
        options = dict(ALL_MAPS[name])
        purpose = options.pop("purpose")
        inputs = {"seed": item_seed(self.settings, self.index, purpose), "num_maps": self.settings.num_maps,
                  "encode_strength": self.settings.map_strength, "cfg": self.settings.cfg, "smoothing": 1.0,
                  "a": 10.0, "b": 5.0, "zero_floor": False, "change_steps": CHANGE_STEPS, "change_threshold": 0.2,
                  "change_edits": 1, "change_softness": 0.0, **options}
        return self.graph.node("NGDMWeightMap", model=self.counted(self.loader.out(0), f"map {name}"),
                               latent=self.latent.out(0), source_conditioning=self.classes[self.source_class].out(0),
                               target_conditioning=self.classes[self.target_class].out(0),
                               negative=self.classes["unconditional"].out(0), **inputs)

    def edit(self, method, setting, model, latent, start):
        """KSampler at denoise ``start`` over the last ``start`` of the schedule's steps, decoded and captured."""
        steps = max(1, round(start * self.settings.steps))
        sampled = self.graph.node("KSampler", model=self.counted(model, f"{method}, {setting}"),
                                  seed=item_seed(self.settings, self.index, START_NOISE), steps=steps,
                                  cfg=self.settings.cfg, sampler_name="euler", scheduler=self.scheduler,
                                  positive=self.classes[self.target_class].out(0),
                                  negative=self.classes["unconditional"].out(0), latent_image=latent, denoise=start)
        self.capture((method, setting), self.graph.node("VAEDecode", samples=sampled.out(0), vae=self.loader.out(1)))

    def capture(self, key, images):
        """Keep ``images`` (a node's IMAGE output 0) under ``key`` when the graph runs."""
        import shapes_templates
        self.edits[self.graph.node(shapes_templates.CAPTURE, images=images.out(0)).id] = key

    def per_pixel(self, method, name, weights, start):
        """``method`` (one of ``STUDY_METHODS``) on map ``name`` from ``start``."""
        model = self.loader.out(0)
        latent = weights.out(1)  # the source latent with the map as its noise_mask
        if method in NGDM_MAPPINGS:
            model = self.graph.node("PerPixelTimeModel", model=model, mapping=NGDM_MAPPINGS[method],
                                    start_rule="first_at_or_below").out(0)
        elif method == "DifferentialDiffusion":
            model = self.graph.node("DifferentialDiffusion", model=model, strength=1.0).out(0)
        else:
            latent = self.graph.node("SetLatentNoiseMask", samples=self.latent.out(0), mask=weights.out(0)).out(0)
        self.edit(method, f"{name}, start {start}", model, latent, start)

    def prompt(self):
        return self.graph.finalize()


PER_PIXEL_METHODS = ("NGDM", "DifferentialDiffusion", "masked sampling")
STUDY_METHODS = ("NGDM", "NGDM linear", "DifferentialDiffusion", "masked sampling")


def study_plan(mapping_study):
    """The maps and per-pixel methods of a run, and whether it has SDEdit's rows."""
    return (STUDY_MAPS, STUDY_METHODS, False) if mapping_study else (MAPS, PER_PIXEL_METHODS, True)


def quality_graph(index, source_class, target_class, settings, mapping_study=False, scheduler="simple"):
    """Every setting of the benchmark (or of the mapping study) for one source, as one graph."""
    maps, methods, with_sdedit = study_plan(mapping_study)
    graph = EditGraph(index, source_class, target_class, settings, scheduler)
    for start in STARTS if with_sdedit else ():
        graph.edit("SDEdit", f"strength {start}", graph.loader.out(0), graph.latent.out(0), start)
    for name in maps:
        weights = graph.weight_map(name)
        for start in STARTS:
            for method in methods:
                graph.per_pixel(method, name, weights, start)
    return graph


def timed_graph(index, source_class, target_class, settings):
    """The timed edit: NGDM on the soft map from ``TIMED_START``, as a graph."""
    graph = EditGraph(index, source_class, target_class, settings)
    graph.per_pixel("NGDM", TIMED_MAP, graph.weight_map(TIMED_MAP), TIMED_START)
    return graph


def run_graph(host, executor, graph):
    """Validate and execute ``graph``'s prompt with ``executor``; returns its captured images in [-1, 1] by key."""
    import execution
    import shapes_templates
    prompt = graph.prompt()
    shapes_templates.CAPTURED_IMAGES.clear()
    EVALUATIONS.clear()
    prompt_id = str(uuid.uuid4())
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid:
        raise RuntimeError(f"invalid prompt: {error} {node_errors}")
    executor.execute(prompt, prompt_id, {}, outputs)
    if not executor.success:
        raise RuntimeError(f"execution failed: {[d for e, d in executor.status_messages if e == 'execution_error']}")
    return {graph.edits[node]: image.movedim(-1, 1) * 2 - 1 for node, image in shapes_templates.CAPTURED_IMAGES.items()}


def classes_of(labels, targets, index):
    return CLASSES[int(labels[index])], CLASSES[int(targets[index])]


def evaluations_of(method, setting):
    """The edit's evaluations, its map's included."""
    map_name = next((name for name in ALL_MAPS if setting.startswith(name + ", start")), None)
    return EVALUATIONS.get(f"{method}, {setting}", 0) + (EVALUATIONS.get(f"map {map_name}", 0) if map_name else 0)


class ComfyRules:
    """A core denoiser computing as ComfyUI does: ComfyUI's sigmas of ``scheduler``, the map's level by
    ``percent_to_sigma``, and (``shapes_agreement.comfy_rule_denoiser``) its nearest-integer timestep into the U-Net."""

    def __init__(self, host, model, scheduler="simple"):
        import shapes_agreement
        self.denoiser = shapes_agreement.comfy_rule_denoiser(host, model)
        self.model_sampling = model.get_model_object("model_sampling")
        self.scheduler = scheduler

    def __call__(self, x, sigma, cond=None):
        return self.denoiser(x, sigma, cond)

    def __getattr__(self, name):
        return getattr(self.denoiser, name)

    def sigmas(self, steps):
        import comfy.samplers
        return comfy.samplers.calculate_sigmas(self.model_sampling, self.scheduler, steps).cpu()

    def sigma_at(self, strength):
        return float(self.model_sampling.percent_to_sigma(1.0 - strength))


def core_map(denoiser, name, source, source_class, target_class, settings, index):
    """The core's map ``name`` of ``ALL_MAPS`` for one source, from the item's draws."""
    options = ALL_MAPS[name]
    if options["mode"] == "change":
        return change_map(denoiser, source, source_class, target_class, settings, options["change_steps"],
                          edits=options["change_edits"], strength=options["encode_strength"],
                          softness=options["change_softness"], indices=[index])
    difference = map_difference(denoiser, source, source_class, target_class, settings, [index])
    return diffedit_mask(difference) if options["mode"] == "diffedit" else \
        ngdm_weights(difference, a=options["a"], b=options["b"])


def core_edits(denoiser, index, source_class, target_class, settings, mapping_study=False):
    """Every setting of :func:`quality_graph` for one source, in ``ngdm_core`` (the core benchmark's functions and draws).

    DifferentialDiffusion's core edit is the linear mapping, so "NGDM linear" has the same core edit."""
    maps, methods, with_sdedit = study_plan(mapping_study)
    source = make_batch(BENCHMARK_SEED, 1, start=index).images
    source_class, target_class = torch.tensor([source_class]), torch.tensor([target_class])
    edits = {("SDEdit", f"strength {start}"): sdedit(denoiser, source, target_class, settings, start, [index])
             for start in (STARTS if with_sdedit else ())}
    mappings = {**NGDM_MAPPINGS, "DifferentialDiffusion": "linear"}
    for name in maps:
        weights = core_map(denoiser, name, source, source_class, target_class, settings, index)
        for start in STARTS:
            setting = f"{name}, start {start}"
            for method in methods:
                edits[method, setting] = per_pixel_time(denoiser, source, target_class, weights, settings,
                                                        mappings[method], start=start, indices=[index]) \
                    if method in mappings else masked_sampling(denoiser, source, target_class, weights, settings,
                                                               start, [index])
    return edits


def quality(host, args, settings, log):
    """The rows: per (method, setting), the core benchmark's metrics over the sources, and evaluations per edit."""
    classifier = load_classifier()
    batch = make_batch(BENCHMARK_SEED, args.count)
    targets = other_class(batch.labels)
    ground_truth, union = ground_truth_edit(BENCHMARK_SEED, args.count, targets)
    keep = 1 - dilated(union, PRESERVE_MARGIN)
    everywhere = torch.ones_like(union)
    comfy_rules = ComfyRules(host, host.pack_module("nodes.shapes").load_shapes_model()[0], args.scheduler)
    edited, evaluations, apart = {}, {}, {}
    for index in range(args.count):
        began = time.perf_counter()
        graph = quality_graph(index, *classes_of(batch.labels, targets, index), settings, args.mapping_study,
                              args.scheduler)
        images = run_graph(host, host.new_executor(), graph)
        core = core_edits(comfy_rules, index, int(batch.labels[index]), int(targets[index]), settings,
                          args.mapping_study)
        for key in graph.edits.values():
            edited.setdefault(key, []).append(images[key])
            evaluations.setdefault(key, []).append(evaluations_of(*key))
            # Image units, [0, 1], as comfy_agreement.md's.
            apart.setdefault(key, []).append((images[key] - core[key].clamp(-1, 1)).abs().max().item() / 2)
        log(f"source {index}: {len(images)} edits in {time.perf_counter() - began:.1f} s")
    rows = []
    for (method, setting), images in edited.items():
        images = torch.cat(images)
        rows.append({"method": method, "setting": setting,
                     "success": edit_success(classifier, images, targets).mean().item(),
                     "psnr_outside": psnr(images, batch.images, keep).mean().item(),
                     "ssim_outside": ssim(images, batch.images, keep).mean().item(),
                     "psnr_full_vs_ground_truth": psnr(images, ground_truth, everywhere).mean().item(),
                     "model_evaluations": statistics.mean(evaluations[(method, setting)]),
                     "max_difference_from_core_with_comfyui_rules": max(apart[(method, setting)])})
    return rows


def timing(host, args, settings, log):
    """Seconds per NGDM edit (map and sampling) through the executor and in the core, interleaved per source."""
    import comfy.model_management
    batch = make_batch(BENCHMARK_SEED, args.timing_edits + 1)
    targets = other_class(batch.labels)
    denoiser = load_denoiser()
    executor = host.new_executor()
    # Loads the model; on an item not timed, since the executor would serve the same graph from its cache.
    warm_up = args.timing_edits
    run_graph(host, executor, timed_graph(warm_up, *classes_of(batch.labels, targets, warm_up), settings))
    a, b = SOFT
    seconds = {"ComfyUI graph": [], "core": []}
    for index in range(args.timing_edits):
        graph = timed_graph(index, *classes_of(batch.labels, targets, index), settings)
        began = time.perf_counter()
        run_graph(host, executor, graph)
        seconds["ComfyUI graph"].append(time.perf_counter() - began)
        began = time.perf_counter()
        source = make_batch(BENCHMARK_SEED, 1, start=index).images
        difference = map_difference(denoiser, source, batch.labels[index:index + 1], targets[index:index + 1],
                                    settings, indices=[index], conditional_only=True)
        per_pixel_time(denoiser, source, targets[index:index + 1], ngdm_weights(difference, a=a, b=b), settings,
                       start=TIMED_START, indices=[index])
        seconds["core"].append(time.perf_counter() - began)
    comfy.model_management.soft_empty_cache()
    medians = {way: statistics.median(values) for way, values in seconds.items()}
    log(f"timing: {medians}")
    return {"edit": f"NGDM, {TIMED_MAP}, start {TIMED_START}", "edits": args.timing_edits,
            "seconds": seconds, "median_seconds": medians,
            "ratio": medians["ComfyUI graph"] / medians["core"]}


def machine(comfyui_path):
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    # Read, not executed: the registry's security check (ruff S102) refuses exec.
    version = re.search(r'__version__\s*=\s*"([^"]+)"', (Path(comfyui_path) / "comfyui_version.py").read_text())
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} on {torch.get_num_threads()} thread(s), "
            f"ComfyUI {version.group(1) if version else '?'}")


def main(argv=None):
    args = parse_arguments(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    log = lambda line: print(line, file=sys.stderr, flush=True)
    import tiny_host
    host = tiny_host.start(os.path.abspath(os.environ["COMFYUI_PATH"]))
    import shapes_templates
    shapes_templates.register_capture()
    register_counter()
    settings = EditSettings(steps=args.steps, cfg=args.cfg)
    began = time.perf_counter()
    rows = quality(host, args, settings, log)
    quality_seconds = time.perf_counter() - began
    results = {"command": "python benchmarks/comfy_quality_benchmark.py" + "".join(f" {a}" for a in
                                                                              (argv or sys.argv[1:])),
               "machine": machine(os.environ["COMFYUI_PATH"]), "count": args.count, "steps": args.steps,
               "cfg": args.cfg, "seconds": round(quality_seconds), "edits": rows,
               "core": json.loads(Path(args.core).read_text()) if args.core else None,
               "timing": timing(host, args, settings, log) if args.timing_edits else None}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({key: value for key, value in results.items() if key != "core"},
                                                   indent=1))
    out.with_suffix(".md").write_text(markdown(results, out.with_suffix(".md")))
    log(f"wrote {out}.md and .json in {time.perf_counter() - began:.0f} s")


NOTES = "<!-- notes: written by hand below this line; the script keeps them -->"


def markdown(results, path) -> str:
    core = {(row["method"], row["setting"]): row for row in (results["core"] or {}).get("edits", [])}
    lines = [f"{results['count']} sources (data seed {BENCHMARK_SEED}), {results['steps']} Euler steps of the whole "
             f"schedule, CFG {results['cfg']}, each edit a ComfyUI graph run by its executor; `{results['command']}`, "
             f"{results['seconds']} s for the edits on {results['machine']}. Metrics as `quality.md`'s. Evaluations: "
             "one U-Net forward pass for one item per edit, counted by an APPLY_MODEL wrapper, the map's included. "
             "Core: the same row of `quality_benchmark.py --count "
             f"{results['count']}` on the same sources and draws" + ("" if core else " (not given)") + ". The last "
             "column: the largest difference over the sources, in image units [0, 1], between the graph's edit and "
             "`ngdm_core`'s with ComfyUI's rules (its \"simple\" sigmas, integer timestep and map level) and the same "
             "draws.", "",
             "| method | setting | success ComfyUI (core) | PSNR outside ComfyUI (core) | SSIM outside ComfyUI (core) "
             "| PSNR vs GT ComfyUI (core) | evaluations ComfyUI (core) | max difference from core with ComfyUI's rules |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in results["edits"]:
        theirs = core.get((row["method"], row["setting"]))

        def cell(key, digits):
            ours = f"{row[key]:.{digits}f}"
            return ours if theirs is None else f"{ours} ({theirs[key]:.{digits}f})"

        lines.append(f"| {row['method']} | {row['setting']} | {cell('success', 2)} | {cell('psnr_outside', 2)} | "
                     f"{cell('ssim_outside', 4)} | {cell('psnr_full_vs_ground_truth', 2)} | "
                     f"{cell('model_evaluations', 0)} | {row['max_difference_from_core_with_comfyui_rules']:.1e} |")
    if results["timing"]:
        timed = results["timing"]
        medians = timed["median_seconds"]
        lines += ["", f"**Time per edit** ({timed['edit']}: the map and the sampling, {timed['edits']} sources, "
                      "interleaved, medians): the graph through one persistent executor "
                      f"{medians['ComfyUI graph'] * 1000:.0f} ms, `ngdm_core` {medians['core'] * 1000:.0f} ms, "
                      f"a ratio of {timed['ratio']:.2f} (goal at most 1.3)."]
    text = "\n".join(lines) + "\n"
    if path.exists() and NOTES in path.read_text():
        text += "\n" + NOTES + path.read_text().split(NOTES, 1)[1]
    return text


if __name__ == "__main__":
    main()
