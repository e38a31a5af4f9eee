"""Which pack node works with which model family: measured here, and held to benchmarks/results/compatibility.md.

Each cell runs the node on a tiny random-weight model of the family, built with ComfyUI's own
model classes, under that family's own conditioning: Flux guidance and pooled outputs for Flux.1,
reference latents for Qwen-Image-Edit, both for FLUX.1 Kontext. "works" means the node's own
property holds there (below); "refuses (x)" means it stops with an error that names input x. A
family no test builds is "not tested" in the table, and this test checks that it says so.

- NGDMWeightMap: Lambda in the latent's shape, inside (0, 1) in ngdm mode and in [0, 1] in change mode.
- PerPixelTimeSampler, PerPixelTimeModel: the output is the source where Lambda = 0 (up to
  float32 rounding) and moves where Lambda = 1.
- EditFriendlyInvert: replayed under the source conditioning, it reconstructs the source.
- EdgePreservingNoise, EdgePreservingSampler: noise / samples in the latent's shape, finite.
- RegionJacobianDirection, ApplyRegionDirection, RectifierTrain, RectifierApply: they run and
  their output edits a sampled latent / trains and applies.
"""

import functools
import os
import re

import pytest
import torch

TABLE = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "results", "compatibility.md")
SIZE = 16  # latent pixels: the tiny U-Net's bottleneck is 8x8, as the region directions need
# The families this test builds: the tiny model and, for an instruction model, the reference it reads.
FAMILIES = {"SD1.5": "sd15", "SDXL": "sdxl", "SD3": "sd3", "Flux.1": "flux_dev", "Flux 2": "flux2",
            "Qwen-Image": "qwen_image", "Qwen-Image-Edit": "qwen_image", "Kontext": "flux_dev"}
UNETS = {"SD1.5", "SDXL"}
REFERENCE_LATENT = {"Qwen-Image-Edit", "Kontext"}
FLUX_GUIDANCE = {"Flux.1": 3.5, "Kontext": 2.5}


def read_table():
    """The compatibility table as {node: {family: cell}}."""
    with open(TABLE) as f:
        rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in f
                if line.startswith("|") and not line.startswith("|-")]
    header, *body = rows
    return {row[0].strip("`"): dict(zip(header[1:], row[1:])) for row in body}


class Family:
    def __init__(self, host, name):
        self.host, self.name = host, name
        kind = FAMILIES[name]
        self.model = {"sd15": lambda: host.tiny_model("eps"), "sdxl": host.tiny_sdxl}.get(
            kind, lambda: host.tiny_dit(kind))()
        self.samples = host.tiny_latent(self.model, size=SIZE)

    def conditioning(self, text):
        """The family's conditioning for ``text``; for instruction models ``text`` is the instruction."""
        if self.name in UNETS:
            return (self.host.tiny_conditioning if self.name == "SD1.5" else self.host.sdxl_conditioning)(text)
        conditioning = self.host.dit_conditioning(text)
        if self.name in REFERENCE_LATENT:
            (conditioning,) = self.host.node("ReferenceLatent", conditioning=conditioning, latent={"samples": self.samples})
        if self.name in FLUX_GUIDANCE:
            (conditioning,) = self.host.node("FluxGuidance", conditioning=conditioning, guidance=FLUX_GUIDANCE[self.name])
        return conditioning

    def check_kept(self, output, weights):
        kept = (weights == 0).expand_as(self.samples)
        tolerance = self.host.held_pixel_tolerance(self.model.model.latent_format, self.samples)
        assert (output - self.samples)[kept].abs().max().item() <= tolerance
        assert (output - self.samples)[~kept].abs().mean().item() > 1e-3


@functools.lru_cache(maxsize=None)
def family(host, name):
    return Family(host, name)


def guided_sample(fam, model, sampler, latent, noise=None, positive=""):
    """Sample under the family's own conditioning (guidance, reference latents), against the empty one."""
    import comfy.sample
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = torch.randn(samples.shape, generator=torch.Generator().manual_seed(1)) if noise is None else noise
    return comfy.sample.sample_custom(model, noise, 2.0, sampler, fam.host.schedule(model), fam.conditioning(positive),
                                      fam.conditioning(""), samples, noise_mask=latent.get("noise_mask"),
                                      disable_pbar=True, seed=0)


