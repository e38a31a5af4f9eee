"""RectifierApply's inference overhead, the offsets it generates, and RectifierTrain's throughput in both modes.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/rectifier_benchmark.py

Runs in a headless ComfyUI (CPU) on the tiny SD1.5-shaped U-Net. Prints the wall time of
sampling with the rectified model against the bare one (the goal is at most 2.1x: two U-Net
passes per step are inherent), the generated offset values per sample, separable against
full kernels, for the tiny U-Net and for SD1.5's real conv shapes, and training steps and
images per second, reconstruction against edit mode, through the node on the tiny U-Net (with a
tiny CLIP vision model and VAE) and through ``ngdm_core`` on the shipped shapes model. Last,
what edit mode adds at SD1.5's real size, counted in FLOPs on the meta device (no weights): the
VAE decode and CLIP ViT-L/14 pass, forward and backward, against the U-Net's.
"""

import contextlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "comfy"))
import tiny_host  # noqa: E402
from timing import interleaved_medians  # noqa: E402

# Imported before the headless host takes the repository root off sys.path (its nodes/ would shadow ComfyUI's).
from ngdm_core.rectifier import train_edit_rectifier, train_rectifier  # noqa: E402
from ngdm_core.shapes.data import HELD_OUT_SEED, make_batch, other_class  # noqa: E402
from ngdm_core.shapes.model import NULL_CLASS, UNET_FILE, ShapesUNet, load_classifier, load_model  # noqa: E402
from ngdm_core.shapes.rectifier import class_embeddings, edit_directions, image_features, new_rectifier  # noqa: E402

SIZE = 32
STEPS = 10
REPEATS = 5
TRAIN_STEPS = 20
TRAIN_BATCH = 4
SHAPES_STEPS = 20
SHAPES_BATCH = 8


