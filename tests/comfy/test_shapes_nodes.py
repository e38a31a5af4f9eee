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
    import nodes
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


@pytest.mark.parametrize("name", TEMPLATES)
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
