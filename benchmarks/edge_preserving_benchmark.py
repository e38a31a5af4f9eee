"""The cost of EdgePreservingNoise against RandomNoise for a 128x128 latent, in a headless ComfyUI (CPU).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/edge_preserving_benchmark.py [--threads N]

With an image, the edges come from area-averaging it to the latent; the script also times that
resize alone and one plain sum over the image, the least any use of it costs.
"""

import argparse

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "comfy"))
import tiny_host  # noqa: E402
from timing import interleaved_medians  # noqa: E402

REPEATS = 51


def main():
    parser = argparse.ArgumentParser()
    # ComfyUI makes NOISE on the CPU; a 128x128 latent is small enough that threads mostly add
    # overhead, and one thread is least disturbed by other jobs on the machine.
    parser.add_argument("--threads", type=int, default=1)
    threads = parser.parse_args().threads
    host = tiny_host.start(os.path.abspath(os.environ["COMFYUI_PATH"]))
    import comfy.samplers
    import nodes
    import torch
    torch.set_num_threads(threads)
    resize_to_latent = host.pack_module("ngdm_core.edge_preserving").resize_to_latent
    model = host.tiny_model("eps")
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 30)[-22:].cpu()
    latent = {"samples": torch.randn(1, 4, 128, 128)}
    (random_noise,) = nodes.NODE_CLASS_MAPPINGS["RandomNoise"].execute(noise_seed=0).result
    knobs = dict(lambda_min=1e-4, lambda_max=0.1, t_phi=1.0, transition="linear", strength=1.0)
    edge_nodes = nodes.NODE_CLASS_MAPPINGS["EdgePreservingNoise"]
    (from_latent,) = edge_nodes.execute(model=model, sigmas=sigmas, seed=0, **knobs).result
    image = torch.rand(1, 1024, 1024, 3)
    (from_image,) = edge_nodes.execute(model=model, sigmas=sigmas, seed=0, image=image, **knobs).result
    seconds = interleaved_medians({
        "RandomNoise": lambda: random_noise.generate_noise(latent),
        "edges from the latent": lambda: from_latent.generate_noise(latent),
        "edges from a 1024x1024 image": lambda: from_image.generate_noise(latent),
        "the image's area resize alone": lambda: resize_to_latent(image.movedim(-1, 1), (128, 128)),
        "one sum over the image": lambda: image.sum(),
    }, REPEATS)
    print(f"latent 1x4x128x128, median of {REPEATS} interleaved runs, {torch.get_num_threads()} threads")
    for label, value in seconds.items():
        print(f"{label}: {value * 1e3:.2f} ms, {value / seconds['RandomNoise']:.2f}x RandomNoise")


if __name__ == "__main__":
    main()
