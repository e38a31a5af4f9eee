"""Time and peak memory of the pack's nodes on full-size random-weight models, as ratios to ComfyUI's KSampler step.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/scale_benchmark.py --models sd15 --image 256   # CPU, reduced
    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/scale_benchmark.py --dtype fp16                # GPU, as given

Models are built with ComfyUI's own classes (``comfy.supported_models``) and the configs of the
real checkpoints, with random weights (the same compute; nothing is downloaded):
``sd15`` (SD1.5's U-Net, 860 M), ``sdxl`` (SDXL's U-Net, 2.6 B), ``flux`` (Flux dev's DiT at full
width, 3072 wide and 24 heads, cut to ``--flux-blocks`` double and as many single blocks, 19 and 38
in the real one) and ``template`` (SD1.5's layout at width 64, 37.5 M, for the region template's run).

Each (model, node) runs in a child process of its own, so that the peak it reports is its own:
``torch.cuda.max_memory_allocated`` on a GPU, the process's peak RSS on a CPU. ``above_model``
is the peak less the memory held once the model is built. Times are per sampling step for the
sampling nodes, else for the node's whole run at the sizes given (``--steps``, ``--iterations``).
Every figure is also given as a ratio to the KSampler step (euler, CFG) on the same model in the
same run. ``--budget-gb`` makes ComfyUI report that much free memory, as on a smaller card: the
nodes size their chunks from it (so does ComfyUI's own sub-quadratic attention on a CPU).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "comfy"))
import tiny_host  # noqa: E402

SD15 = {"model_channels": 320, "channel_mult": [1, 2, 4, 4], "num_res_blocks": [2, 2, 2, 2], "num_heads": 8,
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "transformer_depth_middle": 1}
SDXL = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
        "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
        "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
        "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
        "use_temporal_resblock": False}
FLUX = {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16, "vec_in_dim": 768,
        "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "axes_dim": [16, 56, 56],
        "theta": 10000, "patch_size": 2, "qkv_bias": True, "txt_ids_dims": []}
U_NETS = ("sd15", "sdxl", "template")
NODES = ("ksampler", "per_pixel", "weight_map", "region", "rectifier_train")
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def build(host, name, dtype, flux_blocks):
    import comfy.model_base
    import comfy.supported_models
    if name == "flux":
        base = comfy.supported_models.FluxSchnell({**FLUX, "depth": flux_blocks, "depth_single_blocks": flux_blocks,
                                                   "dtype": dtype}).get_model({})
    elif name == "sdxl":
        base = comfy.supported_models.SDXL({**SDXL, "dtype": dtype}).get_model({})
    else:
        sizes = {**SD15, "model_channels": 64} if name == "template" else SD15
        config = comfy.supported_models.SD15({**host.TINY_UNET_CONFIG, **sizes, "dtype": dtype})
        base = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS)
    host.init_weights(base.diffusion_model, 0)
    return host._patcher(base)


def conditioning(name, text):
    """A random prompt embedding shaped as the model's text encoder makes it: CLIP-L, CLIP-L+G or T5, with pooled."""
    import torch
    generator = torch.Generator().manual_seed(sum(map(ord, text)))
    width, pooled, tokens = {"sdxl": (2048, 1280, 77), "flux": (4096, 768, 256)}.get(name, (768, 768, 77))
    options = {"pooled_output": torch.randn(1, pooled, generator=generator)}
    if name == "sdxl":
        options.update(width=1024, height=1024, crop_w=0, crop_h=0, target_width=1024, target_height=1024)
    return [[torch.randn(1, tokens, width, generator=generator), options]]


def peak_bytes(device):
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def step_times(run):
    """Seconds per step of ``run(tick)``, the last step's (after the first one's warm-up).

    ``tick`` is called at each step: by ComfyUI's progress hook, or by ``run`` as a sampler callback.
    """
    import comfy.utils
    stamps = []

    def tick(*_):
        stamps.append(time.perf_counter())
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: tick())
    try:
        run(tick)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    return stamps[-1] - stamps[-2]


def recorded_results(module_name, function_name="items_per_call"):
    """What the node module ``module_name``'s function returns from here on (by default the items per call), a list."""
    module = tiny_host.pack_module(module_name)
    function, returned = getattr(module, function_name), []
    setattr(module, function_name, lambda *args, **kwargs: returned.append(function(*args, **kwargs)) or returned[-1])
    return returned


