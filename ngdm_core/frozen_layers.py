"""Linear and conv layers whose frozen weights autograd references instead of saving.

Reverse mode through a layer saves its weight for the input's gradient. A host that loads its
weights under ``torch.inference_mode`` (ComfyUI does) makes inference tensors, which autograd
refuses to save, so the alternative is a copy of every weight on the gradient's path: 5.5 GiB for
SDXL's output blocks. The weights are frozen and held by the model anyway, so these layers keep a
plain reference to them and compute only the input's derivatives (JVP and VJP). Each is a
``torch.autograd.Function`` with a generated vmap rule, so ``torch.func.jvp``, ``vjp`` and ``vmap``
all go through it.
"""

import contextlib
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

# ``weight_and_bias(layer, x) -> (weight, bias)``: the weights a layer computes with for input ``x``.
WeightAndBias = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def own_weight_and_bias(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A layer's own weight and bias in ``x``'s dtype and device, as a manually cast layer computes.

    A host whose layers compute with other weights than they store (weight patches such as LoRA
    applied on the fly, offloaded or quantised weights) passes its own cast instead.
    """
    return layer.weight.to(x), None if layer.bias is None else layer.bias.to(x)


class _FrozenLinear(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias):
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        # A reference, not save_for_backward, which refuses inference tensors.
        ctx.weight = inputs[1]

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output @ ctx.weight.to(grad_output), None, None

    @staticmethod
    def jvp(ctx, tangent_x, tangent_weight, tangent_bias):
        return F.linear(tangent_x, ctx.weight.to(tangent_x))


class _FrozenConv2d(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, stride, padding, dilation, groups):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.weight, _, *ctx.conv = inputs
        ctx.input_shape = x.shape

    @staticmethod
    def backward(ctx, grad_output):
        grad_x = torch.nn.grad.conv2d_input(ctx.input_shape, ctx.weight.to(grad_output), grad_output, *ctx.conv)
        return grad_x, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, tangent_x, *_):
        return F.conv2d(tangent_x, ctx.weight.to(tangent_x), None, *ctx.conv)


def padded_input(conv: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``x`` and the int padding left for the conv: padded here as ``conv`` would itself for another padding mode
    or a padding given by name ("same" may pad one side more)."""
    if conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
        return x, conv.padding
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, conv._reversed_padding_repeated_twice, mode=mode), (0, 0)


def frozen_forward(layer: nn.Module, weight_and_bias: WeightAndBias = own_weight_and_bias):
    """``layer``'s forward (an ``nn.Linear`` or ``nn.Conv2d``) with its weights referenced, not saved, for autograd."""
    if isinstance(layer, nn.Linear):
        return lambda x: _FrozenLinear.apply(x, *weight_and_bias(layer, x))
    if isinstance(layer, nn.Conv2d):
        def conv(x):
            weight, bias = weight_and_bias(layer, x)
            x, padding = padded_input(layer, x)
            return _FrozenConv2d.apply(x, weight, bias, layer.stride, padding, layer.dilation, layer.groups)
        return conv
    raise ValueError(f"only nn.Linear and nn.Conv2d layers can run frozen, got {type(layer).__name__}")


def frozen_layers(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """The ``nn.Linear`` and ``nn.Conv2d`` layers in ``modules`` and their children, each once."""
    layers = {id(layer): layer for module in modules for layer in module.modules()
              if isinstance(layer, (nn.Linear, nn.Conv2d)) and "forward" not in vars(layer)}
    return list(layers.values())


@contextlib.contextmanager
def referenced_weights(layers: Iterable[nn.Module], weight_and_bias: WeightAndBias = own_weight_and_bias):
    """Run each of ``layers`` (frozen ``nn.Linear`` or ``nn.Conv2d``) with :func:`frozen_forward` until the block exits.

    Their weights get no gradient, whether or not they require one. The forward is shadowed by an
    instance attribute, removed in ``finally``, so the layers are left as they were.
    """
    layers = list(layers)
    for layer in layers:
        if "forward" in vars(layer):
            raise ValueError(f"{type(layer).__name__} already has a patched forward")
    try:
        for layer in layers:
            layer.forward = frozen_forward(layer, weight_and_bias)
        yield
    finally:
        for layer in layers:
            vars(layer).pop("forward", None)
