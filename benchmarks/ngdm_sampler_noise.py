"""Which ComfyUI samplers keep the held pixels on one fixed noise, per route, measured on the tiny model.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/ngdm_sampler_noise.py

For every sampler, Lambda is 0 on half the latent. "drift" is the largest change, over the
run, of the held pixels' implied noise (x - source) / sigma; "end" is their largest distance
from the source at the end. Prints a markdown table.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "comfy"))
import tiny_host  # noqa: E402

# Float32 error reaches a few 1e-4 near s = 1 on flow models; real drift is of order 1.
KEEPS_NOISE = 1e-3


def main():
    host = tiny_host.start(os.path.abspath(os.environ["COMFYUI_PATH"]))
    import comfy.samplers
    import nodes
    per_pixel_sampler = nodes.NODE_CLASS_MAPPINGS["PerPixelTimeSampler"]
    per_pixel_model = nodes.NODE_CLASS_MAPPINGS["PerPixelTimeModel"]
    print("| sampler | PerPixelTimeSampler: one noise | drift | end | PerPixelTimeModel: one noise | drift | end |")
    print("|---|---|---|---|---|---|---|")
    for kind in ("eps", "flow"):
        model = host.tiny_model(kind)
        (patched,) = per_pixel_model.execute(model=model, mapping="ngdm").result
        for name in comfy.samplers.SAMPLER_NAMES:
            cells = []
            try:
                (wrapped,) = per_pixel_sampler.execute(sampler=comfy.samplers.sampler_object(name), mapping="ngdm").result
                routes = ((model, wrapped), (patched, comfy.samplers.sampler_object(name)))
            except ValueError:
                cells += ["refused", "", ""]
                routes = ((patched, comfy.samplers.sampler_object(name)),)
            for route_model, route_sampler in routes:
                drift, end = host.held_noise_drift(route_model, route_sampler)
                cells += ["yes" if drift <= KEEPS_NOISE else "no", f"{drift:.1e}", f"{end:.1e}"]
            print(f"| {name} ({kind}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
