"""A headless ComfyUI on CPU with tiny random-weight models, for the real-host tests and benchmarks.

``start(comfyui_path)`` links this pack into a temporary ``custom_nodes/`` so ComfyUI's own
loader imports it, and registers stand-ins for the nodes that need downloaded weights
(checkpoint, CLIP text encoder, VAE, ControlNet, image files). Workflows are converted
from the UI format with ``ui_to_api`` and run through ``PromptExecutor``.
"""

import asyncio
import logging
import os
import sys
import tempfile
import uuid
import zlib

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACK_DIR_NAME = "ngdm-image-editing"
LATENT_SIZE = 8
CAPTURED = {}
LOAD_WARNINGS = []
TINY_MODEL_KIND = {"kind": "eps"}
PACK_INSTALL = {}
NOTE_TYPES = {"Note", "MarkdownNote"}
# Stand-ins for nodes that need downloaded weights or files: UI type -> test node id.
STAND_INS = {
    "CheckpointLoaderSimple": "TinyCheckpoint",
    "CLIPTextEncode": "TinyTextEncode",
    "LoadImage": "TinyImage",
    "VAEEncode": "TinyEncode",
    "VAEDecode": "TinyDecode",
    "ControlNetLoader": "TinyControlNetLoader",
    "CLIPLoader": "TinyCLIPLoader",
    "CLIPVisionLoader": "TinyCLIPVisionLoader",
    "UNETLoader": "TinyUNETLoader",
    "DualCLIPLoader": "TinyDualCLIPLoader",
    "VAELoader": "TinyVAELoader",
    "TextEncodeQwenImageEdit": "TinyTextEncodeQwenImageEdit",
}
# The weight files the templates for today's families load, by the tiny family standing in for each.
DIT_FILES = {
    "flux1-dev.safetensors": "flux_dev", "flux1-dev-kontext_fp8_scaled.safetensors": "flux_dev",
    "ae.safetensors": "flux_dev", "qwen_image_edit_2509_fp8_e4m3fn.safetensors": "qwen_image",
    "qwen_image_vae.safetensors": "qwen_image",
}
# CLIPLoader/DualCLIPLoader types whose text encoders give prompts as wide as the tiny DiTs take.
DIT_TEXT_ENCODER_TYPES = {"flux", "qwen_image", "flux2"}
TINY_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "use_linear_in_transformer": False, "use_temporal_attention": False,
    "use_temporal_resblock": False, "context_dim": 768, "in_channels": 4, "out_channels": 4,
    "model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": [1, 1], "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1,
}
# SD1.5's CLIP text encoder (768 wide, with CLIP's text projection) cut to one layer and a 16-token vocabulary:
# the stand-in text encoder makes the conditioning, this CLIP gives only its text projection.
TINY_CLIP_TEXT_CONFIG = {"num_hidden_layers": 1, "intermediate_size": 64, "vocab_size": 16}
# A CLIP vision model whose image embeds are 768 wide, as ViT-L/14's, on 32x32 images.
TINY_CLIP_VISION_CONFIG = {
    "attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 32, "image_size": 32,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 64, "layer_norm_eps": 1e-05,
    "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3, "num_hidden_layers": 2,
    "patch_size": 8, "projection_dim": 768,
}
# SD's KL VAE layout (4 latent channels, 8x downscale) at 32 channels.
TINY_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                     "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


class _WarningCollector(logging.Handler):
    def emit(self, record):
        if record.levelno >= logging.WARNING:
            LOAD_WARNINGS.append(record.getMessage())


