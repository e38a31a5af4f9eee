import json
import os

import pytest
import torch

WORKFLOWS = ["ngdm_text_edit", "ngdm_controlnet_edit", "ngdm_ksampler_edit"]
KINDS = ["eps", "v_prediction", "flow"]


def load_prompt(host, name, steps=8):
    with open(os.path.join(host.PACK_ROOT, "example_workflows", f"{name}.json")) as f:
        prompt = host.ui_to_api(json.load(f))
    for node in prompt.values():
        # Fewer steps keep the CPU run short; the graph is otherwise the shipped one.
        if "steps" in node["inputs"]:
            node["inputs"]["steps"] = steps
    return prompt


def node_of(prompt, class_type):
    return next(node for node in prompt.values() if node["class_type"] == class_type)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_keeps_the_source_exactly_where_lambda_is_zero(host, name, kind):
    host.TINY_MODEL_KIND["kind"] = kind
    prompt = load_prompt(host, name)
    # DiffEdit's binary map has exact zeros; the soft map's floor is sigmoid(-b) > 0.
    node_of(prompt, "NGDMWeightMap")["inputs"]["mode"] = "diffedit"
    captured = host.run_prompt(prompt)
    source, output = captured["source"], captured["output"]
    weights = output["noise_mask"].expand_as(source)
    assert (weights == 0).any() and (weights == 1).any()
    assert (output["samples"] - source)[weights == 0].abs().max().item() <= 1e-5
    assert (output["samples"] - source)[weights == 1].abs().mean().item() > 1e-2


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_runs_as_shipped(host, name):
    host.TINY_MODEL_KIND["kind"] = "eps"
    captured = host.run_prompt(load_prompt(host, name))
    weights = captured["output"]["noise_mask"]
    assert weights.shape == (1, 1, host.LATENT_SIZE, host.LATENT_SIZE)
    assert torch.isfinite(captured["output"]["samples"]).all()
    assert 0 < weights.min() and weights.max() < 1
