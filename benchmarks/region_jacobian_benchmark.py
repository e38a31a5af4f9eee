"""The cost of the region-direction search on the tiny SD1.5-shaped U-Net, in a headless ComfyUI (CPU).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/region_jacobian_benchmark.py

Prints one block iteration's cost in forward-pass equivalents, and the batched block search
(LOBPCG on J^T J, all k directions at once: ``top_directions``) against sequential
per-direction power iteration with deflation (``top_directions_sequential``, the authors'
scheme) run to the same tolerance (k = 3). Part of the gain is LOBPCG's faster convergence,
not the batching alone: the run prints both methods' vector products.
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "comfy"))
import tiny_host  # noqa: E402
from timing import interleaved_medians  # noqa: E402

SIZE = 16
K = 3
TOL = 1e-3
MAX_ITER = 400


def main():
    host = tiny_host.start(os.path.abspath(os.environ["COMFYUI_PATH"]))
    import torch
    core = host.pack_module("ngdm_core.region_jacobian")
    nodes_module = host.pack_module("nodes.region_jacobian")
    with torch.inference_mode():
        model = host.tiny_model("eps")
        sigma = float(model.get_model_object("model_sampling").percent_to_sigma(0.5))
        x = torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * (1 + sigma**2) ** 0.5
        f, h = nodes_module.bottleneck_function(model, x, sigma, host.tiny_conditioning("p"))
        mask = torch.zeros(1, 1, SIZE, SIZE)
        mask[..., :SIZE // 2, :SIZE // 2] = 1.0
        jacobian = core.masked_jacobian(f, h, mask)
        vectors = torch.randn(K, *h.shape[1:])
        covectors = torch.randn(K, 1, 4, SIZE, SIZE)

        def forward():
            with torch.inference_mode(False), torch.no_grad():
                f(h)

        seconds = interleaved_medians({"forward": forward, "jvp": lambda: jacobian.jvp(vectors),
                                       "vjp": lambda: jacobian.vjp(covectors)}, 15)
        iteration = seconds["jvp"] + seconds["vjp"]
        print(f"tiny U-Net, latent {SIZE}x{SIZE}, bottleneck {tuple(h.shape[1:])}, {torch.get_num_threads()} threads")
        print(f"forward pass {seconds['forward'] * 1e3:.1f} ms; one block iteration for k={K} (one batched JVP and "
              f"one batched VJP) {iteration * 1e3:.1f} ms = {iteration / seconds['forward']:.2f} forward passes, "
              f"{iteration / seconds['forward'] / K:.2f} per direction")
        results = {}
        for label, search in (("batched block (LOBPCG)", core.top_directions), ("sequential deflation",
                                                                          core.top_directions_sequential)):
            start = time.perf_counter()
            found = search(core.masked_jacobian(f, h, mask), k=K, max_iter=MAX_ITER, tol=TOL, seed=0)
            results[label] = (time.perf_counter() - start, found)
            print(f"{label}: {results[label][0]:.2f} s, {found.iterations} iterations, {found.jvp_vectors} JVP and "
                  f"{found.vjp_vectors} VJP vectors, residual {found.residual:.1e}, converged {found.converged}, "
                  f"singular values {[round(v, 4) for v in found.singular_values.tolist()]}")
        batched, sequential = results["batched block (LOBPCG)"][1], results["sequential deflation"][1]
        agreement = (batched.vectors * sequential.vectors).flatten(1)
        print(f"|cos| between the two methods' directions: {[round(v, 4) for v in agreement.sum(dim=1).abs().tolist()]}")
        print(f"sequential / batched wall time at tol {TOL}: "
              f"{results['sequential deflation'][0] / results['batched block (LOBPCG)'][0]:.2f}")


if __name__ == "__main__":
    main()
