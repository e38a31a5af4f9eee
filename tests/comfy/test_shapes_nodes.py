"""The shipped shapes model as a ComfyUI MODEL: exact eps, exact reconstruction, and its templates run as shipped."""

import glob
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shapes_templates  # noqa: E402  (beside this file, which importlib mode keeps off sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))
# Every shipped shapes template, whether or not the builder still makes it.
TEMPLATES = sorted(os.path.basename(path)[:-5] for path in
                   glob.glob(os.path.join(HERE, "..", "..", "example_workflows", "shapes_*.json")))
# Templates that edit under the source's own class have tests of their own; every other one is a class edit.
REGION, RECTIFIER = "shapes_region_direction_edit", "shapes_rectifier_reconstruct"
CLASS_EDITS = [name for name in TEMPLATES if name not in (REGION, RECTIFIER)]


@pytest.fixture(scope="module")
def shapes(host):
    shapes_templates.register_capture()
    return host.pack_module("nodes.shapes")


@pytest.fixture(scope="module")
def core(host):
    return host.pack_module("ngdm_core.shapes")


@pytest.fixture(scope="module")
def loaded(shapes):
    return shapes.load_shapes_model()


def test_the_loaded_model_predicts_shapes_unet_eps_exactly(host, loaded, core):
    import importlib
    model_module = importlib.import_module(f"{core.__name__}.model")
    unet = model_module.load_model(model_module.ShapesUNet, model_module.UNET_FILE)
    model, _ = loaded
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2, 3, 0, 2])
    x = torch.randn(len(labels), 3, 32, 32, generator=generator)
    t = torch.tensor([0.0, 1.0, 250.0, 500.0, 998.0, 999.0])
    with torch.no_grad():
        expected = unet(x, t, labels)
        got = model.model.diffusion_model(x, t, y=torch.nn.functional.one_hot(labels, 4).float())
    # ComfyUI's extra output blocks keep their input's first channels and its upsamplings have no conv:
    # the same operations as ShapesUNet's, so nothing is rounded differently.
    assert torch.equal(got, expected)


def test_the_schedule_is_ddpms_linear_betas(loaded, core):
    import importlib
    model_module = importlib.import_module(f"{core.__name__}.model")
    model, _ = loaded
    sigmas = model.get_model_object("model_sampling").sigmas.double()
    alpha_bar = model_module.ddpm_alpha_bar().double()
    core_sigmas = ((1 - alpha_bar) / alpha_bar).sqrt()
    # Both sides round alpha_bar to float32 (relative 2^-24 at most); that moves (1 - ab) / ab by a relative
    # 2^-24 / (1 - ab), which the square root halves, once per side. ComfyUI's float32 sigmas then add a few
    # roundings of their own (a subtraction, a division, a square root, storage): 4 ulps.
    bound = 2.0**-24 / (1 - alpha_bar) + 4 * 2.0**-24
    assert ((sigmas / core_sigmas - 1).abs() <= bound).all()


def test_a_missing_or_corrupt_weights_file_gets_an_error_naming_it(shapes, tmp_path, core):
    import importlib
    model_module = importlib.import_module(f"{core.__name__}.model")
    missing = tmp_path / "missing.safetensors"
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json and no tensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(model_module.UNET_FILE.read_bytes()[:5000])
    for path in (missing, corrupt, truncated, model_module.CLASSIFIER_FILE):
        with pytest.raises(ValueError, match="cannot load the weights file") as error:
            shapes.load_shapes_model(path)
        assert str(path) in str(error.value)


def test_class_conditioning_is_a_one_hot_and_a_wrong_class_is_named(shapes):
    (embedding, options), = shapes.class_conditioning("triangle")
    assert embedding.shape == (1, 1, 4) and embedding[0, 0].tolist() == [0, 0, 1, 0] and options == {}
    assert shapes.class_conditioning("unconditional")[0][0][0, 0].tolist() == [0, 0, 0, 1]
    with pytest.raises(ValueError, match="class_name"):
        shapes.class_conditioning("hexagon")


def test_the_source_node_gives_the_data_sets_item_and_its_mask(host, core):
    import importlib
    import nodes
    data = importlib.import_module(f"{core.__name__}.data")
    image, mask, class_name = nodes.NODE_CLASS_MAPPINGS["NGDMShapesSource"].execute("held_out", 7).result
    batch = data.make_batch(data.HELD_OUT_SEED, 1, start=7)
    assert image.shape == (1, 32, 32, 3) and mask.shape == (1, 32, 32)
    assert torch.allclose(image[0].permute(2, 0, 1) * 2 - 1, batch.images[0], atol=1e-6)
    assert torch.equal(mask, batch.masks[:, 0]) and class_name == data.CLASSES[int(batch.labels[0])]


