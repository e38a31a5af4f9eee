"""The pack's shapes model as a real ComfyUI MODEL, with its pixel VAE, class conditioning and data-set sources.

The only node module that knows the shapes model. ``ShapesUNet`` (``ngdm_core.shapes.model``) loads,
with no retraining, into :class:`ShapesUNetModel`, a small subclass of ComfyUI's own ``UNetModel``:

- its GroupNorms have 8 groups (ComfyUI's have 32);
- its sinusoidal time embedding is 64 wide (``model_channels`` is set to 64 after construction, since
  ``_forward`` reads it for that width; the config, which FreeU and the like read, still says 32);
- its ResBlocks add ``Linear(emb)`` with no SiLU before it;
- the class enters as a one-hot ``y`` through ``label_emb = Linear(4, 128, bias=False)``.

ComfyUI's U-Net has one more output block per level than ``ShapesUNet``, and a conv after each
upsampling, which ``ShapesUNet`` has not: those blocks keep the first channels of their input (what a
1x1 skip ``[I | 0]`` with a zero residual would compute) and the upsamplings have no conv, so the eps
is ``ShapesUNet``'s exactly and costs what ``ShapesUNet``'s does (with the weights that compute
nothing, a forward took 1.6 times as long). The x0 clamp to [-1, 1] of ``ShapesDenoiser`` lives in
:meth:`ShapesBaseModel._apply_model`, on each conditioning branch before CFG, as the core's is; the
model sampling stays ComfyUI's stock discrete EPS one.
"""

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models_base
import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock, UNetModel, Upsample
from comfy_api.latest import io
from safetensors import SafetensorError

from ..ngdm_core.shapes.catalog import BENCHMARK_SEED, CLASSES, HELD_OUT_SEED, IMAGE_SIZE, TRAINING_SEED
from ..ngdm_core.shapes.data import render
from ..ngdm_core.shapes.model import NULL_CLASS, UNET_FILE, ShapesUNet, load_model
from .host import CATEGORY

UNCONDITIONAL = "unconditional"
CLASS_NAMES = (*CLASSES, UNCONDITIONAL)
SETS = {"held_out": HELD_OUT_SEED, "training": TRAINING_SEED, "benchmark": BENCHMARK_SEED}
# UNetModel's config for the shapes model; model_channels is the config's 32, the time embedding 64 wide.
UNET_CONFIG = {
    "image_size": IMAGE_SIZE, "in_channels": 3, "out_channels": 3, "model_channels": 32, "num_res_blocks": 1,
    "channel_mult": [1, 2, 2], "transformer_depth": [0, 0, 0], "transformer_depth_output": [0] * 6,
    "transformer_depth_middle": -1, "num_classes": "sequential", "adm_in_channels": NULL_CLASS + 1,
    "use_spatial_transformer": False, "num_head_channels": 32, "dtype": torch.float32,
}
TIME_DIM = 64
GROUPS = 8
# ShapesUNet's modules -> UNetModel's. Output blocks 1, 3 and 5 are ComfyUI's extra, pass-through ones.
BLOCKS = {"input": "input_blocks.0.0", "down.0": "input_blocks.1.0", "downsample.0": "input_blocks.2.0.op",
          "down.1": "input_blocks.3.0", "downsample.1": "input_blocks.4.0.op", "down.2": "input_blocks.5.0",
          "middle": "middle_block.0", "up.0": "output_blocks.0.0", "up.1": "output_blocks.2.0",
          "up.2": "output_blocks.4.0", "output.0": "out.0", "output.2": "out.2", "time_mlp.0": "time_embed.0",
          "time_mlp.2": "time_embed.2"}
RESBLOCK_LAYERS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "embedding": "emb_layers.1",
                   "norm2": "out_layers.0", "conv2": "out_layers.3", "skip": "skip_connection"}
PASS_THROUGH_BLOCKS = (1, 3, 5)


def _eight_group_operations(operations):
    """``operations`` with a GroupNorm of 8 groups whatever count ComfyUI's U-Net asks for."""
    class GroupNorm(operations.GroupNorm):
        def __init__(self, num_groups, *args, **kwargs):
            super().__init__(GROUPS, *args, **kwargs)

    return type("ShapesOperations", (operations,), {"GroupNorm": GroupNorm})


