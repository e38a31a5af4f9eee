"""The same edit on the shapes model as a ComfyUI graph and in ``ngdm_core``, and how far apart they land.

The graphs are the shipped templates' (``shapes_templates``), run by ComfyUI's executor. The core
runs the same settings with the same draws (the weight map's and the inversion's seeds, RandomNoise's
noise from ``comfy.sample.prepare_noise``) on the sigmas the graph's BasicScheduler gives. Two
things differ by design, and nothing else:

- the U-Net's timestep: ComfyUI feeds the nearest integer timestep of its own schedule
  (``model_sampling.timestep``); ``ShapesDenoiser`` interpolates a fractional one in its own
  schedule, whose sigmas differ by a float32 rounding (under 3e-4 relative, ``test_shapes_nodes``);
- float32 reordering: ComfyUI evaluates cond and uncond in one batch, the core one call each.

So each edit is also run in the core with ComfyUI's rule (:class:`ComfyRuleDenoiser`: ComfyUI's
schedule and its integer timestep). That run must match ComfyUI to float error, and the core's own
run may then differ from ComfyUI by at most its difference from that run plus the float error.
"""

import importlib

import torch

import shapes_templates

# Float32 reordering, in image units ([0, 1]): the per-call differences of batching (a few ulps of
# values of size 1, ~1e-7) through 20 steps of two guided calls, with CFG 3 amplifying each by up to
# 2 * 3 + 1 = 7: 20 * 2 * 7 * 1e-7 ~ 3e-5, rounded up to 1e-4.
FLOAT_TOLERANCE = 1e-4
METHODS = ("ngdm", "edit_friendly", "ngdm_edit_friendly", "change_map")
TEMPLATE = {"ngdm": "shapes_ngdm_edit", "edit_friendly": "shapes_edit_friendly_edit",
            "ngdm_edit_friendly": "shapes_ngdm_edit_friendly_edit", "change_map": "shapes_ngdm_edit"}


def _core(host, name):
    return importlib.import_module(f"{host.pack_module().__name__}.ngdm_core.{name}")


def comfy_rule_denoiser(host, model):
    """``ShapesDenoiser`` computing as ComfyUI does: ComfyUI's own ``model_sampling.timestep`` (the nearest
    integer timestep of its schedule) feeds the U-Net."""
    shapes_model = _core(host, "shapes.model")
    model_sampling = model.get_model_object("model_sampling")

    class ComfyRuleDenoiser(shapes_model.ShapesDenoiser):
        def timestep(self, sigma):
            return model_sampling.timestep(sigma).float()

    return ComfyRuleDenoiser(shapes_model.load_model(shapes_model.ShapesUNet, shapes_model.UNET_FILE))


def graph_edit(host, method, index, source_class, target_class):
    """The method's template for this source, run by the executor: ``(edit image, weight map or None)``."""
    graph = shapes_templates.TEMPLATES[TEMPLATE[method]](index, source_class, target_class)
    weights = next((node for node in graph.nodes if node["type"] == "NGDMWeightMap"), None)
    if method == "change_map":
        weights["inputs"]["mode"] = "change"
    if weights is not None:
        as_image = graph.add("MaskToImage", mask=(weights["id"], 0))
        graph.add("PreviewImage", images=(as_image, 0))
    shapes_templates.CAPTURED_IMAGES.clear()
    host.run_prompt(host.ui_to_api(shapes_templates.to_ui(graph), {"PreviewImage": shapes_templates.CAPTURE}))
    captured = [shapes_templates.CAPTURED_IMAGES[key] for key in sorted(shapes_templates.CAPTURED_IMAGES, key=int)]
    edited = captured[0][1:2]
    return edited, (captured[1][..., 0] if weights is not None else None)


