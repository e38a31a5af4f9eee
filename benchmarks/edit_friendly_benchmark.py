"""Edit-friendly inversion's costs and accuracy, measured in one run of a real headless ComfyUI (CPU).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/edit_friendly_benchmark.py

Prints the inversion's U-Net calls per step and its wall time against plain sampling of the
same length, the memory an inversion holds for a 1024x1024 SDXL latent at 100 steps, and
the reconstruction error of edit-friendly against DDIM inversion on the tiny model.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "comfy"))
import tiny_host  # noqa: E402
from timing import interleaved_medians  # noqa: E402

STEPS = 50
SIZE = 32
REPEATS = 5


def main():
    host = tiny_host.start(os.path.abspath(os.environ["COMFYUI_PATH"]))
    import comfy.sample
    import comfy.samplers
    import nodes
    import torch
    edit_friendly = host.pack_module("ngdm_core.edit_friendly")
    host_module = host.pack_module("nodes.host")
    invert_node = nodes.NODE_CLASS_MAPPINGS["EditFriendlyInvert"]
    model, batch_sizes = host.count_model_calls(host.tiny_model("eps"))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS).cpu()
    source = torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    positive, negative = host.tiny_conditioning("source"), host.tiny_conditioning("negative")
    print(f"tiny U-Net, latent {SIZE}x{SIZE}, {STEPS} steps, skip 0, cfg 3.5, median of {REPEATS} interleaved runs, "
          f"{torch.get_num_threads()} threads")

    def invert():
        return invert_node.execute(model=model, latent={"samples": source}, positive=positive, negative=negative,
                                   sigmas=sigmas, source_cfg=3.5, eta=1.0, skip=0.0, seed=0).result

    def plain():
        comfy.sample.sample_custom(model, torch.randn(source.shape), 3.5, comfy.samplers.sampler_object("euler_ancestral"),
                                   sigmas, positive, negative, source, disable_pbar=True, seed=0)

    invert()
    batch_sizes.clear()
    invert()
    print(f"inversion: {len(batch_sizes) / STEPS:.2f} U-Net calls per step, batch {sorted(set(batch_sizes))} "
          "(cond and uncond of one guided evaluation)")
    seconds = interleaved_medians({"inversion": invert, "plain": plain}, REPEATS)
    print(f"inversion {seconds['inversion']:.3f} s, plain euler_ancestral sampling {seconds['plain']:.3f} s, "
          f"ratio {seconds['inversion'] / seconds['plain']:.3f}")

    sdxl = edit_friendly.invert_edit_friendly(lambda x, sigma, cond: x, torch.zeros(1, 4, 128, 128),
                                              torch.linspace(14.6, 0.0, 101))
    megabytes = {name: getattr(sdxl, name).numel() * 4 / 2**20 for name in ("noise_maps", "trajectory", "predictions")}
    print(f"1024x1024 SDXL latent (4x128x128), 100 steps, float32: noise maps {megabytes['noise_maps']:.1f} MiB; "
          f"with the trajectory and predictions kept for NGDM {sum(megabytes.values()):.1f} MiB")

    processed = model.model.process_latent_in(source)
    scale = processed.std().item()
    sample_euler = host.pack_module("ngdm_core.samplers").sample_euler
    for cfg in (1.0, 3.5):
        denoise = host_module.guided_denoiser(model, negative, cfg, 0)
        inversion = edit_friendly.invert_edit_friendly(denoise, processed, sigmas, positive,
                                                       generator=torch.Generator().manual_seed(0))
        edit_friendly_error = (edit_friendly.edit(denoise, inversion, positive) - processed).abs().max().item()
        ddim_start = edit_friendly.invert_ddim(denoise, processed, sigmas, positive)
        replayed = sample_euler(lambda x, sigma: denoise(x, sigma, positive), ddim_start, sigmas)
        ddim_error = (replayed - processed).abs().max().item()
        print(f"reconstruction at cfg {cfg}, max error relative to the latent's std: "
              f"edit-friendly {edit_friendly_error / scale:.1e}, DDIM {ddim_error / scale:.1e}")


if __name__ == "__main__":
    main()
