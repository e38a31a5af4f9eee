import pytest
import torch

KINDS = ["eps", "v_prediction", "flow"]
STEPS = 25


def target_as_source(host, prompt):
    """Make the edit a reconstruction: the target prompt and cfg become the source's."""
    invert, guider = host.node_of(prompt, "EditFriendlyInvert"), host.node_of(prompt, "CFGGuider")
    prompt[guider["inputs"]["positive"][0]]["inputs"]["text"] = prompt[invert["inputs"]["positive"][0]]["inputs"]["text"]
    guider["inputs"]["cfg"] = invert["inputs"]["source_cfg"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_edit_workflow_with_the_source_prompt_reconstructs_the_source(host, kind):
    host.TINY_MODEL_KIND["kind"] = kind
    prompt = host.load_workflow("edit_friendly_edit", STEPS)
    target_as_source(host, prompt)
    captured = host.run_prompt(prompt)
    assert (captured["output"]["samples"] - captured["source"]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_the_edit_workflow_edits_as_shipped(host, kind):
    host.TINY_MODEL_KIND["kind"] = kind
    captured = host.run_prompt(host.load_workflow("edit_friendly_edit", STEPS))
    assert (captured["output"]["samples"] - captured["source"]).abs().mean().item() > 1e-2


@pytest.mark.parametrize("kind", KINDS)
def test_ngdm_over_the_inversion_keeps_the_source_where_lambda_is_zero(host, kind):
    host.TINY_MODEL_KIND["kind"] = kind
    prompt = host.load_workflow("ngdm_edit_friendly_edit", STEPS)
    host.node_of(prompt, "NGDMWeightMap")["inputs"]["mode"] = "diffedit"
    host.check_kept_where_lambda_is_zero(host.run_prompt(prompt), 1e-4)


def test_the_combined_workflow_runs_as_shipped(host):
    host.TINY_MODEL_KIND["kind"] = "eps"
    captured = host.run_prompt(host.load_workflow("ngdm_edit_friendly_edit", STEPS))
    assert torch.isfinite(captured["output"]["samples"]).all()


def test_miswired_replays_get_a_clear_error(host):
    host.TINY_MODEL_KIND["kind"] = "eps"
    prompt = host.load_workflow("edit_friendly_edit", 6)
    host.node_of(prompt, "DisableNoise").update(class_type="RandomNoise", inputs={"noise_seed": 0})
    with pytest.raises(RuntimeError, match="connect DisableNoise"):
        host.run_prompt(prompt)
    prompt = host.load_workflow("ngdm_edit_friendly_edit", 6)
    sampler_node = host.node_of(prompt, "SamplerCustomAdvanced")["inputs"]
    sampler_node["sampler"] = host.node_of(prompt, "PerPixelTimeSampler")["inputs"]["sampler"]
    with pytest.raises(RuntimeError, match="Wrap the sampler in PerPixelTimeSampler"):
        host.run_prompt(prompt)
    prompt = host.load_workflow("edit_friendly_edit", 6)
    host.node_of(prompt, "EditFriendlyInvert")["inputs"]["skip"] = 0.95
    with pytest.raises(RuntimeError, match="leaves no step of the 6-step schedule"):
        host.run_prompt(prompt)


def test_inversion_reports_progress_to_its_last_step_and_honours_cancel(host):
    import comfy.samplers
    import nodes
    model = host.tiny_model("eps")
    inputs = dict(model=model, latent={"samples": torch.randn(1, 4, 8, 8)}, positive=host.tiny_conditioning("s"),
                  negative=host.tiny_conditioning("n"), source_cfg=3.5, eta=1.0, skip=0.5, seed=0,
                  sigmas=comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 8).cpu())
    invert = nodes.NODE_CLASS_MAPPINGS["EditFriendlyInvert"]
    assert host.progress_updates_and_cancel(lambda: invert.execute(**inputs)) == 4
