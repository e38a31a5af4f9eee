"""What rectifier_reconstruct_edit costs on this machine's CPU with SD1.5's real U-Net, as shipped.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/rectifier_workflow_cpu.py [--threads N]

Builds SD1.5's U-Net in a headless ComfyUI with random weights (the same compute as the real
ones; no download), for 512x512 images (64x64 latents). Times one RectifierTrain step and one
guided call of the rectified model (cond and uncond, two U-Net passes each), reads the
workflow's step counts, and prints the estimated wall time of the whole workflow. Needs about
10 GB of memory: the U-Net, its training copy and the activations.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "comfy"))
import tiny_host  # noqa: E402

LATENT = 64
WORKFLOW = os.path.join(tiny_host.PACK_ROOT, "example_workflows", "rectifier_reconstruct_edit.json")
SD15_SIZES = {"model_channels": 320, "channel_mult": [1, 2, 4, 4], "num_res_blocks": [2, 2, 2, 2],
              "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
              "transformer_depth_middle": 1, "num_heads": 8}


def workflow_steps():
    """Training steps and batch, and the number of guided model calls of the two edits, as the workflow has them."""
    with open(WORKFLOW) as f:
        widgets = {node["type"]: node["widgets_values"] for node in json.load(f)["nodes"]}
    train_steps, _, _, _, _, batch = widgets["RectifierTrain"]
    # KSampler keeps its step count at any denoise; the inversion and its replay run the steps left after skip.
    ksampler_calls = widgets["KSampler"][2]
    schedule_steps = widgets["BasicScheduler"][1]
    edit_steps = schedule_steps - round(widgets["EditFriendlyInvert"][2] * schedule_steps)
    return train_steps, batch, ksampler_calls, edit_steps


def sd15_model(host):
    import comfy.model_base
    import comfy.supported_models
    import torch
    config = comfy.supported_models.SD15({**host.TINY_UNET_CONFIG, **SD15_SIZES, "dtype": torch.float32})
    base = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS)
    host.init_weights(base.diffusion_model, 0)
    return host._patcher(base)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    threads = parser.parse_args().threads
    host = tiny_host.start(os.path.abspath(os.environ["COMFYUI_PATH"]))
    import comfy.utils
    import nodes
    import torch
    if threads:
        torch.set_num_threads(threads)
    train_steps, batch, ksampler_calls, edit_steps = workflow_steps()
    print(f"SD1.5 U-Net (random weights), latent {LATENT}x{LATENT}, {torch.get_num_threads()} threads", flush=True)
    with torch.inference_mode():
        model = sd15_model(host)
        sources = {"samples": torch.randn(3, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0))}
        positive, negative = host.tiny_conditioning(""), host.tiny_conditioning("negative")
        # Two training steps, timed at each step through ComfyUI's progress hook.
        stamps = []
        comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None:
                                                 stamps.append(time.perf_counter()))
        start = time.perf_counter()
        (rectifier,) = nodes.NODE_CLASS_MAPPINGS["RectifierTrain"].execute(
            model=model, latent=sources, positive=positive, steps=2, learning_rate=1e-3, seed=0,
            filename_prefix="benchmark", batch_size=batch).result
        comfy.utils.set_progress_bar_global_hook(None)
        per_step = stamps[-1] - stamps[-2]
        # The weight copy and the rectifier's construction come before the first step; timing noise can
        # make the first step alone look longer than the second.
        setup = max(0.0, stamps[-2] - start - per_step)
        print(f"RectifierTrain: {per_step:.1f} s per step at batch {batch}, {setup:.1f} s to set up", flush=True)
        (rectified,) = nodes.NODE_CLASS_MAPPINGS["RectifierApply"].execute(
            model=model, rectifier=rectifier, latent={"samples": sources["samples"][:1]}).result
        denoise = host.pack_module("nodes.host").guided_denoiser(rectified, negative, 5.0, 0)
        x = sources["samples"][:1]
        denoise(x, torch.ones(1), positive)  # warm-up
        start = time.perf_counter()
        denoise(x, torch.ones(1), positive)
        per_call = time.perf_counter() - start
    print(f"rectified guided call (cond + uncond, two U-Net passes each): {per_call:.1f} s")
    calls = ksampler_calls + 2 * edit_steps
    total = setup + train_steps * per_step + calls * per_call
    print(f"rectifier_reconstruct_edit as shipped: {train_steps} training steps, {ksampler_calls} SDEdit calls, "
          f"{edit_steps} inversion + {edit_steps} replay calls: about {total / 60:.1f} minutes")


if __name__ == "__main__":
    main()
