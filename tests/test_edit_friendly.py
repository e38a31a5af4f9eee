import pytest
import torch

from ngdm_core import GaussianDenoiser, classifier_free_guidance, sample_euler
from ngdm_core.edit_friendly import edit, edit_per_pixel_time, invert_ddim, invert_edit_friendly, sample_edit_friendly

SHAPE = (2, 4, 8, 8)


def schedule(parametrization, steps):
    if parametrization == "flow":
        return torch.linspace(1.0, 0.0, steps + 1)
    return torch.cat([torch.logspace(1.16, -1.5, steps), torch.zeros(1)])


def setup(parametrization):
    generator = torch.Generator().manual_seed(0)
    source = torch.randn(SHAPE, generator=generator)
    means = {name: torch.randn(SHAPE[1:], generator=generator) for name in ("source", "target")}
    means["negative"] = torch.zeros(SHAPE[1:])
    guided = classifier_free_guidance(GaussianDenoiser(means, std=0.7, parametrization=parametrization), "negative", 3.5)
    return source, guided


def invert(parametrization, steps=10, eta=1.0, skip=0.36):
    source, guided = setup(parametrization)
    inversion = invert_edit_friendly(guided, source, schedule(parametrization, steps), "source", eta=eta, skip=skip,
                                     parametrization=parametrization, generator=torch.Generator().manual_seed(1))
    return source, guided, inversion


def relative_error(output, source):
    return ((output - source).abs().max() / source.std()).item()


@pytest.mark.parametrize("parametrization", ["vp", "flow"])
@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("steps", [4, 10, 50])
@pytest.mark.parametrize("skip", [0.0, 0.36])
def test_replay_under_the_source_condition_reconstructs_exactly(parametrization, eta, steps, skip):
    source, guided, inversion = invert(parametrization, steps, eta, skip)
    assert len(inversion.sigmas) == steps + 1 - round(skip * steps)
    assert inversion.sigmas[-1] == 0
    assert relative_error(edit(guided, inversion, "source"), source) <= 1e-5


@pytest.mark.parametrize("parametrization", ["vp", "flow"])
def test_a_new_condition_edits(parametrization):
    source, guided, inversion = invert(parametrization)
    assert relative_error(edit(guided, inversion, "target"), source) > 0.5


def test_the_replay_uses_the_noise_maps():
    source, guided, inversion = invert("vp")
    # The last map is the final step's residual, added as it is: a shift there moves the output by the same.
    inversion.noise_maps[-1] += 0.25
    assert torch.allclose(edit(guided, inversion, "source") - source, torch.full_like(source, 0.25), atol=1e-5)
    inversion.noise_maps[-1] -= 0.25
    inversion.noise_maps[0][..., :4] += 1.0
    moved = (edit(guided, inversion, "source") - source).abs()
    assert moved[..., :4].mean() > 100 * moved[..., 4:].mean()


@pytest.mark.parametrize("parametrization", ["vp", "flow"])
def test_ddim_inversion_is_at_least_100_times_worse(parametrization):
    source, guided, inversion = invert(parametrization, steps=10, skip=0.0)
    edit_friendly_error = relative_error(edit(guided, inversion, "source"), source)
    sigmas = schedule(parametrization, 10)
    noisy = invert_ddim(guided, source, sigmas, "source", parametrization)
    ddim_error = relative_error(sample_euler(lambda x, sigma: guided(x, sigma, "source"), noisy, sigmas), source)
    assert ddim_error >= 100 * edit_friendly_error
    assert ddim_error > 1e-3


def test_one_model_evaluation_per_step():
    source, _ = setup("vp")
    denoiser = GaussianDenoiser({"source": torch.zeros(SHAPE[1:])})
    invert_edit_friendly(denoiser, source, schedule("vp", 10), "source", skip=0.3)
    assert denoiser.batch_sizes == [SHAPE[0]] * 7


@pytest.mark.parametrize("parametrization", ["vp", "flow"])
def test_ngdm_on_the_inversion_keeps_zero_weights_on_the_source_and_edits_the_rest(parametrization):
    source, guided, inversion = invert(parametrization, steps=20)
    weights = torch.zeros(SHAPE[0], 1, *SHAPE[2:])
    weights[..., 4:] = 1.0
    output = edit_per_pixel_time(guided, inversion, weights, "target")
    assert (output - source)[..., :4].abs().max().item() <= 1e-5
    assert (output - source)[..., 4:].abs().mean() > 0.5


