"""The previews the nodes show on themselves (V3 ui outputs): Lambda, each direction, the training loss."""

import os

import numpy as np
import torch
from PIL import Image


def run(node_id, **inputs):
    import nodes
    return nodes.NODE_CLASS_MAPPINGS[node_id].execute(**inputs)


def shown_images(ui):
    """The images a ui output shows, read back from ComfyUI's temp folder as (N, H, W, 3) floats."""
    import folder_paths
    images = []
    for saved in ui.as_dict()["images"]:
        assert saved["type"] == "temp"
        path = os.path.join(folder_paths.get_temp_directory(), saved["subfolder"], saved["filename"])
        with Image.open(path) as image:
            images.append(np.asarray(image.convert("RGB"), dtype=np.float32) / 255)
    return torch.from_numpy(np.stack(images))


def assert_shows_masks(ui, masks):
    """The ui shows each mask as grey, to 8 bits (ComfyUI truncates 255·value)."""
    shown = shown_images(ui)
    assert shown.shape == (*masks.shape, 3)
    assert (shown - masks[..., None]).abs().max() <= 1 / 255 + 1e-6


def test_the_weight_map_shows_lambda_on_the_node(host):
    latent = {"samples": torch.randn(2, 4, host.LATENT_SIZE, host.LATENT_SIZE, generator=torch.manual_seed(0))}
    output = run("NGDMWeightMap", model=host.tiny_model("eps"), latent=latent,
                 source_conditioning=host.tiny_conditioning("source"), target_conditioning=host.tiny_conditioning("t"),
                 negative=host.tiny_conditioning("negative"), seed=0, num_maps=2, encode_strength=0.5, cfg=3.0,
                 smoothing=1.0, a=10.0, b=5.0, mode="ngdm")
    weight_map = output.result[0]
    assert weight_map.std() > 0
    assert_shows_masks(output.ui, weight_map)


def test_the_weight_map_preview_reaches_the_ui_through_the_executor(host):
    host.TINY_MODEL_KIND["kind"] = "eps"
    prompt = host.load_workflow("ngdm_text_edit", 2)
    node_id = next(key for key, node in prompt.items() if node["class_type"] == "NGDMWeightMap")
    shown = host.run_prompt(prompt)["ui"][node_id]
    assert len(shown["images"]) == 1 and shown["images"][0]["type"] == "temp"


def test_region_directions_show_one_preview_per_direction(host):
    size = 16
    mask = torch.zeros(1, 8 * size, 8 * size)
    mask[:, :4 * size, :4 * size] = 1.0
    output = run("RegionJacobianDirection", model=host.tiny_model("eps"),
                 latent={"samples": torch.randn(1, 4, size, size, generator=torch.manual_seed(0))},
                 positive=host.tiny_conditioning("p"), mask=mask, probe_percent=0.5, k=2, r=1, iterations=3, seed=0,
                 add_noise=True)
    preview = output.result[1]
    assert preview.shape[0] == 2
    assert_shows_masks(output.ui, preview)


def test_training_shows_the_loss_curve(host):
    output = run("RectifierTrain", model=host.tiny_model("eps"),
                 latent={"samples": torch.randn(2, 4, host.LATENT_SIZE, host.LATENT_SIZE, generator=torch.manual_seed(0))},
                 positive=host.tiny_conditioning(""), steps=3, learning_rate=1e-3, seed=0,
                 filename_prefix="test/preview", batch_size=2)
    (curve,) = shown_images(output.ui)
    previews = host.pack_module("nodes.previews")
    assert curve.shape == (previews.CURVE_SIZE[1], previews.CURVE_SIZE[0], 3)


def test_the_loss_curve_falls_where_the_loss_falls(host):
    previews = host.pack_module("nodes.previews")
    width, height = previews.CURVE_SIZE
    curve = previews.loss_curve([1.0 - 0.01 * step for step in range(100)])[0]
    dark = (curve - torch.tensor(previews.MEAN_COLOUR) / 255).abs().amax(-1) < 0.05
    rows = [dark[:, column].nonzero()[:, 0].float().mean().item()
            for column in (previews.MARGIN + 2, width - previews.MARGIN - 2)]
    # Image rows grow downwards: the start of a falling loss is drawn higher than its end.
    assert rows[0] < previews.MARGIN + 4 and rows[1] > height - previews.MARGIN - 4
    # The running mean of a constant is that constant.
    assert np.allclose(previews.running_mean([2.0] * 7, 3), 2.0)
    assert np.allclose(previews.running_mean([0.0, 3.0, 6.0], 2), [0.0, 1.5, 4.5])
