import json
import os

import pytest
import torch

KINDS = ["eps", "v_prediction", "flow"]


def load_prompt(host, name, steps=25):
    with open(os.path.join(host.PACK_ROOT, "example_workflows", f"{name}.json")) as f:
        prompt = host.ui_to_api(json.load(f))
    node_of(prompt, "BasicScheduler")["inputs"]["steps"] = steps
    return prompt


def node_of(prompt, class_type):
    return next(node for node in prompt.values() if node["class_type"] == class_type)


def target_as_source(prompt):
    """Make the edit a reconstruction: the target prompt and cfg become the source's."""
    invert, guider = node_of(prompt, "EditFriendlyInvert"), node_of(prompt, "CFGGuider")
    prompt[guider["inputs"]["positive"][0]]["inputs"]["text"] = prompt[invert["inputs"]["positive"][0]]["inputs"]["text"]
    guider["inputs"]["cfg"] = invert["inputs"]["source_cfg"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_edit_workflow_with_the_source_prompt_reconstructs_the_source(host, kind):
    host.TINY_MODEL_KIND["kind"] = kind
    prompt = load_prompt(host, "edit_friendly_edit")
    target_as_source(prompt)
    captured = host.run_prompt(prompt)
    assert (captured["output"]["samples"] - captured["source"]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_the_edit_workflow_edits_as_shipped(host, kind):
    host.TINY_MODEL_KIND["kind"] = kind
    captured = host.run_prompt(load_prompt(host, "edit_friendly_edit"))
    assert (captured["output"]["samples"] - captured["source"]).abs().mean().item() > 1e-2


@pytest.mark.parametrize("kind", KINDS)
def test_ngdm_over_the_inversion_keeps_the_source_where_lambda_is_zero(host, kind):
    host.TINY_MODEL_KIND["kind"] = kind
    prompt = load_prompt(host, "ngdm_edit_friendly_edit")
    node_of(prompt, "NGDMWeightMap")["inputs"]["mode"] = "diffedit"
    captured = host.run_prompt(prompt)
    source, output = captured["source"], captured["output"]
    weights = output["noise_mask"].expand_as(source)
    assert (weights == 0).any() and (weights == 1).any()
    assert (output["samples"] - source)[weights == 0].abs().max().item() <= 1e-4
    assert (output["samples"] - source)[weights == 1].abs().mean().item() > 1e-2


def test_the_combined_workflow_runs_as_shipped(host):
    host.TINY_MODEL_KIND["kind"] = "eps"
    captured = host.run_prompt(load_prompt(host, "ngdm_edit_friendly_edit"))
    assert torch.isfinite(captured["output"]["samples"]).all()


def test_miswired_replays_get_a_clear_error(host):
    host.TINY_MODEL_KIND["kind"] = "eps"
    prompt = load_prompt(host, "edit_friendly_edit", steps=6)
    node_of(prompt, "DisableNoise").update(class_type="RandomNoise", inputs={"noise_seed": 0})
    with pytest.raises(RuntimeError, match="connect DisableNoise"):
        host.run_prompt(prompt)
    prompt = load_prompt(host, "ngdm_edit_friendly_edit", steps=6)
    sampler_node = node_of(prompt, "SamplerCustomAdvanced")["inputs"]
    sampler_node["sampler"] = node_of(prompt, "PerPixelTimeSampler")["inputs"]["sampler"]
    with pytest.raises(RuntimeError, match="Wrap the sampler in PerPixelTimeSampler"):
        host.run_prompt(prompt)
    prompt = load_prompt(host, "edit_friendly_edit", steps=6)
    node_of(prompt, "EditFriendlyInvert")["inputs"]["skip"] = 0.95
    with pytest.raises(RuntimeError, match="leaves no step of the 6-step schedule"):
        host.run_prompt(prompt)


def test_inversion_reports_progress_per_step_and_honours_cancel(host):
    import comfy.model_management
    import comfy.samplers
    import comfy.utils
    import nodes
    updates = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: updates.append((value, total)))
    model = host.tiny_model("eps")
    inputs = dict(model=model, latent={"samples": torch.randn(1, 4, 8, 8)}, positive=host.tiny_conditioning("s"),
                  negative=host.tiny_conditioning("n"), source_cfg=3.5, eta=1.0, skip=0.5, seed=0,
                  sigmas=comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 8).cpu())
    invert = nodes.NODE_CLASS_MAPPINGS["EditFriendlyInvert"]
    try:
        invert.execute(**inputs)
        assert updates == [(i, 4) for i in range(1, 5)]
        comfy.model_management.interrupt_current_processing(True)
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            invert.execute(**inputs)
    finally:
        comfy.model_management.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(None)