def start(comfyui_path):
    """Import ComfyUI headlessly with this pack installed; returns the ``host`` namespace (module)."""
    # The pack root holds a folder named nodes/, which would shadow ComfyUI's nodes.py.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != PACK_ROOT]
    sys.path.insert(0, comfyui_path)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    base = tempfile.mkdtemp(prefix="ngdm_host_")
    os.makedirs(os.path.join(base, "custom_nodes"))
    PACK_INSTALL["path"] = os.path.join(base, "custom_nodes", PACK_DIR_NAME)
    os.symlink(PACK_ROOT, PACK_INSTALL["path"])
    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.base_directory = base
    import folder_paths  # noqa: F401  (reads base_directory; must come before nodes)
    import utils.install_util  # noqa: F401  (must be imported before nodes moves comfy/ onto sys.path)
    import comfy.utils
    import nodes

    handler = _WarningCollector()
    logging.getLogger().addHandler(handler)
    try:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    finally:
        logging.getLogger().removeHandler(handler)
    for node in _stand_in_nodes():
        nodes.NODE_CLASS_MAPPINGS[node.GET_SCHEMA().node_id] = node
    # Some of ComfyUI's own nodes (GetImageSize) show text on the node through the server.
    import server
    server.PromptServer.instance = NodeTextRecorder()
    comfy.utils.set_progress_bar_enabled(False)
    return sys.modules[__name__]


def pack_module(name=""):
    """The pack's module ``name`` (e.g. ``"nodes.host"``) as ComfyUI's loader imported it."""
    package = PACK_INSTALL["path"].replace(".", "_x_")
    return sys.modules[f"{package}.{name}" if name else package]


def pack_nodes():
    """The node classes ComfyUI's loader registered from this pack, by node id."""
    import nodes
    module = f"custom_nodes.{PACK_DIR_NAME}"
    return {node_id: cls for node_id, cls in nodes.NODE_CLASS_MAPPINGS.items()
            if getattr(cls, "RELATIVE_PYTHON_MODULE", None) == module}


def init_weights(module, seed):
    """ComfyUI's layers skip initialisation; give the tiny models small random weights."""
    import torch
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
            elif parameter.ndim == 1:
                parameter.fill_(1.0)
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def tiny_model(kind="eps", seed=0):
    """A 1.6 M-parameter SD1.5-shaped U-Net: ``eps``, ``v_prediction`` or ``flow`` (CONST, shift 3)."""
    import comfy.model_base
    import comfy.supported_models
    import torch
    config = comfy.supported_models.SD15({**TINY_UNET_CONFIG, "dtype": torch.float32})
    model_type = {"eps": comfy.model_base.ModelType.EPS, "v_prediction": comfy.model_base.ModelType.V_PREDICTION,
                  "flow": comfy.model_base.ModelType.FLOW}[kind]
    if kind == "flow":
        config.sampling_settings = {"shift": 3.0, "multiplier": 1000}
    base = comfy.model_base.BaseModel(config, model_type=model_type)
    init_weights(base.diffusion_model, seed)
    return _patcher(base)


def tiny_sdxl(seed=0):
    """An SDXL-shaped U-Net (2.9 M parameters): 2048-wide cross-attention and the pooled/size embedding, EPS."""
    import comfy.supported_models
    import torch
    config = comfy.supported_models.SDXL({**TINY_UNET_CONFIG, **TINY_SDXL_CHANGES, "dtype": torch.float32})
    # SDXL's own config fixes 64 channels per head, more than the tiny U-Net's 32.
    config.unet_config["num_head_channels"] = 16
    base = config.get_model({})
    init_weights(base.diffusion_model, seed)
    return _patcher(base)


TINY_SDXL_CHANGES = {"context_dim": 2048, "adm_in_channels": 2816, "num_classes": "sequential",
                     "use_linear_in_transformer": True}


def sdxl_conditioning(text):
    """A prompt for the tiny SDXL model: CLIP-L+G's 2048-wide context and G's 1280-wide pooled output."""
    import torch
    generator = _seeded(text)
    return [[torch.randn(1, 77, 2048, generator=generator),
             {"pooled_output": torch.randn(1, 1280, generator=generator)}]]


