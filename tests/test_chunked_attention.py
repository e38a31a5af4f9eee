import pytest
import torch
from torch.func import jvp, vjp, vmap

from ngdm_core.chunked_attention import blocked_attention, rows_per_block


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def plain_attention(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v


@pytest.mark.parametrize("rows", [1, 5, 37, 64])
def test_blocked_attention_and_both_derivatives_equal_plain_attentions_autograd(rows):
    """Output, a vmapped JVP and a vmapped VJP against autograd through the plain softmax attention.

    Both compute the same float64 sums (at most 37 terms of size O(1) after the softmax's shift) in
    another order, and the softmax's derivative by an equivalent formula, so they differ by
    rounding: a few dozen ulps (2.2e-16) of values of order 1 to 10, far below 1e-12. Row blocks
    that do not divide the 37 queries (5), one row (1) and one block of all (37, 64) are covered.
    """
    q, k, v = randn(3, 37, 8, seed=0), randn(3, 11, 8, seed=1), randn(3, 11, 8, seed=2)
    blocked = lambda q, k, v: blocked_attention(q, k, v, rows)  # noqa: E731
    torch.testing.assert_close(blocked(q, k, v), plain_attention(q, k, v), rtol=0, atol=1e-12)
    tangents = [randn(4, *tensor.shape, seed=3 + index) for index, tensor in enumerate((q, k, v))]
    forward = [vmap(lambda *tangent: jvp(function, (q, k, v), tangent)[1])(*tangents)
               for function in (blocked, plain_attention)]
    torch.testing.assert_close(forward[0], forward[1], rtol=0, atol=1e-12)
    covectors = randn(4, 3, 37, 8, seed=6)
    pulled = [vmap(vjp(function, q, k, v)[1])(covectors) for function in (blocked, plain_attention)]
    for ours, reference in zip(*pulled):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)


def test_half_precision_is_computed_in_float32_and_returned_as_given():
    q, k, v = (randn(2, 9, 4, seed=seed).half() for seed in range(3))
    out = blocked_attention(q, k, v, 4)
    assert out.dtype == torch.float16
    # float16 inputs are exact in float32; the only half-precision rounding is the output's (2^-11 relative).
    torch.testing.assert_close(out.float(), plain_attention(q.float(), k.float(), v.float()), rtol=2**-10, atol=1e-3)


def test_rows_per_block_keeps_one_block_of_scores_within_the_bytes_given():
    assert rows_per_block(8, 4096, 64 * 2**20) == 512
    assert 8 * rows_per_block(8, 4096, 1e6) * 4096 * 4 <= 1e6
    assert rows_per_block(8, 4096, 1) == 1  # at least one row, whatever the budget


def test_bad_rows_are_refused():
    q = randn(1, 4, 2, seed=0)
    with pytest.raises(ValueError, match="rows must be at least 1"):
        blocked_attention(q, q, q, 0)
