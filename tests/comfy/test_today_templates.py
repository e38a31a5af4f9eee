"""The templates for today's editing models, run on tiny random-weight models of their families.

Flux.1 [dev] (16-channel flow, guidance embedding): NGDM over the edit-friendly inversion.
Qwen-Image-Edit (one-frame 5-D latents, reference latents) and FLUX.1 Kontext (reference latent,
Flux guidance): the instruction edit confined by Lambda from NGDMWeightMap's change mode.
"""

import json
import os

import pytest
import torch

STEPS = 6
TEMPLATES = {"flux_ngdm_edit_friendly_edit": "flux_dev", "qwen_image_edit_confined_edit": "qwen_image",
             "flux_kontext_confined_edit": "flux_dev"}
INSTRUCTION_TEMPLATES = ["qwen_image_edit_confined_edit", "flux_kontext_confined_edit"]
TITLE_HEIGHT = 30  # the frontend draws a node's title bar above its pos


def kept_tolerance(host, name, captured):
    return host.held_pixel_tolerance(host.family_latent_format(TEMPLATES[name]), captured["source"])


@pytest.mark.parametrize("name", TEMPLATES)
def test_the_template_keeps_the_source_where_lambda_is_zero_as_shipped(host, name):
    captured = host.run_prompt(host.load_workflow(name, STEPS))
    assert captured["output"]["samples"].shape == captured["source"].shape
    host.check_kept_where_lambda_is_zero(captured, kept_tolerance(host, name, captured))


def test_the_flux_template_keeps_the_source_under_change_modes_map(host):
    """Shipped with zero_floor, only the least-changed pixels are exactly 0; the change map has many.

    (DiffEdit's map is empty on these tiny models: their prompt difference nowhere reaches 1.5 times its mean.)
    """
    name = "flux_ngdm_edit_friendly_edit"
    prompt = host.load_workflow(name, STEPS)
    # One edit's binary change map: on this random-weight model averaged edits mark nearly every pixel changed.
    host.node_of(prompt, "NGDMWeightMap")["inputs"].update(mode="change", change_edits=1, change_softness=0.0)
    captured = host.run_prompt(prompt)
    assert (captured["output"]["noise_mask"] == 0).float().mean() > 0.1
    host.check_kept_where_lambda_is_zero(captured, kept_tolerance(host, name, captured))


def test_the_flux_template_reconstructs_the_source_with_the_source_prompt(host):
    prompt = host.load_workflow("flux_ngdm_edit_friendly_edit", STEPS)
    guider = host.node_of(prompt, "CFGGuider")["inputs"]
    guider["positive"] = host.node_of(prompt, "EditFriendlyInvert")["inputs"]["positive"]
    captured = host.run_prompt(prompt)
    assert (captured["output"]["samples"] - captured["source"]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", INSTRUCTION_TEMPLATES)
def test_the_empty_instruction_is_the_source(host, name):
    """With the empty instruction as the edit too, the model's own edit retraces the source: Lambda is 0 everywhere."""
    prompt = host.load_workflow(name, STEPS)
    weight_map = host.node_of(prompt, "NGDMWeightMap")["inputs"]
    weight_map["target_conditioning"] = weight_map["source_conditioning"]
    captured = host.run_prompt(prompt)
    assert not captured["output"]["noise_mask"].any()
    change = (captured["output"]["samples"] - captured["source"]).abs().max().item()
    assert change <= kept_tolerance(host, name, captured)


@pytest.mark.parametrize("name", INSTRUCTION_TEMPLATES)
def test_the_instruction_models_read_the_reference_latent(host, name):
    """The edit model's own edit depends on the source it is shown: without the reference, another map."""
    prompt = host.load_workflow(name, STEPS)
    with_reference = host.run_prompt(prompt)["output"]["noise_mask"].clone()
    for node in prompt.values():
        if node["class_type"] == "ReferenceLatent":
            del node["inputs"]["latent"]
        if node["class_type"] == "TinyTextEncodeQwenImageEdit":
            del node["inputs"]["vae"]
    assert not torch.equal(host.run_prompt(prompt)["output"]["noise_mask"], with_reference)


def boxes(workflow):
    return {node["id"]: (node["pos"][0], node["pos"][1] - TITLE_HEIGHT, node["pos"][0] + node["size"][0],
                         node["pos"][1] + node["size"][1]) for node in workflow["nodes"]}


@pytest.mark.parametrize("name", TEMPLATES)
def test_the_template_has_a_thumbnail_and_no_box_overlaps_another(host, name):
    folder = os.path.join(host.PACK_ROOT, "example_workflows")
    assert os.path.isfile(os.path.join(folder, f"{name}.jpg"))
    with open(os.path.join(folder, f"{name}.json")) as f:
        placed = sorted(boxes(json.load(f)).items())
    for index, (first, a) in enumerate(placed):
        for second, b in placed[index + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], f"nodes {first} and {second} overlap"
