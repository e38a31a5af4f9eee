"""NGDM's costs on the tiny SD1.5-shaped model, measured in one run of a real headless ComfyUI (CPU).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/ngdm_benchmark.py

Prints: U-Net calls per step and the wall-time ratio of PerPixelTimeSampler to its bare base
sampler at equal steps, the replacement's own cost per model call, and the batched weight
map against a per-seed loop.
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "comfy"))
import tiny_host  # noqa: E402
from timing import interleaved_medians  # noqa: E402

STEPS = 20
SIZE = 32
REPEATS = 9
NUM_MAPS = 10


def main():
    host = tiny_host.start(os.path.abspath(os.environ["COMFYUI_PATH"]))
    import comfy.samplers
    import nodes
    import torch
    model, batch_sizes = host.count_model_calls(host.tiny_model("eps"))
    weights = torch.rand(1, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    print(f"tiny U-Net, latent {SIZE}x{SIZE}, {STEPS} steps, cfg 2, median of {REPEATS} interleaved runs, "
          f"{torch.get_num_threads()} threads")
    for name in ("euler", "euler_ancestral", "dpmpp_2m"):
        base = comfy.samplers.sampler_object(name)
        (wrapped,) = nodes.NODE_CLASS_MAPPINGS["PerPixelTimeSampler"].execute(sampler=base, mapping="ngdm").result
        runs = {
            "bare": lambda: host.sample_with_weights(model, base, None, STEPS, size=SIZE),
            "inpainting": lambda: host.sample_with_weights(model, base, weights, STEPS, size=SIZE),
            "ours": lambda: host.sample_with_weights(model, wrapped, weights, STEPS, size=SIZE),
        }
        calls = {}
        for label, run in runs.items():
            batch_sizes.clear()
            run()
            calls[label] = len(batch_sizes) / STEPS
        seconds = interleaved_medians(runs, REPEATS)
        print(f"{name}: U-Net calls per step: bare {calls['bare']:.2f}, PerPixelTimeSampler {calls['ours']:.2f}; "
              f"wall time {seconds['ours']:.3f} s, ratio to the bare sampler {seconds['ours'] / seconds['bare']:.3f}, "
              f"to the host's inpainting with the same mask {seconds['ours'] / seconds['inpainting']:.3f}")

    ngdm = host.pack_module("ngdm_core.ngdm")
    for size in (SIZE, 128):
        source = torch.randn(1, 4, size, size)
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS).cpu()
        start = ngdm.start_sigmas(torch.rand(1, 1, size, size), sigmas)
        wrapped = ngdm.per_pixel_time_denoiser(lambda x, sigma: x, ngdm.noised_source_reference(source, source, "vp"),
                                               sigmas, start)
        state, calls = source.clone(), 200
        begin = time.perf_counter()
        for i in range(calls):
            wrapped(state, sigmas[i % STEPS].reshape(1))
        print(f"replacement cost per model call, latent {size}x{size}: "
              f"{(time.perf_counter() - begin) / calls * 1e6:.0f} us")

    host_module = host.pack_module("nodes.host")
    source = model.model.process_latent_in(torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(1)))
    sigma = float(model.get_model_object("model_sampling").percent_to_sigma(0.5))
    denoise = host_module.guided_denoiser(model, host.tiny_conditioning("negative"), 7.5, 0)
    conditions = (host.tiny_conditioning("source"), host.tiny_conditioning("target"))
    maps, calls = {}, {}

    def weight_map(label, max_batch):
        def run():
            maps[label] = ngdm.weight_map(denoise, source, *conditions, sigma, num_maps=NUM_MAPS, max_batch=max_batch)
        return run

    runs = {"batched": weight_map("batched", None), "per-seed loop": weight_map("per-seed loop", 1)}
    for label, run in runs.items():
        batch_sizes.clear()
        run()
        calls[label] = list(batch_sizes)
    seconds = interleaved_medians(runs, 3)
    for label in runs:
        print(f"weight map, {NUM_MAPS} maps, {label}: {len(calls[label])} U-Net calls of batch "
              f"{sorted(set(calls[label]))}, {seconds[label]:.3f} s")
    difference = (maps["batched"] - maps["per-seed loop"]).abs().max().item()
    print(f"weight map: per-seed loop / batched wall time = {seconds['per-seed loop'] / seconds['batched']:.2f}, "
          f"max map difference {difference:.1e}")


if __name__ == "__main__":
    main()