# Tiny DiTs of today's families, with ComfyUI's own model classes (supported_models) and small dims:
# Flux (16-channel latents, 8x VAE), Flux 2 (128 channels, 16x) and Qwen-Image (16 channels in
# one-frame 5-D latents from Wan 2.1's VAE, 8x). Their prompt embeddings are DIT_CONTEXT wide.
# flux_dev is Flux.1 dev's layout, with the guidance embedding FluxGuidance sets; FLUX.1 Kontext is
# the same network reading reference latents, and Qwen-Image-Edit is Qwen-Image's.
DIT_CONTEXT = 32
TINY_DIT_CONFIGS = {
    "flux": ("Flux", {"image_model": "flux", "guidance_embed": False, "in_channels": 16, "out_channels": 16,
                      "vec_in_dim": DIT_CONTEXT, "context_in_dim": DIT_CONTEXT, "hidden_size": 64, "mlp_ratio": 2.0,
                      "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000,
                      "patch_size": 2, "qkv_bias": True, "txt_ids_dims": []}),
    "flux_dev": ("Flux", {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16,
                          "vec_in_dim": DIT_CONTEXT, "context_in_dim": DIT_CONTEXT, "hidden_size": 64,
                          "mlp_ratio": 2.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
                          "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True,
                          "txt_ids_dims": []}),
    "flux2": ("Flux2", {"image_model": "flux2", "guidance_embed": False, "in_channels": 128, "out_channels": 128,
                        "vec_in_dim": None, "context_in_dim": DIT_CONTEXT, "hidden_size": 64, "mlp_ratio": 3.0,
                        "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [8, 8, 8, 8], "theta": 2000,
                        "patch_size": 1, "qkv_bias": False, "ops_bias": False, "global_modulation": True,
                        "mlp_silu_act": True, "default_ref_method": "index", "ref_index_scale": 10.0,
                        "txt_ids_dims": [3]}),
    # SD3's MMDiT: one block (its width is 64 per block), text and pooled embeddings DIT_CONTEXT wide.
    "sd3": ("SD3", {"in_channels": 16, "out_channels": 16, "pos_embed_scaling_factor": None, "patch_size": 2,
                    "depth": 1, "adm_in_channels": DIT_CONTEXT, "pos_embed_max_size": 32, "num_patches": 1024,
                    "context_embedder_config": {"target": "torch.nn.Linear",
                                                "params": {"in_features": DIT_CONTEXT, "out_features": 64}}}),
    "qwen_image": ("QwenImage", {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": 1,
                                 "attention_head_dim": 32, "num_attention_heads": 2,
                                 "joint_attention_dim": DIT_CONTEXT, "axes_dims_rope": (8, 12, 12),
                                 "patch_size": 2}),
}


def _patcher(base):
    import comfy.model_management
    import comfy.model_patcher
    return comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def tiny_dit(family, seed=0):
    """A tiny random-weight model of a ``TINY_DIT_CONFIGS`` family (0.1-0.3 M parameters), flow-matching as theirs."""
    import comfy.supported_models
    import torch
    name, config = TINY_DIT_CONFIGS[family]
    base = getattr(comfy.supported_models, name)({**config, "dtype": torch.float32}).get_model({})
    init_weights(base.diffusion_model, seed)
    # A checkpoint fills SD3's positional embedding, a buffer ComfyUI 0.33 leaves uninitialised.
    position = getattr(base.diffusion_model, "pos_embed", None)
    if torch.is_tensor(position):
        with torch.no_grad():
            position.copy_(torch.randn(position.shape, generator=_seeded(f"pos_embed {seed}")) * 0.05)
    return _patcher(base)


def dit_conditioning(text, width=DIT_CONTEXT):
    """A prompt for the tiny DiTs: an 8-token embedding and the pooled output Flux reads."""
    import torch
    generator = _seeded(text)
    return [[torch.randn(1, 8, width, generator=generator), {"pooled_output": torch.randn(1, width, generator=generator)}]]


def dit_family(file_name):
    """The tiny family standing in for a template's weight file (see ``DIT_FILES``)."""
    if file_name not in DIT_FILES:
        raise ValueError(f"no tiny stand-in for {file_name!r}: add it to tiny_host.DIT_FILES")
    return DIT_FILES[file_name]


