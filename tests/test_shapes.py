"""The shapes data set, the shipped shapes model and classifier, the edit metrics and the demo command."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from ngdm_core.shapes import demo, demo_edit
from ngdm_core.shapes.data import CLASSES, HELD_OUT_SEED, TRAINING_SEED, make_batch
from ngdm_core.shapes.edits import (EditSettings, change_map, dilated, edit_friendly, ground_truth_edit, invert, iou,
                                    map_difference, per_pixel_time, psnr, sdedit, ssim)
from ngdm_core.shapes.model import load_classifier, load_denoiser


def test_the_data_set_is_deterministic_per_seed_and_per_item():
    first, again = make_batch(7, 6), make_batch(7, 6)
    assert torch.equal(first.images, again.images) and torch.equal(first.masks, again.masks)
    assert torch.equal(first.labels, again.labels)
    # An item is the same whichever batch renders it.
    assert torch.equal(make_batch(7, 2, start=3).images, first.images[3:5])
    assert not torch.equal(make_batch(8, 6).images, first.images)


def test_every_mask_is_exactly_where_its_object_is_drawn():
    batch = make_batch(TRAINING_SEED, 64)
    inside = batch.masks.bool().expand_as(batch.images)
    colour = batch.colours[:, :, None, None].expand_as(batch.images)
    assert torch.equal(batch.images[inside], colour[inside])
    assert torch.equal(batch.images[~inside], batch.backgrounds[~inside])
    # And the object is there: a mask covers several percent of the image, and is visible against its background.
    assert batch.masks.mean((1, 2, 3)).min() > 0.03
    visible = ((batch.images - batch.backgrounds).abs().amax(1, keepdim=True) > 0.1) & batch.masks.bool()
    assert (visible.sum((1, 2, 3)) / batch.masks.sum((1, 2, 3))).min() > 0.8


def test_all_classes_occur_and_a_class_override_keeps_the_scene():
    batch = make_batch(TRAINING_SEED, 60)
    assert set(batch.labels.tolist()) == set(range(len(CLASSES)))
    other = (batch.labels + 1) % len(CLASSES)
    edited = make_batch(TRAINING_SEED, 60, shapes=other)
    assert torch.equal(edited.labels, other)
    assert torch.equal(edited.backgrounds, batch.backgrounds) and torch.equal(edited.colours, batch.colours)
    assert (edited.masks != batch.masks).any((1, 2, 3)).all()


@pytest.fixture(scope="module")
def held_out():
    return make_batch(HELD_OUT_SEED, 128)


def test_shipped_denoiser_beats_the_mean_predictor(held_out):
    # At a moderate noise level (sigma 1.24, against pixel values in [-1, 1]) the x0 prediction
    # must be far better than predicting the data mean. The shipped model's error is 0.16 of the
    # mean predictor's; a freshly initialised one's is 10.
    denoiser = load_denoiser()
    sigma = denoiser.sigma_at(0.3)
    noise = torch.randn(held_out.images.shape, generator=torch.Generator().manual_seed(0))
    prediction = denoiser(held_out.images + sigma * noise, sigma, held_out.labels)
    model_error = ((prediction - held_out.images) ** 2).mean()
    mean_error = ((make_batch(TRAINING_SEED, 512).images.mean(0) - held_out.images) ** 2).mean()
    print(f"x0 error at sigma {sigma:.2f}: {model_error / mean_error:.3f} of the mean predictor's")
    assert model_error < 0.3 * mean_error


def test_shipped_denoiser_is_exact_at_sigma_zero_and_maps_schedule_sigmas_to_their_timesteps(held_out):
    denoiser = load_denoiser()
    assert torch.equal(denoiser(held_out.images[:4], 0.0, 0), held_out.images[:4])
    steps = torch.tensor([0, 1, 250, 999])
    assert torch.allclose(denoiser.timestep(denoiser.schedule_sigmas[steps]), steps.float(), atol=1e-4)


def test_shipped_classifier_names_held_out_shapes(held_out):
    accuracy = (load_classifier()(held_out.images).argmax(1) == held_out.labels).float().mean()
    assert accuracy >= 0.97


def test_metrics_agree_with_their_closed_forms():
    images = make_batch(3, 2).images
    everywhere = torch.ones(2, 1, 32, 32)
    assert torch.allclose(ssim(images, images, everywhere), torch.ones(2))
    # A uniform error of 0.2 on a peak-to-peak range of 2 is 20 log10(2 / 0.2) = 20 dB.
    assert torch.allclose(psnr((images + 0.2).clamp(max=0.9), images.clamp(max=0.7), everywhere),
                          torch.full((2,), 20.0), atol=1e-4)
    square = torch.zeros(1, 1, 8, 8)
    square[..., 2:4, 2:4] = 1
    assert iou(square, square).item() == 1 and iou(square, square.roll(4, -1)).item() == 0
    assert dilated(square, 1).sum() == 16


def test_ssim_is_scikit_images_with_the_standard_gaussian_window():
    metrics = pytest.importorskip("skimage.metrics")
    images = make_batch(3, 2).images
    noisy = (images + 0.2 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    # scikit-image crops the 5 px the 11x11 window overhangs; ours reflects there, so compare inside.
    inside = torch.zeros(2, 1, 32, 32)
    inside[..., 5:-5, 5:-5] = 1
    ours = ssim(noisy, images, inside)
    for item in range(2):
        as_array = lambda image: ((image[item] + 1) / 2).permute(1, 2, 0).double().numpy()
        reference = metrics.structural_similarity(as_array(noisy), as_array(images), data_range=1.0, channel_axis=2,
                                                  gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert abs(ours[item].item() - reference) < 1e-4


def test_the_ground_truth_edit_differs_from_the_source_only_on_the_union_of_both_objects():
    source = make_batch(2, 24)
    target = (source.labels + 1 + torch.arange(24) % 2) % len(CLASSES)
    edited, union = ground_truth_edit(2, 24, target)
    changed = (edited != source.images).any(1, keepdim=True)
    assert not changed[union == 0].any()
    assert torch.equal(union, torch.maximum(source.masks, make_batch(2, 24, shapes=target).masks))
    assert changed.flatten(1).any(1).all()


def float64_denoiser():
    """The shipped denoiser in float64, schedule included."""
    denoiser = load_denoiser()
    denoiser.unet.double()
    denoiser.schedule_sigmas, denoiser.log_sigmas = denoiser.schedule_sigmas.double(), denoiser.log_sigmas.double()
    return denoiser


def test_an_items_edits_and_maps_do_not_depend_on_its_batch():
    # Every draw is seeded by the item's index, so item 3 edited (or mapped) alone is item 3 of a batch of 5. A
    # wrong draw moves pixels by O(0.1). What batching may change is rounding: the CPU's kernels differ by batch
    # size, and the edit-friendly replay amplifies that (x0 = x - sigma * eps with sigma up to 157, four
    # steps of about twenty layers); in float32 it reached 1.4e-5 on one machine, about 250 units of
    # float32 rounding. In float64 the same amplification gives about 3e-14, so 1e-9 leaves a margin of
    # 1e4 over it on any machine and still sits eight orders below a wrong draw.
    denoiser, settings = float64_denoiser(), EditSettings(steps=4)
    batch = make_batch(2, 5)
    images = batch.images.double()
    target = (batch.labels + 1) % len(CLASSES)
    weights = torch.rand(5, 1, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    together = per_pixel_time(denoiser, images, target, weights, settings, start=0.7)
    alone = per_pixel_time(denoiser, images[3:4], target[3:4], weights[3:4], settings, start=0.7, indices=[3])
    assert together.dtype == torch.float64 and torch.allclose(together[3:4], alone, rtol=0, atol=1e-9)
    assert torch.allclose(sdedit(denoiser, images, target, settings, 0.5)[3:4],
                          sdedit(denoiser, images[3:4], target[3:4], settings, 0.5, indices=[3]), rtol=0, atol=1e-9)
    replayed = [edit_friendly(denoiser, invert(denoiser, items, labels, settings, 0.25, indices), targets, settings)
                for items, labels, targets, indices in ((images, batch.labels, target, None),
                                                        (images[3:4], batch.labels[3:4], target[3:4], [3]))]
    assert torch.allclose(replayed[0][3:4], replayed[1], rtol=0, atol=1e-9)
    # The tolerance catches a wrong draw: item 3 edited with item 2's draws lands far from it.
    wrong_draws = edit_friendly(denoiser, invert(denoiser, images[3:4], batch.labels[3:4], settings, 0.25, [2]),
                                target[3:4], settings)
    assert (wrong_draws - replayed[1]).abs().max() > 1e-2
    alone = dict(source=images[3:4], source_class=batch.labels[3:4], target_class=target[3:4], indices=[3])
    for conditional_only in (False, True):
        assert torch.allclose(map_difference(denoiser, images, batch.labels, target, settings,
                                             conditional_only=conditional_only)[3:4],
                              map_difference(denoiser, settings=settings, conditional_only=conditional_only, **alone),
                              rtol=0, atol=1e-9)
    # Binary: a pixel could flip only where its change sits within rounding (1e-14 here) of the threshold.
    assert torch.equal(change_map(denoiser, images, batch.labels, target, settings, 4)[3:4],
                       change_map(denoiser, settings=settings, steps=4, **alone))


def test_the_shapes_models_conversions_are_comfyuis_model_sampling_discrete():
    denoiser = load_denoiser()
    steps = torch.tensor([0, 1, 250, 999])
    assert torch.equal(denoiser.sigma_to_timestep(denoiser.schedule_sigmas[steps] * 1.001), steps)
    assert torch.allclose(denoiser.timestep_to_sigma(steps), denoiser.schedule_sigmas[steps], rtol=1e-6)
    halfway = (denoiser.log_sigmas[499] + denoiser.log_sigmas[500]).div(2).exp()
    assert abs(denoiser.percent_to_sigma(0.5) - halfway.item()) < 1e-5 * halfway.item()
    assert denoiser.percent_to_sigma(1.0) == 0.0 and denoiser.sigma_min == denoiser.schedule_sigmas[0].item()


def test_the_classifier_is_confident_on_the_data_set_and_often_unsure_on_noise(held_out):
    # The demo counts a verdict on an image from elsewhere only at demo_edit.CONFIDENT: nearly every
    # held-out verdict reaches it, and much fewer of those on uniform noise images do.
    classifier = load_classifier()
    held_out_confidence = classifier(held_out.images).softmax(1).amax(1)
    noise = torch.rand(held_out.images.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise_confidence = classifier(noise).softmax(1).amax(1)
    reached, noise_reached = [(c >= demo_edit.CONFIDENT).float().mean().item()
                              for c in (held_out_confidence, noise_confidence)]
    print(f"verdicts at >= {demo_edit.CONFIDENT}: {reached:.3f} of held-out images, {noise_reached:.3f} of noise images")
    assert reached >= 0.95 and noise_reached <= 0.5


def test_a_foreign_image_gets_no_verdict_unless_the_classifier_is_confident():
    unsure, sure = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.995, 0.004, 0.001])
    assert demo_edit.judged_success(unsure, 0, from_data_set=False) is None
    assert demo_edit.judged_success(unsure, 0, from_data_set=True) is True
    assert demo_edit.judged_success(sure, 0, from_data_set=False) is True
    assert demo_edit.judged_success(sure, 1, from_data_set=False) is False


def test_the_demo_writes_its_grid_and_metrics(tmp_path):
    from PIL import Image

    metrics = demo.main(["--steps", "6", "--num-maps", "2", "--out", str(tmp_path / "demo")])
    with Image.open(tmp_path / "demo.png") as grid:
        assert grid.size == (7 * 32 * demo_edit.SCALE, 32 * demo_edit.SCALE + demo_edit.TITLE_HEIGHT
                             + demo_edit.LABEL_HEIGHT)
    assert json.loads((tmp_path / "demo.json").read_text()) == metrics
    assert metrics["inputs"] == {"index": 0, "set": HELD_OUT_SEED, "target": None, "steps": 6, "cfg": 3.0,
                                 "num_maps": 2, "seed": 0}
    assert set(metrics["methods"]) == {"NGDM", "edit-friendly", "NGDM + edit-friendly", "SDEdit 0.7", "hard mask"}
    for entry in metrics["methods"].values():
        assert 0 <= entry["ssim_outside_union"] <= 1 and entry["psnr_outside_union"] > 0
        assert entry["edit_success"] in (True, False)


def test_the_demo_writes_into_a_folder_given_as_out(tmp_path):
    assert demo.output_paths(str(tmp_path)) == (tmp_path / "ngdm_demo.png", tmp_path / "ngdm_demo.json")
    assert demo.output_paths(str(tmp_path / "new") + "/") == (tmp_path / "new" / "ngdm_demo.png",
                                                               tmp_path / "new" / "ngdm_demo.json")
    assert demo.output_paths(str(tmp_path / "run.v2")) == (tmp_path / "run.v2.png", tmp_path / "run.v2.json")


def test_the_demo_edits_an_image_file(tmp_path):
    from PIL import Image

    image = ((make_batch(HELD_OUT_SEED, 1, start=5).images[0] + 1) * 127.5).round().byte().permute(1, 2, 0)
    Image.fromarray(image.numpy()).resize((64, 64)).save(tmp_path / "source.png")
    metrics = demo.main(["--image", str(tmp_path / "source.png"), "--target", "square", "--steps", "4",
                         "--num-maps", "1", "--out", str(tmp_path / "edit")])
    assert metrics["target_class"] == "square" and "weight_map_iou_union" not in metrics
    assert metrics["inputs"]["image"] == str(tmp_path / "source.png") and "index" not in metrics["inputs"]
    for entry in metrics["methods"].values():
        # A confident verdict for the target is a success; an unsure one is no verdict.
        if entry["target_probability"] >= demo_edit.CONFIDENT:
            assert entry["edit_success"] is True
        elif entry["target_probability"] > 1 - demo_edit.CONFIDENT:
            assert entry["edit_success"] is None
    assert (tmp_path / "edit.png").exists()


def bad_arguments(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "a_file").write_text("")
    return [
        (["--num-maps", "0"], "--num-maps must be at least 1, got 0"),
        (["--index", "-1"], "--index must be at least 0, got -1"),
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--cfg", "nan"], "--cfg must be a finite number"),
        (["--image", str(tmp_path / "missing.png")], "--image: cannot read"),
        (["--image", str(tmp_path / "notes.txt")], "--image: cannot read"),
        (["--out", str(tmp_path / "a_file" / "demo")], "--out: "),
        (["--steps", "many"], "argument --steps: invalid int value"),
    ]


def test_each_bad_demo_argument_exits_with_one_line_naming_it_before_torch_loads(tmp_path):
    # A stand-in torch that cannot be imported: a check made after torch loads fails on it instead.
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('torch was imported')\n")
    repository = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(repository)])}
    for arguments, message in bad_arguments(tmp_path):
        run = subprocess.run([sys.executable, "-m", "ngdm_core.demo", *arguments, "--out", str(tmp_path / "out")]
                             if "--out" not in arguments else [sys.executable, "-m", "ngdm_core.demo", *arguments],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
        lines = run.stderr.strip().splitlines()
        assert run.returncode != 0 and len(lines) == 1 and message in lines[0], (arguments, run.stderr)
        assert not (tmp_path / "out.png").exists()


def test_training_writes_to_the_working_folder_and_resumes_as_one_run(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from ngdm_core.shapes import training
    from ngdm_core.shapes.model import UNET_FILE

    shipped = UNET_FILE.read_bytes()
    monkeypatch.chdir(tmp_path)
    tiny = ["--batch-size", "2", "--train-size", "8", "--checkpoint-every", "2", "--threads", "1"]
    training.main(["unet", "--steps", "2", *tiny])
    training.main(["unet", "--steps", "4", "--resume", *tiny])
    training.main(["unet", "--steps", "4", "--out", "whole.safetensors", *tiny])
    assert UNET_FILE.read_bytes() == shipped
    resumed, whole = load_file(tmp_path / "shapes_unet.safetensors"), load_file(tmp_path / "whole.safetensors")
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[key], whole[key]) for key in whole)
    with pytest.raises(ValueError, match="--resume: .* was saved with"):
        training.main(["unet", "--steps", "6", "--resume", "--lr", "0.5", *tiny])