def sd15_unet():
    """SD1.5's U-Net, built by ComfyUI on the meta device: its conv shapes without its weights."""
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    import comfy.ops
    import comfy.supported_models
    import torch
    config = {**tiny_host.TINY_UNET_CONFIG, **comfy.supported_models.SD15.unet_extra_config, "model_channels": 320,
              "channel_mult": [1, 2, 4, 4], "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
              "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]}
    with torch.device("meta"):
        unet = openaimodel.UNetModel(**config, dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init)
    return unet


def main():
    host = tiny_host.start(os.path.abspath(os.environ["COMFYUI_PATH"]))
    import comfy.sample
    import nodes
    import torch
    core = host.pack_module("ngdm_core.rectifier")
    rectifier_nodes = host.pack_module("nodes.rectifier")
    print(f"tiny U-Net, latent {SIZE}x{SIZE}, {torch.get_num_threads()} threads")
    with torch.inference_mode():
        model = host.tiny_model("eps")
        source = torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
        targets = core.conv_targets(model.model, rectifier_nodes.TARGET_BLOCKS)
        rectifier = core.Rectifier.for_model(model.model, targets, 4)
        (rectified,) = nodes.NODE_CLASS_MAPPINGS["RectifierApply"].execute(
            model=model, rectifier=rectifier, latent={"samples": source}).result
        positive, negative = host.tiny_conditioning("p"), host.tiny_conditioning("n")
        noise = torch.randn(source.shape, generator=torch.Generator().manual_seed(1))

        def sample(patched):
            return lambda: comfy.sample.sample(patched, noise, STEPS, 5.0, "euler", "normal", positive, negative,
                                               source, disable_pbar=True, seed=0)

        seconds = interleaved_medians({"bare": sample(model), "rectified": sample(rectified)}, REPEATS)
    print(f"sampling {STEPS} euler steps at cfg 5 (U-Net batch 2), median of {REPEATS} interleaved runs: bare "
          f"{seconds['bare'] * 1e3 / STEPS:.1f} ms per step, RectifierApply {seconds['rectified'] * 1e3 / STEPS:.1f} ms "
          f"per step, ratio {seconds['rectified'] / seconds['bare']:.2f} (goal <= 2.1)")

    counts = rectifier.generated_parameter_counts()
    print(f"tiny U-Net, {len(targets)} targeted convs: {counts['separable']} generated offset values per sample "
          f"(separable) against {counts['full']} (full kernels), {counts['full'] / counts['separable']:.1f}x fewer; "
          f"rectifier {sum(p.numel() for p in rectifier.parameters())} parameters")
    sd15 = sd15_unet()
    sd15_targets = core.conv_targets(sd15, ("middle_block", "output_blocks"))
    shapes = core.shape_signature(sd15, sd15_targets)
    separable = sum(kh * kw * (c_in + c_out) for c_out, c_in, kh, kw in shapes.values())
    full = sum(c_out * c_in * kh * kw for c_out, c_in, kh, kw in shapes.values())
    print(f"SD1.5, {len(sd15_targets)} targeted convs: {separable} generated offset values per sample (separable) "
          f"against {full} (full kernels), {full / separable:.0f}x fewer")

    with torch.inference_mode():
        train = nodes.NODE_CLASS_MAPPINGS["RectifierTrain"]
        latents = {"samples": torch.randn(8, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(2))}
        edit_inputs = dict(mode="edit", target=host.tiny_conditioning("target"), clip=host.tiny_clip(),
                           clip_vision=host.tiny_clip_vision(), vae=host.tiny_vae())
        for mode, extra in (("reconstruct", {}), ("edit", edit_inputs)):
            start = time.perf_counter()
            train.execute(model=model, latent=latents, positive=positive, steps=TRAIN_STEPS, learning_rate=1e-3,
                          seed=0, filename_prefix="benchmark", batch_size=TRAIN_BATCH, **extra)
            elapsed = time.perf_counter() - start
            print(f"RectifierTrain {mode}, tiny U-Net, latent {SIZE}x{SIZE}, batch {TRAIN_BATCH}, {TRAIN_STEPS} steps "
                  f"(including the weight copies and saving): {elapsed:.1f} s, {TRAIN_STEPS / elapsed:.2f} steps/s, "
                  f"{TRAIN_STEPS * TRAIN_BATCH / elapsed:.1f} images/s")
    shapes_training_speed()
    sd15_edit_costs(host)


def shapes_training_speed():
    """Steps per second of both trainings on the shipped shapes model, through ``ngdm_core`` alone."""
    import torch
    unet, classifier = load_model(ShapesUNet, UNET_FILE), load_classifier()
    batch = make_batch(HELD_OUT_SEED, 16)
    targets = other_class(batch.labels)
    directions = edit_directions(class_embeddings(classifier), batch.labels, targets)
    runs = {"reconstruction": lambda rectifier: train_rectifier(
                unet, rectifier, batch.images, SHAPES_STEPS, batch_size=SHAPES_BATCH,
                conditions=torch.full((16,), NULL_CLASS)),
            "edit": lambda rectifier: train_edit_rectifier(
                unet, rectifier, batch.images, image_features(classifier), directions, SHAPES_STEPS,
                targets=targets, batch_size=SHAPES_BATCH)}
    for name, run in runs.items():
        start = time.perf_counter()
        run(new_rectifier(unet))
        elapsed = time.perf_counter() - start
        print(f"{name} training, shapes model (32x32 pixels), batch {SHAPES_BATCH}, {SHAPES_STEPS} steps: "
              f"{SHAPES_STEPS / elapsed:.2f} steps/s")


@contextlib.contextmanager
def meta_attention():
    """Plain PyTorch attention in ComfyUI's U-Net, VAE and CLIP: their default picks ask the device for free memory,
    which a meta tensor has none of."""
    import comfy.ldm.modules.attention as attention
    import comfy.ldm.modules.diffusionmodules.model as vae_model
    saved = attention.optimized_attention, vae_model.vae_attention
    attention.optimized_attention = attention.attention_pytorch
    vae_model.vae_attention = lambda: vae_model.pytorch_attention
    try:
        yield lambda *args, **kwargs: attention.attention_pytorch
    finally:
        attention.optimized_attention, vae_model.vae_attention = saved


def flops(run):
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops() / 1e12


def sd15_edit_costs(host):
    """TFLOPs of one 512x512 image through SD1.5's U-Net, its VAE decoder and CLIP ViT-L/14, forward and backward."""
    import comfy.clip_model
    import comfy.ldm.models.autoencoder
    import comfy.ops
    import torch
    embeddings = host.pack_module("nodes.rectifier_embeddings")
    config = json.load(open(os.path.join(os.environ["COMFYUI_PATH"], "comfy", "clip_vision_config_vitl.json")))
    with meta_attention() as attention, torch.device("meta"):
        unet = sd15_unet()
        vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=SD_VAE_DDCONFIG, embed_dim=4)
        clip_vision = comfy.clip_model.CLIPVisionModelProjection(config, torch.float32, "meta",
                                                                 comfy.ops.disable_weight_init)
        for module in (vae, clip_vision):
            module.requires_grad_(False)
        latent, t, context = torch.zeros(1, 4, 64, 64), torch.zeros(1), torch.zeros(1, 77, 768)
        pixels = torch.zeros(1, 3, 224, 224)
        saved_attention = embeddings.optimized_attention_for_device
        embeddings.optimized_attention_for_device = attention
        try:
            unet_forward = flops(lambda: unet(latent, t, context))
            unet_both = flops(lambda: unet(latent.clone().requires_grad_(True), t, context).sum().backward())
            vae_forward = flops(lambda: vae.decode(latent))
            vae_both = flops(lambda: vae.decode(latent.clone().requires_grad_(True)).sum().backward())
            clip_forward = flops(lambda: embeddings.image_embeds(clip_vision, pixels))
            clip_both = flops(lambda: embeddings.image_embeds(clip_vision, pixels.clone().requires_grad_(True))
                              .sum().backward())
        finally:
            embeddings.optimized_attention_for_device = saved_attention
        sizes = {name: sum(p.numel() for p in module.parameters()) / 1e6
                 for name, module in (("VAE", vae), ("VAE decoder", vae.decoder), ("CLIP vision", clip_vision))}
    # The backward of a rectified pass reaches the middle and output blocks and the offsets, not the input
    # blocks: the U-Net's whole backward with its weight gradients bounds it from above.
    reconstruction = 2 * unet_forward + (unet_both - unet_forward)
    added = vae_both + clip_both
    print(f"SD1.5 at 512x512, batch 1, TFLOPs: U-Net pass {unet_forward:.2f} (backward at most "
          f"{unet_both - unet_forward:.2f}); VAE decode {vae_forward:.2f} forward, {vae_both - vae_forward:.2f} "
          f"backward; CLIP ViT-L/14 {clip_forward:.3f} forward, {clip_both - clip_forward:.3f} backward")
    print(f"a reconstruction step is at most {reconstruction:.2f} TFLOPs per image; edit mode adds {added:.2f} (the "
          f"VAE decode {vae_both / added:.0%} of it): {(reconstruction + added) / reconstruction:.2f}x at least")
    print(f"edit mode's extra copies: the VAE {sizes['VAE']:.1f} M parameters (decoder {sizes['VAE decoder']:.1f} M), "
          f"CLIP vision {sizes['CLIP vision']:.1f} M")


SD_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                   "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


if __name__ == "__main__":
    main()