def family_latent_format(family):
    """The latent format (channels, frame axis, scaling) of a tiny DiT family, as its supported_models config has it."""
    import comfy.supported_models
    return getattr(comfy.supported_models, TINY_DIT_CONFIGS[family][0]).latent_format()


def held_pixel_tolerance(latent_format, source, noise_bound=6.0):
    """How far float32 rounding can move a pixel that is held on the source (Lambda = 0) through a host run.

    In real numbers it ends on the source exactly. In float32 it passes process_latent_in, a few
    sampler operations in the processed space on values no larger than the processed source or the
    noise (|z| < ``noise_bound`` for any draw of fewer than 1e8 normal values), and process_latent_out,
    whose gain carries those roundings back. Each rounds by at most half an ulp of the largest value
    it touches; four such roundings bound the total.
    """
    import torch
    eps = torch.finfo(torch.float32).eps
    ones = torch.ones(1, latent_format.latent_channels, *source.shape[2:])
    gain = (latent_format.process_out(ones) - latent_format.process_out(torch.zeros_like(ones))).abs().max().item()
    processed = latent_format.process_in(source).abs().max().item()
    return 4 * eps * (gain * max(processed, noise_bound) + source.abs().max().item())


class DitTextEncoder:
    """Stands in for a DiT family's text encoder: TinyTextEncode gives ``dit_conditioning`` for it."""


class LatentOnlyVAE:
    """Stands in for a DiT family's VAE where only its latent layout matters (the encode and decode are stand-ins).

    ``latent_channels`` and ``latent_dim`` (3 for one-frame 5-D latents) as comfy.sd.VAE names them.
    """

    def __init__(self, family):
        latent_format = family_latent_format(family)
        self.latent_channels = latent_format.latent_channels
        self.latent_dim = latent_format.latent_dimensions


def stand_in_encode(pixels, vae, name="source latent"):
    """The stand-in VAE encode: a seeded random latent in ``vae``'s layout, LATENT_SIZE square."""
    import torch
    frames = (1,) if vae.latent_dim == 3 else ()
    return torch.randn(pixels.shape[0], vae.latent_channels, *frames, LATENT_SIZE, LATENT_SIZE,
                       generator=_seeded(name))


def node(node_id, **inputs):
    """Run the registered node ``node_id`` on ``inputs`` and return its outputs."""
    import nodes
    return nodes.NODE_CLASS_MAPPINGS[node_id].execute(**inputs).result


def schedule(model, steps=6):
    """ComfyUI's "simple" schedule of ``steps`` steps for ``model``."""
    import comfy.samplers
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps).cpu()