def test_a_prompt_from_another_model_is_refused_with_the_input_named(host, loaded):
    import comfy.sample
    model, _ = loaded
    clip_prompt = host.tiny_conditioning("a photo")
    with pytest.raises(ValueError, match="conditioning: the shapes model takes a class's one-hot"):
        comfy.sample.sample(model, torch.zeros(1, 3, 32, 32), 2, 1.0, "euler", "simple", clip_prompt, clip_prompt,
                            torch.zeros(1, 3, 32, 32), disable_pbar=True)


def source_mask(host, prompt):
    import nodes
    source = host.node_of(prompt, "NGDMShapesSource")["inputs"]
    return nodes.NODE_CLASS_MAPPINGS["NGDMShapesSource"].execute(source["data_set"], source["index"]).result


def test_edit_friendly_with_the_source_class_reconstructs_the_source_through_the_vae(host, shapes):
    prompt = host.load_workflow("shapes_edit_friendly_edit", None, stand_ins={"PreviewImage": shapes_templates.CAPTURE})
    invert, guider = host.node_of(prompt, "EditFriendlyInvert"), host.node_of(prompt, "CFGGuider")
    guider["inputs"]["positive"] = invert["inputs"]["positive"]
    guider["inputs"]["cfg"] = invert["inputs"]["source_cfg"]
    shapes_templates.CAPTURED_IMAGES.clear()
    host.run_prompt(prompt)
    (images,) = shapes_templates.CAPTURED_IMAGES.values()
    # The replay recomputes the inversion's own model calls on the recorded states, so each step only
    # rounds (x - mu) / s * s + mu: a few float32 ulps of the state. The pixel VAE's round trip is exact
    # to 1e-7. Half an 8-bit level is far above that and far below any edit.
    assert (images[1] - images[0]).abs().max().item() <= 1e-5


def boxes_overlap(a, b):
    (ax, ay), (aw, ah) = a["pos"], a["size"]
    (bx, by), (bw, bh) = b["pos"], b["size"]
    return ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah


@pytest.mark.parametrize("name", TEMPLATES)
def test_the_template_lays_out_every_node_apart_with_every_widget_set(host, name):
    with open(os.path.join(host.PACK_ROOT, "example_workflows", f"{name}.json")) as f:
        workflow = json.load(f)
    boxes = workflow["nodes"]
    assert [(a["id"], b["id"]) for i, a in enumerate(boxes) for b in boxes[i + 1:] if boxes_overlap(a, b)] == []
    for node in boxes:
        if node["type"] in host.NOTE_TYPES:
            continue
        widgets = host._widget_inputs(node["type"])
        # Every widget, appended ones included, has its value: none is left hidden at a default.
        assert len(node["widgets_values"]) == len(widgets) + sum(extra for _, extra in widgets), node["type"]
        sockets = max(len(node["inputs"]), len(node["outputs"]))
        needed = shapes_templates.TITLE_HEIGHT + shapes_templates.SLOT_HEIGHT * sockets + \
            shapes_templates.WIDGET_HEIGHT * len(node["widgets_values"])
        assert node["size"][1] >= needed, node["type"]
    assert os.path.isfile(os.path.join(host.PACK_ROOT, "example_workflows", f"{name}.jpg"))


@pytest.mark.parametrize("name", CLASS_EDITS)
def test_the_template_runs_as_shipped_and_edits_the_object(host, shapes, core, name):
    import importlib
    edits = importlib.import_module(f"{core.__name__}.edits")
    model_module = importlib.import_module(f"{core.__name__}.model")
    prompt = host.load_workflow(name, None, stand_ins={"PreviewImage": shapes_templates.CAPTURE})
    image, mask, source_class = source_mask(host, prompt)
    (target,) = {node["inputs"]["class_name"] for node in prompt.values() if node["class_type"] == "NGDMShapesClass"} \
        - {"unconditional", source_class}
    (images,) = shapes_templates.run_template(host, name).values()
    assert images.shape[1:] == (32, 32, 3) and torch.isfinite(images).all()
    # The preview shows the source first, untouched, then each result.
    assert torch.equal(images[0], image[0])
    results = images[1:].permute(0, 3, 1, 2) * 2 - 1
    source = image.permute(0, 3, 1, 2) * 2 - 1
    classifier = model_module.load_classifier()
    target_index = torch.full((len(results),), shapes.CLASS_NAMES.index(target))
    assert edits.edit_success(classifier, results, target_index).tolist() == [1.0] * len(results)
    # The object changes; the background, away from it, changes less than the object does.
    near = edits.dilated(mask[:, None], 4)
    change = (results - source).abs().mean(1, keepdim=True)
    inside = (change * mask[:, None]).sum((1, 2, 3)) / mask.sum()
    outside = (change * (1 - near)).sum((1, 2, 3)) / (1 - near).sum()
    assert (outside < inside).all(), (inside, outside)


