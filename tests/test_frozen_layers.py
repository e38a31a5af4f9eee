"""Frozen layers with referenced weights: the same derivatives as autograd on a copy, with inference weights."""

import pytest
import torch
from torch import nn
from torch.func import jvp, vjp, vmap

from ngdm_core.frozen_layers import frozen_layers, referenced_weights

torch.set_num_threads(1)


def _network():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.GroupNorm(2, 6), nn.SiLU(),
                         nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=2), nn.SiLU(),
                         nn.Conv2d(6, 4, 3, padding=1, padding_mode="reflect"), nn.Flatten(1), nn.Linear(64, 5)).double()


def _products(network, h, tangents, covectors):
    _, pull = vjp(network, h)
    return vmap(lambda t: jvp(network, (h,), (t,))[1])(tangents), vmap(pull)(covectors)[0]


def test_referenced_weights_give_autograds_products_with_inference_weights():
    network = _network()
    h = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    tangents, covectors = torch.randn(3, *h.shape, dtype=torch.float64), torch.randn(3, 2, 5, dtype=torch.float64)
    network.requires_grad_(False)
    expected = _products(network, h, tangents, covectors)
    with torch.inference_mode():
        frozen = _network().requires_grad_(False)  # inference tensors, as ComfyUI loads weights
    # Only the norm's weights are cloned, as a node does for layers that are not linear or conv.
    frozen[1].weight, frozen[1].bias = (nn.Parameter(p.clone(), requires_grad=False) for p in network[1].parameters())

    def backward(network):
        leaf = h.clone().requires_grad_()
        (network(leaf) * covectors[0]).sum().backward()
        return leaf.grad

    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        backward(frozen)
    with referenced_weights(frozen_layers([frozen])):
        actual = (*_products(frozen, h, tangents, covectors), backward(frozen))
    expected = (*expected, backward(network))
    assert "forward" not in vars(frozen[0])
    # The same float64 operations up to summation order: rounding ~1e-16 relative.
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
