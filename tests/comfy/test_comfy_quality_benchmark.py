"""The ComfyUI quality benchmark's graphs run, keep what they must, and count what they spend (one source, 2 steps)."""

import importlib.util
import pathlib

import pytest
import torch

STEPS, NUM_MAPS = 2, 2
MAP = "DiffEdit binary"


def load_benchmark():
    """The benchmark module, loaded at collection: it imports ngdm_core, which the host takes off sys.path."""
    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "comfy_quality_benchmark.py"
    spec = importlib.util.spec_from_file_location("comfy_quality_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCHMARK = load_benchmark()


@pytest.fixture(scope="module")
def benchmark(host):
    import shapes_templates
    shapes_templates.register_capture()
    BENCHMARK.register_counter()
    return BENCHMARK


@pytest.fixture(scope="module")
def edits(host, benchmark):
    """One source's binary map and its three per-pixel edits from the top (denoise 1), as the benchmark builds them."""
    from ngdm_core.shapes.data import make_batch, other_class
    batch = make_batch(benchmark.BENCHMARK_SEED, 1)
    classes = benchmark.classes_of(batch.labels, other_class(batch.labels), 0)
    settings = benchmark.EditSettings(steps=STEPS, cfg=3.0, num_maps=NUM_MAPS)
    graph = benchmark.EditGraph(0, *classes, settings)
    weights = graph.weight_map(MAP)
    graph.capture("map", graph.graph.node("MaskToImage", mask=weights.out(0)))
    for method in benchmark.PER_PIXEL_METHODS:
        graph.per_pixel(method, MAP, weights, 1.0)
    images = benchmark.run_graph(host, host.new_executor(), graph)
    return batch.images, images, dict(benchmark.EVALUATIONS)


def test_masked_sampling_keeps_the_source_outside_the_binary_map(host, edits):
    source, images, _ = edits
    mask = ((images["map"][:, :1] + 1) / 2).expand_as(source)
    assert (mask == 0).any() and (mask == 1).any()
    edited = images["masked sampling", f"{MAP}, start 1.0"]
    # Held pixels pass the sampler in float32 (tiny_host.held_pixel_tolerance: identity latent format, |source|
    # <= 1) and the pixel VAE's encode and decode, one rounding each of values within 1 (2 eps).
    import comfy.latent_formats
    tolerance = host.held_pixel_tolerance(comfy.latent_formats.ChromaRadiance(), source) + \
        2 * torch.finfo(torch.float32).eps
    assert (edited - source)[mask == 0].abs().max().item() <= tolerance
    assert (edited - source)[mask == 1].abs().mean().item() > 1e-2


def test_on_a_binary_map_ngdm_and_differential_diffusion_are_masked_sampling(edits):
    # With a 0/1 map each pixel starts at the top or never, for both mappings; ComfyUI's "simple" schedule
    # stops above sigma_min, so DifferentialDiffusion's threshold never reaches 0 and never starts a 0 pixel.
    _, images, _ = edits
    masked = images["masked sampling", f"{MAP}, start 1.0"]
    for method in ("NGDM", "DifferentialDiffusion"):
        assert torch.equal(images[method, f"{MAP}, start 1.0"], masked), method


def test_evaluations_are_counted_in_closed_form(edits, benchmark):
    _, _, evaluations = edits
    # The map: the two prompts' conditional predictions on each noise (the node's plain-CFG shortcut); an
    # edit: one CFG step (cond and uncond, 2 items) per Euler step.
    assert evaluations[f"map {MAP}"] == 2 * NUM_MAPS
    for method in benchmark.PER_PIXEL_METHODS:
        assert evaluations[f"{method}, {MAP}, start 1.0"] == 2 * STEPS


def test_on_a_soft_map_the_linear_mapping_is_differential_diffusions_edit_and_the_power_law_another(host, benchmark):
    """The mapping study's claim, on one source with the "simple" scheduler: PerPixelTimeModel with mapping "linear"
    makes DifferentialDiffusion's edit, so the study's linear rows are DifferentialDiffusion's, and "ngdm" changes the
    edit on a soft map."""
    from ngdm_core.shapes.data import make_batch, other_class
    batch = make_batch(benchmark.BENCHMARK_SEED, 1)
    settings = benchmark.EditSettings(steps=4, cfg=3.0, num_maps=NUM_MAPS)
    graph = benchmark.EditGraph(0, *benchmark.classes_of(batch.labels, other_class(batch.labels), 0), settings)
    weights = graph.weight_map(benchmark.SOFT_MAP)
    for method in ("NGDM", "NGDM linear", "DifferentialDiffusion"):
        graph.per_pixel(method, benchmark.SOFT_MAP, weights, 1.0)
    images = benchmark.run_graph(host, host.new_executor(), graph)
    edit = {method: images[method, f"{benchmark.SOFT_MAP}, start 1.0"] for method in ("NGDM", "NGDM linear",
                                                                                        "DifferentialDiffusion")}
    # Both nodes hand ComfyUI the same 0/1 mask at every step (weight >= the normalised timestep), and ComfyUI
    # blends and samples the same way after it, so the edits are the same floats, not merely close.
    assert torch.equal(edit["NGDM linear"], edit["DifferentialDiffusion"])
    # On 4 "simple" steps (sigma 157, 17.2, 3.42, 0.95; timesteps 999, 749, 499, 249) the linear rule starts a weight
    # at the step whose timestep / 999 falls to it, the power law where sqrt((1 + 157^2)^w - 1) reaches the step's
    # sigma: weights in [0.064, 0.249), [0.252, 0.500) and [0.563, 0.75) start a step earlier under the power law,
    # and the soft map spans them. A pixel denoised one more step moves by a visible amount, where float32 rounding
    # moves it by about 1e-7: a mean difference over the image above 1e-3 separates the two.
    assert (edit["NGDM"] - edit["DifferentialDiffusion"]).abs().mean().item() > 1e-3