class FirstChannels(torch.nn.Module):
    """Stands in for a pass-through output block: the first ``channels`` of its input (h, before the skip)."""

    def __init__(self, channels):
        super().__init__()
        self.channels = channels

    def forward(self, x):
        return x[:, :self.channels]


class ShapesUNetModel(UNetModel):
    """ComfyUI's U-Net in the shapes model's shape (see the module's docstring for the four changes)."""

    def __init__(self, *args, operations, dtype=None, device=None, **kwargs):
        operations = _eight_group_operations(operations)
        super().__init__(*args, operations=operations, dtype=dtype, device=device, **kwargs)
        embedding_dim = 4 * self.model_channels
        self.model_channels = TIME_DIM
        self.time_embed[0] = operations.Linear(TIME_DIM, embedding_dim, dtype=self.dtype, device=device)
        self.label_emb = operations.Linear(NULL_CLASS + 1, embedding_dim, bias=False, dtype=self.dtype, device=device)
        for module in self.modules():
            if isinstance(module, ResBlock):
                module.emb_layers[0] = torch.nn.Identity()
        for index in PASS_THROUGH_BLOCKS:
            block = self.output_blocks[index]
            block[0] = FirstChannels(block[0].out_channels)
            for layer in block[1:]:
                if isinstance(layer, Upsample):
                    layer.use_conv = False
                    del layer.conv


class ShapesLatentFormat(comfy.latent_formats.ChromaRadiance):
    """Pixel space: 3 channels in [-1, 1], identity in and out, as the pixel-space VAE encodes."""


class ShapesConfig(comfy.supported_models_base.BASE):
    unet_config = UNET_CONFIG
    unet_extra_config = {}
    # DDPM's linear betas (ComfyUI's "linear" is SD's scaled-linear schedule).
    sampling_settings = {"beta_schedule": "sqrt_linear", "linear_start": 1e-4, "linear_end": 0.02}
    latent_format = ShapesLatentFormat
    supported_inference_dtypes = [torch.float32]
    memory_usage_factor = 1.0


class ShapesBaseModel(comfy.model_base.BaseModel):
    """The shapes U-Net as an EPS model; each branch's x0 is clamped to [-1, 1], before CFG, as the core's is."""

    def __init__(self, config, device=None):
        super().__init__(config, comfy.model_base.ModelType.EPS, device=device, unet_model=ShapesUNetModel)

    def _apply_model(self, *args, **kwargs):
        return super()._apply_model(*args, **kwargs).clamp(-1, 1)

    def encode_adm(self, **kwargs):
        embedding = kwargs.get("cross_attn")
        if embedding is None or embedding.shape[-1] != NULL_CLASS + 1 or embedding[0].numel() != NULL_CLASS + 1:
            shape = None if embedding is None else tuple(embedding.shape)
            raise ValueError(f"conditioning: the shapes model takes a class's one-hot (1, 1, {NULL_CLASS + 1}) from "
                             f"NGDM Edit: Shapes Class, got {shape}")
        return embedding.reshape(embedding.shape[0], NULL_CLASS + 1)


def comfy_state_dict(shapes_state: dict) -> dict:
    """``ShapesUNet``'s weights under ``UNetModel``'s keys."""
    state = {}
    for key, value in shapes_state.items():
        if key == "class_embedding.weight":
            state["label_emb.weight"] = value.t().contiguous()
            continue
        prefix, found = next(((p, BLOCKS[p]) for p in BLOCKS if key.startswith(p + ".")), (None, None))
        if prefix is None:
            raise KeyError(key)
        rest = key[len(prefix) + 1:]
        layer = rest.split(".")[0]
        state[f"{found}.{RESBLOCK_LAYERS.get(layer, layer)}{rest[len(layer):]}"] = value
    return state


def load_shapes_model(path=UNET_FILE):
    """``(MODEL, VAE)``: the shipped shapes U-Net as a ModelPatcher, and ComfyUI's pixel-space VAE.

    A missing or unreadable file, or one that does not hold a ``ShapesUNet``, raises an error naming it.
    """
    try:
        unet = load_model(ShapesUNet, path)
    except (OSError, SafetensorError, RuntimeError, KeyError, ValueError, TypeError) as error:
        raise ValueError(f"shapes model: cannot load the weights file {path}: {error}. It ships with the pack "
                         "(ngdm_core/weights); reinstall the pack, or retrain it with "
                         "`python -m ngdm_core.shapes.training`") from error
    base = ShapesBaseModel(ShapesConfig(UNET_CONFIG))
    with torch.no_grad():
        base.diffusion_model.load_state_dict(comfy_state_dict(unet.state_dict()), strict=True)
    base.diffusion_model.requires_grad_(False)
    model = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                             offload_device=comfy.model_management.unet_offload_device())
    vae = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})
    return model, vae