def half_lambda(samples):
    """Lambda 0 on the left half and 1 on the right, in the latent's shape with one channel."""
    import torch
    weights = torch.zeros(samples.shape[0], 1, *samples.shape[2:])
    weights[..., samples.shape[-1] // 2:] = 1.0
    return weights


def tiny_latent(model, batch=1, size=LATENT_SIZE, seed=0):
    """A random source latent in ``model``'s shape: one-frame 5-D for 3-D latent formats, else 4-D."""
    import torch
    latent_format = model.model.latent_format
    frames = (1,) if latent_format.latent_dimensions == 3 else ()
    return torch.randn(batch, latent_format.latent_channels, *frames, size, size, generator=_seeded(f"latent {seed}"))


def tiny_controlnet(seed=1):
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management
    import comfy.ops
    import torch
    config = {key: value for key, value in TINY_UNET_CONFIG.items() if key != "out_channels"}
    control_model = comfy.cldm.cldm.ControlNet(**config, hint_channels=3, num_heads=8, dtype=torch.float32,
                                               operations=comfy.ops.disable_weight_init)
    init_weights(control_model, seed)
    # Real ControlNets start with zero convolutions; nonzero ones make the effect measurable here.
    return comfy.controlnet.ControlNet(control_model, load_device=comfy.model_management.get_torch_device())


def tiny_clip(seed=2):
    """A CLIP object shaped as SD1.5's text encoder (see ``TINY_CLIP_TEXT_CONFIG``), random weights."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target, model_options={"clip_l_model_config": TINY_CLIP_TEXT_CONFIG})
    init_weights(clip.cond_stage_model, seed)
    return clip


def tiny_clip_vision(projection_dim=768, seed=3):
    """ComfyUI's CLIP vision model (``comfy.clip_vision.ClipVisionModel``) with a tiny config, random weights."""
    import json
    import comfy.clip_vision
    config = os.path.join(tempfile.mkdtemp(prefix="ngdm_clip_vision_"), "config.json")
    with open(config, "w") as f:
        json.dump({**TINY_CLIP_VISION_CONFIG, "projection_dim": projection_dim}, f)
    clip_vision = comfy.clip_vision.ClipVisionModel(config)
    init_weights(clip_vision.model, seed)
    return clip_vision


def tiny_vae(seed=4):
    """ComfyUI's VAE object around a KL autoencoder in SD's layout at 32 channels, random weights."""
    import comfy.sd
    vae = comfy.sd.VAE(sd={}, config={"params": {"embed_dim": 4, "ddconfig": TINY_VAE_DDCONFIG}})
    init_weights(vae.first_stage_model, seed)
    return vae


def _seeded(text):
    import torch
    return torch.Generator().manual_seed(zlib.crc32(str(text).encode()))


def _stand_in_nodes():
    import torch
    from comfy_api.latest import io

    models = {}
    encoders = {}

    def cached(key, make):
        if key not in encoders:
            encoders[key] = make()
        return encoders[key]

    class TinyCheckpoint(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="TinyCheckpoint", inputs=[io.String.Input("ckpt_name")],
                             outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()])

        @classmethod
        def execute(cls, ckpt_name):
            kind = TINY_MODEL_KIND["kind"]
            if kind not in models:
                models[kind] = tiny_model(kind)
            return io.NodeOutput(models[kind], cached("clip", tiny_clip), cached("vae", tiny_vae))

    class TinyTextEncode(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="TinyTextEncode", inputs=[io.Clip.Input("clip"), io.String.Input("text")],
                             outputs=[io.Conditioning.Output()])

        @classmethod
        def execute(cls, clip, text):
            encode = dit_conditioning if isinstance(clip, DitTextEncoder) else tiny_conditioning
            return io.NodeOutput(encode(text))

    class TinyImage(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="TinyImage", inputs=[io.String.Input("image")],
                             outputs=[io.Image.Output(), io.Mask.Output()])

        @classmethod
        def execute(cls, image):
            size = 8 * LATENT_SIZE
            # Its painted mask is the top-left quarter, as a user would mark a region to edit.
            mask = torch.zeros(1, size, size)
            mask[:, :size // 2, :size // 2] = 1.0
            return io.NodeOutput(torch.rand(1, size, size, 3, generator=_seeded(image)), mask)

    class TinyEncode(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="TinyEncode", inputs=[io.Image.Input("pixels"), io.Vae.Input("vae")],
                             outputs=[io.Latent.Output()])

        @classmethod
        def execute(cls, pixels, vae):
            samples = stand_in_encode(pixels, vae)
            CAPTURED["source"] = samples.clone()
            return io.NodeOutput({"samples": samples})

    class TinyDecode(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="TinyDecode", inputs=[io.Latent.Input("samples"), io.Vae.Input("vae")],
                             outputs=[io.Image.Output()], hidden=[io.Hidden.unique_id])

        @classmethod
        def execute(cls, samples, vae):
            CAPTURED["output"] = {key: value.clone() for key, value in samples.items() if torch.is_tensor(value)}
            # Per decode node too, for workflows with several branches.
            CAPTURED["decoded"][cls.hidden.unique_id] = CAPTURED["output"]
            batch, height, width = samples["samples"].shape[0], *samples["samples"].shape[-2:]
            return io.NodeOutput(torch.zeros(batch, 8 * height, 8 * width, 3))

    class TinyControlNetLoader(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="TinyControlNetLoader", inputs=[io.String.Input("control_net_name")],
                             outputs=[io.ControlNet.Output()])

        @classmethod
        def execute(cls, control_net_name):
            return io.NodeOutput(tiny_controlnet())

    class TinyCLIPLoader(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="TinyCLIPLoader", inputs=[io.String.Input("clip_name"), io.String.Input("type"),
                                                               io.String.Input("device", optional=True)],
                             outputs=[io.Clip.Output()])

        @classmethod
        def execute(cls, clip_name, type, device="default"):
            return io.NodeOutput(DitTextEncoder() if type in DIT_TEXT_ENCODER_TYPES else cached("clip", tiny_clip))

    class TinyCLIPVisionLoader(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="TinyCLIPVisionLoader", inputs=[io.String.Input("clip_name")],
                             outputs=[io.ClipVision.Output()])

        @classmethod
        def execute(cls, clip_name):
            return io.NodeOutput(cached("clip_vision", tiny_clip_vision))

    class TinyUNETLoader(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="TinyUNETLoader", inputs=[io.String.Input("unet_name"),
                                                               io.String.Input("weight_dtype")],
                             outputs=[io.Model.Output()])

        @classmethod
        def execute(cls, unet_name, weight_dtype):
            family = dit_family(unet_name)
            if family not in models:
                models[family] = tiny_dit(family)
            return io.NodeOutput(models[family])

    class TinyDualCLIPLoader(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="TinyDualCLIPLoader",
                             inputs=[io.String.Input("clip_name1"), io.String.Input("clip_name2"),
                                     io.String.Input("type"), io.String.Input("device", optional=True)],
                             outputs=[io.Clip.Output()])

        @classmethod
        def execute(cls, clip_name1, clip_name2, type, device="default"):
            if type not in DIT_TEXT_ENCODER_TYPES:
                raise ValueError(f"no tiny stand-in for DualCLIPLoader type {type!r}")
            return io.NodeOutput(DitTextEncoder())

    class TinyVAELoader(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="TinyVAELoader", inputs=[io.String.Input("vae_name")], outputs=[io.Vae.Output()])

        @classmethod
        def execute(cls, vae_name):
            return io.NodeOutput(LatentOnlyVAE(dit_family(vae_name)))

    class TinyTextEncodeQwenImageEdit(io.ComfyNode):
        """TextEncodeQwenImageEdit's inputs and output: the prompt, plus the image's latent as a reference latent."""

        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="TinyTextEncodeQwenImageEdit",
                             inputs=[io.Clip.Input("clip"), io.String.Input("prompt"),
                                     io.Vae.Input("vae", optional=True), io.Image.Input("image", optional=True)],
                             outputs=[io.Conditioning.Output()])

        @classmethod
        def execute(cls, clip, prompt, vae=None, image=None):
            (embedding, options), = dit_conditioning(prompt)
            if vae is not None and image is not None:
                # The same latent the stand-in VAEEncode gives for the image.
                options = {**options, "reference_latents": [stand_in_encode(image, vae)]}
            return io.NodeOutput([[embedding, options]])

    return [TinyCheckpoint, TinyTextEncode, TinyImage, TinyEncode, TinyDecode, TinyControlNetLoader, TinyCLIPLoader,
            TinyCLIPVisionLoader, TinyUNETLoader, TinyDualCLIPLoader, TinyVAELoader, TinyTextEncodeQwenImageEdit]