def test_ngdm_on_the_inversion_with_unit_weights_is_the_plain_edit():
    source, guided, inversion = invert("vp", steps=20)
    output = edit_per_pixel_time(guided, inversion, torch.ones(SHAPE[0], 1, *SHAPE[2:]), "target")
    assert torch.equal(output, edit(guided, inversion, "target"))


def test_held_pixels_follow_the_inverted_trajectory():
    source, guided, inversion = invert("vp", steps=12)
    weights = torch.zeros(SHAPE[0], 1, *SHAPE[2:])
    weights[..., 4:] = 1.0
    states = []
    edit_per_pixel_time(guided, inversion, weights, "target", callback=lambda step: states.append(step["x"].clone()))
    for i, state in enumerate(states):
        assert torch.allclose(state[..., :4], inversion.trajectory[i][..., :4], atol=1e-5)


@pytest.mark.parametrize("call,message", [
    (lambda g, s: invert_edit_friendly(g, s, torch.tensor([1.0, 2.0, 0.0])), "sigmas must be non-increasing"),
    (lambda g, s: invert_edit_friendly(g, s, torch.tensor([2.0, 2.0, 0.0])), "sigmas must be strictly decreasing"),
    (lambda g, s: invert_edit_friendly(g, s, schedule("vp", 4), eta=0.0), r"eta must be in \(0, 1\]"),
    (lambda g, s: invert_edit_friendly(g, s, schedule("vp", 4), eta=1.5), r"eta must be in \(0, 1\]"),
    (lambda g, s: invert_edit_friendly(g, s, schedule("vp", 4), skip=1.0), r"skip must be in \[0, 1\)"),
    (lambda g, s: invert_edit_friendly(g, s, schedule("vp", 4), skip=0.9), "leaves no step of the 4-step schedule"),
    (lambda g, s: invert_edit_friendly(g, s * float("nan"), schedule("vp", 4)), "source contains NaN"),
])
def test_bad_input_is_refused(call, message):
    source, guided = setup("vp")
    with pytest.raises(ValueError, match=message):
        call(lambda x, sigma, cond: guided(x, sigma, "source"), source)


def test_replay_refuses_another_schedule_or_latent():
    source, guided, inversion = invert("vp")
    model = lambda x, sigma: guided(x, sigma, "source")  # noqa: E731
    with pytest.raises(ValueError, match="sigmas differ from the inverted schedule"):
        sample_edit_friendly(model, inversion.trajectory[0], inversion.sigmas[1:], inversion=inversion)
    with pytest.raises(ValueError, match="the latent has shape"):
        sample_edit_friendly(model, inversion.trajectory[0][:1], inversion.sigmas, inversion=inversion)
    with pytest.raises(ValueError, match="weights has batch 3"):
        edit_per_pixel_time(guided, inversion, torch.zeros(3, 1, 8, 8), "target")


def test_inputs_are_not_mutated():
    source, guided = setup("vp")
    sigmas = schedule("vp", 6)
    before = (source.clone(), sigmas.clone())
    inversion = invert_edit_friendly(guided, source, sigmas, "source")
    start = inversion.trajectory[0].clone()
    edit(guided, inversion, "target")
    edit_per_pixel_time(guided, inversion, torch.full((2, 1, 8, 8), 0.5), "target")
    assert torch.equal(source, before[0]) and torch.equal(sigmas, before[1])
    assert torch.equal(inversion.trajectory[0], start)


@pytest.mark.parametrize("parametrization", ["vp", "flow"])
def test_ddim_inversion_evaluates_the_model_at_the_level_the_state_is_at(parametrization):
    # Data N(0, 1): D(x, s) is the posterior mean. From the source taken at the lowest level s1, the
    # standard step to s2 reads the model at s1: x2 = D(x, s1) + s2 eps(x, s1). The weaker variant reads it
    # at s2 and, for this denoiser, would return the source unchanged in VP form.
    denoiser = GaussianDenoiser({"c": torch.zeros(1)}, parametrization=parametrization)
    source = torch.tensor([[[[0.7]]]], dtype=torch.float64)
    s2, s1 = (0.8, 0.3) if parametrization == "flow" else (2.0, 0.5)
    noisy = invert_ddim(denoiser, source, torch.tensor([s2, s1, 0.0], dtype=torch.float64), "c", parametrization)
    assert denoiser.batch_sizes == [1]
    if parametrization == "flow":
        denoised = (1 - s1) / ((1 - s1) ** 2 + s1**2) * source
        noise = (source - (1 - s1) * denoised) / s1
        expected = (1 - s2) * denoised + s2 * noise
    else:
        expected = source * (1 + s1 * s2) / (1 + s1**2)
    assert torch.allclose(noisy, expected, rtol=1e-12)
