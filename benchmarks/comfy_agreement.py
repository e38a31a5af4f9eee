"""Agreement of ngdm_core and ComfyUI graphs on the shapes model, per method, over held-out sources.

    COMFYUI_PATH=<ComfyUI> flock /tmp/cpu-heavy.lock python benchmarks/comfy_agreement.py [--count 20]

Each held-out source N (data seed 1) is edited into the class ``other_class`` gives it, as the shapes
templates do (20 Euler steps, CFG 3, NGDM map a=20 b=10 read at half the schedule, denoise 0.7,
edit-friendly skip 0.2, change map of two averaged 10-step edits graded by softness 0.2), once as the
template's ComfyUI graph through the executor, once in ``ngdm_core`` with ``ShapesDenoiser``, and once in the core with ComfyUI's timestep
rule (``tests/comfy/shapes_agreement.py`` says why). Figures are max absolute differences in image
units ([0, 1]), the largest over the sources. Writes ``benchmarks/results/comfy_agreement.md``.
"""

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "comfy"))
import tiny_host  # noqa: E402

COLUMNS = (("edit_vs_rule", "edit: ComfyUI vs core with ComfyUI's timestep"),
           ("edit_vs_core", "edit: ComfyUI vs core"), ("core_vs_rule", "edit: core vs core with ComfyUI's timestep"),
           ("map_vs_rule", "map: ComfyUI vs core with ComfyUI's timestep"), ("map_vs_core", "map: ComfyUI vs core"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20, help="held-out sources 0 .. count - 1")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "comfy_agreement.md"))
    args = parser.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    host = tiny_host.start(os.path.abspath(os.environ["COMFYUI_PATH"]))
    import shapes_agreement
    import shapes_templates
    shapes_templates.register_capture()
    began = time.perf_counter()
    rows = shapes_agreement.agreement(host, range(args.count))
    seconds = time.perf_counter() - began
    lines = [f"{args.count} held-out sources (data seed 1), each edited into another class with the shapes templates' "
             f"settings; `python benchmarks/comfy_agreement.py --count {args.count}`, {seconds:.0f} s. Largest max "
             f"absolute difference over the sources, image units [0, 1]; the float tolerance is "
             f"{shapes_agreement.FLOAT_TOLERANCE:g}.", "",
             "| method | " + " | ".join(title for _, title in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for method in shapes_agreement.METHODS:
        mine = [row for row in rows if row["method"] == method]
        cells = [f"{max(row[key] for row in mine):.2e}" if key in mine[0] else "-" for key, _ in COLUMNS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
