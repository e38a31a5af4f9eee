"""RectifierApply's inference overhead, the offsets it generates, and RectifierTrain's throughput.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/rectifier_benchmark.py

Runs in a headless ComfyUI (CPU) on the tiny SD1.5-shaped U-Net. Prints the wall time of
sampling with the rectified model against the bare one (the goal is at most 2.2x: two U-Net
passes per step are inherent), the generated offset values per sample, separable against
full kernels, for the tiny U-Net and for SD1.5's real conv shapes, and training steps and
images per second.
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "comfy"))
import tiny_host  # noqa: E402
from timing import interleaved_medians  # noqa: E402

SIZE = 32
STEPS = 10
REPEATS = 5
TRAIN_STEPS = 20
TRAIN_BATCH = 4


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
          f"per step, ratio {seconds['rectified'] / seconds['bare']:.2f} (goal <= 2.2)")

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
        start = time.perf_counter()
        train.execute(model=model, latent=latents, positive=positive, steps=TRAIN_STEPS, learning_rate=1e-3, seed=0,
                      filename_prefix="benchmark", batch_size=TRAIN_BATCH)
        elapsed = time.perf_counter() - start
    print(f"training, latent {SIZE}x{SIZE}, batch {TRAIN_BATCH}, {TRAIN_STEPS} steps (including the weight copy and "
          f"saving): {elapsed:.1f} s, {TRAIN_STEPS / elapsed:.2f} steps/s, {TRAIN_STEPS * TRAIN_BATCH / elapsed:.1f} images/s")


if __name__ == "__main__":
    main()