def _widget_inputs(class_type):
    """Names of the inputs that are widgets, in order, and whether each adds a control_after_generate value."""
    import nodes
    definition = nodes.NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()
    widgets = []
    for section in ("required", "optional"):
        for name, spec in definition.get(section, {}).items():
            kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                widgets.append((name, bool(options.get("control_after_generate")) or bool(options.get("image_upload"))))
    return widgets


def load_workflow(name, steps, stand_ins=STAND_INS):
    """An example workflow as an API prompt; every ``steps`` widget is set to ``steps`` to keep CPU runs short.

    ``stand_ins`` replaces node types (the shapes templates need none: their model ships with the pack).
    """
    import json
    with open(os.path.join(PACK_ROOT, "example_workflows", f"{name}.json")) as f:
        prompt = ui_to_api(json.load(f), stand_ins)
    if steps is None:
        return prompt
    for node in prompt.values():
        if "steps" in node["inputs"]:
            node["inputs"]["steps"] = steps
    return prompt


def node_of(prompt, class_type):
    """The first node of ``class_type`` in an API prompt."""
    return next(node for node in prompt.values() if node["class_type"] == class_type)


def check_kept_where_lambda_is_zero(captured, tolerance):
    """The output latent equals the source where Lambda is 0 and moves where it is 1 (both must exist)."""
    source, output = captured["source"], captured["output"]
    weights = output["noise_mask"].expand_as(source)
    assert (weights == 0).any() and (weights == 1).any()
    assert (output["samples"] - source)[weights == 0].abs().max().item() <= tolerance
    assert (output["samples"] - source)[weights == 1].abs().mean().item() > 1e-2


