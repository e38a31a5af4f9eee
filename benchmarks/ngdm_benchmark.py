"""NGDM's costs on the tiny SD1.5-shaped model, measured in one run of a real headless ComfyUI (CPU).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/ngdm_benchmark.py

Prints: U-Net calls per step and the wall-time ratio of PerPixelTimeSampler to its bare base
sampler at equal steps, and the batched weight map against a per-seed loop.
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "comfy"))
import tiny_host  # noqa: E402

STEPS = 20
SIZE = 32
REPEATS = 7
NUM_MAPS = 10


def median_seconds(run):
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    host = tiny_host.start(os.path.abspath(os.environ["COMFYUI_PATH"]))
    import comfy.samplers
    import nodes
    import torch
    torch.manual_seed(0)
    model, batch_sizes = host.count_model_calls(host.tiny_model("eps"))
    weights = torch.rand(1, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    print(f"tiny U-Net, latent {SIZE}x{SIZE}, {STEPS} steps, cfg 2, median of {REPEATS} runs, "
          f"{torch.get_num_threads()} threads")
    for name in ("euler", "euler_ancestral", "dpmpp_2m"):
        base = comfy.samplers.sampler_object(name)
        (wrapped,) = nodes.NODE_CLASS_MAPPINGS["PerPixelTimeSampler"].execute(sampler=base, mapping="ngdm").result
        runs = {
            "bare": lambda: host.sample_with_weights(model, base, None, STEPS, size=SIZE),
            "bare, host inpainting with the same mask": lambda: host.sample_with_weights(model, base, weights, STEPS, size=SIZE),
            "PerPixelTimeSampler": lambda: host.sample_with_weights(model, wrapped, weights, STEPS, size=SIZE),
        }
        seconds, calls = {}, {}
        for label, run in runs.items():
            run()  # warm-up
            batch_sizes.clear()
            run()
            calls[label] = len(batch_sizes) / STEPS
            seconds[label] = median_seconds(run)
        ours = seconds["PerPixelTimeSampler"]
        print(f"{name}: U-Net calls per step: bare {calls['bare']:.2f}, PerPixelTimeSampler "
              f"{calls['PerPixelTimeSampler']:.2f}; wall time {ours:.3f} s, ratio to bare {ours / seconds['bare']:.3f}, "
              f"to host inpainting {ours / seconds['bare, host inpainting with the same mask']:.3f}")

    host_module = host.pack_module("nodes.host")
    ngdm_module = host.pack_module("ngdm_core.ngdm")
    source = model.model.process_latent_in(torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(1)))
    sigma = float(model.get_model_object("model_sampling").percent_to_sigma(0.5))
    denoise = host_module.guided_denoiser(model, host.tiny_conditioning("negative"), 7.5, 0)
    conditions = (host.tiny_conditioning("source"), host.tiny_conditioning("target"))
    maps = {}
    for label, max_batch in (("batched", None), ("per-seed loop", 1)):
        def run():
            maps[label] = ngdm_module.weight_map(denoise, source, *conditions, sigma, num_maps=NUM_MAPS, max_batch=max_batch)
        run()
        batch_sizes.clear()
        run()
        calls = list(batch_sizes)
        maps[label + " seconds"] = median_seconds(run)
        print(f"weight map, {label}: {len(calls)} U-Net calls of batch {sorted(set(calls))}, "
              f"{maps[label + ' seconds']:.3f} s")
    difference = (maps["batched"] - maps["per-seed loop"]).abs().max().item()
    print(f"weight map: per-seed loop / batched wall time = {maps['per-seed loop seconds'] / maps['batched seconds']:.2f}, "
          f"max map difference {difference:.1e}")


if __name__ == "__main__":
    main()
