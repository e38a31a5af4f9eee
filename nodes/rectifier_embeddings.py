"""The joint image/text embedding of the rectifier's edit training, from ComfyUI's CLIP models.

What ComfyUI 0.8.0 computes, read in its code:

- CLIPVisionEncode's ``image_embeds`` is ``visual_projection(post_layernorm(CLS token))``
  (``comfy/clip_model.py``, ``CLIPVisionModelProjection``): CLIP's joint space, 768 wide for
  ViT-L/14 (``comfy/clip_vision_config_vitl.json``, ``projection_dim``).
- CLIPTextEncode's ``pooled_output`` is the final-layer-normed end-of-text hidden state. For
  SD1.x it is not projected: ``SD1CheckpointClipModel`` passes ``return_projected_pooled=False``
  (``comfy/sd1_clip.py``). The joint space is that state times the text model's
  ``text_projection`` (``comfy/clip_model.py``, ``CLIPTextModel``), as CLIP computes it. SD2.x's
  OpenCLIP ViT-H and SDXL's ViT-bigG text models return the projected output already.
- SD1.x checkpoints do not ship ``text_projection``; ComfyUI leaves out that key from its
  missing-weights warning (``comfy/sd.py``) and the layer stays as allocated (zeros on a fresh
  allocation). CLIP ViT-L/14's full text encoder, loaded with Load CLIP, has it.

So ``E_T`` is the pooled output, projected by the text model that made it where ComfyUI left
it unprojected, and ``E_I`` is ``image_embeds`` of the VAE-decoded image, computed with
gradients. Two parts of ComfyUI's path cannot carry them: CLIPVisionEncode's preprocessing
rounds to 8-bit levels (gradient zero), and its ``CLIPLayer`` adds the residuals in place
(``x += ...``), which autograd refuses; both are redone here without that.
"""

import copy

import comfy.clip_model
import comfy.ops
from comfy.ldm.modules.attention import optimized_attention_for_device
import comfy.sd1_clip
import torch
import torch.nn.functional as F
from torch import nn


def _text_model(clip, width: int, name: str):
    """The text encoder in ``clip`` whose pooled output is ``width`` wide (SDXL's CLIP holds two)."""
    models = [module for module in clip.cond_stage_model.modules()
              if isinstance(module, comfy.sd1_clip.SDClipModel)
              and module.transformer.text_projection.in_features == width]
    if len(models) != 1:
        raise ValueError(f"clip has no CLIP text encoder whose pooled output is {width} wide, as {name}'s is: "
                         "encode the prompts with this CLIP")
    return models[0]


def text_embedding(clip, conditioning, name: str) -> torch.Tensor:
    """``E_T`` of a prompt: its conditioning's pooled output in CLIP's joint space, ``(D,)``."""
    pooled = conditioning[0][1].get("pooled_output") if conditioning else None
    if pooled is None:
        raise ValueError(f"{name} has no pooled text output: encode it with CLIP Text Encode")
    pooled = pooled[:1].float()
    text_model = _text_model(clip, pooled.shape[-1], name)
    if text_model.return_projected_pooled:
        return pooled[0]
    projection = text_model.transformer.text_projection
    weight, bias = comfy.ops.cast_bias_weight(projection, pooled)
    if not weight.any():
        raise ValueError("clip: its text projection is all zeros, so it was never loaded (SD1.x checkpoints do not "
                         "ship CLIP's text projection): load CLIP ViT-L/14's text encoder with Load CLIP and "
                         "connect that as clip")
    return F.linear(pooled, weight, bias)[0]


def image_embedding_width(clip_vision) -> int:
    """How wide CLIP vision's ``image_embeds`` are; refuses image encoders that are not CLIP's."""
    model = clip_vision.model
    if not isinstance(model, comfy.clip_model.CLIPVisionModelProjection) or model.vision_model.output_layernorm:
        raise ValueError(f"clip_vision must be a CLIP vision model (not SigLIP or DINOv2), got {type(model).__name__}")
    projection = model.visual_projection
    return projection.out_features if isinstance(projection, nn.Linear) else model.vision_model.post_layernorm.weight.shape[0]


def require_one_space(image_width: int, text_width: int) -> None:
    if image_width != text_width:
        raise ValueError(f"clip_vision gives {image_width}-wide image embeddings but clip's text embeddings are "
                         f"{text_width} wide: they must share one space (CLIP ViT-L/14 vision for SD1.x's text "
                         "encoder, ViT-H for SD2.x, ViT-bigG for SDXL)")


def clip_pixels(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """CLIPVisionEncode's preprocessing (resize the short side, centre crop, normalise) on ``(B, 3, H, W)`` in [0, 1],
    without its rounding to 8-bit levels, so gradients pass."""
    if images.shape[-2:] != (size, size):
        scale = size / min(images.shape[-2:])
        images = F.interpolate(images, size=(round(scale * images.shape[-2]), round(scale * images.shape[-1])),
                               mode="bicubic", antialias=True)
        top, left = (images.shape[-2] - size) // 2, (images.shape[-1] - size) // 2
        images = images[..., top:top + size, left:left + size]
    mean, std = (torch.tensor(values, device=images.device, dtype=images.dtype).view(3, 1, 1) for values in (mean, std))
    return (images.clamp(0, 1) - mean) / std


def image_embeds(model: comfy.clip_model.CLIPVisionModelProjection, pixels: torch.Tensor) -> torch.Tensor:
    """``image_embeds`` as ``CLIPVisionModelProjection`` computes them, with the residuals added out of place."""
    vision = model.vision_model
    x = vision.pre_layrnorm(vision.embeddings(pixels))
    attention = optimized_attention_for_device(x.device, mask=False, small_input=True)
    for layer in vision.encoder.layers:
        x = x + layer.self_attn(layer.layer_norm1(x), None, attention)
        x = x + layer.mlp(layer.layer_norm2(x))
    return model.visual_projection(vision.post_layernorm(x[:, 0, :]))


class LatentImageEmbedding(nn.Module):
    """``E_I`` of the model's processed latents: VAE decode, CLIP's preprocessing, CLIP vision's ``image_embeds``.

    ComfyUI creates weights under inference mode, which autograd cannot save for backward, so the
    VAE and the CLIP vision model are copied, as the U-Net is for training: the copies hold the
    VAE's and the vision model's memory again while training runs.
    """

    def __init__(self, model, vae, clip_vision, device):
        super().__init__()
        with torch.inference_mode(False):
            self.vae_model = copy.deepcopy(vae.first_stage_model).to(device).requires_grad_(False)
            self.vision_model = copy.deepcopy(clip_vision.model).to(device).requires_grad_(False)
        self.process_latent_out = model.model.process_latent_out
        self.process_output = vae.process_output
        self.vae_dtype = next(self.vae_model.parameters()).dtype
        self.size, self.mean, self.std = clip_vision.image_size, clip_vision.image_mean, clip_vision.image_std

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        decoded = self.vae_model.decode(self.process_latent_out(latents).to(self.vae_dtype))
        images = self.process_output(decoded.float())
        pixels = clip_pixels(images, self.size, self.mean, self.std)
        return image_embeds(self.vision_model, pixels).float()