def watch_rss(limit_gb):
    """End this process, saying so, once its resident memory passes ``limit_gb`` (a shared machine's guard)."""
    def watch():
        while True:
            with open("/proc/self/statm") as f:
                resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            if resident > limit_gb * 2**30:
                print(f"RSS passed {limit_gb} GiB: stopped", flush=True)
                os._exit(3)
            time.sleep(0.05)
    threading.Thread(target=watch, daemon=True).start()


def child(args):
    if args.rss_limit_gb:
        watch_rss(args.rss_limit_gb)
    host = tiny_host.start(os.path.abspath(os.environ["COMFYUI_PATH"]))
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import comfy.utils
    import nodes
    import torch
    comfy.utils.set_progress_bar_enabled(True)
    if args.budget_gb:
        budget = args.budget_gb * 2**30
        comfy.model_management.get_free_memory = lambda device=None, torch_free_too=False: (
            (budget, budget) if torch_free_too else budget)
    dtype = getattr(torch, DTYPES[args.dtype])
    pack = tiny_host.pack_nodes()
    report = {}
    with torch.inference_mode():
        model = build(host, args.models[0], dtype, args.flux_blocks)
        comfy.model_management.load_models_gpu([model])
        device = model.load_device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        report["model_bytes"] = peak_bytes(device)
        name, node = args.models[0], args.nodes[0]
        latent_format = model.model.latent_format
        size = args.image // 8
        samples = torch.randn(1, latent_format.latent_channels, size, size, generator=torch.Generator().manual_seed(0))
        positive, negative = conditioning(name, "source"), conditioning(name, "negative")
        mask = torch.zeros(1, args.image, args.image)
        mask[:, args.image // 4:3 * args.image // 4, args.image // 4:3 * args.image // 4] = 1.0
        weights = torch.nn.functional.interpolate(mask[None], size=(size, size), mode="area")
        start = time.perf_counter()
        if node == "ksampler":
            report["seconds"] = step_times(lambda tick: nodes.common_ksampler(
                model, 0, args.steps, 5.0, "euler", "normal", positive, negative, {"samples": samples}))
        elif node == "per_pixel":
            # Both per-pixel nodes and the bare sampler they wrap, on the same latent and its noise_mask, in turn.
            noise = comfy.sample.prepare_noise(samples, 0)
            sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", args.steps)
            euler = comfy.samplers.sampler_object("euler")
            (per_pixel_sampler,) = pack["PerPixelTimeSampler"].execute(sampler=euler, mapping="ngdm").result
            (per_pixel_model,) = pack["PerPixelTimeModel"].execute(model=model, mapping="ngdm").result
            runs = {"bare": (model, euler), "sampler": (model, per_pixel_sampler), "model": (per_pixel_model, euler)}
            times = {label: [] for label in runs}
            for _ in range(args.repeats):
                for label, (patched, sampler) in runs.items():
                    times[label].append(step_times(lambda tick: comfy.sample.sample_custom(
                        patched, noise, 5.0, sampler, sigmas, positive, negative, samples, noise_mask=weights,
                        callback=tick, disable_pbar=True)))
            report.update({f"seconds_{label}": min(values) for label, values in times.items()})
            report["seconds"] = report["seconds_bare"]
        elif node == "weight_map":
            chosen = recorded_results("nodes.ngdm")
            pack["NGDMWeightMap"].execute(model=model, latent={"samples": samples}, source_conditioning=positive,
                                          target_conditioning=conditioning(name, "target"), negative=negative, seed=0,
                                          num_maps=args.num_maps, encode_strength=0.5, cfg=7.5, smoothing=1.0, a=10.0,
                                          b=5.0, mode="ngdm")
            report["seconds"] = time.perf_counter() - start
            report["seeds_per_call"] = chosen[0]
        elif node == "region":
            chosen = recorded_results("nodes.region_jacobian")
            estimates = recorded_results("nodes.region_jacobian", "jacobian_memory")
            pack["RegionJacobianDirection"].execute(model=model, latent={"samples": samples}, positive=positive,
                                                    mask=mask, probe_percent=0.5, k=3, r=1,
                                                    iterations=args.iterations, seed=0, add_noise=True)
            report["seconds"] = time.perf_counter() - start
            report["vectors_per_call"] = chosen[0]
            report["estimated_gib_per_vector"], report["estimated_graph_gib"] = (
                round(value / 2**30, 2) for value in estimates[0])
        elif node == "rectifier_train":
            made = recorded_results("nodes.rectifier", "trainable_unet")
            output = pack["RectifierTrain"].execute(model=model, latent={"samples": samples}, positive=positive,
                                                    steps=args.steps, learning_rate=1e-3, seed=0,
                                                    filename_prefix="scale", batch_size=1)
            report["seconds"] = (time.perf_counter() - start) / args.steps
            # What the node holds besides the model: its copy of U-Net weights, and the rectifier (AdamW adds twice
            # its size in moments, and its gradients once more); the whole gradient path is what it copied before.
            originals = dict(model.model.diffusion_model.named_parameters())
            copied = [tensor for name, tensor in made[0][0].diffusion_model.named_parameters()
                      if tensor.data_ptr() != originals[name].data_ptr()]
            gradient_path = [tensor for name, tensor in originals.items()
                             if name.startswith(tiny_host.pack_module("nodes.rectifier").GRADIENT_PATH)]
            for label, tensors in (("copied", copied), ("gradient_path", gradient_path),
                                   ("rectifier", list(output.result[0].parameters()))):
                report[f"{label}_gib"] = round(sum(t.numel() * t.element_size() for t in tensors) / 2**30, 2)
        report["peak_bytes"] = peak_bytes(device)
    print("RESULT " + json.dumps(report), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["sd15", "sdxl", "flux"], choices=[*U_NETS, "flux"])
    parser.add_argument("--nodes", nargs="+", default=list(NODES), choices=NODES)
    parser.add_argument("--image", type=int, default=1024, help="image side in pixels (latent side is 1/8)")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--steps", type=int, default=3, help="sampling steps (per-step times are the last step's)")
    parser.add_argument("--repeats", type=int, default=3, help="per-pixel: runs of each, the fastest step kept")
    parser.add_argument("--iterations", type=int, default=2, help="region search iterations")
    parser.add_argument("--num-maps", type=int, default=10, help="NGDMWeightMap's num_maps")
    parser.add_argument("--flux-blocks", type=int, default=2, help="double and single blocks of the Flux DiT")
    parser.add_argument("--budget-gb", type=float, default=None, help="free memory ComfyUI is told it has")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rss-limit-gb", type=float, default=None, help="CPU: stop a node's run past this RSS")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    forwarded = [f"--image={args.image}", f"--dtype={args.dtype}", f"--steps={args.steps}",
                 f"--repeats={args.repeats}", f"--iterations={args.iterations}", f"--num-maps={args.num_maps}",
                 f"--flux-blocks={args.flux_blocks}"]
    forwarded += [f"--budget-gb={args.budget_gb}"] if args.budget_gb else []
    forwarded += [f"--threads={args.threads}"] if args.threads else []
    forwarded += [f"--rss-limit-gb={args.rss_limit_gb}"] if args.rss_limit_gb else []
    print(f"image {args.image}x{args.image}, {args.dtype}, steps {args.steps}, region iterations {args.iterations}, "
          f"num_maps {args.num_maps}, budget {args.budget_gb or 'real'} GB", flush=True)
    for name in args.models:
        results = {}
        for node in ["ksampler", *[node for node in args.nodes if node != "ksampler"]]:
            if node in ("region", "rectifier_train") and name not in U_NETS:
                continue
            run = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--models", name, "--nodes",
                                  node, *forwarded], capture_output=True, text=True)
            lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
            if run.returncode or not lines:
                print(f"{name} {node}: FAILED (exit {run.returncode})\n{run.stderr[-2000:]}", flush=True)
                continue
            results[node] = result = json.loads(lines[-1][len("RESULT "):])
            base = results.get("ksampler")
            extra = {key: value for key, value in result.items() if key not in ("seconds", "peak_bytes", "model_bytes")}
            above = result["peak_bytes"] - result["model_bytes"]
            line = (f"{name:8} {node:15} {result['seconds']:8.2f} s  peak {result['peak_bytes'] / 2**30:6.2f} GiB "
                    f"({above / 2**30:5.2f} above the model)")
            if base:
                base_above = base["peak_bytes"] - base["model_bytes"]
                line += (f"  x KSampler step: time {result['seconds'] / base['seconds']:6.2f}, peak "
                         f"{result['peak_bytes'] / base['peak_bytes']:4.2f}, above model "
                         f"{above / max(base_above, 1):5.2f}")
            print(line + (f"  {extra}" if extra else ""), flush=True)


if __name__ == "__main__":
    main()