def weight_map_works(fam):
    for mode in ("ngdm", "change"):
        _, latent = fam.host.node("NGDMWeightMap", model=fam.model, latent={"samples": fam.samples},
                                  source_conditioning=fam.conditioning(""), target_conditioning=fam.conditioning("edit"),
                                  negative=fam.conditioning(""), seed=0, num_maps=2, encode_strength=0.5, cfg=2.0,
                                  smoothing=1.0, a=10.0, b=5.0, mode=mode, change_steps=3)
        weights = latent["noise_mask"]
        assert weights.shape == (1, 1, *fam.samples.shape[2:])
        if mode == "ngdm":
            assert 0 < weights.min() and weights.max() < 1
        else:
            # Graded by the change's size (the default change_softness), so in [0, 1]; it may be all 0: some tiny
            # models' three-step edit changes nothing above the threshold.
            assert 0 <= weights.min() and weights.max() <= 1


def per_pixel_time_sampler_works(fam):
    import comfy.samplers
    weights = fam.host.half_lambda(fam.samples)
    (sampler,) = fam.host.node("PerPixelTimeSampler", sampler=comfy.samplers.sampler_object("euler"), mapping="ngdm")
    fam.check_kept(guided_sample(fam, fam.model, sampler, {"samples": fam.samples, "noise_mask": weights},
                                 positive="edit"), weights)


def per_pixel_time_model_works(fam):
    import comfy.samplers
    weights = fam.host.half_lambda(fam.samples)
    (model,) = fam.host.node("PerPixelTimeModel", model=fam.model, mapping="ngdm")
    fam.check_kept(guided_sample(fam, model, comfy.samplers.sampler_object("euler"),
                                 {"samples": fam.samples, "noise_mask": weights}, positive="edit"), weights)


def edit_friendly_invert_works(fam):
    replay, latent, sigmas = fam.host.node("EditFriendlyInvert", model=fam.model, latent={"samples": fam.samples},
                                           positive=fam.conditioning(""), negative=fam.conditioning(""),
                                           sigmas=fam.host.schedule(fam.model), source_cfg=2.0, eta=1.0, skip=0.3, seed=0)
    import comfy.sample
    reconstruction = comfy.sample.sample_custom(fam.model, torch.zeros(fam.samples.shape), 2.0, replay, sigmas,
                                                fam.conditioning(""), fam.conditioning(""), latent["samples"],
                                                disable_pbar=True, seed=0)
    assert (reconstruction - fam.samples).abs().max().item() <= 1e-4


EDGE_KNOBS = dict(lambda_min=1e-4, lambda_max=0.1, t_phi=1.0, transition="linear")


def edge_preserving_noise_works(fam):
    (noise,) = fam.host.node("EdgePreservingNoise", model=fam.model, sigmas=fam.host.schedule(fam.model), seed=0, strength=1.0,
                             **EDGE_KNOBS)
    shaped = noise.generate_noise({"samples": fam.samples})
    assert shaped.shape == fam.samples.shape and torch.isfinite(shaped).all()


def edge_preserving_sampler_works(fam):
    import comfy.samplers
    (sampler,) = fam.host.node("EdgePreservingSampler", sampler=comfy.samplers.sampler_object("euler_ancestral"),
                               strength=1.0, **EDGE_KNOBS)
    output = guided_sample(fam, fam.model, sampler, {"samples": fam.samples}, positive="edit")
    assert output.shape == fam.samples.shape and torch.isfinite(output).all()


def quarter_mask(fam):
    mask = torch.zeros(1, 8 * SIZE, 8 * SIZE)
    mask[:, :4 * SIZE, :4 * SIZE] = 1.0
    return mask


@functools.lru_cache(maxsize=None)
def region_directions(fam):
    return fam.host.node("RegionJacobianDirection", model=fam.model, latent={"samples": fam.samples},
                         positive=fam.conditioning("edit"), mask=quarter_mask(fam), probe_percent=0.5, k=1, r=1, iterations=3,
                         seed=0, add_noise=True)[0]


def region_jacobian_direction_works(fam):
    directions = region_directions(fam)
    assert torch.isfinite(directions.vectors).all()


def apply_region_direction_works(fam):
    import comfy.samplers
    # Directions are found on a U-Net: the family's own, or for the others SD1.5's, as a user might bring.
    directions = region_directions(fam if fam.name in UNETS else family(fam.host, "SD1.5"))
    (patched,) = fam.host.node("ApplyRegionDirection", model=fam.model, directions=directions, index=0, strength=30.0,
                               start_percent=0.0, end_percent=1.0)
    euler = comfy.samplers.sampler_object("euler")
    plain = guided_sample(fam, fam.model, euler, {"samples": fam.samples})
    assert not torch.equal(guided_sample(fam, patched, euler, {"samples": fam.samples}), plain)