def class_conditioning(name: str):
    """A CONDITIONING holding the one-hot of class ``name`` (or of the unconditional class), shape (1, 1, 4)."""
    if name not in CLASS_NAMES:
        raise ValueError(f"class_name must be one of {CLASS_NAMES}, got {name!r}")
    one_hot = torch.zeros(1, 1, NULL_CLASS + 1)
    one_hot[0, 0, CLASS_NAMES.index(name)] = 1.0
    return [[one_hot, {}]]


class ShapesModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NGDMShapesModelLoader",
            display_name="NGDM Edit: Shapes Model Loader",
            category=f"{CATEGORY}/shapes",
            description="Loads the pack's own small class-conditional model of the shapes data set (32x32 pixel "
                        "images of a circle, square or triangle on a textured background), with nothing to download: "
                        "every method of the pack runs on it on a CPU. It samples in pixel space: encode and decode "
                        "with its VAE output. Its x0 is clamped to [-1, 1] per branch, as DDPM's samplers do. Nodes "
                        "that read the U-Net's config (FreeU and the like) see model_channels 32, while its time "
                        "embedding is 64 wide.",
            inputs=[],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="MODEL: the shapes U-Net (EPS, DDPM's linear "
                                                                   "1000-step schedule), class-conditional."),
                     io.Vae.Output(display_name="VAE", tooltip="VAE: ComfyUI's pixel-space VAE (no downscaling): "
                                                               "an IMAGE in [0, 1] is the latent in [-1, 1].")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(*load_shapes_model())


class ShapesClass(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NGDMShapesClass",
            display_name="NGDM Edit: Shapes Class (prompt)",
            category=f"{CATEGORY}/shapes",
            description="The shapes model's prompt: a class name as a CONDITIONING. Use unconditional as the negative.",
            inputs=[io.Combo.Input("class_name", options=list(CLASS_NAMES), default=CLASSES[0],
                                   tooltip="class_name: the shape to ask for; unconditional is the negative (the "
                                           "classifier-free guidance's unconditional branch).")],
            outputs=[io.Conditioning.Output(tooltip="CONDITIONING for the shapes model only: the class's one-hot.")],
        )

    @classmethod
    def execute(cls, class_name) -> io.NodeOutput:
        return io.NodeOutput(class_conditioning(class_name))


class ShapesSource(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NGDMShapesSource",
            display_name="NGDM Edit: Shapes Source Image",
            category=f"{CATEGORY}/shapes",
            description="An image of the shapes data set and the exact mask of its object, by set and index: a "
                        "source to edit with nothing to load or paint. The data set is procedural; an item is the "
                        "same on every machine.",
            inputs=[io.Combo.Input("data_set", options=list(SETS), default="held_out",
                                   tooltip="data_set: held_out (never seen in training, as the tests and the "
                                           "templates use), training, or benchmark (the quality benchmarks' sources)."),
                    io.Int.Input("index", default=0, min=0, max=0xFFFFFFFF,
                                 tooltip="index: the item of the set.")],
            outputs=[io.Image.Output(display_name="image", tooltip="image: the 32x32 source, in [0, 1]."),
                     io.Mask.Output(display_name="mask", tooltip="mask: 1 on the pixels the object covers."),
                     io.String.Output(display_name="class_name",
                                      tooltip="class_name: the object's class (circle, square or triangle).")],
        )

    @classmethod
    def execute(cls, data_set, index) -> io.NodeOutput:
        if data_set not in SETS:
            raise ValueError(f"data_set must be one of {tuple(SETS)}, got {data_set!r}")
        image, mask, label, _, _ = render(SETS[data_set], int(index))
        image = torch.from_numpy((image + 1) / 2).float().permute(1, 2, 0)[None]
        return io.NodeOutput(image, torch.from_numpy(mask).float()[None], CLASSES[label])


NODES = [ShapesModelLoader, ShapesClass, ShapesSource]