def shapes_images(images):
    """The preview's batch (B, H, W, 3) in [0, 1] as the core's images (B, 3, H, W) in [-1, 1]."""
    return images.permute(0, 3, 1, 2) * 2 - 1


def test_edge_preserving_noise_keeps_the_backgrounds_edges_closer_than_random_noise(host, shapes, core):
    import importlib
    edits = importlib.import_module(f"{core.__name__}.edits")
    edge_map = importlib.import_module(f"{host.pack_module('ngdm_core').__name__}.edge_preserving").edge_map
    name = "shapes_edge_preserving_img2img"
    image, mask, _ = source_mask(host, host.load_workflow(name, None))
    (images,) = shapes_templates.run_template(host, name).values()
    source, (edge_preserving, random_noise, _) = shapes_images(image), shapes_images(images[1:])
    # The source's edges away from the object (which the class edit redraws), weighted by their strength G.
    edges = edge_map(source)[:, :1] * (1 - edits.dilated(mask[:, None], 4))
    errors = [((result - source).abs().mean(0) * edges[0]).sum().item() / edges.sum().item()
              for result in (edge_preserving, random_noise)]
    print(f"\nedge-weighted error outside the object: edge-preserving {errors[0]:.4f}, random {errors[1]:.4f}")
    # Same seed and a deterministic sampler: the two differ only by the start noise, which the edge-preserving
    # noise scales by 1 / ((1 - tau) sqrt(1 + G / lambda) + tau) <= 1, most on the strongest edges. The start is
    # closer to the source on every pixel; that the end is too is measured, not derived: it held on 16 of 20
    # held-out sources (median ratio 0.84; benchmarks/results/shapes_templates.md), on this one at 0.76. So this
    # asserts the ordering only; equal noise (the node fallen back to RandomNoise's) gives equal errors and fails.
    assert errors[0] < errors[1]


def test_the_region_edit_changes_the_object_and_little_else(host, shapes, core):
    import importlib
    region = importlib.import_module(f"{core.__name__}.region")
    prompt = host.load_workflow(REGION, None, stand_ins={"PreviewImage": shapes_templates.CAPTURE})
    # 20 iterations instead of the shipped 200 (which converge at 82, 18 s): the ratio found is 32.94 against
    # the converged 33.0, so the direction is the same to the search's own precision, in 5 s.
    host.node_of(prompt, "RegionJacobianDirection")["inputs"]["iterations"] = 20
    _, mask, _ = source_mask(host, prompt)
    shapes_templates.CAPTURED_IMAGES.clear()
    host.run_prompt(prompt)
    (images,) = shapes_templates.CAPTURED_IMAGES.values()
    minus, plain, plus = shapes_images(images[1:]).split(1)
    for edited in (minus, plus):
        leakage, inside = (value.item() for value in region.edit_leakage(edited, plain, mask[:, None]))
        print(f"\nleakage {leakage:.3f}, RMS change inside {inside:.3f}")
        # A visible edit: RMS change per inside pixel value above 0.1 of the [-1, 1] range (as the core's test).
        assert inside > 0.1
        # Leakage below 1: more change energy inside the object than in all the rest. A change spread evenly
        # over the image would give sqrt(outside pixels / inside pixels) (about 2.8 here), and the unconfined
        # direction gives 0.67 and 0.90 at this strength; the ratio direction measured 0.31 and 0.35 applied as
        # found, and 0.20 and 0.31 re-found at every step as the template ships it (refind_iterations 3).
        assert leakage < 1.0


def test_the_rectifier_template_reconstructs_the_source_more_faithfully_than_the_plain_model(host, shapes):
    # 20 training steps instead of the shipped 200 (4 s instead of 30; every steps widget becomes 20, and the
    # KSamplers' are 20 as shipped): the gain is then 0.8 dB instead of 7.3 dB.
    prompt = host.load_workflow(RECTIFIER, 20, stand_ins={"PreviewImage": shapes_templates.CAPTURE})
    image, _, _ = source_mask(host, prompt)
    shapes_templates.CAPTURED_IMAGES.clear()
    host.run_prompt(prompt)
    (images,) = shapes_templates.CAPTURED_IMAGES.values()
    plain, rectified = shapes_images(images[1:]).split(1)
    source = shapes_images(image)
    errors = [((result - source) ** 2).mean().item() for result in (plain, rectified)]
    print(f"\nreconstruction MSE: plain {errors[0]:.4f}, rectified {errors[1]:.4f}")
    # An untrained rectifier is the identity (the core's test), so the two would be equal; more than half an 8-bit
    # level apart somewhere means the trained rectifier acts. The noise-fitting loss it minimises is the
    # reconstruction error's, so the rectified SDEdit must be the closer one (measured 0.0411 against 0.0468).
    assert (rectified - plain).abs().max().item() > 1 / 255
    assert errors[1] < errors[0]
