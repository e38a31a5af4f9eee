"""High-fidelity rectifier (seed 003): a hypernetwork that modulates a frozen model's conv kernels.

The base model is any ``nn.Module`` called as ``model(x_t, t) -> eps``, or ``model(x_t, t, cond)
-> eps`` where a condition is given, with integer timesteps ``t`` (one per batch item) into a
cumulative ``alpha_bar`` schedule. The rectifier looks at the source ``x0``, the step's plain
estimate ``P_t = (x_t - sqrt(1 - ab) eps) / sqrt(ab)`` and ``t``, and generates per-sample
separable offsets for the targeted ``nn.Conv2d`` layers (found by name), applied as
``theta * (1 + delta)``. The base model is never modified: the targeted convs run modulated only
inside :func:`rectified`.

Two ways to train it: :func:`train_rectifier`, the paper's reconstruction objective (noise
fitting), and :func:`train_edit_rectifier`, its edit training (a directional loss in a joint
image/text embedding plus L1 to the source, each step starting from the source's own trajectory).
"""

import contextlib
import json
import math
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .frozen_layers import WeightAndBias, own_weight_and_bias, padded_input
from .schedule import per_item
from .validation import require_at_least, require_finite_tensor, require_non_negative, require_positive

FORMAT_VERSION = "1"
# Where each step of edit training starts: the source's own trajectory (the paper's) or the
# previous edited step (its Markovian baseline, DiffusionCLIP's way).
EDIT_TRAJECTORIES = ("source", "previous edit")

# One layer's generated factors: ``(in_factor (B, 1, Cin/groups, kh, kw), out_factor (B, Cout, 1, kh, kw))``.
Factors = tuple[torch.Tensor, torch.Tensor]