def progress_updates_and_cancel(run):
    """Run ``run()`` recording ComfyUI progress updates, then again cancelling at its first update.

    Checks what a user sees, not the host's update cadence (0.33 throttles updates): the bar never moves
    back, keeps one total and ends full; and once cancel is pressed the node stops within a step, so
    no further update arrives and the run raises ComfyUI's interrupt. Returns the first run's total.
    """
    import comfy.model_management
    import comfy.utils
    updates = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: updates.append((value, total)))
    try:
        run()
        values, totals = zip(*updates)
        assert list(values) == sorted(values), f"progress went back: {updates}"
        assert len(set(totals)) == 1 and values[-1] == totals[0], f"progress did not end full: {updates}"
        after_cancel = []

        def cancel_at_first_update(value, total, preview, node_id=None):
            if comfy.model_management.processing_interrupted():
                after_cancel.append((value, total))
            comfy.model_management.interrupt_current_processing(True)

        comfy.utils.set_progress_bar_global_hook(cancel_at_first_update)
        try:
            run()
        except comfy.model_management.InterruptProcessingException:
            assert not after_cancel, f"the node went on after cancel: {after_cancel}"
            return totals[0]
        raise AssertionError("the run did not stop on cancel")
    finally:
        comfy.model_management.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(None)


_MISSING = object()


def ui_to_api(workflow, stand_ins=STAND_INS):
    """Convert a UI-format workflow to an API prompt, with the weight-free ``stand_ins`` swapped in."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in NOTE_TYPES:
            continue
        class_type = stand_ins.get(node["type"], node["type"])
        inputs = {}
        values = iter(node.get("widgets_values", []))
        for name, has_extra_value in _widget_inputs(class_type):
            # A workflow saved before a node gained widgets lacks their values; the UI leaves them at default.
            value = next(values, _MISSING)
            if value is _MISSING:
                break
            inputs[name] = value
            if has_extra_value:
                next(values)
        for socket in node.get("inputs", []):
            if socket.get("link") is not None:
                _, source_id, source_slot, *_ = links[socket["link"]]
                inputs[socket["name"]] = [str(source_id), source_slot]
        prompt[str(node["id"])] = {"class_type": class_type, "inputs": inputs}
    return prompt


class NodeTextRecorder:
    """Stands in for the PromptServer that shows nodes' text in the frontend; keeps ``(node_id, text)``."""

    def __init__(self):
        self.texts = []

    def send_progress_text(self, text, node_id, sid=None):
        self.texts.append((node_id, text))


class _StubServer:
    client_id = None
    last_node_id = None
    last_prompt_id = None

    def __init__(self):
        self.sockets_metadata = {}
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