def core_edit(host, method, denoiser, model, vae, index, source_class, target_class):
    """The same edit in ``ngdm_core`` with ``denoiser``: ``(edit image, weight map or None)``."""
    shapes_host = host.pack_module("nodes.host")
    data = _core(host, "shapes.data")
    ngdm, edit_friendly = _core(host, "ngdm"), _core(host, "edit_friendly")
    change_map, denoisers = _core(host, "change_map"), _core(host, "denoisers")
    import comfy.sample
    image = data.render(data.HELD_OUT_SEED, index)[0]
    source = vae.encode(torch.from_numpy((image + 1) / 2).float().permute(1, 2, 0)[None]).float()
    model_sampling = model.get_model_object("model_sampling")
    source_index, target_index = data.CLASSES.index(source_class), data.CLASSES.index(target_class)
    cfg = shapes_templates.CFG
    guided = denoisers.classifier_free_guidance(denoiser, None, cfg)
    steps = shapes_templates.STEPS
    weights = None
    if method in ("ngdm", "ngdm_edit_friendly"):
        # cfg 1 for the map, as the node's plain-CFG shortcut: the conditional predictions alone.
        weights = ngdm.weight_map(denoiser, source, source_index, target_index,
                                  float(model_sampling.percent_to_sigma(0.5)), num_maps=10, seed=0, smoothing=1.0,
                                  a=20.0, b=10.0, max_batch=10)
    if method == "ngdm":
        noise = comfy.sample.prepare_noise(source, 0)
        latent = ngdm.sample_per_pixel_time(guided, source, weights, shapes_host.edit_sigmas(model_sampling, steps, 0.7),
                                            noise, target_index)
    elif method == "change_map":
        weights = change_map.change_weight_map(guided, source, source_index, target_index,
                                               shapes_host.edit_sigmas(model_sampling, 10, 0.5), 1.0, 0.2, "vp",
                                               torch.Generator().manual_seed(0), edits=2, softness=0.2)
        noise = comfy.sample.prepare_noise(source, 0)
        latent = ngdm.sample_per_pixel_time(guided, source, weights, shapes_host.edit_sigmas(model_sampling, steps, 0.7),
                                            noise, target_index)
    else:
        inversion = edit_friendly.invert_edit_friendly(guided, source, shapes_host.edit_sigmas(model_sampling, steps, 1.0),
                                                       source_index, eta=1.0, skip=0.2,
                                                       generator=torch.Generator().manual_seed(0))
        latent = (edit_friendly.edit(guided, inversion, target_index) if weights is None else
                  edit_friendly.edit_per_pixel_time(guided, inversion, weights, target_index))
    return vae.decode(latent), (None if weights is None else weights[:, 0])


def agreement(host, indices, methods=METHODS):
    """Per method, per source: max |ComfyUI - core| and max |ComfyUI - core with ComfyUI's rule| of the edits
    (image units) and of the weight maps, and max |core - core with ComfyUI's rule| (the known difference)."""
    shapes = host.pack_module("nodes.shapes")
    data = _core(host, "shapes.data")
    model, vae = shapes.load_shapes_model()
    core_denoiser = _core(host, "shapes.model").load_denoiser()
    rule_denoiser = comfy_rule_denoiser(host, model)
    rows = []
    for index in indices:
        label = int(data.render(data.HELD_OUT_SEED, index)[2])
        source_class = data.CLASSES[label]
        target_class = data.CLASSES[int(data.other_class(torch.tensor([label]))[0])]
        for method in methods:
            comfy_image, comfy_map = graph_edit(host, method, index, source_class, target_class)
            core_image, core_map = core_edit(host, method, core_denoiser, model, vae, index, source_class, target_class)
            rule_image, rule_map = core_edit(host, method, rule_denoiser, model, vae, index, source_class, target_class)
            row = {"index": index, "method": method, "edit_vs_core": (comfy_image - core_image).abs().max().item(),
                   "edit_vs_rule": (comfy_image - rule_image).abs().max().item(),
                   "core_vs_rule": (core_image - rule_image).abs().max().item()}
            if comfy_map is not None:
                row.update(map_vs_core=(comfy_map - core_map).abs().max().item(),
                           map_vs_rule=(comfy_map - rule_map).abs().max().item(),
                           map_core_vs_rule=(core_map - rule_map).abs().max().item())
            rows.append(row)
    return rows