def ddpm_alpha_bar(steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """The cumulative ``alpha_bar`` of DDPM's linear beta schedule, indexed by integer timestep."""
    return torch.cumprod(1 - torch.linspace(beta_start, beta_end, steps, dtype=torch.float64), 0).float()


def noised(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """``x_t = sqrt(ab) x0 + sqrt(1 - ab) noise``: the source's own trajectory at ``t``."""
    ab = per_item(alpha_bar[t], x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def predicted_x0(x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """DDIM's estimate ``P_t = (x_t - sqrt(1 - ab) eps) / sqrt(ab)``."""
    return predicted_x0_at(x_t, eps, alpha_bar[t])


def predicted_x0_at(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """:func:`predicted_x0` with ``alpha_bar`` given per item, for samplers whose times fall between the table's."""
    ab = per_item(alpha_bar_t, x_t)
    return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()


# --- modulated convolution -------------------------------------------------------------------


def separable_offset(in_factor: torch.Tensor, out_factor: torch.Tensor) -> torch.Tensor:
    """The full per-sample offset ``(B, Cout, Cin, kh, kw)`` of the two slim factors."""
    return out_factor * in_factor


def _modulated_weight(weight: torch.Tensor, in_factor: torch.Tensor, out_factor: torch.Tensor) -> torch.Tensor:
    """``weight * (1 + separable_offset)`` per sample, ``(B, Cout, Cin/groups, kh, kw)``, in ``weight``'s dtype."""
    return weight * (1 + separable_offset(in_factor, out_factor).to(weight))


class _ModulatedConv(torch.autograd.Function):
    """The grouped conv of :func:`modulated_conv`, keeping for backward only ``x`` and the two slim factors.

    Autograd through the plain expression would keep, for every targeted conv until the backward
    pass, the full offset and the modulated weight (``B x Cout x Cin x kh x kw`` each): at SD1.5's
    size, gigabytes per sample. Here a layer's modulated weight exists only while that layer's
    forward or backward runs; the backward rebuilds it and reduces its gradient to the factors'.
    """

    @staticmethod
    def forward(ctx, x, in_factor, out_factor, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, in_factor, out_factor)
        # References, not save_for_backward: the host's weights are inference tensors (which
        # save_for_backward refuses) or made by its cast for this call, and they are frozen while a
        # rectifier trains. Holding them costs nothing beyond what the forward itself held.
        ctx.weight, ctx.bias, ctx.conv = weight, bias, (stride, padding, dilation, groups)
        batch = x.shape[0]
        out = F.conv2d(x.reshape(1, -1, *x.shape[2:]), _modulated_weight(weight, in_factor, out_factor).flatten(0, 1),
                       None if bias is None else bias.repeat(batch), stride, padding, dilation, batch * groups)
        return out.reshape(batch, -1, *out.shape[2:])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        x, in_factor, out_factor = ctx.saved_tensors
        weight, bias, (stride, padding, dilation, groups) = ctx.weight, ctx.bias, ctx.conv
        batch = x.shape[0]
        needs_x, needs_in, needs_out, needs_weight, needs_bias = ctx.needs_input_grad[:5]
        modulated = _modulated_weight(weight, in_factor, out_factor)
        grad_x, grad_modulated, grad_bias = torch.ops.aten.convolution_backward(
            grad_output.reshape(1, -1, *grad_output.shape[2:]), x.reshape(1, -1, *x.shape[2:]),
            modulated.flatten(0, 1), None if bias is None else [batch * bias.shape[0]], stride, padding, dilation,
            False, [0, 0], batch * groups, [needs_x, needs_in or needs_out or needs_weight, needs_bias])
        del modulated
        grad_in = grad_out = grad_weight = None
        if grad_modulated is not None:
            grad_modulated = grad_modulated.reshape(batch, *weight.shape)
            if needs_weight:
                grad_weight = (grad_modulated * (1 + separable_offset(in_factor, out_factor).to(weight))).sum_to_size(
                    weight.shape)
            # W = theta * (1 + out * in): dL/d(offset) = dL/dW * theta, then each factor's share of the
            # outer product, summed over the axes it is broadcast along (Cout for in, Cin for out).
            grad_offset = (grad_modulated * weight).to(torch.promote_types(in_factor.dtype, out_factor.dtype))
            del grad_modulated
            grad_in = (grad_offset * out_factor).sum_to_size(in_factor.shape) if needs_in else None
            grad_out = (grad_offset * in_factor).sum_to_size(out_factor.shape) if needs_out else None
        if grad_bias is not None:
            grad_bias = grad_bias.reshape(batch, -1).sum(0)
        return (None if grad_x is None else grad_x.reshape(x.shape), grad_in, grad_out, grad_weight, grad_bias,
                None, None, None, None)


def modulated_conv(x: torch.Tensor, in_factor: torch.Tensor, out_factor: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None, stride, padding, dilation, groups: int) -> torch.Tensor:
    """``conv2d(x[b], weight * (1 + separable_offset[b]), bias)`` for every sample ``b``, as one grouped conv.

    The batch becomes groups of a single image, so each sample sees its own kernel without a
    Python loop; ``groups`` splits each sample further. ``padding`` is explicit (ints). Its
    backward keeps no full offset or modulated weight (:class:`_ModulatedConv`).
    """
    return _ModulatedConv.apply(x, in_factor, out_factor, weight, bias, stride, padding, dilation, groups)


class SeparableConvModulation:
    """One target conv run per sample with ``weight * (1 + separable_offset)`` (:func:`modulated_conv`).

    ``weight_and_bias`` supplies the weights the conv would compute with unmodulated.
    """

    def __init__(self, conv: nn.Conv2d, name: str = "conv", weight_and_bias: WeightAndBias = own_weight_and_bias):
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"{name} must be an nn.Conv2d to be rectified, got {type(conv).__name__}")
        self.conv = conv
        self.name = name
        self.weight_and_bias = weight_and_bias

    def __call__(self, x: torch.Tensor, in_factor: torch.Tensor, out_factor: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        batch = x.shape[0]
        if in_factor.shape[0] != batch or out_factor.shape[0] != batch:
            raise ValueError(f"{self.name} got a batch of {batch} but offsets for a batch of {in_factor.shape[0]}")
        weight, bias = self.weight_and_bias(conv, x)
        x, padding = padded_input(conv, x)
        return modulated_conv(x, in_factor, out_factor, weight, bias, conv.stride, padding, conv.dilation, conv.groups)


def _target_convs(model: nn.Module, targets: Iterable[str]) -> dict[str, nn.Conv2d]:
    modules = dict(model.named_modules())
    convs = {}
    for name in targets:
        if name not in modules:
            raise ValueError(f"target {name!r} is not a module of the base model")
        if not isinstance(modules[name], nn.Conv2d):
            raise ValueError(f"target {name!r} must be an nn.Conv2d, got {type(modules[name]).__name__}")
        convs[name] = modules[name]
    return convs


def conv_targets(model: nn.Module, prefixes: Iterable[str]) -> list[str]:
    """Names of ``model``'s ``nn.Conv2d`` layers inside the modules named by ``prefixes``, sorted."""
    prefixes = tuple(prefixes)
    return sorted(name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)
                  and any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes))


def shape_signature(model: nn.Module, targets: Iterable[str]) -> dict[str, list[int]]:
    """The targeted convs' weight shapes by name: what a rectifier's offsets must fit."""
    modules = dict(model.named_modules())
    return {name: list(modules[name].weight.shape) if isinstance(modules.get(name), nn.Conv2d) else None
            for name in sorted(targets)}


@contextlib.contextmanager
def rectified(model: nn.Module, factors: dict[str, Factors], weight_and_bias: WeightAndBias = own_weight_and_bias):
    """Run ``model`` with each named conv modulated by its ``factors`` until the block exits.

    The convs' ``forward`` is shadowed by an instance attribute (the op becomes a grouped
    conv, which hooks on the original call could only redo at double cost) and the
    attribute is removed in ``finally``, so the model is left exactly as it was.
    """
    convs = _target_convs(model, factors)
    for name, conv in convs.items():
        if "forward" in vars(conv):
            raise ValueError(f"target {name!r} is already rectified or has a patched forward")
    try:
        for name, conv in convs.items():
            modulation = SeparableConvModulation(conv, name, weight_and_bias)
            conv.forward = lambda x, modulation=modulation, pair=factors[name]: modulation(x, *pair)
        yield model
    finally:
        for conv in convs.values():
            vars(conv).pop("forward", None)


# --- hypernetwork ------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """The U-Net's sinusoidal embedding of (integer or float) timesteps, ``(B, dim)``."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * frequencies[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class LayerSubnet(nn.Module):
    """Maps the global feature to one conv's two slim factors."""

    def __init__(self, feature_dim: int, weight_shape: list[int]):
        super().__init__()
        c_out, c_in, kh, kw = weight_shape
        self.in_shape, self.out_shape = (1, c_in, kh, kw), (c_out, 1, kh, kw)
        self.hidden = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.SiLU())
        self.in_head = nn.Linear(feature_dim, c_in * kh * kw)
        self.out_head = nn.Linear(feature_dim, c_out * kh * kw)
        # Only one head starts at zero: delta = in * out is then exactly 0 (identity), yet the
        # zero head still gets the other's nonzero gradient. Zeroing both would freeze both.
        nn.init.zeros_(self.out_head.weight)
        nn.init.zeros_(self.out_head.bias)

    def forward(self, feature: torch.Tensor) -> Factors:
        hidden = self.hidden(feature)
        batch = feature.shape[0]
        in_factor = self.in_head(hidden).reshape(batch, *self.in_shape)
        return in_factor, self.out_head(hidden).reshape(batch, *self.out_shape)


class Rectifier(nn.Module):
    """Global encoder of ``(x0, P_t, t)`` plus one subnet per targeted conv.

    The encoder sees ``x0`` and ``P_t`` concatenated (the paper found this better than their
    difference), shrinks them with strided convs and a global average pool, and mixes in a
    sinusoidal ``t`` embedding. An untrained rectifier outputs zero offsets.
    """

    def __init__(self, shapes: dict[str, list[int]], in_channels: int, width: int = 32, feature_dim: int = 64,
                 time_dim: int = 32):
        super().__init__()
        self.shapes = {name: list(shape) for name, shape in sorted(shapes.items())}
        self.config = {"in_channels": in_channels, "width": width, "feature_dim": feature_dim, "time_dim": time_dim}
        # How it was trained, one record per training run (saved with it), and the file it came from.
        self.training_runs: list[dict] = []
        self.origin: str | None = None
        self.time_dim = time_dim
        self.encoder = nn.Sequential(
            nn.Conv2d(2 * in_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.mixer = nn.Sequential(nn.Linear(width + time_dim, feature_dim), nn.SiLU())
        # A list in sorted target order: dotted module names cannot be ModuleDict keys.
        self.subnets = nn.ModuleList(LayerSubnet(feature_dim, shape) for shape in self.shapes.values())

    @classmethod
    def for_model(cls, model: nn.Module, targets: Iterable[str], in_channels: int, **config) -> "Rectifier":
        """A rectifier for ``model``'s named convs."""
        convs = _target_convs(model, targets)
        return cls({name: list(conv.weight.shape) for name, conv in convs.items()}, in_channels, **config)

    @property
    def targets(self) -> list[str]:
        return list(self.shapes)

    def forward(self, x0: torch.Tensor, estimate: torch.Tensor, t: torch.Tensor) -> dict[str, Factors]:
        pooled = self.encoder(torch.cat([x0, estimate], dim=1))
        feature = self.mixer(torch.cat([pooled, timestep_embedding(t, self.time_dim).to(pooled)], dim=1))
        return {name: subnet(feature) for name, subnet in zip(self.shapes, self.subnets)}

    def generated_parameter_counts(self, batch_size: int = 1) -> dict[str, int]:
        """Offset values generated per batch: separable factors vs a full ``Cout x Cin x kh x kw`` kernel."""
        separable = sum(kh * kw * (c_in + c_out) for c_out, c_in, kh, kw in self.shapes.values())
        full = sum(c_out * c_in * kh * kw for c_out, c_in, kh, kw in self.shapes.values())
        return {"separable": batch_size * separable, "full": batch_size * full}


# --- inference and training --------------------------------------------------------------------


@contextlib.contextmanager
def _frozen(model: nn.Module):
    # An inference tensor's flag cannot be set back outside inference mode; it never joins a graph anyway.
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters() if not parameter.is_inference()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def _eps(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    return model(x_t, t) if cond is None else model(x_t, t, cond)


def rectified_eps(model: nn.Module, rectifier: Rectifier, x_t: torch.Tensor, t: torch.Tensor, source: torch.Tensor,
                  alpha_bar: torch.Tensor, cond=None, weight_and_bias: WeightAndBias = own_weight_and_bias) -> torch.Tensor:
    """One rectified step under ``cond``: a plain call for ``P_t``, then one modulated call.

    Gradients reach only the rectifier: the model's parameters are frozen for the call (and
    their flags restored), so a backward never accumulates into the base model.
    """
    return rectified_eps_at(model, rectifier, x_t, t, source, alpha_bar[t], cond, weight_and_bias)


def rectified_eps_at(model: nn.Module, rectifier: Rectifier, x_t: torch.Tensor, t: torch.Tensor, source: torch.Tensor,
                     alpha_bar_t: torch.Tensor, cond=None,
                     weight_and_bias: WeightAndBias = own_weight_and_bias) -> torch.Tensor:
    """:func:`rectified_eps` with ``alpha_bar`` given per item, for samplers whose times fall between the table's."""
    with torch.no_grad():
        estimate = predicted_x0_at(x_t, _eps(model, x_t, t, cond), alpha_bar_t)
    with _frozen(model), rectified(model, rectifier(source, estimate, t), weight_and_bias):
        return _eps(model, x_t, t, cond)


def noise_fitting_loss(model: nn.Module, rectifier: Rectifier, x0: torch.Tensor, t: torch.Tensor,
                       noise: torch.Tensor, alpha_bar: torch.Tensor, cond=None,
                       weight_and_bias: WeightAndBias = own_weight_and_bias) -> torch.Tensor:
    """``mean |noise - eps_rectified(x_t)|^2``, the paper's reconstruction objective (Eq. 3)."""
    x_t = noised(x0, noise, t, alpha_bar)
    return F.mse_loss(rectified_eps(model, rectifier, x_t, t, x0, alpha_bar, cond, weight_and_bias), noise)


def directional_loss(edited_embedding: torch.Tensor, source_embedding: torch.Tensor,
                     direction: torch.Tensor) -> torch.Tensor:
    """``1 - cos(E(edited) - E(source), direction)``, averaged over the batch (Eq. 4)."""
    change = edited_embedding - source_embedding
    return (1 - F.cosine_similarity(change, direction.to(change).expand_as(change), dim=1)).mean()


def edit_loss_terms(model: nn.Module, rectifier: Rectifier, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                    alpha_bar: torch.Tensor, embed: Callable[[torch.Tensor], torch.Tensor], direction: torch.Tensor,
                    cond=None, source_embedding: torch.Tensor | None = None,
                    weight_and_bias: WeightAndBias = own_weight_and_bias) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_dir, L1)`` of the editing objective at one step of Algorithm 1.

    ``x_t`` is always the source's own trajectory, never the previous edited step, so an
    edit's deviation cannot accumulate over steps. The rectified model runs under ``cond``
    (the target) to its x0 estimate ``x0_hat``; ``L_dir = 1 - cos(E_I(x0_hat) - E_I(x0), direction)``
    and ``L1 = mean |x0_hat - x0|``. ``embed`` is ``E_I``, images to ``(B, D)`` (CLIP's image
    encoder in the paper); ``direction`` is ``E_T(target) - E_T(source)``, ``(D,)`` or ``(B, D)``;
    ``source_embedding`` is ``E_I(x0)``, computed here when not given.
    """
    directional, l1, _ = edit_loss_terms_at(model, rectifier, noised(x0, noise, t, alpha_bar), x0, t, alpha_bar, embed,
                                            direction, cond, source_embedding, weight_and_bias)
    return directional, l1


def edit_loss_terms_at(model: nn.Module, rectifier: Rectifier, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
                       alpha_bar: torch.Tensor, embed: Callable[[torch.Tensor], torch.Tensor], direction: torch.Tensor,
                       cond=None, source_embedding: torch.Tensor | None = None,
                       weight_and_bias: WeightAndBias = own_weight_and_bias):
    """``(L_dir, L1, eps)`` of :func:`edit_loss_terms` from any state ``x_t``, with the rectified noise prediction.

    The Markovian training of :func:`train_edit_rectifier` calls it on the previous edited step's
    state and takes its next DDIM step with ``eps``.
    """
    eps = rectified_eps(model, rectifier, x_t, t, x0, alpha_bar, cond, weight_and_bias)
    edited = predicted_x0(x_t, eps, t, alpha_bar)
    if source_embedding is None:
        with torch.no_grad():
            source_embedding = embed(x0)
    return directional_loss(embed(edited), source_embedding, direction), (edited - x0).abs().mean(), eps


def edit_training_loss(model: nn.Module, rectifier: Rectifier, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                       alpha_bar: torch.Tensor, embed: Callable[[torch.Tensor], torch.Tensor], direction: torch.Tensor,
                       direction_weight: float = 1.0, l1_weight: float = 1.0, cond=None,
                       source_embedding: torch.Tensor | None = None,
                       weight_and_bias: WeightAndBias = own_weight_and_bias) -> torch.Tensor:
    """The editing objective (Eq. 6): ``direction_weight * L_dir + l1_weight * L1`` (:func:`edit_loss_terms`)."""
    directional, l1 = edit_loss_terms(model, rectifier, x0, t, noise, alpha_bar, embed, direction, cond,
                                      source_embedding, weight_and_bias)
    return direction_weight * directional + l1_weight * l1


def ddim_timesteps(alpha_bar: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` integer timesteps evenly spaced from the schedule's last to 0, descending."""
    return torch.linspace(len(alpha_bar) - 1, 0, steps).round().long()


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
              alpha_bar: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM from timestep ``t`` to ``t_next`` (up or down) with the noise prediction ``eps``."""
    return noised(predicted_x0(x_t, eps, t, alpha_bar), eps, t_next, alpha_bar)


@torch.no_grad()
def ddim_inverted(model: nn.Module, x0: torch.Tensor, timesteps: torch.Tensor, alpha_bar: torch.Tensor,
                  cond=None) -> torch.Tensor:
    """The plain model's deterministic DDIM inversion of ``x0`` up the descending ``timesteps`` (ending at 0).

    It starts from the source's own noiseless state at timestep 0 and evaluates the model at the
    level its state is at, as :func:`ngdm_core.edit_friendly.invert_ddim` does in sigma space.
    """
    ascending = timesteps.flip(0).to(x0.device)
    x = noised(x0, torch.zeros_like(x0), ascending[0].expand(len(x0)), alpha_bar)
    for t, t_up in zip(ascending[:-1], ascending[1:]):
        t, t_up = t.expand(len(x0)), t_up.expand(len(x0))
        x = ddim_step(x, _eps(model, x, t, cond), t, t_up, alpha_bar)
    return x


def _batches(data, batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``(x0, rows)`` per step: rows of a tensor drawn with replacement, or an iterable's own batches (rows None)."""
    if not isinstance(data, torch.Tensor):
        for batch in data:
            yield batch, None
        return
    while True:
        rows = torch.randint(len(data), (batch_size,), generator=generator)
        yield data[rows], rows


def _timesteps_and_noise(x0: torch.Tensor, alpha_bar: torch.Tensor, generator: torch.Generator):
    t = torch.randint(len(alpha_bar), (x0.shape[0],), generator=generator)
    return t.to(x0.device), torch.randn(x0.shape, generator=generator).to(x0)


def _rows(per_source, rows: torch.Tensor | None):
    return None if per_source is None else per_source[rows.to(per_source.device)]


def _require_per_source(name: str, values, sources) -> None:
    if values is None:
        return
    if not isinstance(sources, torch.Tensor) or not isinstance(values, torch.Tensor):
        raise ValueError(f"{name} must be a tensor with one row per source, for sources given as a tensor")
    if len(values) != len(sources):
        raise ValueError(f"{name} has {len(values)} rows for {len(sources)} sources")


def _require_trainable(name: str, module: nn.Module) -> None:
    # Inference tensors cannot be saved for backward; a module built under inference_mode has them.
    if any(tensor.is_inference() for tensor in module.state_dict().values()):
        raise ValueError(f"{name} was created under torch.inference_mode; build it outside inference mode to train")


def _model_losses(losses: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """``losses``, with the model's inference-mode weights on the gradient's path named as the input at fault.

    The model may hold inference tensors where no gradient passes (a host's frozen encoder, shared
    rather than copied), so they are refused only when an operation must save one for backward.
    """
    try:
        yield from losses
    except RuntimeError as error:
        if "Inference tensors cannot be saved for backward" not in str(error):
            raise
        raise ValueError("model has weights created under torch.inference_mode where the rectifier's gradient "
                         "passes; build those outside inference mode to train") from error


def _require_finite_training(what: str, tensors: list[torch.Tensor], step: int, steps: int, lr: float) -> None:
    """Stop at the first non-finite loss or weight, naming its likely cause.

    Before any update only the input can be at fault (AdamW moves each weight by about ``lr``
    at most, so finite gradients leave finite weights); once training has moved the weights,
    a blow-up is the learning rate's.
    """
    if bool(torch.stack([torch.isfinite(tensor).all() for tensor in tensors]).all()):
        return
    if step == 1:
        raise ValueError(f"{what} is not finite at the first step: the input (the sources, the condition or the "
                         "edit direction) or the model's prediction for it holds NaN or inf")
    raise ValueError(f"{what} is not finite at step {step} of {steps}: the learning rate {lr:g} is too high for this "
                     "model and data; lower it")


def _fit(rectifier: Rectifier, losses: Iterator[torch.Tensor], steps: int, lr: float, weight_decay: float,
         progress, lr_decay: float = 1.0, lr_decay_every: int = 1) -> list[float]:
    """AdamW on the rectifier alone, one step per loss ``losses`` yields (at most ``steps``); returns the losses.

    The learning rate is multiplied by ``lr_decay`` after every ``lr_decay_every`` steps.
    """
    parameters = list(rectifier.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, lr_decay_every, lr_decay)
    history = []
    for step, loss in zip(range(1, steps + 1), _model_losses(losses)):
        _require_finite_training("the training loss", [loss.detach()], step, steps, lr)
        optimizer.zero_grad(set_to_none=True)
        # Gradients go to the rectifier's parameters only: nothing accumulates in the base model
        # or in an embedding network, whatever their requires_grad flags.
        loss.backward(inputs=parameters)
        optimizer.step()
        schedule.step()
        _require_finite_training("the rectifier's weights", [parameter.detach() for parameter in parameters], step,
                                 steps, lr)
        history.append(loss.item())
        if progress is not None:
            progress(step, steps, history[-1])
    return history


def train_rectifier(model: nn.Module, rectifier: Rectifier, data, steps: int, lr: float = 1e-3,
                    alpha_bar: torch.Tensor | None = None, batch_size: int = 8, weight_decay: float = 1e-5,
                    seed: int = 0, progress=None, conditions: torch.Tensor | None = None,
                    weight_and_bias: WeightAndBias = own_weight_and_bias) -> list[float]:
    """Fit ``rectifier`` to ``model``'s noise-fitting loss with AdamW; returns the loss per step.

    ``data`` is a tensor of source images ``(N, C, H, W)``, sampled with replacement, or an
    iterable of batches (training stops early if it runs out). ``conditions``, for a tensor of
    sources, holds one condition per source (e.g. class labels) for a model called as
    ``model(x_t, t, cond)``; without it the model is called as ``model(x_t, t)``. Timesteps,
    noise and batches come from ``seed``. ``progress(done, total, loss)`` is called after every
    step, so a host can show the loss and stop the run by raising. Only the rectifier learns.

    Training stops with a ``ValueError`` at the first non-finite loss or weight, blaming the
    input at the first step and the learning rate after it, so it never returns a rectifier
    with NaN or inf weights. Works when called under ``torch.inference_mode()``: the run leaves
    it, and inference-mode inputs are only read into new tensors, never saved for backward.
    """
    require_at_least("steps", steps, 1)
    require_positive("lr", lr)
    alpha_bar = ddpm_alpha_bar() if alpha_bar is None else alpha_bar
    _require_trainable("rectifier", rectifier)
    with torch.inference_mode(False), torch.enable_grad():
        if isinstance(data, torch.Tensor):
            require_finite_tensor("data", data)
        _require_per_source("conditions", conditions, data)
        generator = torch.Generator().manual_seed(seed)

        def losses():
            for x0, rows in _batches(data, batch_size, generator):
                t, noise = _timesteps_and_noise(x0, alpha_bar, generator)
                yield noise_fitting_loss(model, rectifier, x0, t, noise, alpha_bar.to(x0.device),
                                         _rows(conditions, rows), weight_and_bias)

        history = _fit(rectifier, losses(), steps, lr, weight_decay, progress)
    rectifier.training_runs.append({"objective": "noise fitting", "steps": len(history), "lr": lr,
                               "batch_size": batch_size, "weight_decay": weight_decay, "seed": seed,
                               "final_loss": history[-1]})
    return history


def _per_source_direction(direction: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    require_finite_tensor("direction", direction)
    if direction.ndim == 1:
        direction = direction.expand(len(sources), -1)
    if direction.ndim != 2 or len(direction) != len(sources):
        raise ValueError(f"direction must be (D,) or one row per source ({len(sources)}, D), "
                         f"got {tuple(direction.shape)}")
    zero = (direction.norm(dim=1) == 0).nonzero().flatten()
    if len(zero):
        raise ValueError(f"direction is zero for source {int(zero[0])}: its target and source text embeddings are "
                         "equal, so there is no change to align the edit with")
    return direction


def train_edit_rectifier(model: nn.Module, rectifier: Rectifier, sources: torch.Tensor,
                         embed: Callable[[torch.Tensor], torch.Tensor], direction: torch.Tensor, steps: int,
                         lr: float = 1e-3, alpha_bar: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                         batch_size: int = 8, direction_weight: float = 1.0, l1_weight: float = 1.0,
                         weight_decay: float = 0.0, seed: int = 0, progress=None,
                         weight_and_bias: WeightAndBias = own_weight_and_bias, trajectory: str = "source",
                         trajectory_steps: int = 20, source_conditions: torch.Tensor | None = None,
                         lr_decay: float = 1.0, lr_decay_every: int = 10) -> list[float]:
    """Train ``rectifier`` for an edit, the paper's way (Algorithm 1, Eq. 6); returns the loss per step.

    Each step draws a batch of ``sources`` ``(N, C, H, W)`` with replacement, noises it to a
    random timestep along its own trajectory (never from a previous edited step), runs the
    rectified model under the target condition to its x0 estimate ``x0_hat`` and takes an AdamW
    step on ``direction_weight * L_dir + l1_weight * L1(x0_hat, x0)`` (:func:`edit_loss_terms`).

    - ``embed`` is ``E_I``: images in the model's space to ``(B, D)``. It gets no gradient of its
      own; the sources' embeddings are computed once, before the first step.
    - ``direction`` is ``E_T(target) - E_T(source)``: ``(D,)`` for every source, or ``(N, D)``.
    - ``targets`` holds one target condition per source (e.g. class labels) for a model called
      as ``model(x_t, t, cond)``; ``None`` is for a model that runs under the target itself.

    ``trajectory="previous edit"`` is the paper's baseline instead, Markovian training as in
    DiffusionCLIP: a batch is inverted by the plain model with DDIM (:func:`ddim_inverted`) over
    ``trajectory_steps`` levels, under ``source_conditions`` (one per source, e.g. the
    unconditional label; ``targets`` if not given), then walked down those levels under the
    target, one training step per level: the loss is the same, taken at the previous edited
    step's state, and the next state is the DDIM step of the rectified prediction made before
    the update. A new batch starts when a walk reaches timestep 0.

    The learning rate is multiplied by ``lr_decay`` after every ``lr_decay_every`` steps: the paper
    decays its 1e-3 by 0.9 every 10 steps; 1 (the default) keeps it constant.

    The paper starts from a reconstruction-trained rectifier and uses weight decay 0. Seeding,
    ``progress``, inference mode and the stop at the first non-finite loss or weight are as in
    :func:`train_rectifier`.
    """
    require_at_least("steps", steps, 1)
    require_positive("lr", lr)
    for name, weight in (("direction_weight", direction_weight), ("l1_weight", l1_weight)):
        require_non_negative(name, weight)
    if trajectory not in EDIT_TRAJECTORIES:
        raise ValueError(f"trajectory must be one of {EDIT_TRAJECTORIES}, got {trajectory!r}")
    require_at_least("trajectory_steps", trajectory_steps, 2)
    require_positive("lr_decay", lr_decay)
    require_at_least("lr_decay_every", lr_decay_every, 1)
    alpha_bar = ddpm_alpha_bar() if alpha_bar is None else alpha_bar
    _require_trainable("rectifier", rectifier)
    with torch.inference_mode(False), torch.enable_grad():
        require_finite_tensor("sources", sources)
        direction = _per_source_direction(direction, sources)
        _require_per_source("targets", targets, sources)
        _require_per_source("source_conditions", source_conditions, sources)
        with torch.no_grad():
            source_embeddings = torch.cat([embed(chunk) for chunk in sources.split(batch_size)])
        require_finite_tensor("the sources' image embeddings", source_embeddings)
        if source_embeddings.shape[1:] != direction.shape[1:]:
            raise ValueError(f"embed gives image embeddings of width {source_embeddings.shape[1]} but direction has "
                             f"width {direction.shape[1]}: both must live in one embedding space")
        generator = torch.Generator().manual_seed(seed)
        alpha_bar = alpha_bar.to(sources.device)

        def source_trajectory_losses():
            for x0, rows in _batches(sources, batch_size, generator):
                t, noise = _timesteps_and_noise(x0, alpha_bar, generator)
                rows = rows.to(sources.device)
                yield edit_training_loss(model, rectifier, x0, t, noise, alpha_bar, embed, direction[rows],
                                         direction_weight, l1_weight, _rows(targets, rows), source_embeddings[rows],
                                         weight_and_bias)

        def previous_edit_losses():
            timesteps = ddim_timesteps(alpha_bar, trajectory_steps).to(sources.device)
            inversion_conditions = targets if source_conditions is None else source_conditions
            for x0, rows in _batches(sources, batch_size, generator):
                rows = rows.to(sources.device)
                x_t = ddim_inverted(model, x0, timesteps, alpha_bar, _rows(inversion_conditions, rows))
                for t, t_next in zip(timesteps[:-1], timesteps[1:]):
                    t, t_next = t.expand(len(x0)), t_next.expand(len(x0))
                    directional, l1, eps = edit_loss_terms_at(model, rectifier, x_t, x0, t, alpha_bar, embed,
                                                              direction[rows], _rows(targets, rows),
                                                              source_embeddings[rows], weight_and_bias)
                    # _fit updates the rectifier between this yield and the next state, which is the
                    # DDIM step of the prediction the loss was taken on, as DiffusionCLIP steps.
                    yield direction_weight * directional + l1_weight * l1
                    x_t = ddim_step(x_t, eps.detach(), t, t_next, alpha_bar)

        losses = source_trajectory_losses() if trajectory == "source" else previous_edit_losses()
        history = _fit(rectifier, losses, steps, lr, weight_decay, progress, lr_decay, lr_decay_every)
    record = {"objective": "edit", "steps": len(history), "lr": lr, "batch_size": batch_size,
              "weight_decay": weight_decay, "seed": seed, "direction_weight": direction_weight,
              "l1_weight": l1_weight, "trajectory": trajectory, "final_loss": history[-1]}
    if trajectory != "source":
        record["trajectory_steps"] = trajectory_steps
    if lr_decay != 1:
        record["lr_decay"], record["lr_decay_every"] = lr_decay, lr_decay_every
    rectifier.training_runs.append(record)
    return history


# --- files -------------------------------------------------------------------------------------


def require_finite_rectifier(rectifier: Rectifier, name: str = "rectifier") -> None:
    """Refuse a rectifier with NaN or inf weights, naming the file it came from."""
    state = rectifier.state_dict()
    broken = [key for key, value in state.items() if not torch.isfinite(value).all()]
    if broken:
        origin = rectifier.origin or "not saved to a file"
        raise ValueError(f"{name} ({origin}) has NaN or inf weights in {len(broken)} of {len(state)} tensors "
                         f"(first {broken[0]}): it was trained on non-finite input or with too high a learning "
                         "rate; train it again")


def save_rectifier(rectifier: Rectifier, path: str) -> None:
    """Write the weights as safetensors, with what :func:`load_rectifier` needs to rebuild and check it.

    A rectifier with NaN or inf weights is refused before anything is written.
    """
    require_finite_rectifier(rectifier)
    metadata = {
        "format": "ngdm-rectifier",
        "format_version": FORMAT_VERSION,
        "targets": json.dumps(rectifier.targets),
        "shape_signature": json.dumps(rectifier.shapes),
        "config": json.dumps(rectifier.config),
        "training": json.dumps(rectifier.training_runs),
    }
    tensors = {key: value.detach().contiguous() for key, value in rectifier.state_dict().items()}
    save_file(tensors, path, metadata=metadata)


def _read_metadata(path: str) -> dict[str, str]:
    with safe_open(path, framework="pt") as file:
        metadata = file.metadata() or {}
    if metadata.get("format") != "ngdm-rectifier":
        raise ValueError(f"{path} is not a rectifier file")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has rectifier format version {metadata.get('format_version')!r}, "
                         f"this code reads {FORMAT_VERSION!r}")
    return metadata


def require_fits(rectifier: Rectifier, model: nn.Module) -> None:
    """Refuse a ``model`` whose targeted convs are missing or shaped differently from the rectifier's."""
    this_model = shape_signature(model, rectifier.targets)
    differing = [name for name in rectifier.targets if this_model[name] != rectifier.shapes[name]]
    if differing:
        # A real U-Net has dozens of targets; the first few differences say enough.
        shown = differing[:3]
        raise ValueError(f"rectifier was trained for conv shapes {({name: rectifier.shapes[name] for name in shown})} "
                         f"but this model has {({name: this_model[name] for name in shown})} "
                         f"({len(differing)} of {len(rectifier.targets)} targeted layers differ)")


def read_rectifier(path: str) -> Rectifier:
    """Rebuild a saved rectifier, refusing one with NaN or inf weights; check it against a model with
    :func:`require_fits` before use. Files written before training was recorded read with no record."""
    metadata = _read_metadata(path)
    rectifier = Rectifier(json.loads(metadata["shape_signature"]), **json.loads(metadata["config"]))
    rectifier.load_state_dict(load_file(path))
    rectifier.training_runs = json.loads(metadata.get("training", "[]"))
    rectifier.origin = path
    require_finite_rectifier(rectifier)
    return rectifier


def load_rectifier(path: str, model: nn.Module) -> Rectifier:
    """Rebuild a saved rectifier, refusing a ``model`` whose targeted conv shapes differ."""
    rectifier = read_rectifier(path)
    require_fits(rectifier, model)
    return rectifier