def new_executor():
    """A ``PromptExecutor`` with ComfyUI's classic cache, as ``main.py --cache-classic`` builds it.

    ``main.py`` passes every cache size it knows in ``cache_args`` and the executor indexes the dict directly
    (0.33 added ``ram_inactive``). Sizes this host does not know read as 0, which the classic cache never
    consults, so the same call serves every version.
    """
    import collections
    import execution
    return execution.PromptExecutor(_StubServer(), cache_type=execution.CacheType.CLASSIC,
                                    cache_args=collections.defaultdict(float))


def run_prompt(prompt):
    """Validate and execute ``prompt`` in a fresh executor; raises with the host's error if it fails."""
    import execution
    CAPTURED.pop("output", None)
    CAPTURED["decoded"] = {}
    prompt_id = str(uuid.uuid4())
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid:
        raise RuntimeError(f"invalid prompt: {error} {node_errors}")
    executor = new_executor()
    executor.execute(prompt, prompt_id, {}, outputs)
    if not executor.success:
        errors = [data for event, data in executor.status_messages if event == "execution_error"]
        raise RuntimeError(f"execution failed: {errors}")
    # What each node showed on itself (its ui output), as the prompt's history gives it to the UI.
    CAPTURED["ui"] = executor.history_result["outputs"]
    return CAPTURED


def tiny_conditioning(text):
    """A stand-in for CLIPTextEncode's output: cross-attention context and SD1.5's unprojected pooled output."""
    import torch
    generator = _seeded(text)
    context = torch.randn(1, 77, 768, generator=generator)
    return [[context, {"pooled_output": torch.randn(1, 768, generator=generator)}]]


def sample_with_weights(model, sampler, weights, steps=8, cfg=2.0, seed=0, size=LATENT_SIZE):
    """Sample a fixed random source under ``weights`` (Lambda); returns source, noise, sigmas, states and output.

    ``states`` holds the sampler's own state ``x`` at every step, as its callback reports it,
    all in the model's processed latent space.
    """
    import comfy.sample
    import comfy.samplers
    import torch
    generator = _seeded(f"sample {seed}")
    source = torch.randn(1, 4, size, size, generator=generator)
    noise = torch.randn(source.shape, generator=generator)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps).cpu()
    states = []
    output = comfy.sample.sample_custom(
        model, noise, cfg, sampler, sigmas, tiny_conditioning("target"), tiny_conditioning("negative"), source,
        noise_mask=weights, callback=lambda step, denoised, x, total: states.append(x.detach().cpu().clone()),
        disable_pbar=True, seed=seed)
    return source, noise, sigmas, states, output


def held_noise_drift(model, sampler, steps=8):
    """How far pixels that never start drift from one fixed noise, and how far they end from the source.

    Lambda is 0 on the left half and 1 on the right. At every step the held pixels' implied
    noise ``(x - noise_scaling(sigma, 0, source)) / sigma`` is compared with the first step's.
    """
    import torch
    weights = torch.zeros(1, 1, LATENT_SIZE, LATENT_SIZE)
    weights[..., LATENT_SIZE // 2:] = 1.0
    source, _, sigmas, states, output = sample_with_weights(model, sampler, weights, steps)
    model_sampling = model.get_model_object("model_sampling")
    processed = model.model.process_latent_in(source)
    held = (weights == 0).expand_as(source)
    implied = [((x - model_sampling.noise_scaling(sigma, torch.zeros_like(x), processed)) / sigma)[held]
               for x, sigma in zip(states, sigmas)]
    drift = max((z - implied[0]).abs().max().item() for z in implied)
    return drift, (output - source)[held].abs().max().item()


def count_model_calls(model):
    """A clone of ``model`` that appends the batch size of every U-Net call to the returned list."""
    import comfy.patcher_extension
    batch_sizes = []

    def count(executor, x, *args, **kwargs):
        batch_sizes.append(x.shape[0])
        return executor(x, *args, **kwargs)

    counted = model.clone()
    counted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "count_model_calls", count)
    return counted, batch_sizes