@functools.lru_cache(maxsize=None)
def train_rectifier(fam):
    return fam.host.node("RectifierTrain", model=fam.model, latent={"samples": fam.samples}, positive=fam.conditioning(""),
                         steps=1, learning_rate=1e-3, seed=0, filename_prefix="compatibility/rectifier", batch_size=1)[0]


def rectifier_train_works(fam):
    assert train_rectifier(fam) is not None


def rectifier_apply_works(fam):
    rectifier = train_rectifier(fam if fam.name in UNETS else family(fam.host, "SD1.5"))
    (patched,) = fam.host.node("RectifierApply", model=fam.model, rectifier=rectifier, latent={"samples": fam.samples})
    import comfy.samplers
    output = guided_sample(fam, patched, comfy.samplers.sampler_object("euler"), {"samples": fam.samples})
    assert output.shape == fam.samples.shape and torch.isfinite(output).all()


CHECKS = {"NGDMWeightMap": weight_map_works, "PerPixelTimeSampler": per_pixel_time_sampler_works,
          "PerPixelTimeModel": per_pixel_time_model_works, "EditFriendlyInvert": edit_friendly_invert_works,
          "EdgePreservingNoise": edge_preserving_noise_works, "EdgePreservingSampler": edge_preserving_sampler_works,
          "RegionJacobianDirection": region_jacobian_direction_works,
          "ApplyRegionDirection": apply_region_direction_works, "RectifierTrain": rectifier_train_works,
          "RectifierApply": rectifier_apply_works}


def measure(host, node_id, family_name):
    """``works``, or ``refuses (input)`` with the input the error names first."""
    try:
        CHECKS[node_id](family(host, family_name))
    except ValueError as error:
        return f"refuses ({re.match(r'[A-Za-z_]+', str(error)).group(0)})"
    return "works"


def test_the_table_lists_every_check_and_marks_untested_families():
    table = read_table()
    assert set(table) == set(CHECKS)
    for row in table.values():
        for family_name, cell in row.items():
            assert (cell == "not tested") == (family_name not in FAMILIES), (family_name, cell)


@pytest.mark.parametrize("family_name", FAMILIES)
@pytest.mark.parametrize("node_id", CHECKS)
def test_the_table_says_what_the_node_does_on_the_family(host, node_id, family_name):
    assert measure(host, node_id, family_name) == read_table()[node_id][family_name]


@pytest.mark.parametrize("node_id,name", [("NGDMWeightMap", "target_conditioning"), ("EditFriendlyInvert", "positive")])
def test_a_reference_latent_from_another_vae_is_refused_naming_the_input(host, node_id, name):
    fam = family(host, "Kontext")
    (wrong,) = host.node("ReferenceLatent", conditioning=host.dit_conditioning("edit"),
                         latent={"samples": torch.randn(1, 4, SIZE, SIZE)})
    inputs = {"NGDMWeightMap": dict(source_conditioning=fam.conditioning(""), target_conditioning=wrong,
                                    negative=fam.conditioning(""), seed=0, num_maps=1, encode_strength=0.5, cfg=1.0,
                                    smoothing=1.0, a=10.0, b=5.0, mode="ngdm"),
              "EditFriendlyInvert": dict(positive=wrong, negative=fam.conditioning(""), sigmas=host.schedule(fam.model),
                                         source_cfg=1.0, eta=1.0, skip=0.3, seed=0)}[node_id]
    expected = rf"{name}: its reference latent 0 has shape \(1, 4, 16, 16\), but this model reads 16-channel"
    with pytest.raises(ValueError, match=expected):
        host.node(node_id, model=fam.model, latent={"samples": fam.samples}, **inputs)


def test_models_that_ignore_reference_latents_take_such_conditioning(host):
    """SD1.5 reads no reference latents: a conditioning carrying a Flux-shaped one is not refused for it."""
    fam = family(host, "SD1.5")
    (conditioning,) = host.node("ReferenceLatent", conditioning=host.tiny_conditioning("edit"),
                                latent={"samples": torch.randn(1, 16, SIZE, SIZE)})
    _, latent = host.node("NGDMWeightMap", model=fam.model, latent={"samples": fam.samples},
                          source_conditioning=conditioning, target_conditioning=host.tiny_conditioning("other"),
                          negative=conditioning, seed=0, num_maps=1, encode_strength=0.5, cfg=1.0, smoothing=1.0, a=10.0,
                          b=5.0, mode="ngdm")
    assert latent["noise_mask"].shape == (1, 1, SIZE, SIZE)
